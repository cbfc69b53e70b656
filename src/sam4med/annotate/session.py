"""One annotation session: the frames it offers (the images of a folder, or the slices of a volume),
their embeddings, the masks a person makes with boxes and clicks, and saving them in the data set
layout without ever losing a version.

Everything the session writes stays inside its folder (a volume's folder is the one that holds it):
``masks/<id>.png`` (0/255 for one object, a label image for several) or ``masks/<volume>.nii.gz`` (a
label volume on the image's grid), ``labels/<id>.json`` (the objects' names and values),
``dataset.json`` when the folder had none, and ``.sam4med/`` (earlier versions, cached embeddings).
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from sam4med.engine.datasets import IMAGE_EXTENSIONS, image_extension, image_id
from sam4med.engine.errors import InputError, hw, path_component, resolved
from sam4med.engine.imageio import read_image, read_intensities, read_labels, read_mask
from sam4med.engine.predictor import EmbeddingCache, Predictor
from sam4med.engine.interactive import Correction, Round, correct
from sam4med.engine.prompts import Prompt, tight_box
from sam4med.engine.runs import atomic_path, write_bytes_atomic, write_json
from sam4med.engine.sam_model import SamModel
from sam4med.engine.segment import propagate
from sam4med.engine.tiling import make_predictor
from sam4med.engine.volumes import VOLUME_SUFFIXES, read_label_volume, read_volume, window, write_label_volume

TOOL_FOLDER = ".sam4med"
LABELS_FOLDER = "labels"
MASKS_FOLDER = "masks"
MAX_LABEL = 2**16 - 1  # masks and label volumes are kept in 16 bits


@dataclass
class SavedObject:
    """One object of a frame: its name and its pixels."""

    label: str
    mask: np.ndarray  # HxW bool


def _inside(root: Path, path: Path) -> Path:
    """``path`` if it (its links followed) lies inside ``root``: a ``masks`` link elsewhere is refused."""
    target = resolved(path)
    if target is None or not target.is_relative_to(root):
        raise InputError(f"{path}: leads outside {root} (or round a link loop); nothing is written there")
    return path


def _keep(root: Path, files: list[Path], name: str) -> None:
    """Copy what a save is about to replace under ``.sam4med/history/`` (timestamped)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    history = _inside(root, root / TOOL_FOLDER / "history")
    for current in files:
        if current.is_file():
            history.mkdir(parents=True, exist_ok=True)
            suffix = "".join(current.suffixes[-2:]) if current.name.endswith(".nii.gz") else current.suffix
            write_bytes_atomic(history / f"{name}.{stamp}{suffix}", current.read_bytes())


def _history(root: Path, name: str) -> list[Path]:
    """The files :func:`_keep` made of ``name`` (``<name>.<stamp><suffix>``): not another id's that starts with
    this one and a dot (``g8`` and ``g8.x``), whatever characters the id holds (a glob would read ``[``)."""
    history = root / TOOL_FOLDER / "history"
    stamp = re.compile(re.escape(name) + r"\.\d{8}T\d{6}\.\d{6}Z\.")
    return [p for p in history.iterdir() if stamp.match(p.name)] if history.is_dir() else []


def _read_names(path: Path) -> dict[int, str]:
    """Label value -> object name from ``labels/<id>.json`` (empty when there is none)."""
    if not path.is_file():
        return {}
    try:
        names = {int(o["value"]): str(o["label"]) for o in json.loads(path.read_text(encoding="utf-8"))["objects"]}
    except (ValueError, KeyError, TypeError, OverflowError) as error:
        raise InputError(f"{path}: damaged ({type(error).__name__})") from None
    if outside := [value for value in names if not 0 < value <= MAX_LABEL]:
        raise InputError(f"{path}: damaged (object value {outside[0]} outside 1..{MAX_LABEL})")
    return names


