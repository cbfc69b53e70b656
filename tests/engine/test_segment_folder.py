"""A folder of images segmented from a prompt table: the table's checks, label maps, failures recorded,
resume and re-runs of changed prompts, and the command line."""

from __future__ import annotations

import csv
import hashlib
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from sam4med.cli import app
from sam4med.engine.errors import InputError
from sam4med.engine.predictor import Predictor
from sam4med.engine.prompt_table import prompts_digest, read_prompt_table
from sam4med.engine.segment import DeferredPredictor, _label_map_paths, segment_folder

from conftest import make_ellipse_image

def never_loaded():
    raise AssertionError("the model was loaded before the arguments were checked")


HEADER = "image,label,x0,y0,x1,y1,points,labels\n"


def _table(tmp_path, body: str, header: str = HEADER):
    path = tmp_path / "prompts.csv"
    path.write_text(header + body, encoding="utf-8")
    return path


@pytest.mark.parametrize(("header", "body", "message"), [
    ("name,x0\n", "a.png,1\n", "needs a header with an 'image' column"),
    ("image,x0,y0,x1,y1,colour\n", "a.png,1,1,5,5,red\n", "unknown column"),
    (HEADER, "a.png,,1,2,3,,,\n", "line 2: a box needs all of x0, y0, x1, y1"),
    (HEADER, "a.png,,1,2,three,4,,\n", "line 2: x1 'three': not a number"),
    (HEADER, "a.png,,1,2,1_0,4,,\n", "line 2: x1 '1_0': not a number"),
    (HEADER, "a.png,,1,2,\u0661\u0662,40,,\n", "line 2: x1 '\u0661\u0662': not a number"),
    (HEADER, "a.png,,,,,,,1\n", "line 2: 'labels' given without 'points'"),
    (HEADER, "a.png,,,,,,1 2;3,1\n", "line 2: point '3': expected 'x y'"),
    (HEADER, "a.png,,,,,,1 2,1;0\n", "line 2: 1 points but 2 labels"),
    (HEADER, "a.png,,,,,,1 2,2\n", "line 2: point label '2'"),
    (HEADER, "a.png,,5,5,1,1,,\n", "line 2: box .* x0 <= x1"),
    (HEADER, "a.png,,1,1,5,5,,\nb.png,,nan,1,2,3,,\n", "line 3: box .* finite"),
    (HEADER, "a.png,,,,,,,,extra\n", "line 2: more cells than columns"),
    (HEADER, "a.png,lonely,,,,,,\n", "line 2: a prompt needs points, a box, or both"),
    (HEADER, "../secret.png,,1,1,5,5,,\n", "line 2: image '../secret.png': must be a path inside"),
    (HEADER, "/etc/x.png,,1,1,5,5,,\n", "must be a path inside"),
    (HEADER, "./.,,1,1,5,5,,\n", "image './.': must be a path inside"),
    (HEADER, "", "has no rows"),
    ("image,x0,y0,x1,y1,x0\n", "a.png,1,1,5,5,2\n", "the header names x0 more than once"),
    ("image,Image,x0,y0,x1,y1\n", "a.png,a.png,1,1,5,5\n", "the header names image more than once"),
    ("image,x0,y0,x1,y1,\n", "a.png,1,1,5,5,\n", "column 6 of the header has no name"),
    (HEADER, '"a.png,,1,1,5,5,,\n', "not CSV after line 1 .*a quote left open"),
    (HEADER, "a.png,,1,1,5,5,,\n" * 65536, "line 65537: image a.png has more than 65535 prompts"),
])
def test_bad_tables_name_the_file_and_line(tmp_path, header, body, message):
    with pytest.raises(InputError, match=message):
        read_prompt_table(_table(tmp_path, body, header))


