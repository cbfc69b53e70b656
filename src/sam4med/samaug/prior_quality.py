"""What SAMAug's priors know about the target before any segmenter reads them.

A segmenter can only gain from the priors what they carry. Each image's priors are scored against its
ground truth, threshold-free where the map is not a probability:

- ``auroc``: the segmentation prior (summed mask weights) as a score of foreground pixels (pixel AUROC);
- ``covered_dice``: Dice of the pixels any kept mask covers (segmentation prior > 0) with the mask;
- ``boundary_f``: boundary F-score of the boundary prior against the true objects' thick boundaries
  (objects = 8-connected components, as everywhere in sam4med), within ``tolerance`` pixels;
- ``covered_fraction`` and ``masks``: how much of the image the kept masks cover, and how many there are.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.segmentation import find_boundaries

from sam4med.engine.datasets import Dataset, load_datasets
from sam4med.engine.imageio import read_mask
from sam4med.engine.metrics import boundary_f_score, dice, label_instances, pixel_auroc
from sam4med.samaug.priors import Priors
from sam4med.samaug.store import PriorStore

BOUNDARY_TOLERANCE_PX = 2.0


def score_priors(priors: Priors, mask: np.ndarray, tolerance: float = BOUNDARY_TOLERANCE_PX) -> dict[str, float]:
    """The scores above for one image's priors against its 0/255 (or 0/1) mask."""
    truth = np.asarray(mask) > 0
    covered = priors.segmentation > 0
    true_boundary = find_boundaries(label_instances(truth), mode="thick")
    return {"auroc": pixel_auroc(priors.segmentation, truth), "covered_dice": dice(covered, truth),
            "boundary_f": boundary_f_score(priors.boundary > 0, true_boundary, tolerance),
            "covered_fraction": float(covered.mean()), "masks": float(priors.masks)}


def measure_prior_quality(data: Sequence[str | Path | Dataset], priors: str | Path,
                          image_ids: Collection[str] | None = None,
                          tolerance: float = BOUNDARY_TOLERANCE_PX) -> pd.DataFrame:
    """One row per image (data set, image, scores) for the priors cached under ``priors/<data set>/``
    (``sam4med samaug priors --out PRIORS``); ``image_ids`` limits the images."""
    rows = []
    for dataset in load_datasets(data):
        store = PriorStore(Path(priors) / dataset.name)
        for sample in dataset.samples:
            if image_ids is not None and sample.id not in image_ids:
                continue
            scores = score_priors(store.load(sample.id, sample.image_path), read_mask(sample.mask_path), tolerance)
            rows.append({"dataset": dataset.name, "image": sample.id, **scores})
    return pd.DataFrame(rows)
