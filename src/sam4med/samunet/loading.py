"""Trained SAM-UNet and decoder-fine-tuned checkpoints as engine models, usable wherever a
registered model is (benchmark, segment, SAMAug priors): ``load_model(backbone, checkpoint=best.pt)``.

A checkpoint stores only what was trained and the backbone's name and weights hash; the frozen
parts are rebuilt from the backbone's own weights, which must hash the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sam4med.engine.errors import InputError
from sam4med.engine.models import Decoded, Embedding, SamModel, file_sha256, load_model
from sam4med.engine.prompts import Prompt
from sam4med.samunet.model import SamUNet


class SamUNetModel(SamModel):
    """A SamModel whose encoder adds the conv branch and whose decoder reads multi-scale features.

    It has one output mask and no IoU head: predicted IoU is reported as 1, so everything mode
    filters its masks by stability alone. Its embeddings carry the multi-scale features, which the
    on-disk embedding cache does not store, so it is never cached.
    """

    cacheable = False

    def __init__(self, backbone: SamModel, samunet: SamUNet, trained_sha256: str):
        super().__init__(replace(backbone.spec, name=f"{backbone.spec.name}+samunet"), backbone.network,
                         trained_sha256, backbone.device, shared_decoder=False)
        self.samunet = samunet.to(backbone.device).eval()
        self.backbone_sha256 = backbone.weights_sha256

    def protocol(self) -> dict[str, object]:
        return {**super().protocol(), "method": "samunet", "backbone_sha256": self.backbone_sha256}

    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> Embedding:
        model_input, geometry = self.preprocess(image)
        embedding, multi_scale = self.samunet.encode(model_input)
        return Embedding(embedding, geometry, extras={"multi_scale": multi_scale})

    @torch.inference_mode()
    def decode(self, embedding: Embedding, prompts: Sequence[Prompt], mask_input: torch.Tensor | None = None,
               multimask: bool = False, min_iou: float | None = None) -> Decoded:
        """One mask per prompt from the multi-scale decoder (``multimask`` and ``min_iou`` do not apply)."""
        if not prompts:
            raise InputError("decode needs at least one prompt")
        for prompt in prompts:
            prompt.check_inside(embedding.geometry.original_size)
        points, boxes = self._prompt_tensors(prompts, embedding.geometry)
        masks = None if mask_input is None else mask_input.to(self.device, torch.float32)
        sparse, dense = self.samunet.prompt_encoder(points=points, boxes=boxes, masks=masks)
        if sparse.shape[0] != len(prompts):
            sparse = sparse.expand(len(prompts), -1, -1)
        low_res = self.samunet.mask_decoder(embedding.features, self.samunet.prompt_encoder.get_dense_pe(), sparse,
                                            dense, embedding.extras["multi_scale"])
        return Decoded(low_res.float(), torch.ones(len(prompts), 1), embedding.geometry, self)


def load_trained(path: str | Path, saved: dict, device: str | torch.device | None = None) -> SamModel:
    """A trained checkpoint (``saved``, as loaded from ``path``) as a SamModel on its re-verified backbone.

    Called by ``load_model`` when a checkpoint is a training run's, so the file is read once.
    """
    from sam4med.samunet.training import PromptTrainConfig

    path = Path(path)
    if saved["config"].get("method") == "samunet" and "warm_start" not in saved["config"]:
        raise InputError(f"{path}: trained by an earlier SAM-UNet decoder (without SAM's tokens as context); "
                         "train it again")
    config = PromptTrainConfig(**saved["config"])
    backbone = load_model(config.backbone, config.backbone_checkpoint, device)
    if backbone.weights_sha256 != saved["backbone_sha256"]:
        raise InputError(f"{path}: trained on {config.backbone} weights {saved['backbone_sha256'][:12]}..., "
                         f"but {config.backbone_checkpoint or 'the bundled weights'} hash {backbone.weights_sha256[:12]}...")
    trained_sha256 = file_sha256(path)
    if config.method == "decoder":
        result = backbone.network.load_state_dict(saved["state"], strict=False)
        if result.unexpected_keys:
            raise InputError(f"{path}: keys that do not fit {config.backbone}: {result.unexpected_keys[:3]}")
        return SamModel(replace(backbone.spec, name=f"{backbone.spec.name}+decoder"), backbone.network,
                        trained_sha256, backbone.device)
    network = backbone.network
    samunet = SamUNet(network.image_encoder, network.prompt_encoder, network.mask_decoder, backbone.spec.image_size,
                      config.conv_branch, config.warm_start)
    result = samunet.load_state_dict(saved["state"], strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("stages.encoder.")]
    if missing or result.unexpected_keys:
        raise InputError(f"{path}: does not fit SAM-UNet on {config.backbone} "
                         f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    return SamUNetModel(backbone, samunet, trained_sha256)
