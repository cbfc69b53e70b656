"""Click-training checkpoints as engine models, and their export as the weights sam4med ships.

``load_trained`` is the loader of the ``clicks`` checkpoint kind (an entry point, so the engine finds it
without naming this package): ``load_model("litemedsam", checkpoint=RUN/best.pt)`` gives the backbone
with the trained prompt encoder and decoder, which takes clicks.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from sam4med.engine.checkpoints import file_sha256, read_checkpoint, read_trained_checkpoint, write_torch
from sam4med.engine.errors import InputError, check_apart, check_outside_data_sets, path_component
from sam4med.engine.models import base_prompt_path, load_model
from sam4med.engine.registry import model_spec
from sam4med.engine.sam_model import SamModel
from sam4med.engine.runs import CONFIG_FILE, PROTOCOL_FILE, SPLIT_FILE, write_json
from sam4med.engine.training import BEST_FILE, LAST_FILE

# A run folder's own files, which an export into that folder must not replace.
_RUN_FILES = {BEST_FILE, LAST_FILE, CONFIG_FILE, SPLIT_FILE, PROTOCOL_FILE}

CHECKPOINT_KIND = "clicks"


def load_trained(path: Path, saved: dict, device: str | torch.device | None = None) -> SamModel:
    """A click-training checkpoint as a SamModel: its backbone with the trained prompt parts."""
    backbone = load_model(saved["meta"]["backbone"], device=device)
    if backbone.weights_sha256 != saved["meta"]["backbone_sha256"]:
        raise InputError(f"{path}: trained on other {backbone.name} weights than the installed ones")
    box_path = base_prompt_path(backbone.network) if saved["config"].get("base_box_decoder") else None
    result = backbone.network.load_state_dict(saved["weights"], strict=False)
    if result.unexpected_keys:
        raise InputError(f"{path}: keys that do not fit {backbone.name}: {result.unexpected_keys[:3]}")
    # the point grid's thresholds of the shipped click model, trained by the same recipe: SAM's own (0.88,
    # 0.95) fit SAM's IoU head, and with them a click run's grid kept no mask at all
    spec = replace(backbone.spec, name=f"{backbone.name}+clicks", takes_point_prompts=True, default_mask_rule="auto",
                   point_grid_thresholds=model_spec("litemedsam-click").point_grid_thresholds)
    return SamModel(spec, backbone.network, file_sha256(path), backbone.device,
                    base_weights_sha256=backbone.weights_sha256, box_path=box_path)


def export_prompt_weights(checkpoint: str | Path, folder: str | Path, name: str,
                          card: dict[str, object] | None = None, overwrite: bool = False) -> Path:
    """Write a run's prompt encoder and mask decoder as fp16 ``folder/<name>.pt`` with its model card
    ``<name>.json`` (sha256, base weights, training configuration, and what ``card`` adds).

    Other weights already under that name are replaced only with ``overwrite`` (shipping a new version does
    that); exporting the same weights again just rewrites the card."""
    checkpoint, folder = Path(checkpoint), Path(folder)
    path_component(name, "--name")
    if name.lower().endswith((".pt", ".json")):
        raise InputError(f"--name {name}: give the name without its extension (it writes <name>.pt and <name>.json)")
    check_outside_data_sets(folder)
    for written in (folder / f"{name}.pt", folder / f"{name}.json"):
        check_apart(written, [checkpoint], "--out/--name")
        if written.name in _RUN_FILES and (folder / CONFIG_FILE).is_file():
            raise InputError(f"--name {name}: {written} is a file of the training run in {folder}; choose another "
                             "--name or --out")
    saved = read_trained_checkpoint(checkpoint, CHECKPOINT_KIND)
    weights = {key: value.to(torch.float16) if value.is_floating_point() else value
               for key, value in saved["weights"].items()}
    path = folder / f"{name}.pt"
    if (path.exists() or path.with_suffix(".json").exists()) and not _exported_weights(path):
        raise InputError(f"--out {folder}: {name}.pt or {name}.json is not an export of sam4med (a checkpoint, another "
                         "tool's record); nothing is replaced, even with --overwrite: choose another --name or --out")
    if not overwrite and (path.exists() or path.with_suffix(".json").exists()) and not _same_weights(path, weights):
        raise InputError(f"--out {folder}: {name}.pt or {name}.json holds other weights; give --overwrite to replace "
                         "them, or another --name")
    folder.mkdir(parents=True, exist_ok=True)
    write_torch(path, weights)
    write_json(folder / f"{name}.json", {
        "file": path.name, "sha256": file_sha256(path), "dtype": "float16",
        "base_model": saved["meta"]["backbone"], "base_weights_sha256": saved["meta"]["backbone_sha256"],
        "trained_parts": ["prompt_encoder", "mask_decoder"], "epoch": saved["epoch"], "val_dice": saved["val_dice"],
        "config": saved["config"], "training": {k: v for k, v in saved["meta"].items() if k != "embeddings"},
        **(card or {}),
    })
    return path


def _exported_weights(path: Path) -> bool:
    """Whether ``path``'s ``.json`` is a model card this function wrote (it names ``path`` and a sha256), so the
    pair is an export another may replace; anything else under those names (a checkpoint, a data set's or a run's
    record) is left alone."""
    try:
        card = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(card, dict) and card.get("file") == path.name and isinstance(card.get("sha256"), str)


def _same_weights(path: Path, weights: dict[str, torch.Tensor]) -> bool:
    """Whether ``path`` holds exactly ``weights`` (an export repeated); an unreadable file does not."""
    if not path.is_file():
        return False
    try:
        stored = read_checkpoint(path)
    except InputError:
        return False
    return isinstance(stored, dict) and stored.keys() == weights.keys() and all(
        isinstance(stored[key], torch.Tensor) and torch.equal(stored[key], value) for key, value in weights.items())
