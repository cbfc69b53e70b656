"""Prediction and evaluation with a trained SAMAug segmenter.

Every image is run on raw input and (for models trained with priors) on augmented input; the
two probability maps are combined by a mode (:data:`~sam4med.samaug.training.PREDICT_MODES`):
``raw``, ``aug``, ``mean``, ``confident`` (the map with the larger mean |p - 0.5|, SAMAug's rule)
or ``entropy`` (the map with the lower mean binary entropy). Probabilities are brought back to
the image's own size before thresholding at 0.5 and scoring.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from sam4med.engine.datasets import Dataset, Sample, load_dataset, load_datasets
from sam4med.engine.imageio import read_mask
from sam4med.engine.errors import InputError, check_apart, one_line
from sam4med.engine.items import RESULTS_FILE, ItemRunSummary, WorkItem, finished_outputs, run_items
from sam4med.engine.metrics import aggregated_jaccard_index, dice, iou, label_instances, object_f1, soft_dice
from sam4med.engine.models import resolve_device
from sam4med.engine.checkpoints import file_sha256, read_trained_checkpoint, unpacked
from sam4med.engine.runs import PROTOCOL_FILE, SPLIT_FILE, atomic_path, check_unclaimed_outputs, claim_folder, warn
from sam4med.samaug.inputs import prepare_images
from sam4med.samaug.networks import build_network
from sam4med.samaug.prediction import PREDICT_MODES, combine, default_mode, probabilities
from sam4med.samaug.store import PriorStore
from sam4med.samaug.training import CHECKPOINT_KIND, TrainConfig


@dataclass
class TrainedSegmenter:
    """A network with the configuration and prior keys it was trained with."""

    network: torch.nn.Module
    config: TrainConfig
    gray: bool
    prior_keys: dict[str, str]

    @property
    def uses_priors(self) -> bool:
        return self.config.input_kind != "raw"


def load_segmenter(checkpoint: str | Path, device: str | torch.device | None = None) -> TrainedSegmenter:
    """A trained segmenter on ``device`` (None: a CUDA GPU where there is one), ready for inference."""
    resolved = resolve_device(device)
    saved = read_trained_checkpoint(Path(checkpoint), CHECKPOINT_KIND)
    with unpacked(Path(checkpoint)):
        config = TrainConfig(**saved["config"])
        network = build_network(config.net, saved["meta"]["in_channels"], config.features)
        network.load_state_dict(saved["weights"])
        segmenter = TrainedSegmenter(network, config, saved["meta"]["gray"], saved["meta"]["prior_keys"])
    network.to(resolved).eval()
    return segmenter


def prior_store(segmenter: TrainedSegmenter, priors: str | Path | None, dataset: Dataset) -> PriorStore | None:
    """The data set's priors the segmenter needs (None for raw input), checked against its training's."""
    if not segmenter.uses_priors:
        return None
    if priors is None:
        raise InputError(f"--priors: missing; the model was trained with --input {segmenter.config.input_kind}")
    store = PriorStore(Path(priors) / dataset.name)
    expected = segmenter.prior_keys.get(dataset.name)
    if expected is not None and store.record["key"] != expected:
        raise InputError(f"{store.folder}: priors made with other settings than the model was trained on")
    return store


def _to_size(prob: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    if tuple(prob.shape) != size:
        prob = F.interpolate(prob[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return prob.clamp(0, 1).numpy()


def predict_sample(segmenter: TrainedSegmenter, dataset: Dataset, sample: Sample, store: PriorStore | None
                   ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """One sample's probability map (at the image's size) under every applicable mode, and its mask (None
    when the sample has none); ``store`` is :func:`prior_store`'s for the data set."""
    config = segmenter.config
    modes = PREDICT_MODES if segmenter.uses_priors else ("raw",)
    item = prepare_images(dataset, [sample], store, config.working_side, segmenter.gray, need_masks=False)[0]
    raw = probabilities(segmenter.network, item.image, None, config.policy, config.image_size)
    aug = probabilities(segmenter.network, item.image, item.priors, config.policy, config.image_size) \
        if segmenter.uses_priors else raw
    maps = {mode: _to_size(combine(raw, aug, mode), item.original_size) for mode in modes}
    gt = read_mask(sample.mask_path, item.original_size) if sample.mask_path is not None else None
    return maps, gt


def authors_soft_dice(prob: np.ndarray, gt: np.ndarray) -> float:
    """The SAMAug authors' reported Dice: the probability map min-max normalised, then soft Dice
    with smoothing 1 (their polyp test loop). Not comparable with thresholded Dice."""
    low, high = float(prob.min()), float(prob.max())
    normalised = (prob - low) / (high - low + 1e-8)
    return soft_dice(normalised, gt, eps=1.0)


def score(prob: np.ndarray, gt: np.ndarray, instances: bool) -> dict[str, float]:
    """Thresholded Dice and IoU, soft Dice (plain and the authors'), and AJI / object F1 on
    connected components when ``instances``."""
    pred = prob > 0.5
    row = {"dice": dice(pred, gt), "iou": iou(pred, gt), "soft_dice": soft_dice(prob, gt),
           "soft_dice_authors": authors_soft_dice(prob, gt)}
    if instances:
        pred_labels, gt_labels = label_instances(pred), label_instances(gt)
        row["aji"] = aggregated_jaccard_index(pred_labels, gt_labels)
        row["object_f1"] = object_f1(pred_labels, gt_labels).f1
    return row


