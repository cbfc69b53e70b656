"""The one error type for bad user input: its message is a single line naming the file or argument."""

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import numpy as np

Item = TypeVar("Item")
Read = TypeVar("Read")


class InputError(ValueError):
    """Raised for unreadable files, mismatched sizes, bad prompts and other bad input."""


def missing_package(what: str, package: str, install: str) -> InputError:
    """One wording for an optional package that is not installed, named by what asked for it:
    ``--ray: needs Ray (pip install 'sam4med[distributed]')``."""
    return InputError(f"{what}: needs {package} (pip install {install})")


def read_every(items: Iterable[Item], read: Callable[[Item], Read]) -> list[Read]:
    """``read`` of every item, or one InputError with the first refusal's reason and the files of the others:
    a training set with several bad files is mended in one pass, not one run per file."""
    results, refused = [], []
    for item in items:
        try:
            results.append(read(item))
        except InputError as error:
            refused.append(str(error))
    if refused:
        others = [reason.split(": ", 1)[0] for reason in refused[1:]]  # each message starts with its file
        listed = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise InputError(refused[0] + (f" (unusable too: {listed})" if others else ""))
    return results


def one_line(error: BaseException) -> str:
    """An exception's message folded onto one line (its type's name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def refused_by_file_system(error: OSError, where: object = "file system") -> str:
    """``<file>: <why>`` for an OSError (permissions, a full or read-only disk), the one line every front end gives;
    ``where`` names the place when the error names no file."""
    reason = error.strerror or one_line(error)
    if isinstance(error, (FileExistsError, NotADirectoryError)):  # a file where a folder has to be made
        reason = f"{reason} (a file stands where a folder is needed)"
    return f"{error.filename if error.filename is not None else where}: {reason}"


def hw(shape: tuple[int, ...]) -> str:
    """A shape as HxW, the way messages name image sizes."""
    return f"{shape[0]}x{shape[1]}"


def check_image_array(image: object) -> None:
    """Refuse what no model can encode, for the Python functions that take pixels rather than a file (files are
    checked where they are read): not an (H, W, 3) array, no pixels, NaN or infinite values."""
    shape = getattr(image, "shape", None)
    if not isinstance(image, np.ndarray) or len(image.shape) != 3 or image.shape[2] != 3:
        raise InputError(f"image must be an (H, W, 3) RGB array, got {type(image).__name__} of shape {shape}")
    if 0 in image.shape[:2]:
        raise InputError(f"image is {hw(image.shape)}: it has no pixels")
    if image.dtype.kind in "fc" and not np.isfinite(image).all():
        raise InputError("image contains NaN or inf values")


def check_number(value: float, what: str, *, minimum: float | None = None, above: float | None = None,
                 maximum: float | None = None) -> float:
    """``value`` if it is a finite number within the bounds, else an InputError naming ``what``."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{what} {value}: must be a finite number")
    if minimum is not None and value < minimum:
        raise InputError(f"{what} {value}: must be >= {minimum}")
    if above is not None and value <= above:
        raise InputError(f"{what} {value}: must be > {above}")
    if maximum is not None and value > maximum:
        raise InputError(f"{what} {value}: must be <= {maximum}")
    return value


