"""Tables from a benchmark's ``results.jsonl``: per-mode summaries, factors, clicks, timing, failures.

Every function takes the frame of :func:`load_results` and uses only the rows with
``status == "ok"`` (except :func:`failures`). Data sets and modes keep the order in which they
first appear in the results, which is the order the benchmark ran them.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from sam4med.engine.items import RESULTS_FILE
from sam4med.engine.runs import atomic_path, read_jsonl, warn

METRICS = ("dice", "iou", "hd95", "hd", "asd", "nsd")
FACTORS = ("object_area", "boundary_complexity", "contrast")
NUMERIC_COLUMNS = (
    *METRICS, "object_area", "area_fraction", "boundary_complexity", "contrast",
    "encode_s", "decode_s", "everything_s", "noc85", "noc90", "n_masks", "predicted_iou", "stability",
)
BASE_COLUMNS = ("dataset", "modality", "target", "image", "object", "mode", "status", "error")
KEY_COLUMNS = ("dataset", "image", "object", "mode", "model", "status")  # what rows are grouped and told apart by
KEY_TYPES = (str, int, float, type(None))
# where each column's values can lie; a value outside was edited by hand or written by something else
FRACTIONS = ("dice", "iou", "nsd", "area_fraction", "contrast", "stability")
NON_NEGATIVE = ("hd95", "hd", "asd", "object_area", "boundary_complexity", "encode_s", "decode_s", "everything_s",
                "noc85", "noc90", "n_masks")


def load_results(results: str | Path) -> pd.DataFrame:
    """All rows of a results directory (or ``results.jsonl`` file) as a frame; JSON null becomes NaN.

    A last line cut short by a killed run is skipped. The base columns (dataset, mode, status,
    error, ...) and the metric columns always exist, so an empty or error-only file still works.
    """
    path = Path(results)
    if path.is_dir():
        path = path / RESULTS_FILE
    records = read_jsonl(path, skip_damaged=True)  # a damaged line is left out with a warning
    keyed = [r for r in records if all(isinstance(r.get(key), KEY_TYPES) for key in KEY_COLUMNS)]
    if len(keyed) < len(records):  # a list or object where a name belongs: a foreign or hand-edited row
        warn(f"{path}: {len(records) - len(keyed)} row(s) whose {', '.join(KEY_COLUMNS)} are not names or "
             "numbers are left out")
    df = pd.DataFrame.from_records(keyed)
    for column in BASE_COLUMNS:
        if column not in df.columns:
            df[column] = np.nan
    df["status"] = df["status"].fillna("ok")
    for column in NUMERIC_COLUMNS:
        if column not in df.columns:
            df[column] = np.nan
            continue
        numbers = pd.to_numeric(df[column], errors="coerce")
        numbers = numbers.where(~np.isinf(numbers.astype(float)))  # no metric is infinite: a hand-edited value
        unreadable = numbers.isna() & df[column].notna()
        if unreadable.any():  # a hand-edited or foreign file: say so instead of losing the values quietly
            first = df.loc[unreadable, column].iloc[0]
            shown = repr(first) if isinstance(first, str) else str(first)
            warn(f"{path}: {int(unreadable.sum())} row(s) whose '{column}' is not a number (first {shown}) "
                 "are read as missing")
        low, high = _value_range(column)
        outside = (numbers < low) | (numbers > high)
        if outside.any():  # a Dice of 1.7 would move every mean it enters without a word
            span = f"[{low:g}, {high:g}]" if high < math.inf else f">= {low:g}"
            warn(f"{path}: {int(outside.sum())} row(s) whose '{column}' lies outside {span} (first "
                 f"{numbers[outside].iloc[0]:g}) are read as missing")
        df[column] = numbers.where(~outside)
    df[list(NUMERIC_COLUMNS)] = df[list(NUMERIC_COLUMNS)].astype(float)
    return df


def _value_range(column: str) -> tuple[float, float]:
    if column in FRACTIONS:
        return 0.0, 1.0
    return (0.0, math.inf) if column in NON_NEGATIVE else (-math.inf, math.inf)


def ok_rows(df: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """The successful rows, with the given columns present (NaN where absent)."""
    ok = df[df["status"].fillna("ok") == "ok"] if "status" in df.columns else df
    ok = ok[ok["mode"].notna()] if "mode" in ok.columns else ok.iloc[0:0]
    ok = ok.copy()
    for column in ("dataset", "mode", "image", *columns):
        if column not in ok.columns:
            ok[column] = np.nan
    return ok


def ordered(values: pd.Series) -> list:
    """Distinct values in order of first appearance."""
    return list(pd.unique(values.dropna()))


def summary_table(df: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """Per data set × mode: n (non-missing values), mean, std, median of ``metric``."""
    ok = ok_rows(df, metric)
    columns = ["dataset", "mode", "metric", "n", "mean", "std", "median"]
    if ok.empty:
        return pd.DataFrame(columns=columns)
    values = pd.to_numeric(ok[metric], errors="coerce")
    grouped = values.groupby([ok["dataset"], ok["mode"]], sort=False)
    table = grouped.agg(["count", "mean", "std", "median"]).reset_index()
    table = table.rename(columns={"count": "n"})
    table.insert(2, "metric", metric)
    return table[columns].reset_index(drop=True)


def mean_table(df: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """Wide table of mean ``metric``: one row per data set, one column per mode (run order)."""
    ok = ok_rows(df, metric)
    if ok.empty:
        return pd.DataFrame(index=pd.Index([], name="dataset"))
    values = pd.to_numeric(ok[metric], errors="coerce")
    table = values.groupby([ok["dataset"], ok["mode"]], sort=False).mean().unstack("mode")
    table = table.reindex(index=ordered(ok["dataset"]), columns=ordered(ok["mode"]))
    table.index.name, table.columns.name = "dataset", None
    return table


def metrics_table(df: pd.DataFrame, metrics: tuple[str, ...] = METRICS) -> pd.DataFrame:
    """Per data set × mode: n and the mean of every metric (distances ignore missing values)."""
    ok = ok_rows(df, *metrics)
    if ok.empty:
        return pd.DataFrame(columns=["dataset", "mode", "n", *metrics])
    grouped = ok.groupby(["dataset", "mode"], sort=False)
    table = grouped[list(metrics)].mean()
    table.insert(0, "n", grouped.size())
    return table.reset_index()


def _spearman(x: pd.Series, y: pd.Series) -> tuple[float, float, int]:
    """Spearman rho, p and n over the pairs where both are present; NaN when not defined."""
    pair = pd.DataFrame({"x": pd.to_numeric(x, errors="coerce"), "y": pd.to_numeric(y, errors="coerce")})
    pair = pair[np.isfinite(pair["x"]) & np.isfinite(pair["y"])]
    n = len(pair)
    if n < 3 or pair["x"].nunique() < 2 or pair["y"].nunique() < 2:
        return math.nan, math.nan, n
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        result = stats.spearmanr(pair["x"], pair["y"])
    return float(result.statistic), float(result.pvalue), n


def factor_analysis(df: pd.DataFrame, metric: str = "dice",
                    factors: tuple[str, ...] = FACTORS) -> pd.DataFrame:
    """Per data set × mode × factor: Spearman correlation of ``metric`` with the object factor.

    Columns: dataset, mode, factor, n (complete pairs), rho, p. ``rho`` is NaN with fewer than
    three pairs or a constant input, as in the COSMOS study's factor analysis.
    """
    ok = ok_rows(df, metric, *factors)
    rows = []
    for (dataset, mode), group in ok.groupby(["dataset", "mode"], sort=False):
        for factor in factors:
            rho, p, n = _spearman(group[factor], group[metric])
            rows.append({"dataset": dataset, "mode": mode, "factor": factor, "n": n, "rho": rho, "p": p})
    return pd.DataFrame(rows, columns=["dataset", "mode", "factor", "n", "rho", "p"])


def clicks_curve(df: pd.DataFrame) -> pd.DataFrame:
    """Interactive rows per data set: n, mean NoC@85 and NoC@90, NoF@85 and NoF@90, and mean Dice per round.

    NoC is capped at the clicks given (rounds + 1) for an object that never reaches the threshold, as in RITM, so a
    mean NoC cannot tell "on the last click" from "never": NoF counts the objects that never do. ``dice_r0`` is the
    Dice of the initial prompt, ``dice_rK`` the Dice after K corrective clicks (the mean over the objects that have
    that round).
    """
    ok = ok_rows(df, "dice_per_round", "noc85", "noc90")
    ok = ok[ok["dice_per_round"].map(lambda v: isinstance(v, (list, tuple)))]
    if ok.empty:
        return pd.DataFrame(columns=["dataset", "n", "noc85", "noc90", "nof85", "nof90"])
    rows = []
    for dataset, group in ok.groupby("dataset", sort=False):
        lists = [[_float(d) for d in v] for v in group["dice_per_round"]]
        width = max(map(len, lists), default=0)
        rounds = pd.DataFrame([d + [math.nan] * (width - len(d)) for d in lists], columns=range(width))
        row = {"dataset": dataset, "n": len(group),
               "noc85": pd.to_numeric(group["noc85"], errors="coerce").mean(),
               "noc90": pd.to_numeric(group["noc90"], errors="coerce").mean(),
               **{f"nof{round(100 * t)}": sum(not any(d >= t for d in v) for v in lists) for t in (0.85, 0.90)}}
        row.update({f"dice_r{k}": rounds[k].mean() for k in rounds.columns})
        rows.append(row)
    table = pd.DataFrame(rows)
    round_columns = sorted((c for c in table.columns if c.startswith("dice_r")), key=lambda c: int(c[6:]))
    return table[["dataset", "n", "noc85", "noc90", "nof85", "nof90", *round_columns]]


def _float(value: object) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def timing_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per data set: images, mean encode_s per image, mean decode_s per prompt for each mode
    (interactive: per round) and mean everything_s per image (everything mode)."""
    ok = ok_rows(df, "encode_s", "decode_s", "everything_s")
    if ok.empty:
        return pd.DataFrame(columns=["dataset", "images", "encode_s"])
    modes = ordered(ok["mode"])
    rows = []
    for dataset, group in ok.groupby("dataset", sort=False):
        per_image = group.drop_duplicates("image")
        row: dict[str, object] = {"dataset": dataset, "images": len(per_image),
                                  "encode_s": per_image["encode_s"].mean()}
        for mode in modes:
            decode = group.loc[group["mode"] == mode, "decode_s"]
            if decode.notna().any():
                row[f"decode_s[{mode}]"] = decode.mean()
        everything = group[group["mode"] == "everything"].drop_duplicates("image")["everything_s"]
        if everything.notna().any():
            row["everything_s"] = everything.mean()
        rows.append(row)
    table = pd.DataFrame(rows)
    columns = ["dataset", "images", "encode_s",
               *[f"decode_s[{m}]" for m in modes if f"decode_s[{m}]" in table.columns],
               *(["everything_s"] if "everything_s" in table.columns else [])]
    return table[columns]


