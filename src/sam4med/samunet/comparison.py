"""SAM-UNet against its baselines on the same split: the zero-shot backbone, mask-decoder-only
fine-tuning and SAM-UNet, each prompted with every test object's tight box (no jitter).

In-domain data sets are trained on (their train sides) and scored on their test sides. Left-out data
sets (the paper's zero-shot claim) are never trained on, so every image of theirs is a test image:
they are scored on all of them (a two-patient MRI set has no three-way split to take a side from).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd

from sam4med.engine.curves import write_training_curves
from sam4med.engine.datasets import load_dataset
from sam4med.engine.errors import InputError
from sam4med.engine.items import RESULTS_FILE, WorkItem, run_items
from sam4med.engine.metrics import paired_bootstrap
from sam4med.engine.models import load_model
from sam4med.engine.predictor import Predictor
from sam4med.engine.runs import CONFIG_FILE, HISTORY_FILE, PROTOCOL_FILE, atomic_path, claim_folder, read_jsonl, write_json
from sam4med.engine.sam_model import SamModel
from sam4med.engine.splits import training_split
from sam4med.evaluation.benchmark import BenchmarkConfig, ImageEvaluator
from sam4med.evaluation.modes import make_mode
from sam4med.samunet.training import PromptTrainConfig, train_promptable


SCORING_FOLDER = "scoring"


def box_prompt_scores(model: SamModel, items: Sequence[WorkItem], folder: Path, min_area: int = 10,
                      max_objects: int = 20, show_progress: bool = False) -> pd.DataFrame:
    """Dice and IoU of every object (at most ``max_objects`` per image, drawn by seed as the benchmark
    does) from its tight box: the benchmark's ``box`` mode, run on each image.

    Runs on the resumable item loop into ``folder`` (``results.jsonl``, and the model and settings in
    ``scoring.json``): scoring every left-out image takes hours on a CPU, and a killed run goes on where it
    stopped. An image without an object of ``min_area`` pixels gives a row saying so and no score."""
    config = BenchmarkConfig(model=model.name, modes=("box",), min_object_area=min_area,
                             max_objects_per_image=max_objects)
    claim_folder(folder, "scoring.json", {"model": model.protocol(), "min_object_area": min_area,
                                          "max_objects_per_image": max_objects, "seed": config.seed,
                                          "prompt": "tight box per object (the benchmark's box mode), no jitter"})
    evaluator = ImageEvaluator(Predictor(model), config, [make_mode("box", config.prompts)])

    def score(item: WorkItem) -> list[dict]:  # an image without objects: the evaluator's one NO_OBJECTS row
        return [{"dataset": row["dataset"], "image": row["image"], "object": row["object"], "dice": row.get("dice"),
                 "iou": row.get("iou"), "status": row.get("status", "ok")} for row in evaluator(item)]

    run_items(items, score, folder / RESULTS_FILE, f"score {model.name}", show_progress=show_progress)
    wanted = {(item.dataset.name, item.sample.id) for item in items}
    rows = [row for row in read_jsonl(folder / RESULTS_FILE, skip_damaged=True)
            if row.get("status") == "ok" and "object" in row and (row["dataset"], row["image"]) in wanted]
    return pd.DataFrame(rows, columns=["dataset", "image", "object", "dice", "iou"])


def trained_run_record(run: Path) -> dict[str, object]:
    """What a run folder says of its training: its configuration, epochs done, best epoch, seconds."""
    if not (run / "best.pt").is_file():
        raise InputError(f"{run}: no best.pt; train it first (sam4med samunet train --method decoder|samunet)")
    history = read_jsonl(run / HISTORY_FILE)
    best = max(history, key=lambda row: row["val_dice"])
    return {"config": json.loads((run / CONFIG_FILE).read_text(encoding="utf-8")), "epochs_done": len(history),
            "best_epoch": best["epoch"], "best_val_dice": best["val_dice"],
            "train_seconds": round(sum(row["seconds"] for row in history), 1)}


# The trained rows: each arm's run folder is ``out/<arm>`` and its settings override the shared config.
ARMS: dict[str, dict[str, object]] = {
    "decoder": {"method": "decoder"},  # mask decoder alone, the cheaper baseline
    "samunet": {"method": "samunet", "warm_start": True},  # new output path started as the backbone's
    "samunet_cold": {"method": "samunet", "warm_start": False},  # the paper's fresh token and random paths
}


def run_comparison(train_data: Sequence[str | Path], left_out_data: Sequence[str | Path], out: str | Path,
                   config: PromptTrainConfig, max_test_images: int | None = None,
                   show_progress: bool = True, train: bool = True,
                   arms: Sequence[str] = ("decoder", "samunet"), device: str | None = None) -> pd.DataFrame:
    """Train every arm (resumable), score it with the zero-shot backbone, write ``scores.csv``, ``table.csv``
    and ``curves.png`` (each arm's validation Dice and loss per epoch).

    ``arms`` are keys of ``ARMS``. ``train=False`` scores the runs already in ``out/<arm>`` (trained by the
    CLI, elsewhere, or stopped early) as they are; each run's own configuration and epochs done are
    recorded, and the test split is the one in their ``config.json``. ``device``: where every arm trains and is
    scored (default: CUDA when present).
    """
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown or not arms:
        raise InputError(f"arms {', '.join(unknown) or '(none)'}: choose from {', '.join(ARMS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if train:
        for arm in arms:
            train_promptable(train_data, out / arm, replace(config, **ARMS[arm]), device, show_progress)
    runs = {arm: trained_run_record(out / arm) for arm in arms}
    for arm, record in runs.items():
        fractions, split_seed = record["config"]["fractions"], record["config"]["split_seed"]  # type: ignore[index]
        if (fractions, split_seed) != (config.fractions, config.split_seed):
            raise InputError(f"{out / arm}: trained on another split (fractions {fractions}, seed {split_seed})")
    write_training_curves([(arm, out / arm) for arm in arms], out / "curves.png")
    models = {"zero_shot": load_model(config.backbone, config.backbone_checkpoint, device),
              **{arm: load_model(config.backbone, out / arm / "best.pt", device) for arm in arms}}
    items, settings, modalities = [], {}, {}
    for setting, folders in (("in_domain", train_data), ("left_out", left_out_data)):
        for folder in folders:
            dataset = load_dataset(folder)
            samples = (training_split(dataset, config.fractions, config.split_seed)["test"]
                       if setting == "in_domain" else dataset.samples)
            items += [WorkItem(dataset, sample) for sample in samples[:max_test_images]]
            settings[dataset.name], modalities[dataset.name] = setting, dataset.modality
    frames = []
    for row, model in models.items():  # one folder per row and weights: an arm trained again is scored anew
        frame = box_prompt_scores(model, items, out / SCORING_FOLDER / f"{row}-{model.weights_sha256[:12]}",
                                  config.min_object_area, show_progress=show_progress)
        frames.append(frame.assign(row=row, setting=frame["dataset"].map(settings),
                                   modality=frame["dataset"].map(modalities)))
    scores = pd.concat(frames, ignore_index=True)
    with atomic_path(out / "scores.csv") as temporary:
        scores.to_csv(temporary, index=False)
    table = (scores.groupby(["setting", "dataset", "modality", "row"])
             .agg(mean=("dice", "mean"), std=("dice", "std"), count=("dice", "count"), images=("image", "nunique"))
             .reset_index())  # count: objects scored; images: how many they came from
    with atomic_path(out / "table.csv") as temporary:
        table.to_csv(temporary, index=False)
    write_json(out / PROTOCOL_FILE, {"config": asdict(config), "train_data": [str(d) for d in train_data],
                                     "left_out_data": [str(d) for d in left_out_data], "runs": runs,
                                     "prompt": "tight box per object (the benchmark's box mode), no jitter",
                                     "max_test_images": max_test_images, "arms": {arm: ARMS[arm] for arm in arms}})
    return table


def paired_gain(scores: pd.DataFrame, row: str, baseline: str = "zero_shot") -> pd.DataFrame:
    """Mean Dice difference per object between ``row`` and ``baseline``, per data set, with a 95%
    bootstrap interval that resamples whole images (objects of one image are not independent)."""
    keys = ["setting", "dataset", "image", "object"]
    left = scores[scores["row"] == row].set_index(keys)["dice"]
    right = scores[scores["row"] == baseline].set_index(keys)["dice"]
    differences = (left - right).dropna().reset_index(name="diff")
    rows = []
    for (setting, dataset), group in differences.groupby(["setting", "dataset"]):
        mean, low, high = paired_bootstrap(group["diff"].to_numpy(), groups=group["image"].to_numpy())
        rows.append({"setting": setting, "dataset": dataset, "mean": mean, "low": low, "high": high,
                     "count": len(group), "images": group["image"].nunique()})
    return pd.DataFrame(rows, columns=["setting", "dataset", "mean", "low", "high", "count", "images"])
