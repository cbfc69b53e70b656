"""The command line: engine verbs at the top, one group per method, each verb answering --help."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sam4med.cli import app

GROUPS = {"eval": ["benchmark", "report"], "samaug": ["priors", "train", "predict", "evaluate"],
          "samunet": ["train"], "clicks": ["train", "export"]}


def test_top_level_lists_engine_verbs_and_method_groups():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ["models", "segment", "segment-volume", "demo", *GROUPS]:
        assert name in result.output
    assert CliRunner().invoke(app, ["benchmark", "--help"]).exit_code == 2  # no flat method verbs any more


@pytest.mark.parametrize("group", GROUPS)
def test_each_group_lists_its_verbs_and_each_verb_has_help(group):
    result = CliRunner().invoke(app, [group, "--help"])
    assert result.exit_code == 0 and all(verb in result.output for verb in GROUPS[group])
    for verb in GROUPS[group]:
        assert CliRunner().invoke(app, [group, verb, "--help"]).exit_code == 0


def test_models_lists_the_registry():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0 and "litemedsam" in result.output and "bundled" in result.output


def test_ctrl_c_says_what_was_kept_instead_of_exiting_silently(monkeypatch):
    class Interrupting(dict):
        def values(self):
            raise KeyboardInterrupt
    monkeypatch.setattr("sam4med.engine.registry.MODELS", Interrupting())
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 130
    assert result.output.strip() == ("error: interrupted; what was finished is kept, and the same command continues a "
                                     "batch run or training where it stopped")

def test_bad_input_in_a_group_verb_is_one_line_with_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["samunet", "train", "--method", "decoder", "--data", str(tmp_path / "none"), "--out",
                                      str(tmp_path / "run")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "none" in lines[0]


@pytest.mark.parametrize(("arguments", "named"), [
    (["--jitter", "nan"], "--jitter"),
    (["--max-images", "-1"], "--max-images"),
    (["--max-objects", "-1"], "--max-objects"),
    (["--rounds", "-1"], "--rounds"),
    (["--mask-rule", "biggest"], "--mask-rule"),
    (["--modes", "points0"], "--modes points0: needs at least one positive"),
    (["--click-rule", "nearest"], "--click-rule"),
    (["--threads", "-3"], "--threads"),
    (["--split", "holdout"], "--split"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--tile", "8"], "--tile"),
    (["--halo", "-1"], "--halo"),
    (["--precision", "fp16"], "--precision"),
])
def test_bad_benchmark_settings_stop_before_anything_is_written(tmp_path, arguments, named):
    """Checked where they enter: one line naming the argument, exit 2, and no protocol.json or results."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    result = CliRunner().invoke(app, ["eval", "benchmark", "--data", str(data), "--out", str(tmp_path / "out"),
                                      *arguments])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert not (tmp_path / "out").exists()



@pytest.mark.parametrize("verb", ["segment-volume", "annotate"])
@pytest.mark.parametrize(("arguments", "named"), [(["--tile", "8"], "--tile"), (["--tile", "256", "--halo", "-1"], "--halo")])
def test_bad_tiling_of_a_volume_or_the_annotator_is_one_line_before_the_model_loads(tmp_path, verb, arguments, named):
    from conftest import write_disc_volume

    volume = tmp_path / "disc.nrrd"
    write_disc_volume(volume)
    target = [str(volume), "--box3d", "10", "10", "2", "50", "40", "8", "--out", str(tmp_path / "out.nii.gz")] \
        if verb == "segment-volume" else [str(tmp_path)]
    result = CliRunner().invoke(app, [verb, *target, *arguments])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert not (tmp_path / "out.nii.gz").exists() and not (tmp_path / ".sam4med").exists()

def _benchmark_in(tmp_path, out):
    from conftest import make_ellipse_image
    from PIL import Image

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    (data / "masks").mkdir(exist_ok=True)
    image, mask = make_ellipse_image(64, 64, (32, 32), (12, 16))
    Image.fromarray(image).save(data / "images" / "a.png")
    Image.fromarray(mask.astype("uint8") * 255).save(data / "masks" / "a.png")
    return CliRunner().invoke(app, ["eval", "benchmark", "--data", str(data), "--out", str(out), "--modes", "box",
                                    "--device", "cpu"])


def _one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_an_out_that_is_a_file_or_a_damaged_record_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("a file")
    assert "is a file, not a folder" in _one_error_line(_benchmark_in(tmp_path, tmp_path / "taken"))
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "protocol.json").write_text('{"model": "litem')
    assert "protocol.json: damaged" in _one_error_line(_benchmark_in(tmp_path, tmp_path / "damaged"))


def test_a_folder_the_file_system_refuses_is_one_line(tmp_path):
    """/proc takes no new folders, even from root: the OSError becomes one line naming the path."""
    line = _one_error_line(_benchmark_in(tmp_path, Path("/proc/sam4med-test/out")))
    assert "/proc/sam4med-test" in line


