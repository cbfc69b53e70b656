"""Click training: it learns clicks on a small synthetic set, resumes exactly, and exports weights that
load as a model; the shipped weights are hash-checked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_ellipse_image, small_blobs
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from sam4med.clicks.embeddings import EmbeddedImage, embedded_images, load_embedding
from sam4med.clicks.loading import export_prompt_weights
from sam4med.clicks.training import (ClickTrainConfig, ImageSampler, background_points, best_object_iou,
                                     click_agreement_loss, first_prompts, iou_rank_loss, rollout_loss,
                                     train_clicks)
from sam4med.engine.checkpoints import file_sha256
from sam4med.engine.errors import InputError
from sam4med.engine.everything import EverythingSettings
from sam4med.engine.models import WEIGHTS_DIR, load_model, load_prompt_weights
from sam4med.engine.predictor import Predictor
from sam4med.engine.preprocessing import LOW_RES
from sam4med.engine.prompts import Prompt, center_point
from sam4med.engine.registry import MODELS, model_spec
from sam4med.engine.sam_model import Embedding
from sam4med.engine.segment import segment_image


def ellipses(root: Path, count: int = 10, size: int = 128) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        centre = tuple(int(v) for v in rng.integers(40, size - 40, 2))
        image, mask = make_ellipse_image(size, size, centre, tuple(int(v) for v in rng.integers(14, 30, 2)), seed=index)
        Image.fromarray(image).save(root / "images" / f"e{index}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"e{index}.png")
    (root / "dataset.json").write_text(json.dumps({"name": "ellipses"}))
    return root


def one_click_dice(model, data: Path) -> float:
    predictor = Predictor(model)
    scores = []
    for path in sorted((data / "images").glob("*.png")):
        image = np.asarray(Image.open(path).convert("RGB"))
        truth = np.asarray(Image.open(data / "masks" / path.name)) > 0
        mask = segment_image(predictor, image, Prompt(points=[center_point(truth)]), "auto")
        scores.append(2 * (mask & truth).sum() / (mask.sum() + truth.sum()))
    return float(np.mean(scores))


CONFIG = ClickTrainConfig(steps_per_epoch=6, epochs=3, rounds=1, images_per_step=2, objects_per_image=1,
                          learning_rate=3e-4, max_val_images=2, flips=False,
                          fractions={"train": 0.6, "val": 0.2, "test": 0.2})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("clicks")
    data = ellipses(root / "ellipses")
    result = train_clicks([data], root / "run", CONFIG, show_progress=False)
    return data, root / "run", result


def test_a_few_dozen_steps_teach_the_decoder_single_clicks(trained, litemedsam):
    data, run, result = trained
    assert result.epochs_run == 3
    before = one_click_dice(litemedsam, data)
    after = one_click_dice(load_model("litemedsam", run / "best.pt", device="cpu"), data)
    assert before < 0.3  # LiteMedSAM ignores a lone click
    assert after > before + 0.4, (before, after)


def test_a_click_runs_point_grid_uses_the_click_models_thresholds_not_sams(trained):
    """SAM's 0.88 / 0.95 fit SAM's IoU head: with them a click run's grid kept no mask on any real data set."""
    _, run, _ = trained
    grid = EverythingSettings().resolved(load_model("litemedsam", run / "best.pt", device="cpu").spec)
    assert grid.method == "points"
    assert (grid.pred_iou_thresh, grid.stability_thresh) == model_spec("litemedsam-click").point_grid_thresholds


def test_embeddings_are_cached_in_fp16_once(trained):
    _, run, _ = trained
    rows = [json.loads(line) for line in (run / "embeddings" / "ellipses" / "results.jsonl").read_text().splitlines()]
    assert rows and all(r["status"] == "ok" and r["objects"] == 1 for r in rows)
    saved = torch.load(next((run / "embeddings" / "ellipses").glob("*.pt")), weights_only=True)
    assert saved["features"].dtype == torch.float16 and saved["features"].shape == (256, 64, 64)
    assert saved["labels"].shape == (256, 256) and saved["labels"].max() == 1


