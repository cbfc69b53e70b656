"""The ``sam4med`` command line: one verb per stage, each a thin shell over a documented function."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer

from sam4med.engine.errors import InputError
from sam4med.engine.runtime import configure_cpu

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Segment Anything for medical images.")
F = TypeVar("F", bound=Callable[..., object])


def _one_line_errors(command: F) -> F:
    """Bad input ends the command with one line naming the file or argument, exit status 2."""

    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return command(*args, **kwargs)
        except InputError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


ModelOption = Annotated[str, typer.Option(help="Registered model: litemedsam (bundled), medsam, mobilesam, sam_vit_b/l/h.")]
CheckpointOption = Annotated[Optional[Path], typer.Option(help="Weights file; required for every model but litemedsam.")]
DeviceOption = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, ...; default: CUDA when present.")]
ThreadsOption = Annotated[Optional[int], typer.Option(help="CPU threads for PyTorch (default: PyTorch's choice).")]
TrainDataOption = Annotated[list[Path], typer.Option(help="Data set folder(s) (repeatable); split per data set.")]
RunFolderOption = Annotated[Path, typer.Option(help="Run folder (config.json, split.json, history.jsonl, best.pt, "
                                                    "last.pt).")]
MaxTrainImagesOption = Annotated[int, typer.Option(help="Training images per data set (0: all).")]
EncoderOption = Annotated[str, typer.Option(help="Image encoder backend: torch, or onnx (ONNX Runtime, CPU; "
                                                 "pip install onnxruntime).")]


@app.command()
def models() -> None:
    """List the registered models and how each preprocesses its input."""
    from sam4med.engine.models import MODELS

    for spec in MODELS.values():
        weights = "bundled" if spec.bundled_checkpoint else "--checkpoint"
        points = "points+boxes" if spec.takes_point_prompts else "boxes only"
        typer.echo(f"{spec.name:11s} {spec.image_size:5d}px  {spec.resize:12s} {spec.normalisation:9s} "
                   f"{points:12s} {weights:12s} {spec.description}")


@app.command()
@_one_line_errors
def benchmark(
    data: Annotated[list[Path], typer.Option(help="Data set folder(s) in the sam4med layout (repeatable).")],
    out: Annotated[Path, typer.Option(help="Results folder (results.jsonl, protocol.json, overlays/).")],
    model: ModelOption = "litemedsam",
    checkpoint: CheckpointOption = None,
    modes: Annotated[str, typer.Option(help="Comma-separated prompt modes.")] = "",
    mask_rule: Annotated[Optional[str], typer.Option(help="single, oracle (COSMOS) or iou (SAM-Med2D); default: the model's.")] = None,
    seed: int = 0,
    jitter: Annotated[float, typer.Option(help="box_jitter amount.")] = 5.0,
    jitter_unit: Annotated[str, typer.Option(help="px or percent (of the box side).")] = "px",
    jitter_kind: Annotated[str, typer.Option(help="corners, shift or scale.")] = "corners",
    points_sampler: Annotated[str, typer.Option(help="stride (COSMOS) or random, for pointsK modes.")] = "stride",
    negative_region: Annotated[str, typer.Option(help="double_box (COSMOS) or image (SAM-Med2D).")] = "double_box",
    interactive_start: Annotated[str, typer.Option(help="box or point_center.")] = "box",
    rounds: Annotated[int, typer.Option(help="Corrective clicks in interactive mode.")] = 5,
    click_rule: Annotated[str, typer.Option(help="largest (RITM) or random (SAM-Med2D) error click.")] = "largest",
    one_object: Annotated[bool, typer.Option(help="Treat each mask as one object instead of its connected components.")] = False,
    max_objects: Annotated[int, typer.Option(help="Objects per image, drawn by seed when more (0: all).")] = 20,
    max_images: Annotated[int, typer.Option(help="Images per data set (0: all).")] = 0,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Embedding cache folder (re-runs skip the encoder).")] = None,
    encoder: EncoderOption = "torch",
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Evaluate a model on data sets under every prompt mode (COSMOS protocol); resumable."""
    from sam4med.evaluation.benchmark import BenchmarkConfig, run_benchmark
    from sam4med.evaluation.modes import DEFAULT_MODES, PromptSettings

    configure_cpu(threads)
    config = BenchmarkConfig(
        model=model,
        checkpoint=str(checkpoint) if checkpoint else None,
        modes=tuple(m.strip() for m in modes.split(",") if m.strip()) or DEFAULT_MODES,
        mask_rule=mask_rule,
        seed=seed,
        as_one_object=one_object,
        max_objects_per_image=max_objects or None,
        max_images=max_images or None,
        prompts=PromptSettings(jitter, jitter_unit, jitter_kind, points_sampler, negative_region,
                               interactive_start, rounds, click_rule),
    )
    results = run_benchmark(data, out, config, device=device, cache_dir=cache_dir, encoder_backend=encoder)
    _print_summary(results.parent)


