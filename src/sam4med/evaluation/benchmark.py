"""The COSMOS-style benchmark: every object of every image, under every prompt mode.

Results stream to ``RESULTS/results.jsonl``, one row per (image, object, mode), written when an
image is finished: killing the run loses at most the image in progress, and running the same
command again continues after the last finished image. ``RESULTS/protocol.json`` records the
protocol; resuming with a different protocol is refused rather than mixed into one table.
"""

from __future__ import annotations

import json
import time
import traceback
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from sam4med.engine.data import Sample, load_dataset, load_pair, object_factors, object_labels
from sam4med.engine.errors import InputError
from sam4med.engine.everything import EverythingSettings, ProposedMask, generate_masks
from sam4med.engine.interactive import run_interactive
from sam4med.engine.metrics import dice, segmentation_metrics
from sam4med.engine.models import SamModel, load_model
from sam4med.engine.predictor import EmbeddingCache, Predictor
from sam4med.engine.prompts import Prompt, center_point, select_mask, tight_box
from sam4med.evaluation.modes import DEFAULT_MODES, Mode, PromptSettings, make_mode

RESULTS_FILE = "results.jsonl"
PROTOCOL_FILE = "protocol.json"


@dataclass
class BenchmarkConfig:
    """Everything that defines a benchmark run; stored in protocol.json and checked on resume."""

    model: str = "litemedsam"
    checkpoint: str | None = None
    modes: tuple[str, ...] = DEFAULT_MODES
    mask_rule: str | None = None  # None: the model's default (LiteMedSAM: single)
    seed: int = 0
    as_one_object: bool = False
    min_object_area: int = 10
    max_objects_per_image: int | None = 20
    max_images: int | None = None
    nsd_tolerance: float = 2.0
    prompts: PromptSettings = field(default_factory=PromptSettings)
    everything: EverythingSettings = field(default_factory=EverythingSettings)

    def protocol(self, model: SamModel) -> dict[str, object]:
        """The choices that make numbers comparable; the scope (data sets, image count) is not one,
        so a run can be extended to more images or data sets."""
        record = asdict(self)
        del record["max_images"]
        record["mask_rule"] = self.resolved_mask_rule(model)
        record["everything"] = self.everything.resolved(model.spec.takes_point_prompts).record()
        record["model_protocol"] = model.protocol()
        record["modes"] = {name: make_mode(name, self.prompts).params for name in self.modes}
        return record

    def resolved_mask_rule(self, model: SamModel) -> str:
        return self.mask_rule or model.spec.default_mask_rule


def _rng(seed: int, *keys: object) -> np.random.Generator:
    """A generator that depends only on (seed, image, object, mode): resume-order independent."""
    return np.random.default_rng([seed, *(zlib.crc32(str(k).encode()) for k in keys)])


def _finished_images(path: Path) -> set[tuple[str, str]]:
    """Images whose rows are all in the results file.

    A kill can leave a cut last line or part of an image's rows: each row carries ``image_rows``
    (the size of its image's block), so incomplete images are found, dropped and redone.
    """
    if not path.exists():
        return set()
    lines = path.read_bytes().split(b"\n")
    rows = [json.loads(line) for line in lines[:-1]]  # the last piece is b"" or a cut line
    counts: dict[tuple[str, str], int] = {}
    expected: dict[tuple[str, str], int] = {}
    for row in rows:
        key = (row["dataset"], row["image"])
        counts[key] = counts.get(key, 0) + 1
        expected[key] = row["image_rows"]
    done = {key for key, count in counts.items() if count == expected[key]}
    if lines[-1] or len(done) != len(counts):
        kept = [line + b"\n" for line, row in zip(lines, rows) if (row["dataset"], row["image"]) in done]
        path.write_bytes(b"".join(kept))
    return done


def _check_protocol(out: Path, protocol: dict[str, object]) -> None:
    path = out / PROTOCOL_FILE
    current = json.loads(json.dumps(protocol))  # tuples become lists, as in the stored file
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != current:
            changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
            raise InputError(f"{out}: holds results of a different protocol (differs in {', '.join(changed)}); use another --out")
    else:
        path.write_text(json.dumps(protocol, indent=2), encoding="utf-8")


