"""Predictor, embedding cache, everything mode, interactive correction and volume propagation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_ellipse_image
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sam4med.engine.everything import (
    EverythingSettings,
    claim_pixels,
    generate_masks,
    mask_nms,
    grid_points,
    window_boxes,
    ProposedMask,
)
from sam4med.engine.metrics import dice as metric_dice
from sam4med.engine.interactive import InteractiveResult, run_interactive
from sam4med.engine.predictor import EmbeddingCache, Predictor
from sam4med.engine.prompts import Prompt, center_point, tight_box
from sam4med.engine.segment import segment_volume


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_batched_prediction_equals_one_prompt_at_a_time(litemedsam, ellipse_image):
    image, mask = ellipse_image
    predictor = Predictor(litemedsam, batch_size=2)
    predictor.set_image(image)
    prompts = [Prompt(box=tight_box(mask) + offset) for offset in (0, 2, -3, 4, 1)]
    batched = predictor.predict(prompts)
    for index, prompt in enumerate(prompts):
        single = predictor.predict([prompt])
        assert torch.allclose(batched.low_res[index], single.low_res[0], atol=1e-4)
        assert torch.allclose(batched.iou[index], single.iou[0], atol=1e-5)
    assert predictor.encoder_calls == 1


def test_embedding_cache_skips_the_encoder_and_returns_the_same_embedding(litemedsam, ellipse_image, tmp_path):
    image, _ = ellipse_image
    first = Predictor(litemedsam, EmbeddingCache(tmp_path))
    features = first.set_image(image).features.clone()
    assert first.encoder_calls == 1 and len(list(tmp_path.glob("*.pt"))) == 1
    second = Predictor(litemedsam, EmbeddingCache(tmp_path))
    assert torch.equal(second.set_image(image.copy()).features, features)
    assert second.encoder_calls == 0
    changed = image.copy()
    changed[0, 0, 0] ^= 1  # one pixel differs: a different key
    second.set_image(changed)
    assert second.encoder_calls == 1
    # a corrupt entry is recomputed, not trusted
    for entry in tmp_path.glob("*.pt"):
        entry.write_bytes(b"truncated")
    third = Predictor(litemedsam, EmbeddingCache(tmp_path))
    assert torch.allclose(third.set_image(image).features, features, atol=1e-5)
    assert third.encoder_calls == 1


def test_point_grid_and_windows_cover_the_image():
    grid = grid_points((100, 200), 4)
    assert grid.shape == (16, 2)
    assert grid[:, 0].min() == pytest.approx(25) and grid[:, 0].max() == pytest.approx(175)
    boxes = window_boxes((100, 200), (0.5,), 0.5)
    assert len(boxes) == 1 + 9
    assert max(b[2] for b in boxes) == pytest.approx(199) and max(b[3] for b in boxes) == pytest.approx(99)


masks_20 = arrays(bool, (20, 24), elements=st.booleans())


@settings(max_examples=200, deadline=None)
@given(first=masks_20, second=masks_20, top=st.integers(0, 19), left=st.integers(0, 23),
       bottom=st.integers(1, 20), right=st.integers(1, 24))
def test_a_proposal_kept_as_its_boxs_crop_answers_as_the_full_mask_would(first, second, top, left, bottom, right):
    prompt = Prompt(box=[0, 0, 1, 1])
    a, b = ProposedMask.from_mask(first, 0.9, 0.9, prompt), ProposedMask.from_mask(second, 0.8, 0.8, prompt)
    assert np.array_equal(a.mask, first) and a.area == first.sum() and a.crop.size <= first.size
    assert a.intersection(b) == b.intersection(a) == (first & second).sum()
    assert a.overlap(second) == (first & second).sum()
    assert a.dice(second) == pytest.approx(metric_dice(first, second))
    region = (left, top, max(right, left + 1), max(bottom, top + 1))
    assert np.array_equal(a.window(region), first[region[1] : region[3], region[0] : region[2]])


def test_mask_nms_keeps_the_best_of_duplicates_and_nested_objects():
    big = np.zeros((20, 20), bool)
    big[2:18, 2:18] = True
    small = np.zeros_like(big)
    small[5:9, 5:9] = True
    prompt = Prompt(box=[0, 0, 1, 1])
    candidates = [ProposedMask.from_mask(big, 0.9, 0.9, prompt), ProposedMask.from_mask(big.copy(), 0.95, 0.95, prompt),
                  ProposedMask.from_mask(small, 0.8, 0.9, prompt)]
    kept = mask_nms(candidates, 0.7)
    assert [c.predicted_iou for c in kept] == [0.95, 0.8]


@settings(max_examples=60, deadline=None)
@given(masks=st.lists(arrays(bool, (12, 14)), min_size=0, max_size=5), taken=arrays(bool, (12, 14)),
       scores=st.lists(st.floats(0.01, 1.0), min_size=5, max_size=5), min_visible=st.floats(0.0, 1.0))
def test_claimed_pixels_go_to_one_kept_mask_each_best_score_first_and_never_to_taken_ones(masks, taken, scores,
                                                                                          min_visible):
    prompt = Prompt(box=[0, 0, 1, 1])
    proposals = [ProposedMask.from_mask(m, score, 1.0, prompt) for m, score in zip(masks, scores) if m.any()]
    claimed = claim_pixels(proposals, (12, 14), min_visible, taken)
    assert claimed.labels.shape == (12, 14) and not claimed.labels[taken].any()
    assert set(np.unique(claimed.labels)) <= set(range(len(claimed.kept) + 1))
    for value, i in enumerate(claimed.kept, start=1):
        own = claimed.labels == value
        assert own.any() and not (own & ~proposals[i].mask).any()
        assert own.sum() == claimed.visible[i] >= min_visible * proposals[i].area
        earlier = [j for j in claimed.kept if proposals[j].score > proposals[i].score]
        assert not any((own & proposals[j].mask).any() for j in earlier)  # a better kept mask had those pixels
    dropped = set(range(len(proposals))) - set(claimed.kept)
    assert all(claimed.visible[i] == 0 or claimed.visible[i] < min_visible * proposals[i].area for i in dropped)


def test_everything_mode_with_box_proposals_finds_separate_objects(litemedsam):
    """LiteMedSAM takes no point prompts, so its everything mode runs on box proposals."""
    image, first = make_ellipse_image(256, 256, centre=(70, 70), radii=(30, 40))
    second_image, second = make_ellipse_image(256, 256, centre=(180, 170), radii=(35, 30), seed=1)
    image = np.where(second[..., None], second_image, image)
    settings = EverythingSettings()
    masks = generate_masks(Predictor(litemedsam), image, settings)
    assert settings.resolved(litemedsam.spec).method == "boxes"
    best = [max(dice(m.mask, gt) for m in masks) for gt in (first, second)]
    assert min(best) > 0.85, best
    scores = [m.score for m in masks]
    assert scores == sorted(scores, reverse=True)


def test_interactive_records_every_round_and_counts_clicks(litemedsam, ellipse_image):
    image, mask = ellipse_image
    predictor = Predictor(litemedsam)
    predictor.set_image(image)
    result = run_interactive(predictor, mask, Prompt(box=tight_box(mask)), rounds=3, rng=np.random.default_rng(0))
    assert len(result.dice_per_round) == 4
    assert result.dice_per_round[0] > 0.95  # the box alone already segments the clean ellipse
    assert result.clicks_to_reach(0.85) == 1
    assert len(result.prompts[-1].points) == len(result.prompts) - 1


def test_clicks_to_reach_is_capped_when_never_reached():
    result = InteractiveResult([0.5, 0.7, 0.86, 0.88], [], np.zeros(1))
    assert result.clicks_to_reach(0.85) == 3
    assert result.clicks_to_reach(0.90) == 4


def test_volume_propagates_a_box_from_the_middle_slice(litemedsam):
    """A cylinder through 7 slices: the 3D box names slices 1..5, so only those are labelled."""
    slices, truth = [], []
    for z in range(7):
        image, mask = make_ellipse_image(96, 96, centre=(48, 48), radii=(20 + z, 25), seed=z)
        slices.append(image[..., 0])
        truth.append(mask)
    ys, xs = np.nonzero(truth[3])
    heard = []
    labels = segment_volume(Predictor(litemedsam), slices, (xs.min(), ys.min(), 1, xs.max(), ys.max(), 5),
                            progress=lambda done, total: heard.append((done, total)))
    assert labels.shape == (7, 96, 96)
    assert heard == [(1, 4), (2, 4), (3, 4), (4, 4)]  # slices 4, 5, then 2, 1: every slice of 1..5 but the middle
    assert not labels[0].any() and not labels[6].any()
    for z in range(1, 6):
        assert dice(labels[z], truth[z]) > 0.9, z


def test_everything_mode_with_a_point_grid_on_a_point_taking_model(litemedsam):
    """The point-grid path (SAM's recipe) runs end to end; LiteMedSAM's weights stand in for a
    point-taking model here, so only the mechanics are checked: filters, box NMS, ordering."""
    from dataclasses import replace

    point_model = type(litemedsam)(replace(litemedsam.spec, takes_point_prompts=True), litemedsam.network,
                                   litemedsam.weights_sha256, litemedsam.device)
    image, _ = make_ellipse_image(128, 128, centre=(64, 64), radii=(30, 40))
    settings = EverythingSettings(points_per_side=4, pred_iou_thresh=0.0, stability_thresh=0.0, min_area_fraction=0.0)
    masks = generate_masks(Predictor(point_model), image, settings)
    assert settings.resolved(point_model.spec).method == "points"
    assert 1 <= len(masks) <= 16 * 3
    from torchvision.ops import box_iou

    boxes = torch.tensor([[m.mask.nonzero()[1].min(), m.mask.nonzero()[0].min(), m.mask.nonzero()[1].max(),
                           m.mask.nonzero()[0].max()] for m in masks], dtype=torch.float32)
    overlap = box_iou(boxes, boxes).fill_diagonal_(0).nan_to_num(0.0)  # 1-pixel-wide boxes have no area
    assert float(overlap.max()) <= settings.nms_thresh  # box NMS, as SAM's generator
    scores = [m.score for m in masks]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("tile", [None, 256])
def test_everything_mode_upscales_only_what_passes_the_iou_test_and_keeps_the_same_masks(click_model, monkeypatch, tile):
    """Filtering on predicted IoU before upscaling, a few masks at a time, keeps exactly the masks that
    filtering every full-size mask at once keeps, on whole images and on tiles."""
    from conftest import small_blobs
    from sam4med.engine import everything
    from segment_anything.utils.amg import calculate_stability_score
    from sam4med.engine.tiling import make_predictor

    image, blobs = small_blobs(512, count=6, seed=3)
    predictor = make_predictor(click_model, tile)
    predictor.set_image(image)
    prompts = [Prompt(points=[center_point(blob)]) for blob in blobs]
    prompts += [Prompt(points=[[x, y]]) for x, y in everything.grid_points((512, 512), 3)]
    decoded = predictor.predict(prompts, multimask=True)
    logits = decoded.logits.clone()
    stability = calculate_stability_score(logits.flatten(0, 1), 0.0, 1.0).view(logits.shape[:2])
    # thresholds at the medians (an empty mask's stability is NaN), so that some masks pass and some not, whatever the weights
    settings = EverythingSettings(pred_iou_thresh=float(decoded.iou.median()), stability_thresh=float(stability.nanmedian()),
                                  stability_offset=1.0, min_area_fraction=0.0)
    expected = []
    for b in range(len(prompts)):
        for m in range(logits.shape[1]):
            mask = (logits[b, m] > 0).numpy()
            if float(decoded.iou[b, m]) >= settings.pred_iou_thresh and float(stability[b, m]) >= settings.stability_thresh \
                    and mask.any():
                expected.append((b, mask))
    assert 0 < len(expected) < len(prompts) * logits.shape[1]  # the thresholds keep some and drop some
    monkeypatch.setattr(everything, "CHUNK_LOGITS_BYTES", 3 * 512 * 512 * 4)  # 3 masks per upscale
    fresh = predictor.predict(prompts, multimask=True)  # full-size logits never computed
    kept = everything._candidates(fresh, prompts, settings)
    assert fresh._logits is None
    assert [[p is c.prompt for p in prompts].index(True) for c in kept] == [b for b, _ in expected]
    for candidate, (_, mask) in zip(kept, expected):
        assert np.array_equal(candidate.mask, mask)


ENCODE_PROBE = """
import re

import numpy as np
from sam4med.engine.models import load_model
from sam4med.engine.predictor import Predictor

def status_mb(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024

predictor = Predictor(load_model("litemedsam", device="cpu"))
before = status_mb("VmRSS")
predictor.set_image(np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8))
print(status_mb("VmHWM") - before, status_mb("VmRSS") - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_the_encoders_activations_are_handed_back_before_the_decoders_run():
    """The tuned allocator keeps freed blocks; the encoder's activations (its first stage works on 256 x 256 maps
    of 256 channels) would stay resident under every decoder call of the image if set_image kept them."""
    peak, after = map(int, subprocess.run([sys.executable, "-c", ENCODE_PROBE], check=True, capture_output=True,
                                          text=True).stdout.split())
    assert peak >= 150  # the encoder's activations were resident ...
    assert after < peak - 120  # ... and are not any more


@pytest.mark.parametrize(("image", "message"), [
    (np.zeros((0, 0, 3), np.uint8), "image is 0x0: it has no pixels"),
    (np.zeros((0, 10, 3), np.uint8), "image is 0x10: it has no pixels"),
    (np.full((16, 16, 3), np.nan, np.float32), "NaN or inf"),
    ([[1, 2], [3, 4]], "must be an \\(H, W, 3\\) RGB array, got list"),
    (None, "got NoneType"),
])
def test_pixels_no_model_can_encode_are_refused_by_both_runtimes(litemedsam, image, message):
    """The Python functions that take pixels: one InputError, not a division by zero inside the resize."""
    from sam4med.engine.errors import InputError
    from sam4med.engine.onnx_predictor import model_input

    with pytest.raises(InputError, match=message):
        Predictor(litemedsam).set_image(image)
    with pytest.raises(InputError, match=message):
        model_input(image, 256)


def test_predict_wants_a_list_of_prompts_and_a_batch_of_at_least_one(litemedsam, ellipse_image):
    from sam4med.engine.errors import InputError

    predictor = Predictor(litemedsam)
    predictor.set_image(ellipse_image[0])
    for prompts in ([], Prompt(box=tight_box(ellipse_image[1]))):
        with pytest.raises(InputError, match="a non-empty list of prompts"):
            predictor.predict(prompts)
    for size in (0, -1):
        with pytest.raises(InputError, match=f"batch_size {size}: must be >= 1"):
            Predictor(litemedsam, batch_size=size)
