"""Tables and report of a benchmark run, on a small hand-written results directory."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sam4med.engine.errors import InputError
from sam4med.engine.overlays import shrink_for_overlay, write_overlay
from sam4med.evaluation.report import write_report
from sam4med.evaluation.summary import (
    clicks_curve,
    factor_analysis,
    failures,
    load_results,
    mean_table,
    summary_table,
    timing_table,
    write_tables,
)

BASE = {"model": "litemedsam", "mask_rule": "single", "seed": 0, "image_size": 256}
DATASETS = {"ds_a": ("CT", "liver"), "ds_b": ("MR", "prostate")}
PROTOCOL = {"model": "litemedsam", "seed": 0, "mask_rule": "single",
            "modes": {"box": {"prompt": "tight box"}, "point_center": {"prompt": "interior point"},
                      "interactive": {"prompt": "interactive from box", "rounds": 2}}}

# (dataset, image, object, area, complexity, contrast, encode_s, box dice, point dice, dice per round)
OBJECTS = [
    ("ds_a", "a1", 0, 100.0, 1.2, 0.30, 0.2, 0.70, 0.50, [0.6, 0.7, 0.8]),
    ("ds_a", "a1", 1, 400.0, 1.1, 0.20, 0.2, 0.80, 0.60, [0.5, 0.7, 0.9]),
    ("ds_a", "a2", 0, 900.0, 1.0, 0.10, 0.5, 0.90, 0.40, [0.8, 0.85, 0.9]),
    ("ds_b", "b1", 0, 250.0, 1.3, 0.25, 0.3, 0.60, 0.30, [0.7, 0.9]),
    ("ds_b", "b3", 0, 350.0, 1.4, 0.35, 0.3, 0.65, 0.35, [0.6, 0.8, 0.95]),
]


def _rows() -> list[dict]:
    rows = []
    for dataset, image, obj, area, complexity, contrast, encode_s, box, point, rounds in OBJECTS:
        modality, target = DATASETS[dataset]
        base = {"dataset": dataset, "modality": modality, "target": target, "image": image, **BASE}
        factors = {"object_area": area, "area_fraction": area / 65536, "boundary_complexity": complexity,
                   "contrast": contrast}
        common = {**base, "object": obj, **factors, "status": "ok", "encode_s": encode_s}
        rows.append({**common, "mode": "box", "dice": box, "iou": box / (2 - box), "hd95": 2.0, "hd": 3.0,
                     "asd": 1.0, "nsd": 0.9, "decode_s": 0.01, "predicted_iou": 0.9,
                     "prompt_coords": {"box": [1, 2, 3, 4]}, "mode_params": PROTOCOL["modes"]["box"]})
        rows.append({**common, "mode": "point_center", "dice": point, "iou": point / (2 - point),
                     "hd95": None, "hd": None, "asd": None, "nsd": 0.5, "decode_s": 0.02, "predicted_iou": 0.8,
                     "prompt_coords": {"points": [[1, 2]]}, "mode_params": PROTOCOL["modes"]["point_center"]})
        noc = lambda t: next((i + 1 for i, d in enumerate(rounds) if d >= t), len(rounds))  # noqa: E731
        rows.append({**common, "mode": "interactive", "dice": rounds[-1], "iou": 0.5, "hd95": 1.0, "hd": 1.0,
                     "asd": 0.5, "nsd": 0.95, "decode_s": 0.03, "dice_per_round": rounds,
                     "noc85": noc(0.85), "noc90": noc(0.90), "prompt_coords": {"box": [1, 2, 3, 4]},
                     "mode_params": PROTOCOL["modes"]["interactive"]})
    error = {"dataset": "ds_b", "modality": "MR", "target": "prostate", "image": "b2", **BASE,
             "status": "error", "error": "b2.png: mask has no object of at least 10 pixels",
             "encode_s": None, "mode_params": None}
    rows.insert(9, error)
    return rows


def _write(directory: Path, rows: list[dict], protocol: dict | None = PROTOCOL) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if protocol is not None:
        (directory / "protocol.json").write_text(json.dumps(protocol, indent=2), encoding="utf-8")
    return directory


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return _write(tmp_path / "run", _rows())


def test_load_results_keeps_all_rows_and_maps_null_to_nan(results: Path) -> None:
    df = load_results(results)
    assert len(df) == 16
    assert (df["status"] == "error").sum() == 1
    assert df["hd95"].dtype == float
    assert df.loc[df["mode"] == "point_center", "hd95"].isna().all()
    assert len(load_results(results / "results.jsonl")) == 16


def test_load_results_skips_a_line_cut_by_a_kill(results: Path) -> None:
    with (results / "results.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"dataset": "ds_b", "ima')
    assert len(load_results(results)) == 16


def test_a_report_warns_once_about_a_damaged_line(results: Path, capsys) -> None:
    lines = (results / "results.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    lines.insert(3, '{"dataset": "ds_b", "ima\n')
    (results / "results.jsonl").write_text("".join(lines), encoding="utf-8")
    write_report(results)
    assert capsys.readouterr().err.count("line 4 is damaged") == 1


def test_rows_whose_names_are_lists_or_objects_are_left_out_with_a_warning(results: Path, capsys) -> None:
    with (results / "results.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"dataset": ["x"], "mode": "box", "image": "a", "dice": 0.5, "status": "ok"}\n')
        handle.write('{"dataset": "ds_b", "mode": "box", "image": {"a": 1}, "dice": 0.5, "status": "ok"}\n')
    assert len(load_results(results)) == 16
    write_report(results)
    assert "2 row(s) whose dataset, image, object, mode, model, status are not names" in capsys.readouterr().err


@pytest.mark.parametrize(("record", "content", "task"), [
    ("protocol.json", '{"task": "samaug predict", "checkpoint_sha256": "ab"}', "samaug predict"),
    ("protocol.json", '{"task": "segment-folder"}', "segment-folder"),
    ("priors.json", '{"key": "ab"}', "samaug priors"),
])
def test_another_verbs_folder_is_refused_and_nothing_written_into_it(results: Path, record, content, task) -> None:
    (results / record).write_text(content, encoding="utf-8")
    before = sorted(path.name for path in results.iterdir())
    with pytest.raises(InputError, match=f"holds a `sam4med {task}` run, not an `eval benchmark` one"):
        write_report(results)
    assert sorted(path.name for path in results.iterdir()) == before


@pytest.mark.parametrize(("name", "problem"), [
    ("results.jsonl", r"unknown extension \(expected .html, .htm\)"),
    ("protocol.json", r"unknown extension \(expected .html, .htm\)"),
    ("data/images/a.png", r"unknown extension \(expected .html, .htm\)"),
    ("data/images/report.html", "inside the data set folder"), ("folder.html", "is a folder"),
])
def test_a_report_path_that_could_replace_an_input_is_refused_and_nothing_written(results: Path, name, problem) -> None:
    for folder in ("data/images", "data/masks", "folder.html"):
        (results / folder).mkdir(parents=True)
    (results / "data/images/a.png").write_bytes(b"image")
    before = {path: path.read_bytes() for path in results.rglob("*") if path.is_file()}
    with pytest.raises(InputError, match=problem):
        write_report(results, out=results / name)
    assert {path: path.read_bytes() for path in results.rglob("*") if path.is_file()} == before


def test_rows_of_two_models_are_refused_rather_than_averaged_together(results: Path) -> None:
    rows = [json.loads(line) for line in (results / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    rows[0]["model"] = "other-model"  # results files put together by hand
    (results / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(InputError, match=r"holds rows of 2 models \(.*other-model.*\); a report is of one model"):
        write_report(results)
    assert not (results / "report.html").exists()


def test_a_report_of_no_rows_is_refused_and_the_earlier_tables_are_kept(results: Path) -> None:
    write_report(results)
    tables = {path.name: path.read_bytes() for path in results.glob("*.csv")}
    assert tables
    (results / "results.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(InputError, match="results.jsonl: holds no rows yet"):
        write_report(results)
    assert {path.name: path.read_bytes() for path in results.glob("*.csv")} == tables


def test_a_damaged_protocol_is_said_and_left_out_of_the_report(results: Path, capsys) -> None:
    (results / "protocol.json").write_bytes(b"\xff{")
    write_report(results)
    assert "protocol.json: damaged; the report leaves the protocol out" in capsys.readouterr().err


@pytest.mark.parametrize("value, shown", [("abc", "'abc'"), (float("inf"), "inf")])
def test_a_metric_that_is_not_a_number_is_read_as_missing_with_a_warning(results: Path, capsys, value, shown) -> None:
    rows = [json.loads(line) for line in (results / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    edited = next(i for i, row in enumerate(rows) if row.get("dice") is not None)
    rows[edited]["dice"] = value  # json writes inf as the literal Infinity
    (results / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    frame = load_results(results)
    assert len(frame) == len(rows) and math.isnan(frame["dice"].iloc[edited])
    assert f"1 row(s) whose 'dice' is not a number (first {shown}) are read as missing" in capsys.readouterr().err


@pytest.mark.parametrize("column, value, span", [("dice", 1.7, "[0, 1]"), ("iou", -0.2, "[0, 1]"),
                                                  ("hd95", -3.0, ">= 0")])
def test_a_metric_outside_its_range_is_read_as_missing_with_a_warning(results: Path, capsys, column, value,
                                                                      span) -> None:
    rows = [json.loads(line) for line in (results / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    edited = next(i for i, row in enumerate(rows) if row.get(column) is not None)
    before = load_results(results)[column]
    rows[edited][column] = value
    (results / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    frame = load_results(results)
    assert math.isnan(frame[column].iloc[edited])
    assert frame[column].drop(index=edited).equals(before.drop(index=edited))  # the other rows as they were
    assert f"1 row(s) whose '{column}' lies outside {span} (first {value:g}) are read as missing" in \
        capsys.readouterr().err


def test_summary_means_match_hand_computed(results: Path) -> None:
    df = load_results(results)
    table = summary_table(df).set_index(["dataset", "mode"])
    box_a = table.loc[("ds_a", "box")]
    assert box_a["n"] == 3
    assert box_a["mean"] == pytest.approx(0.8)
    assert box_a["std"] == pytest.approx(0.1)
    assert box_a["median"] == pytest.approx(0.8)
    assert table.loc[("ds_b", "point_center"), "mean"] == pytest.approx(0.325)
    assert table.loc[("ds_a", "interactive"), "mean"] == pytest.approx((0.8 + 0.9 + 0.9) / 3)
    assert list(table.index.get_level_values("dataset").unique()) == ["ds_a", "ds_b"]

    wide = mean_table(df, "dice")
    assert list(wide.columns) == ["box", "point_center", "interactive"]
    assert list(wide.index) == ["ds_a", "ds_b"]
    assert wide.loc["ds_a", "point_center"] == pytest.approx(0.5)
    assert wide.loc["ds_b", "box"] == pytest.approx(0.625)

    hd95 = summary_table(df, "hd95").set_index(["dataset", "mode"])
    assert hd95.loc[("ds_a", "point_center"), "n"] == 0
    assert math.isnan(hd95.loc[("ds_a", "point_center"), "mean"])


def test_factor_analysis_spearman(results: Path) -> None:
    df = load_results(results)
    table = factor_analysis(df).set_index(["dataset", "mode", "factor"])
    # ds_a box: Dice rises with area, falls with complexity and contrast: perfectly monotone
    assert table.loc[("ds_a", "box", "object_area"), "rho"] == pytest.approx(1.0)
    assert table.loc[("ds_a", "box", "boundary_complexity"), "rho"] == pytest.approx(-1.0)
    assert table.loc[("ds_a", "box", "contrast"), "rho"] == pytest.approx(-1.0)
    assert table.loc[("ds_a", "box", "object_area"), "n"] == 3
    # point_center on ds_a: ranks (2, 3, 1) against (1, 2, 3): rho = 1 - 6*6/(3*8) = -0.5
    assert table.loc[("ds_a", "point_center", "object_area"), "rho"] == pytest.approx(-0.5)
    # two objects only: not defined
    assert math.isnan(table.loc[("ds_b", "box", "object_area"), "rho"])
    assert table.loc[("ds_b", "box", "object_area"), "n"] == 2


def test_factor_analysis_constant_input_gives_nan_without_warning(results: Path, recwarn) -> None:
    df = load_results(results)
    df.loc[df["mode"] == "box", "dice"] = 0.7
    table = factor_analysis(df).set_index(["dataset", "mode", "factor"])
    assert math.isnan(table.loc[("ds_a", "box", "object_area"), "rho"])
    assert not recwarn.list


def test_clicks_curve_is_the_per_round_mean(results: Path) -> None:
    curve = clicks_curve(load_results(results)).set_index("dataset")
    assert list(curve.columns) == ["n", "noc85", "noc90", "nof85", "nof90", "dice_r0", "dice_r1", "dice_r2"]
    a = curve.loc["ds_a"]
    assert a["n"] == 3
    assert a["dice_r0"] == pytest.approx((0.6 + 0.5 + 0.8) / 3)
    assert a["dice_r1"] == pytest.approx((0.7 + 0.7 + 0.85) / 3)
    assert a["dice_r2"] == pytest.approx((0.8 + 0.9 + 0.9) / 3)
    assert a["noc85"] == pytest.approx((3 + 3 + 2) / 3)
    assert a["noc90"] == pytest.approx(3.0)  # reached on the last click twice, never once: NoF tells them apart
    assert (a["nof85"], a["nof90"]) == (1, 1)
    b = curve.loc["ds_b"]  # rounds of different length: the last round has one object
    assert b["dice_r0"] == pytest.approx(0.65)
    assert b["dice_r1"] == pytest.approx(0.85)
    assert b["dice_r2"] == pytest.approx(0.95)
    assert b["noc85"] == pytest.approx((2 + 3) / 2)
    assert (b["nof85"], b["nof90"]) == (0, 0)


def test_timing_is_per_image_for_encoding(results: Path) -> None:
    timing = timing_table(load_results(results)).set_index("dataset")
    assert timing.loc["ds_a", "images"] == 2
    assert timing.loc["ds_a", "encode_s"] == pytest.approx((0.2 + 0.5) / 2)
    assert timing.loc["ds_a", "decode_s[box]"] == pytest.approx(0.01)
    assert timing.loc["ds_b", "decode_s[interactive]"] == pytest.approx(0.03)
    assert "everything_s" not in timing.columns


def test_failures_lists_the_error_row(results: Path) -> None:
    table = failures(load_results(results))
    assert table.to_dict("records") == [
        {"dataset": "ds_b", "image": "b2", "error": "b2.png: mask has no object of at least 10 pixels"}]


def test_write_tables_writes_the_csvs(results: Path) -> None:
    paths = write_tables(results)
    assert [p.name for p in paths] == ["summary.csv", "mean_dice.csv", "factors.csv", "clicks.csv",
                                       "timing.csv", "failures.csv"]
    assert all(p.exists() for p in paths)
    mean = pd.read_csv(results / "mean_dice.csv", index_col=0)
    assert mean.loc["ds_a", "box"] == pytest.approx(0.8)
    summary = pd.read_csv(results / "summary.csv")
    assert set(summary["metric"]) == {"dice", "iou", "hd95", "hd", "asd", "nsd"}
    assert len(pd.read_csv(results / "failures.csv")) == 1


def _overlay_inputs(size: tuple[int, int] = (64, 80)) -> tuple[np.ndarray, np.ndarray, list[tuple[str, list[np.ndarray], float]]]:
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    image = np.stack([(xx * 3) % 256, (yy * 3) % 256, np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    obj0 = (yy - h // 3) ** 2 + (xx - w // 3) ** 2 < (min(h, w) // 6) ** 2
    obj1 = (yy - 2 * h // 3) ** 2 + (xx - 2 * w // 3) ** 2 < (min(h, w) // 8) ** 2
    gt = obj0 | obj1
    shifted = np.roll(obj0, 3, axis=1)
    panels = [
        ("box", [shifted, obj1], 0.8),
        ("point_center", [np.zeros_like(obj0)], 0.5),
        ("interactive", [obj0], 0.95),
    ]
    return image, gt, panels


def test_write_overlay_writes_a_png(tmp_path: Path) -> None:
    image, gt, rows = _overlay_inputs()
    path = write_overlay(tmp_path / "deep" / "overlays" / "ds_a__a1.png", image, gt, rows)
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as png:
        assert png.format == "PNG"
        width, height = png.size
    assert width > 0 and height > 0
    assert width > height  # one row of four panels: image + three modes
    assert width <= 4 * 2.2 * 80 + 2


def test_write_overlay_large_grayscale_image_many_modes(tmp_path: Path) -> None:
    h, w = 1000, 900
    image = (np.arange(h * w).reshape(h, w) % 251).astype(np.uint8)
    gt = np.zeros((h, w), bool)
    gt[200:600, 300:700] = True
    panels = [(f"mode{i}", [gt], 0.1 * i) for i in range(9)]
    path = write_overlay(tmp_path / "big.png", image, gt, panels)
    with Image.open(path) as png:
        assert png.format == "PNG"
        width, height = png.size
    assert width <= 5 * 2.2 * 80 + 2 and height > 0  # wrapped onto two rows of five panels



@pytest.mark.parametrize("shape", [(1, 50), (50, 1), (10, 10000)])
def test_write_overlay_draws_strips_whose_panel_is_one_pixel_thin(tmp_path: Path, shape) -> None:
    """A contour needs 2 x 2 pixels: a 1 px image (or one the overlay shrinks to 1 px) still gets its overlay."""
    image = np.full(shape, 128, np.uint8)
    gt = np.zeros(shape, bool)
    gt[: shape[0] // 2 + 1, : shape[1] // 2 + 1] = True
    gt[-1, -1] = False
    with Image.open(write_overlay(tmp_path / "strip.png", image, gt, [("box", [gt], 0.9)])) as png:
        assert png.format == "PNG" and min(png.size) > 0

def test_write_overlay_leaves_no_drawn_figure_for_the_garbage_collector(tmp_path: Path) -> None:
    """A figure and its canvas hold each other, so a written figure lingers until a collection: its panels'
    arrays must already be gone by then (a benchmark draws a few overlays per data set mid-run)."""
    import gc

    from matplotlib.figure import Figure

    image, gt, rows = _overlay_inputs()
    gc.collect()
    gc.disable()
    try:
        write_overlay(tmp_path / "a.png", image, gt, rows)
        lingering = [o for o in gc.get_objects() if type(o) is Figure]  # isinstance would wake lazy modules
        assert lingering, "the figure should still be waiting for a collection here"
        assert all(not figure.axes and not figure.images for figure in lingering)
    finally:
        gc.enable()


def test_masks_shrunk_for_the_overlay_draw_the_same_png_at_a_ninth_of_the_memory(tmp_path: Path) -> None:
    """The benchmark keeps every mode's masks of a drawn image shrunk (1000 px: every 3rd pixel), not full size."""
    image = (np.arange(1000 * 900).reshape(1000, 900) % 251).astype(np.uint8)
    gt = np.zeros((1000, 900), bool)
    gt[200:600, 300:700] = True
    masks = [np.roll(gt, shift, axis=1) for shift in (0, 7, 50)]
    shrunk = [shrink_for_overlay(m) for m in masks]
    assert shrunk[0].shape == (334, 300) and sum(m.nbytes for m in shrunk) * 8 < sum(m.nbytes for m in masks)
    full = write_overlay(tmp_path / "full.png", image, gt, [("box", masks, 0.5)])
    small = write_overlay(tmp_path / "small.png", image, gt, [("box", shrunk, 0.5)])
    assert full.read_bytes() == small.read_bytes()


