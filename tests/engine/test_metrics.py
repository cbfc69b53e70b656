"""Metrics against values worked out by hand, the empty-mask rules, input checks and crop invariance."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    compute_surface_dice,
)
from scipy.ndimage import binary_dilation

from sam4med.engine.errors import InputError
from sam4med.engine.metrics import (
    ObjectF1,
    aggregated_jaccard_index,
    average_surface_distance,
    boundary_f_score,
    dice,
    hausdorff,
    hausdorff95,
    iou,
    label_instances,
    paired_bootstrap,
    pixel_auroc,
    normalized_surface_dice,
    object_dice,
    object_f1,
    segmentation_metrics,
    soft_dice,
)

S = 20  # side of the test square


def square(shape: tuple[int, int] = (64, 64), top: int = 10, left: int = 10, side: int = S) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


# ------------------------------------------------------------------------------------------------ overlap


def test_dice_and_iou_of_two_overlapping_squares() -> None:
    a = square(side=10, top=0, left=0)  # 100 pixels
    b = square(side=10, top=5, left=5)  # 100 pixels, 5 x 5 = 25 shared
    assert dice(a, b) == pytest.approx(2 * 25 / (100 + 100))
    assert iou(a, b) == pytest.approx(25 / (100 + 100 - 25))


def test_dice_and_iou_of_a_half_square_inside_a_square() -> None:
    whole = square(side=10, top=0, left=0)  # 100 pixels
    half = np.zeros_like(whole)
    half[0:10, 0:5] = True  # 50 pixels, all inside
    assert dice(half, whole) == pytest.approx(2 * 50 / 150)
    assert iou(half, whole) == pytest.approx(50 / 100)
    assert segmentation_metrics(half, whole)["dice"] == pytest.approx(2 * 50 / 150)


def test_dice_accepts_uint8_masks_and_3d() -> None:
    a = np.zeros((4, 4, 4), dtype=np.uint8)
    b = np.zeros((4, 4, 4), dtype=np.uint8)
    a[:2] = 255  # 32 voxels
    b[1:3] = 1  # 32 voxels, 16 shared
    assert dice(a, b) == pytest.approx(2 * 16 / 64)
    assert iou(a, b) == pytest.approx(16 / 48)


def test_soft_dice_on_a_known_probability_map() -> None:
    gt = np.array([[1, 1, 0, 0]], dtype=bool)
    prob = np.array([[0.9, 0.5, 0.2, 0.0]])
    # 2 * (0.9 + 0.5) / ((0.9 + 0.5 + 0.2) + 2)
    assert soft_dice(prob, gt) == pytest.approx(2 * 1.4 / 3.6, abs=1e-6)


def test_soft_dice_of_a_binary_map_is_dice() -> None:
    a, b = square(side=10, top=0, left=0), square(side=10, top=5, left=5)
    assert soft_dice(a.astype(np.float32), b) == pytest.approx(0.25, abs=1e-6)
    assert soft_dice(np.zeros((3, 3)), np.zeros((3, 3), dtype=bool)) == pytest.approx(1.0)


def test_soft_dice_refuses_logits() -> None:
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        soft_dice(np.array([[2.5, -1.0]]), np.array([[True, False]]))


# ------------------------------------------------------------------------------------------------ distances


def test_one_pixel_shift_of_a_square() -> None:
    gt = square()
    pred = np.roll(gt, 1, axis=1)
    # Edges have 4(S-1) pixels; the S-1 top-row and S-1 bottom-row pixels of pred lying on gt's rows are at 0,
    # the other 2(S-1) are 1 away, and the same holds from gt to pred.
    assert hausdorff(pred, gt) == pytest.approx(1.0)
    assert hausdorff95(pred, gt) == pytest.approx(1.0)
    assert average_surface_distance(pred, gt) == pytest.approx(2 * (S - 1) / (4 * (S - 1)))
    assert normalized_surface_dice(pred, gt, tolerance=0.0) == pytest.approx(0.5)
    assert normalized_surface_dice(pred, gt, tolerance=1.0) == pytest.approx(1.0)


def test_spacing_scales_distances() -> None:
    gt = square()
    down = np.roll(gt, 1, axis=0)  # shift along axis 0
    right = np.roll(gt, 1, axis=1)  # shift along axis 1
    assert hausdorff(down, gt, spacing=(2.0, 1.0)) == pytest.approx(2.0)
    assert hausdorff(right, gt, spacing=(2.0, 1.0)) == pytest.approx(1.0)
    iso = segmentation_metrics(right, gt, spacing=(0.5, 0.5))
    assert iso["hd"] == pytest.approx(0.5)
    assert iso["hd95"] == pytest.approx(0.5)
    assert iso["asd"] == pytest.approx(0.25)
    assert iso["dice"] == pytest.approx(2 * S * (S - 1) / (2 * S * S))  # spacing leaves overlap alone


def test_square_dilated_by_one_pixel() -> None:
    gt = square()
    pred = binary_dilation(gt, structure=np.ones((3, 3), dtype=bool))  # (S+2) x (S+2) square
    # pred's edge ring: 4(S+1) pixels, 4 corners at sqrt(2) from gt's corners, the other 4S at 1;
    # gt's edge ring: 4(S-1) pixels, all at 1 from pred's ring.
    assert hausdorff(pred, gt) == pytest.approx(math.sqrt(2), rel=1e-6)
    assert hausdorff95(pred, gt) == pytest.approx(1.0)  # the 4 corners are under 5% of 84 edge pixels
    expected_asd = (4 * S * 1 + 4 * math.sqrt(2) + 4 * (S - 1) * 1) / (4 * (S + 1) + 4 * (S - 1))
    assert average_surface_distance(pred, gt) == pytest.approx(expected_asd, rel=1e-6)
    assert normalized_surface_dice(pred, gt, tolerance=0.0) == pytest.approx(0.0)
    assert normalized_surface_dice(pred, gt, tolerance=1.0) == pytest.approx((4 * S + 4 * (S - 1)) / (8 * S))
    assert normalized_surface_dice(pred, gt, tolerance=10.0) == pytest.approx(1.0)


def test_hd95_ignores_one_stray_pixel_that_hd_sees() -> None:
    gt = square()  # rows and columns 10..29
    pred = gt.copy()
    pred[10, 50] = True  # 21 pixels right of gt's edge pixel (10, 29)
    # pred -> gt: 4(S-1) = 76 zeros and one 21; gt -> pred: 76 zeros.
    scores = segmentation_metrics(pred, gt)
    assert scores["hd"] == pytest.approx(21.0)
    assert scores["hd95"] == pytest.approx(0.0)
    assert scores["asd"] == pytest.approx(21.0 / (77 + 76), rel=1e-6)
    assert scores["nsd"] == pytest.approx((76 + 76) / (77 + 76), rel=1e-6)  # tolerance 2


def test_cube_shifted_by_one_voxel_in_3d() -> None:
    gt = np.zeros((16, 16, 16), dtype=bool)
    gt[4:10, 4:10, 4:10] = True
    pred = np.roll(gt, 1, axis=2)
    scores = segmentation_metrics(pred, gt, spacing=(1.0, 1.0, 3.0))
    assert scores["hd"] == pytest.approx(3.0)
    assert scores["dice"] == pytest.approx(2 * 6 * 6 * 5 / (2 * 216))


def test_object_touching_the_image_border() -> None:
    gt = np.zeros((12, 12), dtype=bool)
    gt[0:5, 0:5] = True
    pred = np.zeros_like(gt)
    pred[0:5, 0:6] = True  # one column wider, same border
    assert hausdorff(pred, gt) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ empty masks


def test_both_empty_scores_perfectly_without_warnings() -> None:
    empty = np.zeros((8, 8), dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert segmentation_metrics(empty, empty) == {
            "dice": 1.0, "iou": 1.0, "hd95": 0.0, "hd": 0.0, "asd": 0.0, "nsd": 1.0,
        }
        assert (dice(empty, empty), iou(empty, empty)) == (1.0, 1.0)
        assert (hausdorff(empty, empty), hausdorff95(empty, empty), average_surface_distance(empty, empty)) == (
            0.0, 0.0, 0.0,
        )
        assert normalized_surface_dice(empty, empty, 1.0) == 1.0


@pytest.mark.parametrize("empty_side", ["pred", "gt"])
def test_one_empty_gives_zero_overlap_and_nan_distances_without_warnings(empty_side: str) -> None:
    mask, empty = square(), np.zeros((64, 64), dtype=bool)
    pred, gt = (empty, mask) if empty_side == "pred" else (mask, empty)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = segmentation_metrics(pred, gt)
        assert (scores["dice"], scores["iou"], scores["nsd"]) == (0.0, 0.0, 0.0)
        assert all(math.isnan(scores[key]) for key in ("hd95", "hd", "asd"))
        assert math.isnan(hausdorff(pred, gt))
        assert math.isnan(hausdorff95(pred, gt))
        assert math.isnan(average_surface_distance(pred, gt))
        assert normalized_surface_dice(pred, gt, 2.0) == 0.0
        assert dice(pred, gt) == 0.0


def test_no_warning_on_ordinary_masks() -> None:
    gt = square()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        segmentation_metrics(np.roll(gt, 2, axis=0), gt, spacing=(0.7, 0.7))


# ------------------------------------------------------------------------------------------------ input checks


@pytest.mark.parametrize(
    "metric",
    [dice, iou, hausdorff, hausdorff95, average_surface_distance, segmentation_metrics, soft_dice,
     aggregated_jaccard_index, object_f1, object_dice],
)
def test_shape_mismatch_raises_input_error_naming_the_shapes(metric) -> None:
    with pytest.raises(InputError, match=r"\(4, 5\).*\(4, 6\)"):
        metric(np.zeros((4, 5), dtype=bool), np.zeros((4, 6), dtype=bool))


def test_nsd_shape_mismatch_and_bad_tolerance() -> None:
    with pytest.raises(InputError, match="shape"):
        normalized_surface_dice(np.zeros((4, 5), dtype=bool), np.zeros((5, 4), dtype=bool), 1.0)
    with pytest.raises(InputError, match="tolerance"):
        normalized_surface_dice(square(), square(), -1.0)


def test_float_masks_bad_spacing_and_bad_labels_are_refused() -> None:
    with pytest.raises(InputError, match="float"):
        dice(np.full((3, 3), 0.7), np.ones((3, 3), dtype=bool))
    with pytest.raises(InputError, match="spacing"):
        hausdorff(square(), square(), spacing=(1.0,))
    with pytest.raises(InputError, match="negative"):
        aggregated_jaccard_index(np.full((3, 3), -1), np.ones((3, 3), dtype=int))
    with pytest.raises(InputError, match="2D or 3D"):
        hausdorff(np.ones(5, dtype=bool), np.ones(5, dtype=bool))


# ------------------------------------------------------------------------------------------------ crop invariance


def _random_blobs(rng: np.random.Generator, shape: tuple[int, ...], count: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for _ in range(count):
        corner = [int(rng.integers(-3, n - 2)) for n in shape]  # may start before or run past the border
        size = [int(rng.integers(1, max(2, n // 3))) for n in shape]
        mask[tuple(slice(max(c, 0), c + s) for c, s in zip(corner, size))] = True
    return mask


def _uncropped(pred: np.ndarray, gt: np.ndarray, spacing, tolerance: float) -> dict[str, float]:
    """MONAI on the whole image, as the COSMOS code calls it."""
    p, g = torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None]
    kw = {"include_background": True, "spacing": None if spacing is None else [tuple(spacing)]}
    return {
        "hd95": compute_hausdorff_distance(p, g, percentile=95, **kw).item(),
        "hd": compute_hausdorff_distance(p, g, **kw).item(),
        "asd": compute_average_surface_distance(p, g, symmetric=True, **kw).item(),
        "nsd": compute_surface_dice(p, g, class_thresholds=[tolerance], **kw).item(),
    }


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("seed", range(12))
def test_cropping_gives_the_uncropped_numbers(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (40, 56) if seed % 3 else (14, 18, 12)
    spacing = None if seed % 2 else tuple(float(v) for v in rng.uniform(0.3, 2.5, len(shape)))
    pred = _random_blobs(rng, shape, int(rng.integers(1, 4)))
    gt = _random_blobs(rng, shape, int(rng.integers(1, 4)))
    assert pred.any() and gt.any()
    cropped = segmentation_metrics(pred, gt, spacing=spacing, nsd_tolerance=1.5)
    reference = _uncropped(pred, gt, spacing, 1.5)
    for key, value in reference.items():
        assert cropped[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    assert cropped["hd"] > 0  # random blobs do not coincide: the comparison is not 0 == 0


def _random_pair(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A gt of random blobs and a pred that is either independent blobs or gt shifted, grown or shrunk, then
    speckled, so that many edge distances fall near the NSD tolerances, not only far beyond them."""
    gt = _random_blobs(rng, shape, int(rng.integers(1, 4)))
    if rng.random() < 0.3:
        pred = _random_blobs(rng, shape, int(rng.integers(1, 4)))
    else:
        pred = np.roll(gt, tuple(int(v) for v in rng.integers(-2, 3, gt.ndim)), axis=tuple(range(gt.ndim)))
        if rng.random() < 0.5:
            pred = binary_dilation(pred, iterations=int(rng.integers(1, 3)))
        pred ^= rng.random(shape) < 0.01
    return pred, gt


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_one_pass_of_edge_distances_gives_monais_own_numbers() -> None:
    """Every number of segmentation_metrics (and of the one-metric functions) against MONAI's compute_* on the
    uncropped arrays, for 2D and 3D pairs, with and without (anisotropic) spacing and at several tolerances."""
    rng = np.random.default_rng(2024)
    tolerances = (0.0, 1.0, math.sqrt(2), 1.5, 2.0, 3.7)
    partial_nsd = 0
    for case in range(20):
        shape = (int(rng.integers(20, 90)), int(rng.integers(20, 90))) if case % 4 else tuple(
            int(v) for v in rng.integers(8, 24, 3)
        )
        spacing = None if case % 2 else tuple(float(v) for v in rng.uniform(0.3, 2.5, len(shape)))
        tolerance = tolerances[case % len(tolerances)]
        pred, gt = _random_pair(rng, shape)
        while not (pred.any() and gt.any()):
            pred, gt = _random_pair(rng, shape)
        scores = segmentation_metrics(pred, gt, spacing=spacing, nsd_tolerance=tolerance)
        reference = _uncropped(pred, gt, spacing, tolerance)
        p, g = torch.from_numpy(pred)[None, None].float(), torch.from_numpy(gt)[None, None].float()
        reference["dice"] = compute_dice(p, g, include_background=True).item()
        reference["iou"] = compute_iou(p, g, include_background=True).item()
        assert scores.keys() == reference.keys()
        for key, value in reference.items():
            assert scores[key] == pytest.approx(value, rel=1e-6, abs=1e-6), (case, key)
        single = {
            "hd95": hausdorff95(pred, gt, spacing),
            "hd": hausdorff(pred, gt, spacing),
            "asd": average_surface_distance(pred, gt, spacing),
            "nsd": normalized_surface_dice(pred, gt, tolerance, spacing),
        }
        assert single == {key: scores[key] for key in single}, case
        assert scores["hd"] > 0, case  # the masks differ: the comparison is not 0 == 0
        partial_nsd += 0 < scores["nsd"] < 1
    assert partial_nsd >= 10  # most tolerances cut through the distances, so NSD is not just 0 or 1


