"""Prompted segmentation of one image or one volume: what a user calls on their own data."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from PIL import Image

from sam4med.engine.datasets import image_id
from sam4med.engine.errors import InputError, check_apart, check_number, check_output_file
from sam4med.engine.imageio import read_image
from sam4med.engine.prompts import Prompt, check_mask_rule, select_mask, tight_box, wants_multimask
from sam4med.engine.runs import atomic_path, warn

# segment_everything's label maps drop a mask left with less than this share of its own area: the rule chosen
# among ten on the validation sides of DSB 2018 and GlaS by object F1 at IoU 0.5 (README)
MIN_VISIBLE = 0.8

if TYPE_CHECKING:
    from sam4med.engine.datasets import Dataset
    from sam4med.engine.everything import EverythingSettings
    from sam4med.engine.items import ItemRunSummary, WorkItem
    from sam4med.engine.predictor import Predictor


class PromptMasks(Protocol):
    """What segmenting needs of a predictor: the PyTorch one (``engine.predictor``) or the ONNX Runtime one
    (``engine.onnx_predictor``), which starts without importing PyTorch."""

    default_mask_rule: str
    takes_point_prompts: bool  # False: a box-only model, whose masks ignore clicks
    protocol: dict[str, object]  # the model's record: name, weights sha256, preprocessing (with every result)

    def prompt_masks(self, image: np.ndarray, prompt: Prompt, multimask: bool) -> tuple[np.ndarray, np.ndarray]:
        """Masks (M, H, W) of one prompt on ``image`` and their predicted IoUs (M,)."""


@dataclass(frozen=True)
class DeferredPredictor:
    """A predictor made on first call, with what its registry entry already tells: so that clicks for a box-only
    model are refused before the model loads, as every other bad argument is."""

    make: Callable[[], PromptMasks]
    model: str
    takes_point_prompts: bool | None  # None: only the made predictor tells (a run's checkpoint may add clicks)

    def __call__(self) -> PromptMasks:
        return self.make()


# A predictor, or a function that makes one: called only once every argument and input file is checked,
# so that a bad argument never waits for a model to load.
PredictorSource = PromptMasks | Callable[[], PromptMasks]


def _ready(source: PredictorSource) -> PromptMasks:
    return source() if callable(source) else source


def boxes_only(given: str, model: str) -> InputError:
    """The one refusal of clicks for a box-only model: its mask would ignore them (LiteMedSAM's one-click Dice is
    near 0), and a user would take that mask for the model's answer."""
    return InputError(f"{given}: model {model} takes boxes only (its mask would ignore the click); clicks need a "
                      "click-capable model (--model litemedsam-click)")


def _ready_for(source: PredictorSource, clicks: str | None) -> PromptMasks:
    """The predictor, once ``clicks`` (what gave them; None: no click) are known to be followed: a box-only model's
    refused before it loads where the source knows (a :class:`DeferredPredictor` from a registry entry), else as
    soon as it is made."""
    if clicks and isinstance(source, DeferredPredictor) and source.takes_point_prompts is False:
        raise boxes_only(clicks, source.model)
    ready = _ready(source)
    if clicks and not ready.takes_point_prompts:
        raise boxes_only(clicks, str(ready.protocol["model"]))
    return ready