class ImageFolder:
    """The images of ``folder/images/`` (data set layout) or of the folder itself; masks as PNG."""

    volume = False

    def __init__(self, folder: Path):
        if not folder.is_dir():
            raise InputError(f"{folder}: not a folder or a volume (give a data set folder, a folder of images, "
                             f"or a volume: {', '.join(VOLUME_SUFFIXES)})")
        self.root = folder.resolve()
        images_dir = folder / "images" if (folder / "images").is_dir() else folder
        self.paths: dict[str, Path] = {}
        for path in sorted(images_dir.iterdir()):
            if path.name.startswith(".") or not path.is_file() or image_extension(path) is None \
                    or not path.resolve().is_relative_to(self.root):  # a link out of the folder is never served
                continue
            identifier = image_id(path)
            if identifier in self.paths:
                raise InputError(f"{path}: id '{identifier}' is also used by {self.paths[identifier].name}")
            self.paths[path_component(identifier, f"{path}: image id")] = path
        if not self.paths:
            raise InputError(f"{images_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}, or DICOM)")
        self.ids = list(self.paths)

    def intensities(self, index: int) -> np.ndarray:
        return read_intensities(self.paths[self.ids[index]])

    def rgb(self, index: int) -> np.ndarray:
        return read_image(self.paths[self.ids[index]])

    def stamp(self, index: int) -> tuple[int, int] | None:
        """What tells the frame's file was replaced since it was encoded (size, modification time)."""
        try:
            status = self.paths[self.ids[index]].stat()
        except OSError:
            return None
        return status.st_size, status.st_mtime_ns

    def _files(self, index: int) -> tuple[Path, Path]:
        image_id = self.ids[index]
        return self.root / MASKS_FOLDER / f"{image_id}.png", self.root / LABELS_FOLDER / f"{image_id}.json"

    def _existing_mask(self, index: int) -> Path | None:
        """The frame's mask as the folder has it: ours (.png), or a data set's in another format (.jpg, .tif)."""
        png = self._files(index)[0]
        if png.is_file():
            return png
        return next((png.with_suffix(s) for s in IMAGE_EXTENSIONS if png.with_suffix(s).is_file()), None)

    def is_annotated(self, index: int) -> bool:
        return self._existing_mask(index) is not None

    def saved_objects(self, index: int, default_label: str, shape: tuple[int, ...] | None = None) -> list[SavedObject]:
        """The frame's saved objects, checked against its size (``shape``, or read from the image)."""
        labels_path = self._files(index)[1]
        path = self._existing_mask(index)
        if path is None:
            return []
        names = _read_names(labels_path)
        shape = shape or self.intensities(index).shape  # a mask of another size would be drawn off its image
        if not names:  # a 0/255 (or any binary) mask: one object
            mask = read_mask(path, shape)
            return [SavedObject(default_label, mask)] if mask.any() else []
        values = read_labels(path, shape)
        return [SavedObject(name, values == value) for value, name in sorted(names.items()) if (values == value).any()]

    def write(self, index: int, objects: list[SavedObject], shape: tuple[int, int]) -> Path:
        """One object: 0/255. Several: a label image (1..N, 16 bits past 255); the later wins. Either way the
        objects' names beside it (``labels/<id>.json``), so reopening shows what was saved. ``shape`` is the
        frame's size, which the session checked the masks against."""
        path, labels_path = (_inside(self.root, p) for p in self._files(index))
        if len(objects) > MAX_LABEL:  # before anything is kept or written: a refused save changes nothing
            raise InputError(f"{self.ids[index]}: {len(objects)} objects, more than a 16-bit mask holds ({MAX_LABEL})")
        existing = self._existing_mask(index)
        _keep(self.root, [p for p in (existing, labels_path) if p is not None], self.ids[index])
        if len(objects) <= 1:
            values = (objects[0].mask if objects else np.zeros(shape, bool)).astype(np.uint8) * 255
        else:
            values = np.zeros(shape, np.uint16 if len(objects) > 255 else np.uint8)
            for value, obj in enumerate(objects, 1):
                values[obj.mask] = value
        path.parent.mkdir(exist_ok=True)
        labels_path.parent.mkdir(exist_ok=True)
        # the mask replaces the old one only once the names are written: a label image without its names would
        # read back as one object
        with atomic_path(path) as temporary:
            Image.fromarray(values).save(temporary, format="PNG")
            if objects:
                write_json(labels_path, {"image": self.ids[index], "objects": [
                    {"value": v if len(objects) > 1 else 255, "label": o.label} for v, o in enumerate(objects, 1)]})
            else:
                labels_path.unlink(missing_ok=True)
        if existing is not None and existing != path:  # one mask per id, or the data set no longer loads
            _inside(self.root, existing).unlink()
        return path

    def versions(self, index: int) -> int:
        return len([p for p in _history(self.root, self.ids[index]) if p.suffix != ".json"])