def _print_summary(results_dir: Path) -> None:
    from rich.console import Console

    from sam4med.evaluation.summary import failures, load_results, mean_table

    frame = load_results(results_dir)
    console = Console()
    console.print("mean Dice (data set x mode):")
    console.print(mean_table(frame, "dice").round(3).to_string())
    failed = failures(frame)
    if len(failed):
        console.print(f"{len(failed)} image(s) failed; see {results_dir / 'results.jsonl'} (status = error)")


@app.command()
@_one_line_errors
def report(results: Annotated[Path, typer.Argument(help="Results folder of a benchmark run.")]) -> None:
    """Write tables (CSV) and an HTML report with plots and example overlays."""
    from sam4med.evaluation.report import write_report

    if not (results / "results.jsonl").exists():
        raise InputError(f"{results}: no results.jsonl here (run `sam4med benchmark --out {results}` first)")
    typer.echo(str(write_report(results)))


@app.command()
@_one_line_errors
def demo(
    out: Annotated[Path, typer.Option(help="Where the demo data, results and report go.")] = Path("runs/demo"),
    threads: ThreadsOption = None,
) -> None:
    """The main job on the bundled default: LiteMedSAM, 9 prompt modes on an offline phantom data set."""
    from sam4med.evaluation.benchmark import BenchmarkConfig, run_benchmark
    from sam4med.evaluation.demo import build_demo_dataset
    from sam4med.evaluation.report import write_report

    configure_cpu(threads)
    dataset = build_demo_dataset(out / "data")
    results = run_benchmark([dataset], out / "results", BenchmarkConfig(max_objects_per_image=4))
    _print_summary(results.parent)
    typer.echo(f"report: {write_report(results.parent)}")


def _parse_point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--point '{text}': expected X,Y") from None
    return x, y


@app.command()
@_one_line_errors
def segment(
    image: Annotated[Path, typer.Argument(help="Image file (PNG, JPG, TIFF; 8/16 bit; gray, RGB or RGBA).")],
    out: Annotated[Path, typer.Option(help="Output mask PNG (0/255).")],
    box: Annotated[Optional[tuple[float, float, float, float]], typer.Option(help="x0 y0 x1 y1 in pixels.")] = None,
    point: Annotated[Optional[list[str]], typer.Option(help="X,Y in pixels (repeatable).")] = None,
    label: Annotated[Optional[list[int]], typer.Option(help="1 (object) or 0 (background) per --point.")] = None,
    overlay: Annotated[Optional[Path], typer.Option(help="Also write the mask drawn over the image.")] = None,
    model: ModelOption = "litemedsam",
    checkpoint: CheckpointOption = None,
    mask_rule: Annotated[Optional[str], typer.Option(help="single or iou; default: the model's.")] = None,
    device: DeviceOption = None,
) -> None:
    """Segment one object in one image from a box and/or points."""
    import numpy as np
    from PIL import Image

    from sam4med.engine.data import read_image
    from sam4med.engine.models import load_model
    from sam4med.engine.predictor import Predictor
    from sam4med.engine.prompts import Prompt
    from sam4med.engine.segment import segment_image

    configure_cpu()
    points = [_parse_point(p) for p in point or []]
    if label and len(label) != len(points):
        raise InputError(f"--label given {len(label)} times for {len(points)} --point")
    prompt = Prompt(points=points or None, labels=label or None, box=box)
    pixels = read_image(image)
    mask = segment_image(Predictor(load_model(model, checkpoint, device)), pixels, prompt, mask_rule)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((mask * 255).astype(np.uint8)).save(out)
    if overlay:
        from sam4med.evaluation.report import write_overlay

        write_overlay(overlay, pixels, mask, [{"mode": "segment", "object": 0, "_mask": mask}])
    typer.echo(f"{out}: {int(mask.sum())} foreground pixels")


