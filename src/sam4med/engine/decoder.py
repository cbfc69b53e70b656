"""SAM's mask decoder for many prompts on one image: the same function, less work per prompt.

``segment_anything``'s ``MaskDecoder`` copies the image embedding once per prompt and runs every
projection of the 4096 image tokens for every prompt. On a CPU that makes the decoder, not the
encoder, the cost of everything mode and of a benchmark. :class:`SharedImageDecoder` wraps a
decoder (its weights, not a copy of its code) and computes the same outputs with three changes:

1. Work that does not depend on the prompt is done once per image: the image embedding plus the
   dense "no mask" embedding, and the first layer's projections of image tokens (keys and values of
   token-to-image attention, queries of image-to-token attention).
2. Attention between a few prompt tokens (T, about 7) and many image tokens (N = 4096) is
   re-associated so image tokens are never projected per prompt: for token-to-image attention
   ``q (X Wk)^T = (q Wk) X^T`` and ``P (X Wv) = (P X) Wv``; for image-to-token attention the output
   projection is folded into the values, ``P (V Wo) `` instead of ``(P V) Wo``. The key bias adds a
   constant to each softmax row and is dropped; the value bias passes through since rows sum to 1, and
   so does the output bias, added to the folded values. The positional encoding, shared by all prompts,
   is never added to per-prompt image tokens: ``A (X + PE)^T = A X^T + A PE^T``, the second product
   one matrix product over the batch, and residual updates accumulate into the tokens in place.
3. The upscaling (two 2x2 stride-2 transposed convolutions with LayerNorm and GELU) is computed as
   two matrix products in sub-pixel layout, and only the final few mask maps are shuffled to pixels.

Under autocast only the image-token products run in the autocast type; the few prompt tokens stay in
fp32. Outputs equal the reference decoder up to float rounding (a test holds them to it). Mask prompts
(dense embeddings that differ per prompt) and decoders of other classes use the reference path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MaskDecoder
from segment_anything.modeling.transformer import Attention, TwoWayTransformer
from torch import Tensor


def supports(decoder: torch.nn.Module) -> bool:
    """Whether ``decoder`` is exactly SAM's decoder (subclasses may change the computation)."""
    if type(decoder) is not MaskDecoder or type(decoder.transformer) is not TwoWayTransformer:
        return False
    upscaling = list(decoder.output_upscaling)
    return (len(upscaling) == 5 and isinstance(upscaling[1], LayerNorm2d)
            and all(isinstance(upscaling[i], torch.nn.ConvTranspose2d) and upscaling[i].kernel_size == (2, 2)
                    and upscaling[i].stride == (2, 2) for i in (0, 3)))