def hidden_under_later(objects: list[SavedObject]) -> list[str]:
    """The names of objects that keep no pixel in a label image, where the later object wins every pixel: the
    page says so, since a saved label image cannot hold them (nested structures want a mask each)."""
    hidden, covered = [], None
    for obj in reversed(objects):
        if obj.mask.any() and covered is not None and not (obj.mask & ~covered).any():
            hidden.append(obj.label)
        covered = obj.mask.copy() if covered is None else covered | obj.mask
    return hidden[::-1]


class VolumeSlices:
    """The axial slices of a volume (NIfTI, NRRD, MHA, a DICOM series folder); labels as one label volume
    ``masks/<name>.nii.gz`` on the image's grid, an object being one label value across slices."""

    volume = True

    def __init__(self, path: Path):
        self.image = read_volume(path)
        self.root = (path if path.is_dir() else path.parent).resolve()
        name = path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem
        self.name = path_component(name, f"{path}: volume name")
        self.ids = [f"{self.name} slice {z}" for z in range(self.image.array.shape[0])]
        self.display = self.image.array
        self.model_input = window(self.image.array)  # one window for the whole volume keeps slices comparable
        self.labels_file = self.root / MASKS_FOLDER / f"{self.name}.nii.gz"
        self.names_file = self.root / LABELS_FOLDER / f"{self.name}.json"
        self.labels = _sixteen_bits(read_label_volume(self.labels_file, like=self.image), self.labels_file) \
            if self.labels_file.is_file() else np.zeros(self.image.array.shape, np.uint16)
        self.names = _read_names(self.names_file)

    def intensities(self, index: int) -> np.ndarray:
        return self.display[index]

    def rgb(self, index: int) -> np.ndarray:
        return np.repeat(self.model_input[index][..., None], 3, axis=2)

    def stamp(self, index: int) -> None:  # read once, when the volume was opened
        return None

    def slices(self) -> list[np.ndarray]:
        return list(self.model_input)

    def is_annotated(self, index: int) -> bool:
        return bool(self.labels[index].any())

    def saved_objects(self, index: int, default_label: str, shape: tuple[int, ...] | None = None) -> list[SavedObject]:
        values = self.labels[index]  # on the image's grid, checked when the volume was opened
        return [SavedObject(self.names.get(int(v), default_label if int(v) == 1 else f"object {int(v)}"), values == v)
                for v in np.unique(values) if v]

    def value_of(self, label: str) -> int:
        """The label value of a named object, a new one for a new name."""
        for value, name in self.names.items():
            if name == label:
                return value
        value = max([0, *self.names, int(self.labels.max())]) + 1
        if value > MAX_LABEL:
            raise InputError(f"{label}: no label value left for a new object ({MAX_LABEL} are in use)")
        self.names[value] = label
        return value

    def write(self, index: int, objects: list[SavedObject], shape: tuple[int, int]) -> Path:
        """The slice's labels become exactly ``objects`` (the page sends all of a slice's objects)."""
        names = dict(self.names)
        try:
            values = [self.value_of(obj.label) for obj in objects]
        except InputError:  # no value left: the slice and the names stay as they were
            self.names = names
            raise
        self.labels[index] = 0
        for obj, value in zip(objects, values):
            self.labels[index][obj.mask] = value
        return self._write()

    def write_object(self, label: str, masks: np.ndarray) -> Path:
        """One object across slices (a propagation): where ``masks`` holds it, it replaces what was there."""
        value = self.value_of(label)
        self.labels[(self.labels == value) & masks.any(axis=(1, 2))[:, None, None]] = 0
        self.labels[masks] = value
        return self._write()

    def _write(self) -> Path:
        path, names_file = _inside(self.root, self.labels_file), _inside(self.root, self.names_file)
        _keep(self.root, [path, names_file], self.name)
        path.parent.mkdir(exist_ok=True)
        write_label_volume(self.labels, self.image, path)
        names_file.parent.mkdir(exist_ok=True)
        write_json(names_file, {"volume": self.name, "objects": [{"value": v, "label": n}
                                                                  for v, n in sorted(self.names.items())]})
        return path

    def versions(self, index: int) -> int:
        return len([p for p in _history(self.root, self.name) if p.name.endswith(".nii.gz")])


def _sixteen_bits(labels: np.ndarray, path: Path) -> np.ndarray:
    """A label volume as the annotator keeps it; values it would wrap are refused, so a save never rewrites them."""
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > MAX_LABEL):
        raise InputError(f"{path}: label values {int(labels.min())}..{int(labels.max())} lie outside 0..{MAX_LABEL}, "
                         "which the annotator keeps (16 bits); nothing was changed")
    return labels.astype(np.uint16)


