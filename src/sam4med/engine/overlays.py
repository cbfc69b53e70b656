"""Drawing masks over images without pyplot (Agg canvas): overlays for the benchmark, the report and `segment`."""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from sam4med.engine.runs import atomic_path

OVERLAY_DPI = 80
PANEL_IN = 2.2
PANELS_PER_ROW = 5
OVERLAY_MAX_SIDE = 384  # pixels drawn per image side; larger images are subsampled
GT_COLOR = "#00ff66"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#843c39", "#7b4173", "#3182bd")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No warnings and no stray output while drawing."""
    with warnings.catch_warnings(), np.errstate(all="ignore"), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def new_figure(width: float, height: float, dpi: int = OVERLAY_DPI) -> Figure:
    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


# ----------------------------------------------------------------------------------- overlays
def _display_image(image: np.ndarray) -> np.ndarray:
    """uint8 HxW or HxWx3 for imshow."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[-1] > 3:
        image = image[..., :3]
    if image.dtype != np.uint8:
        values = image.astype(float)
        low, high = np.nanmin(values), np.nanmax(values)
        scale = 255.0 / (high - low) if high > low else 0.0
        image = np.nan_to_num((values - low) * scale).clip(0, 255).astype(np.uint8)
    return image


def _draw_panel(ax, image: np.ndarray, gt: np.ndarray, masks: Sequence[np.ndarray], title: str) -> None:
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
    if masks:
        layer = np.zeros((*gt.shape, 4))
        for index, mask in enumerate(masks):
            layer[mask] = to_rgba(PALETTE[index % len(PALETTE)], 0.45)
        ax.imshow(layer, interpolation="nearest")
    if gt.any() and not gt.all() and min(gt.shape) >= 2:  # a contour needs 2 x 2 pixels; a 1 px strip has none
        ax.contour(gt.astype(float), levels=[0.5], colors=[GT_COLOR], linewidths=1.0)
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def overlay_stride(shape: tuple[int, ...]) -> int:
    """Every how many pixels an overlay samples an image of this (H, W, ...) shape."""
    return max(1, math.ceil(max(shape[:2]) / OVERLAY_MAX_SIDE))


def shrink_for_overlay(mask: np.ndarray) -> np.ndarray:
    """A full-size mask as ``write_overlay`` draws it: a caller that keeps every mode's masks of an image
    until drawing them holds 1 / stride^2 of their pixels. A copy, not a strided view: a view would keep the
    full-size mask alive, and with it the whole batch of masks that mask is a view of."""
    step = overlay_stride(np.shape(mask))
    return np.array(np.asarray(mask, dtype=bool)[::step, ::step])


def write_overlay(path: str | Path, image: np.ndarray, gt: np.ndarray,
                  panels: Sequence[tuple[str, Sequence[np.ndarray], float]]) -> Path:
    """One small PNG per image: the image with the ground-truth contour, then one panel per
    (title, masks, mean Dice) with those masks drawn over the image, titled ``title  Dice 0.xx``.
    Masks are full size or already shrunk by ``shrink_for_overlay``; others are skipped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = _display_image(image)
    gt = np.asarray(gt)
    gt = (gt.any(axis=-1) if gt.ndim == 3 else gt).astype(bool)
    step = overlay_stride(gt.shape)
    shown_image, shown_gt = image[::step, ::step], gt[::step, ::step]
    drawn: list[tuple[str, list[np.ndarray]]] = [("image + GT", [])]
    for title, masks, dice in panels:
        kept = [np.asarray(m, dtype=bool)[::step, ::step] if np.shape(m) == gt.shape else np.asarray(m, dtype=bool)
                for m in masks if np.shape(m) in (gt.shape, shown_gt.shape)]
        drawn.append((f"{title}  Dice {dice:.2f}" if np.isfinite(dice) else f"{title}  Dice n/a", kept))
    panels = drawn  # type: ignore[assignment]

    columns = min(len(panels), PANELS_PER_ROW)
    lines = math.ceil(len(panels) / columns)
    aspect = shown_gt.shape[0] / max(shown_gt.shape[1], 1)
    with quiet():
        figure = new_figure(columns * PANEL_IN, lines * (PANEL_IN * min(max(aspect, 0.4), 2.0) + 0.25))
        axes = figure.subplots(lines, columns, squeeze=False).ravel()
        for ax, (title, masks) in zip(axes, panels):
            _draw_panel(ax, shown_image, shown_gt, masks, title)
        for ax in axes[len(panels):]:
            ax.set_axis_off()
        figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.3 / (lines * PANEL_IN + 0.3),
                               wspace=0.05, hspace=0.2)
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=OVERLAY_DPI, format="png")
        # a figure and its canvas hold each other: without this its panels' arrays stay until the next garbage
        # collection, a few overlays later, on top of whatever the item loop holds by then
        figure.clear()
    return path
