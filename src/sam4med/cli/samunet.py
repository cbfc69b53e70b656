"""``sam4med samunet``: SAM-UNet and the mask-decoder fine-tuning baseline."""

from __future__ import annotations

from typing import Annotated

import typer

from sam4med.cli.options import BackboneOption, CheckpointOption, DeviceOption, EpochsOption, MaxTrainImagesOption
from sam4med.cli.options import RunFolderOption, SeedOption, ThreadsOption, TrainDataOption, echo_training_result
from sam4med.cli.options import PatienceOption, TrainPrecisionOption, one_line_errors, recorded_path
from sam4med.engine.runtime import configure_cpu

app = typer.Typer(no_args_is_help=True, help="SAM-UNet (arXiv 2408.09886): a conv branch beside the frozen SAM encoder.")
ImagesPerStepOption = Annotated[int, typer.Option(help="Training images per optimiser step.")]
MasksPerImageOption = Annotated[int, typer.Option(help="Objects (box prompts) drawn from each image per step.")]
LearningRateOption = Annotated[float, typer.Option(help="Adam learning rate (halved every 2 epochs).")]


@app.command()
@one_line_errors
def train(
    data: TrainDataOption,
    out: RunFolderOption,
    method: Annotated[str, typer.Option(help="samunet, or decoder: fine-tune only the backbone's mask decoder "
                                             "(the COSMOS / MedSAM baseline).")] = "samunet",
    backbone: BackboneOption = "litemedsam",
    checkpoint: CheckpointOption = None,
    conv_branch: Annotated[str, typer.Option(help="SAM-UNet: resnet34 or resnet50 (timm, randomly initialised).")] = "resnet34",
    cold_start: Annotated[bool, typer.Option(help="SAM-UNet: start the new output token and feature paths from random "
                                                   "values (the paper) instead of from the backbone's output.")] = False,
    epochs: EpochsOption = 4,
    patience: PatienceOption = 0,
    images_per_step: ImagesPerStepOption = 2,
    masks_per_image: MasksPerImageOption = 4,
    learning_rate: LearningRateOption = 1e-4,
    seed: SeedOption = 0,
    max_train_images: MaxTrainImagesOption = 0,
    precision: TrainPrecisionOption = "fp32",
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Train SAM-UNet (or fine-tune the mask decoder) on box prompts jittered by up to 5 px; resumable."""
    from sam4med.samunet.training import PromptTrainConfig, train_promptable

    configure_cpu(threads)
    config = PromptTrainConfig(method=method, backbone=backbone, backbone_checkpoint=recorded_path(checkpoint),
                               conv_branch=conv_branch, warm_start=not cold_start, epochs=epochs, patience=patience or None,
                               images_per_step=images_per_step, masks_per_image=masks_per_image,
                               learning_rate=learning_rate, seed=seed, max_train_images=max_train_images or None,
                               precision=precision)
    echo_training_result(out, train_promptable(data, out, config, device),
                         f"; use with --model {backbone} --checkpoint {out / 'best.pt'}")
