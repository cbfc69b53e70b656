"""One annotation session over a folder: the images it offers, their embeddings, the masks a person
makes with boxes and clicks, and saving them in the data set layout without ever losing a version.

Everything the session writes stays inside the folder: ``masks/<id>.png`` (0/255 for one object, a
label image for several), ``labels/<id>.json`` (the objects' names and values), ``dataset.json`` when
the folder had none, and ``.sam4med/`` (earlier versions of each mask, cached embeddings).
"""

from __future__ import annotations

import io
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sam4med.engine.datasets import IMAGE_EXTENSIONS
from sam4med.engine.errors import InputError, path_component
from sam4med.engine.imageio import read_image, read_intensities, read_mask
from sam4med.engine.predictor import EmbeddingCache, Predictor
from sam4med.engine.prompts import Prompt, select_mask, wants_multimask
from sam4med.engine.runs import atomic_path, write_bytes_atomic, write_json
from sam4med.engine.sam_model import SamModel
from sam4med.engine.volumes import window

TOOL_FOLDER = ".sam4med"
LABELS_FOLDER = "labels"
MASKS_FOLDER = "masks"


@dataclass
class ImageEntry:
    id: str
    path: Path

    def mask_path(self, root: Path) -> Path:
        return root / MASKS_FOLDER / f"{self.id}.png"

    def labels_path(self, root: Path) -> Path:
        return root / LABELS_FOLDER / f"{self.id}.json"


@dataclass
class SavedObject:
    """One object of a saved annotation: its name and its pixels."""

    label: str
    mask: np.ndarray  # HxW bool


@dataclass
class _ObjectState:
    """The logits of an object's last decoded mask, fed back with its next click (as SAM's demo does)."""

    low_res: torch.Tensor | None = None


@dataclass
class _OpenImage:
    index: int
    rgb: np.ndarray  # the model's input
    objects: dict[int, _ObjectState] = field(default_factory=dict)


def find_images(folder: Path) -> tuple[Path, list[ImageEntry]]:
    """The images to annotate: ``folder/images/`` in the data set layout, else the image files of
    ``folder`` itself (hidden files and sub-folders left out); sorted by id."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (give a data set folder or a folder of images)")
    root = folder.resolve()
    images_dir = folder / "images" if (folder / "images").is_dir() else folder
    entries: dict[str, ImageEntry] = {}
    for path in sorted(images_dir.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS \
                or not path.resolve().is_relative_to(root):  # a link out of the folder is never served
            continue
        if path.stem in entries:
            raise InputError(f"{path}: id '{path.stem}' is also used by {entries[path.stem].path.name}")
        entries[path.stem] = ImageEntry(path_component(path.stem, f"{path}: image id"), path)
    if not entries:
        raise InputError(f"{images_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images_dir, list(entries.values())


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_mask_png(data: bytes, shape: tuple[int, int], what: str) -> np.ndarray:
    """A mask sent by the page (any PNG, foreground > 0 in its first channel) as HxW bool of ``shape``."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("L") if image.mode not in ("L", "1") else image)
    except Exception as error:  # any decoding failure is the request's fault
        raise InputError(f"{what}: not a PNG image ({type(error).__name__})") from None
    if pixels.shape[:2] != shape:
        raise InputError(f"{what}: mask is {pixels.shape[0]}x{pixels.shape[1]} but the image is {shape[0]}x{shape[1]}")
    return pixels > 0