KILLED_RUN = """
import sys
from pathlib import Path
from dataclasses import replace
from sam4med.clicks.training import ClickTrainConfig, train_clicks
config = ClickTrainConfig(**{**__import__("json").loads(sys.argv[3]), "first_prompt_weights": tuple(__import__("json").loads(sys.argv[4]))})
train_clicks([sys.argv[1]], sys.argv[2], config, Path(sys.argv[2]).parent / "embeddings", show_progress=False)
"""


def test_a_killed_run_continues_with_the_same_history(trained, tmp_path):
    """Killed (SIGKILL) once its first epoch is recorded, then run again: the same history as a run never stopped."""
    data, run, _ = trained
    shutil.copytree(run / "embeddings", tmp_path / "embeddings")
    config = {k: v for k, v in asdict(CONFIG).items() if k != "first_prompt_weights"}
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(data), str(tmp_path / "run"), json.dumps(config),
                                json.dumps(list(CONFIG.first_prompt_weights))])
    history = tmp_path / "run" / "history.jsonl"
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline and not (history.is_file() and history.read_text()):
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert 1 <= len(history.read_text().splitlines()) < CONFIG.epochs  # stopped part-way
    train_clicks([data], tmp_path / "run", CONFIG, tmp_path / "embeddings", show_progress=False)

    def rows(folder):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (folder / "history.jsonl").read_text().splitlines()]

    assert rows(tmp_path / "run") == rows(run)


def test_exported_weights_load_over_litemedsam_and_a_changed_file_is_refused(trained, tmp_path, monkeypatch):
    _, run, _ = trained
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    for folder, name, message in ((run, "best", "is the input"), (run, "last", "a file of the training run"),
                                  (run, "config", "a file of the training run"),
                                  (run, "split", "a file of the training run"),
                                  (tmp_path, "../toy", "not a safe file name"), (tmp_path, "", "not a safe file name")):
        with pytest.raises(InputError, match=message):  # the run's files stay, nothing lands outside
            export_prompt_weights(run / "best.pt", folder, name)
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before
    assert not (tmp_path.parent / "toy.pt").exists()
    path = export_prompt_weights(run / "best.pt", tmp_path, "toy_click")
    card = json.loads((tmp_path / "toy_click.json").read_text())
    assert card["dtype"] == "float16" and card["base_model"] == "litemedsam"
    saved = torch.load(path, weights_only=True)
    assert all(k.startswith(("prompt_encoder.", "mask_decoder.")) for k in saved)
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float16}
    network = model_spec("litemedsam").build()
    assert load_prompt_weights(network, "toy_click", tmp_path) == card["sha256"]
    weights = path.read_bytes()
    path.write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))
    with pytest.raises(InputError, match="toy_click.pt: sha256 .* differs from its model card"):
        load_prompt_weights(network, "toy_click", tmp_path)
    path.unlink()
    with pytest.raises(InputError, match="differs from its model card"):
        load_prompt_weights(network, "toy_click", tmp_path)


def test_export_keeps_other_weights_and_stays_out_of_data_sets(trained, tmp_path):
    data, run, _ = trained
    with pytest.raises(InputError, match="lies inside the data set folder"):
        export_prompt_weights(run / "best.pt", data / "images" / "weights", "toy_click")
    assert not (data / "images" / "weights").exists()
    path = export_prompt_weights(run / "best.pt", tmp_path, "toy_click")
    assert export_prompt_weights(run / "best.pt", tmp_path, "toy_click") == path  # the same weights again
    other = {key: value + 1 if value.is_floating_point() else value
             for key, value in torch.load(path, weights_only=True).items()}
    torch.save(other, path)
    with pytest.raises(InputError, match="holds other weights; give --overwrite"):
        export_prompt_weights(run / "best.pt", tmp_path, "toy_click")
    assert all(torch.equal(value, other[key]) for key, value in torch.load(path, weights_only=True).items())
    export_prompt_weights(run / "best.pt", tmp_path, "toy_click", overwrite=True)
    assert load_prompt_weights(model_spec("litemedsam").build(), "toy_click", tmp_path) == file_sha256(path)
    for record in ("datasets", "priors", "embeddings"):  # another verb's record under the name: never replaced
        (tmp_path / f"{record}.json").write_text('{"name": "kvasir_seg"}')
        with pytest.raises(InputError, match=f"{record}.pt or {record}.json is not an export of sam4med"):
            export_prompt_weights(run / "best.pt", tmp_path, record, overwrite=True)
        assert (tmp_path / f"{record}.json").read_text() == '{"name": "kvasir_seg"}'
    with pytest.raises(InputError, match="without its extension"):
        export_prompt_weights(run / "best.pt", tmp_path, "toy_click.pt")


