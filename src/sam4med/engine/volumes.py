"""3D input: reading volumes (NIfTI, NRRD, MetaImage, DICOM series), windowing and slicing them
for 8-bit 2D models, and writing label volumes back on the same grid.

Arrays are in numpy order (z, y, x) and ``Volume.spacing`` follows that order, so
``array.shape[i]`` and ``spacing[i]`` always belong together. ``origin`` and ``direction`` stay
in ITK's physical (x, y, z) convention, unchanged from the file, so that a written label
volume lands exactly on the image in any viewer.
"""

from __future__ import annotations

import gzip
import os
import re
import sys
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sam4med.engine.errors import InputError, not_there
from sam4med.engine.runs import atomic_path

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
# written in one file: a detached header (.mhd, .nhdr) names its data file, which an atomic write would leave
# under its temporary name
LABEL_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
# ITK recognises some formats by their lower-case suffix alone; a file named in capitals is read with its format's IO
_IMAGE_IO = {".nii": "NiftiImageIO", ".nii.gz": "NiftiImageIO", ".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO",
             ".mha": "MetaImageIO", ".mhd": "MetaImageIO"}


@dataclass
class Volume:
    """A scalar 3D image: ``array`` (z, y, x) float32 (float64 where values come near float32's range), ``spacing``
    (z, y, x) in mm, ``origin`` (x, y, z) in mm and ``direction`` (3x3 row-major) as ITK gives them."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    path: Path | None = None


def _float_type(values: np.ndarray) -> type[np.floating]:
    """float32, which halves a volume's memory, unless values come near its range: past a quarter of it, a
    window's width or a difference of two values could overflow to inf (finite values only)."""
    wide = values.dtype.kind == "f" and values.size and float(np.abs(values).max()) > float(np.finfo(np.float32).max) / 4
    return np.float64 if wide else np.float32


def read_volume(path: str | Path) -> Volume:
    """Read a volume file, or a folder holding a DICOM series (the series with most slices)."""
    path = Path(path)
    image = _read_itk(path)
    array = sitk.GetArrayFromImage(image)
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise InputError(f"{path}: volume contains {bad} NaN or inf voxels")
    array = array.astype(_float_type(array), copy=False)
    return Volume(
        array=array,
        spacing=_zyx(image.GetSpacing()),
        origin=tuple(float(v) for v in image.GetOrigin()),
        direction=tuple(float(v) for v in image.GetDirection()),
        path=path,
    )


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI-1 datatype codes of float32 and float64