def _check_box3d(box3d: Sequence[float], depth: int, size: tuple[int, int] | None = None,
                 axis: int | None = None) -> tuple[float, ...]:
    """The box as floats, or an InputError naming --box3d; x and y are checked too when the slices' (h, w)
    (cut along ``axis``) is given."""
    values = tuple(float(v) for v in box3d)
    if len(values) != 6 or not np.isfinite(values).all():
        raise InputError(f"--box3d {list(box3d)}: expected six finite numbers x0 y0 z0 x1 y1 z1")
    for name, low, high in (("x", values[0], values[3]), ("y", values[1], values[4]), ("z", values[2], values[5])):
        if low > high:
            raise InputError(f"--box3d {name} range {low:g}..{high:g}: {name}0 must not exceed {name}1")
    if not (values[2].is_integer() and values[5].is_integer()):
        raise InputError(f"--box3d z {values[2]:g} {values[5]:g}: z0 and z1 are slice indices (whole numbers)")
    if not (0 <= values[2] <= values[5] < depth):
        raise InputError(f"--box3d z range {values[2]:g}..{values[5]:g} lies outside the volume's {depth} slices")
    if size is not None:
        try:
            Prompt(box=[values[0], values[1], values[3], values[4]]).check_inside(size)
        except InputError:
            height, width = size
            cut = "" if axis is None else f", the slices cut along --axis {axis}"
            raise InputError(f"--box3d {' '.join(f'{v:g}' for v in values)}: x {values[0]:g}..{values[3]:g} and y "
                             f"{values[1]:g}..{values[4]:g} reach outside the {width}x{height} slices (x 0..{width - 1}, "
                             f"y 0..{height - 1}{cut})") from None
    return values


def segment_image(predictor: PromptMasks, image: np.ndarray, prompt: Prompt, mask_rule: str | None = None) -> np.ndarray:
    """Binary mask (H, W) for one prompt; ``mask_rule`` single, auto or iou (oracle needs ground truth)."""
    return segment_prompt(predictor, image, prompt, mask_rule)[0]


def segment_prompt(predictor: PromptMasks, image: np.ndarray, prompt: Prompt, mask_rule: str | None = None
                   ) -> tuple[np.ndarray, float]:
    """:func:`segment_image`'s mask and the model's predicted IoU for it."""
    rule = mask_rule or predictor.default_mask_rule
    if rule == "oracle":
        rule = "iou"  # no ground truth here: the model's own ranking is the honest choice
    masks, predicted_iou = predictor.prompt_masks(image, prompt, wants_multimask(rule, prompt))
    chosen = select_mask(masks, predicted_iou, rule)
    return masks[chosen], float(predicted_iou[chosen])


