"""Which predicted-IoU and stability thresholds let a click model's point grid find the objects.

    python experiments/everything_thresholds.py --data ../shared/data/kvasir_seg --data ../shared/data/glas ... \\
        --model litemedsam-click --out runs/clicks/everything_thresholds.csv --max-images 8

SAM's generator keeps a grid point's mask when its predicted IoU >= 0.88 and its stability >= 0.95, values
tuned for SAM's own IoU head. A model trained by sam4med has its own calibration, so its thresholds are
chosen here, on the validation side of each data set (split seed 0, never the test side the README's tables
use): every candidate mask of the grid is kept once at the loosest thresholds, then for each pair the
candidates are filtered, de-duplicated by SAM's box NMS, and scored by the share of labelled objects matched
by a mask of Dice >= 0.5 (recall) and the share of kept masks that match an object (precision). The pair
with the best F1 averaged over data sets (each data set counts once, however many objects it has) is
printed first.
"""

from __future__ import annotations

from itertools import product
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import pandas as pd
import typer

from sam4med.cli.options import ThreadsOption
from sam4med.engine.datasets import load_datasets
from sam4med.engine.everything import EverythingSettings, ProposedMask, box_nms, grid_candidates
from sam4med.engine.imageio import load_pair
from sam4med.engine.models import load_model
from sam4med.engine.objects import object_labels
from sam4med.engine.predictor import Predictor
from sam4med.engine.runtime import configure_cpu
from sam4med.engine.splits import DEFAULT_FRACTIONS, training_split

IOU_THRESHOLDS = (0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.88)
STABILITY_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
MATCH_DICE = 0.5


def _dice_matrix(masks: list[ProposedMask], labels: np.ndarray, ids: list[int]) -> np.ndarray:
    """Dice of every kept mask (rows) with every labelled object (columns)."""
    if not masks or not ids:
        return np.zeros((len(masks), len(ids)))
    flat = np.stack([m.mask.ravel() for m in masks]).astype(np.float32)
    truth = np.stack([(labels == i).ravel() for i in ids]).astype(np.float32)
    inter = flat @ truth.T
    return 2 * inter / (flat.sum(1)[:, None] + truth.sum(1)[None] + 1e-9)


def main(
    data: Annotated[list[Path], typer.Option(help="Data set folder (repeatable); its validation side is used.")],
    out: Annotated[Path, typer.Option(help="CSV: one row per data set and threshold pair.")],
    model: Annotated[str, typer.Option(help="A registered model that takes clicks.")] = "litemedsam-click",
    checkpoint: Annotated[Optional[Path], typer.Option(help="A click run's best.pt (on --model's backbone).")] = None,
    max_images: Annotated[int, typer.Option(help="Validation images per data set.")] = 8,
    points_per_side: Annotated[int, typer.Option(help="Point grid side (SAM: 32).")] = 16,
    min_object_area: Annotated[int, typer.Option(help="Objects smaller than this (pixels) are not counted.")] = 10,
    threads: ThreadsOption = None,
) -> None:
    """Print recall and precision of the point grid for every threshold pair, per data set and overall."""
    configure_cpu(threads)
    sam = load_model(model, checkpoint, encoder_backend="onnx")
    predictor = Predictor(sam)
    loosest = EverythingSettings(method="points", points_per_side=points_per_side,
                                 pred_iou_thresh=min(IOU_THRESHOLDS), stability_thresh=min(STABILITY_THRESHOLDS))
    rows = []
    for dataset in load_datasets(data):
        for sample in training_split(dataset, DEFAULT_FRACTIONS, 0)["val"][:max_images]:
            image, truth = load_pair(sample)
            labels, ids = object_labels(truth, min_area=min_object_area)
            count = len(ids)
            predictor.set_image(image)
            candidates = grid_candidates(predictor, loosest)
            for iou_thresh, stability_thresh in product(IOU_THRESHOLDS, STABILITY_THRESHOLDS):
                kept = box_nms([c for c in candidates if c.predicted_iou >= iou_thresh
                                and c.stability >= stability_thresh], loosest.nms_thresh)
                dice = _dice_matrix(kept, labels, ids)
                rows.append({"dataset": dataset.name, "image": sample.id, "pred_iou_thresh": iou_thresh,
                             "stability_thresh": stability_thresh, "objects": count, "masks": len(kept),
                             "found": int((dice.max(0) >= MATCH_DICE).sum()) if len(kept) else 0,
                             "true_masks": int((dice.max(1) >= MATCH_DICE).sum()) if count else 0})
    table = pd.DataFrame(rows).groupby(["dataset", "pred_iou_thresh", "stability_thresh"], as_index=False).sum(
        numeric_only=True)
    overall = table.groupby(["pred_iou_thresh", "stability_thresh"], as_index=False).sum(numeric_only=True)
    table = pd.concat([table, overall.assign(dataset="all")])
    table["recall"] = table["found"] / table["objects"].clip(lower=1)
    table["precision"] = table["true_masks"] / table["masks"].clip(lower=1)
    table["f1"] = 2 * table.recall * table.precision / (table.recall + table.precision).clip(lower=1e-9)
    table["model"] = sam.name
    table["weights_sha256"] = sam.weights_sha256
    table["points_per_side"] = points_per_side
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    per_set = table[table.dataset != "all"].groupby(["pred_iou_thresh", "stability_thresh"])["f1"].mean()
    summary = table[table.dataset == "all"].set_index(["pred_iou_thresh", "stability_thresh"])
    summary = summary.assign(mean_f1_over_sets=per_set).sort_values("mean_f1_over_sets", ascending=False)
    print(summary[["mean_f1_over_sets", "recall", "precision", "masks"]].round(3).head(12).to_string())


if __name__ == "__main__":
    typer.run(main)
