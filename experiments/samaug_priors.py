"""Before any training: do SAMAug's priors carry the target? Both generators, scored against the ground truth.

    python experiments/samaug_priors.py --data ../shared/data/monuseg --data ../shared/data/kvasir_seg \\
        --data ../shared/data/cvc_clinicdb --priors runs/samaug/priors --out runs/samaug/prior_quality --images 20

Generators: ``points`` is SAMAug's (everything mode's 32x32 point grid, box NMS 0.5, the model's predicted-IoU
and stability thresholds) on LiteMedSAM-click; ``boxes`` is LiteMedSAM's box proposals. Both run on tiles
as the SAMAug comparison's preset says (``sam4med.samaug.experiment.PRESETS``). Images are taken
from the comparison's test side first (the preset's split), then validation, then training, up to ``--images`` per
set (``--sides train`` measures on training images alone: what a choice such as ``--tile`` may be made on).
``--tile`` overrides the preset's prior tiling for every set (0: whole images); priors made with another
tiling than the preset's belong in another PRIORS folder, since a folder holds one setting. Priors are
cached in PRIORS/<generator>/<data set> (the comparison reads them from there: resumable);
scores go to OUT/prior_quality.csv (one row per image and generator), OUT/summary.csv and OUT/protocol.json
(models with weights hashes, generator settings, tiles, image ids, boundary tolerance).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import pandas as pd
import typer

from sam4med.cli.options import EncoderOption, PrecisionOption, ThreadsOption
from sam4med.engine.datasets import Dataset, load_dataset
from sam4med.engine.runs import PROTOCOL_FILE, atomic_path, write_json
from sam4med.engine.runtime import configure_cpu
from sam4med.engine.splits import training_split
from sam4med.samaug.experiment import PRESETS, PRIOR_GENERATORS
from sam4med.samaug.prior_quality import BOUNDARY_TOLERANCE_PX, measure_prior_quality
from sam4med.samaug.priors import prior_settings
from sam4med.samaug.store import PriorStore, generate_priors
from sam4med.samaug.training import TrainConfig

SCORES = ["auroc", "covered_dice", "boundary_f", "covered_fraction", "masks"]
SIDES = ("test", "val", "train")


def chosen_images(dataset: Dataset, count: int, order: tuple[str, ...] = SIDES) -> list[str]:
    """The first ``count`` images of the sides in ``order``, split as the comparison's preset splits the set."""
    config = PRESETS[dataset.name].config if dataset.name in PRESETS else TrainConfig()
    sides = training_split(dataset, config.fractions, config.split_seed)
    return [s.id for side in order for s in sides[side]][:count]


def main(
    data: Annotated[list[Path], typer.Option(help="Data set folders (repeat).")],
    priors: Annotated[Path, typer.Option(help="Priors folder: PRIORS/<generator>/<data set>.")],
    out: Annotated[Path, typer.Option(help="Results folder.")],
    images: Annotated[int, typer.Option(help="Images per data set.")] = 20,
    sides: Annotated[str, typer.Option(help="Comma-separated sides to take images from, in order.")] = ",".join(SIDES),
    tile: Annotated[Optional[int], typer.Option(help="Tile size for every set's priors (0: whole images); "
                                                     "default: each preset's.")] = None,
    encoder: EncoderOption = "onnx",
    precision: PrecisionOption = "fp32",
    threads: ThreadsOption = None,
) -> None:
    """Compute (or reuse) both generators' priors and score them per image."""
    order = tuple(side.strip() for side in sides.split(","))
    if not order or not set(order) <= set(SIDES):
        raise typer.BadParameter(f"choose from {', '.join(SIDES)}", param_hint="--sides")
    if tile is not None and tile < 0:
        raise typer.BadParameter("must be 0 (whole images) or a tile size in px", param_hint="--tile")
    configure_cpu(threads)
    frames, protocol, seconds = [], {"boundary_tolerance_px": BOUNDARY_TOLERANCE_PX, "encoder": encoder,
                                     "sides": list(order), "images": {}, "priors": {}}, []
    for folder in data:
        dataset = load_dataset(folder)
        name, ids = dataset.name, chosen_images(dataset, images, order)
        protocol["images"][name] = ids
        for generator, (model, method) in PRIOR_GENERATORS.items():
            preset_tile = PRESETS[name].prior_tile if name in PRESETS else None
            settings = prior_settings(model, tile=preset_tile if tile is None else tile or None, method=method)
            (summary,) = generate_priors([dataset], priors / generator, model, settings=settings,
                                         encoder_backend=encoder, image_ids=set(ids), figures_per_dataset=2,
                                         precision=precision)
            timings = pd.read_json(summary.results, lines=True, dtype={"image": str})
            seconds.append({"dataset": name, "generator": generator,
                            "s_per_image": timings[timings["image"].isin(ids)]["priors_s"].mean()})
            protocol["priors"][f"{name}/{generator}"] = PriorStore(priors / generator / name).record
            frame = measure_prior_quality([dataset], priors / generator, set(ids))
            frames.append(frame.assign(generator=generator))
    rows = pd.concat(frames, ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "prior_quality.csv") as temporary:
        rows.to_csv(temporary, index=False)
    summary = rows.groupby(["dataset", "generator"])[SCORES].mean()
    summary["images"] = rows.groupby(["dataset", "generator"]).size()
    summary = summary.join(pd.DataFrame(seconds).set_index(["dataset", "generator"])).reset_index()
    with atomic_path(out / "summary.csv") as temporary:
        summary.to_csv(temporary, index=False)
    write_json(out / PROTOCOL_FILE, protocol)
    print(summary.round(3).to_string(index=False))


if __name__ == "__main__":
    typer.run(main)
