"""``sam4med samaug``: SAM everything-mode priors as extra input channels of a standard segmenter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sam4med.cli.options import CheckpointOption, DeviceOption, EncoderOption, EpochsOption, EverythingMethodOption
from sam4med.cli.options import MaxImagesOption, PatienceOption, PrecisionOption, PredIouThreshOption, StabilityThreshOption
from sam4med.cli.options import MaxTrainImagesOption, ModelOption, RayOption, RayWorkersOption, RunFolderOption, SeedOption
from sam4med.cli.options import ThreadsOption, TrainPrecisionOption
from sam4med.cli.options import TrainDataOption, echo_training_result, exit_if_every_image_failed, one_line_errors
from sam4med.engine.defaults import DEFAULT_MODEL
from sam4med.engine.runtime import configure_cpu

app = typer.Typer(no_args_is_help=True, help="SAMAug (arXiv 2304.11332): SAM priors for a standard segmenter.")
PriorsOption = Annotated[Optional[Path], typer.Option(help="Folder given to `sam4med samaug priors --out`; "
                                                           "needed unless the model takes raw input only.")]


@app.command()
@one_line_errors
def priors(
    data: Annotated[list[Path], typer.Option(help="Data set folder(s) (repeatable); masks are not needed.")],
    out: Annotated[Path, typer.Option(help="Priors folder; each data set goes to OUT/<data set name>/.")],
    model: ModelOption = DEFAULT_MODEL,
    checkpoint: CheckpointOption = None,
    weight: Annotated[str, typer.Option(help="Mask weight in the segmentation prior: stability (SAMAug), iou or one.")] = "stability",
    normalise: Annotated[bool, typer.Option(help="Divide the segmentation prior by its maximum (SAMAug does not).")] = False,
    tile: Annotated[int, typer.Option(help="Run everything mode on tiles of at most this size in px (0: whole image).")] = 0,
    region_proposals: Annotated[Optional[int], typer.Option(help="Box mode: region proposals per image (default 16).")] = None,
    everything_method: EverythingMethodOption = "auto",
    points_per_side: Annotated[Optional[int], typer.Option(help="Point grid: points per side of the image (or "
                                                           "tile); default: SAMAug's 32.")] = None,
    pred_iou_thresh: PredIouThreshOption = None,
    stability_thresh: StabilityThreshOption = None,
    figures: Annotated[int, typer.Option(help="Figures of image / priors / augmented input per data set.")] = 4,
    max_images: MaxImagesOption = 0,
    encoder: EncoderOption = "torch",
    precision: PrecisionOption = "fp32",
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    ray: RayOption = None,
    ray_workers: RayWorkersOption = None,
) -> None:
    """Compute SAMAug's segmentation and boundary priors from everything mode; cached and resumable, locally or
    on Ray (OUT on storage every machine shares)."""
    from sam4med.engine.executors import make_executor
    from sam4med.samaug.priors import prior_settings
    from sam4med.samaug.store import generate_priors

    executor = make_executor(ray, ray_workers, threads)
    configure_cpu(None if ray else threads)
    settings = prior_settings(model, weight, normalise, tile or None, region_proposals, everything_method,
                              points_per_side, pred_iou_thresh, stability_thresh)
    summaries = []
    for summary in generate_priors(data, out, model, checkpoint, settings, device, figures, max_images or None,
                                   encoder_backend=encoder, executor=executor, precision=precision):
        speed = f", {summary.seconds_per_item:.2f} s/image" if summary.computed else ""
        typer.echo(f"{summary.results.parent}: {summary.describe()}{speed}")
        summaries.append(summary)
    exit_if_every_image_failed(summaries)


@app.command()
@one_line_errors
def train(
    data: TrainDataOption,
    out: RunFolderOption,
    priors: PriorsOption = None,
    net: Annotated[str, typer.Option(help="unet, attention_unet or swin_unet (MONAI).")] = "unet",
    input_kind: Annotated[str, typer.Option("--input", help="raw, samaug or dual (raw + augmented every batch, SAMAug).")] = "dual",
    policy: Annotated[str, typer.Option(help="add (priors added to channels 1 and 2, SAMAug) or concat (extra channels).")] = "add",
    dual_update: Annotated[str, typer.Option(help="summed (one step on the summed loss, the paper) or alternate (two steps).")] = "summed",
    image_size: Annotated[int, typer.Option(help="Training patch side in px.")] = 128,
    scale_to: Annotated[int, typer.Option(help="Longer image side before patching (0: the patch size, whole images).")] = 0,
    patches_per_image: Annotated[int, typer.Option(help="Random patches per training image and epoch.")] = 1,
    features: Annotated[int, typer.Option(help="Width of the first network level.")] = 16,
    epochs: EpochsOption = 20,
    patience: PatienceOption = 0,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    seed: SeedOption = 0,
    split_seed: Annotated[int, typer.Option(help="Seed of the train/val/test split (kept apart from --seed).")] = 0,
    max_train_images: MaxTrainImagesOption = 0,
    precision: TrainPrecisionOption = "fp32",
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Train a U-Net / Attention U-Net / Swin-UNETR on raw, SAMAug or dual input; resumable."""
    from sam4med.samaug.training import TrainConfig
    from sam4med.samaug.training import train as train_segmenter

    configure_cpu(threads)
    config = TrainConfig(net=net, input_kind=input_kind, policy=policy, dual_update=dual_update, image_size=image_size,
                         scale_to=scale_to or None, patches_per_image=patches_per_image, features=features,
                         epochs=epochs, patience=patience or None, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                         split_seed=split_seed, max_train_images=max_train_images or None,
                         precision=precision)
    echo_training_result(out, train_segmenter(data, priors, out, config, device=device))


@app.command()
@one_line_errors
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="best.pt or last.pt of a `sam4med samaug train` run.")],
    data: Annotated[Path, typer.Option(help="Data set folder (images/; masks not needed).")],
    out: Annotated[Path, typer.Option(help="Folder for the 0/255 PNG masks.")],
    priors: PriorsOption = None,
    mode: Annotated[Optional[str], typer.Option(help="raw, aug, mean, confident or entropy; default: the model's.")] = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Segment images with a trained SAMAug segmenter."""
    from sam4med.samaug.inference import predict as predict_masks

    configure_cpu(threads)
    summary = predict_masks(checkpoint, data, out, priors, mode, device=device)
    typer.echo(f"{out}: {summary.describe('masks written')}")
    exit_if_every_image_failed([summary])


@app.command()
@one_line_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="best.pt or last.pt of a `sam4med samaug train` run.")],
    data: Annotated[list[Path], typer.Option(help="Data set folder(s) of the run (repeatable).")],
    out: Annotated[Path, typer.Option(help="Folder for metrics.csv.")],
    priors: PriorsOption = None,
    split: Annotated[str, typer.Option(help="test, val or train side of the run's split.json, or all.")] = "test",
    instances: Annotated[bool, typer.Option(help="Also AJI and object F1 on connected components (nuclei).")] = False,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Score a trained segmenter under every prediction mode: Dice, IoU, soft Dice (+ AJI, object F1)."""
    from sam4med.samaug.inference import evaluate as evaluate_segmenter

    configure_cpu(threads)
    frame = evaluate_segmenter(checkpoint, data, priors, None if split == "all" else split, instances, out, device)
    metrics = [c for c in ("dice", "iou", "soft_dice_authors", "aji", "object_f1") if c in frame]
    typer.echo(frame.groupby(["dataset", "mode"])[metrics].mean().round(4).to_string())
