"""A SAM-family network with its preprocessing behind one interface: preprocess, encode, decode.

Every registered model, and every trained checkpoint that a method turns back into a model, is a
:class:`SamModel`; a method that changes the encoder or the decoder subclasses it and overrides
``encode`` or ``_decode_masks``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from segment_anything.modeling import Sam

from sam4med.engine.decoder import ImageState, SharedImageDecoder
from sam4med.engine.decoder import supports as supports_shared_decoding
from sam4med.engine.errors import InputError, check_image_array, missing_package
from sam4med.engine.onnx_encoder import OnnxEncoder
from sam4med.engine.onnx_predictor import onnx_runtime_available, openvino_available
from sam4med.engine.openvino_encoder import OpenVinoEncoder, computes_bf16
from sam4med.engine.preprocessing import (
    ImageGeometry,
    from_model_frame,
    image_geometry,
    normalise,
    pad_to_input,
    resize_content,
)
from sam4med.engine.prompts import Prompt
from sam4med.engine.registry import ModelSpec
from sam4med.engine.runtime import precision_autocast, release_free_memory

ENCODER_BACKENDS = ("torch", "onnx", "onnx-int8", "openvino")


@dataclass
class Embedding:
    """An image's embedding and geometry: computed once, serves every prompt on that image."""

    features: torch.Tensor  # (1, 256, 64, 64)
    geometry: ImageGeometry
    # the shared decoders' per-image work, made on first decode, per prompt path (a model may have two, and
    # models that share an encoder may share an embedding)
    decoder_states: dict[PromptPath, ImageState] = field(default_factory=dict)
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

    def pick(self, pairs: Sequence[tuple[int, int]]) -> Decoded:
        """The outputs ``(prompt, mask)`` of ``pairs`` as a batch of single masks (len(pairs), 1), full-size
        logits not computed yet: what everything mode upscales after its predicted-IoU filter."""
        prompt_index = [b for b, _ in pairs]
        mask_index = [m for _, m in pairs]
        return Decoded(self.low_res[prompt_index, mask_index][:, None], self.iou[prompt_index, mask_index][:, None],
                       self.geometry, self.model)

    @property
    def frame(self) -> tuple[int, int, ImageGeometry]:
        """Where ``low_res`` lies: the corner in the image of the region it was decoded on, and that region's
        geometry (here the whole image)."""
        return 0, 0, self.geometry

    def with_low_res(self, low_res: torch.Tensor) -> Decoded:
        """The same prompts with other low-res logits in the same frame (a merged correction)."""
        return Decoded(low_res, self.iou, self.geometry, self.model)

    def masks(self) -> np.ndarray:
        """Binary masks (B, M, H, W) at the original size. Without logits computed already, each mask is
        upscaled and thresholded in turn: a batch's float logits at full size would outweigh its masks 4x."""
        if self._logits is not None:
            return (self._logits > 0).cpu().numpy()
        batch, count = self.low_res.shape[:2]
        masks = np.empty((batch, count, *self.geometry.original_size), dtype=bool)
        for index in range(batch):
            for output in range(count):
                logits = self.model.upscale(self.low_res[index : index + 1, output : output + 1], self.geometry)
                masks[index, output] = (logits[0, 0] > 0).cpu().numpy()
        return masks


class PromptPath(torch.nn.Module):
    """A prompt encoder and the mask decoder that reads it, with the fast shared decoder when it applies."""

    def __init__(self, prompt_encoder: torch.nn.Module, mask_decoder: torch.nn.Module, use_shared_decoder: bool):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # Same outputs as the reference decoder up to float rounding, several times less work per
        # prompt (see engine.decoder); None decodes with segment_anything's own decoder call.
        self.shared_decoder = SharedImageDecoder(mask_decoder) \
            if use_shared_decoder and supports_shared_decoding(mask_decoder) else None

    def forward(self, features: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor] | None,
                boxes: torch.Tensor | None, mask_input: torch.Tensor | None,
                multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """segment_anything's own (differentiable) prompt encoding and decoding, in the model's input frame."""
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return self.mask_decoder(image_embeddings=features, image_pe=self.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=multimask)


