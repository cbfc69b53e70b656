"""Prompted segmentation of one image or one volume: what a user calls on their own data."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sam4med.engine.errors import InputError
from sam4med.engine.predictor import Predictor
from sam4med.engine.prompts import Prompt, select_mask


def segment_image(predictor: Predictor, image: np.ndarray, prompt: Prompt, mask_rule: str | None = None) -> np.ndarray:
    """Binary mask (H, W) for one prompt; ``mask_rule`` single or iou (oracle needs ground truth)."""
    rule = mask_rule or predictor.model.spec.default_mask_rule
    if rule == "oracle":
        rule = "iou"  # no ground truth here: the model's own ranking is the honest choice
    predictor.set_image(image)
    decoded = predictor.predict([prompt], multimask=rule != "single")
    masks = decoded.masks()[0]
    return masks[select_mask(masks, decoded.iou[0].cpu().numpy(), rule)]


def _mask_box(mask: np.ndarray, margin: int, size: tuple[int, int]) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    height, width = size
    return np.array([max(xs.min() - margin, 0), max(ys.min() - margin, 0),
                     min(xs.max() + margin, width - 1), min(ys.max() + margin, height - 1)], dtype=np.float32)


def segment_volume(
    predictor: Predictor,
    slices: Sequence[np.ndarray],
    box3d: Sequence[float],
    margin: int = 2,
    mask_rule: str | None = None,
) -> np.ndarray:
    """Segment one object in a stack of 8-bit slices from a 3D box (x0, y0, z0, x1, y1, z1).

    As LiteMedSAM's 3D inference does: the middle slice of the box's z range is segmented with
    the 2D box, then each neighbouring slice is prompted with the box of the previous slice's
    mask (plus ``margin`` pixels), outwards to both ends of the range; propagation stops in a
    direction once a slice comes back empty.
    """
    x0, y0, z0, x1, y1, z1 = (float(v) for v in box3d)
    depth = len(slices)
    if not (0 <= z0 <= z1 < depth):
        raise InputError(f"--box3d z range {z0:g}..{z1:g} lies outside the volume's {depth} slices")
    labels = np.zeros((depth, *slices[0].shape[:2]), dtype=bool)
    middle = int(round((z0 + z1) / 2))

    def rgb(index: int) -> np.ndarray:
        image = slices[index]
        return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image

    labels[middle] = segment_image(predictor, rgb(middle), Prompt(box=[x0, y0, x1, y1]), mask_rule)
    for step, stop in ((1, int(z1)), (-1, int(z0))):
        previous = labels[middle]
        for z in range(middle + step, stop + step, step):
            if not previous.any():
                break
            box = _mask_box(previous, margin, previous.shape)
            labels[z] = segment_image(predictor, rgb(z), Prompt(box=box), mask_rule)
            previous = labels[z]
    return labels