@pytest.mark.skipif(not any(spec.prompt_weights for spec in MODELS.values()), reason="no shipped prompt weights yet")
def test_shipped_click_weights_load_with_their_hash():
    spec = next(spec for spec in MODELS.values() if spec.prompt_weights)
    card = json.loads((WEIGHTS_DIR / f"{spec.prompt_weights}.json").read_text())
    model = load_model(spec.name, device="cpu")
    assert model.weights_sha256 == card["sha256"] and model.base_weights_sha256 == card["base_weights_sha256"]
    assert (WEIGHTS_DIR / card["file"]).stat().st_size < 16 * 2**20


def test_training_can_start_from_exported_weights(trained, tmp_path):
    """--init: a run starts from given prompt weights (here: one step at a vanishing learning rate keeps them)."""
    data, run, _ = trained
    start = export_prompt_weights(run / "best.pt", tmp_path, "start")
    config = ClickTrainConfig(**{**asdict(CONFIG), "epochs": 1, "steps_per_epoch": 1, "learning_rate": 1e-12,
                                 "init_weights": str(start)})
    train_clicks([data], tmp_path / "run", config, run / "embeddings", show_progress=False)
    saved = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    initial = torch.load(start, weights_only=True)
    assert saved["meta"]["init_weights_sha256"] == json.loads((tmp_path / "start.json").read_text())["sha256"]
    for key, value in initial.items():
        torch.testing.assert_close(saved["weights"][key], value.float(), atol=2e-3, rtol=2e-3)  # fp16 export
    with pytest.raises(InputError, match="--init .*missing.pt: no such file"):
        train_clicks([data], tmp_path / "other", ClickTrainConfig(init_weights=str(tmp_path / "missing.pt")))
    with pytest.raises(InputError, match="--init .*: a folder, not a weights file"):
        train_clicks([data], tmp_path / "other", ClickTrainConfig(init_weights=str(tmp_path)))
    assert not (tmp_path / "other").exists()  # refused before the run folder is claimed or an image embedded


def test_training_masks_that_are_all_empty_are_refused_before_any_embedding(tmp_path):
    data = ellipses(tmp_path / "blank", count=5)
    for mask in (data / "masks").iterdir():
        Image.fromarray(np.zeros((128, 128), np.uint8)).save(mask)
    with pytest.raises(InputError, match="every training image's mask is empty"):
        train_clicks([data], tmp_path / "run", CONFIG, tmp_path / "embeddings", show_progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "embeddings").exists()


def iou_head_error(model, data: Path) -> float:
    """Mean |predicted - real IoU| over the 3 masks of a centre click on each image."""
    predictor = Predictor(model)
    errors = []
    for path in sorted((data / "images").glob("*.png")):
        truth = np.asarray(Image.open(data / "masks" / path.name)) > 0
        masks, predicted = predictor.prompt_masks(np.asarray(Image.open(path).convert("RGB")),
                                                  Prompt(points=[center_point(truth)]), multimask=True)
        real = [(m & truth).sum() / max((m | truth).sum(), 1) for m in masks]
        errors += np.abs(predicted - np.array(real)).tolist()
    return float(np.mean(errors))