BAD_TRAINER_SETTINGS = [(["--learning-rate", value], "--learning-rate") for value in ("nan", "-1", "0")] + [
    (["--seed", "-1"], "--seed"), (["--seed", str(2**64)], "--seed"),  # past 64 bits: PyTorch's seed overflowed
    (["--max-train-images", "-1"], "--max-train-images"), (["--epochs", "0"], "--epochs"),
    (["--precision", "fp16"], "--precision")]


@pytest.mark.parametrize(("verb", "arguments", "named"), [
    *[(verb, arguments, named) for verb in (["samaug", "train"], ["samunet", "train"], ["clicks", "train"])
      for arguments, named in BAD_TRAINER_SETTINGS],
    (["samaug", "train"], ["--split-seed", "-1"], "--split-seed"),
    (["samaug", "train"], ["--patience", "-1"], "--patience"),
    (["samunet", "train"], ["--patience", "-1"], "--patience"),
    (["clicks", "train"], ["--patience", "-1"], "--patience"),
    (["samaug", "train"], ["--features", "0"], "--features"),
    (["samaug", "train"], ["--batch-size", "0"], "--batch-size"),
    (["samunet", "train"], ["--masks-per-image", "0"], "--masks-per-image"),
    (["clicks", "train"], ["--rounds", "-1"], "--rounds"),
    (["clicks", "train"], ["--background-clicks", "-1"], "--background-clicks"),
    (["clicks", "train"], ["--iou-rank-weight", "-1"], "--iou-rank-weight"),
    (["clicks", "train"], ["--iou-rank-weight", "nan"], "--iou-rank-weight"),
    (["clicks", "train"], ["--centre-click-share", "1.5"], "--centre-click-share"),
    (["clicks", "train"], ["--first-round-share", "-0.1"], "--first-round-share"),
])
def test_bad_trainer_settings_stop_before_anything_is_written(tmp_path, verb, arguments, named):
    result = CliRunner().invoke(app, [*verb, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                                      *arguments])
    assert named in _one_error_line(result)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("arguments", "expected"), [
    (["eval", "benchmark", "--data", "d", "--out", "o", "--threads", "abc"], "error: --threads: "),
    (["eval", "benchmark", "--data", "d"], "error: --out: missing"),
    (["segment", "image.png", "--out", "m.png", "--box", "1", "2", "3"], "error: --box: requires 4"),
    (["segment", "image.png", "--out", "m.png", "--box", "1,2,3,4"],  # written as --point is
     "error: --box: requires 4 arguments, separated by spaces (not commas)"),
    (["segment", "image.png", "--out", "m.png", "--box", "1", "2", "3", "x"], "error: --box: "),
    (["segment", "--no-such-option"], "error: --no-such-option: no such option"),
    (["segment", "image.png", "extra", "--out", "m.png", "--box", "1", "2", "3", "4"],
     "error: arguments: Got unexpected extra argument"),
    (["segment", "image.png", "--out", "m.png", "--point", "nan,1"], "error: --point 'nan,1': X and Y must be finite"),
    (["segment", "image.png", "--out", "m.png", "--point", "1e40,1"], "error: --point: points [[1e+40, 1.0]]"),
    (["segment", "image.png", "--out", "m.png", "--box", "5", "5", "1", "1"], "error: --box: box [5.0, 5.0, 1.0, 1.0]"),
    (["segment", "image.png", "--out", "m.png", "--point", "1,1", "--label", "3"], "error: --point --label: point"),
    (["eval", "no-such-verb"], "error: No such command 'no-such-verb'"),
    (["segment", "a\nb.png", "--out", "m.png", "--box", "1", "2", "3", "4"], "error: a\\nb.png: "),  # a file name's newline
    (["segment-volume", "v.nii.gz", "--box3d", "1", "1", "1", "5", "5", "5", "--out", "l.nii.gz", "--threads", "0"],
     "error: --threads 0: "),
])
def test_usage_errors_are_one_line_too(arguments, expected):
    """A wrong type, a missing or unknown option: the same one line and exit 2 as any other bad input."""
    assert _one_error_line(CliRunner().invoke(app, arguments)).startswith(expected)


def test_an_unknown_everything_method_is_one_line():
    line = _one_error_line(CliRunner().invoke(app, ["eval", "benchmark", "--data", "d", "--out", "o",
                                                    "--everything-method", "grid"]))
    assert "--everything-method 'grid'" in line


@pytest.mark.parametrize(("option", "value"), [("--tile", "-5"), ("--figures", "-1"), ("--region-proposals", "-3"),
                                               ("--region-proposals", "0"),
                                               ("--max-images", "-2"), ("--points-per-side", "0"),
                                               ("--stability-thresh", "1.5")])
def test_bad_priors_settings_stop_before_anything_is_written(tmp_path, option, value):
    result = CliRunner().invoke(app, ["samaug", "priors", "--data", str(tmp_path / "data"), "--out",
                                      str(tmp_path / "priors"), option, value])
    assert option in _one_error_line(result)
    assert not (tmp_path / "priors").exists()