Frames = ImageFolder | VolumeSlices


def open_frames(path: str | Path) -> Frames:
    """A volume file or DICOM series folder gives its slices; any other folder its images."""
    path = Path(path)
    is_volume = path.name.lower().endswith(VOLUME_SUFFIXES) or (
        path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir()))
    return VolumeSlices(path) if is_volume else ImageFolder(path)


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_mask_png(data: bytes, what: str) -> np.ndarray:
    """A mask sent by the page (any PNG, foreground > 0 in its first channel) as HxW bool."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("L") if image.mode not in ("L", "1") else image)
    except Exception as error:  # any decoding failure is the request's fault
        raise InputError(f"{what}: not a PNG image ({type(error).__name__})") from None
    return pixels > 0


@dataclass
class AutoObject:
    """An object everything mode found on a frame: its pixels, its tight box (x0, y0, x1, y1, inclusive) and the
    model's scores of the mask it came from."""

    mask: np.ndarray  # HxW bool
    box: tuple[int, int, int, int]
    predicted_iou: float
    stability: float


def find_objects(predictor: Predictor, taken: np.ndarray | None = None,
                 progress: Callable[[int, int], None] | None = None) -> list[AutoObject]:
    """Every object everything mode finds on the image ``predictor`` holds (the model's point grid, or box proposals
    for a box-only model; on tiles for a tiled predictor), as ``segment-everything`` labels an image, leaving out the
    pixels ``taken`` (HxW bool: the objects on the page). Each comes with its mask's tight box, so a click on it
    corrects it as a click on a drawn box's mask does. ``progress`` hears of each region (tile) of the grid done."""
    from sam4med.engine.everything import EverythingSettings, claim_pixels, everything_masks
    from sam4med.engine.segment import MIN_VISIBLE

    assert predictor.image is not None
    proposals = everything_masks(predictor, EverythingSettings(), progress)
    instances = claim_pixels(proposals, predictor.image.shape[:2], MIN_VISIBLE, taken)
    objects = []
    for value, i in enumerate(instances.kept, start=1):
        mask = instances.labels == value
        x0, y0, x1, y1 = (int(v) for v in tight_box(mask))
        objects.append(AutoObject(mask, (x0, y0, x1, y1), proposals[i].predicted_iou, proposals[i].stability))
    return objects


@dataclass
class _OpenFrame:
    index: int
    shape: tuple[int, int]
    stamp: tuple[int, int] | None  # the file as it was encoded (ImageFolder.stamp)
    rounds: dict[int, Round] = field(default_factory=dict)  # per object: its last mask, what a click corrects


