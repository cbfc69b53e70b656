"""The COSMOS-style benchmark: every object of every image, under every prompt mode.

The work for one image is :class:`ImageEvaluator` (a plain function of the image returning its rows);
the shared resumable item loop (``sam4med.engine.items``) streams the rows to
``RESULTS/results.jsonl``, so killing the run loses at most the image in progress and running the same
command again continues. ``RESULTS/protocol.json`` records the protocol; resuming with a different
protocol is refused rather than mixed into one table.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sam4med.engine.datasets import Dataset, Sample, load_datasets
from sam4med.engine.errors import (InputError, check_apart, check_count, check_limit, check_number, check_precision,
                                    check_seed, check_tiling)
from sam4med.engine.everything import EverythingSettings
from sam4med.engine.imageio import load_pair
from sam4med.engine.executors import Executor
from sam4med.engine.items import NO_OBJECTS, RESULTS_FILE, WorkItem, run_items
from sam4med.engine.models import load_model
from sam4med.engine.objects import object_factors, object_labels
from sam4med.engine.predictor import EmbeddingCache, Predictor
from sam4med.engine.tiling import make_predictor
from sam4med.engine.prompts import check_mask_rule
from sam4med.engine.defaults import DEFAULT_MODEL
from sam4med.engine.runs import PROTOCOL_FILE, claim_datasets, claim_folder
from sam4med.engine.runtime import release_free_memory
from sam4med.engine.sam_model import SamModel
from sam4med.engine.splits import DEFAULT_FRACTIONS, training_split
from sam4med.evaluation.modes import DEFAULT_MODES, ImageObjects, Mode, PromptSettings, make_mode, object_rng
from sam4med.engine.overlays import shrink_for_overlay, write_overlay


@dataclass
class BenchmarkConfig:
    """Everything that defines a benchmark run; stored in protocol.json and checked on resume."""

    model: str = DEFAULT_MODEL
    checkpoint: str | None = None
    modes: tuple[str, ...] = DEFAULT_MODES
    mask_rule: str | None = None  # None: the model's default (LiteMedSAM: single; LiteMedSAM-click: auto)
    seed: int = 0
    as_one_object: bool = False
    min_object_area: int = 10
    max_objects_per_image: int | None = 20
    max_images: int | None = None
    split: str | None = None  # "test": only the test side of the split every trainer uses (group-aware)
    split_seed: int = 0
    nsd_tolerance: float = 2.0
    tile: int | None = None  # tiled embeddings: core size in px of the image (None: whole images)
    halo: int = 32  # px added around each tile's core
    prompts: PromptSettings = field(default_factory=PromptSettings)
    everything: EverythingSettings = field(default_factory=EverythingSettings)

    def check(self) -> None:
        """Every choice within its range, before a model is loaded or a file written."""
        check_mask_rule(self.mask_rule)
        check_count(self.min_object_area, "min_object_area")  # a Python setting: no option names it
        check_limit(self.max_objects_per_image, "--max-objects")
        check_limit(self.max_images, "--max-images")
        check_seed(self.seed, "--seed")
        check_seed(self.split_seed, "--split-seed")
        if self.split is not None and self.split not in DEFAULT_FRACTIONS:
            raise InputError(f"--split {self.split!r}: choose one of {', '.join(DEFAULT_FRACTIONS)}")
        check_number(self.nsd_tolerance, "--nsd-tolerance", minimum=0)
        check_tiling(self.tile, self.halo)
        if not self.modes:
            raise InputError("--modes: give at least one mode")
        repeated = sorted({mode for mode in self.modes if self.modes.count(mode) > 1})
        if repeated:
            raise InputError(f"--modes: {', '.join(repeated)} given more than once (each mode is one set of rows)")
        self.everything.check()
        self.prompts.check()

    def protocol(self, model: SamModel, modes: Sequence[Mode]) -> dict[str, object]:
        """The choices that make numbers comparable; the scope (data sets, image count) is not one,
        so a run can be extended to more images or data sets."""
        record = asdict(self)
        del record["max_images"]
        if self.split is None:
            del record["split"], record["split_seed"]
        if self.tile is None:  # whole images, as before tiling existed: earlier runs still resume
            del record["tile"], record["halo"]
        record["mask_rule"] = self.resolved_mask_rule(model)
        record["everything"] = self.everything.resolved(model.spec).record()
        record["model_protocol"] = model.protocol()
        record["modes"] = {mode.name: mode.params for mode in modes}
        return record

    def resolved_mask_rule(self, model: SamModel) -> str:
        return self.mask_rule or model.spec.default_mask_rule

    def samples(self, dataset: Dataset) -> list[Sample]:
        """The data set's images under this protocol: all, or one side of the trainers' split."""
        if self.split is None:
            return dataset.samples
        if self.split not in DEFAULT_FRACTIONS:
            raise InputError(f"--split {self.split!r}: choose one of {', '.join(DEFAULT_FRACTIONS)}")
        try:
            return training_split(dataset, DEFAULT_FRACTIONS, self.split_seed)[self.split]
        except InputError as error:  # a set too small for the trainers' split (two patients) is still evaluable
            raise InputError(f"{error}; without --split every image of it is evaluated") from error


class ImageEvaluator:
    """The work for one image: every mode on its objects; returns the image's result rows."""

    def __init__(self, predictor: Predictor, config: BenchmarkConfig, modes: list[Mode],
                 overlay_dir: Path | None = None, overlays_per_dataset: int = 0):
        self.predictor = predictor
        self.config = config
        self.modes = modes
        self.mask_rule = config.resolved_mask_rule(predictor.model)
        self.overlay_dir = overlay_dir
        self.overlays_per_dataset = overlays_per_dataset
        self.mode_params = {mode.name: mode.params for mode in modes}

    def common_fields(self, item: WorkItem) -> dict[str, object]:
        """What every row of the image carries, error rows included."""
        model = self.predictor.model
        return {"dataset": item.dataset.name, "modality": item.dataset.modality, "target": item.dataset.target,
                "image": item.sample.id, "model": model.name, "mask_rule": self.mask_rule, "seed": self.config.seed,
                "image_size": model.spec.image_size}

    def error_fields(self, item: WorkItem) -> dict[str, object]:
        return {**self.common_fields(item), "encode_s": None, "mode_params": None}

    def image_objects(self, item: WorkItem, image: np.ndarray, truth: np.ndarray) -> ImageObjects | None:
        """The objects of ``truth`` (the mask's labels: each label's connected components) that are scored; None
        when it holds none of ``min_object_area`` pixels."""
        labels, ids = object_labels(truth, min_area=self.config.min_object_area)
        if not ids:
            return None
        if self.config.as_one_object:
            indices, objects = [0], [np.isin(labels, ids)]
        else:
            indices = list(range(len(ids)))
            cap = self.config.max_objects_per_image
            if cap is not None and len(ids) > cap:
                indices = sorted(object_rng(self.config.seed, item.sample.id, "objects")
                                 .choice(len(ids), cap, replace=False).tolist())
            objects = [labels == ids[i] for i in indices]
        return ImageObjects(self.predictor, item.sample.id, image, truth > 0, objects, indices, self.config.seed,
                            self.mask_rule, self.config.nsd_tolerance)

    def __call__(self, item: WorkItem) -> list[dict]:
        image, truth = load_pair(item.sample, labels=True)
        objects = self.image_objects(item, image, truth)
        if objects is None:  # a case without a lesion, or only specks: nothing to prompt, and nothing failed
            return [{**self.common_fields(item), "object": None, "mode": None, "status": NO_OBJECTS}]
        start = time.perf_counter()
        self.predictor.set_image(image)
        self.predictor.encode_all()  # tiles too: encode_s is all of the image's encoding, decode_s decoding alone
        encode_s = time.perf_counter() - start
        factors = [object_factors(image, obj) for obj in objects.objects]
        common = self.common_fields(item)
        rows, panels = [], []
        overlay = self._overlay_path(item)
        for mode in self.modes:
            results = mode.run(objects)
            if overlay is not None:  # every mode's masks, kept for the image drawn at the size it is drawn
                panels.append((mode.name, [shrink_for_overlay(r.mask) for r in results],
                               float(np.mean([r.row["dice"] for r in results]))))
            for index, factor, result in zip(objects.indices, factors, results):
                rows.append({**common, "object": index, "mode": mode.name, **factor, **result.row, "status": "ok",
                             "encode_s": encode_s, "mode_params": self.mode_params[mode.name]})
            del results
            release_free_memory()  # the mode's decoder batches and masks: not stacked under the next mode's
        if overlay is not None:
            write_overlay(overlay, image, objects.foreground, panels)
        return rows

    def _overlay_path(self, item: WorkItem) -> Path | None:
        """Where this image's overlay goes, for the first few images of each data set (counted on disk, so
        resumes keep the count); None for the rest."""
        if self.overlay_dir is None or self.overlays_per_dataset <= 0:
            return None
        if len(list(self.overlay_dir.glob(f"{item.dataset.name}__*.png"))) >= self.overlays_per_dataset:
            return None
        return self.overlay_dir / f"{item.dataset.name}__{item.sample.id}.png"