# ------------------------------------------------------------------------------------------------ instances


def _aji_example() -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((8, 8), dtype=np.int32)
    gt[0:2, 0:4] = 1  # G1, 8 px
    gt[4:6, 0:2] = 2  # G2, 4 px
    gt[4:6, 4:6] = 5  # G3, 4 px, overlapped by nothing
    pred = np.zeros((8, 8), dtype=np.int32)
    pred[0:2, 0:2] = 3  # P1, 4 px inside G1: IoU 4/8
    pred[0:2, 2:5] = 7  # P2, 6 px, 4 of them in G1: IoU 4/10, loses G1 to P1
    pred[4:6, 0:3] = 9  # P3, 6 px covering G2: IoU 4/6
    pred[7, 6:8] = 12  # P4, 2 px, overlaps nothing
    return pred, gt


def test_aji_by_hand_with_unused_and_unmatched_objects() -> None:
    pred, gt = _aji_example()
    # numerator: |G1∩P1| + |G2∩P3| = 4 + 4
    # denominator: |G1∪P1| + |G2∪P3| + |G3| + |P2| + |P4| = 8 + 6 + 4 + 6 + 2
    assert aggregated_jaccard_index(pred, gt) == pytest.approx(8 / 26)


def test_aji_counts_a_merged_prediction_once_per_gt_object() -> None:
    gt = np.zeros((2, 5), dtype=np.int32)
    gt[:, 0:2], gt[:, 3:5] = 1, 2  # 4 px each
    pred = np.ones((2, 5), dtype=np.int32)  # one object of 10 px over both
    assert aggregated_jaccard_index(pred, gt) == pytest.approx((4 + 4) / (10 + 10))


