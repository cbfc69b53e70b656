"""SAM-UNet (arXiv 2408.09886) on any SAM backbone: a trainable convolutional branch beside the frozen
SAM image encoder, and a mask decoder that reads multi-scale encoder features.

- Convolutional branch: a timm ResNet (randomly initialised: no ImageNet weights offline) on the
  same preprocessed input; its stage outputs are projected to the encoder's token grid and width
  (strided or transposed convolution, 1x1 convolution, LayerNorm, GELU) and added to the tokens
  at the encoder's fusion points. Each projection is scaled by a gate that starts at 0, so training
  starts from the backbone's own features (a ReZero-style choice of ours; the paper adds directly).
- Fusion points: on ViT (SAM, MedSAM) before each global-attention block (2, 5, 8, 11 on ViT-B), as
  the paper; on TinyViT (LiteMedSAM, MobileSAM), which has no global attention, before each of its
  three transformer stages (after the convolutional stage and after each stage's downsampling).
- Multi-scale fusion decoder: the tokens after every fusion stage but the last, and the final
  embedding, are each upscaled 4x (two 2x2 transposed convolutions) to the decoder's mask-feature
  resolution and summed; the sum is added to SAM's upscaled mask features, together with a small
  residual convolutional block on them, and a new output token reads one mask from the result. As in
  HQ-SAM, the new token joins SAM's IoU and mask tokens in the decoder's transformer (they stay as
  context; only the new token's mask is output). SAM's decoder transformer and the prompt encoder
  are trained; the image encoder is frozen but gradients flow through its later blocks to the
  convolutional branch.
- Warm start (ours, default; ``warm_start=False`` for the paper's fresh token): the new token and its
  hypernetwork start as copies of SAM's single-mask token and hypernetwork, and the last layer of
  every added feature path starts at 0, so the untrained network segments as the backbone does
  (within the extra token's effect on attention) instead of from scratch: a few CPU epochs then
  refine the backbone rather than relearn it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP
from torch import Tensor, nn

from sam4med.engine.errors import InputError

CONV_BRANCHES = ("resnet34", "resnet50")


@dataclass(frozen=True)
class FusionPoint:
    """Where conv features enter the encoder: token grid (h, w) and token width."""

    grid: tuple[int, int]
    channels: int


class EncoderStages(nn.Module):
    """A SAM image encoder run stage by stage, so conv features can be added between stages."""

    encoder: nn.Module
    fusion_points: list[FusionPoint]
    map_channels: list[int]  # widths of the maps returned after each fused stage but the last

    def run(self, x: Tensor, fuse: Callable[[int, Tensor], Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The embedding (B, 256, h, w) and the maps (B, C, h, w) after each fused stage but the last.

        ``fuse(i, tokens_as_map)`` returns the map (B, C, h, w) to add at fusion point ``i``.
        """
        raise NotImplementedError