@app.command("segment-volume")
@_one_line_errors
def segment_volume_command(
    volume: Annotated[Path, typer.Argument(help="NIfTI, NRRD, MHA or a DICOM series folder.")],
    box3d: Annotated[tuple[float, float, float, float, float, float], typer.Option(help="x0 y0 z0 x1 y1 z1 (voxels).")],
    out: Annotated[Path, typer.Option(help="Output label volume (.nii.gz, .nrrd, ...), aligned with the input.")],
    axis: Annotated[int, typer.Option(help="Slicing axis of the (z, y, x) array: 0 axial, 1 coronal, 2 sagittal; "
                                           "the box's z is the index along it.")] = 0,
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
    model: ModelOption = "litemedsam",
    checkpoint: CheckpointOption = None,
    device: DeviceOption = None,
) -> None:
    """Segment one object in a volume from a 3D box, propagated slice by slice from the middle."""
    from sam4med.engine.models import load_model
    from sam4med.engine.predictor import Predictor
    from sam4med.engine.segment import segment_volume
    from sam4med.engine.volumes import read_volume, window, write_label_volume

    import numpy as np

    configure_cpu()
    if axis not in (0, 1, 2):
        raise InputError(f"--axis {axis}: must be 0, 1 or 2")
    image = read_volume(volume)
    windowed = np.moveaxis(window(image.array, lower_percentile, upper_percentile), axis, 0)
    labels = segment_volume(Predictor(load_model(model, checkpoint, device)), list(windowed), box3d)
    labels = np.moveaxis(labels, 0, axis)
    write_label_volume(labels.astype("uint8"), image, out)
    typer.echo(f"{out}: {int(labels.sum())} foreground voxels in {int(labels.any(axis=(1, 2)).sum())} slices")