def _heads(x: Tensor, heads: int) -> Tensor:
    """(..., N, H*d) -> (..., H, N, d)."""
    *lead, n, c = x.shape
    return x.reshape(*lead, n, heads, c // heads).transpose(-3, -2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, d) -> (B, T, H*d)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def _head_weights(linear: torch.nn.Linear, heads: int) -> Tensor:
    """A projection C -> H*d as per-head matrices (H, d, C)."""
    out_features, in_features = linear.weight.shape
    return linear.weight.reshape(heads, out_features // heads, in_features)


REJECTED_LOGIT = -1e4  # logits of a prompt rejected before upscaling: an empty mask, far from any threshold


@dataclass
class ImageState:
    """Prompt-independent tensors of one image (tokens-major, no batch axis)."""

    image: Tensor  # (N, C) image embedding alone, for prompts with their own dense embedding
    keys: Tensor  # (N, C) image embedding + the no-mask dense embedding
    pe: Tensor  # (N, C) positional encoding
    first_k: Tensor  # (H, d, N) layer-0 token-to-image keys, transposed for the products that read them
    first_v: Tensor  # (H, N, d) layer-0 token-to-image values
    first_q: Tensor  # (H, d, N) layer-0 image-to-token queries, transposed likewise
    size: tuple[int, int]


class SharedImageDecoder:
    """Decode B prompts against one image embedding with :class:`MaskDecoder`'s weights."""

    def __init__(self, decoder: MaskDecoder):
        if not supports(decoder):
            raise TypeError(f"{type(decoder).__name__} is not segment_anything's MaskDecoder")
        self.decoder = decoder
        self.transformer: TwoWayTransformer = decoder.transformer  # type: ignore[assignment]

    @torch.inference_mode()
    def prepare(self, image_embedding: Tensor, image_pe: Tensor, no_mask_dense: Tensor) -> ImageState:
        """The per-image work: ``image_embedding`` and ``image_pe`` are (1, C, h, w), ``no_mask_dense``
        the dense embedding of a prompt without a mask input, broadcastable to them."""
        _, c, h, w = image_embedding.shape
        image = image_embedding.reshape(c, h * w).t().contiguous()
        keys = (image_embedding + no_mask_dense).reshape(c, h * w).t().contiguous()
        pe = image_pe.reshape(c, h * w).t().contiguous()
        first = self.transformer.layers[0]
        heads = first.cross_attn_token_to_image.num_heads
        keyed = keys + pe
        return ImageState(
            image=image,
            keys=keys,
            pe=pe,
            first_k=_heads(first.cross_attn_token_to_image.k_proj(keyed), heads).transpose(1, 2).contiguous(),
            first_v=_heads(first.cross_attn_token_to_image.v_proj(keys), heads),
            first_q=_heads(first.cross_attn_image_to_token.q_proj(keyed), heads).transpose(1, 2).contiguous(),
            size=(h, w),
        )

    @torch.inference_mode()
    def __call__(self, state: ImageState, sparse: Tensor, multimask: bool, dense: Tensor | None = None,
                 min_iou: float | None = None) -> tuple[Tensor, Tensor]:
        """Low-res mask logits (B, M, 4h, 4w) and predicted IoU (B, M), as ``MaskDecoder.forward``.

        ``dense`` (B, C, h, w) is given for prompts with a mask input (interactive rounds): their
        first layer cannot use the image's shared projections but still skips the image-sized ones.
        ``min_iou`` rejects early: a prompt none of whose masks reaches that predicted IoU skips the
        upscaling (half the per-prompt work) and gets logits of ``REJECTED_LOGIT`` everywhere.
        """
        decoder = self.decoder
        batch = sparse.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse.to(output_tokens.dtype)], dim=1)
        keys = None if dense is None else state.image + dense.flatten(2).transpose(1, 2)
        # under autocast the per-prompt image tokens (B, N, C) stay in the autocast type from layer to layer: each
        # add, layer norm and cast of them is bound by memory traffic, and fp32 tokens would be cast again by
        # every product that reads them. The few prompt tokens stay fp32 with autocast off: their products are
        # small, and autocast would cast each layer's weights again on every call.
        device = state.keys.device.type
        stream = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else state.keys.dtype
        selected = range(1, decoder.num_mask_tokens) if multimask else range(0, 1)
        with torch.autocast(device, enabled=False):
            queries, keys = self._transformer(state, tokens, keys, stream)
            hyper_in = torch.stack([decoder.output_hypernetworks_mlps[i](queries[:, 1 + i]) for i in selected], dim=1)
            iou = decoder.iou_prediction_head(queries[:, 0])
        iou = iou[:, 1:] if multimask else iou[:, :1]
        if min_iou is None:
            return self._upscaled_masks(keys, hyper_in, state.size), iou
        h, w = state.size
        masks = torch.full((batch, len(selected), 4 * h, 4 * w), REJECTED_LOGIT, dtype=keys.dtype)
        kept = (iou >= min_iou).any(dim=1)
        if kept.any():
            masks[kept] = self._upscaled_masks(keys[kept], hyper_in[kept], state.size).to(masks.dtype)  # bf16 under autocast
        return masks, iou

    # --- transformer -----------------------------------------------------------------------
    def _transformer(self, state: ImageState, point_embedding: Tensor, keys: Tensor | None,
                     stream: torch.dtype) -> tuple[Tensor, Tensor]:
        """``keys`` (B, N, C) are per-prompt image tokens, or None while they are the image's own; image
        tokens are computed in ``stream``, prompt tokens in ``point_embedding``'s type."""
        transformer = self.transformer
        query_pe = point_embedding
        queries = point_embedding
        image_keys, pe = state.keys.to(stream), state.pe.to(stream)
        keys = None if keys is None else keys.to(stream)
        for layer in transformer.layers:
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + query_pe
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)

            q = queries + query_pe
            if keys is None:
                attention = _token_to_shared_image(layer.cross_attn_token_to_image, q, state.first_k, state.first_v)
            else:
                attention = _token_to_image(layer.cross_attn_token_to_image, q, keys, pe)
            queries = layer.norm2(queries + attention)
            queries = layer.norm3(queries + layer.mlp(queries))

            q = queries + query_pe
            if keys is None:
                keys = _image_to_token(layer.cross_attn_image_to_token, None, state.first_q, q, queries, image_keys)
            else:
                keys = _image_to_token(layer.cross_attn_image_to_token, keys, None, q, queries, keys, pe)
            keys = _layer_norm(keys, layer.norm4)
        assert keys is not None
        q = queries + query_pe
        queries = queries + _token_to_image(transformer.final_attn_token_to_image, q, keys, pe)
        return transformer.norm_final_attn(queries), keys

    # --- upscaling ---------------------------------------------------------------------------
    def _upscaled_masks(self, keys: Tensor, hyper_in: Tensor, size: tuple[int, int]) -> Tensor:
        """``hyper_in @ output_upscaling(keys)`` in sub-pixel layout; (B, M, 4h, 4w)."""
        first, norm, act1, second, act2 = self.decoder.output_upscaling
        batch, n, c = keys.shape
        mid, out = first.out_channels, second.out_channels
        # a 2x2 stride-2 transposed convolution is one linear map per input pixel to its 4 sub-pixels
        w1 = first.weight.permute(2, 3, 1, 0).reshape(4 * mid, c)  # ([a1 b1 o], C)
        x = F.linear(keys, w1, first.bias.repeat(4)).reshape(batch, n, 4, mid)
        x = act1(_layer_norm(x, norm))
        w2 = second.weight.permute(2, 3, 1, 0).reshape(4 * out, mid)  # ([a2 b2 o], mid)
        x = act2(F.linear(x, w2, second.bias.repeat(4)).reshape(batch, n, 4, 4, out))
        h, w = size
        masks = torch.einsum("bnpqo,bmo->bmnpq", x, hyper_in.to(x.dtype))  # (B, M, N, [a1 b1], [a2 b2])
        masks = masks.reshape(batch, -1, h, w, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)
        return masks.reshape(batch, -1, 4 * h, 4 * w)


