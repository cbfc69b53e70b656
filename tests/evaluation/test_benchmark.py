"""The benchmark end to end on a tiny synthetic data set: rows, resume, failures, report, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_dataset
from PIL import Image
from typer.testing import CliRunner

from sam4med.cli import app
from sam4med.engine.errors import InputError
from sam4med.evaluation.benchmark import BenchmarkConfig, run_benchmark
from sam4med.evaluation.modes import DEFAULT_MODES, PromptSettings, make_mode
from sam4med.evaluation.summary import load_results


FAST_MODES = ("box", "box_jitter", "points2_neg2", "interactive")


def test_benchmark_rows_resume_and_failures(tmp_path):
    data = write_dataset(tmp_path / "ellipses")
    config = BenchmarkConfig(modes=FAST_MODES, prompts=PromptSettings(interactive_rounds=2))
    results = run_benchmark([data], tmp_path / "out", config, device="cpu", show_progress=False)
    rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 2 * len(FAST_MODES)
    failed = [r for r in rows if r["status"] == "error"]
    assert len(failed) == 1 and failed[0]["image"] == "case9" and "case9.png" in failed[0]["error"]
    box = [r for r in ok if r["mode"] == "box"]
    assert all(r["dice"] > 0.95 for r in box)
    assert all(r["model"] == "litemedsam-click" and r["mask_rule"] == "auto" and r["seed"] == 0 for r in ok)  # defaults
    jitter = next(r for r in ok if r["mode"] == "box_jitter")
    assert jitter["mode_params"] == {"prompt": "jittered box", "jitter": 5.0, "jitter_unit": "px", "jitter_kind": "corners"}
    interactive = next(r for r in ok if r["mode"] == "interactive")
    assert len(interactive["dice_per_round"]) == 3 and interactive["noc85"] == 1
    assert {"object_area", "boundary_complexity", "contrast", "hd95", "nsd", "encode_s"} <= set(box[0])
    protocol = json.loads((tmp_path / "out" / "protocol.json").read_text(encoding="utf-8"))
    assert protocol["model_protocol"]["weights_sha256"] and protocol["mask_rule"] == "auto"
    assert protocol["model_protocol"]["box_prompts"] == "base model's prompt encoder and decoder"
    assert list((tmp_path / "out" / "overlays").glob("*.png"))

    # re-running continues: finished images are skipped, nothing is duplicated
    before = results.read_text(encoding="utf-8")
    run_benchmark([data], tmp_path / "out", config, device="cpu", show_progress=False)
    assert results.read_text(encoding="utf-8") == before

    # a killed run (half of an image's rows written, the last line cut) is completed on re-run
    lines = before.splitlines()
    keep = [line for line in lines if json.loads(line)["image"] != "case1"]
    case1 = [line for line in lines if json.loads(line)["image"] == "case1"]
    results.write_text("\n".join(keep + case1[:2]) + "\n" + case1[2][:20], encoding="utf-8")
    run_benchmark([data], tmp_path / "out", config, device="cpu", show_progress=False)
    again = load_results(tmp_path / "out")
    assert len(again[again.status == "ok"]) == 2 * len(FAST_MODES)
    first = {(r["image"], r["mode"]): r["dice"] for r in ok}
    for row in again[again.status == "ok"].itertuples():
        assert row.dice == pytest.approx(first[(row.image, row.mode)], abs=1e-6)

    # a different protocol into the same folder is refused
    with pytest.raises(InputError, match="holds results made with other settings .*seed.* differ"):
        run_benchmark([data], tmp_path / "out", BenchmarkConfig(modes=FAST_MODES, seed=1), device="cpu",
                      show_progress=False)
    # another folder under the same data set name would be averaged with this one: refused, nothing written
    other = write_dataset(tmp_path / "other", count=3)
    with pytest.raises(InputError, match=r"other: data set 'ellipses' of .*out came from .*ellipses; give this one"):
        run_benchmark([other], tmp_path / "out", config, device="cpu", show_progress=False)
    assert results.read_text(encoding="utf-8").count('"image": "case2"') == 0
    assert json.loads((tmp_path / "out" / "datasets.json").read_text()) == {"ellipses": str(data.resolve())}


KILLED_BENCHMARK = """
import sys
from sam4med.evaluation.benchmark import BenchmarkConfig, run_benchmark
from sam4med.evaluation.modes import PromptSettings
config = BenchmarkConfig(modes=tuple(sys.argv[3].split(",")), prompts=PromptSettings(interactive_rounds=2))
run_benchmark([sys.argv[1]], sys.argv[2], config, device="cpu", show_progress=False)
"""


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_benchmark_killed_at_a_random_moment_and_rerun_equals_an_uninterrupted_one(tmp_path, seed):
    """SIGKILL at a seeded random time, then the same run again: exactly the rows of a run never stopped
    (timings aside), each once, and the overlays of every image."""
    import subprocess
    import sys
    import time

    data = write_dataset(tmp_path / "ellipses", count=5)
    config = BenchmarkConfig(modes=FAST_MODES, prompts=PromptSettings(interactive_rounds=2))
    run_benchmark([data], tmp_path / "whole", config, device="cpu", show_progress=False)
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-c", KILLED_BENCHMARK, str(data), str(killed), ",".join(FAST_MODES)])
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline and not (killed / "protocol.json").is_file():
        time.sleep(0.02)  # the model is loaded and the item loop begins
    time.sleep(np.random.default_rng(seed).uniform(0, 4.0))
    process.kill()
    process.wait()
    run_benchmark([data], killed, config, device="cpu", show_progress=False)

    def rows(folder):
        lines = (folder / "results.jsonl").read_text(encoding="utf-8").splitlines()
        return sorted(json.dumps({k: v for k, v in json.loads(line).items() if not k.endswith("_s")}, sort_keys=True)
                      for line in lines)

    assert rows(killed) == rows(tmp_path / "whole")
    assert sorted(p.name for p in (killed / "overlays").glob("*.png")) == \
        sorted(p.name for p in (tmp_path / "whole" / "overlays").glob("*.png"))


def test_default_modes_are_the_nine_of_the_study():
    assert len(DEFAULT_MODES) == 9
    for name in DEFAULT_MODES:
        make_mode(name, PromptSettings())
    with pytest.raises(InputError, match="unknown mode 'boxes'"):
        make_mode("boxes", PromptSettings())
    for alias in ("points03", "points3_neg0", "points3_neg02", "points\u0663"):  # points3 under another name
        with pytest.raises(InputError, match=f"unknown mode '{alias}'"):
            make_mode(alias, PromptSettings())
    assert make_mode("points3_neg2", PromptSettings()).params["prompt"] == "3 positive + 2 negative points"


def test_cli_benchmark_report_and_segment(tmp_path):
    data = write_dataset(tmp_path / "ellipses", broken=False)
    runner = CliRunner()
    out = tmp_path / "results"
    result = runner.invoke(app, ["eval", "benchmark", "--data", str(data), "--out", str(out), "--modes", "box,everything",
                                 "--max-images", "1", "--device", "cpu", "--points-per-side", "8",
                                 "--pred-iou-thresh", "0.5"])
    assert result.exit_code == 0, result.output
    assert "mean Dice" in result.output
    everything = json.loads((out / "protocol.json").read_text())["everything"]
    assert (everything["method"], everything["points_per_side"], everything["pred_iou_thresh"]) == ("points", 8, 0.5)
    result = runner.invoke(app, ["eval", "report", str(out)])
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "everything" in html and "data:image/png;base64," in html

    mask_path = tmp_path / "mask.png"
    result = runner.invoke(app, ["segment", str(data / "images" / "case0.png"), "--box", "45", "35", "115", "85",
                                 "--out", str(mask_path), "--overlay", str(tmp_path / "overlay.png"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    predicted = np.array(Image.open(mask_path)) > 0
    truth = np.array(Image.open(data / "masks" / "case0.png")) > 0
    assert 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()) > 0.95
    assert (tmp_path / "overlay.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["segment", "missing.png", "--box", "1", "1", "5", "5", "--out", "m.png"], "missing.png"),
        (["segment", "{image}", "--box", "1", "1", "500", "5", "--out", "m.png"], "outside the 160x128 image"),
        (["segment", "{image}", "--point", "3;4", "--out", "m.png"], "--point '3;4'"),
        (["segment", "{image}", "--point", "40,60", "--model", "litemedsam", "--out", "m.png"],
         "--point: model litemedsam takes boxes only"),  # an empty mask and exit 0 before
        (["segment", "{image}", "--box", "1", "1", "5", "5", "--model", "sam_vit_b", "--out", "m.png"], "--checkpoint"),
        (["eval", "report", "{tmp}"], "no results.jsonl"),
        (["eval", "benchmark", "--data", "{data}", "--out", "{tmp}/r", "--modes", "points999999999"], "at most 100"),
        (["eval", "benchmark", "--data", "{data}", "--out", "{tmp}/r", "--rounds", "100000000"], "--rounds 100000000"),
        (["eval", "benchmark", "--data", "{data}", "--out", "{tmp}/r", "--points-per-side", "0"], "--points-per-side 0"),
        (["eval", "benchmark", "--data", "{data}", "--out", "{tmp}/r", "--stability-thresh", "2"], "--stability-thresh 2"),
        (["eval", "benchmark", "--data", "{data}", "--out", "{data}"], "--out"),
        (["eval", "benchmark", "--data", "{data}", "--out", "{tmp}/r", "--modes", "box,box"], "--modes: box given more"),
        (["eval", "benchmark", "--data", "{data}", "--out", "{tmp}/r", "--modes", ","], "--modes: give at least one"),
        (["eval", "benchmark", "--data", "{data}", "--out", "{tmp}/r", "--cache-dir", "{data}/images/cache"],
         "images/cache: lies inside the input"),
        (["segment", "{image}", "--box", "1", "1", "5", "5", "--device", "tpu", "--out", "m.png"], "--device 'tpu'"),
        (["segment", "{image}", "--box", "1", "1", "5", "5", "--out", "{data}/dataset.json/m.png"],
         "dataset.json is a file, not a folder"),  # found before the model loads
        (["segment-everything", "{data}/images", "--out", "{data}/dataset.json/o"],
         "dataset.json/o: Not a directory (a file stands where a folder is needed)"),
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero(tmp_path, args, message):
    data = write_dataset(tmp_path / "ellipses", broken=False)
    image = data / "images" / "case0.png"
    args = [a.format(image=image, tmp=tmp_path, data=data) for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output


def test_real_polyps_with_a_box_and_a_click(shared_data, tmp_path):
    """Kvasir-SEG (seen in LiteMedSAM's training): a tight box segments polyps well with both bundled models;
    one click gives LiteMedSAM almost nothing and the default click model a usable mask."""
    frames = {}
    for model in ("litemedsam", "litemedsam-click"):
        config = BenchmarkConfig(model=model, modes=("box", "point_center"), max_images=3)
        results = run_benchmark([shared_data / "kvasir_seg"], tmp_path / model, config, device="cpu",
                                show_progress=False)
        frames[model] = frame = load_results(results).set_index(["image", "object", "mode"]).sort_index()
        assert (frame.status == "ok").all() and len(frame.xs("box", level="mode")) >= 3
    base, click = frames["litemedsam"], frames["litemedsam-click"]
    assert base.xs("box", level="mode").dice.mean() > 0.85
    np.testing.assert_array_equal(click.xs("box", level="mode").dice, base.xs("box", level="mode").dice)
    assert base.xs("point_center", level="mode").dice.mean() < 0.3
    assert click.xs("point_center", level="mode").dice.mean() > 0.5


def test_cli_segment_volume_along_an_axis(tmp_path):
    """A synthetic NRRD volume: a cylinder along x, segmented on sagittal slices (axis 2)."""
    import SimpleITK as sitk

    volume = np.full((40, 64, 12), 30.0, np.float32)
    zz, yy = np.mgrid[:40, :64]
    disc = (zz - 20) ** 2 / 12**2 + (yy - 32) ** 2 / 18**2 <= 1
    volume[disc, 2:10] = 220.0
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.8, 0.8, 2.5))
    path = tmp_path / "cylinder.nrrd"
    sitk.WriteImage(image, str(path))
    out = tmp_path / "new" / "labels.nii.gz"  # a folder that is not there yet is made, as segment does
    ys, xs = np.nonzero(disc)  # rows are z (40), columns are y (64) on a sagittal slice
    result = CliRunner().invoke(app, ["segment-volume", str(path), "--axis", "2", "--out", str(out), "--device", "cpu",
                                      "--box3d", str(xs.min()), str(ys.min()), "3", str(xs.max()), str(ys.max()), "8"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{out}: "), result.output  # one line, no blank one left by a hidden bar
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out))) > 0
    assert labels.shape == volume.shape
    truth = np.zeros_like(labels)
    truth[disc, 3:9] = True
    assert 2 * (labels & truth).sum() / (labels.sum() + truth.sum()) > 0.9
    assert sitk.ReadImage(str(out)).GetSpacing() == pytest.approx((0.8, 0.8, 2.5))


@pytest.mark.parametrize(("tile", "modes"), [(None, DEFAULT_MODES), (64, ("box", "point_center", "interactive"))])
def test_every_mode_runs_in_bf16_and_scores_as_fp32_does(tmp_path, click_model, tile, modes):
    """bfloat16 autocast reaches every mode's decoder path (everything mode's early rejection, the corrections'
    mask inputs, tiles) without an error row, and each prompted object's Dice stays within 0.01 of fp32's where
    both kept the same mask. Which of a lone click's 3 masks is kept can flip where the IoU head scores two of
    them alike (v9 on a 64 px tile of an ellipse: predicted IoU 0.301 in fp32, 0.311 in bf16 for another mask,
    Dice 0.96 -> 0.77); such a flip must be a near tie. Everything mode is only required to run: whether a grid
    mask passes its predicted-IoU and stability thresholds can flip with any change of arithmetic (on three such
    ellipses cut in 64 px tiles, one went from no match in fp32 to Dice 0.63 in bf16); benchmarks/precision.py
    measures both on real data."""
    from sam4med.engine.models import load_model

    data = write_dataset(tmp_path / "ellipses", broken=False, count=2)
    config = BenchmarkConfig(model="litemedsam-click", tile=tile, modes=modes)
    rows = {}
    for precision, model in (("fp32", click_model), ("bf16", load_model("litemedsam-click", device="cpu", precision="bf16"))):
        out = tmp_path / precision
        run_benchmark([data], out, config, model=model, overlays_per_dataset=0, show_progress=False,
                      precision=precision)
        frame = load_results(out)
        assert set(frame["status"]) == {"ok"}, frame.get("error")
        assert set(frame["mode"]) == set(modes)
        rows[precision] = frame[frame["mode"] != "everything"].set_index(["mode", "image", "object"]).sort_index()
    assert json.loads((tmp_path / "bf16" / "protocol.json").read_text())["model_protocol"]["precision"].startswith("bf16")
    fp32, bf16 = rows["fp32"], rows["bf16"]
    assert fp32.index.equals(bf16.index)
    same_mask = (fp32["mask_index"] == bf16["mask_index"]) | fp32["mask_index"].isna()
    assert same_mask.mean() >= 0.75, (fp32["mask_index"], bf16["mask_index"])
    assert (bf16["dice"] - fp32["dice"])[same_mask].abs().max() < 0.01, (fp32["dice"], bf16["dice"])
    assert ((bf16["predicted_iou"] - fp32["predicted_iou"])[~same_mask].abs() < 0.02).all()


def test_a_loaded_model_in_another_precision_is_refused_before_anything_is_written(tmp_path, click_model):
    """The protocol records the loaded model's precision, so a caller asking for bf16 with an fp32 model
    would get fp32 figures filed under the precision it asked for."""
    data = write_dataset(tmp_path / "ellipses", broken=False, count=1)
    with pytest.raises(InputError, match="loaded in fp32 given with precision 'bf16'"):
        run_benchmark([data], tmp_path / "out", BenchmarkConfig(model="litemedsam-click", modes=("box",)),
                      model=click_model, precision="bf16", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_split_selects_the_trainers_test_side_and_says_what_to_do_when_a_set_is_too_small(tmp_path):
    from sam4med.engine.datasets import load_dataset
    from sam4med.engine.splits import DEFAULT_FRACTIONS, training_split

    dataset = load_dataset(write_dataset(tmp_path / "ten", broken=False, count=10))
    config = BenchmarkConfig(split="test")
    assert config.samples(dataset) == training_split(dataset, DEFAULT_FRACTIONS, 0)["test"]
    assert len(config.samples(dataset)) == 2
    small = load_dataset(write_dataset(tmp_path / "two", broken=False, count=2))
    assert BenchmarkConfig().samples(small) == small.samples
    with pytest.raises(InputError, match="too few for a train/val/test split .*without --split every image"):
        config.samples(small)



def test_a_refused_benchmark_leaves_no_output_folder_behind(tmp_path, litemedsam):
    small = write_dataset(tmp_path / "two", broken=False, count=2)
    with pytest.raises(InputError, match="too few for a train/val/test split"):
        run_benchmark([small], tmp_path / "out", BenchmarkConfig(model="litemedsam", split="test", modes=("box",)),
                      model=litemedsam, show_progress=False)
    assert not (tmp_path / "out").exists()  # the corrected command may use the same --out


@pytest.mark.parametrize("area", [float("nan"), 0, "5"])
def test_a_minimum_object_area_that_is_not_a_count_is_refused(area):
    with pytest.raises(InputError, match="min_object_area"):
        BenchmarkConfig(min_object_area=area).check()


def test_touching_objects_of_a_colour_mask_are_scored_as_two(tmp_path, litemedsam):
    """Red beside green was one object, boxed round both, Dice 0.78, without a word."""
    data = write_dataset(tmp_path / "colour", broken=False, count=1)
    colours = np.zeros((128, 160, 3), np.uint8)
    colours[30:90, 30:80] = (255, 0, 0)
    colours[30:90, 80:130] = (0, 255, 0)
    Image.fromarray(colours).save(data / "masks" / "case0.png")
    results = run_benchmark([data], tmp_path / "out", BenchmarkConfig(model="litemedsam", modes=("box",)),
                            model=litemedsam, show_progress=False)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["object"], r["object_area"]) for r in rows] == [(0, 60 * 50), (1, 60 * 50)]


def test_an_image_without_an_object_is_said_and_not_counted_as_failed(tmp_path):
    """A case without a lesion (or only specks) was an error row: a set with healthy cases read as failing."""
    data = write_dataset(tmp_path / "ellipses", broken=False, count=2)
    specks = np.zeros((128, 160), np.uint8)
    specks[5, 5] = specks[60:62, 60:62] = 255  # 1 and 4 px: under the 10 px minimum
    Image.fromarray(specks).save(data / "masks" / "case1.png")
    out = tmp_path / "results"
    result = CliRunner().invoke(app, ["eval", "benchmark", "--data", str(data), "--out", str(out), "--modes", "box",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "1 image(s) held no object to score" in result.output and "image(s) failed" not in result.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["image"], r["status"]) for r in rows] == [("case0", "ok"), ("case1", "no_objects")]
    assert CliRunner().invoke(app, ["eval", "report", str(out)]).exit_code == 0
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "0 failed image(s); 1 image(s) without an object to score" in html
    Image.fromarray(np.zeros((128, 160), np.uint8)).save(data / "masks" / "case0.png")  # now no image has one
    result = CliRunner().invoke(app, ["eval", "benchmark", "--data", str(data), "--out", str(out), "--modes", "box",
                                      "--device", "cpu"])
    assert result.exit_code == 0 and "no object was scored" in result.output and "2 image(s) held no object" in \
        result.output
