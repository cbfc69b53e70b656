"""Prompt simulation from ground-truth masks, seeded, with every parameter recorded.

Coordinates are in original image pixels: points are (x, y) pixel indices, boxes are
(x0, y0, x1, y1) with inclusive pixel indices, as ``segment_anything`` takes them.
The samplers follow the published protocols they are named after:

- COSMOS 1050K (Huang et al. 2024): centroid point, stride sampling of k points, negatives
  from the box doubled about its centre, oracle mask selection.
- SAM-Med2D (Cheng et al. 2023): negatives from the whole background, random error clicks,
  mask selected by predicted IoU.
- RITM (Sofiiuk et al. 2022): the next click at the interior point of the largest error region.

``Prompt`` and the mask rules import nothing beyond NumPy: ``sam4med segment`` on ONNX Runtime starts
without PyTorch, SciPy or scikit-image, which the samplers import when first called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from sam4med.engine.errors import InputError, check_number

if TYPE_CHECKING:
    import torch

JitterKind = Literal["corners", "shift", "scale"]
JitterUnit = Literal["px", "percent"]
NegativeRegion = Literal["double_box", "image"]


@dataclass
class Prompt:
    """Points and/or a box for one object; ``labels`` are 1 (foreground) or 0 (background)."""

    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.points is not None:
            self.points = _array(self.points, np.float32, "points", "x y pairs").reshape(-1, 2)
            labels = np.ones(len(self.points)) if self.labels is None else self.labels
            self.labels = _array(labels, np.int64, "point labels", "integers").reshape(-1)
            if len(self.labels) != len(self.points):
                raise InputError(f"{len(self.points)} points but {len(self.labels)} labels")
            if not np.isfinite(self.points).all():
                raise InputError(f"points {self.points.tolist()} must be finite numbers")
            if not np.isin(self.labels, (0, 1)).all():
                raise InputError(f"point labels {self.labels.tolist()} must be 1 (foreground) or 0 (background)")
        if self.box is not None:
            self.box = _array(self.box, np.float32, "box", "four numbers x0 y0 x1 y1").reshape(4)
            if not np.isfinite(self.box).all():
                raise InputError(f"box {self.box.tolist()} must be four finite numbers")
            if self.box[2] < self.box[0] or self.box[3] < self.box[1]:
                raise InputError(f"box {self.box.tolist()} must be x0 y0 x1 y1 with x0 <= x1 and y0 <= y1")
        if self.points is None and self.box is None:
            raise InputError("a prompt needs points, a box, or both")

    @property
    def structure(self) -> str:
        """Prompts decode together in one batch only when their structures match."""
        n_points = 0 if self.points is None else len(self.points)
        return f"box={self.box is not None},points={n_points}"

    def moved(self, dx: float, dy: float) -> Prompt:
        """The same prompt with its points and box moved by (dx, dy): into a tile's frame and back."""
        offset = np.array([dx, dy], dtype=np.float32)
        return Prompt(points=None if self.points is None else self.points + offset, labels=self.labels,
                      box=None if self.box is None else self.box + np.tile(offset, 2))

    def check_inside(self, size: tuple[int, int]) -> None:
        height, width = size
        coords = []
        if self.points is not None:
            coords.append(self.points)
        if self.box is not None:
            coords.append(self.box.reshape(2, 2))
        xy = np.concatenate(coords)
        if (xy < 0).any() or (xy[:, 0] > width - 1).any() or (xy[:, 1] > height - 1).any():
            raise InputError(f"prompt {self.to_record()} reaches outside the {width}x{height} image (pixel indices: "
                             f"x 0..{width - 1}, y 0..{height - 1})")

    def add_point(self, xy: tuple[float, float], label: int) -> Prompt:
        points = np.asarray([xy], dtype=np.float32)
        labels = np.asarray([label])
        if self.points is not None:
            points = np.concatenate([self.points, points])
            labels = np.concatenate([self.labels, labels])
        return Prompt(points, labels, self.box)

    def before_last_point(self) -> Prompt | None:
        """The prompt as it was before its last click (None without clicks, or if that click was all of it)."""
        if self.points is None:
            return None
        if len(self.points) == 1:
            return None if self.box is None else Prompt(box=self.box)
        assert self.labels is not None
        return Prompt(self.points[:-1], self.labels[:-1], self.box)

    def to_record(self) -> dict[str, list]:
        record: dict[str, list] = {}
        if self.points is not None:
            record["points"] = self.points.astype(np.float64).round(2).tolist()  # float32 * 100 overflows near its max
            record["labels"] = self.labels.tolist()
        if self.box is not None:
            record["box"] = self.box.astype(np.float64).round(2).tolist()
        return record