@app.command()
@_one_line_errors
def priors(
    data: Annotated[list[Path], typer.Option(help="Data set folder(s) (repeatable); masks are not needed.")],
    out: Annotated[Path, typer.Option(help="Priors folder; each data set goes to OUT/<data set name>/.")],
    model: ModelOption = "litemedsam",
    checkpoint: CheckpointOption = None,
    weight: Annotated[str, typer.Option(help="Mask weight in the segmentation prior: stability (SAMAug), iou or one.")] = "stability",
    normalise: Annotated[bool, typer.Option(help="Divide the segmentation prior by its maximum (SAMAug does not).")] = False,
    tile: Annotated[int, typer.Option(help="Run everything mode on tiles of this size in px (0: whole image).")] = 0,
    region_proposals: Annotated[Optional[int], typer.Option(help="Box mode: region proposals per image (default 16).")] = None,
    figures: Annotated[int, typer.Option(help="Figures of image / priors / augmented input per data set.")] = 4,
    max_images: Annotated[int, typer.Option(help="Images per data set (0: all).")] = 0,
    encoder: EncoderOption = "torch",
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Compute SAMAug's segmentation and boundary priors from everything mode; cached and resumable."""
    from dataclasses import replace

    from sam4med.engine.models import MODELS
    from sam4med.samaug.priors import WEIGHTS, PriorSettings, samaug_everything_settings
    from sam4med.samaug.store import generate_priors

    configure_cpu(threads)
    if weight not in WEIGHTS:
        raise InputError(f"--weight {weight!r}: choose one of {', '.join(WEIGHTS)}")
    if model not in MODELS:
        raise InputError(f"--model {model!r}: not registered (see `sam4med models`)")
    everything = samaug_everything_settings(MODELS[model].takes_point_prompts)
    if region_proposals is not None:
        everything = replace(everything, region_proposals=region_proposals)
    settings = PriorSettings(weight=weight, normalise=normalise, tile=tile or None, everything=everything)  # type: ignore[arg-type]
    for summary in generate_priors(data, out, model, checkpoint, settings, device, figures, max_images or None,
                                   encoder_backend=encoder):
        typer.echo(f"{summary.folder}: {summary.computed} computed, {summary.skipped} already there, "
                   f"{summary.failed} failed, {summary.seconds_per_image:.2f} s/image")


@app.command()
@_one_line_errors
def train(
    data: TrainDataOption,
    out: RunFolderOption,
    priors: Annotated[Optional[Path], typer.Option(help="Folder given to `sam4med priors --out`; needed unless --input raw.")] = None,
    net: Annotated[str, typer.Option(help="unet, attention_unet or swin_unet (MONAI).")] = "unet",
    input: Annotated[str, typer.Option(help="raw, samaug or dual (raw + augmented every batch, SAMAug).")] = "dual",
    policy: Annotated[str, typer.Option(help="add (priors added to channels 1 and 2, SAMAug) or concat (extra channels).")] = "add",
    dual_update: Annotated[str, typer.Option(help="summed (one step on the summed loss, the paper) or alternate (two steps).")] = "summed",
    image_size: Annotated[int, typer.Option(help="Training patch side in px.")] = 128,
    scale_to: Annotated[int, typer.Option(help="Longer image side before patching (0: the patch size, whole images).")] = 0,
    patches_per_image: Annotated[int, typer.Option(help="Random patches per training image and epoch.")] = 1,
    features: Annotated[int, typer.Option(help="Width of the first network level.")] = 16,
    epochs: int = 20,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    seed: int = 0,
    split_seed: Annotated[int, typer.Option(help="Seed of the train/val/test split (kept apart from --seed).")] = 0,
    max_train_images: MaxTrainImagesOption = 0,
    threads: ThreadsOption = None,
) -> None:
    """Train a U-Net / Attention U-Net / Swin-UNETR on raw, SAMAug or dual input; resumable."""
    from sam4med.samaug.training import TrainConfig
    from sam4med.samaug.training import train as train_segmenter

    configure_cpu(threads)
    config = TrainConfig(net=net, input=input, policy=policy, dual_update=dual_update, image_size=image_size,
                         scale_to=scale_to or None, patches_per_image=patches_per_image, features=features, epochs=epochs, batch_size=batch_size,
                         learning_rate=learning_rate, seed=seed, split_seed=split_seed,
                         max_train_images=max_train_images or None)
    result = train_segmenter(data, priors, out, config)
    typer.echo(f"{out}: best validation Dice {result.best_val_dice:.4f} at epoch {result.best_epoch}, "
               f"{result.seconds / 60:.1f} min of training")


@app.command()
@_one_line_errors
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="best.pt or last.pt of a `sam4med train` run.")],
    data: Annotated[Path, typer.Option(help="Data set folder (images/; masks not needed).")],
    out: Annotated[Path, typer.Option(help="Folder for the 0/255 PNG masks.")],
    priors: Annotated[Optional[Path], typer.Option(help="Priors folder (for models trained with priors).")] = None,
    mode: Annotated[Optional[str], typer.Option(help="raw, aug, mean, confident or entropy; default: the model's.")] = None,
    threads: ThreadsOption = None,
) -> None:
    """Segment images with a trained SAMAug segmenter."""
    from sam4med.samaug.inference import predict as predict_masks

    configure_cpu(threads)
    typer.echo(f"{out}: {predict_masks(checkpoint, data, out, priors, mode)} masks")


