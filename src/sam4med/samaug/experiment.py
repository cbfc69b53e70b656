"""SAMAug's comparison, run the same way for every arm: raw-input training vs dual training.

For each seed, one U-Net is trained on raw input (``raw`` arm) and one on raw + augmented input
(``dual`` arm), with the same split, epochs, image size and network. The dual model is scored under
every prediction mode (raw, aug, mean, confident, entropy), the raw model under ``raw``. Arms are
named ``<training>/<mode>``: ``raw/raw`` is the baseline, ``dual/confident`` is SAMAug.

The summary gives mean +- std over seeds of the per-seed mean score, and for every arm the paired
difference to the baseline: per test image, averaged over seeds, with a bootstrap 95% interval
over images (the test images are the sample; seeds are averaged out rather than resampled).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from sam4med.engine.curves import write_training_curves
from sam4med.engine.datasets import load_dataset
from sam4med.engine.metrics import paired_bootstrap
from sam4med.engine.runs import HISTORY_FILE, PROTOCOL_FILE, atomic_path, write_json
from sam4med.engine.splits import training_split
from sam4med.samaug.inference import evaluate
from sam4med.samaug.training import TrainConfig, train

BASELINE = "raw/raw"
METRICS_FILE = "metrics.csv"

# Where the priors come from: SAMAug's generator (everything mode's 32x32 point grid) needs a model that
# answers clicks; LiteMedSAM answers boxes alone and gets box proposals (sam4med.engine.everything).
PRIOR_GENERATORS = {"points": ("litemedsam-click", "points"), "boxes": ("litemedsam", "boxes")}

_BASE = TrainConfig(net="unet", policy="add", dual_update="summed", image_size=128, features=16, batch_size=8,
                    learning_rate=1e-3, split_seed=0)


@dataclass(frozen=True)
class Preset:
    """One data set's protocol, the same for every arm, network and seed."""

    config: TrainConfig
    prior_tile: int | None  # everything mode on tiles of this size (engine.tiling.tile_boxes)
    instances: bool  # AJI and object F1 on connected components


PRESETS = {
    # 1000 px H&E at full resolution (nuclei ~10-20 px), 16 random 256 px patches per image and epoch;
    # priors from everything mode on 500 px tiles (a whole tile at 256 px loses the nuclei)
    "monuseg": Preset(replace(_BASE, image_size=256, scale_to=1000, patches_per_image=16, epochs=100, patience=15),
                      500, True),
    # 256 px frames as they are; CVC split by video sequence (groups), Kvasir by seed 0
    "cvc_clinicdb": Preset(replace(_BASE, image_size=256, epochs=60, patience=10), None, False),
    "kvasir_seg": Preset(replace(_BASE, image_size=256, epochs=60, patience=10), None, False),
}


def images_used(data: str | Path, config: TrainConfig) -> set[str]:
    """Ids of the images an experiment reads (training side up to ``max_train_images``, validation,
    test), so priors can be computed for those alone."""
    sides = training_split(load_dataset(data), config.fractions, config.split_seed)
    return {s.id for s in sides["train"][: config.max_train_images] + sides["val"] + sides["test"]}


def run_experiment(
    data: str | Path,
    priors: str | Path,
    out: str | Path,
    config: TrainConfig,
    seeds: Sequence[int] = (0, 1, 2),
    trainings: Sequence[str] = ("raw", "dual"),
    instances: bool = False,
    show_progress: bool = True,
    device: str | None = None,
) -> pd.DataFrame:
    """Train and score every (training, seed); finished runs are skipped, so a killed run resumes (on any
    ``device``: None is a CUDA GPU where there is one).

    Returns one row per test image x arm x seed; also written to ``out/metrics.csv``.
    """
    out = Path(out)
    frames = []
    for seed in seeds:
        for training in trainings:
            run = out / f"{training}_seed{seed}"
            scored = run / METRICS_FILE
            if not scored.is_file():
                result = train([data], priors if training != "raw" else None, run,
                               replace(config, input_kind=training, seed=seed), show_progress=show_progress,
                               device=device)
                write_json(run / "result.json", {"best_val_dice": result.best_val_dice, "best_epoch": result.best_epoch,
                                                 "epochs_run": result.epochs_run, "stopped_early": result.stopped_early,
                                                 "train_seconds": result.seconds})
                evaluate(run / "best.pt", [data], priors if training != "raw" else None, "test", instances, run,
                         device)
            frame = pd.read_csv(scored)
            frame["arm"] = training + "/" + frame["mode"]
            frame["seed"] = seed
            frames.append(frame)
    results = pd.concat(frames, ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / METRICS_FILE) as temporary:
        results.to_csv(temporary, index=False)
    write_json(out / PROTOCOL_FILE, {"config": asdict(config), "seeds": list(seeds), "trainings": list(trainings),
                                     "data": str(data), "priors": str(priors)})
    return results