def _layer_norm(x: Tensor, norm: torch.nn.LayerNorm | LayerNorm2d) -> Tensor:
    """``norm`` over the last axis of ``x`` in ``x``'s own type: autocast would run it in fp32, casting the
    tokens there and back (it still accumulates in fp32)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def _token_to_shared_image(attention: Attention, q_in: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Tokens (B, T, C) attend to one image's projected keys (H, d, N) and values (H, N, d).

    The prompts' queries are stacked per head, (H, B*T, d), so the shared keys and values enter each
    product once instead of being broadcast (copied) to every prompt."""
    heads = attention.num_heads
    q = _heads(attention.q_proj(q_in), heads)  # (B, H, T, d)
    batch, _, tokens, d = q.shape
    stacked = q.transpose(0, 1).reshape(heads, batch * tokens, d).to(k.dtype)
    probabilities = torch.softmax((stacked @ k) / math.sqrt(d), dim=-1)  # (H, B*T, N)
    context = (probabilities @ v).reshape(heads, batch, tokens, d).permute(1, 2, 0, 3)  # (B, T, H, d)
    return attention.out_proj(context.reshape(batch, tokens, heads * d).to(q.dtype))


def _with_positions(left: Tensor, image: Tensor, pe: Tensor) -> Tensor:
    """``left @ (image + pe)^T`` for left (B, R, C), per-prompt image tokens (B, N, C) and the shared
    positional encoding (N, C): the encoding's product is one matrix product over all prompts, and
    the tokens-plus-positions sum, an image-sized array per prompt, is never made."""
    left = left.to(image.dtype)
    return (left @ pe.t().to(image.dtype)).baddbmm_(left, image.transpose(1, 2))


