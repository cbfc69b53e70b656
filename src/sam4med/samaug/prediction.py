"""How a trained SAMAug segmenter turns an image into foreground probabilities: raw input, augmented
input, and the rules that combine the two (``PREDICT_MODES``)."""

from __future__ import annotations

import torch
from monai.inferers import sliding_window_inference

from sam4med.engine.errors import InputError
from sam4med.samaug.inputs import compose_input

def probabilities(network: torch.nn.Module, image: torch.Tensor, priors: torch.Tensor | None, policy: str,
                  image_size: int) -> torch.Tensor:
    """The network's foreground probability (h, w) for one image at the working scale, by sliding
    ``image_size`` windows (one window, padded, for a whole-image model). The windows run on the network's
    device; the image and the stitched map stay on the CPU."""
    inputs = compose_input(image[None], None if priors is None else priors[None], policy)  # type: ignore[arg-type]
    device = next(network.parameters()).device
    with torch.inference_mode():
        logits = sliding_window_inference(inputs, (image_size, image_size), sw_batch_size=4, predictor=network,
                                          overlap=0.25, mode="gaussian", sw_device=device, device="cpu")
    return torch.sigmoid(torch.as_tensor(logits))[0, 0]


def confidence(prob: torch.Tensor) -> float:
    """SAMAug's selection criterion: mean distance of the probabilities from 0.5."""
    return float((prob - 0.5).abs().mean())


def combine(raw: torch.Tensor, aug: torch.Tensor, mode: str) -> torch.Tensor:
    """Merge the raw-input and augmented-input probabilities of one image (see ``PREDICT_MODES``)."""
    if mode == "raw":
        return raw
    if mode == "aug":
        return aug
    if mode == "mean":
        return (raw + aug) / 2
    if mode == "confident":
        return aug if confidence(aug) >= confidence(raw) else raw
    if mode == "entropy":
        return aug if mean_entropy(aug) <= mean_entropy(raw) else raw
    raise InputError(f"--mode {mode!r}: choose one of {', '.join(PREDICT_MODES)}")


def mean_entropy(prob: torch.Tensor) -> float:
    """Mean binary entropy (bits) of a probability map; lower is more certain."""
    p = prob.clamp(1e-6, 1 - 1e-6)
    return float((-(p * p.log2() + (1 - p) * (1 - p).log2())).mean())


PREDICT_MODES: tuple[str, ...] = ("raw", "aug", "mean", "confident", "entropy")


def default_mode(input_kind: str) -> str:
    """How a model is used by default: the input it was trained on; dual models pick the confident one."""
    return {"raw": "raw", "samaug": "aug", "dual": "confident"}[input_kind]