def failures(df: pd.DataFrame) -> pd.DataFrame:
    """The error rows: dataset, image, error."""
    columns = ["dataset", "image", "error"]
    if "status" not in df.columns:
        return pd.DataFrame(columns=columns)
    errors = df[df["status"] == "error"].copy()
    for column in columns:
        if column not in errors.columns:
            errors[column] = np.nan
    return errors[columns].reset_index(drop=True)


def write_tables(results_dir: str | Path, df: pd.DataFrame | None = None) -> list[Path]:
    """Write summary.csv (every metric), mean_dice.csv, factors.csv, clicks.csv, timing.csv and
    failures.csv into ``results_dir``; returns their paths. ``df``: its :func:`load_results`, when the caller
    has read it already (read once, a damaged line is warned about once)."""
    results_dir = Path(results_dir)
    df = load_results(results_dir) if df is None else df
    ok = ok_rows(df)
    metrics = [m for m in METRICS if m in ok.columns and ok[m].notna().any()] or ["dice"]
    summary = pd.concat([summary_table(df, m) for m in metrics], ignore_index=True)
    tables = {
        "summary.csv": (summary, False),
        "mean_dice.csv": (mean_table(df, "dice"), True),
        "factors.csv": (factor_analysis(df, "dice"), False),
        "clicks.csv": (clicks_curve(df), False),
        "timing.csv": (timing_table(df), False),
        "failures.csv": (failures(df), False),
    }
    paths = []
    for name, (table, index) in tables.items():
        path = results_dir / name
        with atomic_path(path) as temporary:
            table.to_csv(temporary, index=index)
        paths.append(path)
    return paths
