"""Prompted segmentation of one image or one volume: what a user calls on their own data."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from sam4med.engine.errors import InputError
from sam4med.engine.imageio import read_image
from sam4med.engine.prompts import Prompt, check_mask_rule, select_mask, tight_box, wants_multimask
from sam4med.engine.runs import atomic_path


class PromptMasks(Protocol):
    """What segmenting needs of a predictor: the PyTorch one (``engine.predictor``) or the ONNX Runtime one
    (``engine.onnx_predictor``), which starts without importing PyTorch."""

    default_mask_rule: str

    def prompt_masks(self, image: np.ndarray, prompt: Prompt, multimask: bool) -> tuple[np.ndarray, np.ndarray]:
        """Masks (M, H, W) of one prompt on ``image`` and their predicted IoUs (M,)."""


# A predictor, or a function that makes one: called only once every argument and input file is checked,
# so that a bad argument never waits for a model to load.
PredictorSource = PromptMasks | Callable[[], PromptMasks]


def _ready(source: PredictorSource) -> PromptMasks:
    return source() if callable(source) else source


def _check_box3d(box3d: Sequence[float], depth: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in box3d)
    if len(values) != 6 or not np.isfinite(values).all():
        raise InputError(f"--box3d {list(box3d)}: expected six finite numbers x0 y0 z0 x1 y1 z1")
    if values[2] > values[5]:
        raise InputError(f"--box3d z range {values[2]:g}..{values[5]:g}: z0 must not exceed z1")
    if not (0 <= values[2] <= values[5] < depth):
        raise InputError(f"--box3d z range {values[2]:g}..{values[5]:g} lies outside the volume's {depth} slices")
    return values


def _check_output(out: Path, what: str, suffixes: tuple[str, ...]) -> None:
    if out.is_dir():
        raise InputError(f"{what} {out}: is a folder; name a file ({', '.join(suffixes)})")
    if not out.name.lower().endswith(suffixes):
        raise InputError(f"{what} {out}: unknown extension (expected {', '.join(suffixes)})")


def segment_image(predictor: PromptMasks, image: np.ndarray, prompt: Prompt, mask_rule: str | None = None) -> np.ndarray:
    """Binary mask (H, W) for one prompt; ``mask_rule`` single, auto or iou (oracle needs ground truth)."""
    rule = mask_rule or predictor.default_mask_rule
    if rule == "oracle":
        rule = "iou"  # no ground truth here: the model's own ranking is the honest choice
    masks, predicted_iou = predictor.prompt_masks(image, prompt, wants_multimask(rule, prompt))
    return masks[select_mask(masks, predicted_iou, rule)]


def segment_volume(
    predictor: PromptMasks,
    slices: Sequence[np.ndarray],
    box3d: Sequence[float],
    margin: int = 2,
    mask_rule: str | None = None,
) -> np.ndarray:
    """Segment one object in a stack of 8-bit slices from a 3D box (x0, y0, z0, x1, y1, z1).

    As LiteMedSAM's 3D inference does: the middle slice of the box's z range is segmented with
    the 2D box, then carried outwards to both ends of the range by :func:`propagate`.
    """
    x0, y0, z0, x1, y1, z1 = _check_box3d(box3d, len(slices))
    middle = int(round((z0 + z1) / 2))
    first = segment_image(predictor, _rgb(slices[middle]), Prompt(box=[x0, y0, x1, y1]), mask_rule)
    return propagate(predictor, slices, middle, first, (int(z0), int(z1)), margin, mask_rule)


def propagate(
    predictor: PromptMasks,
    slices: Sequence[np.ndarray],
    start: int,
    mask: np.ndarray,
    limits: tuple[int, int] | None = None,
    margin: int = 2,
    mask_rule: str | None = None,
) -> np.ndarray:
    """Carry one object's ``mask`` on slice ``start`` to its neighbours: each slice is prompted with the box
    of the previous slice's mask (plus ``margin`` pixels), outwards to both ends of ``limits`` (first and
    last slice, inclusive; default the whole stack); a direction stops once a slice comes back empty.
    Returns the masks of all slices (depth, H, W), ``mask`` itself on ``start``."""
    low, high = limits if limits is not None else (0, len(slices) - 1)
    labels = np.zeros((len(slices), *mask.shape), dtype=bool)
    labels[start] = mask
    for step, stop in ((1, high), (-1, low)):
        previous = mask
        for z in range(start + step, stop + step, step):
            if not previous.any():
                break
            labels[z] = segment_image(predictor, _rgb(slices[z]), Prompt(box=tight_box(previous, margin)), mask_rule)
            previous = labels[z]
    return labels


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


def segment_image_file(predictor: PredictorSource, image_path: Path, prompt: Prompt, out: Path,
                       overlay: Path | None = None, mask_rule: str | None = None) -> np.ndarray:
    """Segment one object of an image file; write the mask as a 0/255 PNG (and the overlay, if asked).

    Outputs, mask rule, image and prompt are checked before ``predictor`` is made (when it is a function)."""
    _check_output(out, "--out", (".png",))
    if overlay is not None:
        _check_output(overlay, "--overlay", (".png",))
    check_mask_rule(mask_rule)
    pixels = read_image(image_path)
    try:
        prompt.check_inside(pixels.shape[:2])
    except InputError as exc:
        raise InputError(f"{image_path}: {exc}") from None
    mask = segment_image(_ready(predictor), pixels, prompt, mask_rule)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as temporary:
        Image.fromarray((mask * 255).astype(np.uint8)).save(temporary, format="PNG")
    if overlay:
        from sam4med.engine.overlays import write_overlay

        write_overlay(overlay, pixels, mask, [("segment", [mask], float("nan"))])
    return mask


def segment_volume_file(predictor: PredictorSource, volume_path: Path, box3d: Sequence[float], out: Path,
                        axis: int = 0, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Segment one object of a volume file from a 3D box whose z is the index along ``axis`` of the
    (z, y, x) array (0 axial, 1 coronal, 2 sagittal); write the label volume on the image's grid.

    Output, axis, volume and box are checked before ``predictor`` is made (when it is a function)."""
    from sam4med.engine.volumes import VOLUME_SUFFIXES, read_volume, slices, window, write_label_volume

    if axis not in (0, 1, 2):
        raise InputError(f"--axis {axis}: must be 0, 1 or 2")
    _check_output(out, "--out", VOLUME_SUFFIXES)
    image = read_volume(volume_path)
    stack = list(slices(window(image.array, *percentiles), axis))
    _check_box3d(box3d, len(stack))
    labels = segment_volume(_ready(predictor), stack, box3d)
    labels = np.moveaxis(labels, 0, axis)
    write_label_volume(labels.astype(np.uint8), image, out)
    return labels