class AnnotationSession:
    """The state behind the annotation page; safe to call from the server's worker threads."""

    def __init__(self, folder: str | Path, model: SamModel, prefetch: bool = True):
        self.root = Path(folder).resolve()
        self.images_dir, self.images = find_images(self.root)
        self.model = model
        self.predictor = Predictor(model, EmbeddingCache(self.inside(self.root / TOOL_FOLDER / "embeddings")))
        self.prefetch = prefetch
        self._lock = threading.RLock()
        self._open: _OpenImage | None = None
        self._prefetching: threading.Thread | None = None

    # --- the image list -------------------------------------------------------------------
    def inside(self, path: Path) -> Path:
        """``path`` if it (its links followed) lies inside the folder: a ``masks`` link elsewhere is refused."""
        if not path.resolve().is_relative_to(self.root):
            raise InputError(f"{path}: leads outside {self.root}; nothing is written there")
        return path

    @property
    def takes_clicks(self) -> bool:
        return self.model.spec.takes_point_prompts

    def entry(self, index: int) -> ImageEntry:
        if not 0 <= index < len(self.images):
            raise KeyError(index)
        return self.images[index]

    def is_annotated(self, index: int) -> bool:
        return self.entry(index).mask_path(self.root).is_file()

    def listing(self) -> list[dict[str, object]]:
        return [{"index": i, "id": e.id, "annotated": self.is_annotated(i)} for i, e in enumerate(self.images)]

    # --- pixels for the page ---------------------------------------------------------------
    def describe(self, index: int) -> dict[str, object]:
        """Size, kind and intensity range of an image (for the page's window and level), and its saved objects."""
        pixels = read_intensities(self.entry(index).path)
        low, high = (float(v) for v in np.percentile(pixels, [0.5, 99.5]))
        return {"index": index, "id": self.entry(index).id, "height": pixels.shape[0], "width": pixels.shape[1],
                "gray": pixels.ndim == 2, "dtype": str(pixels.dtype), "range": [float(pixels.min()), float(pixels.max())],
                "window": [low, high] if high > low else [float(pixels.min()), float(pixels.max())],
                "objects": [o.label for o in self.saved_objects(index)]}

    def display_png(self, index: int, low: float | None = None, high: float | None = None) -> bytes:
        """The image as 8-bit PNG: colour as stored, gray and high-bit images through the window [low, high]."""
        pixels = read_intensities(self.entry(index).path)
        if low is not None and high is not None:
            if not (np.isfinite(low) and np.isfinite(high) and high > low):
                raise InputError(f"window {low}..{high}: needs two finite numbers, low < high")
            pixels = window(pixels, level_width=((low + high) / 2, high - low))
        elif pixels.dtype != np.uint8:
            pixels = window(pixels)
        return encode_png(np.ascontiguousarray(pixels))

    # --- the model --------------------------------------------------------------------------
    def open(self, index: int) -> float:
        """Make ``index`` the image that prompts go to (encoding it, or taking its cached embedding), then
        start encoding the next image in the background; seconds until this one was ready."""
        start = time.perf_counter()
        rgb = read_image(self.entry(index).path)
        with self._lock:
            if self._open is None or self._open.index != index:
                self.predictor.set_image(rgb)
                self._open = _OpenImage(index, rgb)
        seconds = time.perf_counter() - start
        if self.prefetch and index + 1 < len(self.images):
            self._start_prefetch(index + 1)
        return seconds

    def _start_prefetch(self, index: int) -> None:
        if self._prefetching is not None and self._prefetching.is_alive():
            return

        def encode_next() -> None:
            try:
                rgb = read_image(self.entry(index).path)
                cache = self.predictor.cache
                assert cache is not None
                key = cache.key(self.model, rgb)
                if cache.load(key, self.model.device) is None:
                    cache.store(key, self.model.encode(rgb).features)
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
        go in too, so each click corrects the last mask. Returns the mask and the model's IoU estimate."""
        if prompt.points is not None and not self.takes_clicks:
            raise InputError(f"model {self.model.spec.name} takes boxes only; clicks need a click-capable model "
                             "(--model litemedsam-click)")
        self.open(index)
        with self._lock:
            assert self._open is not None
            prompt.check_inside(self._open.rgb.shape[:2])
            state = self._open.objects.setdefault(object_id, _ObjectState())
            rule = self.model.spec.default_mask_rule
            mask_input = state.low_res if refine and prompt.points is not None else None
            decoded = self.predictor.predict([prompt], mask_input=mask_input, multimask=wants_multimask(rule, prompt))
            masks, iou = decoded.masks()[0], decoded.iou[0].cpu().numpy()
            choice = select_mask(masks, iou, "iou" if rule == "oracle" else rule)
            state.low_res = decoded.low_res[:, choice : choice + 1]
            return masks[choice], float(iou[choice])

    def forget(self, index: int, object_id: int) -> None:
        """Start an object afresh (cleared or deleted on the page): its next click ignores earlier masks."""
        with self._lock:
            if self._open is not None and self._open.index == index:
                self._open.objects.pop(object_id, None)

    # --- saving ---------------------------------------------------------------------------------
    def saved_objects(self, index: int) -> list[SavedObject]:
        """What was saved for an image: one object per label value (the names from ``labels/<id>.json``)."""
        entry = self.entry(index)
        path = entry.mask_path(self.root)
        if not path.is_file():
            return []
        with Image.open(path) as image:
            values = np.asarray(image)
        if values.ndim == 3:
            values = values[..., 0]
        names: dict[int, str] = {}
        labels_path = entry.labels_path(self.root)
        if labels_path.is_file():
            try:
                names = {int(o["value"]): str(o["label"]) for o in json.loads(labels_path.read_text())["objects"]}
            except (ValueError, KeyError, TypeError) as error:
                raise InputError(f"{labels_path}: damaged ({type(error).__name__})") from None
        if not names:  # a 0/255 mask: one object
            mask = read_mask(path)
            return [SavedObject(self._default_label(), mask)] if mask.any() else []
        return [SavedObject(name, values == value) for value, name in sorted(names.items()) if (values == value).any()]

    def save(self, index: int, objects: list[SavedObject]) -> Path:
        """Write an image's objects in the data set layout, keeping the version they replace.

        One object: ``masks/<id>.png`` with 0/255. Several: a label image (0 background, 1..N, 16 bits
        past 255 objects) and ``labels/<id>.json`` naming each value. Overlapping objects: the later wins.
        """
        entry = self.entry(index)
        shape = read_intensities(entry.path).shape[:2]
        for obj in objects:
            if obj.mask.shape != shape:
                raise InputError(f"object '{obj.label}': mask is {obj.mask.shape} but the image is {shape}")
        objects = [o for o in objects if o.mask.any()]
        path = self.inside(entry.mask_path(self.root))
        labels_path = self.inside(entry.labels_path(self.root))
        with self._lock:
            self._keep_previous(entry)
            path.parent.mkdir(exist_ok=True)
            if len(objects) <= 1:
                values = (objects[0].mask if objects else np.zeros(shape, bool)).astype(np.uint8) * 255
            else:
                values = np.zeros(shape, np.uint16 if len(objects) > 255 else np.uint8)
                for value, obj in enumerate(objects, 1):
                    values[obj.mask] = value
            with atomic_path(path) as temporary:
                Image.fromarray(values).save(temporary, format="PNG")
            if len(objects) > 1:
                labels_path.parent.mkdir(exist_ok=True)
                write_json(labels_path, {"image": entry.id, "objects": [{"value": v, "label": o.label}
                                                                         for v, o in enumerate(objects, 1)]})
            else:
                labels_path.unlink(missing_ok=True)
            self._describe_folder()
        return path

    def _keep_previous(self, entry: ImageEntry) -> None:
        """Move the saved mask (and its labels) under ``.sam4med/history/`` before it is replaced."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        history = self.inside(self.root / TOOL_FOLDER / "history")
        for current in (entry.mask_path(self.root), entry.labels_path(self.root)):
            if current.is_file():
                history.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(history / f"{entry.id}.{stamp}{current.suffix}", current.read_bytes())

    def history(self, index: int) -> list[Path]:
        """Earlier versions of an image's mask, oldest first."""
        folder = self.root / TOOL_FOLDER / "history"
        return sorted(folder.glob(f"{self.entry(index).id}.*.png")) if folder.is_dir() else []

    def _describe_folder(self) -> None:
        """A folder annotated here without ``dataset.json`` gets one, so the benchmark and trainers read it."""
        path = self.root / "dataset.json"
        if not path.exists() and not path.is_symlink():
            write_json(self.inside(path), {"name": self.root.name, "modality": "unknown", "target": self._default_label(),
                              "annotated_with": f"sam4med annotate ({self.model.spec.name})"})

    def _default_label(self) -> str:
        path = self.root / "dataset.json"
        if path.is_file():
            try:
                target = json.loads(path.read_text()).get("target")
            except (ValueError, AttributeError):
                target = None
            if isinstance(target, str) and target != "unknown":
                return target
        return "object"
