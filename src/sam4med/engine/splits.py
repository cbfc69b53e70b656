"""Train / validation / test splits that keep a group (patient, video sequence) on one side."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from sam4med.engine.datasets import Dataset, Sample
from sam4med.engine.errors import InputError

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
        if "train" not in sides:
            raise InputError(f"{dataset.root}: its groups name no training side (only {', '.join(sorted(sides))}); "
                             "a split needs images in a 'train' group")
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
            groups = len({sample.group or sample.id for sample in dataset.samples})
            held, why = (f"{len(dataset.samples)} images in {groups} group(s)", "; a group's images stay on one side") \
                if groups < len(dataset.samples) else (f"{len(dataset.samples)} images", "")
            raise InputError(f"{dataset.root}: {held} are too few for a train/val/test split (its {side} side "
                             f"would be empty{why})")
    return {side: sides[side] for side in ("train", "val", "test")}


