"""Learning curves of training runs (the one training loop's ``history.jsonl``): the evidence that each
run had stopped improving when it was scored."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from sam4med.engine.runs import HISTORY_FILE, atomic_path


def write_training_curves(runs: Sequence[tuple[str, Path]], path: str | Path) -> Path:
    """Draw validation Dice and training loss per epoch of every ``(label, run folder)`` into ``path``.

    Runs that share a label (the seeds of one arm) share a colour and one legend entry; folders without a
    history yet are left out.
    """
    figure = Figure(figsize=(10, 4))
    val_axis, loss_axis = figure.subplots(1, 2)
    colours: dict[str, str] = {}
    for label, run in runs:
        if not (Path(run) / HISTORY_FILE).is_file():
            continue
        history = pd.read_json(Path(run) / HISTORY_FILE, lines=True)
        legend = None if label in colours else label
        colour = colours.setdefault(label, f"C{len(colours)}")
        val_axis.plot(history["epoch"], history["val_dice"], color=colour, label=legend, lw=1)
        loss_axis.plot(history["epoch"], history["loss"], color=colour, lw=1)
    val_axis.set(xlabel="epoch", ylabel="validation Dice", title="validation Dice")
    loss_axis.set(xlabel="epoch", ylabel="training loss", title="training loss")
    if colours:
        val_axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=90)
    figure.clear()
    return Path(path)
