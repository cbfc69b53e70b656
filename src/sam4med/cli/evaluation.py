"""``sam4med eval``: the COSMOS-style benchmark and its report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sam4med.cli.options import (
    CheckpointOption,
    CorrectionOption,
    DataOption,
    DeviceOption,
    EncoderOption,
    PrecisionOption,
    EverythingMethodOption,
    HaloOption,
    MaxImagesOption,
    ModelOption,
    PointsPerSideOption,
    PredIouThreshOption,
    RayOption,
    RayWorkersOption,
    StabilityThreshOption,
    ThreadsOption,
    TileOption,
    one_line_errors,
    recorded_path,
)
from sam4med.engine.defaults import DEFAULT_MODEL
from sam4med.engine.runtime import configure_cpu

app = typer.Typer(no_args_is_help=True, help="Evaluate SAM-family models on medical images (COSMOS protocol).")


@app.command()
@one_line_errors
def benchmark(
    data: DataOption,
    out: Annotated[Path, typer.Option(help="Results folder (results.jsonl, protocol.json, overlays/).")],
    model: ModelOption = DEFAULT_MODEL,
    checkpoint: CheckpointOption = None,
    modes: Annotated[str, typer.Option(help="Comma-separated prompt modes (default: the nine of the study).")] = "",
    mask_rule: Annotated[Optional[str], typer.Option(help="single, auto (3 masks for a lone click), oracle (COSMOS) or iou (SAM-Med2D); default: the model's.")] = None,
    seed: int = 0,
    jitter: Annotated[float, typer.Option(help="box_jitter amount.")] = 5.0,
    jitter_unit: Annotated[str, typer.Option(help="px or percent (of the box side).")] = "px",
    jitter_kind: Annotated[str, typer.Option(help="corners, shift or scale.")] = "corners",
    points_sampler: Annotated[str, typer.Option(help="stride (COSMOS) or random, for pointsK modes.")] = "stride",
    negative_region: Annotated[str, typer.Option(help="double_box (COSMOS) or image (SAM-Med2D).")] = "double_box",
    interactive_start: Annotated[str, typer.Option(help="box or point_center.")] = "box",
    rounds: Annotated[int, typer.Option(help="Corrective clicks in interactive mode.")] = 5,
    click_rule: Annotated[str, typer.Option(help="largest (RITM) or random (SAM-Med2D) error click.")] = "largest",
    correction: CorrectionOption = "auto",
    one_object: Annotated[bool, typer.Option(help="Treat each mask as one object instead of its connected "
                                                  "components (its components under 10 px still left out, as "
                                                  "specks).")] = False,
    max_objects: Annotated[int, typer.Option(help="Objects per image, drawn by seed when more (0: all).")] = 20,
    max_images: MaxImagesOption = 0,
    everything_method: EverythingMethodOption = "auto",
    points_per_side: PointsPerSideOption = 16,
    pred_iou_thresh: PredIouThreshOption = None,
    stability_thresh: StabilityThreshOption = None,
    split: Annotated[Optional[str], typer.Option(help="Only this side (test, val, train) of the group-aware "
                                                      "70/10/20 split the trainers use (seed 0).")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Embedding cache folder (re-runs skip the encoder).")] = None,
    tile: TileOption = 0,
    halo: HaloOption = 32,
    encoder: EncoderOption = "torch",
    precision: PrecisionOption = "fp32",
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    ray: RayOption = None,
    ray_workers: RayWorkersOption = None,
) -> None:
    """Evaluate a model on data sets under every prompt mode (COSMOS protocol); resumable, locally or on Ray."""
    from sam4med.engine.everything import EverythingSettings
    from sam4med.engine.executors import make_executor
    from sam4med.evaluation.benchmark import BenchmarkConfig, run_benchmark
    from sam4med.evaluation.modes import DEFAULT_MODES, PromptSettings

    executor = make_executor(ray, ray_workers, threads)
    configure_cpu(None if ray else threads)
    config = BenchmarkConfig(
        model=model,
        checkpoint=recorded_path(checkpoint),
        modes=tuple(m.strip() for m in modes.split(",") if m.strip()) if modes else DEFAULT_MODES,
        mask_rule=mask_rule,
        seed=seed,
        as_one_object=one_object,
        max_objects_per_image=max_objects or None,
        max_images=max_images or None,
        split=split,
        tile=tile or None,
        halo=halo,
        prompts=PromptSettings(jitter, jitter_unit, jitter_kind, points_sampler, negative_region,  # type: ignore[arg-type]
                               interactive_start, rounds, click_rule, correction),
        everything=EverythingSettings(method=everything_method, points_per_side=points_per_side,  # type: ignore[arg-type]
                                      pred_iou_thresh=pred_iou_thresh, stability_thresh=stability_thresh),
    )
    results = run_benchmark(data, out, config, device=device, cache_dir=cache_dir, encoder_backend=encoder,
                            executor=executor, precision=precision)
    print_summary(results.parent)


def print_summary(results_dir: Path) -> None:
    from rich.console import Console

    from sam4med.engine.items import NO_OBJECTS
    from sam4med.evaluation.summary import failures, load_results, mean_table

    frame = load_results(results_dir)
    console = Console()
    table = mean_table(frame, "dice")
    if table.empty:
        console.print("no object was scored: every image failed or held no object")
    else:
        console.print("mean Dice (data set x mode):")
        console.print(table.round(3).to_string())
    empty = int((frame["status"] == NO_OBJECTS).sum())
    if empty:
        console.print(f"{empty} image(s) held no object to score (an empty mask, or only objects under the minimum "
                      "area); not counted as failed")
    failed = failures(frame)
    if len(failed):
        console.print(f"{len(failed)} image(s) failed; see {results_dir / 'results.jsonl'} (status = error)")
    if table.empty and len(failed):  # nothing scored, and errors say why: a script should notice
        raise typer.Exit(1)


@app.command()
@one_line_errors
def report(results: Annotated[Path, typer.Argument(help="Results folder of a benchmark run (or its results.jsonl).")]) -> None:
    """Write tables (CSV) and an HTML report with plots and example overlays."""
    from sam4med.evaluation.report import write_report

    typer.echo(str(write_report(results)))
