"""SAMAug's comparison on the real data sets: a segmenter on raw input vs the same segmenter with SAMAug.

Priors missing from PRIORS/<generator>/<data set> are computed first for the images the experiment uses
(the preset's tiling, SAMAug's generator settings), or run experiments/samaug_priors.py beforehand.

    python experiments/samaug_comparison.py kvasir_seg --data ../shared/data/kvasir_seg \\
        --priors runs/samaug/priors --out runs/samaug/kvasir_seg --net unet --threads 2

Each preset (``sam4med.samaug.experiment.PRESETS``) fixes image size, patches, the epoch limit, the
early-stopping patience, prior tiling and metrics for one data set, identical for every arm, network and
seed. Writes OUT/metrics.csv (image x arm x seed), OUT/summary.csv, OUT/summary.png, OUT/curves.png (every
run's validation Dice and loss per epoch) and OUT/protocol.json. Killed, it resumes where it stopped.
``--trainings raw`` trains and scores the raw arms alone, which need no priors (the baseline can run
while the priors are computed elsewhere); the full run adopts those folders.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import torch
import typer

from sam4med.cli.options import DeviceOption, EncoderOption, MaxTrainImagesOption, PrecisionOption, ThreadsOption
from sam4med.engine.runtime import configure_cpu
from sam4med.samaug.experiment import PRESETS, PRIOR_GENERATORS, images_used, run_experiment, write_curves, write_summary
from sam4med.samaug.priors import prior_settings
from sam4med.samaug.store import generate_priors


def main(
    preset: Annotated[str, typer.Argument(help=f"One of {', '.join(sorted(PRESETS))}.")],
    data: Annotated[Path, typer.Option(help="The preset's data set folder.")],
    priors: Annotated[Path, typer.Option(help="Priors root: PRIORS/<generator>/<data set> (missing priors are computed).")],
    out: Annotated[Path, typer.Option(help="Results folder.")],
    generator: Annotated[str, typer.Option(help=f"Priors from {', '.join(PRIOR_GENERATORS)}.")] = "points",
    net: Annotated[str, typer.Option(help="unet or attention_unet.")] = "unet",
    seeds: Annotated[str, typer.Option(help="Comma-separated training seeds.")] = "0,1,2",
    trainings: Annotated[str, typer.Option(help="Comma-separated arms to train: raw, dual.")] = "raw,dual",
    max_train_images: MaxTrainImagesOption = 0,
    encoder: EncoderOption = "onnx",
    prior_precision: PrecisionOption = "fp32",
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Train and score every arm and seed (resumable), then write the summary table and figures."""
    if preset not in PRESETS:
        raise typer.BadParameter(f"choose one of {', '.join(sorted(PRESETS))}", param_hint="PRESET")
    if generator not in PRIOR_GENERATORS:
        raise typer.BadParameter(f"choose one of {', '.join(PRIOR_GENERATORS)}", param_hint="--generator")
    arms = [arm.strip() for arm in trainings.split(",")]
    if not arms or not set(arms) <= {"raw", "dual"}:
        raise typer.BadParameter("choose from raw, dual", param_hint="--trainings")
    configure_cpu(threads)
    chosen = PRESETS[preset]
    config = replace(chosen.config, net=net, max_train_images=max_train_images or None)
    model, method = PRIOR_GENERATORS[generator]
    settings = prior_settings(model, tile=chosen.prior_tile, method=method)
    if "dual" in arms:
        for summary in generate_priors([data], priors / generator, model, settings=settings,
                                       encoder_backend=encoder, image_ids=images_used(data, config),
                                       precision=prior_precision, device=device):
            print(f"{summary.results.parent}: {summary.computed} computed, {summary.skipped} already there, "
                  f"{summary.failed} failed")
    results = run_experiment(data, priors / generator, out, config, [int(s) for s in seeds.split(",")],
                             trainings=arms, instances=chosen.instances, device=device)
    table = write_summary(out, results)
    write_curves(out)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(table.round(4).to_string(index=False))


if __name__ == "__main__":
    typer.run(main)
