"""Figures of SAMAug's priors, as Figure 2 of the paper: image, segmentation prior, boundary prior,
augmented input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from sam4med.engine.runs import atomic_path
from sam4med.samaug.inputs import augment
from sam4med.samaug.priors import Priors


def write_prior_figure(path: str | Path, image: np.ndarray, priors: Priors) -> Path:
    """One PNG with four panels; the augmented input is clipped to [0, 1] for display only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    augmented = augment(image, priors, "add")
    shown = np.clip(np.moveaxis(augmented, 0, -1), 0, 1)
    figure = Figure(figsize=(12, 3.3))  # drawn without pyplot: the caller's backend stays as it is
    axes = figure.subplots(1, 4)
    panels = [
        (image, "image", "gray"),
        (priors.segmentation, f"segmentation prior (max {priors.segmentation.max():.2f})", "magma"),
        (priors.boundary, "boundary prior", "gray"),
        (shown, "augmented input (add)", None),
    ]
    for axis, (pixels, title, cmap) in zip(axes, panels):
        axis.imshow(pixels, cmap=cmap if np.asarray(pixels).ndim == 2 else None)
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    figure.suptitle(f"{priors.masks} everything-mode masks", fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=80)
    return path
