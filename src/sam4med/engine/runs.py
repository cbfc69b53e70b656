"""Output folders that record what made them: a folder is claimed for one configuration, and asking
for another configuration in it is refused instead of mixing two kinds of results.

The same for every job: a training run's ``config.json`` (with ``split.json`` and ``history.jsonl``),
a benchmark's ``protocol.json``, a prior store's ``priors.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from sam4med.engine.datasets import Sample
from sam4med.engine.errors import InputError, check_not_a_file, one_line

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so a folder is not guarded against a second writer there
    fcntl = None  # type: ignore[assignment]

CONFIG_FILE = "config.json"
PROTOCOL_FILE = "protocol.json"
SPLIT_FILE = "split.json"
HISTORY_FILE = "history.jsonl"
DATASETS_FILE = "datasets.json"
RESULTS_FILE = "results.jsonl"  # the item loop's rows (engine.items), one folder claimed by one record
LOCK_FILE = ".sam4med.lock"  # held by the one process writing a folder's results or checkpoints (sole_writer)
FILE_SETTINGS = frozenset({"checkpoint", "init_weights", "backbone_checkpoint"})  # settings that name a file read
# which machine wrote a temporary: writers on other machines (Ray workers on shared storage) are not ours to judge
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


@contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """A temporary path beside ``path`` for any writer (PIL, matplotlib, SimpleITK, pandas); once the
    writer is done it is flushed to disk and renamed over ``path``, so a kill or a full disk never leaves
    half a file where a whole one was. The name keeps ``path``'s suffixes, from which writers pick the format,
    or ends in ``suffix`` alone (a writer that reads more into a name than its format)."""
    path = Path(path)
    named = path if suffix is None else Path(hashlib.sha256(os.fsencode(path.name)).hexdigest()[:16] + suffix)
    temporary = path.with_name(_temporary_name(named))
    try:
        yield temporary
        with temporary.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:  # name the file the user asked for, not the temporary one
        if error.filename not in (None, str(temporary), temporary):
            raise  # another file's failure inside the block (a second output written with this one) names that file
        raise OSError(error.errno, error.strerror or one_line(error), str(path)) from error
    finally:
        with suppress(OSError):  # a failed clean-up must not hide why the write failed
            temporary.unlink(missing_ok=True)


def _temporary_name(path: Path) -> str:
    """``.tmp.<host>.<pid>.<thread>.<name>``; a name that would pass the file system's limit (255 bytes) is shortened to
    a digest of it with the last suffixes kept (``.nii.gz``), from which writers pick the format."""
    prefix = f".tmp.{_HOST}.{os.getpid()}.{threading.get_native_id()}."  # two threads may write one file at once
    if len(os.fsencode(prefix + path.name)) <= 255:
        return prefix + path.name
    suffix = "".join(s for s in path.suffixes[-2:] if len(s) <= 8)
    return prefix + hashlib.sha256(os.fsencode(path.name)).hexdigest()[:16] + suffix


def remove_stale_temporaries(folder: Path) -> int:
    """Remove the temporaries of :func:`atomic_path` under ``folder`` whose writer, a process of this machine, is
    gone (a SIGKILL skips the clean-up), so that a resumed folder holds what one never stopped does. Live writers'
    and other machines' temporaries are left alone. Returns how many were removed."""
    removed = 0
    for path in folder.rglob(".tmp.*"):
        _, _, host, pid, *_ = path.name.split(".", 4) + [""]
        if host == _HOST and pid.isdigit() and not _running(int(pid)) and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """A binary handle whose content replaces ``path`` only once it is whole and on disk (see :func:`atomic_path`)."""
    with atomic_path(path) as temporary, temporary.open("wb") as handle:
        yield handle


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_writer(path) as handle:
        handle.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json(path: Path, record: object) -> None:
    """Write JSON atomically (see :func:`atomic_writer`)."""
    write_bytes_atomic(path, json.dumps(record, indent=2, default=str).encode("utf-8"))


