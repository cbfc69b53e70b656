"""2D data sets: image/mask pairs on disk, reading them as SAM-family models take them,
objects of a mask, group-aware splits, and per-object factors for the benchmark.

A data set folder holds ``images/<id>.<ext>`` and ``masks/<id>.png`` (0 = background,
foreground > 0), optionally ``dataset.json`` (name, modality, target, ``groups``:
{image id: group}) and ``fov/<id>.png`` (field-of-view masks, as in DRIVE). An image and its
mask share the file stem ``<id>``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageFile
from scipy import ndimage
from skimage.measure import perimeter
from skimage.morphology import disk

from sam4med.engine.errors import InputError
from sam4med.engine.volumes import window

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
RING_RADIUS = 5
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's convert("L")
# PIL modes whose pixels numpy takes as they are stored; others go through convert("RGB").
_HIGH_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "F"}
_NUMPY_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"} | _HIGH_BIT_MODES


@dataclass(frozen=True)
class Sample:
    """One image with its mask (None when masks were not required) and optional group / FOV."""

    id: str
    image_path: Path
    mask_path: Path | None = None
    group: str | None = None
    fov_path: Path | None = None


@dataclass
class Dataset:
    """The samples of one data set, sorted by id, with its descriptive metadata."""

    name: str
    modality: str
    target: str
    root: Path
    samples: list[Sample]

    @property
    def groups(self) -> dict[str, list[Sample]]:
        """Group name -> its samples (sorted group names); empty when no sample has a group."""
        groups: dict[str, list[Sample]] = {}
        for sample in self.samples:
            if sample.group is not None:
                groups.setdefault(sample.group, []).append(sample)
        return dict(sorted(groups.items()))

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)


def load_dataset(
    path: str | Path | None = None,
    *,
    images: str | Path | None = None,
    masks: str | Path | None = None,
    name: str | None = None,
    modality: str | None = None,
    target: str | None = None,
    require_masks: bool = True,
) -> Dataset:
    """Index a data set folder, or an explicit ``images=``/``masks=`` pair of folders.

    ``path`` may hold ``dataset.json`` and ``fov/``; ``images`` and ``masks`` default to its
    ``images/`` and ``masks/`` and, when relative, are taken inside it. Arguments override
    dataset.json; the name falls back to the folder name and modality/target to "unknown".
    Hidden files are skipped; any other non-image file is an error rather than silently
    left out, as is an image without a mask (unless ``require_masks=False``) or a mask
    without an image.
    """
    if path is None and images is None:
        raise InputError("load_dataset: give a data set folder or images=")
    base = Path(path) if path is not None else Path()
    images_dir = base / (images if images is not None else "images")
    if masks is not None:
        masks_dir: Path | None = base / masks
    else:
        masks_dir = base / "masks" if path is not None and (base / "masks").is_dir() else None
    root = Path(path) if path is not None else images_dir.parent
    meta = _read_meta(root / "dataset.json") if path is not None and (root / "dataset.json").is_file() else {}
    groups: dict[str, str] = meta.get("groups", {})

    image_files = _index_folder(images_dir, "images")
    if not image_files:
        raise InputError(f"{images_dir}: no images in the folder")
    if masks_dir is not None:
        mask_files = _match(image_files, _index_folder(masks_dir, "masks"), masks_dir, "mask", require_masks)
    elif require_masks:
        raise InputError(f"{root}: no masks folder (give masks=, or require_masks=False to load images only)")
    else:
        mask_files = {}
    fov_dir = root / "fov"
    fov_files: dict[str, Path] = {}
    if path is not None and fov_dir.is_dir():
        fov_files = _match(image_files, _index_folder(fov_dir, "fov"), fov_dir, "fov mask", True)

    if groups:
        missing = next((i for i in image_files if i not in groups), None)
        if missing is not None:
            raise InputError(f"{image_files[missing]}: no entry in dataset.json groups (every image needs a group)")
    samples = [
        Sample(
            id=image_id,
            image_path=image_files[image_id],
            mask_path=mask_files.get(image_id),
            group=groups.get(image_id),
            fov_path=fov_files.get(image_id),
        )
        for image_id in sorted(image_files)
    ]
    return Dataset(
        name=name or meta.get("name") or root.resolve().name,
        modality=modality or meta.get("modality") or "unknown",
        target=target or meta.get("target") or "unknown",
        root=root,
        samples=samples,
    )


def read_image(path: str | Path) -> np.ndarray:
    """Read a 2D image as HxWx3 uint8 RGB, the input of SAM-family models.

    8-bit gray is replicated to three channels, alpha is dropped and palettes are expanded.
    Images of more than 8 bits (16-bit or float gray or colour) are mapped to 8 bits with the
    [0.5, 99.5] percentile window of all their channels together (see ``volumes.window``).
    """
    path = Path(path)
    with _opened(path) as image:
        pixels = np.asarray(image.convert("RGB")) if image.mode in ("P", "PA") else _pixels(image, path)
    if pixels.ndim == 3:
        pixels = pixels[..., :3] if pixels.shape[-1] >= 3 else pixels[..., 0]  # drop alpha
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    elif pixels.dtype != np.uint8:
        if not np.isfinite(pixels).all():
            raise InputError(f"{path}: image contains NaN or inf values")
        pixels = window(pixels)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return np.ascontiguousarray(pixels)


def read_mask(path: str | Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read a binary mask as HxW bool: foreground is value > 0 of the first channel (label
    images count as one foreground); JPEG masks use > 127, since compression leaves faint
    non-zero pixels around the object. ``shape`` (HxW, or an image's HxWxC) must match."""
    path = Path(path)
    with _opened(path) as image:
        pixels = _pixels(image, path)
    if pixels.ndim == 3:
        pixels = pixels[..., 0]
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise InputError(f"{path}: mask contains NaN or inf values")
    mask = pixels > (127 if path.suffix.lower() in (".jpg", ".jpeg") else 0)
    if shape is not None and mask.shape != tuple(shape[:2]):
        raise InputError(f"{path}: mask is {_hw(mask.shape)} (HxW) but the image is {_hw(shape)}")
    return mask