class SamModel:
    """A SAM-family network with its preprocessing: one interface for every registered model.

    ``box_path``: a second prompt encoder and decoder for prompts that are boxes alone (no click, no mask
    input), so that a model trained for clicks on top of a box model keeps that model's box masks exactly.
    """

    cacheable = True  # whether Embedding.features alone can be stored and reused
    # "bf16": PyTorch's encoder and decoders run under bfloat16 autocast (matrix products in bf16, reductions
    # and normalisations in fp32): several times the fp32 GEMM rate on CPUs with AVX-512 BF16 or AMX, masks that
    # differ from fp32's at the edges (benchmarks/precision.py). ONNX Runtime's encoder is not affected.
    precision = "fp32"

    def __init__(self, spec: ModelSpec, network: Sam, weights_sha256: str | None, device: torch.device,
                 use_shared_decoder: bool = True, encoder_backend: str = "torch", base_weights_sha256: str | None = None,
                 box_path: PromptPath | None = None):
        if encoder_backend not in ENCODER_BACKENDS:
            raise InputError(f"--encoder {encoder_backend!r}: choose one of {', '.join(ENCODER_BACKENDS)}")
        # now, not at the first image's encode (on other devices the encoder is PyTorch's)
        if device.type == "cpu" and encoder_backend == "openvino" and not openvino_available():
            raise missing_package("--encoder openvino", "OpenVINO", "openvino")
        if device.type == "cpu" and encoder_backend in ("onnx", "onnx-int8") and not onnx_runtime_available():
            raise missing_package(f"--encoder {encoder_backend}", "ONNX Runtime", "onnxruntime")
        self.spec = spec
        self.network = network.to(device).eval()
        self.weights_sha256 = weights_sha256
        self.base_weights_sha256 = base_weights_sha256  # the bundled weights under sam4med's own prompt weights
        self.device = device
        # ONNX Runtime and OpenVINO run the encoder on CPUs only; made (and exported, once) on the first encode.
        self.encoder_backend = encoder_backend if device.type == "cpu" else "torch"
        self._compiled_encoder: OnnxEncoder | OpenVinoEncoder | None = None
        self.main_path = PromptPath(network.prompt_encoder, network.mask_decoder, use_shared_decoder)
        self.box_path = None if box_path is None else box_path.to(device).eval()

    def __getstate__(self) -> dict[str, object]:
        """Pickled without its ONNX Runtime or OpenVINO encoder (not picklable; made again on the next encode), so
        that a model can be shipped to the actors of a Ray run."""
        return {**self.__dict__, "_compiled_encoder": None}

    @property
    def shared_decoder(self) -> SharedImageDecoder | None:
        return self.main_path.shared_decoder

    @property
    def name(self) -> str:
        return self.spec.name

    def protocol(self) -> dict[str, object]:
        record = {**self.spec.protocol(), "weights_sha256": self.weights_sha256}
        if self.base_weights_sha256:
            record["base_weights_sha256"] = self.base_weights_sha256
        if self.box_path is not None:
            record["box_prompts"] = "base model's prompt encoder and decoder"
        if self.encoder_backend == "onnx-int8":  # fp32 ONNX gives PyTorch's embedding; int8 changes it
            record["encoder"] = "onnx-int8 (dynamic quantisation of MatMul weights, per channel)"
        if self.precision != "fp32" and self.encoder_backend == "openvino":  # its encoder computes in bf16 too
            record["precision"] = (f"{self.precision} (encoder on openvino in {self.encoder_precision()}, "
                                   "decoder under torch autocast)")
        elif self.precision != "fp32":
            record["precision"] = f"{self.precision} autocast (encoder on {self.encoder_backend}, decoder on torch)"
        return record

    def autocast(self) -> torch.autocast:
        """The context PyTorch's encoder and decoders run in: bfloat16 autocast for ``precision="bf16"``."""
        return precision_autocast(self.device.type, self.precision)

    # --- geometry -------------------------------------------------------------------------
    def geometry(self, original_size: tuple[int, int]) -> ImageGeometry:
        return image_geometry(self.spec, original_size)

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, ImageGeometry]:
        """uint8 (H, W, 3) image -> (1, 3, S, S) model input and its geometry."""
        check_image_array(image)
        geometry = self.geometry(image.shape[:2])
        # channel by channel, each made float at once (the same values): a large image as one float tensor was four
        # times its own size, then copied; a copy of each channel before its float one kept the heap from reusing it
        content = torch.cat([resize_content(torch.from_numpy(image[..., c].astype(np.float32)).to(self.device)[None, None],
                                            geometry) for c in range(3)], dim=1)
        content = normalise(content, self.spec)
        return pad_to_input(content, geometry), geometry

    # --- encoder and decoder --------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> Embedding:
        model_input, geometry = self.preprocess(image)
        release_free_memory()  # a large image's float channels, kept by the tuned allocator under the encoder's peak
        if self.encoder_backend != "torch":
            features = self._encoder()(model_input).to(self.device)
        else:
            with self.autocast():
                features = self.network.image_encoder(model_input)
            features = features.float()
        # The encoder's activations (a few hundred MB at its first stage) are free now but kept by the tuned
        # allocator; handed back, the decoders' work of this image does not stack on top of them.
        release_free_memory()
        return Embedding(features, geometry)

    def _encoder(self) -> OnnxEncoder | OpenVinoEncoder:
        """The compiled encoder of a CPU backend, made (and the graph exported, once) on first use."""
        if self._compiled_encoder is None:
            encoder, size = self.network.image_encoder, self.spec.image_size
            if self.encoder_backend == "openvino":
                self._compiled_encoder = OpenVinoEncoder(encoder, size, self.name, self.weights_sha256,
                                                         bf16=self.encoder_precision() == "bf16")
            else:
                self._compiled_encoder = OnnxEncoder(encoder, size, self.name, self.weights_sha256,
                                                     int8=self.encoder_backend == "onnx-int8")
        return self._compiled_encoder

    def encoder_precision(self) -> str:
        """What the OpenVINO encoder computes in: the model's precision where OpenVINO multiplies bf16 on this CPU
        (asked of OpenVINO, which compiles the graph; it may refuse bf16 elsewhere), else fp32. Derived, so that
        recording it compiles nothing."""
        return "bf16" if self.precision == "bf16" and computes_bf16() else "fp32"

    def prompt_tensors(
        self, prompts: Sequence[Prompt], geometry: ImageGeometry
    ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
        """Points (coords, labels) and boxes of prompts of one structure, in the model's input frame."""
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
        points, boxes = self.prompt_tensors(prompts, embedding.geometry)
        masks = None if mask_input is None else mask_input.to(self.device, torch.float32)
        box_only = self.box_path is not None and points is None and boxes is not None and masks is None
        path = self.box_path if box_only else self.main_path
        assert path is not None
        with self.autocast():
            sparse, dense = path.prompt_encoder(points=points, boxes=boxes, masks=masks)
            if sparse.shape[0] != len(prompts):  # a mask-only prompt carries no sparse token
                sparse = sparse.expand(len(prompts), -1, -1)
            if box_only:
                low_res, iou = self._decode_on_path(path, embedding, sparse, dense, False, multimask, min_iou)
            else:
                low_res, iou = self._decode_masks(embedding, sparse, dense, mask_input is not None, multimask, min_iou)
        return Decoded(low_res.float(), iou.float(), embedding.geometry, self)

    def _decode_masks(self, embedding: Embedding, sparse: torch.Tensor, dense: torch.Tensor, has_mask_input: bool,
                      multimask: bool, min_iou: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits (B, M, 256, 256) and predicted IoUs (B, M) from encoded prompts."""
        return self._decode_on_path(self.main_path, embedding, sparse, dense, has_mask_input, multimask, min_iou)

    @staticmethod
    def _decode_on_path(path: PromptPath, embedding: Embedding, sparse: torch.Tensor, dense: torch.Tensor,
                        has_mask_input: bool, multimask: bool, min_iou: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        if path.shared_decoder is None:
            return path.mask_decoder(image_embeddings=embedding.features, image_pe=path.prompt_encoder.get_dense_pe(),
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=multimask)
        if path not in embedding.decoder_states:  # the positional encoding is needed once per image state
            no_mask = path.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            embedding.decoder_states[path] = path.shared_decoder.prepare(embedding.features,
                                                                         path.prompt_encoder.get_dense_pe(), no_mask)
        return path.shared_decoder(embedding.decoder_states[path], sparse, multimask,
                                   dense if has_mask_input else None, min_iou)

    def upscale(self, low_res: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
        """Low-res logits (B, M, 256, 256) -> logits at the original image size."""
        return from_model_frame(low_res, geometry)