def test_object_f1_with_a_false_positive_and_a_miss() -> None:
    gt = np.zeros((10, 10), dtype=np.int32)
    gt[0:2, 0:2] = 1  # found exactly
    gt[0:2, 4:8] = 2  # found with IoU 6/8
    gt[5:7, 0:4] = 3  # missed: its prediction has IoU 2/8
    pred = np.zeros((10, 10), dtype=np.int32)
    pred[0:2, 0:2] = 1
    pred[0:2, 4:7] = 2
    pred[5:7, 0:1] = 3
    pred[9, 9] = 4  # false positive
    assert object_f1(pred, gt) == ObjectF1(precision=2 / 4, recall=2 / 3, f1=2 * 2 / (4 + 3))
    low = object_f1(pred, gt, iou_threshold=0.2)
    assert low == pytest.approx((3 / 4, 3 / 3, 2 * 3 / (4 + 3)))


def test_object_f1_matches_one_to_one_at_exactly_half() -> None:
    gt = np.zeros((2, 4), dtype=np.int32)
    gt[:] = 1  # 8 px
    pred = np.zeros((2, 4), dtype=np.int32)
    pred[:, 0:2], pred[:, 2:4] = 1, 2  # two halves, IoU 0.5 each: only one may count
    assert object_f1(pred, gt) == pytest.approx((1 / 2, 1 / 1, 2 * 1 / 3))