def _record(path: Path, purpose: str) -> dict:
    """The JSON object a record file holds, or one line saying it is damaged and what it records."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if not isinstance(record, dict):
        raise InputError(f"{path}: damaged (not a JSON object); it records {purpose}: choose another --out")
    return record


def _same_setting(key: str, existing: object, current: object) -> bool:
    """Equal values, or two paths of one file for a setting that names a file (:data:`FILE_SETTINGS`): the
    checkpoint given relative to another working directory, or by its absolute path, is the same setting."""
    if existing == current:
        return True
    if key not in FILE_SETTINGS or not isinstance(existing, str) or not isinstance(current, str):
        return False
    try:
        return os.path.samefile(existing, current)
    except OSError:  # either path names no file (any more)
        return False


@contextmanager
def sole_writer(folder: Path, option: str = "--out") -> Iterator[None]:
    """Hold ``folder`` while this process writes its rows or checkpoints: a second run into it is refused in one
    line, where both would append the same rows or train from the same checkpoint. The lock is the operating
    system's (``flock``), so a killed run holds nothing; its file is removed once released. A file system that
    cannot lock (some network mounts) leaves the folder unguarded, as before."""
    handle = _lock(folder / LOCK_FILE, option) if fcntl is not None else None
    try:
        yield
    finally:
        if handle is not None:
            with suppress(OSError):
                (folder / LOCK_FILE).unlink()  # before the unlock: whoever locks next finds its own file
            handle.close()


def _lock(path: Path, option: str) -> BinaryIO | None:
    """An open handle of ``path`` holding its exclusive lock, with this process's id in it; None where the file
    system cannot lock."""
    while True:
        handle = path.open("a+b")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().decode(errors="replace").strip()
            handle.close()
            process = f" (process {holder})" if holder.isdigit() else ""
            raise InputError(f"{path.parent}: another run{process} is writing into this folder; let it finish or "
                             f"choose another {option}") from None
        except OSError:  # no locks on this file system
            handle.close()
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:  # its holder removed it between our open and our lock
            same = False
        if same:
            handle.truncate(0)
            handle.write(str(os.getpid()).encode())
            handle.flush()
            return handle
        handle.close()  # a file its last holder removed: lock the one now there


def claim_folder(folder: Path, record_file: str, record: Mapping[str, object], option: str = "--out") -> None:
    """Record ``record`` in ``folder/record_file``, or refuse a folder that holds another one (:func:`check_claim`);
    a folder resumed loses what killed writers left half written (:func:`remove_stale_temporaries`)."""
    if check_claim(folder, record_file, record, option):
        remove_stale_temporaries(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / record_file, json.loads(json.dumps(record, default=str)))  # tuples as stored: lists


def check_claim(folder: Path, record_file: str, record: Mapping[str, object], option: str = "--out") -> bool:
    """Whether ``folder`` already holds ``record`` (a run to resume); an InputError naming ``option`` when it holds
    another run, another kind of run or rows without their record. Nothing is written.

    A setting the stored record lacks matches while it is unset (None): settings added in a later version
    default to what earlier versions did, so their runs still resume. Settings that name a file match when
    both paths name the same file (the command line records them absolute)."""
    path = folder / record_file
    current = json.loads(json.dumps(record, default=str))  # tuples become lists, as in the stored file
    check_not_a_file(folder, option)
    other = next((name for name in (CONFIG_FILE, PROTOCOL_FILE) if name != record_file and (folder / name).is_file()),
                 None)
    if other is not None:  # a training run's folder and a batch verb's (predictions, a benchmark) are kept apart
        raise InputError(f"{folder}: holds another kind of run ({other}); choose another {option}")
    if not path.is_file() and (folder / RESULTS_FILE).is_file():  # another verb's rows, or a run's whose record is gone
        raise InputError(f"{folder}: holds another run's {RESULTS_FILE} (no {record_file} of this one beside it); "
                         f"choose another {option}")
    if not path.is_file():
        return False
    existing = _record(path, f"how the results in {folder} were made, so they cannot be resumed")
    added_unset = {k for k, v in current.items() if k not in existing and v is None}
    changed = sorted(k for k in existing.keys() | current.keys() - added_unset
                     if not _same_setting(k, existing.get(k), current.get(k)))
    if changed:
        raise InputError(f"{folder}: holds results made with other settings ({', '.join(changed)} "
                         f"{'differs' if len(changed) == 1 else 'differ'}); choose another {option}")
    return True


def check_unclaimed_outputs(folder: Path, record_file: str, outputs: Iterable[Path]) -> None:
    """Before ``folder`` is claimed (no ``record_file`` yet), refuse it when a file the run would write (``outputs``,
    relative to it) is already there: a resumed run replaces what it wrote itself, a new one no person's file."""
    if (folder / record_file).is_file():
        return
    existing = next((folder / path for path in outputs if (folder / path).exists() or (folder / path).is_symlink()),
                    None)
    if existing is not None:
        raise InputError(f"--out {folder}: already holds {existing}, which no run recorded there wrote; name a new or "
                         "empty folder")


