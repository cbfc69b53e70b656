"""Segmentation metrics of the COSMOS SAM-evaluation study and of SAMAug: overlap, surface distance, instances.

Surface distances come from MONAI (its edge extraction and KD-tree), called on the masks cut to the bounding box of
``pred | gt``: one call of ``get_edge_surface_distance`` gives the distances of each mask's edge pixels to the other
mask's edge, and hd95, hd, asd and nsd are all read off them, with the definitions of MONAI's ``compute_*``
functions (which would each find the edges and build the KD-trees again). What MONAI lacks (soft Dice, the
instance scores, the empty-mask rules) is written here.

Empty-mask rules, the same for every metric, and applied before MONAI is called (it would warn and return inf/nan):

* both masks empty: the prediction is right, so Dice = IoU = NSD = 1 and every distance is 0;
* exactly one empty: Dice = IoU = NSD = 0 and every distance is ``nan``, because a distance to nothing is
  undefined (averaging code should skip it, not read it as 0 or as a huge number).

The instance scores follow the same rule: both label images without objects score 1, exactly one without scores 0.
Distances are in pixels when ``spacing`` is None and in the units of ``spacing`` (mm) when it is given.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from monai.metrics.utils import get_edge_surface_distance
from scipy.ndimage import distance_transform_edt
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching
from scipy.stats import mannwhitneyu

from sam4med.engine.errors import InputError
from sam4med.engine.objects import connected_components

_BOTH_EMPTY = {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "hd": 0.0, "asd": 0.0, "nsd": 1.0}
_ONE_EMPTY = {"dice": 0.0, "iou": 0.0, "hd95": math.nan, "hd": math.nan, "asd": math.nan, "nsd": 0.0}
_CROP_MARGIN = 1  # MONAI finds edges by erosion, which looks one pixel out: keep one background pixel around

_Spacing = tuple[float, ...] | None


# ---------------------------------------------------------------------------------------------- input checks


def _check_shapes(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise InputError(f"pred shape {pred.shape} does not match gt shape {gt.shape}")


def _binary(name: str, mask: np.ndarray) -> np.ndarray:
    """A bool mask; floats are refused because silently thresholding probabilities at 0 would be wrong."""
    array = np.asarray(mask)
    if array.dtype.kind not in "biu":
        raise InputError(f"{name} must be a bool or integer mask, got dtype {array.dtype} (threshold it first)")
    return array.astype(bool, copy=False)


def _mask_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = _binary("pred", pred), _binary("gt", gt)
    _check_shapes(p, g)
    return p, g


def _surface_inputs(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray, _Spacing]:
    """Validated masks and spacing for the distance metrics, which MONAI defines on 2D and 3D images only."""
    p, g = _mask_pair(pred, gt)
    if p.ndim not in (2, 3):
        raise InputError(f"surface distances need 2D or 3D masks, got shape {p.shape}")
    if spacing is None:
        return p, g, None
    values = tuple(float(s) for s in spacing)
    if len(values) != p.ndim or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"spacing {tuple(spacing)} must hold {p.ndim} positive numbers, one per axis")
    return p, g, values


def _check_tolerance(tolerance: float) -> None:
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise InputError(f"tolerance {tolerance}: must be a finite number of pixels >= 0")


# ---------------------------------------------------------------------------------------------- binary masks


def _empty_case(pred: np.ndarray, gt: np.ndarray) -> dict[str, float] | None:
    """The fixed values of the empty-mask rules, or None when both masks have foreground."""
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if has_pred and has_gt:
        return None
    return _ONE_EMPTY if has_pred or has_gt else _BOTH_EMPTY


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(gt))
    return 2.0 * int(np.count_nonzero(pred & gt)) / total if total else _BOTH_EMPTY["dice"]


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = int(np.count_nonzero(pred | gt))
    return int(np.count_nonzero(pred & gt)) / union if union else _BOTH_EMPTY["iou"]


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice 2|P∩G|/(|P|+|G|) of two masks of any dimension; counted in numpy, as exact integers."""
    return _dice(*_mask_pair(pred, gt))


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Jaccard index |P∩G|/|P∪G| of two masks of any dimension."""
    return _iou(*_mask_pair(pred, gt))


def soft_dice(prob: np.ndarray, gt: np.ndarray, eps: float = 1e-6) -> float:
    """Dice on probabilities without thresholding, 2Σpg/(Σp+Σg), as the SAMAug authors report it.

    ``eps`` is added above and below so that an all-zero map on an empty mask scores 1, like :func:`dice`.
    """
    p = np.asarray(prob, dtype=np.float64)
    g = _binary("gt", gt)
    _check_shapes(p, g)
    if not np.all((p >= 0) & (p <= 1)):
        raise InputError("prob must hold probabilities in [0, 1] (apply a sigmoid to logits first)")
    return float((2.0 * p[g].sum() + eps) / (p.sum() + np.count_nonzero(g) + eps))


def pixel_auroc(scores: np.ndarray, gt: np.ndarray) -> float:
    """Area under the ROC curve of a score map against a mask, over pixels: the chance that a foreground pixel
    scores above a background one (ties count half), from the Mann-Whitney U statistic. ``nan`` when the mask
    is all foreground or all background (no pair to rank). Threshold-free, so it reads a prior map that was
    never meant to be a probability (SAMAug's summed mask weights)."""
    values = np.asarray(scores, dtype=np.float64)
    g = _binary("gt", gt)
    _check_shapes(values, g)
    positives, negatives = values[g], values[~g]
    if positives.size == 0 or negatives.size == 0:
        return math.nan
    return float(mannwhitneyu(positives, negatives, method="asymptotic").statistic / (positives.size * negatives.size))


def boundary_f_score(pred_boundary: np.ndarray, gt_boundary: np.ndarray, tolerance: float = 2.0) -> float:
    """F-score of boundary pixels (the BF score of Csurka et al.): precision = predicted boundary pixels within
    ``tolerance`` px of a true one, recall = true boundary pixels within ``tolerance`` of a predicted one. Both
    maps empty score 1, one empty 0, as the other metrics here."""
    p, g = _mask_pair(pred_boundary, gt_boundary)
    _check_tolerance(tolerance)
    if (fixed := _empty_case(p, g)) is not None:
        return fixed["dice"]
    precision = float(np.mean(distance_transform_edt(~g)[p] <= tolerance))
    recall = float(np.mean(distance_transform_edt(~p)[g] <= tolerance))
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _crop_to_union(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the union's bounding box plus a margin, which leaves surface distances unchanged.

    Distances between edge pixels do not move with a translation, and the margin keeps a background pixel beside
    every edge; where the box meets the image border MONAI's erosion treats the outside as background either way.
    The crop spares converting and scanning the whole image for each of the ~10 predictions per image.
    """
    union = pred | gt
    box = []
    for axis in range(union.ndim):
        hits = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - _CROP_MARGIN, 0), int(hits[-1]) + _CROP_MARGIN + 1))
    return pred[tuple(box)], gt[tuple(box)]


class _SurfaceDistances(NamedTuple):
    """MONAI's float32 distances from each edge pixel of one mask to the nearest edge pixel of the other."""

    pred_to_gt: torch.Tensor  # (n_pred_edge,)
    gt_to_pred: torch.Tensor  # (n_gt_edge,)


def _surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: _Spacing) -> _SurfaceDistances:
    """Both directions' edge distances of two masks that both have foreground, already cut by :func:`_crop_to_union`.

    This is the step every MONAI ``compute_*`` surface metric starts with (edges by erosion, without subvoxels, and
    a KD-tree per direction); the metrics below only reduce its output. MONAI 1.5-1.6 passes its own deprecated
    ``always_return_as_numpy`` internally; that FutureWarning says nothing about our call, so only it is silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        _, (pred_to_gt, gt_to_pred), _ = get_edge_surface_distance(
            torch.from_numpy(np.ascontiguousarray(pred)),
            torch.from_numpy(np.ascontiguousarray(gt)),
            spacing=spacing,
            symmetric=True,
        )
    return _SurfaceDistances(pred_to_gt, gt_to_pred)


def _hd95(d: _SurfaceDistances) -> float:
    """MONAI's compute_hausdorff_distance(percentile=95, directed=False): the larger directed 95th percentile.

    ``torch.quantile`` runs on MONAI's float32 distances as MONAI runs it, so the interpolation matches exactly.
    """
    return float(max(torch.quantile(d.pred_to_gt, 0.95).item(), torch.quantile(d.gt_to_pred, 0.95).item()))


def _hd(d: _SurfaceDistances) -> float:
    """MONAI's compute_hausdorff_distance(percentile=None, directed=False): the largest distance either way."""
    return float(max(d.pred_to_gt.max().item(), d.gt_to_pred.max().item()))


def _asd(d: _SurfaceDistances) -> float:
    """MONAI's compute_average_surface_distance(symmetric=True): the mean over both directions' distances together.

    Summed in float64, so that a long edge does not lose precision to float32 accumulation.
    """
    both = torch.cat((d.pred_to_gt, d.gt_to_pred)).to(torch.float64)
    return float(both.mean().item())


def _nsd(d: _SurfaceDistances, tolerance: float) -> float:
    """MONAI's compute_surface_dice without subvoxels: edge pixels within ``tolerance`` over all edge pixels.

    The float32 distances are compared with the tolerance as MONAI compares them; the counts are exact integers.
    """
    within = int(torch.count_nonzero(d.pred_to_gt <= tolerance)) + int(torch.count_nonzero(d.gt_to_pred <= tolerance))
    return within / (d.pred_to_gt.numel() + d.gt_to_pred.numel())


def _distances(pred: np.ndarray, gt: np.ndarray, spacing: _Spacing, tolerance: float) -> dict[str, float]:
    """hd95, hd, asd and nsd of two non-empty cropped masks, from one set of edge distances."""
    d = _surface_distances(pred, gt, spacing)
    return {"hd95": _hd95(d), "hd": _hd(d), "asd": _asd(d), "nsd": _nsd(d, tolerance)}


def _one_distance(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None,
    key: str,
    reduce: Callable[[_SurfaceDistances], float],
) -> float:
    """One surface metric: validation, the empty-mask rule for ``key``, else ``reduce`` of the edge distances."""
    p, g, s = _surface_inputs(pred, gt, spacing)
    if (fixed := _empty_case(p, g)) is not None:
        return fixed[key]
    return reduce(_surface_distances(*_crop_to_union(p, g), s))


def hausdorff95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile Hausdorff distance (max of the two directed percentiles): robust to a few stray pixels."""
    return _one_distance(pred, gt, spacing, "hd95", _hd95)


def hausdorff(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Hausdorff distance (the maximum): the worst boundary error, however few pixels make it."""
    return _one_distance(pred, gt, spacing, "hd", _hd)


def average_surface_distance(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Symmetric average surface distance: the mean over the edge pixels of both masks of the distance to the other."""
    return _one_distance(pred, gt, spacing, "asd", _asd)


def normalized_surface_dice(
    pred: np.ndarray, gt: np.ndarray, tolerance: float, spacing: Sequence[float] | None = None
) -> float:
    """Normalized surface Dice: the share of both masks' edge pixels lying within ``tolerance`` of the other edge.

    It forgives boundary errors below the tolerance (an annotator's own variability), which Dice and HD do not.
    """
    _check_tolerance(tolerance)
    return _one_distance(pred, gt, spacing, "nsd", lambda d: _nsd(d, tolerance))


def segmentation_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None, nsd_tolerance: float = 2.0
) -> dict[str, float]:
    """The per-object record of the benchmark: dice, iou, hd95, hd, asd and nsd (at ``nsd_tolerance``).

    Validates, crops and finds the edge distances once for all six, so it is the call to use when more than one
    metric is wanted.
    """
    _check_tolerance(nsd_tolerance)
    p, g, s = _surface_inputs(pred, gt, spacing)
    if (fixed := _empty_case(p, g)) is not None:
        return dict(fixed)
    p, g = _crop_to_union(p, g)  # the box holds every foreground pixel, so the overlap counts do not change
    return {"dice": _dice(p, g), "iou": _iou(p, g), **_distances(p, g, s, nsd_tolerance)}


# ---------------------------------------------------------------------------------------------- instances


def label_instances(mask: np.ndarray, connectivity: int = 2) -> np.ndarray:
    """Connected components of a mask as a label image (0 = background), to score a semantic mask per object.

    ``connectivity`` counts the axes a neighbour may differ in: 2 is 8-connectivity in 2D, 1 is 4-connectivity.
    """
    m = _binary("mask", mask)
    if not 1 <= connectivity <= m.ndim:
        raise InputError(f"connectivity must be between 1 and {m.ndim} for a {m.ndim}D mask, got {connectivity}")
    return connected_components(m, connectivity=connectivity)


class _Overlaps(NamedTuple):
    """Sparse contingency table of two label images: object areas and every overlapping (gt, pred) pair."""

    gt_areas: np.ndarray  # (n_gt,) pixels per gt object, in increasing id order
    pred_areas: np.ndarray  # (n_pred,)
    gt_index: np.ndarray  # (n_pairs,) row into gt_areas of each overlapping pair
    pred_index: np.ndarray  # (n_pairs,) row into pred_areas
    inter: np.ndarray  # (n_pairs,) pixels the pair shares

    @property
    def union(self) -> np.ndarray:
        return self.gt_areas[self.gt_index] + self.pred_areas[self.pred_index] - self.inter

    @property
    def pair_iou(self) -> np.ndarray:
        return self.inter / self.union


def _labels(name: str, labels: np.ndarray) -> np.ndarray:
    array = np.asarray(labels)
    if array.dtype.kind not in "biu":
        raise InputError(f"{name} must be an integer label image, got dtype {array.dtype}")
    if array.dtype.kind == "i" and array.size and array.min() < 0:
        raise InputError(f"{name} has negative labels; use 0 for background and positive ids for objects")
    return array


def _overlaps(pred_labels: np.ndarray, gt_labels: np.ndarray) -> _Overlaps:
    """One pass of sorting over foreground pixels instead of an n_gt x n_pred x pixels loop."""
    p, g = _labels("pred_labels", pred_labels), _labels("gt_labels", gt_labels)
    _check_shapes(p, g)
    gt_fg, pred_fg = g > 0, p > 0
    gt_ids, gt_areas = np.unique(g[gt_fg], return_counts=True)
    pred_ids, pred_areas = np.unique(p[pred_fg], return_counts=True)
    both = gt_fg & pred_fg
    n_pred = max(len(pred_ids), 1)
    keys = np.searchsorted(gt_ids, g[both]).astype(np.int64) * n_pred + np.searchsorted(pred_ids, p[both])
    pair_keys, inter = np.unique(keys, return_counts=True)
    return _Overlaps(gt_areas, pred_areas, pair_keys // n_pred, pair_keys % n_pred, inter)


def _empty_instances(overlaps: _Overlaps) -> float | None:
    """1 when neither image has objects, 0 when exactly one has, None when both have (the empty-mask rule)."""
    n_gt, n_pred = len(overlaps.gt_areas), len(overlaps.pred_areas)
    if n_gt and n_pred:
        return None
    return 0.0 if n_gt or n_pred else 1.0


def _best_pairs(group: np.ndarray, score: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Index of the top-scoring pair of each group; ties go to the lowest other id, as an argmax over ids would."""
    order = np.lexsort((other, -score, group))
    grouped = group[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = grouped[1:] != grouped[:-1]
    return order[first]


def aggregated_jaccard_index(pred_labels: np.ndarray, gt_labels: np.ndarray) -> float:
    """AJI (Kumar et al. 2017): Jaccard pooled over objects, penalising both merges and spurious objects.

    Each gt object takes the predicted object of highest IoU (its intersection goes above, its union below);
    a gt object overlapping nothing adds its area below, and so does every predicted object no gt object took.
    """
    ov = _overlaps(pred_labels, gt_labels)
    if (fixed := _empty_instances(ov)) is not None:
        return fixed
    best = _best_pairs(ov.gt_index, ov.pair_iou, ov.pred_index)
    matched_gt, used_pred = ov.gt_index[best], np.unique(ov.pred_index[best])
    unmatched_gt_area = ov.gt_areas.sum() - ov.gt_areas[matched_gt].sum()
    unused_pred_area = ov.pred_areas.sum() - ov.pred_areas[used_pred].sum()
    return float(ov.inter[best].sum() / (ov.union[best].sum() + unmatched_gt_area + unused_pred_area))


class ObjectF1(NamedTuple):
    """Detection scores of predicted objects against gt objects."""

    precision: float
    recall: float
    f1: float


def object_f1(pred_labels: np.ndarray, gt_labels: np.ndarray, iou_threshold: float = 0.5) -> ObjectF1:
    """Object precision, recall and F1, an object pair matching when its IoU reaches ``iou_threshold``.

    Matches are one-to-one: the largest such matching is taken (above 0.5 every candidate pair is already unique;
    at exactly 0.5 or below an object can have two candidates). Zero denominators follow the empty rule.
    """
    if not 0 < iou_threshold <= 1:
        raise InputError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    ov = _overlaps(pred_labels, gt_labels)
    if (fixed := _empty_instances(ov)) is not None:
        return ObjectF1(fixed, fixed, fixed)
    candidate = ov.pair_iou >= iou_threshold
    n_gt, n_pred = len(ov.gt_areas), len(ov.pred_areas)
    graph = csr_matrix(
        (np.ones(np.count_nonzero(candidate)), (ov.gt_index[candidate], ov.pred_index[candidate])),
        shape=(n_gt, n_pred),
    )
    true_positives = int(np.count_nonzero(maximum_bipartite_matching(graph, perm_type="column") >= 0))
    return ObjectF1(true_positives / n_pred, true_positives / n_gt, 2.0 * true_positives / (n_gt + n_pred))


def object_dice(pred_labels: np.ndarray, gt_labels: np.ndarray) -> float:
    """Object-level Dice of the GlaS challenge (Sirinukunwattana et al. 2017), area-weighted from both sides.

    0.5 * (Σ_i w_i Dice(G_i, S*(G_i)) + Σ_j w~_j Dice(G*(S_j), S_j)), where S*(G_i) is the predicted object
    overlapping G_i most (Dice 0 when none does), G*(S_j) likewise, and the weights are the objects' shares of area.
    """
    ov = _overlaps(pred_labels, gt_labels)
    if (fixed := _empty_instances(ov)) is not None:
        return fixed
    pair_dice = 2.0 * ov.inter / (ov.gt_areas[ov.gt_index] + ov.pred_areas[ov.pred_index])
    for_gt = _best_pairs(ov.gt_index, ov.inter, ov.pred_index)
    for_pred = _best_pairs(ov.pred_index, ov.inter, ov.gt_index)
    gt_term = (ov.gt_areas[ov.gt_index[for_gt]] * pair_dice[for_gt]).sum() / ov.gt_areas.sum()
    pred_term = (ov.pred_areas[ov.pred_index[for_pred]] * pair_dice[for_pred]).sum() / ov.pred_areas.sum()
    return float(0.5 * (gt_term + pred_term))


def paired_bootstrap(differences: np.ndarray, groups: Sequence[object] | None = None, resamples: int = 10000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean of paired differences and its percentile bootstrap 95% interval.

    With ``groups`` (e.g. the image of each object) whole groups are resampled: objects of one image
    are not independent, and resampling them one by one would give too narrow an interval.
    """
    differences = np.asarray(differences, dtype=float)
    if differences.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    if groups is None:
        means = differences[rng.integers(0, differences.size, (resamples, differences.size))].mean(axis=1)
    else:
        _, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
        sums, counts = np.bincount(index, differences), np.bincount(index)
        picks = rng.integers(0, sums.size, (resamples, sums.size))
        means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    return float(differences.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def batch_dice(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Dice of each thresholded logit map (B, ...) against its 0/1 target (1 where both are empty):
    validation of trainers on the decoder's low-res frame."""
    pred = logits > 0
    truth = targets > 0.5
    inter = (pred & truth).flatten(1).sum(1).float()
    total = pred.flatten(1).sum(1).float() + truth.flatten(1).sum(1).float()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total)).tolist()
