"""The ONNX Runtime predictor gives the PyTorch predictor's masks, starts without PyTorch, and re-exports
graphs that are stale or damaged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sam4med.engine.errors import InputError
from sam4med.engine.onnx_predictor import choose_runtime, manifest_path, model_input, onnx_predictor, resize_bilinear
from sam4med.engine.openvino_encoder import computes_bf16
from sam4med.engine.predictor import Predictor
from sam4med.engine.prompts import Prompt, center_point, tight_box
from sam4med.engine.registry import model_spec

from conftest import make_ellipse_image


@pytest.fixture(scope="session")
def graphs(tmp_path_factory):
    """litemedsam-click exported once (encoder, trained decoder, LiteMedSAM's box decoder) into the ``onnx``
    folder of a cache root of its own."""
    folder = tmp_path_factory.mktemp("cache") / "onnx"
    onnx_predictor("litemedsam-click", folder=folder)
    return folder


def _prompts(mask):
    box, point = tight_box(mask), center_point(mask)
    return [(Prompt(box=box), False), (Prompt(points=[point]), True), (Prompt(points=[point], box=box), False),
            (Prompt(points=[point, (5, 5)], labels=[1, 0]), False)]


@pytest.mark.parametrize("size", [(200, 300), (120, 90), (600, 410)])  # wider, smaller than the input, larger
def test_masks_equal_the_pytorch_predictor(graphs, click_model, size):
    image, mask = make_ellipse_image(*size, centre=(size[0] // 2, size[1] // 2), radii=(size[0] // 4, size[1] // 3))
    fast, reference = onnx_predictor("litemedsam-click", folder=graphs), Predictor(click_model)
    for prompt, multimask in _prompts(mask):
        masks, iou = fast.prompt_masks(image, prompt, multimask)
        expected, expected_iou = reference.prompt_masks(image, prompt, multimask)
        assert masks.shape == expected.shape == ((3,) if multimask else (1,)) + size
        assert (masks != expected).mean() < 1e-4, prompt
        np.testing.assert_allclose(iou, expected_iou, atol=1e-4)
    box_masks, _ = fast.prompt_masks(image, Prompt(box=tight_box(mask)), False)
    assert 2 * (box_masks[0] & mask).sum() / (box_masks[0].sum() + mask.sum()) > 0.9


def test_a_strip_a_few_pixels_wide_is_segmented_by_both_runtimes(graphs, click_model):
    image = np.zeros((3000, 3, 3), np.uint8)  # 0.26 px wide at 256, which rounds to 0
    image[900:2100] = 200
    box = Prompt(box=(0, 800, 2, 2200))
    assert model_input(image, 256)[1] == click_model.preprocess(image)[1].resized_size == (256, 1)  # not 0 px wide
    masks, _ = onnx_predictor("litemedsam-click", folder=graphs).prompt_masks(image, box, False)
    expected, _ = Predictor(click_model).prompt_masks(image, box, False)
    assert masks.shape == expected.shape == (1, 3000, 3)
    assert (masks != expected).mean() < 1e-3


def test_model_input_and_upscaling_equal_pytorch(click_model):
    import torch
    import torch.nn.functional as F

    for size in [(200, 300), (37, 500), (257, 255)]:
        image = np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)
        pixels, resized = model_input(image, 256)
        expected, geometry = click_model.preprocess(image)
        assert resized == geometry.resized_size
        np.testing.assert_allclose(pixels, expected.numpy(), atol=1e-4)  # float rounding of two filters
        logits = np.random.default_rng(1).normal(size=(2, *resized)).astype(np.float32)
        for target in [size, (size[0] // 3 + 1, size[1] // 3 + 1)]:  # upscaled and shrunk
            reference = F.interpolate(torch.from_numpy(logits)[None], size=target, mode="bilinear", align_corners=False)
            np.testing.assert_allclose(resize_bilinear(logits, target), reference[0].numpy(), atol=1e-4)


def test_upscaling_in_strips_gives_the_same_logits_and_thresholds_them(monkeypatch):
    from sam4med.engine import onnx_predictor

    logits = np.random.default_rng(2).normal(size=(3, 171, 256)).astype(np.float32)
    whole = resize_bilinear(logits, (1000, 1500))
    monkeypatch.setattr(onnx_predictor, "STRIP_PIXELS", 7 * 1500)  # strips of 7 rows, the last one shorter
    assert np.array_equal(resize_bilinear(logits, (1000, 1500)), whole)
    masks = resize_bilinear(logits, (1000, 1500), above=0.0)
    assert masks.dtype == bool and np.array_equal(masks, whole > 0) and 0.2 < masks.mean() < 0.8


@pytest.mark.parametrize("runtime", ["auto", "openvino"])
def test_segment_from_a_fresh_process_imports_no_pytorch(graphs, tmp_path, runtime):
    image, mask = make_ellipse_image()
    Image.fromarray(image).save(tmp_path / "image.png")
    x0, y0, x1, y1 = tight_box(mask).tolist()
    probe = ("import runpy, sys\n"
             "sys.argv = ['sam4med', 'segment', 'image.png', '--box', *map(str, [%r, %r, %r, %r]), '--out', 'out.png',\n"
             "            '--runtime', %r]\n"
             "try:\n    runpy.run_module('sam4med', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'torchvision', 'timm', 'monai', 'scipy', 'skimage') if m in sys.modules))\n"
             % (x0, y0, x1, y1, runtime))
    environment = {**os.environ, "SAM4MED_CACHE": str(graphs.parent)}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    written = np.asarray(Image.open(tmp_path / "out.png")) > 0
    assert 2 * (written & mask).sum() / (written.sum() + mask.sum()) > 0.9


def test_stale_or_damaged_graphs_are_exported_again(graphs, tmp_path):
    folder = tmp_path / "onnx"
    folder.mkdir()
    for path in graphs.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    manifest = manifest_path("litemedsam-click", folder)
    record = json.loads(manifest.read_text())
    record["sources"][0]["mtime_ns"] += 1  # the installed weights changed since the export
    manifest.write_text(json.dumps(record))
    onnx_predictor("litemedsam-click", folder=folder)
    assert json.loads(manifest.read_text())["sources"] == json.loads(manifest_path("litemedsam-click", graphs).read_text())["sources"]
    decoder, encoder = folder / record["graphs"]["decoder"], folder / record["graphs"]["encoder"]
    decoder.write_bytes(b"not an onnx graph")
    encoder.write_bytes(encoder.read_bytes()[:1000])  # cut by a full disk
    image, mask = make_ellipse_image()
    masks, _ = onnx_predictor("litemedsam-click", folder=folder).prompt_masks(image, Prompt(points=[center_point(mask)]), False)
    assert decoder.stat().st_size > 1000 and encoder.stat().st_size > 1_000_000 and masks[0][mask].mean() > 0.5


def test_the_int8_encoder_keeps_the_masks_and_is_recorded(graphs):
    image, mask = make_ellipse_image(240, 320, centre=(120, 160), radii=(50, 80))
    fp32, int8 = onnx_predictor("litemedsam-click", folder=graphs), onnx_predictor("litemedsam-click", folder=graphs, int8=True)
    assert "encoder" not in fp32.protocol and int8.protocol["encoder"] == "onnx-int8"
    fp32.set_image(image)
    int8.set_image(image)
    cosine = (fp32.features * int8.features).sum() / np.linalg.norm(fp32.features) / np.linalg.norm(int8.features)
    assert 0.97 < cosine < 1.0  # changed, a little
    for prompt, multimask in _prompts(mask)[:3]:
        a, _ = fp32.prompt_masks(image, prompt, multimask)
        b, _ = int8.prompt_masks(image, prompt, multimask)
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.98


def test_the_openvino_encoder_gives_onnx_runtimes_embedding_and_masks(graphs, tmp_path, monkeypatch):
    monkeypatch.setenv("SAM4MED_CACHE", str(tmp_path))  # OpenVINO's compiled graph is cached there
    image, mask = make_ellipse_image(240, 320, centre=(120, 160), radii=(50, 80))
    onnx, openvino = (onnx_predictor("litemedsam-click", folder=graphs, openvino=flag) for flag in (False, True))
    onnx.set_image(image)
    openvino.set_image(image)
    assert np.abs(onnx.features - openvino.features).max() < 1e-4 and openvino.protocol == onnx.protocol
    for prompt, multimask in _prompts(mask):
        a, a_iou = onnx.prompt_masks(image, prompt, multimask)
        b, b_iou = openvino.prompt_masks(image, prompt, multimask)
        assert (a != b).mean() < 1e-4
        np.testing.assert_allclose(a_iou, b_iou, atol=1e-4)
    assert any((tmp_path / "openvino" / "f32").iterdir())


def test_the_openvino_encoder_in_bf16_is_recorded_and_keeps_the_masks(graphs, tmp_path, monkeypatch):
    monkeypatch.setenv("SAM4MED_CACHE", str(tmp_path))
    image, mask = make_ellipse_image(240, 320, centre=(120, 160), radii=(50, 80))
    fp32, bf16 = (onnx_predictor("litemedsam-click", folder=graphs, openvino=True, bf16=flag) for flag in (False, True))
    computed = "bf16" if computes_bf16() else "fp32"
    assert bf16.protocol == {**fp32.protocol, "precision": f"bf16 (encoder on openvino in {computed}, decoders fp32)"}
    for prompt, multimask in _prompts(mask):
        a, _ = fp32.prompt_masks(image, prompt, multimask)
        b, _ = bf16.prompt_masks(image, prompt, multimask)
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.97
    if computes_bf16():
        assert 0 < np.abs(fp32.features - bf16.features).max() and any((tmp_path / "openvino" / "bf16").iterdir())
    with pytest.raises(InputError, match="^--precision bf16: on the exported graphs only with --runtime openvino$"):
        onnx_predictor("litemedsam-click", folder=graphs, bf16=True)


def test_runtime_choice():
    click = model_spec("litemedsam-click")
    assert choose_runtime("auto", click) == "onnx"
    assert choose_runtime("openvino", click) == "openvino"
    with pytest.raises(InputError, match="--runtime openvino: not with --tile"):
        choose_runtime("openvino", click, tile=256)
    assert choose_runtime("auto", click, tile=256) == choose_runtime("auto", model_spec("medsam")) == "torch"
    assert choose_runtime("auto", click, checkpoint="run/best.pt") == choose_runtime("torch", click) == "torch"
    assert choose_runtime("auto", click, precision="bf16") == "torch"  # autocast is PyTorch's
    with pytest.raises(InputError, match="--runtime onnx: not with --precision bf16"):
        choose_runtime("onnx", click, precision="bf16")
    assert choose_runtime("openvino", click, precision="bf16") == "openvino"  # its encoder computes in bf16
    with pytest.raises(InputError, match="--runtime onnx: not with --device cuda"):
        choose_runtime("onnx", click, device="cuda")
    with pytest.raises(InputError, match="--runtime 'tensorrt'"):
        choose_runtime("tensorrt", click)


def test_a_runtime_that_is_not_installed_is_named_with_how_to_install_it(monkeypatch):
    click = model_spec("litemedsam-click")
    monkeypatch.setattr("sam4med.engine.onnx_predictor.openvino_available", lambda: False)
    with pytest.raises(InputError, match=r"^--runtime openvino: needs OpenVINO \(pip install openvino\)$"):
        choose_runtime("openvino", click)
    monkeypatch.setattr("sam4med.engine.onnx_predictor.onnx_runtime_available", lambda: False)
    with pytest.raises(InputError, match=r"^--runtime onnx: needs ONNX Runtime \(pip install onnxruntime\)$"):
        choose_runtime("onnx", click)
    assert choose_runtime("auto", click) == "torch"  # auto takes what is there
