"""``load_model``: a registered model with its weights, or a trained sam4med checkpoint on its backbone."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from segment_anything.modeling import Sam

from sam4med.engine.checkpoints import (
    checkpoint_loader,
    file_sha256,
    is_trained_checkpoint,
    read_checkpoint,
    state_dict_of,
    unpacked,
)
from sam4med.engine.errors import InputError, check_precision
from sam4med.engine.defaults import DEFAULT_MODEL
from sam4med.engine.registry import ModelSpec, model_spec
from sam4med.engine.runtime import native_bf16, tune_allocator
from sam4med.engine.sam_model import PromptPath, SamModel


WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
PROMPT_PARTS = ("prompt_encoder.", "mask_decoder.")


def load_prompt_weights(network: Sam, name: str, folder: Path = WEIGHTS_DIR) -> str:
    """Load sam4med's own trained prompt encoder and mask decoder (``folder/<name>.pt``, fp16) over a
    network, after checking the file against the sha256 in its model card (``<name>.json``)."""
    card_path = folder / f"{name}.json"
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        path, expected = folder / card["file"], card["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{card_path}: model card missing or unreadable ({type(error).__name__}); reinstall sam4med") from None
    sha256 = file_sha256(path) if path.is_file() else "missing"
    if sha256 != expected:
        raise InputError(f"{path}: sha256 {sha256} differs from its model card's {expected}; reinstall sam4med")
    load_prompt_parts(network, path, sha256_checked=True)
    return sha256


def load_prompt_parts(network: Sam, path: Path, sha256_checked: bool = False) -> None:
    """Load a file holding only a prompt encoder and a mask decoder (exported weights, or the
    ``weights`` of a click-training checkpoint) over a network (``sha256_checked``: see ``read_checkpoint``)."""
    saved = read_checkpoint(path, sha256_checked)
    state = saved["weights"] if isinstance(saved, dict) and isinstance(saved.get("weights"), dict) \
        else state_dict_of(saved, path)
    if not state or not all(key.startswith(PROMPT_PARTS) for key in state):
        raise InputError(f"{path}: holds more than a prompt encoder and a mask decoder")
    result = network.load_state_dict({key: value.float() for key, value in state.items()}, strict=False)
    if result.unexpected_keys or any(key.startswith(PROMPT_PARTS) for key in result.missing_keys):
        raise InputError(f"{path}: does not fit the network ({(result.unexpected_keys or result.missing_keys)[:3]})")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``--device`` as a torch device this machine has (None: a GPU where there is one, else the CPU)."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"--device {device!r}: not a device (cpu, cuda, cuda:1, ...)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: this machine has no CUDA GPU that PyTorch can use")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if resolved.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device}: sam4med runs on cpu or cuda")
    return resolved


def load_model(
    name: str = DEFAULT_MODEL,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    use_shared_decoder: bool = True,
    encoder_backend: str = "torch",
    precision: str = "fp32",
    tune_memory: bool = True,
) -> SamModel:
    """Build a registered model and load its weights (bundled ones for LiteMedSAM and LiteMedSAM-click).

    ``checkpoint`` is the model's published weights, or a sam4med training run's ``best.pt`` /
    ``last.pt``, which the loader registered for its kind rebuilds on its (re-verified) backbone.
    ``use_shared_decoder=False`` decodes with segment_anything's own decoder call (the reference
    path); ``encoder_backend="onnx"`` runs the encoder with ONNX Runtime on CPUs; ``precision="bf16"`` runs
    PyTorch's encoder and decoders under bfloat16 autocast (see ``SamModel.precision``).

    Weights are loaded with ``weights_only=True`` and their sha256 is recorded; bundled weights
    are checked against the published hash. The network is put in ``eval()`` after loading, which
    also makes TinyViT cache its attention biases from the loaded (not the initial) parameters.

    On the CPU this also tunes glibc's allocator for the process (``engine.runtime.tune_allocator``), as
    every command line verb does at start-up, so that code calling the library directly is as fast as the
    verbs: without it each of the decoder's large per-call blocks is mapped and zeroed again on every call.
    ``tune_memory=False`` keeps glibc's defaults (the reference path of ``benchmarks/engine.py``).
    """
    spec = model_spec(name)
    check_precision(precision)
    torch_device = resolve_device(device)
    on_cpu = torch_device.type == "cpu"
    if tune_memory and on_cpu:
        tune_allocator()
    model = _load(spec, name, checkpoint, torch_device, use_shared_decoder, encoder_backend)
    model.precision = precision
    if precision == "bf16" and on_cpu and not native_bf16():
        warnings.warn("this CPU has neither AVX-512 BF16 nor AMX: bf16 is emulated and slower than fp32", stacklevel=2)
    return model


def _load(spec: ModelSpec, name: str, checkpoint: str | Path | None, device: torch.device,
          use_shared_decoder: bool, encoder_backend: str) -> SamModel:
    if checkpoint is None:
        if spec.bundled_checkpoint is None:
            raise InputError(f"model '{name}' ships no weights: pass --checkpoint PATH to its .pth file")
        path = spec.bundled_checkpoint()
        sha256 = file_sha256(path)  # checked before the file is unpickled
        expected = spec.expected_sha256() if spec.expected_sha256 else None
        if expected and sha256 != expected:
            raise InputError(f"{path}: sha256 {sha256} differs from the published {expected}")
        saved = read_checkpoint(path, sha256_checked=bool(expected))
    else:
        path = Path(checkpoint)
        saved = read_checkpoint(path)
        if is_trained_checkpoint(saved, path):
            assert isinstance(saved, dict)
            backbone = saved.get("meta", {}).get("backbone")
            if backbone is None:
                try:  # a kind that makes promptable models, whose record lost its backbone
                    checkpoint_loader(saved["kind"], path)
                except InputError:  # a segmenter's or another trainer's checkpoint, not a promptable model's
                    raise InputError(f"{path}: a '{saved['kind']}' checkpoint, not a promptable model's (give a "
                                     "`samunet train` or `clicks train` run's best.pt, or the model's own weights)"
                                     ) from None
                raise InputError(f"{path}: a '{saved['kind']}' checkpoint that does not record the backbone it was "
                                 "trained on (damaged, or not written by sam4med)")
            if backbone != name:
                raise InputError(f"{path}: trained on backbone '{backbone}', not '{name}'; give --model {backbone}")
            loader = checkpoint_loader(saved["kind"], path)
            with unpacked(path):
                return loader(path, saved, device)
        sha256 = file_sha256(path)
    network = spec.build()
    try:
        network.load_state_dict(state_dict_of(saved, path), strict=True)
    except RuntimeError as error:
        summary = " ".join(str(error).split())[:300]
        raise InputError(f"{path}: weights do not fit model '{name}': {summary}") from None
    base_sha256, box_path = None, None
    if spec.prompt_weights is not None and checkpoint is None:  # sam4med's own prompt weights over the bundled ones
        if spec.boxes_by_base_decoder:
            box_path = base_prompt_path(network, use_shared_decoder)
        base_sha256, sha256 = sha256, load_prompt_weights(network, spec.prompt_weights)
    return SamModel(spec, network.eval(), sha256, device, use_shared_decoder, encoder_backend, base_sha256,
                    box_path)


def base_prompt_path(network: Sam, use_shared_decoder: bool = True) -> PromptPath:
    """A frozen copy of a network's prompt encoder and decoder, taken before trained ones replace them."""
    path = PromptPath(copy.deepcopy(network.prompt_encoder), copy.deepcopy(network.mask_decoder), use_shared_decoder)
    return path.eval().requires_grad_(False)