def test_a_spreadsheets_header_is_read_whatever_its_case_spaces_and_byte_order_mark(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("\ufeffImage, Label ,X0,Y0,X1,Y1\r\na.png,polyp,1,2,30,40\r\n", encoding="utf-8")
    [row] = read_prompt_table(path)["a.png"]
    assert row.label == "polyp" and row.prompt.box.tolist() == [1, 2, 30, 40]


@pytest.mark.parametrize(("text", "encoding"), [
    ("image;label;x0;y0;x1;y1;points;labels\r\na.png;polyp;1;2;30;40;\"3 4;5 6\";\"1;0\"\r\n", "utf-8"),  # Excel, decimal comma
    ("image\tlabel\tx0\ty0\tx1\ty1\tpoints\tlabels\r\na.png\tpolyp\t1\t2\t30\t40\t3 4;5 6\t1;0\r\n", "utf-16"),
])
def test_a_spreadsheets_semicolon_or_tab_table_in_utf8_or_utf16_reads_as_the_comma_one(tmp_path, text, encoding):
    """Excel writes ';' where the comma is the decimal mark, and tabs in UTF-16 as "Unicode text": the same
    prompts as the comma-separated table (a cell holding the separator is quoted, as the points here)."""
    path = tmp_path / "prompts.csv"
    path.write_text(text, encoding=encoding, newline="")
    [row] = read_prompt_table(path)["a.png"]
    assert row.label == "polyp" and row.prompt.box.tolist() == [1, 2, 30, 40]
    assert row.prompt.points.tolist() == [[3, 4], [5, 6]] and row.prompt.labels.tolist() == [1, 0]
    latin = tmp_path / "latin.csv"
    latin.write_bytes("image,label,x0,y0,x1,y1\na.png,l\xe9sion,1,2,30,40\n".encode("latin-1"))
    with pytest.raises(InputError, match=f"^{re.escape(str(latin))}: not UTF-8 text .*save the table as CSV UTF-8"):
        read_prompt_table(latin)


def test_a_semicolon_tables_decimal_commas_are_read_as_its_spreadsheet_wrote_them(tmp_path):
    """A spreadsheet that separates cells with ';' writes 45,5 for 45.5; a click's x and y are then separated
    by a space, and a lone 'x,y' pair still reads as x and y. A comma-separated table has no decimal comma."""
    path = tmp_path / "prompts.csv"
    path.write_text('image;x0;y0;x1;y1;points;labels\na.png;1,5;-0,5;30,25;40;"60,5 50;3,4";"1;0"\n', encoding="utf-8")
    [row] = read_prompt_table(path)["a.png"]
    assert row.prompt.box.tolist() == [1.5, -0.5, 30.25, 40]
    assert row.prompt.points.tolist() == [[60.5, 50], [3, 4]]
    path.write_text('image,x0,y0,x1,y1\na.png,"1,5",2,30,40\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"line 2: x0 '1,5': not a number"):
        read_prompt_table(path)


def test_any_edit_of_an_images_prompts_changes_its_digest_even_below_the_recorded_rounding(tmp_path):
    """The digest decides which images a re-run segments again: an edit smaller than the record's 0.01 px
    rounding, a label, or a click's sign is still an edit."""
    def digest(body: str) -> str:
        return prompts_digest(read_prompt_table(_table(tmp_path, body))["a.png"])

    base = digest("a.png,cyst,1,1,5,5,3 3,1\n")
    assert digest("a.png,cyst,1,1,5,5,3 3,1\n") == base
    for edited in ("a.png,cyst,1,1,5,5.001,3 3,1\n", "a.png,cyst,1,1,5,5,3.004 3,1\n",
                   "a.png,lesion,1,1,5,5,3 3,1\n", "a.png,cyst,1,1,5,5,3 3,0\n", "a.png,cyst,1,1,5,5,,\n"):
        assert digest(edited) != base, edited


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a.png", "sub/b.tif"]),
                          st.one_of(st.none(), st.tuples(*[st.integers(0, 500)] * 4)),
                          st.lists(st.tuples(st.integers(0, 500), st.integers(0, 500), st.sampled_from([0, 1])),
                                   max_size=4)),
                min_size=1, max_size=8).filter(lambda rows: all(box or points for _, box, points in rows)))