def load_pair(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """The image (HxWx3 uint8) and mask (HxW bool) of a sample, checked to be the same size."""
    if sample.mask_path is None:
        raise InputError(f"{sample.image_path}: sample '{sample.id}' has no mask")
    image = read_image(sample.image_path)
    return image, read_mask(sample.mask_path, image.shape)


def object_labels(mask: np.ndarray, *, min_area: int = 1, connectivity: int = 2) -> tuple[np.ndarray, list[int]]:
    """Connected-component labels of a binary mask and the ids of components of at least
    ``min_area`` pixels, in label order (raster order of each component's first pixel).

    Callers that keep only some objects (a benchmark capping hundreds of nuclei) build masks
    for those alone instead of one full-size array per component.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise InputError(f"mask_objects: mask must be 2D, got shape {mask.shape}")
    if connectivity not in (1, 2):
        raise InputError(f"mask_objects: connectivity must be 1 or 2, got {connectivity}")
    labels, count = ndimage.label(mask, structure=ndimage.generate_binary_structure(2, connectivity))
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    return labels, [label for label in range(1, count + 1) if areas[label] >= min_area]


def mask_objects(
    mask: np.ndarray, *, as_one_object: bool = False, min_area: int = 1, connectivity: int = 2
) -> list[np.ndarray]:
    """Split a binary mask into objects: its connected components (connectivity 2 = 8-connected,
    1 = 4-connected), in label order, so the order is reproducible. Components under
    ``min_area`` pixels are dropped (specks); ``as_one_object`` returns the kept foreground as a
    single object. An empty result is returned as [], leaving to the caller whether that is an
    error (see ``require_objects``).
    """
    labels, kept = object_labels(mask, min_area=min_area, connectivity=connectivity)
    if as_one_object:
        return [np.isin(labels, kept)] if kept else []
    return [labels == label for label in kept]


def require_objects(mask: np.ndarray, path: str | Path) -> None:
    """Raise InputError naming ``path`` when the mask has no foreground but an object is needed."""
    if not np.any(mask):
        raise InputError(f"{path}: mask is empty")


def split_samples(
    dataset: Dataset, fractions: Mapping[str, float] | None = None, seed: int = 0
) -> dict[str, list[Sample]]:
    """Split samples into sides (default train 0.7 / val 0.1 / test 0.2), reproducibly per seed.

    With groups (patients, video sequences), whole groups are the units, so near-identical
    frames of one group never straddle two sides: units are shuffled by ``seed`` and each goes
    to the side furthest below its target count. Fractions are then reached only as closely as
    group sizes allow, and a side may stay empty when there are fewer groups than sides.
    Without groups every sample is its own unit. Samples keep data-set order within a side.
    """
    fractions = dict(DEFAULT_FRACTIONS if fractions is None else fractions)
    if not fractions or any(f <= 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise InputError(f"split_samples: fractions must be positive and sum to 1, got {fractions}")
    groups = dataset.groups
    if groups and all(group.lower() in SPLIT_NAMES for group in groups):
        raise InputError(
            f"{dataset.name}: groups already name a split ({', '.join(groups)}); use predefined_split(dataset)"
        )
    units = list(groups.values()) + [[s] for s in dataset.samples if s.group is None]
    targets = {side: fraction * len(dataset) for side, fraction in fractions.items()}
    sides: dict[str, list[Sample]] = {side: [] for side in fractions}
    for index in np.random.default_rng(seed).permutation(len(units)):
        side = max(sides, key=lambda s: targets[s] - len(sides[s]))
        sides[side].extend(units[index])
    order = {sample.id: position for position, sample in enumerate(dataset.samples)}
    return {side: sorted(members, key=lambda s: order[s.id]) for side, members in sides.items()}


def predefined_split(dataset: Dataset) -> dict[str, list[Sample]]:
    """The split that the data set's groups name (train/training, val/valid/validation,
    test/testing), as "train", "val", "test" keys for the sides that have samples."""
    sides: dict[str, list[Sample]] = {}
    for sample in dataset.samples:
        side = SPLIT_NAMES.get((sample.group or "").lower())
        if side is None:
            raise InputError(
                f"{dataset.name}: sample '{sample.id}' has group {sample.group!r}, not a split name "
                f"({', '.join(SPLIT_NAMES)})"
            )
        sides.setdefault(side, []).append(sample)
    return {side: sides[side] for side in ("train", "val", "test") if side in sides}


def training_split(dataset: Dataset, fractions: dict[str, float], split_seed: int) -> dict[str, list[Sample]]:
    """train / val / test samples of a data set.

    A data set whose groups name its split (MoNuSeg's train/val, DRIVE's training/test) keeps it;
    when it names no test side, its validation side is the test side. A missing validation side is
    drawn from the training side (one eighth, at least one image) by ``split_seed``. Otherwise the
    group-aware :func:`split_samples` (video sequences and patients never straddle two sides).
    """
    groups = dataset.groups
    if groups and all(group.lower() in SPLIT_NAMES for group in groups):
        sides = predefined_split(dataset)
        if "test" not in sides and "val" in sides:
            sides["test"] = sides.pop("val")
        if "val" not in sides:
            train = sides["train"]
            order = np.random.default_rng(split_seed).permutation(len(train))
            count = max(1, round(len(train) / 8))
            held = set(order[:count].tolist())
            sides["val"] = [s for i, s in enumerate(train) if i in held]
            sides["train"] = [s for i, s in enumerate(train) if i not in held]
    else:
        sides = split_samples(dataset, fractions, split_seed)
    for side in ("train", "val", "test"):
        if not sides.get(side):
            raise InputError(f"{dataset.name}: the {side} side of the split is empty (too few images or groups)")
    return {side: sides[side] for side in ("train", "val", "test")}


def object_factors(image: np.ndarray, object_mask: np.ndarray) -> dict[str, float]:
    """Per-object factors for the benchmark's factor analysis (as in the COSMOS 1050K study).

    ``object_area`` in pixels; ``area_fraction`` = area / image pixels; ``boundary_complexity``
    = perimeter^2 / (4 pi area), about 1 for a disc and larger for ragged or thin shapes;
    ``contrast`` = |mean gray inside - mean gray in a ring 5 px wide around the object| / 255
    (NaN when the object leaves no ring, i.e. fills the image). ``image`` is uint8, as
    ``read_image`` returns it; gray is ITU-R 601 luma.
    """
    image = np.asarray(image)
    mask = np.asarray(object_mask, dtype=bool)
    if image.dtype != np.uint8:
        raise InputError(f"object_factors: image must be uint8 as read_image returns it, got {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise InputError(f"object_factors: object mask is {_hw(mask.shape)} but the image is {_hw(image.shape)}")
    area = int(mask.sum())
    if area == 0:
        raise InputError("object_factors: object mask is empty")
    # Work in the object's box plus the ring margin: hundreds of nuclei per 1000x1000 tile.
    rows, cols = np.nonzero(mask)
    pad = RING_RADIUS + 1
    box = (
        slice(max(rows.min() - pad, 0), rows.max() + pad + 1),
        slice(max(cols.min() - pad, 0), cols.max() + pad + 1),
    )
    crop = mask[box]
    crop_gray = image[box].astype(np.float64) if image.ndim == 2 else image[box][..., :3] @ _LUMA
    ring = ndimage.binary_dilation(crop, structure=disk(RING_RADIUS)) & ~crop
    outside = crop_gray[ring].mean() if ring.any() else np.nan
    return {
        "object_area": float(area),
        "area_fraction": area / mask.size,
        "boundary_complexity": float(perimeter(crop) ** 2 / (4 * np.pi * area)),
        "contrast": float(abs(crop_gray[crop].mean() - outside) / 255),
    }


@contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """A fully decoded single-frame image; every decoding failure becomes one InputError.

    Truncated files must fail here rather than come back partly gray, so PIL's global
    LOAD_TRUNCATED_IMAGES (which other code may have set) is forced off while decoding.
    """
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise InputError(f"{path}: unknown image extension (expected one of {', '.join(IMAGE_EXTENSIONS)})")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as image:
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                raise InputError(
                    f"{path}: {frames} frames; a 2D image or mask must have one "
                    "(read 3D data with sam4med.engine.volumes.read_volume)"
                )
            image.load()
            yield image
    except InputError:
        raise
    except Exception as exc:  # PIL and tifffile raise many types for corrupt files
        raise InputError(f"{path}: cannot read image ({_one_line(exc)})") from exc
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _pixels(image: Image.Image, path: Path) -> np.ndarray:
    """Pixel values as stored (palette indices for palette images), channels last."""
    if image.format == "TIFF" and image.mode not in _HIGH_BIT_MODES and _bits(image) > 8:
        return tifffile.imread(path, key=0)  # PIL cuts colour samples over 8 bits to their high byte
    if image.mode in _NUMPY_MODES:
        return np.asarray(image)
    return np.asarray(image.convert("RGB"))


def _bits(image: Image.Image) -> int:
    bits = image.tag_v2.get(258, 1)  # TIFF BitsPerSample, one value or one per channel
    return max(bits) if isinstance(bits, tuple) else int(bits)


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read data set description ({_one_line(exc)})") from exc
    if not isinstance(meta, dict):
        raise InputError(f"{path}: expected a JSON object")
    groups = meta.get("groups", {})
    if not isinstance(groups, dict) or not all(isinstance(v, str) for v in groups.values()):
        raise InputError(f'{path}: "groups" must map image ids to group names')
    return meta


def _index_folder(folder: Path, what: str) -> dict[str, Path]:
    """File stem -> file for one folder of images or masks."""
    if not folder.is_dir():
        raise InputError(f"{folder}: {what} folder not found")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise InputError(
                f"{path}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)}); "
                "remove it or hide it with a leading '.'"
            )
        if path.stem in found:
            raise InputError(f"{path}: id '{path.stem}' is also used by {found[path.stem].name}")
        found[path.stem] = path
    return found


def _match(
    images: dict[str, Path], others: dict[str, Path], folder: Path, what: str, required: bool
) -> dict[str, Path]:
    """Pair masks (or FOV masks) with images by id; unpaired files on either side are errors."""
    for other_id, other in others.items():
        if other_id not in images:
            raise InputError(f"{other}: {what} without an image of id '{other_id}'")
    if required:
        for image_id, image in images.items():
            if image_id not in others:
                raise InputError(f"{image}: no {what} in {folder} (expected {folder / image_id}.png)")
    return others


def _hw(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}x{shape[1]}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
