"""SAM-UNet against the zero-shot backbone and decoder-only fine-tuning, in-domain and on left-out data sets.

    python experiments/samunet_comparison.py --train ../shared/data/kvasir_seg --train ../shared/data/monuseg \\
        --train ../shared/data/isbi2012_em --left-out ../shared/data/drive --left-out ../shared/data/brain_mr \\
        --out runs/samunet/litemedsam --threads 2 [--arms decoder,samunet,samunet_cold --epochs 20 --patience 3]

CPU defaults: 4 epochs over at most 150 training images per data set, 2 images x 4 masks per step; lower
--max-train-images or --epochs to fit a budget (decoder fine-tuning is cheaper: no gradients through the
encoder). GPU recipe: --epochs 20 --images-per-step 8 --max-train-images 0. Training can run apart
(`sam4med samunet train --method decoder|samunet --out OUT/decoder|samunet`, two processes, a GPU)
and be scored with --score-only. Every arm (``sam4med.samunet.comparison.ARMS``: decoder, samunet warm
started, samunet_cold as the paper) trains in OUT/<arm> under the same budget rule (--epochs as a limit,
--patience on validation Dice). Scoring is resumable too (OUT/scoring/<row>-<weights sha256>/, the item loop's
rows). Writes OUT/scores.csv (one row per object x model), OUT/table.csv
(Dice mean, std, count per data set and model), OUT/curves.png (each arm's validation Dice and loss per
epoch) and OUT/protocol.json (configuration, data, and each run's own configuration, epochs done, best
epoch and training seconds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from sam4med.cli.options import (BackboneOption, DeviceOption, EpochsOption, MaxTrainImagesOption, PatienceOption, ThreadsOption,
                                 TrainPrecisionOption, one_line_errors)
from sam4med.cli.samunet import ImagesPerStepOption
from sam4med.engine.runtime import configure_cpu
from sam4med.samunet.comparison import ARMS, paired_gain, run_comparison
from sam4med.samunet.training import PromptTrainConfig


@one_line_errors
def main(
    train: Annotated[list[Path], typer.Option(help="Data set trained on (repeatable).")],
    out: Annotated[Path, typer.Option(help="Results folder (and each arm's run folder).")],
    left_out: Annotated[list[Path], typer.Option(help="Data set left out of training, scored on all its images "
                                                      "(repeatable).")] = [],  # noqa: B006 - typer's list default
    backbone: BackboneOption = "litemedsam",
    conv_branch: Annotated[str, typer.Option(help="resnet34 or resnet50.")] = "resnet34",
    arms: Annotated[str, typer.Option(help=f"Comma-separated trained rows: {', '.join(ARMS)}.")] = "decoder,samunet",
    epochs: EpochsOption = 4,
    patience: PatienceOption = 0,
    images_per_step: ImagesPerStepOption = 2,
    max_train_images: MaxTrainImagesOption = 150,
    max_test_images: Annotated[int, typer.Option(help="Per data set, the first N of its test images (0: all).")] = 0,
    score_only: Annotated[bool, typer.Option(help="Score the runs in OUT/<arm> as they are.")] = False,
    precision: TrainPrecisionOption = "fp32",
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Train every arm (resumable), score it and the zero-shot backbone, print the table and the paired gains."""
    configure_cpu(threads)
    chosen = [arm.strip() for arm in arms.split(",")]
    config = PromptTrainConfig(backbone=backbone, conv_branch=conv_branch, epochs=epochs, patience=patience or None,
                               images_per_step=images_per_step, max_train_images=max_train_images or None,
                               precision=precision)
    table = run_comparison(train, left_out, out, config, max_test_images or None, train=not score_only, arms=chosen,
                           device=device)
    print(table.round(4).to_string(index=False))
    scores = pd.read_csv(out / "scores.csv")
    pairs = [(arm, "zero_shot") for arm in chosen] + [(arm, "decoder") for arm in chosen
                                                       if arm != "decoder" and "decoder" in chosen]
    for row, baseline in pairs:
        gain = paired_gain(scores, row, baseline)
        gain.to_csv(out / f"gain_{row}_vs_{baseline}.csv", index=False)
        print(f"\nDice gain of {row} over {baseline} (paired by object; 95% interval resampling images):")
        print(gain.round(4).to_string(index=False))


if __name__ == "__main__":
    typer.run(main)
