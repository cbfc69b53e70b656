"""The model registry: bundled LiteMedSAM on real numbers, user checkpoints through the same loader."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from sam4med.engine.errors import InputError
from sam4med.engine.networks import build_vit_sam
from sam4med.engine.models import load_model, resolve_device
from sam4med.engine.registry import MODELS
from sam4med.engine.prompts import Prompt, tight_box


def test_litemedsam_follows_a_box_on_a_clean_ellipse(litemedsam, ellipse_image):
    image, mask = ellipse_image
    embedding = litemedsam.encode(image)
    assert embedding.features.shape == (1, 256, 64, 64)
    decoded = litemedsam.decode(embedding, [Prompt(box=tight_box(mask))])
    pred = decoded.masks()[0, 0]
    assert pred.shape == mask.shape
    dice = 2 * (pred & mask).sum() / (pred.sum() + mask.sum())
    assert dice > 0.95
    assert decoded.low_res.shape == (1, 1, 256, 256)
    assert 0.5 < float(decoded.iou[0, 0]) <= 1.1


def test_litemedsam_ignores_point_only_prompts(litemedsam, ellipse_image):
    """Measured, not hoped: LiteMedSAM was trained on boxes; a point alone gives (almost) nothing."""
    image, mask = ellipse_image
    decoded = litemedsam.decode(litemedsam.encode(image), [Prompt(points=[(150, 100)])])
    pred = decoded.masks()[0, 0]
    assert 2 * (pred & mask).sum() / (pred.sum() + mask.sum()) < 0.2


def test_geometry_maps_boxes_like_the_model_input(litemedsam):
    geometry = litemedsam.geometry((200, 300))
    assert geometry.resized_size == (171, 256)
    assert geometry.scale_xy == pytest.approx((256 / 300, 171 / 200))
    model_input, _ = litemedsam.preprocess(np.zeros((200, 300, 3), np.uint8) + np.arange(300, dtype=np.uint8)[None, :, None] % 200)
    assert model_input.shape == (1, 3, 256, 256)
    assert float(model_input.max()) == pytest.approx(1.0) and float(model_input.min()) == 0.0
    assert float(model_input[..., 171:, :].abs().max()) == 0.0  # padding below the content


def test_bundled_weights_are_hash_checked(litemedsam):
    assert litemedsam.weights_sha256 == MODELS["litemedsam"].expected_sha256()
    assert not litemedsam.network.training


@pytest.mark.parametrize("name", ["sam_vit_b", "sam_vit_h", "medsam", "mobilesam"])
def test_user_checkpoint_loads_through_the_same_code(tmp_path: Path, monkeypatch, name: str):
    """A small randomly initialised checkpoint stands in for a user's file (no downloads here).

    ViT models get a 2-block, 32-wide encoder (same classes, same loader) to keep the test fast;
    MobileSAM's TinyViT is small enough to test at full size.
    """
    spec = MODELS[name]
    if name != "mobilesam":
        spec = replace(spec, build=partial(build_vit_sam, 32, 2, 2, (1,)))
        monkeypatch.setitem(MODELS, name, spec)
    network = spec.build()
    path = tmp_path / f"{name}.pth"
    torch.save({"model": network.state_dict()}, path)  # a training checkpoint's usual wrapping
    model = load_model(name, path, device="cpu")
    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    decoded = model.decode(model.encode(image), [Prompt(box=[5, 5, 30, 20])], multimask=True)
    assert decoded.logits.shape == (1, 3, 40, 60)
    assert torch.isfinite(decoded.logits).all()


def test_bad_checkpoints_give_one_line_errors(tmp_path: Path):
    with pytest.raises(InputError, match="not found"):
        load_model("sam_vit_b", tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="garbage.pth: not a loadable"):
        load_model("sam_vit_b", garbage)
    wrong = tmp_path / "wrong.pth"
    torch.save({"image_encoder.foo": torch.zeros(1)}, wrong)
    with pytest.raises(InputError, match="do not fit model 'mobilesam'") as info:
        load_model("mobilesam", wrong)
    message = str(info.value)
    assert "\n" not in message and len(message) <= len(str(wrong)) + 360 and message.count("Error(s) in loading") == 1
    with pytest.raises(InputError, match="ships no weights"):
        load_model("sam_vit_h")
    with pytest.raises(InputError, match="unknown model"):
        load_model("vit_z")


class RunsCode:
    """A pickle that runs a command when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["litemedsam", "sam_vit_b"])
def test_a_malicious_pickle_is_never_run_and_no_unsafe_advice_is_given(tmp_path: Path, name: str):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model": RunsCode(marker)}, evil)
    with pytest.raises(InputError, match="evil.pth: not a loadable PyTorch checkpoint") as info:
        load_model(name, evil)
    assert not marker.exists()
    assert "weights_only=False" not in str(info.value) and "\n" not in str(info.value)


def test_prompt_outside_the_image_is_rejected(litemedsam, ellipse_image):
    image, _ = ellipse_image
    with pytest.raises(InputError, match="outside the 300x200 image"):
        litemedsam.decode(litemedsam.encode(image), [Prompt(box=[10, 10, 320, 50])])