def _token_to_image(attention: Attention, q_in: Tensor, image: Tensor, pe: Tensor) -> Tensor:
    """Tokens (B, T, C) attend to per-prompt image tokens (B, N, C) plus positions (keys) and the tokens
    alone (values), without projecting the image tokens."""
    heads = attention.num_heads
    q = _heads(attention.q_proj(q_in), heads)  # (B, H, T, d)
    batch, _, tokens, d = q.shape
    query_keys = torch.einsum("bhtd,hdc->bhtc", q, _head_weights(attention.k_proj, heads)) / math.sqrt(d)
    scores = _with_positions(query_keys.reshape(batch, heads * tokens, -1), image, pe)  # (B, H*T, N)
    context = (torch.softmax(scores, dim=-1) @ image).reshape(batch, heads, tokens, -1).to(q.dtype)  # (B, H, T, C)
    values = torch.einsum("bhtc,hdc->bhtd", context, _head_weights(attention.v_proj, heads))
    values = values + attention.v_proj.bias.reshape(heads, 1, d)
    return attention.out_proj(_merge_heads(values))


def _image_to_token(attention: Attention, image: Tensor | None, q_shared: Tensor | None, k_in: Tensor,
                    v_in: Tensor, residual: Tensor, pe: Tensor | None = None) -> Tensor:
    """Image tokens attend to the prompt tokens (B, T, C); returns ``residual`` plus the update, (B, N, C).

    Queries are either per-prompt image tokens ``image`` (B, N, C) plus ``pe``, projected through the
    product of the query and key weights, or the image's shared projected queries ``q_shared`` (H, d, N).
    A per-prompt ``residual`` is updated in place (the caller's own tokens); a shared one (N, C) is not.
    """
    heads = attention.num_heads
    k = _heads(attention.k_proj(k_in), heads)  # (B, H, T, d)
    v = _heads(attention.v_proj(v_in), heads)
    batch, _, tokens, d = k.shape
    # scores are laid out tokens-major, (B, H, T, N): a softmax over the few tokens then runs along a
    # strided axis, vectorised over the image tokens, not along a contiguous axis of length T (slow)
    if q_shared is not None:
        stacked = k.transpose(0, 1).reshape(heads, batch * tokens, d).to(q_shared.dtype)  # shared queries enter once
        scores = (stacked @ q_shared).reshape(heads, batch, tokens, -1).transpose(0, 1)
    else:
        assert image is not None and pe is not None
        weights = _head_weights(attention.q_proj, heads)  # (H, d, C)
        query_map = torch.einsum("hdc,bhtd->bhtc", weights, k).reshape(batch, heads * tokens, -1)
        bias = torch.einsum("hd,bhtd->bht", attention.q_proj.bias.reshape(heads, d), k).reshape(batch, -1, 1)
        scores = _with_positions(query_map, image, pe).add_(bias.to(image.dtype)).reshape(batch, heads, tokens, -1)
    probabilities = torch.softmax(scores / math.sqrt(d), dim=2).reshape(batch, heads * tokens, -1)
    out_weights = attention.out_proj.weight.reshape(-1, heads, d)  # (C, H, d)
    # the output bias rides on the folded values: each head's probabilities over the tokens sum to 1
    folded = torch.einsum("bhtd,chd->bhtc", v, out_weights) + attention.out_proj.bias / heads
    folded = folded.reshape(batch, heads * tokens, -1).to(residual.dtype)
    probabilities = probabilities.to(residual.dtype).transpose(1, 2)
    if residual.dim() == 2:
        return torch.baddbmm(residual, probabilities, folded)
    return residual.baddbmm_(probabilities, folded)
