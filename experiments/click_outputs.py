"""Which of a lone click's 3 masks is best, and which one the model's IoU head keeps.

    python experiments/click_outputs.py --data ../shared/data/glas --data ../shared/data/drishti_gs_od \\
        [--tiled-data ../shared/data/monuseg --tile 256] [--checkpoint runs/clicks/run/best.pt] \\
        --max-test-images 10 --out runs/clicks/outputs_v5.csv

SAM answers one click with 3 masks and keeps the one its IoU head ranks highest (the ``auto`` mask rule).
Per data set (test side of the trainers' split, seed 0; at most 20 objects per image, drawn by seed 0; a
centre click on each): the mean Dice of each output, of the best of the 3 (the ``oracle`` rule, COSMOS),
of the kept one, and how often each output is best and kept. A large gap between best and kept says the
IoU head, not the masks, is what loses Dice. Writes one CSV row per object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import pandas as pd
import typer

from sam4med.cli.options import ThreadsOption
from sam4med.engine.datasets import load_datasets
from sam4med.engine.imageio import load_pair
from sam4med.engine.metrics import dice
from sam4med.engine.models import load_model
from sam4med.engine.objects import object_labels
from sam4med.engine.prompts import Prompt, center_point
from sam4med.engine.runtime import configure_cpu
from sam4med.engine.splits import DEFAULT_FRACTIONS, training_split
from sam4med.engine.tiling import make_predictor


def main(
    out: Annotated[Path, typer.Option(help="CSV, one row per object.")],
    data: Annotated[list[Path], typer.Option(help="Data set scored on whole images (repeatable).")] = [],  # noqa: B006
    tiled_data: Annotated[list[Path], typer.Option(help="Data set scored on tiles (repeatable).")] = [],  # noqa: B006
    tile: Annotated[int, typer.Option(help="Tile core in px for --tiled-data.")] = 256,
    halo: Annotated[int, typer.Option(help="Pixels around each tile's core.")] = 32,
    checkpoint: Annotated[Optional[Path], typer.Option(help="A click run's checkpoint (default: the shipped "
                                                               "litemedsam-click weights).")] = None,
    max_test_images: Annotated[int, typer.Option(help="Test images per data set.")] = 10,
    max_objects: Annotated[int, typer.Option(help="Objects per image, drawn by seed 0 when more.")] = 20,
    threads: ThreadsOption = None,
) -> None:
    """Score each of the 3 outputs of a centre click, the best one and the kept one, per data set."""
    configure_cpu(threads)
    model = load_model("litemedsam", checkpoint, encoder_backend="onnx") if checkpoint \
        else load_model("litemedsam-click", encoder_backend="onnx")
    rows = []
    for paths, tiling in ((data, None), (tiled_data, tile)):
        for dataset in load_datasets(paths) if paths else []:
            predictor = make_predictor(model, tiling, halo)
            for sample in training_split(dataset, DEFAULT_FRACTIONS, 0)["test"][:max_test_images]:
                image, truth = load_pair(sample)
                labels, ids = object_labels(truth, min_area=16)
                chosen = np.random.default_rng(0).choice(len(ids), min(max_objects, len(ids)), replace=False)
                predictor.set_image(image)
                for index in sorted(chosen.tolist()):
                    target = labels == ids[index]
                    decoded = predictor.predict([Prompt(points=[center_point(target)])], multimask=True)
                    scores = [dice(mask, target) for mask in decoded.masks()[0]]
                    kept = int(decoded.iou[0].argmax())
                    rows.append({"dataset": dataset.name + ("" if tiling is None else f" (tiles of {tiling})"),
                                 "image": sample.id, "object": index, **{f"dice_{k}": d for k, d in enumerate(scores)},
                                 "best": int(np.argmax(scores)), "kept": kept, "dice_best": max(scores),
                                 "dice_kept": scores[kept]})
    table = pd.DataFrame(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    summary = table.groupby("dataset").agg(objects=("object", "size"), **{f"output_{k}": (f"dice_{k}", "mean")
                                                                          for k in range(3)},
                                           best=("dice_best", "mean"), kept=("dice_kept", "mean"))
    for k in range(3):
        summary[f"kept_{k}"] = table.groupby("dataset")["kept"].apply(lambda kept, k=k: float(np.mean(kept == k)))
        summary[f"best_{k}"] = table.groupby("dataset")["best"].apply(lambda best, k=k: float(np.mean(best == k)))
    print(summary.round(3).to_string())


if __name__ == "__main__":
    typer.run(main)
