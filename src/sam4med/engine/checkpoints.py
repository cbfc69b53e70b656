"""Checkpoint files: reading them safely, the one layout every sam4med trainer writes, and the
registry of checkpoint kinds that turns a trained checkpoint back into a model.

Layout (``best.pt`` and ``last.pt`` alike)::

    {"format": CHECKPOINT_FORMAT, "kind": <registered kind>, "config": {...}, "meta": {...},
     "weights": <what was trained>, "epoch": int, "val_dice": float,  # None in a last.pt saved mid-epoch
     "resume": {...}}   # last.pt only: the whole module, optimiser, scheduler and loop state

The engine names no method: a method registers a loader for its kind with
:func:`register_checkpoint_kind`, or declares one under the ``sam4med.checkpoint_kinds`` entry-point
group so that ``load_model`` finds it without the caller importing the method first.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch

from sam4med.engine.errors import InputError
from sam4med.engine.runs import write_bytes_atomic

CHECKPOINT_FORMAT = "sam4med-checkpoint/1"
ENTRY_POINT_GROUP = "sam4med.checkpoint_kinds"

CheckpointLoader = Callable[[Path, dict, "str | torch.device | None"], Any]
_LOADERS: dict[str, CheckpointLoader] = {}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: Path, sha256_checked: bool = False) -> object:
    """A checkpoint loaded with ``weights_only=True``: a pickle can never run code here. ``sha256_checked``: the
    caller has just matched the file's sha256 to a published one, which covers every byte, so the zip format's own
    checksums are not read again (a third pass over the file on every start-up)."""
    if path.is_dir():
        raise InputError(f"{path}: a folder, not a checkpoint file (give the run's best.pt)")
    if not path.is_file():
        raise InputError(f"{path}: checkpoint file not found")
    if not sha256_checked:
        _check_crcs(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: not the user's business
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own message advises weights_only=False: never give that advice
        raise InputError(f"{path}: not a loadable PyTorch checkpoint (damaged, or it holds Python objects besides "
                         "tensors, which sam4med never unpickles since that could run code)") from None
    except Exception as error:  # zip and torch errors all mean the same to the user
        raise InputError(f"{path}: not a loadable PyTorch checkpoint ({type(error).__name__}: "
                         f"{' '.join(str(error).split())[:200]})") from None


def _check_crcs(path: Path) -> None:
    """PyTorch's zip format keeps a checksum of every part but never checks it when loading: flipped bytes (a
    failing disk, a bad copy) loaded as weights without a word. A file that is not a zip (PyTorch's legacy format)
    has none to check."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return  # the legacy format, no zip at all, or a cut one: torch.load says what it is
    try:
        with archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as error:
        raise InputError(f"{path}: damaged checkpoint ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
                         ) from None
    if damaged is not None:
        raise InputError(f"{path}: damaged checkpoint: its part {damaged} does not match its checksum (changed on "
                         "disk or in a copy); use another copy, or train again")


def is_trained_checkpoint(saved: object, path: Path) -> bool:
    """True for a sam4med training checkpoint; an earlier sam4med layout is refused."""
    if not isinstance(saved, dict):
        return False
    if saved.get("format") == CHECKPOINT_FORMAT:
        if not isinstance(saved.get("kind"), str) or not saved["kind"]:
            raise InputError(f"{path}: a sam4med checkpoint without the kind of run that wrote it (damaged, or not "
                             "written by sam4med)")
        damaged = [key for key in ("meta", "config") if not isinstance(saved.get(key, {}), dict)]
        if damaged:
            raise InputError(f"{path}: a sam4med checkpoint whose '{damaged[0]}' is not a record (damaged, or not "
                             "written by sam4med)")
        return True
    if "format" in saved or saved.get("kind") == "sam4med-promptable" or {"network", "config"} <= saved.keys():
        raise InputError(f"{path}: written by an earlier sam4med in another checkpoint layout; train it again")
    return False


def read_trained_checkpoint(path: Path, kind: str) -> dict:
    """A sam4med checkpoint of ``kind``, or one InputError saying what the file is instead."""
    saved = read_checkpoint(path)
    if not is_trained_checkpoint(saved, path):
        raise InputError(f"{path}: not a sam4med training checkpoint")
    assert isinstance(saved, dict)
    if saved["kind"] != kind:
        raise InputError(f"{path}: a '{saved['kind']}' checkpoint, not '{kind}'")
    return saved


@contextmanager
def unpacked(path: Path) -> Iterator[None]:
    """Around rebuilding a trained checkpoint's configuration and network: a file another version of sam4med wrote
    (or one edited by hand), whose configuration or weights do not fit this one, becomes one line naming it."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        if isinstance(error, InputError):
            raise
        reason = " ".join(str(error).split())[:200]
        raise InputError(f"{path}: its configuration or weights do not fit this version of sam4med "
                         f"({type(error).__name__}: {reason})") from None


def write_torch(path: Path, value: object) -> None:
    """``torch.save`` made atomic (see ``runs.atomic_writer``). The bytes are made in memory first:
    ``torch.save`` turns a full disk into an opaque RuntimeError, and this keeps it an OSError naming ``path``."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    write_bytes_atomic(path, buffer.getbuffer())


def save_checkpoint(path: Path, record: Mapping[str, object]) -> None:
    """Write ``record`` in the checkpoint layout, atomically."""
    write_torch(path, {"format": CHECKPOINT_FORMAT, **record})


def register_checkpoint_kind(kind: str, loader: CheckpointLoader) -> None:
    """Make ``load_model`` turn checkpoints of ``kind`` into models with ``loader(path, saved, device)``."""
    _LOADERS[kind] = loader


def checkpoint_loader(kind: str, path: Path) -> CheckpointLoader:
    if kind not in _LOADERS:
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            if entry.name == kind:
                register_checkpoint_kind(kind, entry.load())
    if kind not in _LOADERS:
        raise InputError(f"{path}: a '{kind}' checkpoint, which no installed package turns into a model")
    return _LOADERS[kind]


def state_dict_of(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a published checkpoint (plain, or under "model" / "state_dict")."""
    for key in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict):
        raise InputError(f"{path}: checkpoint holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint
