"""SAMAug: priors, augmented input, training, prediction modes, evaluation and the comparison's statistics."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from skimage.draw import disk
from skimage.segmentation import find_boundaries
from typer.testing import CliRunner

from sam4med.cli import app
from sam4med.engine.checkpoints import file_sha256
from sam4med.engine.errors import InputError
from sam4med.engine.everything import ProposedMask
from sam4med.engine.prompts import Prompt
from sam4med.engine.metrics import paired_bootstrap
from sam4med.samaug.experiment import images_used, run_experiment, summarise, write_curves
from sam4med.samaug.inputs import augment, compose_input, input_channels
from sam4med.engine.tiling import tile_boxes
from sam4med.engine.registry import model_spec
from sam4med.samaug.priors import (PriorSettings, Priors, prior_settings, priors_from_masks, samaug_everything_settings,
                                   settings_key)
from sam4med.samaug.store import PriorStore, generate_priors
from sam4med.engine.datasets import load_dataset
from sam4med.engine.splits import training_split
from sam4med.samaug.prediction import combine, confidence, mean_entropy
from sam4med.samaug.training import TrainConfig, train
from sam4med.samaug.inference import authors_soft_dice, evaluate, load_segmenter, predict

from conftest import make_ellipse_image


def _proposal(mask: np.ndarray, iou: float, stability: float) -> ProposedMask:
    return ProposedMask.from_mask(mask, iou, stability, Prompt(box=np.array([0, 0, 1, 1], dtype=np.float32)))


def _disk(shape, centre, radius) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[disk(centre, radius, shape=shape)] = True
    return mask


def test_segmentation_prior_sums_weights_and_boundary_is_binary():
    a, b = _disk((40, 40), (15, 15), 8), _disk((40, 40), (22, 22), 8)
    priors = priors_from_masks([_proposal(a, 0.7, 0.9), _proposal(b, 0.6, 0.8)], (40, 40))
    assert priors.segmentation[a & b].min() == pytest.approx(1.7)
    assert priors.segmentation[a & ~b].max() == pytest.approx(0.9)
    assert priors.segmentation[~a & ~b].max() == 0
    expected_boundary = find_boundaries(a, mode="thick") | find_boundaries(b, mode="thick")
    np.testing.assert_array_equal(priors.boundary.astype(bool), expected_boundary)
    assert set(np.unique(priors.boundary)) == {0.0, 1.0}
    by_iou = priors_from_masks([_proposal(a, 0.7, 0.9), _proposal(b, 0.6, 0.8)], (40, 40), weight="iou")
    assert by_iou.segmentation[a & b].min() == pytest.approx(1.3)
    counted = priors_from_masks([_proposal(a, 0.7, 0.9), _proposal(b, 0.6, 0.8)], (40, 40), weight="one",
                                normalise=True)
    assert counted.segmentation.max() == 1.0 and counted.segmentation[a & ~b].max() == 0.5


@settings(max_examples=100, deadline=None)
@given(masks=st.lists(arrays(bool, (12, 15), elements=st.booleans()), min_size=1, max_size=4))
def test_priors_from_cropped_proposals_equal_the_full_size_sums_at_the_image_edges_too(masks):
    priors = priors_from_masks([_proposal(m, 0.5, 0.25) for m in masks], (12, 15), weight="stability")
    np.testing.assert_allclose(priors.segmentation, 0.25 * np.sum(masks, axis=0))
    expected = np.any([find_boundaries(m, mode="thick") for m in masks], axis=0)
    np.testing.assert_array_equal(priors.boundary.astype(bool), expected)


def test_augment_adds_priors_to_channels_1_and_2_or_appends_them():
    rgb = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    priors = Priors(np.full((10, 12), 0.5, np.float32), np.eye(10, 12, dtype=np.float32))
    added = augment(rgb, priors, "add")
    assert added.shape == (3, 10, 12)
    np.testing.assert_allclose(added[0], rgb[..., 0] / 255, atol=1e-6)
    np.testing.assert_allclose(added[1], rgb[..., 1] / 255 + 0.5, atol=1e-6)
    np.testing.assert_allclose(added[2], rgb[..., 2] / 255 + np.eye(10, 12), atol=1e-6)
    appended = augment(rgb, priors, "concat")
    assert appended.shape == (5, 10, 12) and input_channels(3, "concat") == 5
    np.testing.assert_allclose(appended[3:], priors.as_channels())
    gray = augment(rgb[..., 0], priors, "add")
    assert gray.shape == (3, 10, 12) and input_channels(1, "add") == 3
    np.testing.assert_allclose(gray[1], 0.5)
    raw = augment(rgb, None, "add")
    np.testing.assert_allclose(raw, np.moveaxis(rgb / 255, -1, 0), atol=1e-6)
    with pytest.raises(ValueError, match="priors of size"):
        compose_input(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 4, 4))


def test_tiles_cover_the_image_exactly_once():
    for size, tile, count in [((1000, 1000), 500, 4), ((1000, 600), 300, 8), ((256, 256), 256, 1),
                              ((257, 256), 256, 2), ((128, 256), 128, 2)]:
        tiles = tile_boxes(size, tile)
        assert len(tiles) == count
        assert all(x1 - x0 <= tile and y1 - y0 <= tile for x0, y0, x1, y1 in tiles)
        cover = np.zeros(size, int)
        for x0, y0, x1, y1 in tiles:
            cover[y0:y1, x0:x1] += 1
        assert (cover == 1).all()


def _write_dataset(root, count=2, size=96, seed=0, gray=False):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    for index in range(count):
        centre = (int(rng.integers(30, size - 30)), int(rng.integers(30, size - 30)))
        image, mask = make_ellipse_image(size, size, centre, (int(rng.integers(12, 22)), int(rng.integers(12, 22))),
                                         seed=index)
        Image.fromarray(image[..., 0] if gray else image).save(root / "images" / f"img{index:02d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"img{index:02d}.png")
    (root / "dataset.json").write_text(json.dumps({"name": root.name, "modality": "synthetic", "target": "ellipse"}))
    return root


def test_generate_priors_with_litemedsam_caches_resumes_and_refuses_other_settings(tmp_path, litemedsam):
    data = _write_dataset(tmp_path / "ellipses", count=2, size=128)
    out = tmp_path / "priors"
    [summary] = generate_priors([data], out, litemedsam, figures_per_dataset=1, show_progress=False)
    assert (summary.computed, summary.skipped, summary.failed) == (2, 0, 0)
    store = PriorStore(out / "ellipses")
    assert store.record["settings"]["everything"]["method"] == "boxes"
    assert store.record["model"]["weights_sha256"] == litemedsam.weights_sha256
    assert (out / "ellipses" / "figures" / "img00.png").is_file()
    priors_before = {}
    for sample_id in ("img00", "img01"):
        priors = priors_before[sample_id] = store.load(sample_id)
        mask = np.asarray(Image.open(data / "masks" / f"{sample_id}.png")) > 0
        assert priors.masks >= 1
        # SAM finds the ellipse (and the background around it): a kept mask covers the whole ellipse
        # with a stability weight, and the boundary prior traces the ellipse's outline
        assert (priors.segmentation[mask] > 0.5).mean() > 0.95
        assert priors.boundary[find_boundaries(mask, mode="thick")].mean() > 0.8
    [again] = generate_priors([data], out, litemedsam, show_progress=False)
    assert (again.computed, again.skipped) == (0, 2)
    whole = store.path("img01").read_bytes()
    store.path("img01").write_bytes(whole[: len(whole) // 2])  # a file cut after its row was written
    with pytest.raises(InputError, match="img01.npz: damaged priors file"):
        store.load("img01")
    [repaired] = generate_priors([data], out, litemedsam, show_progress=False)
    assert (repaired.computed, repaired.skipped) == (1, 1)
    np.testing.assert_array_equal(store.load("img01").segmentation, priors_before["img01"].segmentation)
    replaced = data / "images" / "img00.png"  # another picture under the same id: its priors are stale
    replaced.write_bytes((data / "images" / "img01.png").read_bytes())
    with pytest.raises(InputError, match="img00.npz: made from another version of .*img00.png"):
        store.load("img00", replaced)
    [redone] = generate_priors([data], out, litemedsam, show_progress=False)
    assert (redone.computed, redone.skipped) == (1, 1)
    np.testing.assert_array_equal(store.load("img00", replaced).segmentation, priors_before["img01"].segmentation)
    (data / "masks" / "img01.png").write_bytes((data / "masks" / "img00.png").read_bytes())  # priors read no mask
    [unchanged] = generate_priors([data], out, litemedsam, show_progress=False)
    assert (unchanged.computed, unchanged.skipped) == (0, 2)
    with pytest.raises(InputError, match="other settings"):
        generate_priors([data], out, litemedsam, settings=PriorSettings(weight="one"), show_progress=False)


def test_priors_are_refused_where_a_data_sets_folder_would_receive_them(tmp_path):
    """OUT/<name> is where a set's priors go: with OUT the folder above the data set, that is the data set."""
    data = _write_dataset(tmp_path / "ellipses", count=2, size=128)
    before = sorted(p.name for p in data.iterdir())
    with pytest.raises(InputError, match="its ellipses/ would write over the input .*ellipses/images"):
        generate_priors([data], tmp_path, "litemedsam", show_progress=False)  # refused before the model loads
    assert sorted(p.name for p in data.iterdir()) == before


