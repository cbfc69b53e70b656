"""Objects of a mask (its connected components) and the COSMOS per-object factors."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.measure import label as skimage_label
from skimage.measure import perimeter
from skimage.morphology import disk

from sam4med.engine.errors import InputError, hw

RING_RADIUS = 5
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's convert("L")


def connected_components(mask: np.ndarray, connectivity: int | None = None) -> np.ndarray:
    """Label image of a binary mask's connected components (0 = background), numbered in raster order of
    each component's first pixel. ``connectivity`` counts the axes a neighbour may differ in (default: all,
    8-connectivity in 2D)."""
    return skimage_label(np.asarray(mask, dtype=bool), connectivity=connectivity or mask.ndim)


def object_labels(mask: np.ndarray, *, min_area: int = 1, connectivity: int = 2) -> tuple[np.ndarray, list[int]]:
    """The objects of a mask as labels, and the ids of those of at least ``min_area`` pixels, in label order
    (raster order of each object's first pixel). An object is a connected component of one value: of a binary
    mask's foreground, or of one label of a label image (``imageio.read_mask_labels``), so that two touching
    objects of two labels stay two.

    Callers that keep only some objects (a benchmark capping hundreds of nuclei) build masks
    for those alone instead of one full-size array per component.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"object_labels: mask must be 2D, got shape {mask.shape}")
    if connectivity not in (1, 2):
        raise InputError(f"object_labels: connectivity must be 1 or 2, got {connectivity}")
    if mask.dtype.kind not in "biu":
        mask = mask > 0
    labels = skimage_label(mask, background=0, connectivity=connectivity)
    count = int(labels.max())
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    return labels, [label for label in range(1, count + 1) if areas[label] >= min_area]


def object_factors(image: np.ndarray, object_mask: np.ndarray) -> dict[str, float]:
    """Per-object factors for the benchmark's factor analysis (as in the COSMOS 1050K study).

    ``object_area`` in pixels; ``area_fraction`` = area / image pixels; ``boundary_complexity``
    = perimeter^2 / (4 pi area), about 1 for a disc and larger for ragged or thin shapes;
    ``contrast`` = |mean gray inside - mean gray in a ring 5 px wide around the object| / 255
    (NaN when the object leaves no ring, i.e. fills the image). ``image`` is uint8, as
    ``read_image`` returns it; gray is ITU-R 601 luma.
    """
    image = np.asarray(image)
    mask = np.asarray(object_mask, dtype=bool)
    if image.dtype != np.uint8:
        raise InputError(f"object_factors: image must be uint8 as read_image returns it, got {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise InputError(f"object_factors: object mask is {hw(mask.shape)} but the image is {hw(image.shape)}")
    area = int(mask.sum())
    if area == 0:
        raise InputError("object_factors: object mask is empty")
    # Work in the object's box plus the ring margin: hundreds of nuclei per 1000x1000 tile.
    rows, cols = np.nonzero(mask)
    pad = RING_RADIUS + 1
    box = (
        slice(max(rows.min() - pad, 0), rows.max() + pad + 1),
        slice(max(cols.min() - pad, 0), cols.max() + pad + 1),
    )
    crop = mask[box]
    crop_gray = image[box].astype(np.float64) if image.ndim == 2 else image[box][..., :3] @ _LUMA
    ring = ndimage.binary_dilation(crop, structure=disk(RING_RADIUS)) & ~crop
    outside = crop_gray[ring].mean() if ring.any() else np.nan
    return {
        "object_area": float(area),
        "area_fraction": area / mask.size,
        "boundary_complexity": float(perimeter(crop) ** 2 / (4 * np.pi * area)),
        "contrast": float(abs(crop_gray[crop].mean() - outside) / 255),
    }