def _array(values: object, dtype: type, what: str, expected: str) -> np.ndarray:
    """``values`` as a numeric array of the shape a prompt part needs, or an InputError."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{what}: expected {expected}") from None
    pairs = expected == "x y pairs"
    if array.ndim > 2 or (pairs and array.size % 2) or (expected.startswith("four") and array.size != 4) \
            or (pairs and array.size == 0):
        raise InputError(f"{what} {array.tolist()}: expected {expected}")
    if dtype is np.int64:  # past int64 a label would wrap round to another number in the message
        if not np.isfinite(array).all() or (array != np.round(array)).any() or (np.abs(array) >= 2.0**63).any():
            raise InputError(f"{what} {array.tolist()}: expected {expected}")
    elif (np.abs(array[np.isfinite(array)]) > float(np.finfo(np.float32).max)).any():  # not shown as inf
        raise InputError(f"{what} {array.tolist()}: expected {expected} within float32 range, as pixels are")
    with np.errstate(invalid="ignore", over="ignore"):  # out-of-range values become inf or garbage labels,
        return array.astype(dtype)  # which the caller's finite and 0/1 checks refuse


# --- points --------------------------------------------------------------------------------
def _pixels(mask: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The foreground pixels (ys, xs) to draw ``k`` points from, or an InputError."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"points per object {k!r}: must be >= 1")
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"a mask of shape {mask.shape}: expected height x width")
    ys, xs = np.nonzero(mask)
    if not len(ys):
        raise InputError("cannot place a point on an empty mask")
    return ys, xs


def centroid_point(mask: np.ndarray) -> tuple[float, float]:
    """Centre of mass (COSMOS); it can fall outside a non-convex object, which COSMOS accepted."""
    from scipy import ndimage

    _pixels(mask)
    y, x = ndimage.center_of_mass(mask)
    return float(round(x)), float(round(y))


def center_point(mask: np.ndarray) -> tuple[float, float]:
    """The interior point farthest from the boundary: always inside the object."""
    from scipy import ndimage

    _pixels(mask)
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return float(x), float(y)


def random_points(mask: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k foreground pixels drawn uniformly (with replacement only when the object is smaller than k)."""
    ys, xs = _pixels(mask, k)
    index = rng.choice(len(ys), size=k, replace=len(ys) < k)
    return np.stack([xs[index], ys[index]], axis=1).astype(np.float32)


def stride_points(mask: np.ndarray, k: int) -> np.ndarray:
    """COSMOS stride sampling: k evenly spaced pixels of the raster-ordered foreground list."""
    ys, xs = _pixels(mask, k)
    index = np.linspace(0, len(ys) - 1, num=k + 2)[1:-1].round().astype(int)
    return np.stack([xs[index], ys[index]], axis=1).astype(np.float32)


def negative_points(
    object_mask: np.ndarray,
    foreground: np.ndarray,
    k: int,
    rng: np.random.Generator,
    region: NegativeRegion = "double_box",
) -> np.ndarray:
    """k background pixels: inside the object's box doubled about its centre (COSMOS) or anywhere
    in the image (SAM-Med2D). ``foreground`` (all objects) is excluded so negatives are true
    background; falls back to the whole image when the doubled box holds no background."""
    background = ~foreground
    if region == "double_box":
        x0, y0, x1, y1 = tight_box(object_mask)
        half_w, half_h = (x1 - x0 + 1), (y1 - y0 + 1)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        window = np.zeros_like(background)
        height, width = background.shape
        window[max(0, int(cy - half_h)) : min(height, int(cy + half_h) + 1),
               max(0, int(cx - half_w)) : min(width, int(cx + half_w) + 1)] = True
        if (background & window).any():
            background = background & window
    if not background.any():
        raise InputError("no background pixel to place a negative point on")
    return random_points(background, k, rng)


# --- boxes ---------------------------------------------------------------------------------
def tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Boxes (N, 4) of masks (N, H, W), x0 y0 x1 y1 inclusive (segment_anything's ``batched_mask_to_box``;
    [0, 0, 0, 0] for an empty mask)."""
    from segment_anything.utils.amg import batched_mask_to_box

    return batched_mask_to_box(masks.bool()).float()


def tight_box(mask: np.ndarray, margin: float = 0) -> np.ndarray:
    """The box of a mask's foreground, grown by ``margin`` pixels and clipped to the image."""
    if not mask.any():
        raise InputError("cannot place a box on an empty mask")
    import torch

    box = tight_boxes(torch.from_numpy(np.ascontiguousarray(mask))[None])[0].numpy()
    if margin:
        height, width = mask.shape
        box = np.clip(box + np.array([-margin, -margin, margin, margin]), 0, [width - 1, height - 1] * 2)
    return box.astype(np.float32)