def test_iou_head_training_changes_only_the_iou_head_and_fits_it_to_the_real_iou(trained, tmp_path):
    """--train-only iou_head: every mask stays the same; the head's predictions come closer to the real IoU."""
    data, run, _ = trained
    start = export_prompt_weights(run / "best.pt", tmp_path, "start")
    config = replace(CONFIG, epochs=2, learning_rate=1e-3, trainable="iou_head", init_weights=str(start))
    train_clicks([data], tmp_path / "run", config, run / "embeddings", show_progress=False)
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["weights"]
    initial = torch.load(start, weights_only=True)
    changed = {key for key, value in initial.items() if not torch.equal(saved[key], value.float())}
    assert changed and all(key.startswith("mask_decoder.iou_prediction_head.") for key in changed), changed
    before = iou_head_error(load_model("litemedsam", run / "best.pt", device="cpu"), data)  # what --init read
    after = iou_head_error(load_model("litemedsam", tmp_path / "run" / "last.pt", device="cpu"), data)
    assert after < before / 2, (before, after)
    # the ranking term takes part: same seed and clicks, other head weights, still only the head
    ranked = replace(config, iou_rank_weight=1.0)
    train_clicks([data], tmp_path / "ranked", ranked, run / "embeddings", show_progress=False)
    ranked_weights = torch.load(tmp_path / "ranked" / "last.pt", weights_only=True)["weights"]
    differ = {key for key, value in saved.items() if not torch.equal(ranked_weights[key], value)}
    assert differ and all(key.startswith("mask_decoder.iou_prediction_head.") for key in differ), differ
    with pytest.raises(InputError, match="needs --init"):
        train_clicks([data], tmp_path / "other", replace(CONFIG, trainable="iou_head"))


def test_iou_rank_loss_rewards_the_real_order_whatever_the_level():
    real = torch.tensor([[0.2, 0.9, 0.5]])
    right_order = iou_rank_loss(torch.tensor([[0.3, 0.7, 0.5]]), real)
    wrong_order = iou_rank_loss(torch.tensor([[0.7, 0.3, 0.5]]), real)
    assert right_order < wrong_order
    torch.testing.assert_close(iou_rank_loss(torch.tensor([[0.3, 0.7, 0.5]]) + 0.2, real), right_order)
    predicted = torch.tensor([[0.5, 0.5, 0.5]], requires_grad=True)
    iou_rank_loss(predicted, real).backward()
    assert predicted.grad[0].argmin() == 1  # gradient descent raises the best mask's prediction most


def test_first_round_share_weighs_the_first_prompts_mask_against_the_corrections():
    """Every trained round weighs the same by default; with a share, the first prompt's round carries it and the
    corrections split the rest, unless the first round was not trained (a box the base decoder answered)."""
    losses = [torch.tensor(v) for v in (1.0, 2.0, 3.0, 4.0)]
    assert rollout_loss(losses, True, None).item() == pytest.approx(2.5)
    assert rollout_loss(losses, True, 0.5).item() == pytest.approx(0.5 * 1 + 0.5 * 3)
    assert rollout_loss(losses, True, 1.0).item() == pytest.approx(1.0)
    assert rollout_loss(losses, False, 0.5).item() == pytest.approx(2.5)  # the first of them is a correction
    assert rollout_loss(losses[:1], True, 0.5).item() == pytest.approx(1.0)  # no corrections: the first alone
    with pytest.raises(InputError, match="--first-round-share 1.5"):
        replace(CONFIG, first_round_share=1.5).check()


def test_click_agreement_loss_holds_the_mask_to_each_click_and_only_there():
    logits = torch.full((2, 8, 8), -4.0)
    logits[0, 2, 3] = 4.0  # object 0 holds the pixel x 3, y 2
    logits.requires_grad_(True)
    points = np.array([[[3.4, 2.6], [6.0, 6.0]], [[3.0, 2.0], [0.0, 0.0]]], dtype=np.float32)
    agreed = np.array([[1, 0], [0, -1]])  # a positive click on the object, negatives off it, one slot without a click
    loss = click_agreement_loss(logits, points, agreed)
    assert float(loss.detach()) == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(-4.0))), rel=1e-5)
    loss.backward()
    assert set(zip(*np.nonzero(logits.grad.numpy()))) == {(0, 2, 3), (0, 6, 6), (1, 2, 3)}
    disagreed = click_agreement_loss(logits.detach(), points, np.array([[0, 1], [1, -1]]))
    assert float(disagreed) == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(4.0))), rel=1e-5)
    assert float(click_agreement_loss(logits.detach(), points, np.full((2, 2), -1))) == 0.0


