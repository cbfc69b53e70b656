"""A data set on disk: ``images/<id>.<ext>`` and ``masks/<id>.png`` (0 = background,
foreground > 0), optionally ``dataset.json`` (name, modality, target, ``groups``: {image id: group})
and ``fov/<id>.png`` (field-of-view masks, as in DRIVE). An image and its mask share the id ``<id>``:
the file name without its image extension (``.nii.gz`` counts as one; a DICOM file may have none).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sam4med.engine.errors import InputError, one_line, path_component

PHOTO_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")  # read with PIL
# single-file medical formats of one 2D image, read with SimpleITK (detached headers such as .mhd are not)
MEDICAL_EXTENSIONS = (".dcm", ".dicom", ".nii.gz", ".nii", ".mha", ".nrrd")
IMAGE_EXTENSIONS = PHOTO_EXTENSIONS + MEDICAL_EXTENSIONS
DICOM_MAGIC_OFFSET = 128  # a DICOM file's preamble; "DICM" follows it


def image_extension(path: Path) -> str | None:
    """The image extension ``path`` ends with, lower case (``.dcm`` for a DICOM file named without one,
    such as ``IM0001`` or a UID), or None when it is not an image file by name or content."""
    name = path.name.lower()
    extension = next((e for e in IMAGE_EXTENSIONS if name.endswith(e)), None)
    if extension is None and path.is_file():
        try:
            with path.open("rb") as handle:
                handle.seek(DICOM_MAGIC_OFFSET)
                extension = ".dcm" if handle.read(4) == b"DICM" else None
        except OSError:
            return None
    return extension


def image_id(path: Path) -> str:
    """The id of an image or mask file: its name without the image extension (the whole name of a DICOM
    file named without one)."""
    extension = image_extension(path)
    if extension and path.name.lower().endswith(extension):
        return path.name[: -len(extension)]
    return path.name if extension else path.stem


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
    def folders(self) -> list[Path]:
        """Where its images, masks and other layout folders (fov/, instances/, volumes/) are: no output may be
        written into them."""
        found = {self.root / name for name in ("images", "masks", "fov", "instances", "volumes")} \
            | {s.image_path.parent for s in self.samples} \
            | {s.mask_path.parent for s in self.samples if s.mask_path is not None}
        return sorted(folder for folder in found if folder.is_dir())

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
    # a dataset.json that is there but cannot be read (a folder too) is refused, not passed over
    meta = _read_meta(root / "dataset.json") if path is not None and (root / "dataset.json").exists() else {}
    groups: dict[str, str] = meta.get("groups", {})

    image_files = _index_folder(images_dir, "images")
    if not image_files:
        raise InputError(f"{images_dir}: no images in the folder")
    if masks_dir is not None:
        mask_files = _match(image_files, _index_folder(masks_dir, "masks"), masks_dir, "mask", require_masks)
    elif require_masks:
        raise InputError(f"{root}: no masks folder (this needs ground-truth masks in masks/ beside images/)")
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
        name=path_component(name if name is not None else meta.get("name", root.resolve().name),
                            f"{root}: data set name"),
        modality=modality or meta.get("modality") or "unknown",
        target=target or meta.get("target") or "unknown",
        root=root,
        samples=samples,
    )


def load_datasets(paths: Iterable[str | Path | Dataset] | str | Path, require_masks: bool = True) -> list[Dataset]:
    """Several data sets (folders, or data sets already loaded) whose names are unique: results are
    keyed and stored by name. One folder given alone is one data set (not a string of characters)."""
    if isinstance(paths, (str, Path, Dataset)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise InputError("--data: no data set given")
    datasets: list[Dataset] = []
    for path in paths:
        dataset = path if isinstance(path, Dataset) else load_dataset(path, require_masks=require_masks)
        other = next((d for d in datasets if d.name == dataset.name), None)
        if other is not None:
            raise InputError(f"{path}: data set name '{dataset.name}' is also the name of {other.root}; "
                             "give each data set once, with its own name in dataset.json")
        datasets.append(dataset)
    return datasets


def data_option(datasets: Iterable[Dataset]) -> str:
    """How an error names the ``--data`` sets it is about: ``--data ROOT, ROOT``."""
    return f"--data {', '.join(str(d.root) for d in datasets)}"


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read data set description ({one_line(exc)})") from exc
    if not isinstance(meta, dict):
        raise InputError(f"{path}: expected a JSON object")
    for key in ("name", "modality", "target"):
        if key in meta and not isinstance(meta[key], str):
            raise InputError(f'{path}: "{key}" must be a string, got {type(meta[key]).__name__}')
    groups = meta.get("groups", {})
    if not isinstance(groups, dict) or not all(isinstance(v, str) for v in groups.values()):
        raise InputError(f'{path}: "groups" must map image ids to group names')
    _check_mask_encoding(path, meta.get("mask"))
    return meta


def _check_mask_encoding(path: Path, encoding: object) -> None:
    """Masks are read as 0 = background, any other value an object; a set that declares another encoding
    (inverted masks: background 255, foreground 0) would be scored with background and object swapped."""
    if encoding is None:
        return
    if not isinstance(encoding, dict):
        raise InputError(f'{path}: "mask" must describe the mask encoding as an object '
                         '(for example {"background": 0, "foreground": 255})')
    background, foreground = encoding.get("background", 0), encoding.get("foreground")
    if background != 0 or foreground == 0:
        raise InputError(f'{path}: "mask" declares background {background!r} and foreground {foreground!r}; sam4med '
                         "reads 0 as background and every other value as an object: store the masks that way "
                         "(for inverted 0/255 masks, 255 - mask)")


def _index_folder(folder: Path, what: str) -> dict[str, Path]:
    """File stem -> file for one folder of images or masks."""
    if not folder.is_dir():
        raise InputError(f"{folder}: {what} folder not found")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if not path.is_file() or image_extension(path) is None:
            raise InputError(
                f"{path}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)}, or DICOM); "
                "remove it or hide it with a leading '.'"
            )
        identifier = image_id(path)
        if identifier in found:
            raise InputError(f"{path}: id '{identifier}' is also used by {found[identifier].name}")
        found[identifier] = path
    return found


def _match(
    images: dict[str, Path], others: dict[str, Path], folder: Path, what: str, required: bool
) -> dict[str, Path]:
    """Pair masks (or FOV masks) with images by id; unpaired files on either side are errors, except masks
    without an image where masks are not ``required`` (images read for their own sake): those are left out."""
    orphans = [(other_id, other) for other_id, other in others.items() if other_id not in images]
    if orphans and required:
        raise InputError(f"{orphans[0][1]}: {what} without an image of id '{orphans[0][0]}'")
    if orphans:
        from sam4med.engine.runs import warn  # runs imports this module

        warn(f"{folder}: {len(orphans)} {what}(s) without an image left out (first {orphans[0][1].name})")
        others = {other_id: other for other_id, other in others.items() if other_id in images}
    if required:
        for image_id, image in images.items():
            if image_id not in others:
                raise InputError(f"{image}: no {what} in {folder} (expected {folder / image_id}.png)")
    return others