def test_a_failing_image_is_recorded_and_the_run_goes_on(tmp_path, litemedsam):
    data = _write_dataset(tmp_path / "ellipses", count=2, size=64)
    (data / "images" / "img01.png").write_bytes(b"not a png")
    [summary] = generate_priors([data], tmp_path / "priors", litemedsam, figures_per_dataset=0, show_progress=False)
    assert (summary.computed, summary.failed) == (1, 1)
    rows = [json.loads(line) for line in (tmp_path / "priors" / "ellipses" / "results.jsonl").read_text().splitlines()]
    [failure] = [row for row in rows if row["status"] == "error"]
    assert failure["image"] == "img01" and "img01.png" in failure["error"]


def test_priors_only_for_the_images_an_experiment_uses(tmp_path, litemedsam):
    data = _write_dataset(tmp_path / "ellipses", count=10, size=64)
    used = images_used(data, TrainConfig(max_train_images=2))
    sides = training_split(load_dataset(data), TrainConfig().fractions, 0)
    assert len(used) == 2 + len(sides["val"]) + len(sides["test"]) < 10
    [summary] = generate_priors([data], tmp_path / "priors", litemedsam, figures_per_dataset=0, show_progress=False,
                                image_ids=used)
    assert summary.computed == len(used)
    store = PriorStore(tmp_path / "priors" / "ellipses")
    assert {f"img{i:02d}" for i in range(10) if store.path(f"img{i:02d}").is_file()} == used


