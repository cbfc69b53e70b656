"""The ``sam4med`` command line: engine verbs at the top, one group of verbs per method, each verb a
thin shell over one documented function (as micro-sam's are)."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from sam4med.cli import clicks, evaluation, samaug, samunet
from sam4med.cli.options import (
    CheckpointOption,
    CorrectionOption,
    DeviceOption,
    EncoderOption,
    EverythingMethodOption,
    HaloOption,
    ModelOption,
    OneLineErrorsGroup,
    PointsPerSideOption,
    PrecisionOption,
    PredIouThreshOption,
    SegmentMaskRuleOption,
    StabilityThreshOption,
    ThreadsOption,
    TileOption,
    exit_if_every_image_failed,
    one_line_errors,
)
from sam4med.engine.errors import InputError
from sam4med.engine.defaults import DEFAULT_MODEL
from sam4med.engine.runtime import check_threads, configure_cpu

if TYPE_CHECKING:
    from collections.abc import Callable

    from sam4med.engine.items import ItemRunSummary
    from sam4med.engine.predictor import Predictor
    from sam4med.engine.segment import DeferredPredictor, PromptMasks

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Segment Anything for medical images.",
                  cls=OneLineErrorsGroup)
app.add_typer(evaluation.app, name="eval")
app.add_typer(samaug.app, name="samaug")
app.add_typer(samunet.app, name="samunet")
app.add_typer(clicks.app, name="clicks")


@app.command()
def models() -> None:
    """List the registered models and how each preprocesses its input."""
    from sam4med.engine.registry import MODELS

    for spec in MODELS.values():
        weights = "bundled" if spec.bundled_checkpoint else "--checkpoint"
        points = "points+boxes" if spec.takes_point_prompts else "boxes only"
        default = " (default)" if spec.name == DEFAULT_MODEL else ""
        typer.echo(f"{spec.name:17s} {spec.image_size:5d}px  {spec.resize:12s} {spec.normalisation:9s} "
                   f"{points:12s} {weights:12s} {spec.description}{default}")


def _parse_point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--point '{text}': expected X,Y") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise InputError(f"--point '{text}': X and Y must be finite numbers")
    return x, y


@app.command()
@one_line_errors
def segment(
    image: Annotated[Path, typer.Argument(help="Image file: PNG, JPG, TIFF, BMP (8/16 bit; gray, RGB or RGBA), or 2D DICOM, NIfTI, MHA, NRRD.")],
    out: Annotated[Path, typer.Option(help="Output mask PNG (0/255).")],
    box: Annotated[Optional[tuple[float, float, float, float]], typer.Option(help="x0 y0 x1 y1 in pixels.")] = None,
    point: Annotated[Optional[list[str]], typer.Option(help="X,Y in pixels (repeatable).")] = None,
    label: Annotated[Optional[list[int]], typer.Option(help="1 (object) or 0 (background) per --point.")] = None,
    overlay: Annotated[Optional[Path], typer.Option(help="Also write the mask drawn over the image.")] = None,
    model: ModelOption = DEFAULT_MODEL,
    checkpoint: CheckpointOption = None,
    mask_rule: SegmentMaskRuleOption = None,
    tile: TileOption = 0,
    halo: HaloOption = 32,
    device: DeviceOption = None,
    runtime: Annotated[str, typer.Option(help="auto (ONNX Runtime alone where it serves: no PyTorch import, graphs "
                                              "exported once), onnx, openvino (the same graphs, the encoder "
                                              "compiled by OpenVINO; in bf16 with --precision bf16), or "
                                              "torch.")] = "auto",
    int8: Annotated[bool, typer.Option("--int8", help="The encoder's int8 copy (ONNX Runtime path): faster, "
                                                      "slightly different embedding.")] = False,
    precision: PrecisionOption = "fp32",
    threads: ThreadsOption = None,
) -> None:
    """Segment one object in one image from a box and/or points."""
    from sam4med.engine.prompts import Prompt
    from sam4med.engine.segment import segment_image_file

    points = [_parse_point(p) for p in point or []]
    if label and len(label) != len(points):
        raise InputError(f"--label given {len(label)} times for {len(points)} --point")
    try:
        prompt = Prompt(points=points or None, labels=label or None, box=box)
    except InputError as error:  # name the options the prompt came from
        given = " ".join(name for name, value in (("--box", box), ("--point", points), ("--label", label)) if value)
        raise InputError(f"{given or '--box, --point'}: {error}") from None
    predictor = _predictor_source(model, checkpoint, tile, halo, device, runtime, int8, precision, threads)
    mask = segment_image_file(predictor, image, prompt, out, overlay, mask_rule)
    typer.echo(f"{out}: {int(mask.sum())} foreground pixels")


def _predictor_source(model: str, checkpoint: Path | None, tile: int, halo: int, device: str | None, runtime: str,
                      int8: bool, precision: str, threads: int | None) -> DeferredPredictor:
    """How ``segment`` and ``segment-folder`` make their predictor once every argument is checked: on ONNX
    Runtime alone where it serves (``choose_runtime``), else on PyTorch."""
    from sam4med.engine.errors import check_tiling
    from sam4med.engine.onnx_predictor import check_encoder_graph, choose_runtime, onnx_predictor
    from sam4med.engine.registry import model_spec
    from sam4med.engine.segment import DeferredPredictor

    check_tiling(tile or None, halo)
    check_threads(threads)
    spec = model_spec(model)
    chosen = choose_runtime(runtime, spec, checkpoint, device, tile, precision)
    if chosen in ("onnx", "openvino"):
        check_encoder_graph(int8, chosen == "openvino")  # before anything is read or exported
        configure_cpu()
        if runtime != "auto" or int8:
            make = partial(onnx_predictor, model, threads, int8=int8, openvino=chosen == "openvino",
                           bf16=precision == "bf16")
        else:
            make = partial(_onnx_or_torch, model, threads)
    elif int8:
        raise InputError("--int8: only on the ONNX Runtime path (--runtime auto or onnx, without --checkpoint, "
                         "--device, --tile or --precision bf16)")
    else:
        make = _torch_predictor_source(model, checkpoint, tile, halo, device, precision, threads)
    # a run's checkpoint may add clicks to a box-only model: then only the made predictor tells
    return DeferredPredictor(make, model, None if checkpoint else spec.takes_point_prompts)


def _onnx_or_torch(model: str, threads: int | None) -> PromptMasks:
    """``--runtime auto``'s predictor: ONNX Runtime's, or PyTorch's where the exported graphs cannot be kept (a
    read-only home, a full disk), which serves the same masks more slowly rather than failing."""
    from sam4med.engine.onnx_predictor import cache_root, onnx_predictor
    from sam4med.engine.runs import warn

    try:
        return onnx_predictor(model, threads)
    except OSError as error:
        warn(f"{error.filename or cache_root()}: cannot keep the exported ONNX graphs there "
             f"({error.strerror or error}); running on PyTorch (SAM4MED_CACHE names another cache folder)")
    return _torch_predictor_source(model, None, 0, 0, None, "fp32", threads)()  # what auto chose onnx for


def _torch_predictor_source(model: str, checkpoint: Path | None, tile: int, halo: int, device: str | None,
                            precision: str, threads: int | None, encoder: str = "torch") -> Callable[[], Predictor]:
    """A PyTorch predictor (tiled with ``tile``) made on first call, the process set up for ``threads`` now."""
    from sam4med.engine.models import load_model
    from sam4med.engine.tiling import make_predictor

    configure_cpu(threads)
    return lambda: make_predictor(load_model(model, checkpoint, device, encoder_backend=encoder, precision=precision),
                                  tile or None, halo)


@app.command("segment-folder")
@one_line_errors
def segment_folder(
    folder: Annotated[Path, typer.Argument(help="Folder of images (PNG, JPG, TIFF, BMP, 2D DICOM, NIfTI, MHA, NRRD).")],
    prompts: Annotated[Path, typer.Option(help="CSV, one object per row: image (its path in FOLDER), label, a box "
                                               "x0,y0,x1,y1 and/or points ('x y;x y') with labels ('1;0').")],
    out: Annotated[Path, typer.Option(help="Results folder: masks/ (a label PNG per image), results.jsonl, "
                                           "protocol.json.")],
    model: ModelOption = DEFAULT_MODEL,
    checkpoint: CheckpointOption = None,
    mask_rule: SegmentMaskRuleOption = None,
    tile: TileOption = 0,
    halo: HaloOption = 32,
    device: DeviceOption = None,
    runtime: Annotated[str, typer.Option(help="auto (ONNX Runtime where it serves), onnx, openvino (its encoder "
                                              "compiled by OpenVINO; in bf16 with --precision bf16), or "
                                              "torch.")] = "auto",
    int8: Annotated[bool, typer.Option("--int8", help="The encoder's int8 copy (ONNX Runtime path).")] = False,
    precision: PrecisionOption = "fp32",
    threads: ThreadsOption = None,
) -> None:
    """Segment every object of a prompt table over a folder of images: one label map per image; resumable."""
    from sam4med.engine.segment import segment_folder as run

    predictor = _predictor_source(model, checkpoint, tile, halo, device, runtime, int8, precision, threads)
    summary = run(predictor, folder, prompts, out, mask_rule)
    _echo_folder_summary(out, summary)


def _echo_folder_summary(out: Path, summary: ItemRunSummary) -> None:
    typer.echo(f"{out}: {summary.describe('images segmented')}")
    exit_if_every_image_failed([summary])


@app.command("segment-everything")
@one_line_errors
def segment_everything(
    folder: Annotated[Path, typer.Argument(help="Folder of images, or a data set folder (its images/).")],
    out: Annotated[Path, typer.Option(help="Results folder: masks/ (a 16-bit instance PNG per image), "
                                           "results.jsonl, protocol.json.")],
    model: ModelOption = DEFAULT_MODEL,
    checkpoint: CheckpointOption = None,
    everything_method: EverythingMethodOption = "auto",
    points_per_side: PointsPerSideOption = 16,
    pred_iou_thresh: PredIouThreshOption = None,
    stability_thresh: StabilityThreshOption = None,
    min_visible: Annotated[Optional[float], typer.Option(help="Drop a mask once less than this share of it is left "
                                                              "to it (masks claim pixels best score first); default: "
                                                              "engine.segment.MIN_VISIBLE, 0.8.")] = None,
    tile: TileOption = 0,
    halo: HaloOption = 32,
    device: DeviceOption = None,
    encoder: EncoderOption = "onnx",
    precision: PrecisionOption = "fp32",
    threads: ThreadsOption = None,
) -> None:
    """Every object everything mode finds in each image of a folder: an instance label map per image; resumable."""
    from sam4med.engine.errors import check_precision, check_tiling
    from sam4med.engine.everything import EverythingSettings
    from sam4med.engine.segment import segment_everything as run

    check_tiling(tile or None, halo)
    check_precision(precision)
    check_threads(threads)
    settings = EverythingSettings(method=everything_method, points_per_side=points_per_side,  # type: ignore[arg-type]
                                  pred_iou_thresh=pred_iou_thresh, stability_thresh=stability_thresh)
    predictor = _torch_predictor_source(model, checkpoint, tile, halo, device, precision, threads, encoder)
    summary = run(predictor, folder, out, settings, min_visible)
    _echo_folder_summary(out, summary)


@app.command("segment-volume")
@one_line_errors
def segment_volume(
    volume: Annotated[Path, typer.Argument(help="NIfTI, NRRD, MHA or a DICOM series folder.")],
    box3d: Annotated[tuple[float, float, float, float, float, float], typer.Option(help="x0 y0 z0 x1 y1 z1 (voxels).")],
    out: Annotated[Path, typer.Option(help="Output label volume (.nii.gz, .nrrd, ...), aligned with the input.")],
    axis: Annotated[int, typer.Option(help="Slicing axis of the (z, y, x) array: 0 axial, 1 coronal, 2 sagittal; "
                                           "the box's z is the index along it.")] = 0,
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
    model: ModelOption = DEFAULT_MODEL,
    checkpoint: CheckpointOption = None,
    tile: TileOption = 0,
    halo: HaloOption = 32,
    precision: PrecisionOption = "fp32",
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Segment one object in a volume from a 3D box, propagated slice by slice from the middle."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sam4med.engine.errors import check_tiling
    from sam4med.engine.segment import segment_volume_file

    check_tiling(tile or None, halo)
    check_threads(threads)
    console = Console()
    with Progress(TextColumn("propagate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                  transient=True, disable=not console.is_terminal) as bar:  # a CT of hundreds of slices takes minutes
        slices_done = bar.add_task("propagate", total=None, visible=False)  # shown from the first slice, not the load
        labels = segment_volume_file(_torch_predictor_source(model, checkpoint, tile, halo, device, precision, threads),
                                     volume, box3d, out, axis, (lower_percentile, upper_percentile),
                                     lambda done, total: bar.update(slices_done, completed=done, total=total,
                                                                    visible=True))
    typer.echo(f"{out}: {int(labels.sum())} foreground voxels in "
               f"{int(labels.any(axis=tuple(a for a in range(3) if a != axis)).sum())} slices")


@app.command()
@one_line_errors
def annotate(
    folder: Annotated[Path, typer.Argument(help="A data set folder (images/, masks/) or a folder of images.")],
    port: Annotated[int, typer.Option(help="Port of the page.")] = 8765,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    open_browser: Annotated[bool, typer.Option("--open", help="Open the page in the default browser.")] = False,
    model: ModelOption = DEFAULT_MODEL,
    checkpoint: CheckpointOption = None,
    encoder: EncoderOption = "torch",
    precision: PrecisionOption = "fp32",
    tile: TileOption = 0,
    halo: HaloOption = 32,
    correction: CorrectionOption = "auto",
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Annotate in the browser: box or click, correct, brush, save masks in the data set layout."""
    from sam4med.annotate.server import annotate_folder

    configure_cpu(threads)
    annotate_folder(folder, model, checkpoint, device, host, port, open_browser, encoder, tile or None, halo,
                    precision, correction)  # type: ignore[arg-type]


@app.command()
@one_line_errors
def demo(
    out: Annotated[Path, typer.Option(help="Where the demo data, results and report go.")] = Path("runs/demo"),
    threads: ThreadsOption = None,
) -> None:
    """The main job on the bundled default model: 9 prompt modes on an offline phantom data set."""
    from sam4med.evaluation.demo import run_demo

    configure_cpu(threads)
    results, report = run_demo(out)
    evaluation.print_summary(results.parent)
    typer.echo(f"report: {report}")