def nifti_nonfinite(path: Path) -> int:
    """NaN and inf voxels in a NIfTI-1 file's own float data (0 for integer data or other headers)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(348)
            order = "<" if int.from_bytes(header[:4], "little") == 348 else ">"
            if int.from_bytes(header[:4], "little" if order == "<" else "big") != 348:
                return 0
            dims = np.frombuffer(header[40:56], dtype=f"{order}i2")
            code = int(np.frombuffer(header[70:72], dtype=f"{order}i2")[0])
            if code not in _NIFTI_FLOATS or not 1 <= dims[0] <= 7:
                return 0
            offset = int(np.frombuffer(header[108:112], dtype=f"{order}f4")[0])
            handle.read(max(0, offset - 348))
            dtype = np.dtype(f"{order}{_NIFTI_FLOATS[code]}")
            count = int(np.prod(dims[1 : dims[0] + 1].astype(np.int64)))
            values = np.frombuffer(handle.read(count * dtype.itemsize), dtype=dtype)
    except (OSError, EOFError, ValueError, zlib.error):
        return 0  # ITK has read the file already; a header this check cannot follow is ITK's to judge
    return int(np.count_nonzero(~np.isfinite(values)))


def read_label_volume(path: str | Path, like: Volume | None = None) -> np.ndarray:
    """Read a label volume as an integer array (z, y, x) in its stored type (float files with
    whole values become int32); with ``like``, check that it lies on the same voxel grid as
    that image, since labels off the grid would be misaligned."""
    path = Path(path)
    image = _read_itk(path)
    labels = sitk.GetArrayFromImage(image)
    if not np.issubdtype(labels.dtype, np.integer):
        if bad := int(np.count_nonzero(~np.isfinite(labels))):
            raise InputError(f"{path}: label volume contains {bad} NaN or inf voxels")
        if not np.array_equal(labels, np.round(labels)):
            raise InputError(f"{path}: label volume has non-integer values")
        labels = labels.astype(np.int32)
    if like is not None:
        _check_same_grid(path, labels.shape, image, like)
    return labels


def write_label_volume(labels: np.ndarray, like: Volume, path: str | Path) -> Path:
    """Write labels with the spacing, origin and direction of ``like``, so that the segmentation
    opens aligned with its image in a viewer. The smallest fitting integer type is used."""
    path = Path(path)
    labels = np.asarray(labels)
    if labels.shape != like.array.shape:
        raise InputError(f"{path}: labels have shape {labels.shape} but the image volume has {like.array.shape}")
    if not path.name.lower().endswith(LABEL_VOLUME_SUFFIXES):
        raise InputError(f"{path}: label volumes are written as {', '.join(LABEL_VOLUME_SUFFIXES)} (one file; "
                         "a detached .mhd or .nhdr header names a data file written apart)")
    if not (labels.dtype == bool or np.issubdtype(labels.dtype, np.integer)):
        raise InputError(f"{path}: labels must be bool or integer, not {labels.dtype}")
    image = sitk.GetImageFromArray(labels.astype(_label_dtype(labels)))
    image.SetSpacing(tuple(reversed(like.spacing)))
    image.SetOrigin(like.origin)
    image.SetDirection(like.direction)
    # ITK picks the format from the name and derives more names from it (an upper-case .MHA becomes .mhd + .zraw,
    # a.nii.nii.gz becomes a.nii.gz): it writes a temporary it cannot misread, renamed to the name asked for
    suffix = next(s for s in LABEL_VOLUME_SUFFIXES if path.name.lower().endswith(s))  # checked above: one matches
    with atomic_path(path, suffix=suffix) as temporary:
        _write_whole(image, temporary, path)
    return path


def _write_whole(image: sitk.Image, temporary: Path, path: Path) -> None:
    """Write ``image`` to ``temporary`` and read it back before it may replace ``path``: ITK's writers may neither
    throw nor stop when the disk fills (a NIfTI, gzipped or not, is left empty or cut short). What ITK prints goes
    into the one error line, or to stderr as it was after a good write."""
    error: RuntimeError | None = None
    read_back = False
    with _printed_by_itk() as printed:  # filled when the block ends
        try:
            sitk.WriteImage(image, str(temporary), useCompression=True)
            read_back = True
            written = sitk.ReadImage(str(temporary), imageIO=_image_io(path))
            whole = np.array_equal(sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(image))
        except RuntimeError as exc:
            error, whole = exc, False
    if whole:
        sys.stderr.write("".join(line + "\n" for line in printed))
        return
    reason = _without_itk_prefix("; ".join(printed[:2])) or (_itk_reason(error) if error is not None else "")
    if read_back:
        reason = f"the file written does not read back whole{f': {reason}' if reason else ''}; is the disk full?"
    raise InputError(f"{path}: cannot write label volume ({reason.replace(str(temporary), str(path))})")


def check_percentiles(lower: float, upper: float,
                      names: tuple[str, str] = ("window: lower_percentile", "upper_percentile")) -> None:
    """The percentile range of :func:`window`; a command checks it under its options' ``names`` before it reads
    a volume."""
    if not 0 <= lower < upper <= 100:
        raise InputError(f"{names[0]} {lower}, {names[1]} {upper}: need 0 <= lower < upper <= 100")


def window(
    array: np.ndarray,
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
    *,
    level_width: tuple[float, float] | None = None,
) -> np.ndarray:
    """Map intensities to uint8 for models trained on 8-bit photos.

    By default the window is the [0.5, 99.5] percentile range of the whole array (one window
    for a whole volume keeps slices comparable; the percentiles ignore a few extreme voxels
    that would otherwise squash the contrast). If that range is empty (a nearly constant
    image) the min-max range is used, and a constant array maps to 0. ``level_width`` gives a
    fixed window instead, such as a CT window in HU: (40, 400) for soft tissue.
    """
    values = np.asarray(array)
    if values.size == 0:
        raise InputError("window: array is empty")
    if not np.isfinite(values).all():
        raise InputError("window: array contains NaN or inf values")
    values = values.astype(_float_type(values), copy=False)
    if level_width is not None:
        level, width = level_width
        if not (np.isfinite(level) and np.isfinite(width) and width > 0 and np.isfinite(level + width)):
            raise InputError(f"window: level and width must be finite and the width positive, got {level_width}")
        low, high = level - width / 2, level + width / 2
    else:
        check_percentiles(lower_percentile, upper_percentile)
        low, high = (float(v) for v in np.percentile(values, [lower_percentile, upper_percentile]))
        if high <= low:
            low, high = float(values.min()), float(values.max())
        if high <= low:
            return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low))  # Python floats keep the array's type
    return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


def slices(volume_array: np.ndarray, axis: int = 0) -> Iterator[np.ndarray]:
    """The 2D slices (views) of a (z, y, x) array across ``axis``: 0 axial, 1 coronal, 2 sagittal."""
    array = np.asarray(volume_array)
    if array.ndim != 3:
        raise InputError(f"slices: expected a 3D array, got shape {array.shape}")
    return iter(np.moveaxis(array, _axis(axis), 0))


def _read_itk(path: Path) -> sitk.Image:
    """One scalar 3D ITK image from a file or DICOM folder, every failure as InputError."""
    if path.is_dir():
        image = _read_dicom_series(path)
    elif not path.exists():
        raise InputError(f"{path}: {not_there(path, 'file or folder')}")
    elif not _has_volume_suffix(path):
        raise InputError(
            f"{path}: unknown volume extension (expected one of {', '.join(VOLUME_SUFFIXES)}, or a DICOM folder)"
        )
    else:
        image = read_itk_file(path, "volume")
    if image.GetDimension() != 3:
        raise InputError(f"{path}: image is {image.GetDimension()}D; a volume must be 3D")
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InputError(f"{path}: {components} components per voxel; a volume must be scalar")
    return image


def read_itk_file(path: Path, what: str) -> sitk.Image:
    """One file read by ITK (a ``what``: volume or image), every failure, a truncated NIfTI file included,
    as one InputError. ITK's NIfTI reader turns NaN into 0 on the way in, so float NIfTI data is checked in
    the file itself: a volume, a label volume or a 2D image with NaN is refused rather than read as zeros."""
    nifti = path.name.lower().endswith((".nii", ".nii.gz"))
    if nifti:
        _check_nifti_length(path, what)
    with _printed_by_itk() as printed:
        try:
            image = sitk.ReadImage(str(path), imageIO=_image_io(path))
        except RuntimeError as exc:
            failure = exc
        else:
            failure = None
    if failure is not None:  # MetaImage's reader says why on stderr and throws "No such file or directory"
        reason = "; ".join(printed[:3]) or _itk_reason(failure)  # the first lines say why; the rest repeat it
        raise InputError(f"{path}: cannot read {what} ({reason})") from failure
    sys.stderr.write("".join(line + "\n" for line in printed))  # what a successful read printed, as it was
    if nifti and _may_hide_nonfinite(image) and (bad := nifti_nonfinite(path)):
        raise InputError(f"{path}: {what} contains {bad} NaN or inf {'voxels' if what == 'volume' else 'values'}")
    return image


def _image_io(path: Path) -> str:
    """The ITK reader of a volume format named by ``path``'s suffix in any case ("" lets ITK choose)."""
    name = path.name.lower()
    return next((io for suffix, io in _IMAGE_IO.items() if name.endswith(suffix)), "")  # no suffix ends another


