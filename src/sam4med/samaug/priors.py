"""SAMAug prior maps: what SAM's everything mode says about an image, as extra input channels.

SAMAug (Zhang et al., arXiv 2304.11332) runs SAM without prompts and turns its masks into two
maps that a standard segmenter reads alongside the image:

- the segmentation prior: every kept mask adds its weight (its stability score, as in the paper)
  to its pixels, so overlapping masks sum and the map can exceed 1;
- the boundary prior: the thick boundaries of every kept mask, accumulated and binarised.

How a segmenter reads them is in :mod:`sam4med.samaug.inputs`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
from skimage.segmentation import find_boundaries

from sam4med.engine.errors import InputError
from sam4med.engine.everything import EVERYTHING_METHODS, EverythingSettings, ProposedMask, generate_masks
from sam4med.engine.predictor import Predictor
from sam4med.engine.registry import ModelSpec, model_spec
from sam4med.engine.tiling import tile_boxes

Weight = Literal["stability", "iou", "one"]
WEIGHTS: tuple[str, ...] = ("stability", "iou", "one")


def samaug_everything_settings(spec: ModelSpec) -> EverythingSettings:
    """The everything-mode settings SAMAug used, where the model can use them.

    Models whose everything mode is the point grid get the authors' generator: a 32x32 grid, box NMS 0.5,
    predicted IoU >= 0.5 and stability >= 0.95, or the model's own thresholds where its IoU head has
    another scale (``ModelSpec.point_grid_thresholds``). Box-only models (LiteMedSAM) ignore point
    prompts, so they get sam4med's box-proposal mode with its own thresholds.
    """
    if spec.everything_proposals == "points":
        iou, stability = spec.point_grid_thresholds or (0.5, 0.95)
        return EverythingSettings(method="points", points_per_side=32, pred_iou_thresh=iou,
                                  stability_thresh=stability, nms_thresh=0.5)
    return EverythingSettings(method="boxes").resolved(spec)


@dataclass(frozen=True)
class PriorSettings:
    """How masks become priors; recorded with every prior file and every model trained on them."""

    weight: Weight = "stability"
    normalise: bool = False  # divide the segmentation prior by its maximum (the authors do not)
    tile: int | None = None  # everything mode on tiles of at most this many pixels (see engine.tiling.tile_boxes)
    everything: EverythingSettings | None = None  # None: samaug_everything_settings for the model

    def resolved(self, spec: ModelSpec) -> PriorSettings:
        everything = self.everything.resolved(spec) if self.everything else samaug_everything_settings(spec)
        return replace(self, everything=everything)

    def record(self) -> dict[str, object]:
        return asdict(self)


def prior_settings(model: str, weight: str = "stability", normalise: bool = False, tile: int | None = None,
                   region_proposals: int | None = None, method: str = "auto", points_per_side: int | None = None,
                   pred_iou_thresh: float | None = None, stability_thresh: float | None = None) -> PriorSettings:
    """Prior settings for a registered model: SAMAug's generator where its everything mode is the point
    grid; ``method`` points or boxes overrides the model's own choice, and the grid and thresholds given
    override SAMAug's (to try other generators; the priors folder records them)."""
    if weight not in WEIGHTS:
        raise InputError(f"--weight {weight!r}: choose one of {', '.join(WEIGHTS)}")
    if method not in EVERYTHING_METHODS:
        raise InputError(f"--everything-method {method!r}: choose one of {', '.join(EVERYTHING_METHODS)}")
    if tile is not None and tile < 16:
        raise InputError(f"--tile {tile}: must be at least 16 px (or 0 for whole images)")
    if region_proposals is not None and region_proposals < 1:
        raise InputError(f"--region-proposals {region_proposals}: must be >= 1")
    spec = model_spec(model)
    everything = samaug_everything_settings(spec if method == "auto" else replace(spec, everything_method=method))
    if region_proposals is not None:
        everything = replace(everything, region_proposals=region_proposals)
    given = {"points_per_side": points_per_side, "pred_iou_thresh": pred_iou_thresh,
             "stability_thresh": stability_thresh}
    everything = replace(everything, **{name: value for name, value in given.items() if value is not None})
    everything.check()
    return PriorSettings(weight=weight, normalise=normalise, tile=tile, everything=everything)  # type: ignore[arg-type]


@dataclass
class Priors:
    """The two prior maps of one image, at the image's own size."""

    segmentation: np.ndarray  # float32, >= 0, sums of mask weights
    boundary: np.ndarray  # float32, 0 or 1
    masks: int = 0  # how many everything-mode masks made them

    def as_channels(self) -> np.ndarray:
        return np.stack([self.segmentation, self.boundary]).astype(np.float32)


def mask_weight(mask: ProposedMask, weight: Weight) -> float:
    if weight == "stability":
        return mask.stability
    if weight == "iou":
        return mask.predicted_iou
    return 1.0


def priors_from_masks(masks: list[ProposedMask], shape: tuple[int, int], weight: Weight = "stability",
                      normalise: bool = False) -> Priors:
    """Accumulate everything-mode masks into the segmentation and boundary priors."""
    if weight not in WEIGHTS:
        raise ValueError(f"weight must be one of {WEIGHTS}, got {weight!r}")
    segmentation = np.zeros(shape, dtype=np.float32)
    boundary = np.zeros(shape, dtype=bool)
    height, width = shape
    for mask in masks:  # each mask over its box grown by the 1 px a thick boundary reaches outside it
        x0, y0, x1, y1 = mask.box
        region = (max(x0 - 1, 0), max(y0 - 1, 0), min(x1 + 1, width), min(y1 + 1, height))
        window = mask.window(region)
        rows, columns = slice(region[1], region[3]), slice(region[0], region[2])
        segmentation[rows, columns][window] += mask_weight(mask, weight)
        boundary[rows, columns] |= find_boundaries(window, mode="thick")
    if normalise and segmentation.max() > 0:
        segmentation /= segmentation.max()
    return Priors(segmentation, boundary.astype(np.float32), len(masks))


def compute_priors(predictor: Predictor, image: np.ndarray, settings: PriorSettings) -> Priors:
    """Priors of one image: everything mode on the whole image, or tile by tile when ``tile`` is set.

    Tiling keeps small structures (nuclei in a 1000 px H&E tile) large enough for a 256 px model;
    masks of each tile are placed back at their position before accumulation.
    """
    resolved = settings.resolved(predictor.model.spec)
    height, width = image.shape[:2]
    if not resolved.tile or max(height, width) <= resolved.tile:
        masks = generate_masks(predictor, image, resolved.everything)
        return priors_from_masks(masks, (height, width), resolved.weight, resolved.normalise)
    segmentation = np.zeros((height, width), dtype=np.float32)
    boundary = np.zeros((height, width), dtype=np.float32)
    count = 0
    for x0, y0, x1, y1 in tile_boxes((height, width), resolved.tile):
        crop = np.ascontiguousarray(image[y0:y1, x0:x1])
        part = priors_from_masks(generate_masks(predictor, crop, resolved.everything), crop.shape[:2],
                                 resolved.weight, normalise=False)
        segmentation[y0:y1, x0:x1] = part.segmentation
        boundary[y0:y1, x0:x1] = part.boundary
        count += part.masks
    if resolved.normalise and segmentation.max() > 0:
        segmentation /= segmentation.max()
    return Priors(segmentation, boundary, count)


def settings_key(model_protocol: dict[str, object], settings: PriorSettings) -> str:
    """A short hash of everything that changes the priors: model, weights, preprocessing, settings."""
    text = json.dumps({"model": model_protocol, "priors": settings.record()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