def test_a_table_written_by_csv_reads_back_as_its_prompts(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("table") / "prompts.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "x0", "y0", "x1", "y1", "points", "labels"])
        for image, box, points in rows:
            corners = [] if box is None else [min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]),
                                              max(box[1], box[3])]
            writer.writerow([image, *(corners or [""] * 4), ";".join(f"{x} {y}" for x, y, _ in points),
                             ";".join(str(label) for *_, label in points)])
    table = read_prompt_table(path)
    for image in {image for image, _, _ in rows}:
        expected = [(box, points) for name, box, points in rows if name == image]
        assert len(table[image]) == len(expected)
        for entry, (box, points) in zip(table[image], expected):
            assert (entry.prompt.box is None) == (box is None)
            if points:
                np.testing.assert_array_equal(entry.prompt.points, [(x, y) for x, y, _ in points])
                assert entry.prompt.labels.tolist() == [label for *_, label in points]
            else:
                assert entry.prompt.points is None
        assert [entry.label for entry in table[image]] == [f"object {k}" for k in range(1, len(expected) + 1)]


@pytest.fixture()
def folder(tmp_path):
    """Two ellipse images (one in a sub-folder, as JPEG) and one that is not an image."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    first, first_truth = make_ellipse_image(200, 300, centre=(100, 150), radii=(40, 70))
    second, second_truth = make_ellipse_image(160, 200, centre=(70, 90), radii=(30, 45), seed=1)
    Image.fromarray(first).save(images / "a.png")
    Image.fromarray(second).save(images / "sub" / "b.jpg", quality=95)
    (images / "broken.png").write_bytes(b"not an image")
    return images, {"a.png": first_truth, "sub/b.jpg": second_truth}


def _rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_image_whose_every_prompt_fails_is_a_failed_image(tmp_path, folder, click_model):
    images, _ = folder
    table = _table(tmp_path, "a.png,ellipse,75,55,225,145,,\n"
                             "sub/b.jpg,outside,400,400,500,500,,\n"
                             "sub/b.jpg,far,,,,,900 900,\n")
    out = tmp_path / "out"
    summary = segment_folder(Predictor(click_model), str(images), str(table), str(out), show_progress=False)  # str too
    assert (summary.computed, summary.failed) == (1, 1)
    assert not (out / "masks" / "sub" / "b.png").exists()
    [row] = [r for r in _rows(out) if r["image"] == "sub/b.jpg"]
    assert row["status"] == "error" and "none of its 2 prompt(s) could be segmented" in row["error"]
    assert "reaches outside" in row["error"]
    assert segment_folder(Predictor(click_model), images, table, out, show_progress=False).skipped == 2


def test_label_maps_rows_failures_and_resume(tmp_path, folder, click_model, capsys):
    images, truths = folder
    table = _table(tmp_path, "a.png,ellipse,75,55,225,145,,\n"
                             "a.png,corner,,,,,5 5,\n"
                             "sub/b.jpg,clicked,,,,,90 70,\n"
                             "sub/b.jpg,outside,400,400,500,500,,\n"
                             "broken.png,x,1,1,5,5,,\n")
    out = tmp_path / "out"
    summary = segment_folder(Predictor(click_model), images, table, out, show_progress=False)
    assert (summary.computed, summary.failed) == (2, 1)
    first = np.array(Image.open(out / "masks" / "a.png"))
    assert first.dtype == np.uint8 and set(np.unique(first)) <= {0, 1, 2}
    assert _dice(first == 1, truths["a.png"]) > 0.9  # the box's object, except where the corner click's lies
    second = np.array(Image.open(out / "masks" / "sub" / "b.png"))
    assert _dice(second == 1, truths["sub/b.jpg"]) > 0.7  # one click in the middle of the ellipse
    rows = {(r["image"], r.get("object")): r for r in _rows(out)}
    assert rows[("a.png", 1)]["label"] == "ellipse" and rows[("a.png", 1)]["line"] == 2
    assert rows[("a.png", 1)]["area"] >= int((first == 1).sum())
    assert rows[("sub/b.jpg", 1)]["area"] == int((second == 1).sum())
    assert rows[("sub/b.jpg", 2)]["status"] == "error" and "reaches outside" in rows[("sub/b.jpg", 2)]["error"]
    assert "prompts.csv: line 5: prompt" in capsys.readouterr().err  # the user sees which prompt failed
    assert rows[("broken.png", None)]["status"] == "error" and "cannot read image" in rows[("broken.png", None)]["error"]
    assert not (second == 2).any()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "images/a.png", "images/broken.png", "images/sub/b.jpg", "out/masks/a.png", "out/masks/sub/b.png",
        "out/protocol.json", "out/results.jsonl", "prompts.csv"]

    again = segment_folder(Predictor(click_model), images, table, out, show_progress=False)
    assert (again.computed, again.skipped) == (0, 3)
    # one image's rows edited: that image alone is segmented again
    table.write_text(table.read_text(encoding="utf-8").replace("90 70,", "90 70;5 5,1;0"), encoding="utf-8")
    (out / "masks" / "a.png").write_bytes(b"cut")  # and a label map damaged after the run
    redone = segment_folder(Predictor(click_model), images, table, out, show_progress=False)
    assert (redone.computed, redone.skipped) == (2, 1)
    assert [r["labels"] for r in _rows(out) if r["image"] == "sub/b.jpg" and r.get("object") == 1] == [[1, 0]]
    assert np.array_equal(np.array(Image.open(out / "masks" / "a.png")), first)

    with pytest.raises(InputError, match="other settings .*mask_rule"):
        segment_folder(Predictor(click_model), images, table, out, mask_rule="single", show_progress=False)


def test_images_that_would_share_a_label_map_are_refused_before_the_model_loads(tmp_path, folder):
    images, _ = folder
    table = _table(tmp_path, "a.png,,1,1,5,5,,\na.PNG.png,,1,1,5,5,,\nA.jpg,,1,1,5,5,,\n")

    def never_loaded():
        raise AssertionError("the model was loaded")
    with pytest.raises(InputError, match="a.png and A.jpg would share the mask file"):
        segment_folder(never_loaded, images, table, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_label_maps_are_named_by_image_id_so_dicom_files_named_by_uid_keep_apart(tmp_path):
    import SimpleITK as sitk

    for name in ("1.2.840.5.1", "1.2.840.5.2"):  # DICOM files named by their UID, no extension
        written = tmp_path / f"{name}.dcm"
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.uint16)), str(written))
        written.rename(tmp_path / name)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "scan.v2.png")
    maps = _label_map_paths(["1.2.840.5.1", "1.2.840.5.2", "scan.v2.png", "sub/ct.nii.gz"], tmp_path, tmp_path)
    assert {image: path.as_posix() for image, path in maps.items()} == {
        "1.2.840.5.1": "masks/1.2.840.5.1.png", "1.2.840.5.2": "masks/1.2.840.5.2.png",
        "scan.v2.png": "masks/scan.v2.png", "sub/ct.nii.gz": "masks/sub/ct.png"}


def test_the_command_line_segments_a_folder_and_refuses_a_bad_table_in_one_line(tmp_path, folder):
    images, truths = folder
    good = _table(tmp_path, "a.png,ellipse,75,55,225,145,,\n")
    result = CliRunner().invoke(app, ["segment-folder", str(images), "--prompts", str(good), "--out",
                                      str(tmp_path / "out"), "--runtime", "torch"])
    assert result.exit_code == 0, result.output
    assert "1 images segmented, 0 already there, 0 failed" in result.output
    assert _dice(np.array(Image.open(tmp_path / "out" / "masks" / "a.png")) == 1, truths["a.png"]) > 0.9
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "a.png,,1,2,3,,,\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["segment-folder", str(images), "--prompts", str(bad), "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {bad}: line 2: a box needs all of x0, y0, x1, y1"
    assert not (tmp_path / "o2").exists()


def test_everything_mode_over_a_folder_writes_instances_best_score_first_and_resumes(tmp_path, click_model):
    from sam4med.engine.everything import EverythingSettings
    from sam4med.engine.segment import segment_everything

    images = tmp_path / "images"
    images.mkdir()
    truths = {}
    for index, (centre, radii) in enumerate([((100, 150), (40, 70)), ((60, 80), (25, 35))]):
        image, truths[f"e{index}.png"] = make_ellipse_image(200, 300, centre=centre, radii=radii, seed=index)
        Image.fromarray(image).save(images / f"e{index}.png")
    (images / "broken.png").write_bytes(b"not an image")
    (images / ".hidden.png").write_bytes(b"left out")
    (images / "notes.txt").write_text("left out", encoding="utf-8")
    out = tmp_path / "out"
    summary = segment_everything(Predictor(click_model), tmp_path, out, show_progress=False)
    assert (summary.computed, summary.failed) == (2, 1)
    rows = _rows(out)
    for name, truth in truths.items():
        labels = np.array(Image.open(out / "masks" / name))
        assert labels.dtype == np.uint16
        mine = [r for r in rows if r["image"] == name]
        assert [r["object"] for r in mine] == list(range(1, len(mine) + 1))
        scores = [r["predicted_iou"] * r["stability"] for r in mine]
        assert scores == sorted(scores, reverse=True)  # best first
        assert set(np.unique(labels)) <= set(range(len(mine) + 1))
        for r in mine:  # what shows of each mask is at least 80% of it, inside its box
            x0, y0, x1, y1 = r["box"]
            assert (labels == r["object"]).sum() == r["visible"] >= 0.8 * r["area"]
            assert not (labels == r["object"])[:, :x0].any() and not (labels == r["object"])[y1:].any()
        assert max(_dice(labels == r["object"], truth) for r in mine) > 0.9  # the ellipse is one object
    assert [r["status"] for r in rows if r["image"] == "broken.png"] == ["error"]
    protocol = json.loads((out / "protocol.json").read_text(encoding="utf-8"))
    assert protocol["everything"]["method"] == "points" and protocol["everything"]["points_per_side"] == 16
    assert protocol["min_visible"] == 0.8

    (out / "masks" / "e1.png").write_bytes(b"cut")
    again = segment_everything(Predictor(click_model), str(tmp_path), str(out), show_progress=False)  # str paths too
    assert (again.computed, again.skipped) == (1, 2)
    with pytest.raises(InputError, match="other settings .*everything"):
        segment_everything(Predictor(click_model), tmp_path, out, EverythingSettings(points_per_side=8),
                           show_progress=False)


def test_everything_over_a_folder_writes_an_empty_map_for_an_image_where_no_mask_is_kept(tmp_path, click_model):
    """A blank image (or thresholds no mask passes) is an image without objects, not a failed one."""
    from sam4med.engine.everything import EverythingSettings
    from sam4med.engine.segment import segment_everything

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((64, 80, 3), 128, np.uint8)).save(images / "blank.png")
    image, _ = make_ellipse_image(200, 300, centre=(100, 150), radii=(40, 70), seed=0)
    Image.fromarray(image).save(images / "ellipse.png")
    out = tmp_path / "out"
    summary = segment_everything(Predictor(click_model), tmp_path, out,
                                 EverythingSettings(points_per_side=4, pred_iou_thresh=1.0), show_progress=False)
    assert (summary.computed, summary.failed) == (2, 0)
    for name, shape in (("blank.png", (64, 80)), ("ellipse.png", (200, 300))):
        labels = np.array(Image.open(out / "masks" / name))
        assert labels.shape == shape and not labels.any()
    assert [(r["image"], r["object"], r["status"]) for r in _rows(out)] == [
        ("blank.png", None, "ok"), ("ellipse.png", None, "ok")]


def test_a_folder_run_where_every_image_failed_exits_with_status_1(tmp_path, click_model):
    """Each failure is an error row and the run goes on; when none is done at all, a script must notice."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n not the rest")
    arguments = ["segment-everything", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--points-per-side", "2"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 1 and "0 images segmented, 0 already there, 1 failed" in result.output, result.output
    result = CliRunner().invoke(app, arguments)  # run again: the error row is kept, and still nothing is done
    assert result.exit_code == 1 and "0 images segmented, 1 already there (1 of them failed before), 0 failed" in result.output, result.output
    image, _ = make_ellipse_image(64, 80, centre=(32, 40), radii=(15, 20), seed=0)
    Image.fromarray(image).save(images / "ellipse.png")
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0 and "1 images segmented, 1 already there (1 of them failed before)" in result.output


def _one_image_set(data):
    """A data set of one gray 32 px image and its empty mask."""
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(data / "images" / "a.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(data / "masks" / "a.png")
    return data


@pytest.mark.parametrize("where", ["the folder", "inside its images", "its masks", "beside them", "above it"])
def test_folder_verbs_refuse_an_output_folder_that_overlaps_their_images(tmp_path, where):
    """Results written into a data set (its masks/) would replace its ground truth; beside it they are fine."""
    from sam4med.engine.segment import segment_everything

    data = _one_image_set(tmp_path / "data")
    truth = (data / "masks" / "a.png").read_bytes()
    table = _table(tmp_path, "a.png,,1,1,9,9,,\n")
    out = {"the folder": data, "inside its images": data / "images" / "results", "its masks": data / "masks",
           "beside them": data / "results", "above it": tmp_path}[where]
    for run in (lambda: segment_folder(never_loaded, data / "images", table, out),
                lambda: segment_everything(never_loaded, data, out)):
        if where in ("beside them", "above it"):  # the checks pass: the model is what comes next
            with pytest.raises(AssertionError, match="the model was loaded"):
                run()
            continue
        with pytest.raises(InputError, match="--out .*(is the input|lies inside the input|would write over the input)"):
            run()
    assert (data / "masks" / "a.png").read_bytes() == truth and not (data / "images" / "results").exists()


def test_another_data_set_or_a_persons_own_files_are_never_written_over(tmp_path):
    """Out given as another data set (its masks/ would receive the label maps) or a folder that already holds a
    file a run would write: refused before the model loads, every file as it was."""
    from sam4med.engine.segment import segment_everything

    source, victim = _one_image_set(tmp_path / "source"), _one_image_set(tmp_path / "victim")
    truth = (victim / "masks" / "a.png").read_bytes()
    table = _table(tmp_path, "a.png,,1,1,9,9,,\n")
    mine = tmp_path / "mine"
    (mine / "masks").mkdir(parents=True)
    (mine / "masks" / "a.png").write_bytes(b"my own mask")
    for run in (lambda out: segment_folder(never_loaded, source / "images", table, out),
                lambda out: segment_everything(never_loaded, source, out)):
        with pytest.raises(InputError, match="--out .*victim: is a data set .*its masks/ would be written over"):
            run(victim)
        with pytest.raises(InputError, match="--out .*victim/masks/results: lies inside the data set folder"):
            run(victim / "masks" / "results")
        with pytest.raises(InputError, match="--out .*mine: already holds .*a.png, which no run recorded there wrote"):
            run(mine)
    assert (victim / "masks" / "a.png").read_bytes() == truth and sorted(p.name for p in victim.iterdir()) == [
        "images", "masks"]
    assert (mine / "masks" / "a.png").read_bytes() == b"my own mask" and sorted(p.name for p in mine.iterdir()) == [
        "masks"]


def test_everything_over_a_folder_refuses_bad_options_in_one_line_before_the_model_loads(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    for options, message in [(["--points-per-side", "0"], "--points-per-side 0"),
                             (["--points-per-side", "1000"], "--points-per-side 1000: must be <= 128"),
                             (["--pred-iou-thresh", "nan"], "--pred-iou-thresh nan"),
                             (["--stability-thresh", "2"], "--stability-thresh 2.0: must be <= 1"),
                             (["--everything-method", "grid"], "--everything-method 'grid'"),
                             (["--tile", "4"], "--tile 4"),
                             (["--min-visible", "1.5"], "--min-visible 1.5")]:
        result = CliRunner().invoke(app, ["segment-everything", str(tmp_path), "--out", str(tmp_path / "out"), *options])
        assert result.exit_code == 2 and result.output.startswith("error: ") and message in result.output, result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["segment-everything", str(empty), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "no images" in result.output
    assert not (tmp_path / "out").exists()


def test_folder_verbs_redo_a_replaced_image_and_refuse_another_folders_images_in_their_out(tmp_path, folder,
                                                                                          click_model):
    """Results belong to the files they were made from: an image replaced under its name is segmented again,
    and another folder whose images share names cannot resume (and overwrite) this folder's outputs."""
    from sam4med.engine.segment import segment_everything

    images, _ = folder
    table = _table(tmp_path, "a.png,ellipse,75,55,225,145,,\nsub/b.jpg,clicked,,,,,90 70,\n")
    other = tmp_path / "other" / "images"
    other.mkdir(parents=True)
    (other / "a.png").write_bytes((images / "a.png").read_bytes())
    for verb, run in (("segment", lambda source, out: segment_folder(Predictor(click_model), source, table, out,
                                                                     show_progress=False)),
                      ("everything", lambda source, out: segment_everything(Predictor(click_model), source, out,
                                                                            show_progress=False))):
        out = tmp_path / verb
        run(images, out)
        before = {path.name: path.read_bytes() for path in (out / "masks").rglob("*.png")}
        assert run(images, out).computed == 0
        flipped = np.array(Image.open(images / "a.png"))[::-1].copy()
        Image.fromarray(flipped).save(images / "a.png")  # the same name, another image
        assert run(images, out).computed == 1, verb
        assert (out / "masks" / "a.png").read_bytes() != before["a.png"]
        assert [r["image_sha256"] for r in _rows(out) if r["image"] == "a.png"][-1] == \
            hashlib.sha256((images / "a.png").read_bytes()).hexdigest()
        kept = {path: path.read_bytes() for path in (out / "masks").rglob("*.png")}
        with pytest.raises(InputError, match=r"other settings \(images differs\)"):
            run(other, out)
        assert {path: path.read_bytes() for path in (out / "masks").rglob("*.png")} == kept


def test_a_symbolic_link_loop_is_one_line_or_an_error_row_never_a_traceback(tmp_path, folder, click_model):
    images, _ = folder
    (images / "loop.png").symlink_to("loop.png")
    (tmp_path / "out.png").symlink_to("out.png")
    for arguments, line in (([str(images / "loop.png"), "--out", str(tmp_path / "m.png")], "loop.png: a symbolic link loop"),
                            ([str(images / "a.png"), "--out", str(tmp_path / "out.png")], "--out .*out.png: a symbolic link loop")):
        result = CliRunner().invoke(app, ["segment", *arguments, "--box", "75", "55", "225", "145"])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert re.search(line, result.output)
    table = _table(tmp_path, "a.png,ellipse,75,55,225,145,,\nloop.png,looped,1,1,5,5,,\n")
    summary = segment_folder(Predictor(click_model), images, table, tmp_path / "folder", show_progress=False)
    assert (summary.computed, summary.failed) == (1, 1)
    [row] = [r for r in _rows(tmp_path / "folder") if r["image"] == "loop.png"]
    assert row["status"] == "error" and row["error"].endswith("loop.png: a symbolic link loop")


def test_everything_over_a_folder_records_links_and_folders_named_as_images_as_error_rows(tmp_path, folder,
                                                                                         click_model):
    """A dangling link (a share not mounted), a link loop or a folder named x.png was left out without a word."""
    from sam4med.engine.everything import EverythingSettings
    from sam4med.engine.segment import segment_everything

    images, _ = folder
    (images / "b.png").symlink_to("/nonexistent/b.png")
    (images / "c.png").symlink_to("c.png")
    (images / "d.png").mkdir()
    summary = segment_everything(Predictor(click_model), images, tmp_path / "out", EverythingSettings(points_per_side=4),
                                 show_progress=False)
    assert (summary.computed, summary.failed) == (1, 4)  # and broken.png, which is not an image
    errors = {r["image"]: r["error"] for r in _rows(tmp_path / "out") if r["status"] == "error"}
    assert sorted(errors) == ["b.png", "broken.png", "c.png", "d.png"]
    assert errors["b.png"].endswith("b.png: a symbolic link to /nonexistent/b.png, where there is no file")
    assert errors["c.png"].endswith("c.png: a symbolic link loop")
    assert errors["d.png"].endswith("d.png: is a folder, not a file")


def test_files_of_a_folder_that_are_not_images_are_named_when_left_out(tmp_path, capsys):
    """segment-everything over a folder: a .gif or .webp is said to be left out, not skipped without a word."""
    from sam4med.engine.segment import _folder_images

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "b.gif")
    (tmp_path / "notes.txt").write_text("scanned 2026-12-01")
    (tmp_path / ".hidden").write_text("")
    assert _folder_images(tmp_path) == ["a.png"]
    assert capsys.readouterr().err == f"warning: {tmp_path}: 2 file(s) left out, not images by name or content (b.gif, notes.txt)\n"


def test_a_strip_or_a_blank_image_is_flagged_in_a_folder_run_too(tmp_path, click_model, capsys):
    """Both folder verbs say which image no mask can follow or mean anything on (as the one-image verb does), and
    go on."""
    from sam4med.engine.everything import EverythingSettings
    from sam4med.engine.segment import segment_everything

    images = tmp_path / "images"
    images.mkdir()
    strip = np.full((4000, 12), 40, np.uint8)
    strip[1000:2000] = 200
    Image.fromarray(strip).save(images / "strip.png")
    image, _ = make_ellipse_image(200, 300, centre=(100, 150), radii=(40, 70), seed=0)
    Image.fromarray(image).save(images / "ellipse.png")
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(images / "blank.png")
    table = _table(tmp_path, "strip.png,,0,500,11,2500,,\nellipse.png,,80,30,220,170,,\nblank.png,,8,8,40,40,,\n")
    summary = segment_folder(Predictor(click_model), images, table, tmp_path / "boxes", show_progress=False)
    err = capsys.readouterr().err
    assert summary.computed == 3 and "strip.png: its shorter side becomes 0.8 px at the model's 256 px input" in err
    assert "blank.png: every pixel is [90, 90, 90]; an image without contrast" in err and "ellipse.png" not in err
    summary = segment_everything(Predictor(click_model), tmp_path, tmp_path / "everything",
                                 EverythingSettings(points_per_side=4), show_progress=False)
    err = capsys.readouterr().err
    assert summary.computed == 3 and "strip.png: its shorter side becomes 0.8 px" in err and "ellipse.png" not in err
    assert "blank.png: every pixel is [90, 90, 90]" in err


def test_clicks_in_the_table_for_a_box_only_model_are_refused_naming_their_lines(tmp_path, folder, litemedsam,
                                                                                  monkeypatch):
    """LiteMedSAM's mask ignores a click (one-click Dice near 0): a folder of such masks, exit 0, would pass for
    its answer. The API refuses it as the command does, with nothing written."""
    images, _ = folder
    table = _table(tmp_path, "a.png,ellipse,75,55,225,145,,\n" + "".join(f"a.png,c{k},,,,,{150 + k} 100,\n"
                                                                       for k in range(5)))
    out = tmp_path / "out"
    with pytest.raises(InputError, match=re.escape(f"{table}: points on line 3, 4, 5 and 2 more: model litemedsam "
                                                   "takes boxes only (its mask would ignore the click)")):
        segment_folder(Predictor(litemedsam), images, table, out, show_progress=False)
    with pytest.raises(InputError, match=re.escape(f"{table}: points on line 3, 4, 5 and 2 more")):  # before it loads
        segment_folder(DeferredPredictor(never_loaded, "litemedsam", False), images, table, out, show_progress=False)
    assert not out.exists()
    monkeypatch.setattr("sam4med.engine.onnx_predictor.onnx_predictor", lambda *_, **__: never_loaded())  # the command too
    result = CliRunner().invoke(app, ["segment-folder", str(images), "--prompts", str(table), "--out", str(out),
                                      "--model", "litemedsam", "--runtime", "onnx"])
    assert result.exit_code == 2 and result.output.startswith(f"error: {table}: points on line 3, 4, 5 and 2 more")
    assert not out.exists()
    boxes = _table(tmp_path, "a.png,ellipse,75,55,225,145,,\n")  # boxes alone are what it takes
    assert segment_folder(Predictor(litemedsam), images, boxes, out, show_progress=False).computed == 1
