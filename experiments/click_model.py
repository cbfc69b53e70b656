"""The click-capable LiteMedSAM against LiteMedSAM on the test sides of the real data sets.

    python experiments/click_model.py --data ../shared/data/kvasir_seg --data ../shared/data/busi ... \\
        --out runs/clicks/eval --max-test-images 20 [--checkpoint runs/clicks/run/best.pt] \\
        [--tiled-data ../shared/data/monuseg --tile 256]

Both models run the benchmark (resumable) on the test side of the group-aware 70/10/20 split (seed 0)
that click training holds out: modes box, point_center, points5, interactive (from one centre click,
5 corrective clicks at the largest error region) and everything (LiteMedSAM: box proposals; the click
model: SAM's point grid). Each model uses its own mask rule (LiteMedSAM single; the click model auto:
3 masks for a lone click, ranked by its IoU head). Writes OUT/<model>/ (results.jsonl, protocol.json)
and OUT/table.csv. Data sets too small for a three-way split (brain MRI: two patients) are left out of
training and scored on all their images (--left-out; OUT/<model>_left_out/). Data sets of small objects
in large images (--tiled-data) are scored on tiled embeddings (--tile, --halo; OUT/<model>_tiled/), as
a user prompts them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sam4med.cli.options import ThreadsOption
from sam4med.clicks.comparison import compare
from sam4med.engine.models import load_model
from sam4med.engine.runtime import configure_cpu
from sam4med.evaluation.benchmark import BenchmarkConfig, run_benchmark
from sam4med.evaluation.modes import PromptSettings

MODES = ("box", "point_center", "points5", "interactive", "everything")


def main(
    out: Annotated[Path, typer.Option(help="Results folder.")],
    data: Annotated[list[Path], typer.Option(help="Data set trained on: scored on its test side (repeatable).")] = [],  # noqa: B006
    left_out: Annotated[list[Path], typer.Option(help="Data set never trained on (too few groups for a split): "
                                                      "scored on all its images (repeatable).")] = [],  # noqa: B006
    tiled_data: Annotated[list[Path], typer.Option(help="Data set trained on, scored on its test side with tiled "
                                                        "embeddings (repeatable).")] = [],  # noqa: B006
    tile: Annotated[int, typer.Option(help="Tile core in px for --tiled-data.")] = 256,
    halo: Annotated[int, typer.Option(help="Pixels around each tile's core.")] = 32,
    checkpoint: Annotated[Optional[Path], typer.Option(help="A click run's best.pt (default: the shipped "
                                                               "litemedsam-click weights).")] = None,
    modes: Annotated[str, typer.Option(help="Comma-separated prompt modes.")] = ",".join(MODES),
    max_test_images: Annotated[int, typer.Option(help="Test images per data set (0: all).")] = 20,
    baseline: Annotated[bool, typer.Option(help="Run LiteMedSAM too (--no-baseline: the click model alone, to "
                                                "compare a new click run with figures already measured).")] = True,
    threads: ThreadsOption = None,
) -> None:
    """Benchmark both models on the same objects and print the comparison table."""
    if not (data or tiled_data or left_out):
        raise typer.BadParameter("give at least one of --data, --tiled-data, --left-out")
    configure_cpu(threads)
    prompts = PromptSettings(interactive_start="point_center", interactive_rounds=5)
    models = {"litemedsam": load_model("litemedsam", encoder_backend="onnx")} if baseline else {}
    models["click"] = load_model("litemedsam", checkpoint, encoder_backend="onnx") if checkpoint \
        else load_model("litemedsam-click", encoder_backend="onnx")
    folders = {}
    for label, model in models.items():
        for suffix, sets, split, tiling in (("", data, "test", None), ("_tiled", tiled_data, "test", tile),
                                            ("_left_out", left_out, None, None)):
            if not sets:
                continue
            config = BenchmarkConfig(model=model.name, checkpoint=str(checkpoint) if checkpoint and label == "click"
                                     else None, modes=tuple(modes.split(",")), split=split, max_images=max_test_images or None,
                                     prompts=prompts, tile=tiling, halo=halo)
            folders[label + suffix] = run_benchmark(sets, out / (label + suffix), config, model=model,
                                                    overlays_per_dataset=1).parent
    table = compare(folders)
    table.to_csv(out / "table.csv", index=False)
    print(table.round(3).to_string(index=False))


if __name__ == "__main__":
    typer.run(main)
