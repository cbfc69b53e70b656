"""``load_model``: a registered model with its weights, or a trained sam4med checkpoint on its backbone."""

from __future__ import annotations

from pathlib import Path

import torch

from sam4med.engine.checkpoints import (
    checkpoint_loader,
    file_sha256,
    is_trained_checkpoint,
    read_checkpoint,
    state_dict_of,
)
from sam4med.engine.errors import InputError
from sam4med.engine.registry import model_spec
from sam4med.engine.sam_model import SamModel


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    name: str = "litemedsam",
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    use_shared_decoder: bool = True,
    encoder_backend: str = "torch",
) -> SamModel:
    """Build a registered model and load its weights (bundled ones for LiteMedSAM).

    ``checkpoint`` is the model's published weights, or a sam4med training run's ``best.pt`` /
    ``last.pt``, which the loader registered for its kind rebuilds on its (re-verified) backbone.
    ``use_shared_decoder=False`` decodes with segment_anything's own decoder call (the reference
    path); ``encoder_backend="onnx"`` runs the encoder with ONNX Runtime on CPUs.

    Weights are loaded with ``weights_only=True`` and their sha256 is recorded; bundled weights
    are checked against the published hash. The network is put in ``eval()`` after loading, which
    also makes TinyViT cache its attention biases from the loaded (not the initial) parameters.
    """
    spec = model_spec(name)
    if checkpoint is None:
        if spec.bundled_checkpoint is None:
            raise InputError(f"model '{name}' ships no weights: pass --checkpoint PATH to its .pth file")
        path = spec.bundled_checkpoint()
        sha256 = file_sha256(path)  # checked before the file is unpickled
        expected = spec.expected_sha256() if spec.expected_sha256 else None
        if expected and sha256 != expected:
            raise InputError(f"{path}: sha256 {sha256} differs from the published {expected}")
        saved = read_checkpoint(path)
    else:
        path = Path(checkpoint)
        saved = read_checkpoint(path)
        if is_trained_checkpoint(saved, path):
            assert isinstance(saved, dict)
            if saved.get("meta", {}).get("backbone") != name:
                raise InputError(f"{path}: trained on backbone '{saved.get('meta', {}).get('backbone')}', "
                                 f"not '{name}'")
            return checkpoint_loader(saved["kind"], path)(path, saved, device)
        sha256 = file_sha256(path)
    network = spec.build()
    try:
        network.load_state_dict(state_dict_of(saved, path), strict=True)
    except RuntimeError as error:
        summary = str(error).splitlines()[0] + " " + " ".join(str(error).split())[:300]
        raise InputError(f"{path}: weights do not fit model '{name}': {summary}") from None
    torch_device = torch.device(device) if device is not None else default_device()
    return SamModel(spec, network.eval(), sha256, torch_device, use_shared_decoder, encoder_backend)