class AnnotationSession:
    """The state behind the annotation page; safe to call from the server's worker threads."""

    def __init__(self, source: str | Path | Frames, model: SamModel, prefetch: bool = True, tile: int | None = None,
                 halo: int = 32, correction: Correction = "auto"):
        self.frames = source if isinstance(source, (ImageFolder, VolumeSlices)) else open_frames(source)
        self.root = self.frames.root
        self.model = model
        cache = EmbeddingCache(_inside(self.root, self.root / TOOL_FOLDER / "embeddings"))
        self.predictor = make_predictor(model, tile, halo, cache)  # tiled: each prompt on the tile that holds it
        self.prefetch = prefetch
        self.correction = correction  # what a corrective click may change (engine.interactive)
        self._lock = threading.RLock()
        self._open: _OpenFrame | None = None
        self._prefetching: threading.Thread | None = None
        # how far the last long request (Everything, a propagation) is: read without the lock while it runs
        self.progress: dict[str, object] | None = None

    # --- the frame list --------------------------------------------------------------------
    @property
    def takes_clicks(self) -> bool:
        return self.model.spec.takes_point_prompts

    def check(self, index: int) -> int:
        if not 0 <= index < len(self.frames.ids):
            raise KeyError(index)
        return index

    def listing(self) -> list[dict[str, object]]:
        return [{"index": i, "id": frame_id, "annotated": self.frames.is_annotated(i)}
                for i, frame_id in enumerate(self.frames.ids)]

    # --- pixels for the page ---------------------------------------------------------------
    def describe(self, index: int) -> dict[str, object]:
        """Size, kind and intensity range of a frame (for the page's window and level), and its saved objects."""
        pixels = self.frames.intensities(self.check(index))
        low, high = (float(v) for v in np.percentile(pixels, [0.5, 99.5]))
        lowest, highest = float(pixels.min()), float(pixels.max())
        return {"index": index, "id": self.frames.ids[index], "height": pixels.shape[0], "width": pixels.shape[1],
                "gray": pixels.ndim == 2, "dtype": str(pixels.dtype), "range": [lowest, highest],
                "window": [low, high] if high > low else [lowest, highest], "volume": self.frames.volume,
                "objects": [o.label for o in self.saved_objects(index, pixels.shape)]}

    def display_png(self, index: int, low: float | None = None, high: float | None = None) -> bytes:
        """The frame as 8-bit PNG: colour as stored, gray and high-bit frames through the window [low, high]."""
        pixels = self.frames.intensities(self.check(index))
        if (low is None) != (high is None):  # one bound alone would be ignored without a word
            raise InputError(f"window {low}..{high}: give both ends, or neither for the default window")
        if low is not None and high is not None:
            if not (np.isfinite(low) and np.isfinite(high) and high > low):
                raise InputError(f"window {low}..{high}: needs two finite numbers, low < high")
            pixels = window(pixels, level_width=((low + high) / 2, high - low))
        elif pixels.dtype != np.uint8:
            pixels = window(pixels)
        return encode_png(np.ascontiguousarray(pixels))

    # --- the model --------------------------------------------------------------------------
    def open(self, index: int) -> float:
        """Make ``index`` the frame that prompts go to (encoding it, or taking its cached embedding), then
        start encoding the next one in the background; seconds until this one was ready."""
        start = time.perf_counter()
        self.check(index)  # before anything: a negative index would name a frame from the end
        with self._lock:
            stamp = self.frames.stamp(index)  # an image replaced on disk while open is encoded again
            if self._open is None or (self._open.index, self._open.stamp) != (index, stamp):
                rgb = self.frames.rgb(index)
                self.predictor.set_image(rgb)
                self._open = _OpenFrame(index, rgb.shape[:2], stamp)
        seconds = time.perf_counter() - start
        if self.prefetch and index + 1 < len(self.frames.ids):
            self._start_prefetch(index + 1)
        return seconds

    def _start_prefetch(self, index: int) -> None:
        if self._prefetching is not None and self._prefetching.is_alive():
            return

        def encode_next() -> None:
            try:
                self.predictor.embed_ahead(self.frames.rgb(index))  # into the on-disk cache, for open() to load
            except InputError:
                pass  # an unreadable image says so when it is opened

        self._prefetching = threading.Thread(target=encode_next, daemon=True)
        self._prefetching.start()

    def wait_for_prefetch(self, timeout: float | None = None) -> None:
        """Let a background encoding finish (before the process ends, or to measure without it)."""
        if self._prefetching is not None:
            self._prefetching.join(timeout)

    def segment(self, index: int, object_id: int, prompt: Prompt, refine: bool = True) -> tuple[np.ndarray, float]:
        """The mask of one object for its whole current prompt; with ``refine`` the object's previous logits
        go in too, so each click (the prompt's last point) corrects the last mask as ``correction`` allows (an
        object whose last mask the session does not hold has it decoded from its prompt before the click).
        Returns the mask and the model's IoU estimate."""
        if prompt.points is not None and not self.takes_clicks:
            raise InputError(f"model {self.model.spec.name} takes boxes only; clicks need a click-capable model "
                             "(--model litemedsam-click)")
        with self._lock:
            self.open(index)
            assert self._open is not None
            prompt.check_inside(self._open.shape)
            rule = self.model.spec.default_mask_rule
            rule = "iou" if rule == "oracle" else rule
            clicked = refine and prompt.points is not None
            previous = self._open.rounds.get(object_id) if clicked else None
            if clicked and previous is None and (earlier := prompt.before_last_point()) is not None:
                # no mask held for it (an object everything mode found, or one undone): its prompt before this
                # click is decoded first, so the click corrects that mask as it would have when it was made
                _, _, previous = correct(self.predictor, earlier, None, rule, self.correction)
            mask, iou, self._open.rounds[object_id] = correct(self.predictor, prompt, previous, rule, self.correction)
            return mask, iou

    def everything(self, index: int, taken: np.ndarray | None = None) -> list[AutoObject]:
        """:func:`find_objects` on the frame: what the page's Everything adds."""
        heard = self._progress_of("everything", index)  # before the wait for the session and the image's encoding
        with self._lock:
            self.open(index)
            assert self._open is not None
            if taken is not None and taken.shape != self._open.shape:
                raise InputError(f"objects on the page: mask is {hw(taken.shape)} but the image is "
                                 f"{hw(self._open.shape)}")
            return find_objects(self.predictor, taken, heard)

    def _progress_of(self, task: str, index: int) -> Callable[[int, int], None]:
        """A long request starts: ``progress`` says so, and the function returned keeps it up to date (steps done
        of all: the grid's tiles, the slices)."""
        self.progress = {"task": task, "image": index, "done": 0, "total": None}

        def heard(done: int, total: int) -> None:
            self.progress = {"task": task, "image": index, "done": done, "total": total}

        return heard

    def forget(self, index: int, object_id: int) -> None:
        """Start an object afresh (cleared or deleted on the page): its next click ignores earlier masks."""
        with self._lock:
            if self._open is not None and self._open.index == self.check(index):
                self._open.rounds.pop(object_id, None)

    def propagate(self, index: int, obj: SavedObject, first: int | None = None, last: int | None = None
                  ) -> dict[str, object]:
        """Carry an object from this slice to slices ``first``..``last`` (default: the whole volume; the box of
        each slice's mask prompts the next, as ``segment-volume`` does) and save it; the slices it reached.

        A box always gives some mask, so the range is what ends the object (as the z of segment-volume's
        3D box does); a slice that comes back empty also stops its direction."""
        if not isinstance(self.frames, VolumeSlices):
            raise InputError("propagation needs a volume (open a NIfTI, NRRD, MHA file or a DICOM series)")
        self._check_sizes(index, [obj])
        if not obj.mask.any():
            raise InputError(f"object '{obj.label}': empty on this slice; segment it first")
        depth = len(self.frames.ids)
        first, last = (0 if first is None else first), (depth - 1 if last is None else last)
        if not 0 <= first <= self.check(index) <= last < depth:
            raise InputError(f"slices {first} to {last}: must hold slice {index} and lie within 0..{depth - 1}")
        heard = self._progress_of("propagate", index)
        with self._lock:
            masks = propagate(self.predictor, self.frames.slices(), index, obj.mask, (first, last),
                              mask_rule=self.model.spec.default_mask_rule, progress=heard)
            self._open = None  # the predictor now holds another slice's embedding
            self.frames.write_object(obj.label, masks)
        reached = np.flatnonzero(masks.any(axis=(1, 2)))
        return {"first": int(reached.min()), "last": int(reached.max()), "slices": len(reached)}

    # --- saving ---------------------------------------------------------------------------------
    def saved_objects(self, index: int, shape: tuple[int, ...] | None = None) -> list[SavedObject]:
        """The frame's saved objects; ``shape`` is its size when the caller has read it already."""
        return self.frames.saved_objects(self.check(index), self._default_label(), shape)

    def save(self, index: int, objects: list[SavedObject]) -> Path:
        """Write a frame's objects in the data set layout, keeping the version they replace."""
        shape = self._check_sizes(index, objects)
        with self._lock:
            path = self.frames.write(index, [o for o in objects if o.mask.any()], shape)
            self._describe_folder()
        return path

    def _check_sizes(self, index: int, objects: list[SavedObject]) -> tuple[int, int]:
        """The frame's size, once every object's mask has it."""
        shape = self.frames.intensities(self.check(index)).shape[:2]
        for obj in objects:
            if obj.mask.shape != shape:
                raise InputError(f"object '{obj.label}': mask is {hw(obj.mask.shape)} but the image is {hw(shape)}")
        return shape

    def versions(self, index: int) -> int:
        """How many earlier versions of this frame's mask are kept."""
        return self.frames.versions(self.check(index))

    def _describe_folder(self) -> None:
        """A folder annotated here without ``dataset.json`` gets one, so the benchmark and trainers read it."""
        path = self.root / "dataset.json"
        if not self.frames.volume and not path.exists() and not path.is_symlink():
            write_json(_inside(self.root, path), {
                "name": self.root.name, "modality": "unknown", "target": self._default_label(),
                "annotated_with": f"sam4med annotate ({self.model.spec.name})"})

    def _default_label(self) -> str:
        path = self.root / "dataset.json"
        if path.is_file():
            try:
                target = json.loads(path.read_text(encoding="utf-8")).get("target")
            except (ValueError, AttributeError):
                target = None
            if isinstance(target, str) and target != "unknown":
                return target
        return "object"
