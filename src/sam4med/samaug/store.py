"""Prior maps of whole data sets, cached on disk: a one-time cost, resumable after a kill.

Layout: ``PRIORS/<data set>/priors.json`` (model, weights hash, settings, key), one ``<image id>.npz``
per image written atomically, and ``results.jsonl`` with one row per image (seconds and mask count,
or the error of an image that could not be processed: the run goes on). Images are run by the shared
resumable item loop (``sam4med.engine.items``). Asking for other settings in the same folder is
refused rather than mixing two kinds of priors in one training set.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Collection, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from sam4med.engine.checkpoints import file_sha256
from sam4med.engine.datasets import Dataset, load_datasets
from sam4med.engine.errors import InputError, check_apart, check_limit, check_precision, check_whole, one_line
from sam4med.engine.imageio import read_image
from sam4med.engine.executors import Executor
from sam4med.engine.items import RESULTS_FILE, ItemRunSummary, WorkItem, run_items
from sam4med.engine.models import load_model
from sam4med.engine.predictor import Predictor
from sam4med.engine.defaults import DEFAULT_MODEL
from sam4med.engine.runs import claim_folder, write_bytes_atomic
from sam4med.engine.sam_model import SamModel
from sam4med.samaug.figures import write_prior_figure
from sam4med.samaug.priors import Priors, PriorSettings, compute_priors, settings_key

SETTINGS_FILE = "priors.json"


class PriorStore:
    """The priors of one data set under one model and settings."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @property
    def record(self) -> dict[str, object]:
        path = self.folder / SETTINGS_FILE
        if not path.is_file():
            raise InputError(f"{self.folder}: no {SETTINGS_FILE} here (run `sam4med samaug priors` for this data set first)")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("key"), str):
            raise InputError(f"{path}: damaged (not the JSON record of `sam4med samaug priors`); compute this data "
                             "set's priors again into a new folder")
        return record

    def claim(self, record: dict[str, object]) -> None:
        """Record the settings, or refuse a folder that holds priors made with others."""
        claim_folder(self.folder, SETTINGS_FILE, record)

    def path(self, image_id: str) -> Path:
        return self.folder / f"{image_id}.npz"

    def save(self, image_id: str, priors: Priors, key: str, image_sha256: str) -> None:
        """Store an image's priors with the settings key and the sha256 of the image file they were made from."""
        buffer = io.BytesIO()
        np.savez_compressed(buffer, segmentation=priors.segmentation, boundary=priors.boundary.astype(np.uint8),
                            masks=np.int64(priors.masks), key=np.array(key), image_sha256=np.array(image_sha256))
        write_bytes_atomic(self.path(image_id), buffer.getvalue())

    def load(self, image_id: str, image_path: Path | None = None) -> Priors:
        """An image's priors; with ``image_path``, refused when that file is not the one they were made from
        (an image replaced under the same id). Priors stored before the hash was kept are taken as they are."""
        path = self.path(image_id)
        if not path.is_file():
            raise InputError(f"{path}: no priors for image '{image_id}' (run `sam4med samaug priors` on its data set)")
        try:
            with np.load(path) as data:
                key = str(data["key"])
                made_from = str(data["image_sha256"]) if "image_sha256" in data.files else None
                priors = Priors(data["segmentation"].astype(np.float32), data["boundary"].astype(np.float32),
                                int(data["masks"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise InputError(f"{path}: damaged priors file ({one_line(error)}); run `sam4med samaug priors` "
                             "again, it computes damaged files anew") from None
        if key != self.record["key"]:
            raise InputError(f"{path}: made with other settings than {self.folder / SETTINGS_FILE}")
        if image_path is not None and made_from is not None and made_from != file_sha256(image_path):
            raise InputError(f"{path}: made from another version of {image_path}; run `sam4med samaug priors` again, "
                             "it computes them anew")
        return priors

    def is_whole(self, image_id: str, image_path: Path | None = None) -> bool:
        """Whether the image's priors file loads, and was made from ``image_path`` as it is now (a resumed run
        recomputes it otherwise)."""
        try:
            self.load(image_id, image_path)
        except InputError:
            return False
        return True


class PriorWorker:
    """The work for one image: compute its priors, store them, draw the figure of the first few."""

    def __init__(self, predictor: Predictor, settings: PriorSettings, key: str, store: PriorStore,
                 with_figure: Collection[str]):
        self.predictor = predictor
        self.settings = settings
        self.key = key
        self.store = store
        self.with_figure = with_figure

    def outputs_whole(self, item: WorkItem) -> bool:
        """Whether a finished image's priors still load (its row is written after its figure, so a kill
        never leaves a row without its figure)."""
        return self.store.is_whole(item.sample.id, item.sample.image_path)

    def figure_path(self, image_id: str) -> Path:
        return self.store.folder / "figures" / f"{image_id}.png"

    def __call__(self, item: WorkItem) -> list[dict]:
        image_sha256 = file_sha256(item.sample.image_path)  # before reading: the priors belong to these bytes
        image = read_image(item.sample.image_path)
        start = time.perf_counter()
        priors = compute_priors(self.predictor, image, self.settings)
        seconds = time.perf_counter() - start
        self.store.save(item.sample.id, priors, self.key, image_sha256)
        if item.sample.id in self.with_figure:
            write_prior_figure(self.figure_path(item.sample.id), image, priors)
        return [{"dataset": item.dataset.name, "image": item.sample.id, "masks": priors.masks,
                 "priors_s": round(seconds, 3)}]  # encoding and everything mode, the cost a user pays per image


def generate_priors(
    data: Sequence[str | Path | Dataset],
    out: str | Path,
    model: str | SamModel = DEFAULT_MODEL,
    checkpoint: str | Path | None = None,
    settings: PriorSettings | None = None,
    device: str | None = None,
    figures_per_dataset: int = 4,
    max_images: int | None = None,
    show_progress: bool = True,
    encoder_backend: str = "torch",
    image_ids: Collection[str] | None = None,
    executor: Executor | None = None,
    precision: str = "fp32",
) -> list[ItemRunSummary]:
    """Compute and cache SAMAug priors for every image of the data sets under ``out/<data set>/``.

    ``image_ids`` restricts the run to those images (an experiment that uses part of a data set).
    Calling again resumes: images already in ``results.jsonl`` are skipped; a failing image is recorded
    there as an error row and the run goes on. The first ``figures_per_dataset`` images also get a
    figure of image / segmentation prior / boundary prior / augmented input. ``executor``: where the images
    are computed (``engine.executors``; on a Ray cluster of several machines ``out`` must be storage that
    every machine shares, since each worker writes its priors there).
    """
    settings = settings or PriorSettings()
    check_whole(figures_per_dataset, "--figures")
    check_limit(max_images, "--max-images")
    check_precision(precision)
    datasets = load_datasets(data, require_masks=False)  # checked before the model is loaded
    check_apart(Path(out), [folder for dataset in datasets for folder in dataset.folders],
                roots=[dataset.root for dataset in datasets],
                writes=[dataset.name for dataset in datasets])  # each set's priors fill OUT/<its name>
    sam = model if isinstance(model, SamModel) else load_model(model, checkpoint, device,
                                                                encoder_backend=encoder_backend,
                                                                precision=precision)
    resolved = settings.resolved(sam.spec)
    key = settings_key(sam.protocol(), resolved)
    predictor = Predictor(sam)
    summaries = []
    for dataset in datasets:
        store = PriorStore(Path(out) / dataset.name)
        store.claim({"key": key, "dataset": dataset.name, "model": sam.protocol(), "settings": resolved.record()})
        samples = [s for s in dataset.samples if image_ids is None or s.id in image_ids]
        samples = samples[:max_images] if max_images else samples
        worker = PriorWorker(predictor, resolved, key, store, {s.id for s in samples[:figures_per_dataset]})
        # priors are made from the image alone: without its mask, an edited mask leaves them current
        summaries.append(run_items([WorkItem(dataset, replace(s, mask_path=None)) for s in samples], worker,
                                   store.folder / RESULTS_FILE,
                                   f"priors {dataset.name}", show_progress=show_progress,
                                   check_done=worker.outputs_whole, executor=executor))
    return summaries
