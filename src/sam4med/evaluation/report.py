"""Figures and the self-contained HTML report of a benchmark run.

Drawing uses matplotlib's Agg canvas directly (no pyplot state, no display needed); every plot
and overlay is embedded in ``report.html`` as a base64 PNG, so the file can be sent on its own.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from sam4med.engine.errors import InputError, check_output_file, check_outside_data_sets
from sam4med.engine.items import NO_OBJECTS, RESULTS_FILE
from sam4med.engine.runs import PROTOCOL_FILE, warn, write_text_atomic
from sam4med.engine.overlays import PALETTE, new_figure, quiet
from sam4med.evaluation.summary import (
    FACTORS,
    ok_rows,
    ordered,
    clicks_curve,
    factor_analysis,
    failures,
    load_results,
    mean_table,
    metrics_table,
    summary_table,
    timing_table,
    write_tables,
)

REPORT_FILE = "report.html"
OVERLAY_DIR = "overlays"
MAX_OVERLAYS = 12
MAX_SCATTER_POINTS = 1500
FACTOR_LABELS = {"object_area": "log10 object area (px)", "boundary_complexity": "boundary complexity",
                 "contrast": "contrast"}


# ------------------------------------------------------------------------------------- plots
def _png_uri(figure: Figure, dpi: int = 90) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _mode_colors(modes: Iterable[str]) -> dict[str, str]:
    return {mode: PALETTE[i % len(PALETTE)] for i, mode in enumerate(modes)}


def _boxplot_figure(ok: pd.DataFrame, modes: list[str]) -> Figure | None:
    """Dice per mode: all data, then one panel per modality (when there is more than one)."""
    modality = ok["modality"].fillna("unknown").astype(str) if "modality" in ok.columns else pd.Series("unknown", ok.index)
    groups: list[tuple[str, pd.DataFrame]] = [("all data sets", ok)]
    modalities = ordered(modality)
    if len(modalities) > 1:
        groups += [(f"modality: {m}", ok[modality == m]) for m in modalities]
    figure = new_figure(max(4.0, 0.55 * len(modes) + 1.5), 2.6 * len(groups))
    axes = figure.subplots(len(groups), 1, squeeze=False).ravel()
    drawn = False
    for ax, (title, group) in zip(axes, groups):
        data, labels = [], []
        for mode in modes:
            values = group.loc[group["mode"] == mode, "dice"].dropna().to_numpy()
            if len(values):
                data.append(values)
                labels.append(mode)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("Dice")
        ax.set_ylim(-0.02, 1.02)
        if not data:
            continue
        drawn = True
        boxes = ax.boxplot(data, patch_artist=True, widths=0.6, flierprops={"markersize": 2},
                           medianprops={"color": "black"})
        colors = _mode_colors(modes)
        for patch, label in zip(boxes["boxes"], labels):
            patch.set_facecolor(to_rgba(colors[label], 0.5))
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=35, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure if drawn else None


def _clicks_figure(curve: pd.DataFrame) -> Figure | None:
    round_columns = [c for c in curve.columns if c.startswith("dice_r")]
    if curve.empty or not round_columns:
        return None
    figure = new_figure(5.0, 3.2)
    ax = figure.subplots()
    clicks = [int(c[6:]) for c in round_columns]
    for i, row in curve.reset_index(drop=True).iterrows():
        ax.plot(clicks, row[round_columns].astype(float).to_numpy(), marker="o", markersize=3,
                color=PALETTE[i % len(PALETTE)], label=f"{row['dataset']} (n={int(row['n'])})")
    ax.set_xlabel("corrective clicks (0 = initial prompt)")
    ax.set_ylabel("mean Dice")
    ax.set_xticks(clicks)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return figure


def _factor_figure(ok: pd.DataFrame, modes: list[str], max_datasets: int = 6) -> Figure | None:
    """Dice against each factor: one row per factor, one column per data set, colored by mode."""
    factors = [f for f in FACTORS if f in ok.columns and ok[f].notna().any()]
    datasets = ordered(ok["dataset"])[:max_datasets]
    if not factors or not datasets:
        return None
    colors = _mode_colors(modes)
    rng = np.random.default_rng(0)
    height = 2.4 * len(factors) + 0.4
    figure = new_figure(2.8 * len(datasets) + 0.4, height)
    axes = figure.subplots(len(factors), len(datasets), squeeze=False)
    for r, factor in enumerate(factors):
        for c, dataset in enumerate(datasets):
            ax = axes[r][c]
            group = ok[(ok["dataset"] == dataset) & ok[factor].notna() & ok["dice"].notna()]
            if factor == "object_area":
                group = group[group[factor] > 0]
            if len(group) > MAX_SCATTER_POINTS:
                group = group.iloc[np.sort(rng.choice(len(group), MAX_SCATTER_POINTS, replace=False))]
            for mode in modes:
                part = group[group["mode"] == mode]
                if part.empty:
                    continue
                x = np.log10(part[factor]) if factor == "object_area" else part[factor]
                ax.scatter(x, part["dice"], s=9, alpha=0.6, color=colors[mode], label=mode, linewidths=0)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            if r == 0:
                ax.set_title(str(dataset), fontsize=9)
            if c == 0:
                ax.set_ylabel("Dice", fontsize=8)
            ax.set_xlabel(FACTOR_LABELS.get(factor, factor), fontsize=8)
    handles = [axes[0][0].scatter([], [], s=12, color=colors[m], label=m) for m in modes]
    figure.legend(handles=handles, loc="upper center", ncol=min(len(modes), 6), fontsize=7, frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 1 - (0.25 + 0.15 * math.ceil(len(modes) / 6)) / height))
    return figure


# -------------------------------------------------------------------------------------- HTML
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #bbb; }
table.data { border-collapse: collapse; font-size: 13px; margin: .5em 0; }
table.data th, table.data td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
table.data th { background: #f0f0f0; }
table.data tr:nth-child(even) td { background: #fafafa; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 12px; max-height: 30em; }
img { max-width: 100%; }
figure { display: inline-block; margin: .5em; vertical-align: top; }
figcaption { font-size: 12px; color: #555; }
.note { color: #666; font-style: italic; }
"""