def jitter_box(
    box: np.ndarray,
    image_size: tuple[int, int],
    rng: np.random.Generator,
    amount: float,
    unit: JitterUnit = "px",
    kind: JitterKind = "corners",
) -> np.ndarray:
    """Perturb a box by up to ``amount`` pixels or percent of its side, clipped to the image.

    ``corners`` moves each coordinate independently (SAM-Med2D's and SAM-UNet's rule, up to 5 px),
    ``shift`` translates the whole box, ``scale`` grows or shrinks it about its centre.
    """
    check_number(amount, "--jitter", minimum=0)
    x0, y0, x1, y1 = (float(v) for v in box)
    width, height = x1 - x0 + 1, y1 - y0 + 1
    limit = np.array([width, height, width, height]) * amount / 100 if unit == "percent" else np.full(4, amount)
    if kind == "corners":
        delta = rng.uniform(-1, 1, size=4) * limit
    elif kind == "shift":
        dx, dy = rng.uniform(-1, 1, size=2) * limit[:2]
        delta = np.array([dx, dy, dx, dy])
    else:
        grow_x, grow_y = rng.uniform(-1, 1, size=2) * limit[:2] / 2
        delta = np.array([-grow_x, -grow_y, grow_x, grow_y])
    jittered = np.array([x0, y0, x1, y1]) + delta
    height_px, width_px = image_size
    jittered[[0, 2]] = np.clip(jittered[[0, 2]], 0, width_px - 1)
    jittered[[1, 3]] = np.clip(jittered[[1, 3]], 0, height_px - 1)
    jittered[2] = max(jittered[2], jittered[0])
    jittered[3] = max(jittered[3], jittered[1])
    return jittered.astype(np.float32)


# --- mask selection --------------------------------------------------------------------------
MASK_RULES = ("single", "auto", "oracle", "iou")


def check_mask_rule(rule: str | None, with_truth: bool = True) -> None:
    """A known mask rule (or None: the model's own); the one check every entry point uses. Without ground truth
    (``with_truth=False``: segmenting a user's image) ``oracle``, which picks the mask closest to the truth, is
    not one."""
    rules = MASK_RULES if with_truth else tuple(r for r in MASK_RULES if r != "oracle")
    if rule is not None and rule not in rules:
        reason = "needs ground truth" if rule in MASK_RULES else "unknown mask rule"
        raise InputError(f"--mask-rule {rule!r}: {reason}; choose one of {', '.join(rules)}")


def wants_multimask(rule: str, prompt: Prompt) -> bool:
    """Whether a prompt is decoded to SAM's 3 masks under a mask rule: always for ``oracle`` and ``iou``,
    never for ``single``, and for ``auto`` only for one lone click, the ambiguous prompt that SAM's
    multi-mask outputs were trained for (SAM's own recommendation)."""
    check_mask_rule(rule)
    if rule == "auto":
        return prompt.box is None and prompt.points is not None and len(prompt.points) == 1
    return rule != "single"


def select_mask(masks: np.ndarray, predicted_iou: np.ndarray, rule: str, gt: np.ndarray | None = None) -> int:
    """Index of the output to keep among a prompt's masks (M, H, W).

    ``oracle``: best Dice against ground truth (COSMOS); ``iou``: highest predicted IoU (SAM-Med2D);
    ``single``: the model's single-mask output, so M must be 1; ``auto``: the highest predicted IoU
    of 3 outputs, or the single one.
    """
    if rule == "single":
        if len(masks) != 1:
            raise InputError(f"mask rule 'single' expects 1 output, got {len(masks)}")
        return 0
    if rule in ("iou", "auto"):
        return int(np.argmax(predicted_iou))
    if rule == "oracle":
        from sam4med.engine.metrics import dice

        if gt is None:
            raise InputError("mask rule 'oracle' needs the ground truth")
        return int(np.argmax([dice(mask, gt) for mask in masks]))
    check_mask_rule(rule)
    raise AssertionError(f"mask rule {rule!r} has no selection")


# --- interactive correction ------------------------------------------------------------------
def error_click(
    pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator, rule: Literal["largest", "random"] = "largest"
) -> tuple[tuple[float, float], int] | None:
    """Next corrective click: ((x, y), label), or None when the prediction is perfect.

    ``largest`` (RITM): the interior point of the largest error region, positive where the
    object was missed and negative on a false positive. ``random`` (SAM-Med2D): a uniformly drawn
    error pixel, labelled by what it should be.
    """
    from sam4med.engine.objects import connected_components

    missed, extra = gt & ~pred, pred & ~gt
    if not (missed.any() or extra.any()):
        return None
    if rule == "random":
        errors = missed | extra
        (x, y), = random_points(errors, 1, rng)
        return (float(x), float(y)), int(gt[int(y), int(x)])
    best: tuple[float, np.ndarray, int] | None = None
    for region, label in ((missed, 1), (extra, 0)):
        labels = connected_components(region)
        if not labels.any():
            continue
        sizes = np.bincount(labels.ravel())[1:]
        largest = int(np.argmax(sizes)) + 1
        if best is None or sizes[largest - 1] > best[0]:
            best = (sizes[largest - 1], labels == largest, label)
    assert best is not None
    return center_point(best[1]), best[2]