def evaluate(
    checkpoint: str | Path,
    data: Sequence[str | Path],
    priors: str | Path | None = None,
    split: str | None = "test",
    instances: bool = False,
    out: str | Path | None = None,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Score a trained segmenter: one row per image x mode (``picked_aug``: 1 where a selection
    mode kept the augmented-input map).

    ``split`` names the side of the run's ``split.json`` (next to the checkpoint) to score; None
    scores every image of the data sets. ``out`` also writes ``metrics.csv`` there. An image that cannot be
    scored is a row of its own; none scored at all is an InputError.
    """
    checkpoint = Path(checkpoint)
    datasets = load_datasets(data)
    if out is not None:
        check_apart(Path(out), [folder for dataset in datasets for folder in dataset.folders],
                    roots=[dataset.root for dataset in datasets])
    segmenter = load_segmenter(checkpoint, device)
    split_ids = _split_ids(checkpoint.parent, split) if split else None
    rows = []
    for folder, dataset in zip(data, datasets):
        samples = dataset.samples
        if split_ids is not None:
            if dataset.name not in split_ids:
                raise InputError(f"{folder}: data set '{dataset.name}' was not part of this run's split")
            wanted = set(split_ids[dataset.name])
            samples = [s for s in samples if s.id in wanted]
            for missing in sorted(wanted - {s.id for s in samples}):  # the run's side, not the folder, is scored
                rows.append({"dataset": dataset.name, "image": missing, "status": "error",
                             "error": f"{dataset.root}: image '{missing}' of the run's split is no longer in the data set"})
                warn(rows[-1]["error"])
        store = prior_store(segmenter, priors, dataset)
        for sample in samples:
            try:
                maps, gt = predict_sample(segmenter, dataset, sample, store)
            except (InputError, OSError) as error:  # one bad image is a row of its own; the others go on
                rows.append({"dataset": dataset.name, "image": sample.id, "status": "error", "error": one_line(error)})
                message = one_line(error)  # most errors name their file already
                warn(message if str(dataset.root) in message else f"{sample.image_path}: {message}")
                continue
            for mode, prob in maps.items():
                row = {"dataset": dataset.name, "image": sample.id, "mode": mode,
                       "default_mode": mode == default_mode(segmenter.config.input_kind),
                       **score(prob, gt, instances)}  # type: ignore[arg-type]
                if mode in ("confident", "entropy"):  # which input the selection kept for this image
                    row["picked_aug"] = float(np.array_equal(prob, maps["aug"]))
                rows.append(row)
    frame = pd.DataFrame(rows)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        with atomic_path(Path(out) / "metrics.csv") as temporary:
            frame.to_csv(temporary, index=False)
    if "mode" not in frame or frame["mode"].isna().all():
        where = f"; each is a row of {Path(out) / 'metrics.csv'}" if out is not None else ""
        raise InputError(f"{checkpoint}: no image of {split or 'the data sets'} could be scored "
                         f"({len(frame)} failed{where})")
    return frame


def _split_ids(run: Path, side: str) -> dict[str, list[str]]:
    path = run / SPLIT_FILE
    if not path.is_file():
        raise InputError(f"{path}: missing; give --split all to score every image")
    split = json.loads(path.read_text(encoding="utf-8"))
    if any(side not in sides for sides in split.values()):
        raise InputError(f"--split {side!r}: not a side of {path}")
    return {name: sides[side] for name, sides in split.items()}


def predict(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    priors: str | Path | None = None,
    mode: str | None = None,
    show_progress: bool = True,
    device: str | torch.device | None = None,
) -> ItemRunSummary:
    """Write one 0/255 PNG mask per image of ``data`` (masks not needed) to ``out`` on the resumable item loop:
    ``out/results.jsonl`` holds a row per image (an image that cannot be read is an error row and the run goes
    on), ``out/protocol.json`` the checkpoint, mode, priors and image folder (a rerun with others is refused).

    ``mode`` defaults to the model's own: raw, aug, or confident for dual-trained models.
    """
    segmenter = load_segmenter(checkpoint, device)
    mode = mode or default_mode(segmenter.config.input_kind)
    if mode not in PREDICT_MODES:
        raise InputError(f"--mode {mode!r}: choose one of {', '.join(PREDICT_MODES)}")
    if mode != "raw" and not segmenter.uses_priors:
        raise InputError(f"--mode {mode}: the model was trained on raw input only; use --mode raw")
    dataset = load_dataset(data, require_masks=False)
    out = Path(out)
    check_apart(out, dataset.folders, roots=[dataset.root])
    masks = {sample.id: Path(f"{sample.id}.png") for sample in dataset.samples}  # under out
    check_unclaimed_outputs(out, PROTOCOL_FILE, masks.values())
    store = prior_store(segmenter, priors, dataset)
    claim_folder(out, PROTOCOL_FILE, {"task": "samaug predict", "checkpoint_sha256": file_sha256(Path(checkpoint)),
                                      "mode": mode, "priors": None if store is None else store.record["key"],
                                      "images": str(dataset.root.resolve())})  # another folder would overwrite

    def predict_one(item: WorkItem) -> list[dict]:
        maps, _ = predict_sample(segmenter, dataset, item.sample, store)
        path = out / masks[item.sample.id]
        path.parent.mkdir(parents=True, exist_ok=True)  # ids of images in sub-folders hold a '/'
        with atomic_path(path) as temporary:
            Image.fromarray((maps[mode] > 0.5).astype(np.uint8) * 255).save(temporary, format="PNG")
        return [{"dataset": dataset.name, "image": item.sample.id, "mode": mode}]

    # predictions are made from the image alone: without its mask, an edited mask leaves them current
    return run_items([WorkItem(dataset, replace(sample, mask_path=None)) for sample in dataset.samples], predict_one,
                     out / RESULTS_FILE, "predict", show_progress=show_progress,
                     check_done=finished_outputs(out / RESULTS_FILE, masks)[1])