def test_object_dice_by_hand() -> None:
    gt = np.zeros((8, 8), dtype=np.int32)
    gt[0:2, 0:2] = 1  # G1, 4 px
    gt[4:6, 4:6] = 2  # G2, 4 px, overlapped by nothing
    pred = np.zeros((8, 8), dtype=np.int32)
    pred[0:2, 0:3] = 1  # S1, 6 px over G1: Dice 2*4/(4+6) = 0.8
    pred[7, 0:2] = 2  # S2, 2 px, overlaps nothing
    gt_side = (4 * 0.8 + 4 * 0.0) / 8
    pred_side = (6 * 0.8 + 2 * 0.0) / 8
    assert object_dice(pred, gt) == pytest.approx(0.5 * (gt_side + pred_side))


def test_object_dice_takes_the_largest_overlap_not_the_best_iou() -> None:
    gt = np.zeros((1, 20), dtype=np.int32)
    gt[0, 0:6] = 1  # G, 6 px
    pred = np.zeros((1, 20), dtype=np.int32)
    pred[0, 0:2] = 1  # S1, 2 px inside G: IoU 2/6, Dice 2*2/(6+2)
    pred[0, 2:20] = 2  # S2, 18 px, 4 inside G: IoU 4/20, Dice 2*4/(6+18), but the larger overlap
    gt_side = 1.0 * (8 / 24)  # G is paired with S2
    pred_side = (2 * (4 / 8) + 18 * (8 / 24)) / 20
    assert object_dice(pred, gt) == pytest.approx(0.5 * (gt_side + pred_side))