class ImageEvaluator:
    """Runs every mode on one image's objects; returns the result rows."""

    def __init__(self, predictor: Predictor, config: BenchmarkConfig, modes: list[Mode]):
        self.predictor = predictor
        self.config = config
        self.modes = modes
        self.mask_rule = config.resolved_mask_rule(predictor.model)

    def _score(self, pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
        return segmentation_metrics(pred, gt, nsd_tolerance=self.config.nsd_tolerance)

    def _prompt_mode(self, mode: Mode, sample: Sample, objects: list[np.ndarray], foreground: np.ndarray,
                     indices: list[int]) -> list[dict]:
        size = foreground.shape
        prompts = [mode.build(obj, foreground, _rng(self.config.seed, sample.id, i, mode.name), size)
                   for obj, i in zip(objects, indices)]
        rows: list[dict] = [{} for _ in prompts]
        by_structure: dict[str, list[int]] = {}
        for position, prompt in enumerate(prompts):
            by_structure.setdefault(prompt.structure, []).append(position)
        multimask = self.mask_rule != "single"
        for positions in by_structure.values():
            start = time.perf_counter()
            decoded = self.predictor.predict([prompts[p] for p in positions], multimask=multimask)
            masks, ious = decoded.masks(), decoded.iou.cpu().numpy()
            seconds = (time.perf_counter() - start) / len(positions)
            for batch_index, position in enumerate(positions):
                gt = objects[position]
                choice = select_mask(masks[batch_index], ious[batch_index], self.mask_rule, gt)
                rows[position] = {
                    **self._score(masks[batch_index][choice], gt),
                    "prompt_coords": prompts[position].to_record(),
                    "predicted_iou": float(ious[batch_index][choice]),
                    "mask_index": choice,
                    "decode_s": seconds,
                    "_mask": masks[batch_index][choice],
                }
        return rows

    def _interactive(self, mode: Mode, sample: Sample, objects: list[np.ndarray], indices: list[int]) -> list[dict]:
        settings = self.config.prompts
        rows = []
        for obj, i in zip(objects, indices):
            start_prompt = Prompt(box=tight_box(obj)) if settings.interactive_start == "box" else Prompt(points=[center_point(obj)])
            start = time.perf_counter()
            result = run_interactive(self.predictor, obj, start_prompt, settings.interactive_rounds,
                                     _rng(self.config.seed, sample.id, i, mode.name), settings.click_rule, self.mask_rule)
            rows.append({
                **self._score(result.final_mask, obj),
                "dice_per_round": [round(d, 5) for d in result.dice_per_round],
                "noc85": result.clicks_to_reach(0.85),
                "noc90": result.clicks_to_reach(0.90),
                "prompt_coords": result.prompts[-1].to_record(),
                "decode_s": (time.perf_counter() - start) / (settings.interactive_rounds + 1),
                "_mask": result.final_mask,
            })
        return rows

    def _everything(self, objects: list[np.ndarray], image: np.ndarray) -> list[dict]:
        start = time.perf_counter()
        proposals: list[ProposedMask] = generate_masks(self.predictor, image, self.config.everything)
        seconds = time.perf_counter() - start
        rows = []
        for obj in objects:  # COSMOS matching: each object scored against its best mask
            best = max(proposals, key=lambda p: dice(p.mask, obj), default=None)
            mask = best.mask if best is not None else np.zeros_like(obj)
            rows.append({
                **self._score(mask, obj),
                "n_masks": len(proposals),
                "predicted_iou": best.predicted_iou if best else None,
                "stability": best.stability if best else None,
                "everything_s": seconds,
                "_mask": mask,
            })
        return rows

    def evaluate(self, sample: Sample, image: np.ndarray, gt: np.ndarray) -> tuple[list[dict], float]:
        labels, ids = object_labels(gt, min_area=self.config.min_object_area)
        if not ids:
            raise InputError(f"{sample.mask_path}: mask has no object of at least {self.config.min_object_area} pixels")
        if self.config.as_one_object:
            indices, objects = [0], [np.isin(labels, ids)]
        else:
            indices = list(range(len(ids)))
            cap = self.config.max_objects_per_image
            if cap is not None and len(ids) > cap:
                indices = sorted(_rng(self.config.seed, sample.id, "objects").choice(len(ids), cap, replace=False).tolist())
            objects = [labels == ids[i] for i in indices]
        start = time.perf_counter()
        self.predictor.set_image(image)
        encode_s = time.perf_counter() - start
        factors = [object_factors(image, obj) for obj in objects]
        rows = []
        for mode in self.modes:
            if mode.name == "everything":
                mode_rows = self._everything(objects, image)
            elif mode.name == "interactive":
                mode_rows = self._interactive(mode, sample, objects, indices)
            else:
                mode_rows = self._prompt_mode(mode, sample, objects, gt, indices)
            for index, factor, row in zip(indices, factors, mode_rows):
                rows.append({"object": index, "mode": mode.name, **factor, **row})
        return rows, encode_s


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
) -> Path:
    """Evaluate a model on data sets under every prompt mode; returns the results file.

    Each data set is a folder in the sam4med dataset layout (dataset.json, images/, masks/).
    Failures (unreadable files, size mismatches, empty masks) are recorded as rows with
    ``status = "error"`` and the run goes on. ``encoder_backend="onnx"`` encodes with ONNX Runtime
    (same embeddings to float rounding, so not part of the protocol). ``model`` reuses a loaded
    model (it must be ``config.model``) instead of loading one.
    """
    config = config or BenchmarkConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    datasets = [load_dataset(path) for path in data]
    if model is None:
        model = load_model(config.model, config.checkpoint, device, encoder_backend=encoder_backend)
    elif model.name != config.model:
        raise InputError(f"run_benchmark: model '{model.name}' given for a config of '{config.model}'")
    modes = [make_mode(name, config.prompts) for name in config.modes]
    protocol = config.protocol(model)
    _check_protocol(out, protocol)
    results_path = out / RESULTS_FILE
    finished = _finished_images(results_path)
    predictor = Predictor(model, EmbeddingCache(cache_dir) if cache_dir else None)
    evaluator = ImageEvaluator(predictor, config, modes)
    common = {"model": model.name, "mask_rule": evaluator.mask_rule, "seed": config.seed,
              "image_size": model.spec.image_size}
    work = [(d, s) for d in datasets for s in d.samples[: config.max_images]]
    overlay_dir = out / "overlays"
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not show_progress) as progress, results_path.open("ab", buffering=0) as handle:
        task = progress.add_task("benchmark", total=len(work))
        overlays_done = {d.name: len(list(overlay_dir.glob(f"{d.name}__*.png"))) for d in datasets}
        for dataset, sample in work:
            progress.update(task, description=f"{dataset.name}/{sample.id}")
            if (dataset.name, sample.id) in finished:
                progress.advance(task)
                continue
            base = {"dataset": dataset.name, "modality": dataset.modality, "target": dataset.target,
                    "image": sample.id, **common}
            try:
                image, gt = load_pair(sample)
                rows, encode_s = evaluator.evaluate(sample, image, gt)
            except Exception as error:  # a batch run records any failure and goes on
                message = str(error).splitlines()[0] if str(error) else type(error).__name__
                if not isinstance(error, InputError):
                    message = f"{type(error).__name__}: {message} ({traceback.extract_tb(error.__traceback__)[-1].name})"
                rows, encode_s = [{"status": "error", "error": message}], None
            else:
                if overlays_done[dataset.name] < overlays_per_dataset:
                    from sam4med.evaluation.report import write_overlay

                    write_overlay(overlay_dir / f"{dataset.name}__{sample.id}.png", image, gt, rows)
                    overlays_done[dataset.name] += 1
            block = []
            for row in rows:
                row.pop("_mask", None)
                row.setdefault("status", "ok")
                row = {**base, **row, "encode_s": encode_s, "image_rows": len(rows),
                       "mode_params": protocol["modes"].get(row.get("mode"), None)}
                block.append(json.dumps(row, default=_json_default) + "\n")
            handle.write("".join(block).encode())  # one unbuffered write per image
            progress.advance(task)
    return results_path


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")
