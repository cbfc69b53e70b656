"""SAMAug's comparison on the real data sets: U-Net on raw input vs U-Net with SAMAug (dual training).

Priors missing from --priors are computed first for the images the experiment uses (LiteMedSAM's
everything mode, SAMAug's weights, the preset's tiling), or run `sam4med samaug priors` beforehand.

    python experiments/samaug_comparison.py monuseg --data ../shared/data/monuseg \\
        --priors runs/samaug/priors --out runs/samaug/monuseg --threads 1

Each preset fixes image size, scale, epochs, prior tiling and metrics for one data set, identical for
every arm and seed; writes OUT/metrics.csv (image x arm x seed), OUT/summary.csv and OUT/summary.png.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import torch
import typer

from sam4med.cli.options import EncoderOption, MaxTrainImagesOption, ThreadsOption
from sam4med.engine.runtime import configure_cpu
from sam4med.samaug.experiment import images_used, run_experiment, write_summary
from sam4med.samaug.priors import PriorSettings
from sam4med.samaug.store import generate_priors
from sam4med.samaug.training import TrainConfig

BASE = TrainConfig(net="unet", policy="add", dual_update="summed", image_size=128, features=16, batch_size=8,
                   learning_rate=1e-3, split_seed=0)
PRESETS = {  # training, priors, instance metrics
    # 1000 px H&E tiles: halved to 512 px so nuclei keep ~10 px, trained on 8 random 128 px patches per
    # image; priors from everything mode on 500 px tiles (a whole tile at 256 px loses the nuclei)
    "monuseg": (replace(BASE, scale_to=512, patches_per_image=8, epochs=40), PriorSettings(tile=500), True),
    # 256 px frames: whole images at 128 px; CVC split by video sequence (groups), Kvasir by seed 0
    "cvc_clinicdb": (replace(BASE, epochs=20), PriorSettings(), False),
    "kvasir_seg": (replace(BASE, epochs=20), PriorSettings(), False),
}


def main(
    preset: Annotated[str, typer.Argument(help=f"One of {', '.join(sorted(PRESETS))}.")],
    data: Annotated[Path, typer.Option(help="The preset's data set folder.")],
    priors: Annotated[Path, typer.Option(help="Priors folder (missing priors are computed).")],
    out: Annotated[Path, typer.Option(help="Results folder.")],
    seeds: Annotated[str, typer.Option(help="Comma-separated training seeds.")] = "0,1,2",
    epochs: Annotated[int, typer.Option(help="Override the preset's epochs (0: the preset's).")] = 0,
    max_train_images: MaxTrainImagesOption = 0,
    encoder: EncoderOption = "torch",
    threads: ThreadsOption = None,
) -> None:
    """Train and score every arm and seed (resumable), then write the summary table and figure."""
    if preset not in PRESETS:
        raise typer.BadParameter(f"choose one of {', '.join(sorted(PRESETS))}", param_hint="PRESET")
    configure_cpu(threads)
    config, prior_settings, instances = PRESETS[preset]
    config = replace(config, epochs=epochs or config.epochs, max_train_images=max_train_images or None)
    for summary in generate_priors([data], priors, "litemedsam", settings=prior_settings, encoder_backend=encoder,
                                   image_ids=images_used(data, config)):
        print(f"{summary.results.parent}: {summary.computed} computed, {summary.skipped} already there, "
              f"{summary.failed} failed, {summary.seconds_per_item:.2f} s/image")
    results = run_experiment(data, priors, out, config, [int(s) for s in seeds.split(",")], instances=instances)
    table = write_summary(out, results)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(table.round(4).to_string(index=False))


if __name__ == "__main__":
    typer.run(main)