@app.command()
@_one_line_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="best.pt or last.pt of a `sam4med train` run.")],
    data: Annotated[list[Path], typer.Option(help="Data set folder(s) of the run (repeatable).")],
    out: Annotated[Path, typer.Option(help="Folder for metrics.csv.")],
    priors: Annotated[Optional[Path], typer.Option(help="Priors folder (for models trained with priors).")] = None,
    split: Annotated[str, typer.Option(help="test, val or train side of the run's split.json, or all.")] = "test",
    instances: Annotated[bool, typer.Option(help="Also AJI and object F1 on connected components (nuclei).")] = False,
    threads: ThreadsOption = None,
) -> None:
    """Score a trained segmenter under every prediction mode: Dice, IoU, soft Dice (+ AJI, object F1)."""
    from sam4med.samaug.inference import evaluate as evaluate_segmenter

    configure_cpu(threads)
    frame = evaluate_segmenter(checkpoint, data, priors, None if split == "all" else split, instances, out)
    metrics = [c for c in ("dice", "iou", "soft_dice_authors", "aji", "object_f1") if c in frame]
    typer.echo(frame.groupby(["dataset", "mode"])[metrics].mean().round(4).to_string())


def _train_promptable(method: str, data: list[Path], out: Path, backbone: str, checkpoint: Optional[Path],
                      epochs: int, images_per_step: int, masks_per_image: int, learning_rate: float, seed: int,
                      max_train_images: int, conv_branch: str = "resnet34", device: Optional[str] = None,
                      warm_start: bool = True) -> None:
    from sam4med.samunet.training import PromptTrainConfig, train_promptable

    config = PromptTrainConfig(method=method, backbone=backbone,
                               backbone_checkpoint=str(checkpoint) if checkpoint else None, conv_branch=conv_branch,
                               warm_start=warm_start, epochs=epochs, images_per_step=images_per_step,
                               masks_per_image=masks_per_image,
                               learning_rate=learning_rate, seed=seed, max_train_images=max_train_images or None)
    result = train_promptable(data, out, config, device)
    typer.echo(f"{out}: best validation Dice {result.best_val_dice:.4f} at epoch {result.best_epoch}, "
               f"{result.seconds / 60:.1f} min of training; use with --model {backbone} --checkpoint {out / 'best.pt'}")


@app.command("train-samunet")
@_one_line_errors
def train_samunet(
    data: TrainDataOption,
    out: RunFolderOption,
    backbone: Annotated[str, typer.Option(help="Registered SAM backbone (frozen encoder).")] = "litemedsam",
    checkpoint: CheckpointOption = None,
    conv_branch: Annotated[str, typer.Option(help="resnet34 or resnet50 (timm, randomly initialised).")] = "resnet34",
    cold_start: Annotated[bool, typer.Option(help="Start the new output token and feature paths from random "
                                                   "values (the paper) instead of from the backbone's output.")] = False,
    epochs: Annotated[int, typer.Option(help="Epochs (CPU default; a GPU recipe: 20+ epochs, 8 images per step).")] = 4,
    images_per_step: int = 2,
    masks_per_image: int = 4,
    learning_rate: float = 1e-4,
    seed: int = 0,
    max_train_images: MaxTrainImagesOption = 0,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Train SAM-UNet on box prompts jittered by up to 5 px; resumable."""
    configure_cpu(threads)
    _train_promptable("samunet", data, out, backbone, checkpoint, epochs, images_per_step, masks_per_image,
                      learning_rate, seed, max_train_images, conv_branch, device, warm_start=not cold_start)


@app.command()
@_one_line_errors
def finetune(
    data: TrainDataOption,
    out: RunFolderOption,
    backbone: Annotated[str, typer.Option(help="Registered SAM backbone.")] = "litemedsam",
    checkpoint: CheckpointOption = None,
    epochs: int = 4,
    images_per_step: int = 2,
    masks_per_image: int = 4,
    learning_rate: float = 1e-4,
    seed: int = 0,
    max_train_images: MaxTrainImagesOption = 0,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Fine-tune only the backbone's mask decoder on jittered box prompts (the COSMOS / MedSAM baseline)."""
    configure_cpu(threads)
    _train_promptable("decoder", data, out, backbone, checkpoint, epochs, images_per_step, masks_per_image,
                      learning_rate, seed, max_train_images, device=device)
