"""The click model against its base on the same objects: one benchmark run per model, one table.

Per data set and model: objects, Dice from a tight box, one centre click and 5 stride clicks, the
interactive curve from one click (Dice per round, NoC@85 and NoC@90), and the share of objects that
everything mode finds (a matched mask of Dice >= 0.5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sam4med.evaluation.summary import clicks_curve, load_results, ok_rows

PROMPT_MODES = ("box", "point_center", "points5")
FOUND_DICE = 0.5


def model_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per data set of one benchmark run's successful rows."""
    rows = []
    for dataset, group in frame.groupby("dataset", sort=True):
        row: dict[str, object] = {"dataset": dataset, "model": group["model"].iloc[0],
                                  "objects": len(group[["image", "object"]].drop_duplicates()),
                                  "images": int(group["image"].nunique())}
        for mode in PROMPT_MODES:
            row[mode] = group.loc[group["mode"] == mode, "dice"].mean()
        everything = group.loc[group["mode"] == "everything", "dice"]
        row["everything_found"] = float((everything >= FOUND_DICE).mean()) if len(everything) else np.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    curve = clicks_curve(frame)
    if len(curve):
        table = table.merge(curve.drop(columns="n"), on="dataset", how="left")
    return table


def compare(results: dict[str, Path]) -> pd.DataFrame:
    """The tables of several runs (label -> results folder), data set by data set, each data set on the
    images that every run holding it has finished (runs in progress are compared on the same objects)."""
    frames = {label: ok_rows(load_results(folder), "dice") for label, folder in results.items()}
    shared: dict[str, set[str]] = {}
    for frame in frames.values():
        for dataset, group in frame.groupby("dataset"):
            images = set(group["image"])
            shared[dataset] = shared[dataset] & images if dataset in shared else images
    tables = [model_table(frame[[image in shared[d] for d, image in zip(frame["dataset"], frame["image"])]])
              .assign(run=label) for label, frame in frames.items()]
    return pd.concat(tables, ignore_index=True).sort_values(["dataset", "run"], kind="stable")
