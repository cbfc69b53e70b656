"""Export a registered model's graphs for :mod:`sam4med.engine.onnx_predictor` (with PyTorch, once per model
and weights): the image encoder (fp32, and its int8 copy), the prompt encoder with the mask decoder, and,
for a model that sends boxes to its base model's decoder, that decoder too; then a manifest naming them
and their sources."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
from segment_anything.modeling import Sam
from segment_anything.utils.onnx import SamOnnxModel

from sam4med.engine.errors import InputError
from sam4med.engine.models import WEIGHTS_DIR, load_model
from sam4med.engine.onnx_encoder import OPSET, ensure_encoder, graph_path
from sam4med.engine.onnx_predictor import BUNDLE_FORMAT, LOW_RES, file_stamp, manifest_path, serves
from sam4med.engine.runs import atomic_path, write_json
from sam4med.engine.sam_model import PromptPath, SamModel


class PromptGraph(SamOnnxModel):
    """segment_anything's ONNX prompt encoder and mask decoder, returning all four low-res logits and their
    predicted IoUs instead of upscaled masks: cutting the image content out of the padded frame takes the
    image's size as Python integers, which tracing would freeze into the graph (the predictor upscales)."""

    def __init__(self, network: Sam, path: PromptPath):
        super().__init__(Sam(network.image_encoder, path.prompt_encoder, path.mask_decoder), return_single_mask=False)

    @torch.no_grad()
    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=self._embed_points(point_coords, point_labels),
            dense_prompt_embeddings=self._embed_masks(mask_input, has_mask_input),
        )


def export_prompt_graph(network: Sam, path: PromptPath, out: Path) -> None:
    """One prompt path as an ONNX graph taking any number of points (SAM's export settings)."""
    embedding_size = path.prompt_encoder.image_embedding_size
    example = (
        torch.zeros(1, path.prompt_encoder.embed_dim, *embedding_size),
        torch.zeros(1, 2, 2),
        torch.tensor([[1.0, -1.0]]),
        torch.zeros(1, 1, LOW_RES, LOW_RES),
        torch.zeros(1),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as temporary, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings of segment_anything's own export code
        torch.onnx.export(PromptGraph(network, path).eval(), example, str(temporary), opset_version=OPSET, dynamo=False,
                          input_names=["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"],
                          output_names=["low_res_logits", "iou_predictions"],
                          dynamic_axes={"point_coords": {1: "points"}, "point_labels": {1: "points"}})


def bundle_sources(model: SamModel) -> list[Path]:
    """The installed files a registered model's weights come from."""
    spec = model.spec
    assert spec.bundled_checkpoint is not None
    sources = [spec.bundled_checkpoint()]
    if spec.prompt_weights:
        sources += [WEIGHTS_DIR / f"{spec.prompt_weights}.json", WEIGHTS_DIR / f"{spec.prompt_weights}.pt"]
    return sources


def export_bundle(model_name: str, folder: Path) -> Path:
    """Export a registered model with bundled weights for the ONNX Runtime predictor; returns the manifest."""
    started = time.perf_counter()
    model = load_model(model_name, device="cpu")
    spec = model.spec
    if not serves(spec):
        raise InputError(f"model '{model_name}': the ONNX Runtime path serves models with bundled weights, "
                         f"a {LOW_RES} px input, longest-side resizing and min-max normalisation; use --runtime torch")
    network = model.network
    encoder = ensure_encoder(network.image_encoder, folder, spec.name, model.weights_sha256, spec.image_size)
    encoder_int8 = ensure_encoder(network.image_encoder, folder, spec.name, model.weights_sha256, spec.image_size, True)
    decoder = graph_path(folder, spec.name, model.weights_sha256, f"decoder-opset{OPSET}")
    export_prompt_graph(network, model.main_path, decoder)
    box_decoder = None
    if model.box_path is not None:
        box_decoder = graph_path(folder, spec.name, model.base_weights_sha256, f"box-decoder-opset{OPSET}")
        export_prompt_graph(network, model.box_path, box_decoder)
    manifest = manifest_path(spec.name, folder)
    write_json(manifest, {
        "format": BUNDLE_FORMAT,
        "model": model.protocol(),
        "default_mask_rule": spec.default_mask_rule,
        "takes_point_prompts": spec.takes_point_prompts,
        "graphs": {"encoder": encoder.name, "encoder_int8": encoder_int8.name, "decoder": decoder.name,
                   "box_decoder": box_decoder and box_decoder.name},
        "sources": [file_stamp(path) for path in bundle_sources(model)],
        "export_seconds": round(time.perf_counter() - started, 2),
    })
    return manifest