def test_priors_take_samaugs_generator_unless_a_grid_or_threshold_is_given():
    """SAMAug's 32 x 32 grid and the model's point-grid thresholds by default (the record, and so the priors
    folder, of earlier runs unchanged); a grid or threshold given replaces that one setting alone."""
    spec = model_spec("litemedsam-click")
    samaug = prior_settings("litemedsam-click").everything
    assert samaug == samaug_everything_settings(spec) and samaug.points_per_side == 32
    assert (samaug.pred_iou_thresh, samaug.stability_thresh) == spec.point_grid_thresholds
    other = prior_settings("litemedsam-click", points_per_side=16, pred_iou_thresh=0.3).everything
    assert other == replace(samaug, points_per_side=16, pred_iou_thresh=0.3)


@pytest.mark.parametrize(("options", "message"), [({"figures_per_dataset": -1}, "--figures -1: must be an integer >= 0"),
                                                 ({"figures_per_dataset": 1.5}, "--figures 1.5: must be an integer"),
                                                 ({"max_images": 0}, "--max-images 0: must be >= 1"),
                                                 ({"max_images": 2.5}, "--max-images 2.5: must be >= 1")])
def test_bad_prior_counts_are_refused_before_anything_is_read_or_written(tmp_path, options, message):
    with pytest.raises(InputError, match=message):
        generate_priors([tmp_path / "no such set"], tmp_path / "priors", "no such model", show_progress=False,
                        **options)
    assert not (tmp_path / "priors").exists()


def _oracle_priors(data, out, model="oracle"):
    """Priors that are the ground truth itself, so a model that reads them can solve a task raw input cannot."""
    store = PriorStore(out / data.name)
    settings = PriorSettings()
    key = settings_key({"model": model}, settings)
    store.claim({"key": key, "settings": settings.record()})
    for path in sorted((data / "masks").glob("*.png")):
        mask = (np.asarray(Image.open(path)) > 0).astype(np.float32)
        store.save(path.stem, Priors(mask, find_boundaries(mask > 0, mode="thick").astype(np.float32), 1), key,
                   file_sha256(data / "images" / path.name))
    return out