def claim_datasets(out: Path, roots: Mapping[str, Path]) -> None:
    """Record the folder of each data set name in ``out/datasets.json``. Results are kept by data set name and
    image id, so a run may be extended to more data sets, but a name already recorded with another folder is
    refused: the second folder's images would be scored, averaged and reported with the first's."""
    path = out / DATASETS_FILE
    recorded = _record(path, f"which folder each data set of {out} came from") if path.is_file() else {}
    current = {name: str(Path(root).resolve()) for name, root in roots.items()}
    for name, root in current.items():
        if recorded.get(name, root) != root:
            raise InputError(f"{root}: data set '{name}' of {out} came from {recorded[name]}; give this one another "
                             "name in its dataset.json, or choose another --out")
    if any(name not in recorded for name in current):
        write_json(path, {**recorded, **current})


def split_record(splits: Mapping[str, Mapping[str, list[Sample]]]) -> dict[str, dict[str, list[str]]]:
    """What ``split.json`` holds: data set -> side -> image ids."""
    return {name: {side: [s.id for s in samples] for side, samples in sides.items()} for name, sides in splits.items()}


def write_split(out: Path, splits: Mapping[str, Mapping[str, list[Sample]]]) -> None:
    write_json(out / SPLIT_FILE, split_record(splits))


def check_split(out: Path, splits: Mapping[str, Mapping[str, list[Sample]]]) -> None:
    """Refuse to resume a run on other images: another folder (or an edited one) under a data set's name would
    otherwise continue weights trained on the first and record a split they never saw."""
    path = out / SPLIT_FILE
    if not path.is_file():
        return
    existing = _record(path, f"what the run in {out} was trained on, so it cannot be resumed")
    current = split_record(splits)
    if existing != current:
        names = sorted(n for n in set(existing) | set(current) if existing.get(n) != current.get(n))
        raise InputError(f"{out}: its run was trained on other images of {', '.join(names)} (its {SPLIT_FILE}); "
                         "choose another --out")


def append_jsonl(path: Path, row: Mapping[str, object]) -> None:
    """Append one row; flushed and fsynced, so a row the caller counts as written is on disk."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def warn(message: str) -> None:
    """One line on stderr for something a run repaired on its own (the user should still know)."""
    print(f"warning: {message}", file=sys.stderr)


def parse_jsonl(data: bytes, path: Path, skip_damaged: bool = False) -> list[tuple[bytes, dict]]:
    """(line, row) pairs of JSONL bytes. A cut last line (no newline: a kill mid-write) is left out; a
    damaged line elsewhere is an InputError, or with ``skip_damaged`` left out with a warning."""
    lines = data.split(b"\n")
    pairs = []
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if not skip_damaged:
                raise InputError(f"{path}: line {number} is damaged ({one_line(error)})") from None
            warn(f"{path}: line {number} is damaged and left out")
            continue
        pairs.append((line, row))
    return pairs


def read_jsonl(path: Path, skip_damaged: bool = False) -> list[dict]:
    """The rows of a JSONL file (see :func:`parse_jsonl`)."""
    return [row for _, row in parse_jsonl(path.read_bytes(), path, skip_damaged)]