def run_benchmark(
    data: Sequence[str | Path],
    out: str | Path,
    config: BenchmarkConfig | None = None,
    device: str | None = None,
    cache_dir: str | Path | None = None,
    overlays_per_dataset: int = 3,
    show_progress: bool = True,
    encoder_backend: str = "torch",
    model: SamModel | None = None,
    executor: Executor | None = None,
    precision: str = "fp32",
) -> Path:
    """Evaluate a model on data sets under every prompt mode; returns the results file.

    Each data set is a folder in the sam4med dataset layout (dataset.json, images/, masks/).
    Failures (unreadable files, size mismatches, empty masks) are recorded as rows with
    ``status = "error"`` and the run goes on. ``encoder_backend="onnx"`` encodes with ONNX Runtime
    (same embeddings to float rounding, so not part of the protocol); ``precision="bf16"`` runs PyTorch's
    encoder and decoders under bfloat16 autocast (recorded in the protocol). ``model`` reuses a loaded
    model (it must be ``config.model``, loaded in ``precision``) instead of loading one. ``executor`` runs
    the images elsewhere (``engine.executors``: Ray actors, each with its own copy of the model); the rows
    are the same.
    """
    config = config or BenchmarkConfig()
    config.check()
    check_precision(precision)
    out = Path(out)
    modes = [make_mode(name, config.prompts, config.everything) for name in config.modes]
    datasets = load_datasets(data)
    inputs = [folder for dataset in datasets for folder in dataset.folders]
    check_apart(out, inputs, roots=[d.root for d in datasets])
    if cache_dir is not None:
        check_apart(Path(cache_dir), inputs, "--cache-dir", roots=[d.root for d in datasets])
    if model is None:
        model = load_model(config.model, config.checkpoint, device, encoder_backend=encoder_backend,
                           precision=precision)
    elif model.name != config.model:
        raise InputError(f"run_benchmark: model '{model.name}' given for a config of '{config.model}'")
    elif model.precision != precision:
        raise InputError(f"run_benchmark: a model loaded in {model.precision} given with precision {precision!r}")
    items = [WorkItem(d, s) for d in datasets for s in config.samples(d)[: config.max_images]]
    claim_folder(out, PROTOCOL_FILE, config.protocol(model, modes))  # once every input has been checked
    claim_datasets(out, {d.name: d.root for d in datasets})
    predictor = make_predictor(model, config.tile, config.halo, EmbeddingCache(cache_dir) if cache_dir else None)
    evaluator = ImageEvaluator(predictor, config, modes, out / "overlays", overlays_per_dataset)
    run_items(items, evaluator, out / RESULTS_FILE, "benchmark", evaluator.error_fields, show_progress,
              executor=executor)
    return out / RESULTS_FILE
