"""Everything mode: every object SAM finds in an image without a user prompt.

Two proposal sources, one filter chain:

- ``points``: SAM's automatic mask generator recipe (a regular point grid, 3 masks per point)
  for models that follow point prompts.
- ``boxes``: for box-only medical models such as LiteMedSAM, which return empty masks for
  point-only prompts. Proposals are sliding windows at several scales plus the boxes of regions
  of a graph-based over-segmentation of the image (Felzenszwalb), so that boxes land on
  structures rather than only on a grid. Each kept mask is re-prompted once with its own tight
  box, since these models were trained on tight boxes.

Both are filtered by predicted IoU and stability score (SAM's definitions). The point grid is
de-duplicated by box NMS, as SAM's generator does; box proposals by NMS on mask IoU, because
windows of different scales often return the same object with slightly different boxes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
import torch
from scipy import ndimage
from segment_anything.utils.amg import build_point_grid, calculate_stability_score, is_box_near_crop_edge
from skimage.segmentation import felzenszwalb
from skimage.transform import resize as sk_resize
from torchvision.ops import nms

from sam4med.engine.errors import InputError, check_number
from sam4med.engine.predictor import Predictor
from sam4med.engine.prompts import Prompt, tight_boxes
from sam4med.engine.registry import ModelSpec
from sam4med.engine.sam_model import Decoded

Method = Literal["auto", "points", "boxes"]
EVERYTHING_METHODS = ("auto", "points", "boxes")
CHUNK_LOGITS_BYTES = 32 * 2**20  # full-size float32 logits upscaled at once

MAX_POINTS_PER_SIDE = 128  # 16,384 prompts an image (SAM's default grid is 32 a side); beyond, a typo


@dataclass
class EverythingSettings:
    """All knobs of everything mode; ``record()`` is stored with every result."""

    method: Method = "auto"
    points_per_side: int = 16  # SAM uses 32: 4x the decoder calls
    pred_iou_thresh: float | None = None  # None: the model's for points (else SAM's 0.88), 0.8 for boxes
    stability_thresh: float | None = None  # None: the model's for points (else SAM's 0.95), 0.8 for boxes
    stability_offset: float = 1.0
    nms_thresh: float = 0.7
    min_area_fraction: float = 0.0005
    max_area_fraction: float = 0.95
    box_scales: tuple[float, ...] = (0.5,)
    box_overlap: float = 0.5
    region_proposals: int = 16
    refine_boxes: bool = True

    def check(self) -> None:
        """Every setting in its range, as one InputError naming the option (before a model loads)."""
        if self.method not in EVERYTHING_METHODS:
            raise InputError(f"--everything-method {self.method!r}: choose one of {', '.join(EVERYTHING_METHODS)}")
        check_number(self.points_per_side, "--points-per-side", minimum=1, maximum=MAX_POINTS_PER_SIDE)
        for value, name in ((self.pred_iou_thresh, "--pred-iou-thresh"), (self.stability_thresh, "--stability-thresh")):
            if value is not None:  # both compare with an IoU
                check_number(value, name, minimum=0, maximum=1)

    def resolved(self, spec: ModelSpec) -> EverythingSettings:
        """A copy with ``auto`` and the per-method thresholds made explicit for a model (what gets recorded).

        ``auto`` is the model's own choice (``ModelSpec.everything_proposals``); the point grid's thresholds
        are the model's (``ModelSpec.point_grid_thresholds``), else SAM's 0.88 and 0.95. LiteMedSAM's
        predicted IoU and stability barely rank its box proposals (Spearman 0.2 with Dice on Kvasir-SEG), so
        box mode uses looser thresholds and leaves the rest to NMS.
        """
        method = self.method if self.method != "auto" else spec.everything_proposals
        iou, stability = (spec.point_grid_thresholds or (0.88, 0.95)) if method == "points" else (0.8, 0.8)
        return replace(
            self,
            method=method,
            pred_iou_thresh=self.pred_iou_thresh if self.pred_iou_thresh is not None else iou,
            stability_thresh=self.stability_thresh if self.stability_thresh is not None else stability,
        )

    def record(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class ProposedMask:
    """One everything-mode mask, kept as the crop of its bounding box: a point grid on tiles proposes
    thousands of masks a few dozen pixels wide, each of which would otherwise hold an image-sized array."""

    crop: np.ndarray  # bool, the mask inside ``box``
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (ends exclusive) in the image
    shape: tuple[int, int]  # the image's (H, W)
    predicted_iou: float
    stability: float
    prompt: Prompt = field(repr=False)

    @classmethod
    def from_mask(cls, mask: np.ndarray, predicted_iou: float, stability: float, prompt: Prompt) -> ProposedMask:
        rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if len(rows) == 0:
            return cls(np.zeros((0, 0), bool), (0, 0, 0, 0), mask.shape, predicted_iou, stability, prompt)
        x0, y0, x1, y1 = int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1
        return cls(mask[y0:y1, x0:x1].copy(), (x0, y0, x1, y1), mask.shape, predicted_iou, stability, prompt)

    @property
    def score(self) -> float:
        return self.predicted_iou * self.stability

    @property
    def area(self) -> int:
        return int(self.crop.sum())

    @property
    def mask(self) -> np.ndarray:
        """The full-size mask (made on demand)."""
        return self.window((0, 0, self.shape[1], self.shape[0]))

    def window(self, region: tuple[int, int, int, int]) -> np.ndarray:
        """The mask over ``region`` (x0, y0, x1, y1, ends exclusive) of the image."""
        rx0, ry0, rx1, ry1 = region
        out = np.zeros((ry1 - ry0, rx1 - rx0), bool)
        x0, y0, x1, y1 = max(rx0, self.box[0]), max(ry0, self.box[1]), min(rx1, self.box[2]), min(ry1, self.box[3])
        if x0 < x1 and y0 < y1:
            out[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0] = \
                self.crop[y0 - self.box[1] : y1 - self.box[1], x0 - self.box[0] : x1 - self.box[0]]
        return out

    def overlap(self, mask: np.ndarray) -> int:
        """Pixels shared with a full-size mask."""
        x0, y0, x1, y1 = self.box
        return int(np.logical_and(self.crop, mask[y0:y1, x0:x1]).sum())

    def intersection(self, other: ProposedMask) -> int:
        """Pixels shared with another proposal, counted inside the overlap of the two boxes."""
        x0, y0 = max(self.box[0], other.box[0]), max(self.box[1], other.box[1])
        x1, y1 = min(self.box[2], other.box[2]), min(self.box[3], other.box[3])
        if x0 >= x1 or y0 >= y1:
            return 0
        return int(np.logical_and(self.window((x0, y0, x1, y1)), other.window((x0, y0, x1, y1))).sum())

    def dice(self, truth: np.ndarray, truth_area: int | None = None) -> float:
        """Dice with a full-size mask (1 when both are empty); ``truth_area``: its pixel count, when known."""
        total = self.area + (int(np.count_nonzero(truth)) if truth_area is None else truth_area)
        return 2 * self.overlap(truth) / total if total else 1.0


def grid_points(size: tuple[int, int], per_side: int) -> np.ndarray:
    """SAM's point grid (``build_point_grid``) scaled to an image of ``size`` (H, W), in pixels."""
    scale = np.array(size[::-1], dtype=np.float64)
    return (build_point_grid(per_side) * scale).clip(0, scale - 1)