def _noise_dataset(root, count=16, size=32):
    """Masks of random disks over images of pure noise: nothing in the image tells where the disk is."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    for index in range(count):
        radius = size // 6
        mask = _disk((size, size), tuple(rng.integers(radius, size - radius, 2)), radius)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "images" / f"n{index:02d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"n{index:02d}.png")
    (root / "dataset.json").write_text(json.dumps({"name": root.name}))
    return root


def test_priors_reach_the_network_only_a_model_trained_with_them_solves_the_task(tmp_path):
    data = _noise_dataset(tmp_path / "noise")
    priors = _oracle_priors(data, tmp_path / "priors")
    # dual training (raw and prior inputs, summed loss) learns the task more slowly than SAMAug's own arm:
    # 12 epochs left it at 0.79 on an AVX-512 machine, 20 reach 0.93
    base = TrainConfig(image_size=32, features=8, epochs=20, batch_size=4, learning_rate=1e-2, patches_per_image=8,
                       fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    scores, frames = {}, {}
    for kind in ("raw", "samaug", "dual"):
        run = tmp_path / kind
        result = train([data], priors if kind != "raw" else None, run, TrainConfig(**{**base.__dict__, "input_kind": kind}),
                       show_progress=False)
        assert len((run / "history.jsonl").read_text().splitlines()) == 20
        frame = evaluate(run / "best.pt", [data], priors if kind != "raw" else None, "test")
        scores[kind] = frame.groupby("mode")["dice"].mean()
        frames[kind] = frame
        assert result.best_epoch >= 1
    assert scores["raw"]["raw"] < 0.5
    assert scores["samaug"]["aug"] > 0.8
    assert scores["dual"]["aug"] > 0.8
    assert scores["dual"]["raw"] < 0.5  # without priors the dual model is as blind as the raw one
    # confident selection takes, image by image, one of the two maps whole
    per_image = frames["dual"].pivot(index="image", columns="mode", values="dice")
    assert ((per_image["confident"] == per_image["raw"]) | (per_image["confident"] == per_image["aug"])).all()
    assert set(scores["dual"].index) == {"raw", "aug", "mean", "confident", "entropy"}

    (data / "images" / "n99.png").write_bytes(b"cut")  # one bad image: recorded, the others written
    (data / "masks" / "n99.png").write_bytes((data / "masks" / "n00.png").read_bytes())
    summary = predict(tmp_path / "dual" / "best.pt", data, tmp_path / "pred", priors, "confident",
                      show_progress=False)
    assert (summary.computed, summary.failed) == (16, 1)
    rows = [json.loads(line) for line in (tmp_path / "pred" / "results.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows if r["status"] == "error"] == ["n99"]
    again = predict(tmp_path / "dual" / "best.pt", data, tmp_path / "pred", priors, "confident", show_progress=False)
    assert (again.computed, again.skipped) == (0, 17)
    with pytest.raises(InputError, match="other settings"):
        predict(tmp_path / "dual" / "best.pt", data, tmp_path / "pred", priors, "aug", show_progress=False)
    shutil.copytree(data, tmp_path / "other")  # another folder's images, named alike, would overwrite these masks
    with pytest.raises(InputError, match=r"other settings \(images differs\)"):
        predict(tmp_path / "dual" / "best.pt", tmp_path / "other", tmp_path / "pred", priors, "confident",
                show_progress=False)
    scored = evaluate(tmp_path / "dual" / "best.pt", [data], priors, None)
    assert scored.loc[scored["image"] == "n99", "status"].tolist() == ["error"]
    assert scored["dice"].notna().sum() == 16 * 5
    with pytest.raises(InputError, match="--out .*masks: is the input"):
        predict(tmp_path / "dual" / "best.pt", data, data / "masks", priors, "confident", show_progress=False)
    # another data set's masks, or a person's own file under the name of a prediction: never written over
    other_truth = {path.name: path.read_bytes() for path in (tmp_path / "other" / "masks").iterdir()}
    with pytest.raises(InputError, match="--out .*other/masks: lies inside the data set folder"):
        predict(tmp_path / "dual" / "best.pt", data, tmp_path / "other" / "masks", priors, "confident",
                show_progress=False)
    assert {path.name: path.read_bytes() for path in (tmp_path / "other" / "masks").iterdir()} == other_truth
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "n03.png").write_bytes(b"my notes")
    with pytest.raises(InputError, match=r"--out .*mine: already holds .*n03.png, which no run recorded there wrote"):
        predict(tmp_path / "dual" / "best.pt", data, tmp_path / "mine", priors, "confident", show_progress=False)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["n03.png"]
    assert (tmp_path / "mine" / "n03.png").read_bytes() == b"my notes"
    data.joinpath("images", "n99.png").unlink()
    data.joinpath("masks", "n99.png").unlink()
    predicted = np.asarray(Image.open(tmp_path / "pred" / "n00.png"))
    assert predicted.shape == (32, 32) and set(np.unique(predicted)) <= {0, 255}
    with pytest.raises(InputError, match="--priors: missing; the model was trained with --input dual"):
        evaluate(tmp_path / "dual" / "best.pt", [data], None, "test")


def test_training_resumes_and_refuses_another_configuration(tmp_path):
    data = _noise_dataset(tmp_path / "noise", count=8, size=32)
    config = TrainConfig(input_kind="raw", image_size=32, features=4, epochs=2, batch_size=4,
                         fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    first = train([data], None, tmp_path / "run", config, show_progress=False)
    assert first.epochs_run == 2
    again = train([data], tmp_path / "no priors here", tmp_path / "run", config, show_progress=False)  # raw: unread
    assert again.epochs_run == 2 and len((tmp_path / "run" / "history.jsonl").read_text().splitlines()) == 2
    with pytest.raises(InputError, match="holds results made with other settings .learning_rate differ."):
        train([data], None, tmp_path / "run", TrainConfig(**{**config.__dict__, "learning_rate": 0.1}),
              show_progress=False)
    assert load_segmenter(tmp_path / "run" / "best.pt").config.input_kind == "raw"
    saved = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    for name, edit in (("extra", {"config": {**saved["config"], "zzz": 1}}), ("nomodel", {"meta": {}}),
                       ("wider", {"config": {**saved["config"], "features": 8}})):  # another version's record
        torch.save({**saved, **edit}, tmp_path / f"{name}.pt")
        with pytest.raises(InputError, match=f"{name}.pt: its configuration or weights do not fit this version"):
            load_segmenter(tmp_path / f"{name}.pt")
    from sam4med.engine.models import load_model

    with pytest.raises(InputError, match="a 'samaug-segmenter' checkpoint, not a promptable model's"):
        load_model("litemedsam", tmp_path / "run" / "best.pt", device="cpu")  # eval benchmark --checkpoint


def test_a_run_resumes_only_on_the_priors_it_was_trained_on(tmp_path):
    """config.json names the priors folder, not what is in it: a folder remade with other settings or another model
    trained a resumed run's later epochs on other input without a word."""
    data = _noise_dataset(tmp_path / "noise", count=8, size=32)
    first, other = _oracle_priors(data, tmp_path / "priors"), _oracle_priors(data, tmp_path / "other", "oracle-2")
    config = TrainConfig(input_kind="samaug", image_size=32, features=4, epochs=1, batch_size=4,
                         fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    train([data], first, tmp_path / "run", config, show_progress=False)
    with pytest.raises(InputError, match=r"run: trained on priors made with other settings or another model \(noise\)"):
        train([data], other, tmp_path / "run", config, show_progress=False)
    assert train([data], first, tmp_path / "run", config, show_progress=False).epochs_run == 1  # its own: resumed


def test_a_missing_gpu_is_refused_first_and_a_gpu_run_is_scored_alike_on_the_cpu(tmp_path):
    data = _noise_dataset(tmp_path / "noise", count=8, size=32)
    config = TrainConfig(input_kind="raw", image_size=32, features=4, epochs=2, batch_size=4,
                         fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="--device cuda: this machine has no CUDA GPU"):
            train([data], None, tmp_path / "run", config, show_progress=False, device="cuda")
        assert not (tmp_path / "run").exists()
        with pytest.raises(InputError, match="--device cuda: this machine has no CUDA GPU"):
            evaluate(tmp_path / "missing.pt", [data], None, "test", device="cuda")
        pytest.skip("no CUDA GPU here: training on one and scoring on the CPU is checked where there is one")
    trained = train([data], None, tmp_path / "run", config, show_progress=False, device="cuda")
    assert train([data], None, tmp_path / "run", config, show_progress=False, device="cpu").epochs_run == 2
    on_gpu = evaluate(tmp_path / "run" / "best.pt", [data], None, "test", device="cuda")
    on_cpu = evaluate(tmp_path / "run" / "best.pt", [data], None, "test", device="cpu")
    np.testing.assert_allclose(on_gpu["dice"], on_cpu["dice"], atol=1e-3)
    assert trained.best_epoch >= 1


def test_an_experiment_stops_each_arm_on_its_plateau_records_it_and_draws_the_curves(tmp_path):
    data = _noise_dataset(tmp_path / "noise", count=12, size=32)
    priors = _oracle_priors(data, tmp_path / "priors")
    config = TrainConfig(image_size=32, features=4, epochs=8, patience=2, batch_size=4, learning_rate=1e-2,
                         fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    results = run_experiment(data, priors, tmp_path / "out", config, seeds=(0,), show_progress=False)
    assert set(results["arm"]) == {"raw/raw", "dual/raw", "dual/aug", "dual/mean", "dual/confident", "dual/entropy"}
    for training in ("raw", "dual"):
        run = tmp_path / "out" / f"{training}_seed0"
        recorded = json.loads((run / "result.json").read_text())
        history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        assert recorded["epochs_run"] == len(history) <= 8
        best = max(range(len(history)), key=lambda i: history[i]["val_dice"]) + 1
        assert recorded["best_epoch"] == best
        assert recorded["stopped_early"] == (len(history) < 8)
        if recorded["stopped_early"]:
            assert len(history) - best == 2  # exactly the patience after the best epoch
    with Image.open(write_curves(tmp_path / "out")) as curves:
        assert curves.size[0] > 500 and curves.size[1] > 200

def test_split_keeps_a_named_split_and_draws_validation_from_training(tmp_path):
    from sam4med.engine.datasets import load_dataset

    data = _noise_dataset(tmp_path / "named", count=10, size=16)
    groups = {f"n{i:02d}": ("train" if i < 8 else "val") for i in range(10)}
    (data / "dataset.json").write_text(json.dumps({"name": "named", "groups": groups}))
    sides = training_split(load_dataset(data), {"train": 0.7, "val": 0.1, "test": 0.2}, 0)
    assert [s.id for s in sides["test"]] == ["n08", "n09"]  # the given validation side is the test side
    assert len(sides["val"]) == 1 and len(sides["train"]) == 7
    assert not {s.id for s in sides["val"]} & {s.id for s in sides["train"]}


def test_prediction_modes():
    sure = torch.tensor([[0.02, 0.98], [0.99, 0.01]])
    unsure = torch.tensor([[0.4, 0.6], [0.55, 0.45]])
    assert confidence(sure) > confidence(unsure)
    assert mean_entropy(sure) < mean_entropy(unsure)
    assert combine(unsure, sure, "confident") is sure and combine(sure, unsure, "confident") is sure
    assert combine(unsure, sure, "entropy") is sure
    torch.testing.assert_close(combine(sure, unsure, "mean"), (sure + unsure) / 2)
    with pytest.raises(InputError, match="--mode"):
        combine(sure, unsure, "best")


def test_authors_soft_dice_normalises_the_map_first():
    gt = np.zeros((4, 4), bool)
    gt[:2] = True
    prob = np.where(gt, 0.6, 0.4)  # after min-max normalisation: exactly the mask
    assert authors_soft_dice(prob, gt) == pytest.approx(1.0)


def test_paired_bootstrap_and_summary():
    mean, low, high = paired_bootstrap(np.array([0.1, 0.12, 0.09, 0.11, 0.1]))
    assert mean == pytest.approx(0.104) and 0.09 <= low < mean < high <= 0.12
    rows = []
    for seed in (0, 1):
        for image in ("a", "b", "c"):
            rows.append({"arm": "raw/raw", "seed": seed, "image": image, "dice": 0.5})
            rows.append({"arm": "dual/confident", "seed": seed, "image": image, "dice": 0.6 + 0.01 * seed})
    table = summarise(__import__("pandas").DataFrame(rows)).set_index("arm")
    assert table.loc["dual/confident", "diff"] == pytest.approx(0.105)
    assert table.loc["dual/confident", "std"] == pytest.approx(np.std([0.6, 0.61], ddof=1))
    assert np.isnan(table.loc["raw/raw", "diff"])


def test_cli_train_rejects_bad_arguments_in_one_line(tmp_path):
    data = _noise_dataset(tmp_path / "noise", count=4, size=16)
    runner = CliRunner()
    result = runner.invoke(app, ["samaug", "train", "--data", str(data), "--out", str(tmp_path / "r"), "--net", "resnet"])
    assert result.exit_code == 2 and "--net 'resnet'" in result.output
    result = runner.invoke(app, ["samaug", "train", "--data", str(data), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "needs --priors" in result.output
    result = runner.invoke(app, ["samaug", "evaluate", str(tmp_path / "missing.pt"), "--data", str(data), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "missing.pt: checkpoint file not found" in result.output
    for size, message in ((["--image-size", "33"], "--image-size 33: must be a multiple of 16"),
                          (["--image-size", "32", "--net", "swin_unet"], "swin_unet needs a multiple of 32 of at least 64"),
                          (["--image-size", "100000"], "--image-size 100000: must be <= 2048"),
                          (["--image-size", "64", "--scale-to", "32"],
                           "--scale-to 32: must be 0 (whole images at the patch size) or at least --image-size 64")):
        result = runner.invoke(app, ["samaug", "train", "--data", str(data), "--out", str(tmp_path / "r"),
                                     "--input", "raw", *size])
        assert result.exit_code == 2 and message in result.output and len(result.output.splitlines()) == 1, result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("options", "warning"), [
    (["--input", "raw", "--policy", "concat"], "warning: --policy concat: has no effect with --input raw"),
    (["--input", "samaug", "--dual-update", "alternate"], "warning: --dual-update alternate: has no effect with --input samaug"),
])
def test_a_setting_the_chosen_input_does_not_use_is_warned_about(options, warning, capsys):
    TrainConfig(**{"input_kind": options[1], options[2][2:].replace("-", "_"): options[3]}).check()
    assert capsys.readouterr().err.strip() == warning
    TrainConfig(input_kind="dual", policy="concat", dual_update="alternate").check()  # both used
    assert capsys.readouterr().err == ""


def test_tiled_priors_put_each_tiles_masks_back_in_place(litemedsam):
    from sam4med.engine.predictor import Predictor
    from sam4med.samaug.priors import compute_priors

    left, left_mask = make_ellipse_image(128, 128, (64, 60), (30, 22), seed=1)
    right, right_mask = make_ellipse_image(128, 128, (50, 70), (22, 34), seed=2)
    image = np.concatenate([left, right], axis=1)
    mask = np.concatenate([left_mask, right_mask], axis=1)
    priors = compute_priors(Predictor(litemedsam), image, PriorSettings(tile=128))
    assert priors.segmentation.shape == (128, 256)
    for half in (slice(0, 128), slice(128, 256)):  # each tile's ellipse is covered where it lies
        assert (priors.segmentation[:, half][mask[:, half]] > 0.5).mean() > 0.95
        assert priors.boundary[:, half][find_boundaries(mask[:, half], mode="thick")].mean() > 0.8


KILLED_PRIORS = """
import sys
from sam4med.samaug.store import generate_priors
generate_priors([sys.argv[1]], sys.argv[2], "litemedsam", device="cpu", figures_per_dataset=1, show_progress=False)
"""


@pytest.mark.parametrize("seed", [0, 1])
def test_a_priors_run_killed_at_a_random_moment_and_rerun_equals_an_uninterrupted_one(tmp_path, litemedsam, seed):
    """SIGKILL at a random time during the run (seeded), then the same command again: the same priors and rows."""
    import subprocess
    import sys
    import time

    data = _write_dataset(tmp_path / "ellipses", count=4, size=64)
    whole = tmp_path / "whole"
    generate_priors([data], whole, litemedsam, figures_per_dataset=1, show_progress=False)
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-c", KILLED_PRIORS, str(data), str(killed)])
    results = killed / "ellipses" / "results.jsonl"
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline and not results.is_file():
        time.sleep(0.02)  # the model has loaded and the loop has begun
    time.sleep(np.random.default_rng(seed).uniform(0, 2.0))
    process.kill()
    process.wait()
    generate_priors([data], killed, litemedsam, figures_per_dataset=1, show_progress=False)

    def rows(folder):
        return sorted((r["image"], r["status"], r.get("masks")) for r in
                      (json.loads(line) for line in (folder / "ellipses" / "results.jsonl").read_text().splitlines()))

    assert rows(killed) == rows(whole)
    for image_id in ("img00", "img01", "img02", "img03"):
        expected, got = PriorStore(whole / "ellipses").load(image_id), PriorStore(killed / "ellipses").load(image_id)
        np.testing.assert_allclose(got.segmentation, expected.segmentation, atol=1e-5)
        np.testing.assert_array_equal(got.boundary, expected.boundary)
    assert (killed / "ellipses" / "figures" / "img00.png").is_file()


KILLED_TRAINING = """
import json, sys
from sam4med.samaug.training import TrainConfig, train
train([sys.argv[1]], None, sys.argv[2], TrainConfig(**json.loads(sys.argv[3])), show_progress=False)
"""


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_training_run_killed_at_a_random_moment_and_rerun_equals_an_uninterrupted_one(tmp_path, seed):
    """SIGKILL at a seeded random time (mid-epoch, mid-checkpoint or between), then the same call again:
    the same history and bit-identical best and last weights as a run never stopped."""
    import subprocess
    import sys
    import time

    data = _noise_dataset(tmp_path / "noise", count=8, size=32)
    config = TrainConfig(input_kind="raw", image_size=32, features=4, epochs=8, batch_size=2, patches_per_image=4,
                         fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    train([data], None, tmp_path / "whole", config, show_progress=False)
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-c", KILLED_TRAINING, str(data), str(killed),
                                json.dumps(config.__dict__)])
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline and not (killed / "config.json").is_file():
        time.sleep(0.02)  # imports done, the loop is about to begin
    time.sleep(np.random.default_rng(seed).uniform(0, 3.0))
    process.kill()
    process.wait()
    train([data], None, killed, config, show_progress=False)

    def history(folder):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (folder / "history.jsonl").read_text().splitlines()]

    assert history(killed) == history(tmp_path / "whole")
    for name in ("best.pt", "last.pt"):
        expected = torch.load(tmp_path / "whole" / name, weights_only=True)["weights"]
        got = torch.load(killed / name, weights_only=True)["weights"]
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_priors_on_a_disk_that_fills_end_in_one_line_and_keep_every_recorded_prior_readable(tmp_path, small_disk):
    data = _write_dataset(tmp_path / "ellipses", count=16, size=256)
    result = CliRunner().invoke(app, ["samaug", "priors", "--data", str(data), "--out", str(small_disk),
                                      "--model", "litemedsam", "--figures", "0", "--device", "cpu"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error")]  # beside the progress bar
    assert len(lines) == 1 and lines[0].startswith(f"error: {small_disk}/ellipses/") \
        and lines[0].endswith("No space left on device"), result.output
    store = PriorStore(small_disk / "ellipses")
    done = [json.loads(line)["image"] for line in (store.folder / "results.jsonl").read_text().splitlines()
            if line.endswith("}")]
    assert 0 < len(done) < 16
    for image_id in done:  # every image the run recorded has its priors whole
        assert store.load(image_id).segmentation.shape == (256, 256)
    assert not [p.name for p in store.folder.rglob(".tmp*")]


@pytest.mark.parametrize("content", [b"{", b"[]", b'{"key": 3}', b"\xff\xfe"])
def test_a_damaged_priors_record_is_one_input_error(tmp_path, content):
    (tmp_path / "priors.json").write_bytes(content)
    with pytest.raises(InputError, match="priors.json: damaged"):
        PriorStore(tmp_path).record


def test_a_test_image_gone_from_the_data_set_is_an_error_row_and_all_empty_masks_are_refused(tmp_path):
    data = _noise_dataset(tmp_path / "noise", count=8, size=32)
    config = TrainConfig(input_kind="raw", image_size=32, features=4, epochs=1, batch_size=4,
                         fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    train([data], None, tmp_path / "run", config, show_progress=False)
    [gone, kept] = json.loads((tmp_path / "run" / "split.json").read_text())["noise"]["test"]
    for folder in ("images", "masks"):
        (data / folder / f"{gone}.png").unlink()
    scored = evaluate(tmp_path / "run" / "best.pt", [data], None, "test")
    assert scored.loc[scored["image"] == gone, "status"].tolist() == ["error"]
    assert "no longer in the data set" in scored.loc[scored["image"] == gone, "error"].iloc[0]
    assert scored.loc[scored["image"] == kept, "dice"].notna().all()
    for folder in ("images", "masks"):  # the whole test side gone: the rows are written, and it says so
        (data / folder / f"{kept}.png").rename(tmp_path / f"{kept}.{folder}.png")
    with pytest.raises(InputError, match=r"best.pt: no image of test could be scored \(2 failed; each is a row of"):
        evaluate(tmp_path / "run" / "best.pt", [data], None, "test", out=tmp_path / "scores")
    assert (tmp_path / "scores" / "metrics.csv").read_text().count("no longer in the data set") == 2
    for folder in ("images", "masks"):
        (tmp_path / f"{kept}.{folder}.png").rename(data / folder / f"{kept}.png")

    for mask in (data / "masks").glob("*.png"):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(mask)
    with pytest.raises(InputError, match="every training mask is empty"):
        train([data], None, tmp_path / "empty", config, show_progress=False)
    assert not (tmp_path / "empty").exists()


def test_every_unusable_training_file_is_named_in_one_error_and_no_run_is_started(tmp_path):
    data = _noise_dataset(tmp_path / "noise", count=8, size=32)
    config = TrainConfig(input_kind="raw", image_size=32, features=4, epochs=1, batch_size=4,
                         fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    train([data], None, tmp_path / "run", config, show_progress=False)
    split = json.loads((tmp_path / "run" / "split.json").read_text())["noise"]
    (data / "images" / f"{split['train'][0]}.png").write_text("not an image")
    (data / "masks" / f"{split['val'][0]}.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    with pytest.raises(InputError) as refused:
        train([data], None, tmp_path / "again", config, show_progress=False)
    message = str(refused.value)
    assert f"images/{split['train'][0]}.png" in message and f"masks/{split['val'][0]}.png" in message, message
    assert "\n" not in message and not (tmp_path / "again").exists()