def summarise(results: pd.DataFrame,
              metrics: Sequence[str] = ("dice", "iou", "soft_dice_authors", "aji", "object_f1", "picked_aug"),
              baseline: str = BASELINE) -> pd.DataFrame:
    """One row per arm x metric: mean +- std over seeds, and the paired difference to ``baseline``."""
    rows = []
    for metric in [m for m in metrics if m in results]:
        per_image = results.groupby(["arm", "image"])[metric].mean().unstack("arm")
        per_seed = results.groupby(["arm", "seed"])[metric].mean().unstack("arm")
        for arm in per_image.columns:
            if per_seed[arm].notna().sum() == 0:  # e.g. picked_aug exists only for selection modes
                continue
            row = {"metric": metric, "arm": arm, "mean": per_seed[arm].mean(), "std": per_seed[arm].std(ddof=1),
                   "seeds": int(per_seed[arm].notna().sum()), "images": int(per_image[arm].notna().sum())}
            if baseline in per_image and arm != baseline and metric != "picked_aug":
                paired = (per_image[arm] - per_image[baseline]).dropna().to_numpy()
                row["diff"], row["diff_low"], row["diff_high"] = paired_bootstrap(paired)
            rows.append(row)
    return pd.DataFrame(rows)


def write_summary(out: str | Path, results: pd.DataFrame | None = None) -> pd.DataFrame:
    """``summary.csv`` and ``summary.png`` (per-arm means with seed std, and paired differences)."""
    out = Path(out)
    results = results if results is not None else pd.read_csv(out / METRICS_FILE)
    table = summarise(results)
    with atomic_path(out / "summary.csv") as temporary:
        table.to_csv(temporary, index=False)
    metrics = list(dict.fromkeys(table["metric"]))
    figure = Figure(figsize=(3.2 * len(metrics), 6))
    axes = figure.subplots(2, len(metrics), squeeze=False)
    for column, metric in enumerate(metrics):
        part = table[table["metric"] == metric]
        axes[0, column].bar(part["arm"], part["mean"], yerr=part["std"].fillna(0), color="0.6", capsize=3)
        axes[0, column].set_title(f"{metric} (mean +- std over seeds)", fontsize=9)
        diffs = part.dropna(subset=["diff"]) if "diff" in part else part.iloc[0:0]
        if diffs.empty:  # picked_aug has no baseline to differ from
            axes[1, column].set_visible(False)
            axes[0, column].tick_params(axis="x", labelrotation=60, labelsize=7)
            continue
        axes[1, column].errorbar(diffs["arm"], diffs["diff"], fmt="o",
                                 yerr=[diffs["diff"] - diffs["diff_low"], diffs["diff_high"] - diffs["diff"]])
        axes[1, column].axhline(0, color="k", lw=0.8)
        axes[1, column].set_title(f"paired diff. vs {BASELINE} (95% bootstrap)", fontsize=9)
        for axis in axes[:, column]:
            axis.tick_params(axis="x", labelrotation=60, labelsize=7)
    figure.tight_layout()
    with atomic_path(out / "summary.png") as temporary:
        figure.savefig(temporary, dpi=90)
    return table


def write_curves(out: str | Path) -> Path:
    """``curves.png``: validation Dice and training loss per epoch of every run in ``out`` (one colour per
    arm, one line per seed), the evidence that each arm had stopped improving when it was scored."""
    runs = sorted(path.parent for path in Path(out).glob(f"*_seed*/{HISTORY_FILE}"))
    return write_training_curves([(run.name.rsplit("_seed", 1)[0], run) for run in runs], Path(out) / "curves.png")