def grid_prompts(regions: Sequence[tuple[int, int, int, int]], settings: EverythingSettings) -> list[Prompt]:
    """One positive click per point of SAM's grid, laid over each (x0, y0, x1, y1) region."""
    return [Prompt(points=[point + (x0, y0)], labels=[1]) for x0, y0, x1, y1 in regions
            for point in grid_points((y1 - y0, x1 - x0), settings.points_per_side)]


def window_boxes(size: tuple[int, int], scales: tuple[float, ...], overlap: float) -> list[np.ndarray]:
    """Square-ish sliding windows of each scale (a fraction of each side), whole image included."""
    height, width = size
    boxes = [np.array([0, 0, width - 1, height - 1], dtype=np.float32)]
    for scale in scales:
        box_w, box_h = scale * width, scale * height
        step_w, step_h = box_w * (1 - overlap), box_h * (1 - overlap)
        for y0 in np.arange(0, height - box_h + 1e-6, step_h):
            for x0 in np.arange(0, width - box_w + 1e-6, step_w):
                boxes.append(np.array([x0, y0, x0 + box_w - 1, y0 + box_h - 1], dtype=np.float32))
    return boxes


def region_boxes(image: np.ndarray, count: int, min_area_fraction: float) -> list[np.ndarray]:
    """Boxes of the ``count`` largest regions of a Felzenszwalb over-segmentation (at <=256 px)."""
    if count <= 0:
        return []
    height, width = image.shape[:2]
    factor = min(1.0, 256 / max(height, width))
    small = image if factor == 1.0 else (sk_resize(image, (round(height * factor), round(width * factor)),
                                                   anti_aliasing=True, preserve_range=True)).astype(np.uint8)
    segments = felzenszwalb(small, scale=200, sigma=0.8, min_size=max(20, int(small.size / 3 * min_area_fraction)))
    sizes = np.bincount(segments.ravel())
    boxes = []
    for label in np.argsort(sizes)[::-1]:
        if sizes[label] > 0.5 * segments.size:  # the background region boxes the whole image
            continue
        slices = ndimage.find_objects((segments == label).astype(np.int32))[0]
        y, x = slices
        boxes.append(np.array([x.start, y.start, x.stop - 1, y.stop - 1], dtype=np.float32) / factor)
        if len(boxes) == count:
            break
    return [np.minimum(b, [width - 1, height - 1, width - 1, height - 1]).astype(np.float32) for b in boxes]