def test_a_shrunk_mask_lets_its_full_size_batch_go() -> None:
    """A mode's mask is a view into the decoder's (prompts, masks, H, W) batch: the shrunk copy kept for the
    overlay must not hold that batch alive (a strided view did: 60 MB per mode on a 1000 px image)."""
    import gc
    import weakref

    batch = np.zeros((20, 3, 1000, 1000), bool)
    batch[4, 1, 100:300, 200:400] = True
    alive, drawn = weakref.ref(batch), batch[4, 1, ::3, ::3].copy()
    shrunk = shrink_for_overlay(batch[4][1])
    del batch
    gc.collect()
    assert alive() is None
    assert np.array_equal(shrunk, drawn)


def test_write_report_embeds_tables_plots_and_overlays(results: Path, capsys) -> None:
    image, gt, rows = _overlay_inputs()
    write_overlay(results / "overlays" / "ds_a__a1.png", image, gt, rows)
    write_overlay(results / "overlays" / "ds_b__b1.png", image, gt, rows)
    report = write_report(results)
    assert report == results / "report.html"
    text = report.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    for value in ("0.800", "0.625", "0.325", "ds_a", "ds_b", "point_center", "interactive",
                  "b2.png: mask has no object of at least 10 pixels", "&quot;mask_rule&quot;: &quot;single&quot;",
                  "litemedsam"):
        assert value in text, value
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) >= 5  # box plots, clicks, factors, two overlays
    assert "ds_a__a1" in text and "ds_b__b1" in text
    for name in ("summary.csv", "mean_dice.csv", "factors.csv", "clicks.csv", "timing.csv", "failures.csv"):
        assert (results / name).exists()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    (results / "overlays" / "ds_c__c1.png").mkdir()  # a folder under an overlay's name is not an overlay
    assert "2 of 2 overlays" in write_report(results).read_text(encoding="utf-8")
    assert write_report(results / "results.jsonl") == report  # the results file names its folder too


