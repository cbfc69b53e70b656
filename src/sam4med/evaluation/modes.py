"""The prompt modes of the benchmark, each a named, fully parameterised prompt recipe.

A mode turns one ground-truth object into one prompt. Its ``params`` are written into every
result row, so a number can always be traced back to the exact prompt protocol that made it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sam4med.engine.errors import InputError
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
    stride_points,
    tight_box,
)

DEFAULT_MODES = (
    "box", "box_jitter", "point_centroid", "point_center", "points5", "points5_neg5", "box_point",
    "everything", "interactive",
)
# Modes that are not a single prompt per object; the benchmark runs them with their own loops.
SPECIAL_MODES = ("everything", "interactive")


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


PromptBuilder = Callable[[np.ndarray, np.ndarray, np.random.Generator, tuple[int, int]], Prompt]


@dataclass(frozen=True)
class Mode:
    name: str
    build: PromptBuilder | None = field(repr=False)
    params: dict[str, object]


def _positive_points(mask: np.ndarray, k: int, sampler: str, rng: np.random.Generator) -> np.ndarray:
    if sampler == "stride":
        return stride_points(mask, k)
    if sampler == "random":
        return random_points(mask, k, rng)
    raise InputError(f"unknown --points-sampler '{sampler}'; use stride or random")


def make_mode(name: str, settings: PromptSettings) -> Mode:
    """Resolve a mode name (``box``, ``points3_neg3``, ``everything``, ...) into a prompt recipe."""
    s = settings
    if name == "box":
        return Mode(name, lambda m, fg, rng, size: Prompt(box=tight_box(m)), {"prompt": "tight box"})
    if name == "box_jitter":
        return Mode(
            name,
            lambda m, fg, rng, size: Prompt(box=jitter_box(tight_box(m), size, rng, s.jitter, s.jitter_unit, s.jitter_kind)),
            {"prompt": "jittered box", "jitter": s.jitter, "jitter_unit": s.jitter_unit, "jitter_kind": s.jitter_kind},
        )
    if name == "point_centroid":
        return Mode(name, lambda m, fg, rng, size: Prompt(points=[centroid_point(m)]), {"prompt": "centroid point"})
    if name == "point_center":
        return Mode(name, lambda m, fg, rng, size: Prompt(points=[center_point(m)]),
                    {"prompt": "interior point farthest from the boundary"})
    if name == "point_random":
        return Mode(name, lambda m, fg, rng, size: Prompt(points=random_points(m, 1, rng)),
                    {"prompt": "uniform random foreground pixel"})
    if name == "box_point":
        return Mode(name, lambda m, fg, rng, size: Prompt(points=[center_point(m)], box=tight_box(m)),
                    {"prompt": "tight box + interior point"})
    match = re.fullmatch(r"points(\d+)(?:_neg(\d+))?", name)
    if match:
        positives, negatives = int(match.group(1)), int(match.group(2) or 0)

        def build(m: np.ndarray, fg: np.ndarray, rng: np.random.Generator, size: tuple[int, int]) -> Prompt:
            points = _positive_points(m, positives, s.points_sampler, rng)
            labels = [1] * positives
            if negatives:
                points = np.concatenate([points, negative_points(m, fg, negatives, rng, s.negative_region)])
                labels += [0] * negatives
            return Prompt(points=points, labels=labels)

        params: dict[str, object] = {"prompt": f"{positives} positive points", "points_sampler": s.points_sampler}
        if negatives:
            params.update(prompt=f"{positives} positive + {negatives} negative points", negative_region=s.negative_region)
        return Mode(name, build, params)
    if name == "everything":
        return Mode(name, None, {"prompt": "everything mode, best mask per object (COSMOS matching)"})
    if name == "interactive":
        return Mode(name, None, {
            "prompt": f"interactive from {s.interactive_start}", "rounds": s.interactive_rounds,
            "click_rule": s.click_rule,
        })
    raise InputError(
        f"unknown mode '{name}'; use {', '.join(DEFAULT_MODES)}, point_random, or pointsK / pointsK_negK"
    )
