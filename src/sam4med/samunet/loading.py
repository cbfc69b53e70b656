"""Trained SAM-UNet and decoder-fine-tuned checkpoints as engine models, usable wherever a
registered model is (benchmark, segment, SAMAug priors): ``load_model(backbone, checkpoint=best.pt)``.

A checkpoint stores only what was trained and the backbone's name and weights hash; the frozen
parts are rebuilt from the backbone's own weights, which must hash the same. This module's
:func:`load_trained` is the loader of the ``promptable`` checkpoint kind (declared as an entry point,
so the engine finds it without naming this package).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sam4med.engine.checkpoints import file_sha256
from sam4med.engine.errors import InputError
from sam4med.engine.models import load_model
from sam4med.engine.sam_model import Embedding, SamModel
from sam4med.samunet.model import SamUNet
from sam4med.samunet.training import PromptTrainConfig


class SamUNetModel(SamModel):
    """A SamModel whose encoder adds the conv branch and whose decoder reads multi-scale features.

    It has one output mask and no IoU head: predicted IoU is reported as 1, so everything mode
    filters its masks by stability alone. Its embeddings carry the multi-scale features, which the
    on-disk embedding cache does not store, so it is never cached.
    """

    cacheable = False

    def __init__(self, backbone: SamModel, samunet: SamUNet, trained_sha256: str):
        super().__init__(replace(backbone.spec, name=f"{backbone.spec.name}+samunet"), backbone.network,
                         trained_sha256, backbone.device, use_shared_decoder=False)
        self.samunet = samunet.to(backbone.device).eval()
        self.backbone_sha256 = backbone.weights_sha256

    def protocol(self) -> dict[str, object]:
        return {**super().protocol(), "method": "samunet", "backbone_sha256": self.backbone_sha256}

    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> Embedding:
        model_input, geometry = self.preprocess(image)
        with self.autocast():
            embedding, multi_scale = self.samunet.encode(model_input)
        return Embedding(embedding.float(), geometry, extras={"multi_scale": multi_scale.float()})

    def _decode_masks(self, embedding: Embedding, sparse: torch.Tensor, dense: torch.Tensor, has_mask_input: bool,
                      multimask: bool, min_iou: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask per prompt from the multi-scale decoder (``multimask`` and ``min_iou`` do not apply)."""
        low_res = self.samunet.mask_decoder(embedding.features, self.samunet.prompt_encoder.get_dense_pe(), sparse,
                                            dense, embedding.extras["multi_scale"])
        return low_res, torch.ones(len(sparse), 1)


def load_trained(path: Path, saved: dict, device: str | torch.device | None = None) -> SamModel:
    """A trained checkpoint (``saved``, as loaded from ``path``) as a SamModel on its re-verified backbone."""
    config = PromptTrainConfig(**saved["config"])
    backbone = load_model(config.backbone, config.backbone_checkpoint, device)
    if backbone.weights_sha256 != saved["meta"]["backbone_sha256"]:
        raise InputError(f"{path}: trained on {config.backbone} weights {saved['meta']['backbone_sha256'][:12]}..., "
                         f"but {config.backbone_checkpoint or 'the bundled weights'} hash {backbone.weights_sha256[:12]}...")
    trained_sha256 = file_sha256(path)
    if config.method == "decoder":
        result = backbone.network.load_state_dict(saved["weights"], strict=False)
        if result.unexpected_keys:
            raise InputError(f"{path}: keys that do not fit {config.backbone}: {result.unexpected_keys[:3]}")
        return SamModel(replace(backbone.spec, name=f"{backbone.spec.name}+decoder"), backbone.network,
                        trained_sha256, backbone.device)
    network = backbone.network
    samunet = SamUNet(network.image_encoder, network.prompt_encoder, network.mask_decoder, backbone.spec.image_size,
                      config.conv_branch, config.warm_start)
    result = samunet.load_state_dict(saved["weights"], strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("stages.encoder.")]
    if missing or result.unexpected_keys:
        raise InputError(f"{path}: does not fit SAM-UNet on {config.backbone} "
                         f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    return SamUNetModel(backbone, samunet, trained_sha256)