def test_bf16_autocast_keeps_the_masks_and_is_recorded(click_model, ellipse_image):
    """bfloat16 autocast changes the arithmetic, not the answer: on a clean ellipse its box and click masks
    match fp32's within a few edge pixels, its outputs stay fp32, and the protocol (hence the embedding cache's
    key) says which precision ran."""
    image, mask = ellipse_image
    bf16 = load_model("litemedsam-click", device="cpu", precision="bf16")
    fp32_embedding, bf16_embedding = click_model.encode(image), bf16.encode(image)
    assert bf16_embedding.features.dtype == torch.float32
    difference = (fp32_embedding.features - bf16_embedding.features).abs()
    assert 0 < float(difference.mean()) < 0.1 * float(fp32_embedding.features.abs().mean())  # about 5% here
    for prompt, multimask in ((Prompt(box=tight_box(mask)), False), (Prompt(points=[(150, 100)]), True)):
        reference = click_model.decode(fp32_embedding, [prompt], multimask=multimask)
        decoded = bf16.decode(bf16_embedding, [prompt], multimask=multimask)
        assert decoded.low_res.dtype == torch.float32 and decoded.iou.dtype == torch.float32
        best = int(reference.iou[0].argmax())
        a, b = reference.masks()[0, best], decoded.masks()[0, best]
        assert (a & b).sum() / (a | b).sum() > 0.97
        assert abs(float(reference.iou[0, best]) - float(decoded.iou[0, best])) < 0.05
    assert "precision" not in click_model.protocol()
    assert bf16.protocol()["precision"].startswith("bf16")


def test_an_unknown_precision_is_refused_before_loading():
    with pytest.raises(InputError, match="--precision 'fp16': choose one of fp32, bf16"):
        load_model("litemedsam", device="cpu", precision="fp16")


def test_loading_a_model_on_the_cpu_tunes_the_allocator_as_the_verbs_do(monkeypatch):
    """Code that calls the library directly gets the command line's allocator settings (engine.runtime)."""
    import sam4med.engine.models as models

    calls = []
    monkeypatch.setattr(models, "tune_allocator", lambda: calls.append(True) or True)
    models.load_model("litemedsam", device="cpu")
    assert calls == [True]
    models.load_model("litemedsam", device="cpu", tune_memory=False)  # the benchmarks' reference path
    assert calls == [True]


@pytest.mark.parametrize("device", ["tpu", "", "cuda:x", "meta"])
def test_a_device_this_machine_cannot_use_is_one_line_naming_the_option(device):
    with pytest.raises(InputError, match=f"--device {device!r}|--device {device}:"):
        resolve_device(device)


def test_cuda_without_a_gpu_is_refused_before_any_model_loads():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(InputError, match="--device cuda: this machine has no CUDA GPU"):
        load_model("litemedsam", device="cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_preprocessing_channel_by_channel_gives_the_whole_tensors_values(litemedsam):
    from sam4med.engine.preprocessing import normalise, pad_to_input, resize_content

    for size in [(1000, 700), (37, 500), (257, 255)]:
        image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
        model_input, geometry = litemedsam.preprocess(image)
        whole = resize_content(torch.tensor(image).permute(2, 0, 1)[None].float(), geometry)
        assert torch.equal(model_input, pad_to_input(normalise(whole, litemedsam.spec), geometry))


LARGE_IMAGE_PROBE = """
import re
import sys

import numpy as np
from PIL import Image
from sam4med.engine.imageio import read_image
from sam4med.engine.models import load_model
from sam4med.engine.runtime import release_free_memory

def status_mb(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024

model = load_model("litemedsam", device="cpu")  # tunes the allocator as the verbs do
rows = np.arange(6000, dtype=np.uint8)[:, None, None]
Image.fromarray(np.broadcast_to(rows, (6000, 6000, 3)).copy()).save(sys.argv[1])
release_free_memory()
before = status_mb("RssAnon")
image = read_image(sys.argv[1])
kept_by_reading = status_mb("RssAnon") - before
with open("/proc/self/clear_refs", "w") as handle:  # the resident peak counts from here on
    handle.write("5")
start = status_mb("VmRSS")
model.preprocess(image)
print(image.nbytes >> 20, kept_by_reading, status_mb("VmHWM") - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator and /proc")
def test_a_large_image_is_read_and_preprocessed_within_twice_its_size(tmp_path):
    """A 6000 px RGB image (103 MB, 102 MiB): reading kept the decoder's buffers resident (the tuned allocator holds freed
    blocks; 3x the image was resident after a 12000 px read), and preprocessing made the image one float tensor
    (4x) and copied it again before resizing."""
    image_mb, kept_by_reading, preprocessing_peak = map(int, subprocess.run(
        [sys.executable, "-c", LARGE_IMAGE_PROBE, str(tmp_path / "large.png")], check=True, capture_output=True,
        text=True).stdout.split())
    assert image_mb == 102  # MiB
    assert kept_by_reading < 1.5 * image_mb
    assert preprocessing_peak < 2 * image_mb
