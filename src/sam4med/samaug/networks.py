"""The downstream segmenters SAMAug augments, all from MONAI, in 2D with one output channel (logits).

The paper's U-Net, Attention U-Net and Swin-UNet map to MONAI's ``UNet``, ``AttentionUnet`` and
``SwinUNETR`` (a Swin transformer encoder with a U-Net decoder). ``features`` is the width of the
first level; each of the four downsamplings doubles it.
"""

from __future__ import annotations

import torch
from monai.networks.nets import AttentionUnet, SwinUNETR, UNet

from sam4med.engine.errors import InputError

NETWORKS: tuple[str, ...] = ("unet", "attention_unet", "swin_unet")


def build_network(name: str, in_channels: int, features: int = 16) -> torch.nn.Module:
    """A freshly initialised 2D segmenter taking ``in_channels`` and returning one logit map (patch sizes are
    checked by ``TrainConfig.check``)."""
    channels = tuple(features * 2**level for level in range(5))
    if name == "unet":
        return UNet(spatial_dims=2, in_channels=in_channels, out_channels=1, channels=channels,
                    strides=(2, 2, 2, 2), num_res_units=1)
    if name == "attention_unet":
        return AttentionUnet(spatial_dims=2, in_channels=in_channels, out_channels=1, channels=channels,
                             strides=(2, 2, 2, 2))
    if name == "swin_unet":
        # SwinUNETR's feature size must be a multiple of 12 (its heads); round the width up to one.
        return SwinUNETR(in_channels=in_channels, out_channels=1, spatial_dims=2,
                         feature_size=max(12, -(-features // 12) * 12))
    raise InputError(f"--net {name!r}: choose one of {', '.join(NETWORKS)}")
