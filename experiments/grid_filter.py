"""Does the point grid's filter keep the masks that match small objects? Per grid point inside an object.

    python experiments/grid_filter.py --data ../shared/data/monuseg --images 1 --crop 256 [--side train]

For each of the first ``--images`` images of ``--side`` (the trainers' group-aware split, seed 0), the
crops of ``--crop`` px at the image's centre and at its top-left quarter are decoded as everything mode
decodes a tile: SAM's 32 x 32 point grid, 3 masks a point. For the grid points that fall inside an
object (8-connected components of the mask), each mask's real IoU with that object, its predicted IoU
and its stability (offset 1) are compared with the model's point-grid thresholds: of the masks that
match their object (IoU >= 0.5), which share would pass each test. Prints one table; writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import typer
from segment_anything.utils.amg import calculate_stability_score

from sam4med.cli.options import ThreadsOption
from sam4med.engine.datasets import load_dataset
from sam4med.engine.everything import EverythingSettings, grid_points
from sam4med.engine.imageio import load_pair
from sam4med.engine.metrics import iou, label_instances
from sam4med.engine.models import load_model
from sam4med.engine.predictor import Predictor
from sam4med.engine.prompts import Prompt
from sam4med.engine.runtime import configure_cpu
from sam4med.engine.splits import DEFAULT_FRACTIONS, training_split

GRID = 32  # SAMAug's generator
MATCHED_IOU = 0.5


def crop_origins(shape: tuple[int, ...], crop: int) -> list[tuple[int, int]]:
    """(y, x) of a crop at the image's centre and one in its top-left quarter."""
    height, width = shape[:2]
    centre = (max(0, (height - crop) // 2), max(0, (width - crop) // 2))
    quarter = (max(0, height // 4 - crop // 2), max(0, width // 4 - crop // 2))
    return [centre, quarter]


def grid_masks(predictor: Predictor, crop: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """One row per mask of each grid point inside an object: predicted IoU, stability, real IoU, area."""
    predictor.set_image(crop)
    height, width = labels.shape
    inside = [(x, y) for x, y in grid_points((height, width), GRID).tolist() if labels[int(y), int(x)] > 0]
    if not inside:
        return pd.DataFrame()
    decoded = predictor.predict([Prompt(points=[point]) for point in inside], multimask=True)
    outputs = decoded.iou.shape[1]
    logits = decoded.pick([(i, m) for i in range(len(inside)) for m in range(outputs)]).logits[:, 0]
    stability = calculate_stability_score(logits, 0.0, 1.0).reshape(len(inside), outputs)
    masks = (logits > 0).numpy().reshape(len(inside), outputs, height, width)
    rows = []
    for index, (x, y) in enumerate(inside):
        target = labels == labels[int(y), int(x)]
        for output in range(outputs):
            mask = masks[index, output]
            rows.append({"point": index, "predicted_iou": float(decoded.iou[index, output]),
                         "stability": float(stability[index, output]), "real_iou": iou(mask, target),
                         "area": int(mask.sum())})
    return pd.DataFrame(rows)


def main(
    data: Annotated[Path, typer.Option(help="Data set folder.")],
    images: Annotated[int, typer.Option(help="Images of the side to read.")] = 1,
    side: Annotated[str, typer.Option(help="train, val or test.")] = "train",
    crop: Annotated[int, typer.Option(help="Crop size in px (a tile as everything mode decodes it).")] = 256,
    model: Annotated[str, typer.Option(help="A registered model with a point grid.")] = "litemedsam-click",
    threads: ThreadsOption = None,
) -> None:
    """Print, for matched and unmatched masks, how many pass each of the grid's tests."""
    if side not in ("train", "val", "test"):
        raise typer.BadParameter("choose train, val or test", param_hint="--side")
    configure_cpu(threads)
    dataset = load_dataset(data)
    predictor = Predictor(load_model(model, encoder_backend="onnx"))
    grid = EverythingSettings(method="points").resolved(predictor.model.spec)
    frames = []
    for sample in training_split(dataset, DEFAULT_FRACTIONS, 0)[side][:images]:
        image, mask = load_pair(sample)
        labels = label_instances(mask)
        for y, x in crop_origins(image.shape, crop):
            masks = grid_masks(predictor, image[y:y + crop, x:x + crop], labels[y:y + crop, x:x + crop])
            frames.append(masks.assign(crop=len(frames)))
    rows = pd.concat(frames, ignore_index=True)
    min_area = grid.min_area_fraction * crop * crop
    rows["passes_iou"] = rows["predicted_iou"] >= grid.pred_iou_thresh
    rows["passes_stability"] = rows["stability"] >= grid.stability_thresh  # NaN (empty mask) fails
    rows["passes_area"] = rows["area"] >= min_area
    rows["passes_all"] = rows["passes_iou"] & rows["passes_stability"] & rows["passes_area"]
    rows["matched"] = rows["real_iou"] >= MATCHED_IOU
    table = rows.groupby("matched").agg(masks=("real_iou", "size"), predicted_iou=("predicted_iou", "median"),
                                        passes_iou=("passes_iou", "mean"), passes_stability=("passes_stability", "mean"),
                                        passes_area=("passes_area", "mean"), passes_all=("passes_all", "mean"))
    points = len(rows.groupby(["crop", "point"]))
    print(f"{dataset.name}, {model}: {points} grid points inside objects on {len(frames)} crops of {crop} px; "
          f"thresholds predicted IoU {grid.pred_iou_thresh}, stability {grid.stability_thresh}, area >= {min_area:.0f} px")
    print(table.round(3).to_string())


if __name__ == "__main__":
    typer.run(main)
