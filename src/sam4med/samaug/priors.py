"""SAMAug prior maps: what SAM's everything mode says about an image, as extra input channels.

SAMAug (Zhang et al., arXiv 2304.11332) runs SAM without prompts and turns its masks into two
maps that a standard segmenter reads alongside the image:

- the segmentation prior: every kept mask adds its weight (its stability score, as in the paper)
  to its pixels, so overlapping masks sum and the map can exceed 1;
- the boundary prior: the thick boundaries of every kept mask, accumulated and binarised.

The augmented input is the image in [0, 1] with the segmentation prior added to channel 1 and the
boundary prior to channel 2 (``add``, the authors' code), or the image with the two maps as extra
channels (``concat``). A gray image has no channels to add to, so under ``add`` it becomes
[image, segmentation prior, boundary prior].
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
import torch
from skimage.segmentation import find_boundaries

from sam4med.engine.everything import EverythingSettings, ProposedMask, generate_masks
from sam4med.engine.predictor import Predictor

Weight = Literal["stability", "iou", "one"]
Policy = Literal["add", "concat"]
WEIGHTS: tuple[str, ...] = ("stability", "iou", "one")
POLICIES: tuple[str, ...] = ("add", "concat")


def samaug_everything_settings(model_takes_points: bool) -> EverythingSettings:
    """The everything-mode settings SAMAug used, where the model can use them.

    Point-prompt models get the authors' generator: a 32x32 grid, predicted IoU >= 0.5, box NMS 0.5,
    stability >= 0.95. Box-only models (LiteMedSAM) ignore point prompts, so they get sam4med's
    box-proposal mode with its own thresholds.
    """
    if model_takes_points:
        return EverythingSettings(method="points", points_per_side=32, pred_iou_thresh=0.5,
                                  stability_thresh=0.95, nms_thresh=0.5)
    return EverythingSettings(method="boxes").resolved(False)


@dataclass(frozen=True)
class PriorSettings:
    """How masks become priors; recorded with every prior file and every model trained on them."""

    weight: Weight = "stability"
    normalise: bool = False  # divide the segmentation prior by its maximum (the authors do not)
    tile: int | None = None  # run everything mode on tiles of this many pixels (large histology images)
    everything: EverythingSettings | None = None  # None: samaug_everything_settings for the model

    def resolved(self, model_takes_points: bool) -> PriorSettings:
        everything = self.everything.resolved(model_takes_points) if self.everything else \
            samaug_everything_settings(model_takes_points)
        return replace(self, everything=everything)

    def record(self) -> dict[str, object]:
        return asdict(self)


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
    for mask in masks:
        segmentation[mask.mask] += mask_weight(mask, weight)
        boundary |= find_boundaries(mask.mask, mode="thick")
    if normalise and segmentation.max() > 0:
        segmentation /= segmentation.max()
    return Priors(segmentation, boundary.astype(np.float32), len(masks))


def _tiles(size: int, tile: int) -> list[tuple[int, int]]:
    """Start/stop pairs of equal-as-possible tiles no larger than ``tile`` covering ``size``."""
    count = max(1, -(-size // tile))
    edges = np.linspace(0, size, count + 1).round().astype(int)
    return list(zip(edges[:-1], edges[1:]))


def compute_priors(predictor: Predictor, image: np.ndarray, settings: PriorSettings) -> Priors:
    """Priors of one image: everything mode on the whole image, or tile by tile when ``tile`` is set.

    Tiling keeps small structures (nuclei in a 1000 px H&E tile) large enough for a 256 px model;
    masks of each tile are placed back at their position before accumulation.
    """
    resolved = settings.resolved(predictor.model.spec.takes_point_prompts)
    height, width = image.shape[:2]
    if not resolved.tile or max(height, width) <= resolved.tile:
        masks = generate_masks(predictor, image, resolved.everything)
        return priors_from_masks(masks, (height, width), resolved.weight, resolved.normalise)
    segmentation = np.zeros((height, width), dtype=np.float32)
    boundary = np.zeros((height, width), dtype=np.float32)
    count = 0
    for y0, y1 in _tiles(height, resolved.tile):
        for x0, x1 in _tiles(width, resolved.tile):
            crop = np.ascontiguousarray(image[y0:y1, x0:x1])
            part = priors_from_masks(generate_masks(predictor, crop, resolved.everything), crop.shape[:2],
                                     resolved.weight, normalise=False)
            segmentation[y0:y1, x0:x1] = part.segmentation
            boundary[y0:y1, x0:x1] = part.boundary
            count += part.masks
    if resolved.normalise and segmentation.max() > 0:
        segmentation /= segmentation.max()
    return Priors(segmentation, boundary, count)


def image_to_unit(image: np.ndarray) -> np.ndarray:
    """An 8- or 16-bit (or float) image as float32 in [0, 1], channels last."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    image = image.astype(np.float32)
    low, high = float(image.min()), float(image.max())
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def input_channels(image_channels: int, policy: Policy) -> int:
    """How many channels the segmenter's input has under a policy."""
    if policy == "add":
        return 3
    if policy == "concat":
        return image_channels + 2
    raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")


def compose_input(images: torch.Tensor, priors: torch.Tensor | None, policy: Policy = "add") -> torch.Tensor:
    """The segmenter's input for a batch: images (B, C, H, W) in [0, 1] and priors (B, 2, H, W).

    ``priors=None`` gives the raw input in the same layout (zero priors), so one network can take
    both raw and augmented input, as SAMAug's dual training needs.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if priors is None:
        priors = images.new_zeros((images.shape[0], 2, *images.shape[2:]))
    elif priors.shape[2:] != images.shape[2:]:
        raise ValueError(f"priors of size {tuple(priors.shape[2:])} for images of size {tuple(images.shape[2:])}")
    if policy == "concat" or images.shape[1] == 1:
        return torch.cat([images, priors], dim=1)
    if images.shape[1] != 3:
        raise ValueError(f"policy 'add' needs gray or RGB images, got {images.shape[1]} channels")
    return torch.cat([images[:, :1], images[:, 1:2] + priors[:, :1], images[:, 2:3] + priors[:, 1:2]], dim=1)


def image_channels_first(image: np.ndarray) -> np.ndarray:
    """An image as float32 (C, H, W) in [0, 1]."""
    unit = image_to_unit(image)
    return unit[None] if unit.ndim == 2 else np.moveaxis(unit, -1, 0)


def augment(image: np.ndarray, priors: Priors | None, policy: Policy = "add") -> np.ndarray:
    """One image's segmenter input (C, H, W): :func:`compose_input` for a single numpy image."""
    channels = torch.from_numpy(np.ascontiguousarray(image_channels_first(image)))[None]
    maps = None if priors is None else torch.from_numpy(priors.as_channels())[None]
    return compose_input(channels, maps, policy)[0].numpy()


def settings_key(model_protocol: dict[str, object], settings: PriorSettings) -> str:
    """A short hash of everything that changes the priors: model, weights, preprocessing, settings."""
    text = json.dumps({"model": model_protocol, "priors": settings.record()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