def _fmt(digits: str) -> Callable[[object], str]:
    def format_value(value: object) -> str:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return html.escape(str(value))
        if not np.isfinite(number):
            return "—"
        return format(number, digits)

    return format_value


def _table(df: pd.DataFrame, index: bool = False, formats: dict[str, str] | None = None,
           default: str = ".3f") -> str:
    if df is None or df.empty:
        return '<p class="note">none</p>'
    formats = formats or {}
    formatters = {}
    for column in df.columns:
        if pd.api.types.is_float_dtype(df[column]):
            formatters[column] = _fmt(next((f for key, f in formats.items() if key in str(column)), default))
    return df.to_html(index=index, formatters=formatters, na_rep="—", classes="data", border=0, escape=True)


def _factor_wide(factors: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (dataset, mode), group in factors.groupby(["dataset", "mode"], sort=False):
        row: dict[str, object] = {"dataset": dataset, "mode": mode, "n": int(group["n"].max())}
        for _, item in group.iterrows():
            row[f"{item['factor']} rho"] = item["rho"]
            row[f"{item['factor']} p"] = item["p"]
        rows.append(row)
    return pd.DataFrame(rows)


def _overlay_files(results_dir: Path, limit: int = MAX_OVERLAYS) -> list[Path]:
    """Up to ``limit`` overlay PNGs, taken in turn from each data set."""
    files = sorted(path for path in (results_dir / OVERLAY_DIR).glob("*.png") if path.is_file())  # not a folder
    by_dataset: dict[str, list[Path]] = {}
    for file in files:
        by_dataset.setdefault(file.stem.split("__")[0], []).append(file)
    chosen: list[Path] = []
    while len(chosen) < limit and any(by_dataset.values()):
        for queue in by_dataset.values():
            if queue and len(chosen) < limit:
                chosen.append(queue.pop(0))
    return chosen


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def write_report(results_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``results_dir/report.html`` (or ``out``): protocol, tables, plots and example overlays,
    all embedded; also writes the CSV tables (:func:`write_tables`) beside the results. ``results_dir`` may
    also name its ``results.jsonl``."""
    results_dir = Path(results_dir)
    if results_dir.name == RESULTS_FILE and results_dir.is_file():
        results_dir = results_dir.parent
    if not (results_dir / RESULTS_FILE).exists():
        raise InputError(f"{results_dir}: no {RESULTS_FILE} found; run `sam4med eval benchmark` first")
    if task := _other_task(results_dir):  # its tables and report would land among another verb's files
        raise InputError(f"{results_dir}: holds a `sam4med {task}` run, not an `eval benchmark` one; nothing written")
    out = Path(out) if out is not None else results_dir / REPORT_FILE
    check_output_file(out, "out", (".html", ".htm"))  # never the run's results.jsonl, an image or a mask
    check_outside_data_sets(out, "out")
    with quiet():
        body = _report_body(results_dir)
    title = "sam4med benchmark report"
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, page)
    return out


def _other_task(results_dir: Path) -> str | None:
    """The verb that wrote ``results_dir`` when it is not the benchmark: its protocol names a task (the
    segment and predict verbs), or it holds a priors record. A damaged protocol is the report's to say."""
    if (results_dir / "priors.json").is_file():  # samaug.store.SETTINGS_FILE (evaluation imports no other method)
        return "samaug priors"
    try:
        protocol = json.loads((results_dir / PROTOCOL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    task = protocol.get("task") if isinstance(protocol, dict) else None
    return str(task) if task else None


def _report_body(results_dir: Path) -> str:
    df = load_results(results_dir)
    if df.empty:  # before the tables: a report of nothing would overwrite those of an earlier report
        raise InputError(f"{results_dir / RESULTS_FILE}: holds no rows yet; run `sam4med eval benchmark` first")
    models = ordered(df["model"]) if "model" in df.columns else []
    if len(models) > 1:  # the tables average over a data set and mode: two models' rows would make one mean
        raise InputError(f"{results_dir / RESULTS_FILE}: holds rows of {len(models)} models "
                         f"({', '.join(sorted(map(str, models)))}); a report is of one model's run (the benchmark "
                         "writes each into its own --out)")
    write_tables(results_dir, df)
    ok = ok_rows(df, "dice", "modality", *FACTORS)
    modes = ordered(ok["mode"])
    protocol_path = results_dir / PROTOCOL_FILE
    protocol: dict | None = None
    if protocol_path.exists():
        try:
            protocol = json.loads(protocol_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            warn(f"{protocol_path}: damaged; the report leaves the protocol out")
            protocol = None
    errors = failures(df)

    if not models and isinstance(protocol, dict) and protocol.get("model"):
        models = [protocol["model"]]
    parts = [f"<h1>sam4med benchmark report{': ' + html.escape(', '.join(map(str, models))) if models else ''}</h1>"]
    parts.append(
        f"<p>{len(ordered(ok['dataset']))} data set(s), {ok.drop_duplicates(['dataset', 'image']).shape[0]} image(s), "
        f"{len(ok)} result row(s) in {len(modes)} mode(s); {len(errors)} failed image(s); "
        f"{int((df['status'] == NO_OBJECTS).sum())} image(s) without an object to score. "
        f"Results: <code>{html.escape(str(results_dir.resolve()))}</code></p>"
    )

    parts.append("<h2>Protocol</h2>")
    if protocol is not None:
        parts.append(f"<pre>{html.escape(json.dumps(protocol, indent=2, sort_keys=False))}</pre>")
    else:
        parts.append(f'<p class="note">{PROTOCOL_FILE} missing or unreadable.</p>')

    parts.append("<h2>Mean Dice (data set × mode)</h2>")
    parts.append(_table(mean_table(df, "dice").reset_index()))
    parts.append("<h2>Dice summary</h2>")
    parts.append(_table(summary_table(df, "dice")))
    parts.append("<h2>All metrics (means)</h2>")
    parts.append('<p class="note">Distances (hd95, hd, asd) in pixels, averaged over the objects where '
                 "both masks are non-empty; nsd is the normalised surface Dice.</p>")
    parts.append(_table(metrics_table(df), formats={"hd": ".2f", "asd": ".2f"}))

    parts.append("<h2>Dice distribution per mode and modality</h2>")
    figure = _boxplot_figure(ok, modes) if not ok.empty else None
    parts.append(_img(_png_uri(figure), "Dice box plots") if figure else '<p class="note">no successful rows</p>')

    parts.append("<h2>Interactive: Dice against clicks</h2>")
    curve = clicks_curve(df)
    figure = _clicks_figure(curve)
    if figure is None:
        parts.append('<p class="note">no interactive rows</p>')
    else:
        parts.append(_img(_png_uri(figure), "Dice against clicks"))
        parts.append(_table(curve, formats={"noc": ".2f"}))

    parts.append("<h2>Object factors</h2>")
    figure = _factor_figure(ok, modes) if not ok.empty else None
    parts.append(_img(_png_uri(figure), "Dice against object factors") if figure
                 else '<p class="note">no factor data</p>')
    parts.append("<h3>Spearman correlation of Dice with each factor</h3>")
    parts.append(_table(_factor_wide(factor_analysis(df, "dice")), formats={" p": ".2g"}))

    parts.append("<h2>Timing (seconds)</h2>")
    parts.append('<p class="note">encode_s per image; decode_s per prompt (interactive: per round); '
                 "everything_s per image.</p>")
    parts.append(_table(timing_table(df), default=".4f"))

    parts.append("<h2>Failures</h2>")
    parts.append(_table(errors) if not errors.empty else '<p class="note">no failures</p>')

    parts.append("<h2>Example overlays</h2>")
    overlays = _overlay_files(results_dir)
    if overlays:
        parts.append(f'<p class="note">Ground truth contour in green; predicted masks filled. '
                     f"{len(overlays)} of {len([p for p in (results_dir / OVERLAY_DIR).glob('*.png') if p.is_file()])} "
                     "overlays.</p>")
        for file in overlays:
            try:
                uri = "data:image/png;base64," + base64.b64encode(file.read_bytes()).decode("ascii")
            except OSError as error:  # one unreadable overlay is left out, not the report
                warn(f"{file}: cannot read ({error.strerror or type(error).__name__}); the report leaves it out")
                continue
            parts.append(f"<figure>{_img(uri, file.stem)}<figcaption>{html.escape(file.stem)}</figcaption></figure>")
    else:
        parts.append('<p class="note">no overlays</p>')
    return "\n".join(parts)