@contextmanager
def _printed_by_itk() -> Iterator[list[str]]:
    """Collect the lines ITK's readers print to the process's stderr (C++ streams, past Python's ``sys.stderr``)
    while the block runs, so that a failed read says why in its one error line. The lines go to an anonymous
    file in memory where the system has one, else to an unnamed temporary file (a pipe could fill and block
    the reader)."""
    printed: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    memory = getattr(os, "memfd_create", None)
    with (open(memory("sam4med-itk"), "w+b") if memory else tempfile.TemporaryFile()) as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield printed
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            printed += [line.strip() for line in sink.read().decode(errors="replace").splitlines() if line.strip()]


def _may_hide_nonfinite(image: sitk.Image) -> bool:
    """Whether ITK's NIfTI reading may have turned NaN or inf into 0: float data holding an exact 0. Without
    one there was none, and the file is not read a second time."""
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64):
        return False
    return not np.all(sitk.GetArrayViewFromImage(image))


def _read_dicom_series(folder: Path) -> sitk.Image:
    """The series with the most files (first series UID on ties): folders often hold scouts too."""
    with _itk_warnings_off():  # ITK warns on stderr where no series is: our line says it
        series = sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not series:
        raise InputError(f"{folder}: no DICOM series found in the folder")
    files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series), key=len)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with _itk_warnings_off():  # "missing slices" warnings: _check_even_slices says it in one line
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{folder}: cannot read DICOM series ({_itk_reason(exc)})") from exc
    _check_even_slices(folder, reader, image)
    return image


@contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """ITK's warnings kept off stderr while the block runs, where sam4med says the same in its own line."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _check_even_slices(folder: Path, reader: sitk.ImageSeriesReader, image: sitk.Image) -> None:
    """A slice that GDCM could not parse (a truncated file) silently leaves a gap and ITK
    only prints a warning; the volume's z spacing would then be wrong, so refuse it."""
    key = "0020|0032"  # Image Position (Patient)
    count = len(reader.GetFileNames())
    if count < 3 or not all(reader.HasMetaDataKey(i, key) for i in range(count)):
        return
    normal = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
    positions = np.array([[float(v) for v in reader.GetMetaData(i, key).split("\\")] for i in range(count)])
    steps = np.diff(np.sort(positions @ normal))
    if steps.max() - steps.min() > 0.01 * np.median(steps) + 1e-3:
        raise InputError(
            f"{folder}: DICOM series has missing or unevenly spaced slices "
            f"(steps from {steps.min():.3g} to {steps.max():.3g} mm)"
        )


def _check_same_grid(path: Path, shape: tuple[int, ...], image: sitk.Image, like: Volume) -> None:
    if shape != like.array.shape:
        raise InputError(f"{path}: label volume has shape {shape} but the image volume has {like.array.shape}")
    for what, mine, theirs in (
        ("spacing", _zyx(image.GetSpacing()), like.spacing),
        ("origin", image.GetOrigin(), like.origin),
        ("direction", image.GetDirection(), like.direction),
    ):
        if not np.allclose(mine, theirs, rtol=1e-4, atol=1e-3):
            raise InputError(
                f"{path}: label volume {what} {_rounded(mine)} differs from the image's {_rounded(theirs)}"
            )


def _label_dtype(labels: np.ndarray) -> type:
    if labels.size == 0 or labels.dtype == bool:
        return np.uint8
    low, high = int(labels.min()), int(labels.max())
    if low >= 0:
        return np.uint8 if high < 2**8 else np.uint16 if high < 2**16 else np.uint32
    return np.int16 if -(2**15) <= low and high < 2**15 else np.int32


def _has_volume_suffix(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def _axis(axis: int) -> int:
    if not -3 <= axis <= 2:
        raise InputError(f"axis must be 0, 1 or 2 for a (z, y, x) volume, got {axis}")
    return axis % 3


def _zyx(spacing: tuple[float, ...]) -> tuple[float, float, float]:
    z, y, x = (float(v) for v in reversed(spacing))
    return z, y, x


def _rounded(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(float(v), 4) for v in values)


def _itk_reason(exc: RuntimeError) -> str:
    """ITK's message on one line: the error line and the innermost reason (the last line),
    without the source location that comes first, nor the chain of callers in between."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = lines[1:] or lines
    reason = " ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines)
    return _without_itk_prefix(reason) or type(exc).__name__


def _without_itk_prefix(line: str) -> str:
    """``itk::ERROR: NrrdImageIO(0x55d0...): why`` -> ``why``."""
    return re.sub(r"(ITK ERROR|sitk::ERROR|itk::ERROR):\s*(\w+\(0x[0-9a-f]+\):\s*)?", "", line)


def _check_nifti_length(path: Path, what: str) -> None:
    """ITK reads a truncated NIfTI file without complaint, zero-filling the missing voxels, so
    compare the data length that the header declares (read by ITK) with what the (decompressed)
    file holds."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot read {what} ({_itk_reason(exc)})") from exc
    if not (reader.HasMetaDataKey("vox_offset") and reader.HasMetaDataKey("bitpix")):
        return
    expected = int(float(reader.GetMetaData("vox_offset"))) + \
        int(np.prod(reader.GetSize(), dtype=np.int64)) * int(reader.GetMetaData("bitpix")) // 8
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            length = sum(len(chunk) for chunk in iter(lambda: stream.read(1 << 22), b""))
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: cannot read {what} ({' '.join(str(exc).split())})") from exc
    if length < expected:
        raise InputError(f"{path}: truncated file ({length} of the {expected} bytes its header declares)")
