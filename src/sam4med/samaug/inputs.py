"""What a SAMAug segmenter reads: the image in [0, 1] with its two prior maps, at a working scale.

The augmented input is the image with the segmentation prior added to channel 1 and the boundary
prior to channel 2 (``add``, the authors' code), or the image with the two maps as extra channels
(``concat``). A gray image has no channels to add to, so under ``add`` it becomes
[image, segmentation prior, boundary prior]. Raw input is the same layout with zero priors, so one
network takes both, as SAMAug's dual training needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F

from sam4med.engine.datasets import Dataset, Sample
from sam4med.engine.errors import InputError, read_every
from sam4med.engine.imageio import read_image, read_mask
from sam4med.engine.preprocessing import longest_side_size
from sam4med.samaug.priors import Priors

if TYPE_CHECKING:
    from sam4med.samaug.store import PriorStore

Policy = Literal["add", "concat"]
POLICIES: tuple[str, ...] = ("add", "concat")


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


@dataclass
class PreparedImage:
    """One image, its priors and mask at the working scale (longer side = ``scale_to``)."""

    dataset: str
    sample: Sample
    image: torch.Tensor  # (C, h, w) in [0, 1]
    priors: torch.Tensor  # (2, h, w)
    mask: torch.Tensor  # (1, h, w), 0 or 1
    original_size: tuple[int, int]


def _resize(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(tensor.shape[-2:]) == size:
        return tensor
    return F.interpolate(tensor[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def is_gray(dataset_images: Sequence[np.ndarray]) -> bool:
    """True when every image has three identical channels (``read_image`` replicates gray)."""
    return all(np.array_equal(im[..., 0], im[..., 1]) and np.array_equal(im[..., 0], im[..., 2])
               for im in dataset_images)


def dataset_is_gray(dataset: Dataset, count: int = 8) -> bool:
    """``is_gray`` of the first ``count`` images that can be read (the others are named when the set is prepared)."""
    images: list[np.ndarray] = []
    for sample in dataset.samples:
        try:
            images.append(read_image(sample.image_path))
        except InputError:
            continue
        if len(images) == count:
            break
    return is_gray(images)


def prepare_images(dataset: Dataset, samples: Sequence[Sample], store: PriorStore | None, side: int,
                   gray: bool, need_masks: bool = True) -> list[PreparedImage]:
    """Read, resize and attach priors (zeros when ``store`` is None, for raw-only training); every sample that
    cannot be used is named in one InputError."""

    def prepare(sample: Sample) -> PreparedImage:
        pixels = read_image(sample.image_path)
        original = pixels.shape[:2]
        size = longest_side_size(original, side)
        channels = torch.from_numpy(image_channels_first(pixels[..., :1] if gray else pixels))
        if store is not None:
            priors = torch.from_numpy(store.load(sample.id, sample.image_path).as_channels())
            if tuple(priors.shape[1:]) != original:
                raise InputError(f"{store.path(sample.id)}: priors are {tuple(priors.shape[1:])}, image is {original}")
        else:
            priors = torch.zeros((2, *original))
        if sample.mask_path is not None:
            mask = torch.from_numpy(read_mask(sample.mask_path, pixels.shape).astype(np.float32))[None]
            mask = (_resize(mask, size) > 0.5).float()
        elif need_masks:
            raise InputError(f"{sample.image_path}: no mask for training or evaluation")
        else:
            mask = torch.zeros((1, *size))
        return PreparedImage(dataset.name, sample, _resize(channels, size), _resize(priors, size), mask, original)

    return read_every(samples, prepare)