def segment_volume(
    predictor: PromptMasks,
    slices: Sequence[np.ndarray],
    box3d: Sequence[float],
    margin: int = 2,
    mask_rule: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Segment one object in a stack of 8-bit slices from a 3D box (x0, y0, z0, x1, y1, z1).

    As LiteMedSAM's 3D inference does: the middle slice of the box's z range is segmented with
    the 2D box, then carried outwards to both ends of the range by :func:`propagate` (``progress``: its).
    """
    x0, y0, z0, x1, y1, z1 = _check_box3d(box3d, len(slices))
    middle = int(round((z0 + z1) / 2))
    first = segment_image(predictor, _rgb(slices[middle]), Prompt(box=[x0, y0, x1, y1]), mask_rule)
    return propagate(predictor, slices, middle, first, (int(z0), int(z1)), margin, mask_rule, progress)


def propagate(
    predictor: PromptMasks,
    slices: Sequence[np.ndarray],
    start: int,
    mask: np.ndarray,
    limits: tuple[int, int] | None = None,
    margin: int = 2,
    mask_rule: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Carry one object's ``mask`` on slice ``start`` to its neighbours: each slice is prompted with the box
    of the previous slice's mask (plus ``margin`` pixels), outwards to both ends of ``limits`` (first and
    last slice, inclusive; default the whole stack); a direction stops once a slice comes back empty.
    Returns the masks of all slices (depth, H, W), ``mask`` itself on ``start``. ``progress`` hears of each
    slice done, of the most there can be (every slice of ``limits`` but ``start``)."""
    low, high = limits if limits is not None else (0, len(slices) - 1)
    labels = np.zeros((len(slices), *mask.shape), dtype=bool)
    labels[start] = mask
    done = 0
    for step, stop in ((1, high), (-1, low)):
        previous = mask
        for z in range(start + step, stop + step, step):
            if not previous.any():
                break
            labels[z] = segment_image(predictor, _rgb(slices[z]), Prompt(box=tight_box(previous, margin)), mask_rule)
            previous = labels[z]
            done += 1
            if progress is not None:
                progress(done, high - low)
    return labels


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


def segment_image_file(predictor: PredictorSource, image_path: str | Path, prompt: Prompt, out: str | Path,
                       overlay: str | Path | None = None, mask_rule: str | None = None) -> np.ndarray:
    """Segment one object of an image file; write the mask as a 0/255 PNG (and the overlay, if asked).

    Outputs, mask rule, image and prompt are checked before ``predictor`` is made (when it is a function)."""
    image_path, out, overlay = Path(image_path), Path(out), None if overlay is None else Path(overlay)
    check_output_file(out, "--out", (".png",))
    check_apart(out, [image_path], file_output=True)
    if overlay is not None:
        check_output_file(overlay, "--overlay", (".png",))
        check_apart(overlay, [image_path], "--overlay", file_output=True)
        if overlay.resolve() == out.resolve():
            raise InputError(f"--overlay {overlay}: is the --out mask too; name another file")
    check_mask_rule(mask_rule, with_truth=False)
    pixels = read_image(image_path)
    try:
        prompt.check_inside(pixels.shape[:2])
    except InputError as exc:
        raise InputError(f"{image_path}: {exc}") from None
    # refused here, not in segment_image: below the verbs it still decodes a click, to measure what a box-only model does
    ready = _ready_for(predictor, "--point" if prompt.points is not None else None)
    _warn_if_unusable(image_path, pixels, ready.protocol)
    mask = segment_image(ready, pixels, prompt, mask_rule)
    for written in (out, overlay) if overlay else (out,):  # both folders before either file: a failure replaces nothing
        written.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as temporary:
        Image.fromarray(mask.astype(np.uint8) * 255).save(temporary, format="PNG")  # uint8 throughout: bool * 255 is int64
        if overlay:  # written before the mask replaces --out: an overlay that cannot be written leaves --out as it was
            from sam4med.engine.overlays import write_overlay

            write_overlay(overlay, pixels, mask, [("segment", [mask], float("nan"))])
    return mask


def _warn_if_unusable(image_path: Path, pixels: np.ndarray, protocol: dict[str, object]) -> None:
    """Say so when no mask can mean anything on the image (HxWx3, as ``read_image`` gives it): every pixel alike (a
    blank frame, a constant 16-bit image windowed to one value), or its shorter side shrinking below one embedding
    token (a 64th of the model's input) as its longer side is scaled to the input, where no mask can follow the
    strip and runtimes differ."""
    values = pixels.reshape(-1, pixels.shape[-1])
    if values.size and (values == values[0]).all():
        warn(f"{image_path}: every pixel is {values[0].tolist()}; an image without contrast gives a mask that means "
             "nothing")
    side = protocol.get("image_size")
    if protocol.get("resize") != "longest_side" or "tiling" in protocol or not isinstance(side, int):
        return
    thin = min(pixels.shape[:2]) * side / max(pixels.shape[:2])
    if thin < side / 64:
        warn(f"{image_path}: its shorter side becomes {thin:.1f} px at the model's {side} px input, less than one "
             "embedding token: the mask cannot follow it (crop the image around the object)")


def segment_folder(predictor: PredictorSource, folder: str | Path, prompts: str | Path, out: str | Path,
                   mask_rule: str | None = None, show_progress: bool = True) -> ItemRunSummary:
    """Segment every object of a prompt table (``engine.prompt_table``) on the images of ``folder``.

    Writes ``out/masks/<folder>/<image id>.png``, one label map per image (the image's k-th object has value k,
    in the table's order; where masks overlap, the later object's is kept), ``out/results.jsonl`` (one row
    per object: its label, prompt, area, predicted IoU, the table's line and the image file's sha256) and
    ``out/protocol.json`` (model, weights, mask rule, image folder). Resumable: running it again does only
    the images not done, those whose rows in the table have changed and those whose file has changed; another
    folder's images into the same ``out`` are refused. An image that cannot be read, or a prompt outside its
    image, is recorded as an error row and the run goes on. The table is checked whole before the model loads.
    """
    from sam4med.engine.items import RESULTS_FILE, WorkItem, finished_outputs, run_items
    from sam4med.engine.prompt_table import prompts_digest, read_prompt_table
    from sam4med.engine.runs import PROTOCOL_FILE, check_unclaimed_outputs, claim_folder

    folder, prompts, out = Path(folder), Path(prompts), Path(out)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder of images")
    check_mask_rule(mask_rule, with_truth=False)
    table = read_prompt_table(prompts)
    check_apart(out, [prompts, *(folder / image for image in table), *_data_set_folders(folder)], roots=[folder],
                writes=["masks"])
    maps = _label_map_paths(table, folder, prompts)
    check_unclaimed_outputs(out, PROTOCOL_FILE, maps.values())
    clicked = [row.line for rows in table.values() for row in rows if row.prompt.points is not None]
    lines = ", ".join(map(str, clicked[:3])) + (f" and {len(clicked) - 3} more" if len(clicked) > 3 else "")
    ready = _ready_for(predictor, f"{prompts}: points on line {lines}" if clicked else None)
    rule = mask_rule or ready.default_mask_rule
    claim_folder(out, PROTOCOL_FILE, {"task": "segment-folder", "model": ready.protocol, "mask_rule": rule,
                                      "images": str(folder.resolve()),
                                      "label_map": "object k of an image = value k in table order; later objects "
                                                   "kept where masks overlap"})
    digests = {image: prompts_digest(rows) for image, rows in table.items()}
    stored, whole = finished_outputs(out / RESULTS_FILE, maps)
    dataset = _folder_dataset(folder, table)

    def done(item: WorkItem) -> bool:  # the image's prompts unchanged since, and its outputs whole
        return stored.get(item.sample.id, {}).get("prompts_sha256") == digests[item.sample.id] and whole(item)

    def segment_one(item: WorkItem) -> list[dict]:
        pixels = read_image(item.sample.image_path)
        _warn_if_unusable(item.sample.image_path, pixels, ready.protocol)
        labels = np.zeros(pixels.shape[:2], np.uint16 if len(table[item.sample.id]) > 255 else np.uint8)
        rows = []
        for value, entry in enumerate(table[item.sample.id], start=1):
            row = {"dataset": dataset.name, "image": item.sample.id, "object": value, "label": entry.label,
                   "line": entry.line, **entry.prompt.to_record(), "prompts_sha256": digests[item.sample.id]}
            try:
                entry.prompt.check_inside(pixels.shape[:2])
            except InputError as error:  # this object is an error row (and a warning); the image's others go on
                rows.append({**row, "status": "error", "error": f"{item.sample.image_path}: {error}"})
                warn(f"{prompts}: line {entry.line}: {error}")
                continue
            mask, predicted_iou = segment_prompt(ready, pixels, entry.prompt, rule)
            np.putmask(labels, mask, value)  # without the index arrays of labels[mask] (16 bytes a pixel)
            rows.append({**row, "area": int(mask.sum()), "predicted_iou": round(predicted_iou, 4)})
        if all(row.get("status") == "error" for row in rows):  # nothing segmented: a failed image, no empty map
            raise InputError(f"none of its {len(rows)} prompt(s) could be segmented ({rows[0]['error']})")
        _write_label_map(out / maps[item.sample.id], labels)
        return rows

    return run_items([WorkItem(dataset, sample) for sample in dataset.samples], segment_one, out / RESULTS_FILE,
                     "segment", lambda item: {"prompts_sha256": digests[item.sample.id]}, show_progress, done)


def segment_everything(predictor: Predictor | Callable[[], Predictor], folder: str | Path, out: str | Path,
                       settings: EverythingSettings | None = None, min_visible: float | None = None,
                       show_progress: bool = True) -> ItemRunSummary:
    """Every object everything mode finds (``engine.everything``) in each image of ``folder`` (of
    ``folder/images`` in the data set layout), as one instance label map per image: what micro-sam's automatic
    segmentation and SAM's ``amg.py`` give.

    Everything mode's masks overlap (a nucleus, its cluster, half of it); a label map gives each pixel one
    object. Masks claim pixels best score (predicted IoU x stability) first, a pixel staying with the first
    mask that claims it; a mask left with less than ``min_visible`` (default ``MIN_VISIBLE``) of its own
    area is dropped, its pixels background. Writes ``out/masks/<folder>/<image id>.png`` (16 bits),
    ``out/results.jsonl`` (one row per kept mask: value, own and visible area, box, predicted IoU, stability,
    the image file's sha256) and ``out/protocol.json`` (model, weights, tiling, every everything-mode setting,
    ``min_visible``, the image folder). Resumable (an image whose file has changed is done again; another folder's
    images into the same ``out`` are refused); an image that cannot be read is an error row and the run goes on.
    """
    from sam4med.engine.everything import EverythingSettings, claim_pixels, generate_masks
    from sam4med.engine.items import RESULTS_FILE, WorkItem, finished_outputs, run_items
    from sam4med.engine.runs import PROTOCOL_FILE, check_unclaimed_outputs, claim_folder

    folder, out = Path(folder), Path(out)
    min_visible = MIN_VISIBLE if min_visible is None else check_number(min_visible, "--min-visible", minimum=0, maximum=1)
    settings = settings or EverythingSettings()
    settings.check()
    images = _folder_images(folder)
    root = _images_root(folder)
    check_apart(out, [*(root / image for image in images), *_data_set_folders(folder)], roots=[folder, root],
                writes=["masks"])
    maps = _label_map_paths(images, root, folder)
    check_unclaimed_outputs(out, PROTOCOL_FILE, maps.values())
    ready = _ready(predictor)
    resolved = settings.resolved(ready.model.spec)
    claim_folder(out, PROTOCOL_FILE, {"task": "segment-everything", "model": ready.protocol,
                                      "everything": resolved.record(), "min_visible": min_visible,
                                      "images": str(root.resolve()),
                                      "label_map": "16-bit instances; pixels claimed best score first"})
    dataset = _folder_dataset(root, images)

    def segment_one(item: WorkItem) -> list[dict]:
        pixels = read_image(item.sample.image_path)
        _warn_if_unusable(item.sample.image_path, pixels, ready.protocol)
        proposals = generate_masks(ready, pixels, resolved)
        instances = claim_pixels(proposals, pixels.shape[:2], min_visible)
        kept = instances.kept[: np.iinfo(np.uint16).max]
        _write_label_map(out / maps[item.sample.id], np.where(instances.labels <= len(kept), instances.labels, 0)
                         .astype(np.uint16))
        rows = [{"dataset": dataset.name, "image": item.sample.id, "object": value, "area": proposals[i].area,
                 "visible": instances.visible[i], "box": list(proposals[i].box),
                 "predicted_iou": round(proposals[i].predicted_iou, 4), "stability": round(proposals[i].stability, 4)}
                for value, i in enumerate(kept, start=1)]
        return rows or [{"dataset": dataset.name, "image": item.sample.id, "object": None, "area": 0}]

    return run_items([WorkItem(dataset, sample) for sample in dataset.samples], segment_one, out / RESULTS_FILE,
                     "everything", show_progress=show_progress,
                     check_done=finished_outputs(out / RESULTS_FILE, maps)[1])


def _data_set_folders(folder: Path) -> list[Path]:
    """A data set's images/ and masks/ when ``folder`` is one (or its images/ folder): no output goes in there."""
    base = folder.parent if folder.name == "images" and (folder.parent / "masks").is_dir() else folder
    return [base / name for name in ("images", "masks") if (base / name).is_dir()]


def _images_root(folder: Path) -> Path:
    """Where a folder's images are: ``images/`` in the data set layout, else the folder itself."""
    return folder / "images" if (folder / "images").is_dir() else folder


def _folder_images(folder: Path) -> list[str]:
    """The image files directly in :func:`_images_root` (hidden files and other files left out), sorted."""
    from sam4med.engine.datasets import IMAGE_EXTENSIONS, image_extension

    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder of images")
    root = _images_root(folder)
    images: list[str] = []
    others: list[str] = []
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file():
            (images if image_extension(path) is not None else others).append(path.name)
        elif image_extension(path) is not None:  # named as an image (a folder, a dangling link): an error row, as
            images.append(path.name)                 # segment-folder gives it, not an image left out without a word
    if not images:
        raise InputError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}, or DICOM)")
    if others:  # said, so that a .gif or .webp left out is not taken for a folder segmented whole
        warn(f"{root}: {len(others)} file(s) left out, not images by name or content "
             f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''})")
    return images


