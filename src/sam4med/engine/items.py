"""The one resumable loop over images: skip what is done, run one image, append its rows, record
failures as rows, show progress.

The work for one image is a plain function of that image returning its result rows, kept apart from
the loop, so that another executor (``engine.executors``: this process, or Ray actors) runs the same
function; the loop stays the one writer, and one process at a time writes a folder (a second is refused,
:func:`sam4med.engine.runs.sole_writer`). Rows stream to ``results.jsonl``, one
block per image written with one unbuffered write; every row carries ``dataset``, ``image`` and
``image_rows`` (the size of its block), so a block cut by a kill is found, dropped and redone, and
running the same command again continues after the last finished image. Every row also keeps the sha256
of its image's file and mask's (``image_sha256``, ``mask_sha256``), so an image or mask replaced under the
same id is done again rather than taken as finished.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from sam4med.engine.checkpoints import file_sha256
from sam4med.engine.datasets import Dataset, Sample
from sam4med.engine.executors import Executor, LocalExecutor
from sam4med.engine.runs import RESULTS_FILE as RESULTS_FILE  # re-exported: the verbs name it from here
from sam4med.engine.runs import parse_jsonl, sole_writer, warn, write_bytes_atomic
from sam4med.engine.runtime import release_free_memory

ItemKey = tuple[str, str]  # (data set name, image id)


@dataclass(frozen=True)
class WorkItem:
    dataset: Dataset
    sample: Sample

    @property
    def key(self) -> ItemKey:
        return self.dataset.name, self.sample.id


@dataclass
class ItemRunSummary:
    """What one pass of the loop did."""

    results: Path
    computed: int
    skipped: int
    failed: int
    seconds_per_item: float
    failed_before: int = 0  # of the skipped: images whose stored row is an error (kept, not retried)

    def describe(self, done: str = "computed") -> str:
        """``3 computed, 2 already there (1 of them failed before), 0 failed``."""
        before = f" ({self.failed_before} of them failed before)" if self.failed_before else ""
        return f"{self.computed} {done}, {self.skipped} already there{before}, {self.failed} failed"


def finished_items(path: Path) -> dict[ItemKey, dict]:
    """Images whose rows are all in the results file, each with its last row; a cut last line or a partial
    block is removed."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    pairs = [(line, row) for line, row in parse_jsonl(data, path, skip_damaged=True)
             if isinstance(row.get("image_rows"), int) and "dataset" in row and "image" in row]
    counts: dict[ItemKey, int] = {}
    last: dict[ItemKey, dict] = {}
    for _, row in pairs:
        key = (row["dataset"], row["image"])
        counts[key] = counts.get(key, 0) + 1
        last[key] = row
    done = {key: row for key, row in last.items() if counts[key] == row["image_rows"]}
    kept = b"".join(line + b"\n" for line, row in pairs if (row["dataset"], row["image"]) in done)
    if kept != data:
        if len(done) != len(counts):
            warn(f"{path}: {len(counts) - len(done)} image(s) with missing or damaged rows are computed again")
        write_bytes_atomic(path, kept)
    return done


def source_hashes(sample: Sample) -> dict[str, str | None]:
    """The sha256 of an image's file and its mask's; None where there is none or it cannot be read (a failed
    image whose file is mended later is done again too)."""
    def digest(path: Path | None) -> str | None:
        try:
            return None if path is None else file_sha256(path)
        except OSError:
            return None
    return {"image_sha256": digest(sample.image_path), "mask_sha256": digest(sample.mask_path)}


def _sources_changed(items: Sequence[WorkItem], finished: dict[ItemKey, dict]) -> set[ItemKey]:
    """The finished items whose image or mask file is no longer the one their rows were made from (rows
    written before the hashes were kept are taken as they are)."""
    changed = set()
    for item in items:
        row = finished.get(item.key)
        if row is not None and "image_sha256" in row:
            made_from = {key: row.get(key) for key in ("image_sha256", "mask_sha256")}
            if made_from != source_hashes(item.sample):
                changed.add(item.key)
    return changed


def forget_items(path: Path, keys: set[ItemKey]) -> None:
    """Remove the rows of ``keys`` from a results file (atomically), so those items run again."""
    pairs = parse_jsonl(path.read_bytes(), path, skip_damaged=True)
    write_bytes_atomic(path, b"".join(line + b"\n" for line, row in pairs
                                      if (row.get("dataset"), row.get("image")) not in keys))


LOG_SECONDS = 60.0  # where the output is not a terminal (a log file), how often the loop says how far it is
NO_OBJECTS = "no_objects"  # the status of an image whose mask holds nothing to score: done, not failed