def test_identical_label_images_score_one_and_empty_rules_hold() -> None:
    pred, gt = _aji_example()
    assert aggregated_jaccard_index(gt, gt) == 1.0
    assert object_dice(gt, gt) == 1.0
    assert object_f1(gt, gt) == (1.0, 1.0, 1.0)
    none = np.zeros_like(gt)
    assert (aggregated_jaccard_index(none, none), object_dice(none, none)) == (1.0, 1.0)
    assert object_f1(none, none) == (1.0, 1.0, 1.0)
    assert (aggregated_jaccard_index(none, gt), aggregated_jaccard_index(pred, none)) == (0.0, 0.0)
    assert (object_dice(none, gt), object_dice(pred, none)) == (0.0, 0.0)
    assert object_f1(none, gt) == (0.0, 0.0, 0.0)


def _brute_force_aji(pred: np.ndarray, gt: np.ndarray) -> float:
    """Kumar et al.'s loop over objects, written plainly."""
    inter_sum = union_sum = 0
    used: set[int] = set()
    for g_id in np.unique(gt[gt > 0]):
        g = gt == g_id
        best_iou, best = 0.0, None
        for p_id in np.unique(pred[pred > 0]):
            p = pred == p_id
            score = (g & p).sum() / (g | p).sum()
            if score > best_iou:
                best_iou, best = score, p_id
        if best is None:
            union_sum += g.sum()
        else:
            p = pred == best
            inter_sum += (g & p).sum()
            union_sum += (g | p).sum()
            used.add(int(best))
    union_sum += sum((pred == p_id).sum() for p_id in np.unique(pred[pred > 0]) if int(p_id) not in used)
    return inter_sum / union_sum