def _folder_dataset(root: Path, images: Iterable[str]) -> Dataset:
    """The images (paths relative to ``root``) as a data set for the item loop."""
    from sam4med.engine.datasets import Dataset, Sample

    return Dataset(root.resolve().name or "images", "", "", root, [Sample(image, root / image) for image in images])


def _label_map_paths(images: Iterable[str], root: Path, source: Path) -> dict[str, Path]:
    """Image path (relative to ``root``) -> its label map's path in the output folder
    (``masks/<folder>/<image id>.png``, the id being the name without its image extension); two images whose maps
    would be one file (``a.png`` and ``a.jpg``, or names that differ in case) are refused, naming ``source``."""
    maps: dict[str, Path] = {}
    seen: dict[str, str] = {}
    for image in images:
        maps[image] = Path("masks") / Path(image).parent / f"{image_id(root / image)}.png"  # DICOM UIDs keep their dots
        key = maps[image].as_posix().lower()
        if key in seen:
            raise InputError(f"{source}: images {seen[key]} and {image} would share the mask file {maps[image]}")
        seen[key] = image
    return maps


def _write_label_map(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        Image.fromarray(labels).save(temporary, format="PNG")


def segment_volume_file(predictor: PredictorSource, volume_path: str | Path, box3d: Sequence[float], out: str | Path,
                        axis: int = 0, percentiles: tuple[float, float] = (0.5, 99.5),
                        progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Segment one object of a volume file from a 3D box whose z is the index along ``axis`` of the
    (z, y, x) array (0 axial, 1 coronal, 2 sagittal); write the label volume on the image's grid. ``progress``
    hears of each slice the propagation has done, of the most it can do.

    Output, axis, volume and box are checked before ``predictor`` is made (when it is a function)."""
    volume_path, out = Path(volume_path), Path(out)
    from sam4med.engine.volumes import (LABEL_VOLUME_SUFFIXES, check_percentiles, read_volume, slices, window,
                                        write_label_volume)

    if axis not in (0, 1, 2):
        raise InputError(f"--axis {axis}: must be 0, 1 or 2")
    check_percentiles(*percentiles, names=("--lower-percentile", "--upper-percentile"))
    check_output_file(out, "--out", LABEL_VOLUME_SUFFIXES)
    check_apart(out, [volume_path], file_output=True)
    image = read_volume(volume_path)
    if image.array.size and image.array.min() == image.array.max():
        warn(f"{volume_path}: every voxel is {image.array.flat[0]}; a volume without contrast gives a mask that "
             "means nothing")
    stack = list(slices(window(image.array, *percentiles), axis))
    _check_box3d(box3d, len(stack), stack[0].shape[:2] if stack else None, axis)
    labels = segment_volume(_ready(predictor), stack, box3d, progress=progress)
    labels = np.moveaxis(labels, 0, axis)
    out.parent.mkdir(parents=True, exist_ok=True)  # as segment does for its mask
    write_label_volume(labels.astype(np.uint8), image, out)
    return labels
