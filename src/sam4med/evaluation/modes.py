"""The prompt modes of the benchmark: a registry of named, fully parameterised recipes, each of which
turns one image's ground-truth objects into result rows (one per object) and predicted masks.

A mode's ``params`` are written into every result row, so a number can always be traced back to the
exact prompt protocol that made it. A new prompt mode is one :class:`PromptMode` subclass (its
``prompt``) registered with :func:`register_mode`.
"""

from __future__ import annotations

import re
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sam4med.engine.errors import InputError, check_number
from sam4med.engine.everything import EverythingSettings, ProposedMask, generate_masks
from sam4med.engine.interactive import CORRECTIONS, run_interactive
from sam4med.engine.metrics import segmentation_metrics
from sam4med.engine.predictor import Predictor
from sam4med.engine.prompts import (
    JitterKind,
    JitterUnit,
    NegativeRegion,
    Prompt,
    center_point,
    centroid_point,
    jitter_box,
    negative_points,
    random_points,
    select_mask,
    stride_points,
    tight_box,
    wants_multimask,
)

DEFAULT_MODES = (
    "box", "box_jitter", "point_centroid", "point_center", "points5", "points5_neg5", "box_point",
    "everything", "interactive",
)


@dataclass(frozen=True)
class PromptSettings:
    """User-set parameters of the prompt modes (all recorded)."""

    jitter: float = 5.0
    jitter_unit: JitterUnit = "px"
    jitter_kind: JitterKind = "corners"
    points_sampler: str = "stride"  # stride (COSMOS) or random
    negative_region: NegativeRegion = "double_box"  # COSMOS; "image" is SAM-Med2D's
    interactive_start: str = "box"  # box or point_center
    interactive_rounds: int = 5
    click_rule: str = "largest"  # largest (RITM) or random (SAM-Med2D)
    correction: str = "auto"  # what a corrective click may change (engine.interactive): auto, local or global

    def check(self) -> None:
        """Every setting within its range, before any work or any file: one InputError otherwise."""
        check_number(self.jitter, "--jitter", minimum=0)
        choices = {"jitter_unit": ("px", "percent"), "jitter_kind": ("corners", "shift", "scale"),
                   "points_sampler": ("stride", "random"), "negative_region": ("double_box", "image"),
                   "interactive_start": ("box", "point_center"), "click_rule": ("largest", "random"),
                   "correction": CORRECTIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                option = "--" + name.replace("_", "-")
                raise InputError(f"{option} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if not 1 <= self.interactive_rounds <= MAX_CLICKS:
            raise InputError(f"--rounds {self.interactive_rounds}: must be 1..{MAX_CLICKS}")


MAX_CLICKS = 100  # clicks of one kind per prompt, and corrective rounds: far beyond any protocol's (NoC counts to 20)


def object_rng(seed: int, *keys: object) -> np.random.Generator:
    """A generator that depends only on (seed, image, object, mode): resume-order independent."""
    return np.random.default_rng([seed, *(zlib.crc32(str(k).encode()) for k in keys)])


@dataclass
class ImageObjects:
    """One image set in the predictor, with the objects a mode is run on."""

    predictor: Predictor
    image_id: str
    image: np.ndarray
    foreground: np.ndarray  # every object of the image (negatives avoid it)
    objects: list[np.ndarray]
    indices: list[int]  # each object's index among the image's components
    seed: int
    mask_rule: str
    nsd_tolerance: float

    def score(self, pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
        return segmentation_metrics(pred, gt, nsd_tolerance=self.nsd_tolerance)

    def rng(self, index: int, mode: str) -> np.random.Generator:
        return object_rng(self.seed, self.image_id, index, mode)


@dataclass
class ObjectResult:
    """A mode's outcome for one object: its row (metrics, prompt, timings) and predicted mask."""

    row: dict[str, object]
    mask: np.ndarray = field(repr=False)


class Mode(ABC):
    """A named recipe: ``run`` gives one result per object of the image."""

    name: str
    params: dict[str, object]

    @abstractmethod
    def run(self, image: ImageObjects) -> list[ObjectResult]: ...


class PromptMode(Mode):
    """One prompt per object; prompts of one structure are decoded together."""

    @abstractmethod
    def prompt(self, obj: np.ndarray, foreground: np.ndarray, rng: np.random.Generator) -> Prompt: ...

    def run(self, image: ImageObjects) -> list[ObjectResult]:
        prompts = [self.prompt(obj, image.foreground, image.rng(i, self.name))
                   for obj, i in zip(image.objects, image.indices)]
        by_structure: dict[str, list[int]] = {}
        for position, prompt in enumerate(prompts):
            by_structure.setdefault(prompt.structure, []).append(position)
        results: list[ObjectResult | None] = [None] * len(prompts)
        for positions in by_structure.values():
            start = time.perf_counter()
            decoded = image.predictor.predict([prompts[p] for p in positions],
                                              multimask=wants_multimask(image.mask_rule, prompts[positions[0]]))
            masks, ious = decoded.masks(), decoded.iou.cpu().numpy()
            seconds = (time.perf_counter() - start) / len(positions)
            for batch_index, position in enumerate(positions):
                gt = image.objects[position]
                choice = select_mask(masks[batch_index], ious[batch_index], image.mask_rule, gt)
                mask = masks[batch_index][choice]
                results[position] = ObjectResult({
                    **image.score(mask, gt),
                    "prompt_coords": prompts[position].to_record(),
                    "predicted_iou": float(ious[batch_index][choice]),
                    "mask_index": choice,
                    "decode_s": seconds,
                }, mask)
        return results  # type: ignore[return-value]


class BoxMode(PromptMode):
    def __init__(self, name: str, settings: PromptSettings):
        self.name, self.params = name, {"prompt": "tight box"}

    def prompt(self, obj: np.ndarray, foreground: np.ndarray, rng: np.random.Generator) -> Prompt:
        return Prompt(box=tight_box(obj))


class JitteredBoxMode(PromptMode):
    def __init__(self, name: str, settings: PromptSettings):
        self.name, self.settings = name, settings
        self.params = {"prompt": "jittered box", "jitter": settings.jitter, "jitter_unit": settings.jitter_unit,
                       "jitter_kind": settings.jitter_kind}

    def prompt(self, obj: np.ndarray, foreground: np.ndarray, rng: np.random.Generator) -> Prompt:
        s = self.settings
        return Prompt(box=jitter_box(tight_box(obj), obj.shape, rng, s.jitter, s.jitter_unit, s.jitter_kind))


class CentroidPointMode(PromptMode):
    def __init__(self, name: str, settings: PromptSettings):
        self.name, self.params = name, {"prompt": "centroid point"}

    def prompt(self, obj: np.ndarray, foreground: np.ndarray, rng: np.random.Generator) -> Prompt:
        return Prompt(points=[centroid_point(obj)])


class CenterPointMode(PromptMode):
    def __init__(self, name: str, settings: PromptSettings):
        self.name, self.params = name, {"prompt": "interior point farthest from the boundary"}

    def prompt(self, obj: np.ndarray, foreground: np.ndarray, rng: np.random.Generator) -> Prompt:
        return Prompt(points=[center_point(obj)])


class RandomPointMode(PromptMode):
    def __init__(self, name: str, settings: PromptSettings):
        self.name, self.params = name, {"prompt": "uniform random foreground pixel"}

    def prompt(self, obj: np.ndarray, foreground: np.ndarray, rng: np.random.Generator) -> Prompt:
        return Prompt(points=random_points(obj, 1, rng))


class BoxPointMode(PromptMode):
    def __init__(self, name: str, settings: PromptSettings):
        self.name, self.params = name, {"prompt": "tight box + interior point"}

    def prompt(self, obj: np.ndarray, foreground: np.ndarray, rng: np.random.Generator) -> Prompt:
        return Prompt(points=[center_point(obj)], box=tight_box(obj))


class PointsMode(PromptMode):
    """``pointsK`` and ``pointsK_negK``: K positives (stride or random) and negatives around the object."""

    # ASCII digits without leading zeros, no _neg0: each set of prompts has one name (points03 and points3_neg0
    # would run points3 again under another column)
    pattern = re.compile(r"points(0|[1-9][0-9]*)(?:_neg([1-9][0-9]*))?")

    def __init__(self, name: str, settings: PromptSettings):
        match = self.pattern.fullmatch(name)
        assert match is not None
        self.name, self.settings = name, settings
        self.positives, self.negatives = int(match.group(1)), int(match.group(2) or 0)
        if self.positives < 1:
            raise InputError(f"--modes {name}: needs at least one positive point (points1 or more)")
        if max(self.positives, self.negatives) > MAX_CLICKS:
            raise InputError(f"--modes {name}: at most {MAX_CLICKS} positive and {MAX_CLICKS} negative points")
        if settings.points_sampler not in ("stride", "random"):
            raise InputError(f"unknown --points-sampler '{settings.points_sampler}'; use stride or random")
        self.params: dict[str, object] = {"prompt": f"{self.positives} positive points",
                                          "points_sampler": settings.points_sampler}
        if self.negatives:
            self.params.update(prompt=f"{self.positives} positive + {self.negatives} negative points",
                               negative_region=settings.negative_region)

    def prompt(self, obj: np.ndarray, foreground: np.ndarray, rng: np.random.Generator) -> Prompt:
        s = self.settings
        points = stride_points(obj, self.positives) if s.points_sampler == "stride" \
            else random_points(obj, self.positives, rng)
        labels = [1] * self.positives
        if self.negatives:
            points = np.concatenate([points, negative_points(obj, foreground, self.negatives, rng, s.negative_region)])
            labels += [0] * self.negatives
        return Prompt(points=points, labels=labels)


class EverythingMode(Mode):
    """Automatic masks; each object is scored against its best mask (COSMOS matching)."""

    def __init__(self, name: str, settings: PromptSettings, everything: EverythingSettings | None = None):
        self.name, self.everything = name, everything or EverythingSettings()
        self.params = {"prompt": "everything mode, best mask per object (COSMOS matching)"}

    def run(self, image: ImageObjects) -> list[ObjectResult]:
        start = time.perf_counter()
        proposals: list[ProposedMask] = generate_masks(image.predictor, image.image, self.everything)
        seconds = time.perf_counter() - start
        results = []
        for obj in image.objects:
            area = int(np.count_nonzero(obj))
            best = max(proposals, key=lambda p: p.dice(obj, area), default=None)
            mask = best.mask if best is not None else np.zeros_like(obj)
            results.append(ObjectResult({
                **image.score(mask, obj),
                "n_masks": len(proposals),
                "predicted_iou": best.predicted_iou if best else None,
                "stability": best.stability if best else None,
                "everything_s": seconds,
            }, mask))
        return results


class InteractiveMode(Mode):
    """Corrective clicks on the error of the previous round, from a box or one click."""

    def __init__(self, name: str, settings: PromptSettings):
        self.name, self.settings = name, settings
        self.params = {"prompt": f"interactive from {settings.interactive_start}",
                       "rounds": settings.interactive_rounds, "click_rule": settings.click_rule,
                       "correction": settings.correction}

    def run(self, image: ImageObjects) -> list[ObjectResult]:
        s = self.settings
        results = []
        for obj, i in zip(image.objects, image.indices):
            start_prompt = Prompt(box=tight_box(obj)) if s.interactive_start == "box" \
                else Prompt(points=[center_point(obj)])
            start = time.perf_counter()
            outcome = run_interactive(image.predictor, obj, start_prompt, s.interactive_rounds,
                                      image.rng(i, self.name), s.click_rule, image.mask_rule,  # type: ignore[arg-type]
                                      s.correction)  # type: ignore[arg-type]
            results.append(ObjectResult({
                **image.score(outcome.final_mask, obj),
                "dice_per_round": [round(d, 5) for d in outcome.dice_per_round],
                "noc85": outcome.clicks_to_reach(0.85),
                "noc90": outcome.clicks_to_reach(0.90),
                "prompt_coords": outcome.prompts[-1].to_record(),
                "decode_s": (time.perf_counter() - start) / (s.interactive_rounds + 1),
            }, outcome.final_mask))
        return results


ModeFactory = Callable[[str, PromptSettings], Mode]
MODES: dict[str, ModeFactory] = {
    "box": BoxMode,
    "box_jitter": JitteredBoxMode,
    "point_centroid": CentroidPointMode,
    "point_center": CenterPointMode,
    "point_random": RandomPointMode,
    "box_point": BoxPointMode,
    "everything": EverythingMode,
    "interactive": InteractiveMode,
}


def register_mode(name: str, factory: ModeFactory) -> None:
    """Make ``name`` a benchmark mode (``factory(name, settings)`` builds it)."""
    MODES[name] = factory


def make_mode(name: str, settings: PromptSettings, everything: EverythingSettings | None = None) -> Mode:
    """Resolve a mode name (``box``, ``points3_neg3``, ``everything``, ...) into a mode."""
    if name == "everything":
        return EverythingMode(name, settings, everything)
    if name in MODES:
        return MODES[name](name, settings)
    if PointsMode.pattern.fullmatch(name):
        return PointsMode(name, settings)
    raise InputError(
        f"--modes: unknown mode '{name}'; use {', '.join(DEFAULT_MODES)}, point_random, or pointsK / pointsK_negK"
    )