@pytest.mark.parametrize("seed", range(6))
def test_aji_matches_a_brute_force_loop_on_random_labels(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    gt = label_instances(_random_blobs(rng, (48, 48), 8), connectivity=1)
    pred = label_instances(_random_blobs(rng, (48, 48), 8), connectivity=1) * 3  # sparse, non-consecutive ids
    assert gt.max() > 1 and pred.max() > 3
    assert aggregated_jaccard_index(pred, gt) == pytest.approx(_brute_force_aji(pred, gt))


def test_label_instances_connectivity() -> None:
    mask = np.zeros((4, 4), dtype=bool)
    mask[0:2, 0:2] = True
    mask[2:4, 2:4] = True  # touches the first square only at a corner
    assert label_instances(mask).max() == 1  # 8-connected: one object
    four = label_instances(mask, connectivity=1)
    assert four.max() == 2
    assert four[0, 0] != four[3, 3] and four[0, 0] > 0 and four[3, 3] > 0
    with pytest.raises(InputError, match="connectivity"):
        label_instances(mask, connectivity=3)


def test_instance_metrics_on_a_monuseg_sized_tile() -> None:
    gt = np.zeros((1000, 1000), dtype=np.int32)
    rows, cols = np.divmod(np.arange(500), 25)  # 500 nuclei on a 20 x 25 grid, 16 x 10 px each
    for i, (r, c) in enumerate(zip(rows, cols), start=1):
        gt[r * 50 : r * 50 + 16, c * 40 : c * 40 + 10] = i
    pred = np.roll(gt, 2, axis=1)  # each nucleus shifted 2 px: IoU 8*16 / (12*16) = 2/3
    pred[pred > 0] += 1000
    assert aggregated_jaccard_index(pred, gt) == pytest.approx(2 / 3)
    assert object_f1(pred, gt) == (1.0, 1.0, 1.0)
    assert object_dice(pred, gt) == pytest.approx(2 * 8 / 20)


def test_grouped_bootstrap_resamples_whole_images():
    # two images, 50 objects each: one image gains 0.2 everywhere, the other loses 0.1; objects of
    # one image move together, so with only two images the interval must span both image means
    differences = np.array([0.2] * 50 + [-0.1] * 50)
    images = ["a"] * 50 + ["b"] * 50
    mean, low, high = paired_bootstrap(differences, groups=images)
    assert mean == pytest.approx(0.05)
    assert low == pytest.approx(-0.1) and high == pytest.approx(0.2)
    _, naive_low, naive_high = paired_bootstrap(differences)  # objects as independent: far too narrow
    assert naive_high - naive_low < 0.1
    assert np.isnan(paired_bootstrap(np.array([]))[0])


@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=2, max_size=40))
def test_pixel_auroc_is_the_share_of_foreground_background_pairs_ranked_right_ties_half(pixels):
    scores = np.array([float(score) for score, _ in pixels])
    truth = np.array([label for _, label in pixels])
    positives, negatives = scores[truth], scores[~truth]
    if positives.size == 0 or negatives.size == 0:
        assert math.isnan(pixel_auroc(scores, truth))
        return
    pairs = positives[:, None] - negatives[None, :]
    expected = (np.count_nonzero(pairs > 0) + 0.5 * np.count_nonzero(pairs == 0)) / pairs.size
    assert pixel_auroc(scores, truth) == pytest.approx(expected, abs=1e-12)


def test_boundary_f_score_counts_boundary_pixels_within_the_tolerance():
    truth = np.zeros((40, 40), bool)
    truth[10, 5:35] = True  # a horizontal boundary line of 30 px
    assert boundary_f_score(truth, truth) == 1.0
    assert boundary_f_score(np.roll(truth, 2, axis=0), truth, tolerance=2) == 1.0
    assert boundary_f_score(np.roll(truth, 3, axis=0), truth, tolerance=2) == 0.0
    half = truth.copy()
    half[10, 20:35] = False  # every predicted pixel right (precision 1); true ones found: 15 + the 2 within 2 px
    recall = 17 / 30
    assert boundary_f_score(half, truth) == pytest.approx(2 * recall / (1 + recall))
    assert boundary_f_score(np.zeros_like(truth), np.zeros_like(truth)) == 1.0
    assert boundary_f_score(np.zeros_like(truth), truth) == 0.0
    with pytest.raises(InputError, match="tolerance"):
        boundary_f_score(truth, truth, tolerance=-1)
