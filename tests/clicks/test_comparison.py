"""The click model's comparison table: runs are compared on the images that all of them finished."""

from __future__ import annotations

import json

import pytest

from sam4med.clicks.comparison import compare


def write_run(folder, model, images, box, click):
    folder.mkdir()
    rows = []
    for image in images:
        for mode, dice in (("box", box), ("point_center", click), ("points5", click), ("everything", click)):
            rows.append({"dataset": "polyps", "image": image, "object": 0, "mode": mode, "dice": dice,
                         "model": model, "status": "ok"})
        rows.append({"dataset": "polyps", "image": image, "object": 0, "mode": "interactive", "dice": 0.9,
                     "model": model, "status": "ok", "dice_per_round": [click, 0.8, 0.9], "noc85": 2, "noc90": 3})
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_runs_are_compared_on_the_images_all_of_them_finished(tmp_path):
    base = write_run(tmp_path / "base", "litemedsam", ["a", "b", "c"], 0.9, 0.0)
    click = write_run(tmp_path / "click", "litemedsam-click", ["a", "b"], 0.8, 0.7)  # still running: no "c"
    table = compare({"base": base, "click": click}).set_index("run")
    assert table.loc["base", "images"] == table.loc["click", "images"] == 2
    assert table.loc["click", "point_center"] == pytest.approx(0.7) and table.loc["base", "box"] == pytest.approx(0.9)
    assert table.loc["click", "everything_found"] == 1.0 and table.loc["base", "everything_found"] == 0.0
    assert table.loc["click", "noc90"] == 3 and table.loc["click", "dice_r1"] == pytest.approx(0.8)


def test_objects_are_counted_whichever_modes_a_run_scored(tmp_path):
    folder = tmp_path / "everything_only"
    folder.mkdir()
    rows = [{"dataset": "nuclei", "image": image, "object": index, "mode": "everything", "dice": 0.6,
             "model": "litemedsam-click", "status": "ok"} for image in ("a", "b") for index in range(3)]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = compare({"run": folder})
    assert table["objects"].tolist() == [6]