def test_write_report_without_interactive_protocol_or_failures(tmp_path: Path, capsys) -> None:
    rows = [r for r in _rows() if r.get("mode") == "box"]
    directory = _write(tmp_path / "run", rows, protocol=None)
    out = write_report(directory, tmp_path / "elsewhere" / "r.html")
    text = out.read_text(encoding="utf-8")
    assert "no interactive rows" in text and "no failures" in text and "protocol.json missing" in text
    assert "0.800" in text
    assert capsys.readouterr().out == ""


def test_only_error_rows(tmp_path: Path, capsys, recwarn) -> None:
    rows = [r for r in _rows() if r["status"] == "error"]
    rows.append({**rows[0], "image": "b9", "error": "b9.png: cannot read"})
    directory = _write(tmp_path / "run", rows)
    df = load_results(directory)
    assert summary_table(df).empty and mean_table(df).empty and clicks_curve(df).empty
    assert factor_analysis(df).empty and timing_table(df).empty
    assert list(failures(df)["image"]) == ["b2", "b9"]
    report = write_report(directory)
    text = report.read_text(encoding="utf-8")
    assert "b9.png: cannot read" in text and "no successful rows" in text
    assert (directory / "failures.csv").exists() and (directory / "summary.csv").exists()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert not recwarn.list


def test_write_report_refuses_a_folder_without_results(tmp_path: Path) -> None:
    from sam4med.engine.errors import InputError

    with pytest.raises(InputError):
        write_report(tmp_path)