def _is_integer(value: object, minimum: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


def check_count(value: int, what: str) -> int:
    """``value`` if it is an integer of at least 1, else an InputError naming ``what``."""
    if not _is_integer(value, 1):
        raise InputError(f"{what} {value}: must be >= 1")
    return value


def check_whole(value: int, what: str) -> int:
    """``value`` if it is an integer of at least 0 (a number of extra rounds, clicks or pixels), else an InputError."""
    if not _is_integer(value, 0):
        raise InputError(f"{what} {value}: must be an integer >= 0")
    return value


def check_counts(**counts: int) -> None:
    """Each named count (keyword: option name with ``_`` for ``-``) an integer of at least 1."""
    for name, value in counts.items():
        check_count(value, f"--{name.replace('_', '-')}")


MAX_SEED = 2**32 - 1  # the trainers seed PyTorch with seed * 100_003 + epoch, which must fit its 64 bits


def check_seed(value: int, what: str) -> int:
    """``value`` if it can seed NumPy's and PyTorch's generators (an integer in 0..MAX_SEED), else an InputError."""
    if not _is_integer(value, 0) or value > MAX_SEED:
        raise InputError(f"{what} {value}: must be an integer from 0 to {MAX_SEED}")
    return value


def check_limit(value: int | None, what: str) -> int | None:
    """An optional count (None: no limit) that must be at least 1 when given."""
    if value is not None and not _is_integer(value, 1):
        raise InputError(f"{what} {value}: must be >= 1 (0 or unset: no limit)")
    return value


def check_tiling(tile: int | None, halo: int) -> None:
    """A tile core (None: whole images) of at least 16 px and a halo of at least 0 px."""
    if tile is not None and not _is_integer(tile, 16):
        raise InputError(f"--tile {tile}: must be at least 16 px (or unset for whole images)")
    check_whole(halo, "--halo")


PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> None:
    """A precision sam4med runs models in (``SamModel.precision``)."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")


def path_component(value: object, what: str) -> str:
    """``value`` if it is one safe file name (it becomes part of output paths), else an InputError.

    A data set's name or an image id decides where results are written: ``..``, a separator or an
    absolute path would put them outside the output folder.
    """
    if not isinstance(value, str):
        raise InputError(f"{what}: expected a string, got {type(value).__name__}")
    if value in ("", ".", "..") or any(c in value for c in "/\\\0") or value != value.strip() \
            or len(value.encode("utf-8")) > 200 or not value.isprintable():
        raise InputError(f"{what}: {value!r} is not a safe file name (one path component: no '/', '\\', '..' "
                         "or control characters, at most 200 bytes)")
    return value


def resolved(path: Path) -> Path | None:
    """``path`` with its links followed, or None for a symbolic link loop (Python 3.11's ``Path.resolve`` raises
    RuntimeError there, later versions OSError)."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):
        return None


def not_there(path: Path, what: str = "file") -> str:
    """Why ``path`` cannot be opened as a ``what``: a link loop, a folder where a file is wanted, a device or a
    pipe (which never ends, or is read once), or nothing there."""
    if path.is_symlink() and resolved(path) is None:
        return "a symbolic link loop"
    if what == "file" and path.is_dir():
        return "is a folder, not a file"
    if what == "file" and path.exists():
        return "not a regular file (a device, a pipe or a socket)"
    if path.is_symlink():
        return f"a symbolic link to {path.readlink()}, where there is no {what}"
    return f"no such {what}" + _other_case(path)


def _other_case(path: Path) -> str:
    """A name that differs only in case, said beside "no such file": a table or a list written on Windows or a Mac,
    whose file systems ignore case, names ``A.PNG`` for ``a.png``."""
    try:
        twins = sorted(entry.name for entry in path.parent.iterdir()
                       if entry.name.lower() == path.name.lower() and entry.name != path.name)
    except OSError:  # no such folder, or one that cannot be listed
        return ""
    return f" ({twins[0]} is there: names are case-sensitive here)" if twins else ""


def check_not_a_file(folder: Path, option: str = "--out") -> None:
    """Refuse a folder option that names an existing file, before anything is written for it."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{option} {folder}: is a file, not a folder; choose another {option}")


def check_output_file(out: Path, what: str, suffixes: tuple[str, ...]) -> None:
    """Refuse an output file path that is a folder, lacks one of ``suffixes`` (so it can never name an input of
    another kind) or lies under a file; found before any work, not when the result is written."""
    if out.is_dir():
        raise InputError(f"{what} {out}: is a folder; name a file ({', '.join(suffixes)})")
    if not out.name.lower().endswith(suffixes):
        raise InputError(f"{what} {out}: unknown extension (expected {', '.join(suffixes)})")
    blocking = next((folder for folder in out.parents if folder.exists() and not folder.is_dir()), None)
    if blocking is not None:
        raise InputError(f"{what} {out}: {blocking} is a file, not a folder")


DATA_SET_FOLDERS = ("images", "masks")  # the data set layout: both side by side


def check_outside_data_sets(out: Path, what: str = "--out") -> None:
    """Refuse an output inside a data set's images/ or masks/ folder (the layout: both side by side), for the
    verbs that are given no data set to keep apart from: a file written there would become a bad sample."""
    target = resolved(out)
    if target is None:
        raise InputError(f"{what} {out}: a symbolic link loop; name another path")
    for folder in (target, *target.parents):
        if folder.name in DATA_SET_FOLDERS and all((folder.parent / other).is_dir() for other in DATA_SET_FOLDERS):
            raise InputError(f"{what} {out}: lies inside the data set folder {folder}; name a folder outside it")


def check_apart(out: Path, inputs: Iterable[Path], what: str = "--out", roots: Iterable[Path] = (),
                writes: Iterable[str] = (), file_output: bool = False) -> None:
    """Refuse an output that could overwrite an input. ``out`` may not be an input (a file, or a folder such as
    a data set's images/ and masks/) nor lie inside one; it may not be one of the ``roots`` (the folder a verb
    was given), though it may lie inside it; and the folders it fills (``writes``, names under ``out``, such as
    masks/) may not meet an input. Results beside the data are fine; results over it are refused.

    An output folder may not lie in any data set's images/ or masks/, given or not, nor be a data set whose
    masks/ it would fill: its files would replace that set's ground truth. One mask file (``file_output``) may
    go into a data set's masks/: that is how a person adds a mask to a set."""
    target = resolved(out)
    if target is None:
        raise InputError(f"{what} {out}: a symbolic link loop; name another path")
    filled = [(name, target / name) for name in writes]
    for root in roots:
        if target == resolved(root):
            raise InputError(f"{what} {out}: is the input folder {root}; name another folder")
    for source in inputs:
        origin = resolved(source)
        if origin is None:  # a link loop holds nothing an output could overwrite; reading it fails on its own
            continue
        if target == origin:
            raise InputError(f"{what} {out}: is the input {source}; name another path")
        if target.is_relative_to(origin):
            raise InputError(f"{what} {out}: lies inside the input {source}; name a folder outside it")
        for name, folder in filled:
            if folder.is_relative_to(origin) or origin.is_relative_to(folder):
                raise InputError(f"{what} {out}: its {name}/ would write over the input {source}; name another folder")
    if file_output:
        return
    check_outside_data_sets(out, what)
    for name, folder in filled:
        if name in DATA_SET_FOLDERS and all((target / other).is_dir() for other in DATA_SET_FOLDERS):
            raise InputError(f"{what} {out}: is a data set (images/ and masks/); its {name}/ would be written over; "
                             "name another folder")
