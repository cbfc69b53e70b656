"""A training run's folder, the same for every trainer: ``config.json`` (checked on resume),
``split.json`` (image ids per data set and side) and ``history.jsonl`` (one row per epoch)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from sam4med.engine.data import Sample
from sam4med.engine.errors import InputError

CONFIG_FILE = "config.json"
SPLIT_FILE = "split.json"
HISTORY_FILE = "history.jsonl"


def claim_run_folder(out: Path, config: Mapping[str, object]) -> None:
    """Record ``config`` in ``out``, or refuse a folder that holds a run with another configuration."""
    path = out / CONFIG_FILE
    record = json.loads(json.dumps(config))
    if path.is_file():
        existing = json.loads(path.read_text(encoding="utf-8"))
        if existing != record:
            changed = sorted(k for k in existing.keys() | record.keys() if existing.get(k) != record.get(k))
            raise InputError(f"{out}: holds a run with another configuration ({', '.join(changed)} differ); "
                             "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2), encoding="utf-8")


def write_split(out: Path, splits: Mapping[str, Mapping[str, list[Sample]]]) -> None:
    """``split.json``: data set -> side -> image ids."""
    ids = {name: {side: [s.id for s in samples] for side, samples in sides.items()} for name, sides in splits.items()}
    (out / SPLIT_FILE).write_text(json.dumps(ids, indent=1), encoding="utf-8")


def append_history(out: Path, row: Mapping[str, object]) -> None:
    with (out / HISTORY_FILE).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