def _candidates(decoded: Decoded, prompts: list[Prompt], settings: EverythingSettings,
                region_area: int | None = None) -> list[ProposedMask]:
    """The masks of a decoded batch that pass the thresholds, in batch order. The predicted-IoU test needs no
    pixels: only the masks that pass it are upscaled to full size, a few at a time (``CHUNK_LOGITS_BYTES``)."""
    passing = torch.nonzero(decoded.iou >= settings.pred_iou_thresh).tolist()  # (prompt, mask) pairs
    height, width = decoded.geometry.original_size
    per_chunk = max(1, CHUNK_LOGITS_BYTES // (height * width * 4))
    area_total = region_area or height * width
    kept = []
    for start in range(0, len(passing), per_chunk):
        pairs = passing[start : start + per_chunk]
        flat = decoded.pick(pairs).logits[:, 0]  # (len(pairs), H, W)
        stability = calculate_stability_score(flat, 0.0, settings.stability_offset)
        areas = (flat > 0).flatten(1).sum(1).float() / area_total
        keep = (
            (stability >= settings.stability_thresh)
            & (areas > 0)
            & (areas >= settings.min_area_fraction)
            & (areas <= settings.max_area_fraction)
        )
        chosen = torch.nonzero(keep).flatten()
        boxes = tight_boxes(flat[chosen] > 0).int().tolist()  # inclusive ends
        for i, (x0, y0, x1, y1) in zip(chosen.tolist(), boxes):
            prompt, output = pairs[i]
            kept.append(ProposedMask((flat[i, y0 : y1 + 1, x0 : x1 + 1] > 0).cpu().numpy(), (x0, y0, x1 + 1, y1 + 1),
                                     (height, width), float(decoded.iou[prompt, output]), float(stability[i]),
                                     prompts[prompt]))
    return kept


def mask_nms(candidates: list[ProposedMask], threshold: float) -> list[ProposedMask]:
    """Greedy NMS on mask IoU, best score first (masks, not boxes, so nested organs survive)."""
    kept: list[ProposedMask] = []
    areas: list[int] = []
    for candidate in sorted(candidates, key=lambda c: c.score, reverse=True):
        area = candidate.area
        duplicate = False
        for other, other_area in zip(kept, areas):
            intersection = candidate.intersection(other)
            if intersection / max(area + other_area - intersection, 1) > threshold:
                duplicate = True
                break
        if not duplicate:
            kept.append(candidate)
            areas.append(area)
    return kept


def _boxes_of(candidates: list[ProposedMask]) -> torch.Tensor:
    """x0 y0 x1 y1 with inclusive ends, as ``tight_boxes`` gives them."""
    return torch.tensor([[c.box[0], c.box[1], c.box[2] - 1, c.box[3] - 1] for c in candidates], dtype=torch.float32)


def box_nms(candidates: list[ProposedMask], threshold: float) -> list[ProposedMask]:
    """SAM's de-duplication: NMS on the masks' bounding boxes, scored by predicted IoU."""
    if not candidates:
        return candidates
    scores = torch.tensor([c.predicted_iou for c in candidates])
    boxes = _boxes_of(candidates)
    return [candidates[i] for i in nms(boxes, scores, threshold).tolist()]


def _refine(predictor: Predictor, candidates: list[ProposedMask], settings: EverythingSettings) -> list[ProposedMask]:
    """Re-prompt each candidate with its mask's tight box; keep whichever scores higher."""
    if not candidates:
        return candidates
    prompts = [Prompt(box=box) for box in _boxes_of(candidates).numpy()]
    refined = predictor.predict(prompts, multimask=False)
    stability = calculate_stability_score(refined.logits[:, 0], 0.0, settings.stability_offset)
    results = []
    for i, candidate in enumerate(candidates):
        new = ProposedMask.from_mask((refined.logits[i, 0] > 0).cpu().numpy(), float(refined.iou[i, 0]),
                                     float(stability[i]), prompts[i])
        results.append(new if new.score >= candidate.score and new.area > 0 else candidate)
    return results


def candidate_masks(predictor: Predictor, prompts: list[Prompt], settings: EverythingSettings, multimask: bool,
                    chunk: int = 32, region_area: int | None = None) -> list[ProposedMask]:
    """The masks of ``prompts`` on the predictor's image that pass the settings' thresholds, before NMS;
    area fractions are of ``region_area`` pixels (default: the image's).

    Decoded ``chunk`` prompts at a time and filtered as they come, so neither a grid's low-res logits nor
    any batch's full-size ones sit in memory at once."""
    kept: list[ProposedMask] = []
    for start in range(0, len(prompts), chunk):
        part = prompts[start : start + chunk]
        decoded = predictor.predict(part, multimask=multimask, min_iou=settings.pred_iou_thresh)
        kept += _candidates(decoded, part, settings, region_area)
    return kept


def grid_candidates(predictor: Predictor, settings: EverythingSettings,
                    progress: Callable[[int, int], None] | None = None) -> list[ProposedMask]:
    """The point grid's masks that pass the thresholds, region by region (``Predictor.grid_regions``: the
    whole image, or each tile, decoded and filtered in its own frame). As in SAM's generator on crops, area
    fractions are of the region, and a mask that touches its region's extent where that is not the image's
    border is dropped: the tile cut it, and the tile holding its centre sees it whole. ``progress`` hears of
    each region done (a large image on tiles takes minutes)."""
    assert predictor.image is not None
    height, width = predictor.image.shape[:2]
    kept: list[ProposedMask] = []
    regions = predictor.grid_regions()
    for done, (core, extent) in enumerate(regions, start=1):
        x0, y0 = extent[:2]
        local_core = (core[0] - x0, core[1] - y0, core[2] - x0, core[3] - y0)
        candidates = candidate_masks(predictor.region_predictor(extent), grid_prompts([local_core], settings),
                                     settings, multimask=True, region_area=(core[2] - core[0]) * (core[3] - core[1]))
        if not candidates or extent == (0, 0, width, height):
            kept += candidates
        else:
            boxes = torch.tensor([c.box for c in candidates], dtype=torch.float32)  # in the tile's frame
            cut = is_box_near_crop_edge(boxes, list(extent), [0, 0, width, height], atol=1.0).tolist()
            kept += [replace(c, box=(c.box[0] + x0, c.box[1] + y0, c.box[2] + x0, c.box[3] + y0),
                             shape=(height, width), prompt=c.prompt.moved(x0, y0))
                     for c, drop in zip(candidates, cut) if not drop]
        if progress is not None:
            progress(done, len(regions))
    return kept


def generate_masks(predictor: Predictor, image: np.ndarray, settings: EverythingSettings | None = None) -> list[ProposedMask]:
    """All masks of everything mode for one image, best score first."""
    predictor.set_image(image)
    return everything_masks(predictor, settings)


def everything_masks(predictor: Predictor, settings: EverythingSettings | None = None,
                     progress: Callable[[int, int], None] | None = None) -> list[ProposedMask]:
    """All masks of everything mode for the image ``predictor`` holds (the annotator's open frame), best
    score first; ``progress`` hears of each region of the point grid done (box proposals are one pass)."""
    settings = (settings or EverythingSettings()).resolved(predictor.model.spec)
    image = predictor.image
    assert image is not None, "set_image first"
    size = image.shape[:2]
    predictor.encode_all()  # every region is visited: its encodes come before any decoder's batches
    if settings.method == "points":
        candidates = box_nms(grid_candidates(predictor, settings, progress), settings.nms_thresh)
        return sorted(candidates, key=lambda c: c.score, reverse=True)
    boxes = window_boxes(size, settings.box_scales, settings.box_overlap)
    boxes += region_boxes(image, settings.region_proposals, settings.min_area_fraction)
    prompts = [Prompt(box=b) for b in boxes]
    candidates = mask_nms(candidate_masks(predictor, prompts, settings, multimask=False), settings.nms_thresh)
    if settings.refine_boxes:
        candidates = _refine(predictor, candidates, settings)
    return mask_nms(candidates, settings.nms_thresh)


@dataclass
class InstanceMap:
    """Everything mode's masks as one label image: ``labels`` holds value k for ``masks[kept[k - 1]]``."""

    labels: np.ndarray  # (H, W) int32, 0 = background
    kept: list[int]  # indices into the masks given, in label order
    visible: list[int]  # pixels each mask given kept (all of them, kept or not)


def claim_pixels(masks: Sequence[ProposedMask], shape: tuple[int, int], min_visible: float,
                 taken: np.ndarray | None = None) -> InstanceMap:
    """Give each pixel one object, as an instance label map must: masks claim pixels best score first (predicted
    IoU x stability), a pixel staying with the first mask that claims it, and a mask left with less than
    ``min_visible`` of its own area is dropped, its pixels background. ``taken`` (H, W) bool: pixels already
    claimed (objects a person drew), which no mask gets."""
    order = sorted(range(len(masks)), key=lambda i: masks[i].score, reverse=True)
    claimed = np.zeros(shape, np.int32)
    if taken is not None:
        claimed[taken] = -1
    visible = [0] * len(masks)
    for i in order:
        x0, y0, x1, y1 = masks[i].box
        window = claimed[y0:y1, x0:x1]
        free = masks[i].crop & (window == 0)
        window[free] = i + 1
        visible[i] = int(free.sum())
    kept = [i for i in order if visible[i] > 0 and visible[i] >= min_visible * masks[i].area]
    renumber = np.zeros(len(masks) + 2, np.int32)  # index -1 (taken) -> 0
    renumber[np.asarray(kept, dtype=np.int64) + 1] = np.arange(1, len(kept) + 1)
    return InstanceMap(renumber[claimed], kept, visible)