def run_items(
    items: Sequence[WorkItem],
    process: Callable[[WorkItem], list[dict]],
    results: Path,
    description: str,
    error_fields: Callable[[WorkItem], Mapping[str, object]] = lambda item: {},
    show_progress: bool = True,
    check_done: Callable[[WorkItem], bool] | None = None,
    executor: Executor | None = None,
    option: str = "--out",
) -> ItemRunSummary:
    """Run ``process`` on every item not yet in ``results``; any failure becomes one error row
    (``status = "error"``, ``error``, plus ``error_fields(item)``) and the loop goes on.

    ``check_done(item)``: whether a finished item's own outputs (files beside the rows) are still whole and
    current; an item whose outputs are damaged, missing or out of date, or whose image or mask file has
    changed, is computed again, and the run says so.
    ``executor``: where ``process`` runs (default: here, one item after another); rows are written as items finish.
    A second run into the same folder while this one runs is refused, naming ``option``
    (:func:`~sam4med.engine.runs.sole_writer`)."""
    with sole_writer(results.parent, option):  # a second process into the same folder would write every row twice
        stored = finished_items(results)
        redo = _sources_changed(items, stored)
        if check_done is not None:
            redo |= {item.key for item in items if item.key in stored and item.key not in redo and not check_done(item)}
        if redo:
            warn(f"{results.parent}: {len(redo)} finished image(s) whose outputs are damaged, missing or out of date "
                 "are computed again")
            forget_items(results, redo)
        finished = set(stored) - redo
        pending = []
        for item in items:  # an item listed twice (the same image given twice) is done once
            if item.key not in finished:
                pending.append(item)
                finished.add(item.key)
        sources = {item.key: source_hashes(item.sample) for item in pending}  # before the work reads the files
        seconds: list[float] = []
        failed = 0
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      disable=not show_progress) as progress, results.open("ab", buffering=0) as handle:
            task = progress.add_task(description, total=len(items), completed=len(items) - len(pending))
            logged = started = time.perf_counter()
            log = show_progress and not progress.console.is_terminal  # nohup, a batch job: no bar, a line a minute
            for outcome in (executor or LocalExecutor()).outcomes(process, pending):
                item = outcome.item
                if outcome.fatal is not None:  # a disk that refuses: every later item would fail too
                    raise outcome.fatal
                if outcome.rows is None:
                    failed += 1
                    rows = [{"dataset": item.dataset.name, "image": item.sample.id, **error_fields(item),
                             "status": "error", "error": outcome.error}]
                else:
                    rows = outcome.rows
                    seconds.append(outcome.seconds)
                block = []
                for row in rows:
                    row.setdefault("status", "ok")
                    block.append(json.dumps({**row, **sources[item.key], "image_rows": len(rows)},
                                            default=_json_default) + "\n")
                _write_all(handle, "".join(block).encode())
                release_free_memory()  # one image's intermediates at a time, not the heap's high-water mark
                progress.update(task, advance=1, description=f"{description} {item.dataset.name}/{item.sample.id}")
                done = len(seconds) + failed
                if log and (time.perf_counter() - logged >= LOG_SECONDS or done == len(pending)):
                    logged = time.perf_counter()
                    each = (logged - started) / done
                    progress.console.print(
                        f"{description}: {len(items) - len(pending) + done} of {len(items)} images ({failed} failed), "
                        f"{each:.1f} s an image, about {each * (len(pending) - done) / 60:.0f} min left",
                        highlight=False, soft_wrap=True)
        skipped = len(items) - len(pending)
        computed = len(pending) - failed
        failed_before = sum(stored[key].get("status") == "error" for key in {item.key for item in items} - redo
                            if key in stored)
        return ItemRunSummary(results, computed, skipped, failed, float(np.mean(seconds)) if seconds else float("nan"),
                              failed_before)


def _write_all(handle: BinaryIO, data: bytes) -> None:
    """Write an image's block of rows whole and fsync it; a short write (a full disk) is an OSError, and
    the cut block it leaves is dropped on the next resume."""
    view = memoryview(data)
    while view:
        written = handle.write(view)
        if not written:
            raise OSError(errno.ENOSPC, "no space left on the device while writing results", handle.name)
        view = view[written:]
    os.fsync(handle.fileno())


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def finished_outputs(results: Path, outputs: Mapping[str, Path]) -> tuple[dict[str, dict], Callable[[WorkItem], bool]]:
    """The last stored row of each image, and the ``check_done`` of a loop that writes one image file per item
    (``outputs``: image id -> its path under ``results``' folder): an item that failed whole is done (its error
    row says why); one that succeeded, while its file can still be read."""
    stored = {row.get("image"): row for _, row in parse_jsonl(results.read_bytes(), results, skip_damaged=True)} \
        if results.is_file() else {}

    def whole(item: WorkItem) -> bool:
        row = stored.get(item.sample.id, {})
        return row.get("status") == "error" and "object" not in row \
            or _readable(results.parent / outputs[item.sample.id])
    return stored, whole


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as handle:
            handle.load()
    except (OSError, ValueError):
        return False
    return True
