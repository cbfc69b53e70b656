"""How an original image maps onto a model's square input: resize (longest side + pad, as
segment_anything's ``ResizeLongestSide``, or stretched, as MedSAM), normalise, and the inverse."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from sam4med.engine.networks import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from sam4med.engine.registry import ModelSpec

LOW_RES = 256  # side of the decoder's low-resolution logits for every SAM-family model


@dataclass(frozen=True)
class ImageGeometry:
    """How an original image maps onto the model's square input."""

    original_size: tuple[int, int]  # (H, W)
    resized_size: tuple[int, int]  # (h, w) of the image content inside the square input
    input_size: int

    @property
    def scale_xy(self) -> tuple[float, float]:
        return self.resized_size[1] / self.original_size[1], self.resized_size[0] / self.original_size[0]


def longest_side_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    """(h, w) of an image of ``size`` scaled so that its longer side is ``side`` (segment_anything's rounding),
    at least 1 px: a strip a few pixels wide would otherwise round to nothing."""
    height, width = ResizeLongestSide.get_preprocess_shape(size[0], size[1], side)
    return max(1, height), max(1, width)


def image_geometry(spec: ModelSpec, original_size: tuple[int, int]) -> ImageGeometry:
    height, width = original_size
    side = spec.image_size
    if spec.resize == "stretch":
        return ImageGeometry((height, width), (side, side), side)
    return ImageGeometry((height, width), longest_side_size((height, width), side), side)


def resize_content(pixels: torch.Tensor, geometry: ImageGeometry, antialias: bool = True) -> torch.Tensor:
    """(B, C, H, W) float at the original size -> the content part of the model input, (B, C, h, w)."""
    return F.interpolate(pixels, size=geometry.resized_size, mode="bilinear", align_corners=False,
                         antialias=antialias)


def pad_to_input(content: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
    """Content (B, C, h, w) zero padded at the bottom and right to the square (S, S) input."""
    side = geometry.input_size
    return F.pad(content, (0, side - geometry.resized_size[1], 0, side - geometry.resized_size[0]))


def normalise(pixels: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Min-max to [0, 1] (LiteMedSAM, MedSAM) or SAM's pixel mean and std."""
    if spec.normalisation == "minmax":
        low, high = pixels.min(), pixels.max()
        return (pixels - low) / torch.clamp(high - low, min=1e-8)
    mean = torch.tensor(SAM_PIXEL_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def from_model_frame(low_res: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
    """Low-res logits (B, M, 256, 256) -> logits at the original image size."""
    side = geometry.input_size
    logits = low_res
    if low_res.shape[-1] != side:
        logits = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)
    logits = logits[..., : geometry.resized_size[0], : geometry.resized_size[1]]
    return F.interpolate(logits, size=geometry.original_size, mode="bilinear", align_corners=False)


def low_res_target(mask: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
    """An original-size mask (H, W) in the model's input frame at the decoder's 256 px, as 0/1 (1, 256, 256)."""
    framed = pad_to_input(resize_content(mask.float()[None, None], geometry, antialias=False), geometry)
    if geometry.input_size != LOW_RES:
        framed = F.interpolate(framed, size=(LOW_RES, LOW_RES), mode="bilinear", align_corners=False)
    return (framed[0] > 0.5).float()


def low_res_content(geometry: ImageGeometry) -> tuple[int, int]:
    """(h, w) of the image content inside the decoder's 256 px frame (the rest is padding)."""
    return round(geometry.resized_size[0] * LOW_RES / geometry.input_size), \
        round(geometry.resized_size[1] * LOW_RES / geometry.input_size)


def labels_to_low_res(labels: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
    """An original-size label image (H, W) of object ids in the decoder's 256 px frame, nearest
    neighbour (ids stay ids), padded with 0 like the model input."""
    side = low_res_content(geometry)
    resized = F.interpolate(labels.float()[None, None], size=side, mode="nearest-exact")[0, 0]
    return F.pad(resized, (0, LOW_RES - side[1], 0, LOW_RES - side[0])).to(torch.int32)