def test_annotate_refuses_a_folder_without_images_or_a_bad_port_before_the_model_loads(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no images" in _one_error_line(CliRunner().invoke(app, ["annotate", str(tmp_path / "empty")]))
    assert "not a folder" in _one_error_line(CliRunner().invoke(app, ["annotate", str(tmp_path / "missing")]))
    assert "--port 0" in _one_error_line(CliRunner().invoke(app, ["annotate", str(tmp_path), "--port", "0"]))
    bad_host = _one_error_line(CliRunner().invoke(app, ["annotate", str(tmp_path), "--host", "999.1.1.1"]))
    assert bad_host.startswith("error: --host '999.1.1.1': not an address")
    with socket.socket() as taken:  # a port another program listens on
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        busy = _one_error_line(CliRunner().invoke(app, ["annotate", str(tmp_path), "--port", port]))
    assert busy.startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen there")
    assert not any(tmp_path.rglob(".sam4med"))


def test_ray_options_without_ray_say_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # an import of ray fails, as where it is not installed
    result = CliRunner().invoke(app, ["eval", "benchmark", "--data", str(tmp_path), "--out", str(tmp_path / "out"),
                                      "--ray", "auto"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --ray: needs Ray (pip install 'sam4med[distributed]')"
    assert not (tmp_path / "out").exists()


def test_segment_in_bf16_gives_the_fp32_mask_to_a_few_edge_pixels(tmp_path):
    """``--precision bf16`` takes PyTorch's path (autocast) and answers a box as fp32 does."""
    import numpy as np
    from conftest import make_ellipse_image
    from PIL import Image

    image, truth = make_ellipse_image()
    Image.fromarray(image).save(tmp_path / "ellipse.png")
    masks = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.png"
        result = CliRunner().invoke(app, ["segment", str(tmp_path / "ellipse.png"), "--box", "80", "60", "220", "140",
                                          "--out", str(out), "--runtime", "torch", "--precision", precision])
        assert result.exit_code == 0, result.output
        masks[precision] = np.asarray(Image.open(out)) > 0
    a, b = masks["fp32"], masks["bf16"]
    assert 2 * (a & truth).sum() / (a.sum() + truth.sum()) > 0.95
    assert (a & b).sum() / (a | b).sum() > 0.98


def test_segment_refuses_int8_with_bf16_in_one_line(tmp_path):
    """The int8 encoder is ONNX Runtime's; bf16 autocast is PyTorch's: asking for both is one line, exit 2."""
    result = CliRunner().invoke(app, ["segment", str(tmp_path / "image.png"), "--box", "1", "2", "30", "40", "--out",
                                      str(tmp_path / "mask.png"), "--int8", "--precision", "bf16"])
    line = _one_error_line(result)
    assert line.startswith("error: --int8: only on the ONNX Runtime path") and "--precision bf16" in line
    assert not (tmp_path / "mask.png").exists()


def test_segment_refuses_int8_with_the_openvino_runtime_in_one_line(tmp_path):
    """The int8 encoder is ONNX Runtime's own graph; OpenVINO compiles the fp32 one."""
    result = CliRunner().invoke(app, ["segment", str(tmp_path / "image.png"), "--box", "1", "2", "30", "40", "--out",
                                      str(tmp_path / "mask.png"), "--int8", "--runtime", "openvino"])
    assert _one_error_line(result) == "error: --int8 is ONNX Runtime's int8 graph: not with --runtime openvino"
    assert not (tmp_path / "mask.png").exists()


def test_segment_runs_on_pytorch_when_the_onnx_cache_cannot_be_written(tmp_path, monkeypatch):
    """``--runtime auto`` exports graphs to a cache; a read-only home or a full disk gives the same model on PyTorch
    with a warning, not a failed command. A runtime asked for by name still fails."""
    from PIL import Image

    from conftest import make_ellipse_image

    image, mask = make_ellipse_image()
    Image.fromarray(image).save(tmp_path / "image.png")
    (tmp_path / "cache").write_text("a file where the cache folder would go")
    monkeypatch.setenv("SAM4MED_CACHE", str(tmp_path / "cache"))
    ys, xs = mask.nonzero()
    box = [str(v) for v in (xs.min(), ys.min(), xs.max(), ys.max())]
    result = CliRunner().invoke(app, ["segment", str(tmp_path / "image.png"), "--box", *box, "--out",
                                      str(tmp_path / "mask.png")])
    assert result.exit_code == 0, result.output
    assert "warning: " in result.stderr and "running on PyTorch" in result.stderr
    written = np.asarray(Image.open(tmp_path / "mask.png")) > 0
    assert 2 * (written & mask).sum() / (written.sum() + mask.sum()) > 0.9
    named = CliRunner().invoke(app, ["segment", str(tmp_path / "image.png"), "--box", *box, "--out",
                                     str(tmp_path / "again.png"), "--runtime", "onnx"])
    assert named.exit_code == 2 and _one_error_line(named).startswith(f"error: {tmp_path / 'cache'}")
    assert not (tmp_path / "again.png").exists()