class ViTStages(EncoderStages):
    """SAM's ImageEncoderViT: fusion before every global-attention block (window_size 0)."""

    def __init__(self, encoder: ImageEncoderViT):
        super().__init__()
        self.encoder = encoder
        self.global_blocks = [i for i, block in enumerate(encoder.blocks) if block.window_size == 0]
        grid = encoder.img_size // encoder.patch_embed.proj.stride[0]
        width = encoder.patch_embed.proj.out_channels
        self.fusion_points = [FusionPoint((grid, grid), width) for _ in self.global_blocks]
        self.map_channels = [width] * (len(self.global_blocks) - 1)

    def run(self, x: Tensor, fuse: Callable[[int, Tensor], Tensor]) -> tuple[Tensor, list[Tensor]]:
        encoder = self.encoder
        x = encoder.patch_embed(x)  # (B, h, w, C)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        maps, start = [], 0
        for point, index in enumerate(self.global_blocks):
            for block in encoder.blocks[start:index]:
                x = block(x)
            x = x + fuse(point, x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            x = encoder.blocks[index](x)
            start = index + 1
            if point < len(self.global_blocks) - 1:
                maps.append(x.permute(0, 3, 1, 2))
        for block in encoder.blocks[start:]:
            x = block(x)
        return encoder.neck(x.permute(0, 3, 1, 2)), maps


class TinyViTStages(EncoderStages):
    """TinyViT (LiteMedSAM, MobileSAM): fusion before each transformer stage (layers 1..3)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.fusion_points = [FusionPoint(tuple(layer.input_resolution), layer.dim) for layer in encoder.layers[1:]]
        self.map_channels = [layer.dim for layer in encoder.layers[2:]]  # a stage's output is the next's input

    def run(self, x: Tensor, fuse: Callable[[int, Tensor], Tensor]) -> tuple[Tensor, list[Tensor]]:
        encoder = self.encoder
        x = encoder.layers[0](encoder.patch_embed(x))  # tokens (B, N, C)
        maps = []
        for point, layer in enumerate(encoder.layers[1:]):
            h, w = self.fusion_points[point].grid
            batch, _, channels = x.shape
            as_map = x.transpose(1, 2).reshape(batch, channels, h, w)
            x = x + fuse(point, as_map).flatten(2).transpose(1, 2)
            x = layer(x)
            if point < len(self.fusion_points) - 1:
                side = int(round(x.shape[1] ** 0.5))
                maps.append(x.transpose(1, 2).reshape(batch, -1, side, side))
        side = int(round(x.shape[1] ** 0.5))
        return encoder.neck(x.transpose(1, 2).reshape(x.shape[0], -1, side, side)), maps


def encoder_stages(encoder: nn.Module) -> EncoderStages:
    if isinstance(encoder, ImageEncoderViT):
        return ViTStages(encoder)
    if hasattr(encoder, "layers") and all(hasattr(layer, "input_resolution") for layer in encoder.layers[1:]):
        return TinyViTStages(encoder)
    raise InputError(f"SAM-UNet: no stage adapter for a {type(encoder).__name__} image encoder")


class ConvToTokens(nn.Module):
    """A conv feature map (B, C_in, s, s) -> a token map (B, C, h, w), gated (gate starts at 0)."""

    def __init__(self, in_channels: int, in_size: int, point: FusionPoint):
        super().__init__()
        out_size = point.grid[0]
        if in_size > out_size:
            stride = in_size // out_size
            resample: nn.Module = nn.Conv2d(in_channels, in_channels, stride, stride)
        elif in_size < out_size:
            stride = out_size // in_size
            resample = nn.ConvTranspose2d(in_channels, in_channels, stride, stride)
        else:
            resample = nn.Identity()
        self.project = nn.Sequential(resample, nn.Conv2d(in_channels, point.channels, 1),
                                     LayerNorm2d(point.channels), nn.GELU())
        self.size = point.grid
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, features: Tensor) -> Tensor:
        out = self.project(features)
        if tuple(out.shape[-2:]) != self.size:  # non-power-of-two ratios
            out = F.interpolate(out, size=self.size, mode="bilinear", align_corners=False)
        return self.gate * out


def zero_last_layer(path: nn.Sequential) -> None:
    """Start a residual feature path at 0 (its last layer's weight and bias)."""
    nn.init.zeros_(path[-1].weight)
    nn.init.zeros_(path[-1].bias)


def _upscale_4x(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, 64, 2, 2), LayerNorm2d(64), nn.GELU(),
        nn.ConvTranspose2d(64, out_channels, 2, 2),
    )


class MultiScaleMaskDecoder(nn.Module):
    """SAM's decoder with one new output token and multi-scale features added to its mask features."""

    def __init__(self, decoder: MaskDecoder, warm_start: bool = True):
        super().__init__()
        self.sam = decoder
        dim = decoder.transformer_dim
        self.feature_channels = dim // 8
        self.output_token = nn.Embedding(1, dim)
        self.hypernetwork = MLP(dim, dim, self.feature_channels, 3)
        self.mask_features = nn.Sequential(
            nn.Conv2d(self.feature_channels, dim // 4, 3, padding=1), LayerNorm2d(dim // 4), nn.GELU(),
            nn.Conv2d(dim // 4, self.feature_channels, 3, padding=1),
        )
        if warm_start:  # SAM's single-mask output (token 0, hypernetwork 0) is the starting point
            with torch.no_grad():
                self.output_token.weight.copy_(decoder.mask_tokens.weight[:1])
            self.hypernetwork.load_state_dict(decoder.output_hypernetworks_mlps[0].state_dict())
            zero_last_layer(self.mask_features)

    def forward(self, embedding: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor,
                multi_scale: Tensor) -> Tensor:
        """Mask logits (P, 1, 4h, 4w) for P prompts on one image (embedding (1, C, h, w))."""
        prompts = sparse.shape[0]
        output_tokens = torch.cat([self.output_token.weight, self.sam.iou_token.weight, self.sam.mask_tokens.weight])
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(prompts, -1, -1), sparse], dim=1)
        src = embedding.expand(prompts, -1, -1, -1) + dense
        pos = image_pe.expand(prompts, -1, -1, -1)
        batch, channels, h, w = src.shape
        hs, src = self.sam.transformer(src, pos, tokens)
        upscaled = self.sam.output_upscaling(src.transpose(1, 2).reshape(batch, channels, h, w))
        features = upscaled + self.mask_features(upscaled) + multi_scale
        hyper = self.hypernetwork(hs[:, 0]).unsqueeze(1)  # (P, 1, C')
        return (hyper @ features.flatten(2)).reshape(prompts, 1, *features.shape[-2:])


class SamUNet(nn.Module):
    """The SAM-UNet network around a SAM backbone's modules (which it reuses, not copies)."""

    def __init__(self, image_encoder: nn.Module, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder,
                 image_size: int, conv_branch: str = "resnet34", warm_start: bool = True):
        super().__init__()
        if conv_branch not in CONV_BRANCHES:
            raise InputError(f"--conv-branch {conv_branch!r}: choose one of {', '.join(CONV_BRANCHES)}")
        self.stages = encoder_stages(image_encoder)
        for parameter in image_encoder.parameters():
            parameter.requires_grad_(False)
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = MultiScaleMaskDecoder(mask_decoder, warm_start)
        points = self.stages.fusion_points
        self.conv_branch = timm.create_model(conv_branch, pretrained=False, features_only=True,
                                             out_indices=tuple(range(1, 1 + len(points))))
        reductions = self.conv_branch.feature_info.reduction()
        channels = self.conv_branch.feature_info.channels()
        self.fusions = nn.ModuleList(ConvToTokens(c, image_size // r, p) for c, r, p in zip(channels, reductions, points))
        feature_channels = self.mask_decoder.feature_channels
        self.bridges = nn.ModuleList(_upscale_4x(width, feature_channels) for width in self.stages.map_channels)
        self.embedding_upscale = _upscale_4x(mask_decoder.transformer_dim, feature_channels)
        if warm_start:
            for path in (self.embedding_upscale, *self.bridges):
                zero_last_layer(path)

    def train(self, mode: bool = True) -> SamUNet:
        """The frozen image encoder stays in eval mode: its BatchNorm layers keep the statistics it was trained
        with (in training mode each step's images would replace them, and move its running statistics) and its
        dropout stays off, so it computes in training what it computes at inference."""
        super().train(mode)
        self.stages.encoder.eval()
        return self

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Preprocessed images (B, 3, S, S) -> embeddings (B, 256, h, w) and multi-scale features
        (B, 32, 4h, 4w)."""
        conv_features = self.conv_branch(images)
        embedding, maps = self.stages.run(images, lambda i, _: self.fusions[i](conv_features[i]))
        multi_scale = self.embedding_upscale(embedding)
        for bridge, feature_map in zip(self.bridges, maps):
            up = bridge(feature_map)
            if up.shape[-2:] != multi_scale.shape[-2:]:
                up = F.interpolate(up, size=multi_scale.shape[-2:], mode="bilinear", align_corners=False)
            multi_scale = multi_scale + up
        return embedding, multi_scale

    def decode(self, embedding: Tensor, multi_scale: Tensor, boxes: Tensor | None = None,
               points: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Low-res logits (P, 1, 4h, 4w) for the prompts of one image (embedding (1, C, h, w))."""
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        return self.mask_decoder(embedding, self.prompt_encoder.get_dense_pe(), sparse, dense, multi_scale)
