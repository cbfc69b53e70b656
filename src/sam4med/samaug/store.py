"""Prior maps of whole data sets, cached on disk: a one-time cost, resumable after a kill.

Layout: ``PRIORS/<data set>/priors.json`` (model, weights hash, settings, key) and one
``<image id>.npz`` per image, written atomically, so an interrupted run loses at most the image in
progress. ``timings.jsonl`` holds seconds and mask counts per image, ``failures.jsonl`` the images
that could not be processed (the run goes on). Asking for other settings in the same folder is
refused rather than mixing two kinds of priors in one training set.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from sam4med.engine.data import Dataset, load_dataset, read_image
from sam4med.engine.errors import InputError
from sam4med.engine.models import SamModel, load_model
from sam4med.engine.predictor import Predictor
from sam4med.samaug.priors import Priors, PriorSettings, compute_priors, settings_key

SETTINGS_FILE = "priors.json"
TIMINGS_FILE = "timings.jsonl"
FAILURES_FILE = "failures.jsonl"


class PriorStore:
    """The priors of one data set under one model and settings."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @property
    def record(self) -> dict[str, object]:
        path = self.folder / SETTINGS_FILE
        if not path.is_file():
            raise InputError(f"{self.folder}: no {SETTINGS_FILE} here (run `sam4med priors` for this data set first)")
        return json.loads(path.read_text(encoding="utf-8"))

    def claim(self, record: dict[str, object]) -> None:
        """Write the settings record, or check that the folder already holds the same key."""
        path = self.folder / SETTINGS_FILE
        if path.is_file():
            existing = json.loads(path.read_text(encoding="utf-8"))
            if existing.get("key") != record["key"]:
                raise InputError(f"{self.folder}: holds priors made with other settings (key {existing.get('key')}, "
                                 f"asked {record['key']}); choose another --out")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")

    def path(self, image_id: str) -> Path:
        return self.folder / f"{image_id}.npz"

    def has(self, image_id: str) -> bool:
        return self.path(image_id).is_file()

    def save(self, image_id: str, priors: Priors, key: str) -> None:
        temporary = self.folder / f".{image_id}.tmp.npz"
        np.savez_compressed(temporary, segmentation=priors.segmentation, boundary=priors.boundary.astype(np.uint8),
                            masks=np.int64(priors.masks), key=np.array(key))
        os.replace(temporary, self.path(image_id))

    def load(self, image_id: str) -> Priors:
        path = self.path(image_id)
        if not path.is_file():
            raise InputError(f"{path}: no priors for image '{image_id}' (run `sam4med priors` on its data set)")
        with np.load(path) as data:
            if str(data["key"]) != self.record["key"]:
                raise InputError(f"{path}: made with other settings than {self.folder / SETTINGS_FILE}")
            return Priors(data["segmentation"].astype(np.float32), data["boundary"].astype(np.float32),
                          int(data["masks"]))

    def append(self, name: str, row: dict[str, object]) -> None:
        with (self.folder / name).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


@dataclass
class PriorRunSummary:
    """What a ``generate_priors`` call did, per data set."""

    folder: Path
    computed: int
    skipped: int
    failed: int
    seconds_per_image: float


def generate_priors(
    data: Sequence[str | Path | Dataset],
    out: str | Path,
    model: str | SamModel = "litemedsam",
    checkpoint: str | Path | None = None,
    settings: PriorSettings | None = None,
    device: str | None = None,
    figures_per_dataset: int = 4,
    max_images: int | None = None,
    show_progress: bool = True,
    encoder_backend: str = "torch",
    image_ids: Collection[str] | None = None,
) -> list[PriorRunSummary]:
    """Compute and cache SAMAug priors for every image of the data sets under ``out/<data set>/``.

    ``image_ids`` restricts the run to those images (an experiment that uses part of a data set).

    Images whose priors exist are skipped, so calling again resumes. A failing image is recorded in
    ``failures.jsonl`` and the run goes on. The first ``figures_per_dataset`` images also get a
    figure of image / segmentation prior / boundary prior / augmented input.
    """
    from sam4med.samaug.figures import write_prior_figure

    settings = settings or PriorSettings()
    sam = model if isinstance(model, SamModel) else load_model(model, checkpoint, device,
                                                                encoder_backend=encoder_backend)
    resolved = settings.resolved(sam.spec.takes_point_prompts)
    key = settings_key(sam.protocol(), resolved)
    datasets = [d if isinstance(d, Dataset) else load_dataset(d, require_masks=False) for d in data]
    predictor = Predictor(sam)
    summaries = []
    for dataset in datasets:
        store = PriorStore(Path(out) / dataset.name)
        store.claim({"key": key, "dataset": dataset.name, "data": str(dataset.root),
                     "model": sam.protocol(), "settings": resolved.record()})
        samples = [s for s in dataset.samples if image_ids is None or s.id in image_ids]
        samples = samples[:max_images] if max_images else samples
        todo = [s for s in samples if not store.has(s.id)]
        with_figure = {s.id for s in samples[:figures_per_dataset]}
        seconds: list[float] = []
        failed = 0
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      disable=not show_progress) as progress:
            task = progress.add_task(f"priors {dataset.name}", total=len(todo))
            for sample in todo:
                start = time.perf_counter()
                try:
                    image = read_image(sample.image_path)
                    priors = compute_priors(predictor, image, resolved)
                    store.save(sample.id, priors, key)
                except Exception as error:  # noqa: BLE001 - a long batch records the failure and goes on
                    failed += 1
                    store.append(FAILURES_FILE, {"image": sample.id, "path": str(sample.image_path),
                                                 "error": f"{type(error).__name__}: {error}",
                                                 "traceback": traceback.format_exc(limit=3)})
                else:
                    elapsed = time.perf_counter() - start
                    seconds.append(elapsed)
                    store.append(TIMINGS_FILE, {"image": sample.id, "seconds": round(elapsed, 3), "masks": priors.masks})
                    if sample.id in with_figure:
                        write_prior_figure(store.folder / "figures" / f"{sample.id}.png", image, priors)
                progress.advance(task)
        summaries.append(PriorRunSummary(store.folder, len(todo) - failed, len(samples) - len(todo), failed,
                                         float(np.mean(seconds)) if seconds else float("nan")))
    return summaries