def test_the_click_term_takes_part_in_training(trained, tmp_path):
    data, run, _ = trained
    plain, held = (replace(CONFIG, epochs=1, click_weight=weight) for weight in (None, 5.0))
    for name, config in (("plain", plain), ("held", held)):
        train_clicks([data], tmp_path / name, config, run / "embeddings", show_progress=False)
    weights = [torch.load(tmp_path / name / "last.pt", weights_only=True)["weights"] for name in ("plain", "held")]
    assert any(not torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    with pytest.raises(InputError, match="--click-weight -1"):
        replace(CONFIG, click_weight=-1.0).check()


def test_patience_stops_a_run_whose_validation_stops_improving(trained, tmp_path):
    """The shared loop's early stopping: at a learning rate too small to move a weight, validation Dice stays where
    epoch 1 left it, so with a patience of 1 the run ends after epoch 2 of 4."""
    data, run, _ = trained
    config = replace(CONFIG, epochs=4, patience=1, learning_rate=1e-20)
    result = train_clicks([data], tmp_path / "run", config, run / "embeddings", show_progress=False)
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [row["val_dice"] for row in history] == [history[0]["val_dice"]] * 2
    assert (result.epochs_run, result.best_epoch, result.stopped_early) == (2, 1, True)


def test_centre_click_share_puts_lone_clicks_at_the_centre():
    objects = [np.zeros((64, 64), bool) for _ in range(2)]
    objects[0][10:30, 5:45] = True
    objects[1][40:60, 40:50] = True
    centred = first_prompts("point", objects, np.random.default_rng(0), 5, 10.0, centre_click_share=1.0)
    assert [tuple(p[0]) for p in centred.points] == [center_point(o) for o in objects]
    draws = [first_prompts("point", objects, np.random.default_rng(seed), 5, 10.0, centre_click_share=0.5)
             for seed in range(40)]
    centre_share = np.mean([tuple(d.points[0, 0]) == center_point(objects[0]) for d in draws])
    assert 0.25 < centre_share < 0.75
    random_ones = first_prompts("point", objects, np.random.default_rng(0), 5, 10.0)  # the default: a random pixel
    assert all(o[int(y), int(x)] for o, ((x, y),) in zip(objects, random_ones.points))
    assert [tuple(p[0]) for p in random_ones.points] != [center_point(o) for o in objects]


def test_runs_from_before_train_only_still_resume(tmp_path):
    """A run folder whose config.json predates --train-only is claimed again by the same settings."""
    from sam4med.engine.runs import claim_folder

    record = json.loads(json.dumps(asdict(CONFIG)))
    del record["trainable"]
    (tmp_path / "config.json").write_text(json.dumps(record))
    claim_folder(tmp_path, "config.json", asdict(CONFIG))
    with pytest.raises(InputError, match="trainable"):
        claim_folder(tmp_path, "config.json", asdict(replace(CONFIG, trainable="iou_head")))


@settings(max_examples=50, deadline=None)
@given(labels=arrays(np.int16, (LOW_RES, LOW_RES), elements=st.integers(0, 3)),
       content=st.tuples(st.integers(1, LOW_RES), st.integers(1, LOW_RES)), seed=st.integers(0, 2**16))
def test_background_clicks_fall_on_unlabelled_pixels_of_the_image(labels, content, seed):
    points = background_points(torch.from_numpy(labels), content, 3, np.random.default_rng(seed))
    background = labels[: content[0], : content[1]] == 0
    assert len(points) == min(3, int(background.sum()))
    for x, y in points.astype(int):
        assert y < content[0] and x < content[1] and labels[y, x] == 0


def test_background_masks_are_scored_against_the_object_they_overlap_best():
    labels = torch.zeros(8, 8, dtype=torch.long)
    labels[0:2, 0:4] = 1  # 8 pixels
    labels[4:8, 4:8] = 2  # 16 pixels
    masks = torch.full((1, 4, 8, 8), -1.0)
    masks[0, 0, 4:8, 4:8] = 1  # object 2 exactly
    masks[0, 1, 4:8, 4:6] = 1  # half of object 2
    masks[0, 2, 0:2, 6:8] = 1  # background only
    expected = torch.tensor([[1.0, 0.5, 0.0, 0.0]])  # the last mask is empty
    torch.testing.assert_close(best_object_iou(masks, labels), expected)
    torch.testing.assert_close(best_object_iou(masks, torch.zeros(8, 8, dtype=torch.long)), torch.zeros(1, 4))


def test_click_model_keeps_the_base_models_box_masks(litemedsam, ellipse_image):
    """litemedsam-click decodes a box alone with LiteMedSAM's own decoder (the same masks, bit for bit);
    clicks, box + click and corrections go to the trained decoder."""
    image, truth = ellipse_image
    click_model = load_model("litemedsam-click", device="cpu")
    assert click_model.protocol()["box_prompts"] == "base model's prompt encoder and decoder"
    embedding = litemedsam.encode(image)
    box = Prompt(box=np.array([70, 55, 230, 145], dtype=np.float32))
    base = litemedsam.decode(embedding, [box])
    routed = click_model.decode(embedding, [box])
    assert torch.equal(base.low_res, routed.low_res) and torch.equal(base.iou, routed.iou)
    with_click = Prompt(points=[center_point(truth)], labels=[1], box=box.box)
    assert not torch.equal(litemedsam.decode(embedding, [with_click]).low_res,
                           click_model.decode(embedding, [with_click]).low_res)
    # the shared embedding holds each decoder's own per-image state: the same masks as on a fresh embedding
    fresh = click_model.decode(Embedding(embedding.features, embedding.geometry), [with_click])
    torch.testing.assert_close(click_model.decode(embedding, [with_click]).low_res, fresh.low_res)
    corrected = click_model.decode(embedding, [box], mask_input=base.low_res)
    assert not torch.equal(litemedsam.decode(embedding, [box], mask_input=base.low_res).low_res, corrected.low_res)


def blobs(root: Path, count: int = 2, size: int = 512) -> Path:
    """Large images of small blobs (nuclei-like), 0/255 masks."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for index in range(count):
        image, masks = small_blobs(size, count=10, seed=index)
        Image.fromarray(image).save(root / "images" / f"b{index}.png")
        Image.fromarray(np.any(masks, axis=0).astype(np.uint8) * 255).save(root / "masks" / f"b{index}.png")
    (root / "dataset.json").write_text(json.dumps({"name": "blobs"}))
    return root


def test_tiled_data_sets_are_also_trained_tile_by_tile_at_the_scale_tiled_inference_sees(tmp_path):
    data = blobs(tmp_path / "blobs", count=3)
    config = replace(CONFIG, epochs=1, steps_per_epoch=2, flips=False, tile=256, halo=32, tiled=("blobs",),
                     balance_datasets=True, max_val_images=4, fractions={"train": 0.34, "val": 0.33, "test": 0.33})
    train_clicks([data], tmp_path / "run", config, tmp_path / "embeddings", show_progress=False)
    meta = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["meta"]
    assert meta["train_per_folder"] == {"blobs": 1, "blobs@tile256h32": 4}  # one 512 px image: 2 x 2 tiles
    whole = embedded_images(tmp_path / "embeddings", "blobs", ["b0", "b1", "b2"])  # training and validation
    cut = embedded_images(tmp_path / "embeddings", "blobs@tile256h32", ["b0", "b1", "b2"])
    assert [e.path.name for e in cut[:4]] == [f"{e.image}.t{k}.pt" for e, k in zip(cut[:4], range(4))]

    def mean_object_area(images):
        areas = [torch.bincount(load_embedding(e.path)[1].flatten())[1:] for e in images]
        return torch.cat([a[a > 0] for a in areas]).float().mean()

    # 512 px -> 256 px halves a blob's side; a 256 px core + halo keeps about 0.9 of it
    assert mean_object_area(cut) > 2.5 * mean_object_area(whole)
    assert sum(e.objects for e in cut) >= sum(e.objects for e in whole)  # a blob on a cut may count twice
    with pytest.raises(InputError, match="--tiled other: not one of the data sets"):
        train_clicks([data], tmp_path / "run2", replace(config, tiled=("other",)), tmp_path / "embeddings")
    with pytest.raises(InputError, match="--tile 256: needs --tiled data sets"):
        replace(CONFIG, tile=256).check()
    with pytest.raises(InputError, match="--tiled blobs: needs --tile"):
        train_clicks([data], tmp_path / "run3", replace(config, tile=None), tmp_path / "embeddings")


def test_tile_share_decides_how_often_a_tile_is_drawn_however_many_tiles_there_are():
    def images(dataset, count):
        return [EmbeddedImage(dataset, f"{dataset}{i}", Path(f"{dataset}{i}.pt"), 3, (256, 256)) for i in range(count)]

    train = images("polyps", 10) + images("nuclei", 2) + images("nuclei@tile256h32", 200)
    rng = np.random.default_rng(0)

    def tiles_drawn(**changes):
        sampler = ImageSampler(train, replace(CONFIG, tile=256, halo=32, tiled=("nuclei",), **changes))
        drawn = np.concatenate([sampler.draw(rng) for _ in range(2000)])
        return np.mean(drawn >= 12), np.mean(drawn < 10)

    tiles, polyps = tiles_drawn()  # tiles are images like any other: 200 of 212
    assert tiles > 0.9 and polyps < 0.08
    tiles, polyps = tiles_drawn(tile_share=0.25)
    assert 0.22 < tiles < 0.28 and 0.59 < polyps < 0.66  # whole images drawn evenly: 0.75 x 10 of 12
    tiles, polyps = tiles_drawn(tile_share=0.25, balance_datasets=True)
    assert 0.22 < tiles < 0.28 and 0.35 < polyps < 0.40  # whole data sets drawn evenly: half of 0.75
    assert tiles_drawn(tile_share=0.0)[0] == 0.0
    with pytest.raises(InputError, match="--tile-share: needs --tiled"):
        train_clicks([], Path("unused"), replace(CONFIG, tile_share=0.3), Path("unused"))
    with pytest.raises(InputError, match="--tile-share"):
        replace(CONFIG, tile=256, tiled=("nuclei",), tile_share=1.5).check()


def test_a_set_with_fewer_images_than_a_step_gives_each_step_all_of_them():
    train = [EmbeddedImage("polyps", f"p{i}", Path(f"p{i}.pt"), 3, (256, 256)) for i in range(1)]
    sampler = ImageSampler(train, replace(CONFIG, images_per_step=2))  # one image with an object, no mirror image
    assert [sampler.draw(np.random.default_rng(seed)) for seed in range(3)] == [[0], [0], [0]]


def test_an_image_that_cannot_be_embedded_is_named_on_every_run(tmp_path, litemedsam, capsys):
    from sam4med.clicks.embeddings import embed_datasets
    from sam4med.engine.datasets import load_dataset

    data = ellipses(tmp_path / "ellipses", count=1)
    good = (data / "images" / "e0.png").read_bytes()
    (data / "images" / "cut.png").write_bytes(good[: len(good) // 2])
    (data / "masks" / "cut.png").write_bytes((data / "masks" / "e0.png").read_bytes())
    dataset = load_dataset(data)
    for _ in range(2):  # the second run embeds nothing, and still says what training lacks
        embed_datasets(litemedsam, {"ellipses": (dataset, dataset.samples)}, tmp_path / "emb", (False,),
                       show_progress=False)
        assert "1 image(s) could not be embedded and are left out (first: " in capsys.readouterr().err


def test_a_replaced_image_or_mask_or_a_lost_embedding_is_embedded_again(tmp_path, litemedsam, capsys):
    """Cached embeddings belong to the files they were made from, not to an image id."""
    from sam4med.clicks.embeddings import embed_datasets
    from sam4med.engine.datasets import load_dataset

    data = ellipses(tmp_path / "ellipses", count=3)
    store = tmp_path / "emb"

    def embed() -> tuple[int, str]:
        dataset = load_dataset(data)
        summary, = embed_datasets(litemedsam, {"ellipses": (dataset, dataset.samples)}, store, (False,),
                                  show_progress=False)
        return summary.computed, capsys.readouterr().err

    def labels(image_id: str) -> torch.Tensor:
        return load_embedding(store / "ellipses" / f"{image_id}.pt")[1]

    assert embed()[0] == 3
    assert embed() == (0, "")  # nothing changed: nothing embedded, nothing said
    before = labels("e1")
    (data / "masks" / "e1.png").write_bytes((data / "masks" / "e2.png").read_bytes())  # another object, same id
    (store / "ellipses" / "e0.pt").unlink()
    computed, said = embed()
    assert computed == 2 and "2 finished image(s) whose outputs are damaged, missing or out of date" in said
    assert not torch.equal(labels("e1"), before) and torch.equal(labels("e1"), labels("e2"))
    assert (store / "ellipses" / "e0.pt").is_file()
    assert embed()[0] == 0
    whole = (store / "ellipses" / "e2.pt").read_bytes()
    (store / "ellipses" / "e2.pt").write_bytes(whole[: len(whole) // 3])  # cut by a full disk or a copy
    assert embed()[0] == 1 and (store / "ellipses" / "e2.pt").read_bytes() == whole
    (store / "ellipses" / "e2.pt").write_bytes(bytes(len(whole)))  # damaged at its own size: found when read
    with pytest.raises(InputError, match=r"e2.pt: a damaged cached embedding .*removed: run the same command again"):
        labels("e2")
    assert embed()[0] == 1 and (store / "ellipses" / "e2.pt").read_bytes() == whole


@pytest.mark.parametrize("changes", [{"rounds": 1000}, {"images_per_step": 40, "objects_per_image": 4},
                                     {"background_clicks": 300}])
def test_a_step_too_large_for_memory_is_refused_before_any_file(changes, tmp_path):
    """Every decoder pass of a step is held for its backward pass: --rounds 1000 once grew to 21 GB."""
    with pytest.raises(InputError, match=r"decoder passes a step, each held for the backward pass; at most 256"):
        train_clicks([], tmp_path / "run", replace(CONFIG, **changes), tmp_path / "embeddings")
    assert not (tmp_path / "run").exists()


def test_an_out_folder_inside_the_data_is_named_as_the_out_folder(tmp_path):
    data = blobs(tmp_path / "blobs", count=1, size=128)
    with pytest.raises(InputError, match=r"--out .*images.run: lies inside the input"):
        train_clicks([data], data / "images" / "run", CONFIG)
    assert not (data / "images" / "run").exists()


def test_an_embeddings_path_that_is_a_file_is_refused_before_the_run_is_claimed(tmp_path):
    data = blobs(tmp_path / "blobs", count=1, size=128)
    (tmp_path / "embeddings").write_text("not a folder")
    with pytest.raises(InputError, match=r"--embeddings .*embeddings: is a file, not a folder"):
        train_clicks([data], tmp_path / "run", CONFIG, tmp_path / "embeddings")
    assert not (tmp_path / "run").exists()


def test_an_embeddings_folder_of_another_run_is_refused_naming_the_option_before_the_run_is_claimed(tmp_path):
    """The run folder was claimed first: the corrected command was then refused for 'other settings'."""
    data = blobs(tmp_path / "blobs", count=5, size=128)
    (tmp_path / "cache" / "blobs").mkdir(parents=True)
    (tmp_path / "cache" / "blobs" / "results.jsonl").write_text('{"image": "x", "status": "ok"}\n')
    with pytest.raises(InputError, match=r"cache.blobs: holds another run's results.jsonl .*choose another --embeddings"):
        train_clicks([data], tmp_path / "run", CONFIG, tmp_path / "cache")
    assert not (tmp_path / "run").exists()
    (tmp_path / "cache" / "blobs" / "results.jsonl").unlink()
    (tmp_path / "cache" / "blobs" / "embeddings.json").write_text('{"min_area": 1}')
    with pytest.raises(InputError, match=r"other settings \(.*min_area.*\); choose another --embeddings"):
        train_clicks([data], tmp_path / "run", CONFIG, tmp_path / "cache")
    assert not (tmp_path / "run").exists()


def test_a_run_given_to_another_model_names_the_model_to_give(trained):
    _, run, _ = trained
    with pytest.raises(InputError, match="trained on backbone 'litemedsam', not 'litemedsam-click'; give --model "
                                         "litemedsam"):
        load_model("litemedsam-click", run / "best.pt", device="cpu")


@pytest.mark.parametrize(("changes", "named"), [
    ({"rounds": 1.5}, "--rounds 1.5: must be an integer"), ({"background_clicks": 0.5}, "--background-clicks 0.5"),
    ({"first_prompt_weights": (float("nan"), 1, 1, 1, 1)}, "first_prompt_weights"),
    ({"first_prompt_weights": (float("inf"), 1, 1, 1, 1)}, "first_prompt_weights"),
])
def test_python_settings_no_option_could_give_are_refused_by_the_check(changes, named):
    with pytest.raises(InputError, match=named):
        replace(CONFIG, **changes).check()
