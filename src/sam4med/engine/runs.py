"""Output folders that record what made them: a folder is claimed for one configuration, and asking
for another configuration in it is refused instead of mixing two kinds of results.

The same for every job: a training run's ``config.json`` (with ``split.json`` and ``history.jsonl``),
a benchmark's ``protocol.json``, a prior store's ``priors.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from sam4med.engine.datasets import Sample
from sam4med.engine.errors import InputError

CONFIG_FILE = "config.json"
PROTOCOL_FILE = "protocol.json"
SPLIT_FILE = "split.json"
HISTORY_FILE = "history.jsonl"


def write_json(path: Path, record: object) -> None:
    """Write JSON atomically (temporary file, fsync, rename), so a kill or a full disk never leaves half a
    record where a whole one was."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            handle.write(json.dumps(record, indent=2, default=str))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def claim_folder(folder: Path, record_file: str, record: Mapping[str, object]) -> None:
    """Record ``record`` in ``folder/record_file``, or refuse a folder that holds another one."""
    path = folder / record_file
    current = json.loads(json.dumps(record, default=str))  # tuples become lists, as in the stored file
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: is a file, not a folder; choose another --out")
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{path}: damaged (not JSON); it records how the results in {folder} were made, "
                             "so they cannot be resumed: choose another --out") from None
        if not isinstance(existing, dict):
            raise InputError(f"{path}: damaged (not a JSON object); choose another --out")
        if existing != current:
            changed = sorted(k for k in existing.keys() | current.keys() if existing.get(k) != current.get(k))
            raise InputError(f"{folder}: holds results made with other settings ({', '.join(changed)} differ); "
                             "choose another --out")
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_json(path, current)


def write_split(out: Path, splits: Mapping[str, Mapping[str, list[Sample]]]) -> None:
    """``split.json``: data set -> side -> image ids."""
    write_json(out / SPLIT_FILE, {name: {side: [s.id for s in samples] for side, samples in sides.items()}
                                  for name, sides in splits.items()})


def append_jsonl(path: Path, row: Mapping[str, object]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
