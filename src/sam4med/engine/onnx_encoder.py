"""An optional ONNX Runtime backend for the image encoder (``pip install onnxruntime``).

The encoder is exported once per model and weights (PyTorch's TorchScript exporter, opset 17) to
``$SAM4MED_CACHE`` (default ``~/.cache/sam4med``)/onnx and then run by ONNX Runtime, whose fused CPU
kernels are faster than eager PyTorch for TinyViT on a few cores. The embedding matches PyTorch's to
float rounding (a test holds it to 1e-4). CPU only; on CUDA the PyTorch path is used.

``onnx-int8`` runs a copy whose MatMul weights are int8 (ONNX Runtime's dynamic quantisation, per
channel, activations quantised on the fly): no calibration data, made in about a second from the fp32
graph. Its convolutions stay fp32: with 8-bit activations TinyViT's first convolutions alone moved the
embedding far enough to cost box Dice. It changes the embedding (the protocol records it) and is opt-in
(figures in the README).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from sam4med.engine.errors import missing_package
from sam4med.engine.onnx_predictor import cache_root, onnx_runtime_available
from sam4med.engine.runs import atomic_path

OPSET = 17


def graph_path(folder: Path, name: str, weights_sha256: str | None, part: str) -> Path:
    """Where an exported graph lives: one file per model, weights and part (encoder size and precision, decoder)."""
    return folder / f"{name}-{(weights_sha256 or 'unhashed')[:16]}-{part}.onnx"


def encoder_path(folder: Path, name: str, weights_sha256: str | None, image_size: int, int8: bool = False) -> Path:
    return graph_path(folder, name, weights_sha256, f"{image_size}px-opset{OPSET}{'-int8' if int8 else ''}")


def quantise_encoder(fp32: Path, out: Path) -> None:
    """The int8 copy of an exported encoder (see the module's docstring), written atomically."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the graph: measured, no faster here
    try:
        with atomic_path(out) as temporary:
            quantize_dynamic(fp32, temporary, op_types_to_quantize=["MatMul"], per_channel=True,
                             weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)


def ensure_encoder(encoder: torch.nn.Module, folder: Path, name: str, weights_sha256: str | None, image_size: int,
                   int8: bool = False) -> Path:
    """The exported encoder's path, exporting (and quantising) first where it is missing."""
    fp32 = encoder_path(folder, name, weights_sha256, image_size)
    if not fp32.is_file():
        export_encoder(encoder, image_size, fp32)
    if not int8:
        return fp32
    quantised = encoder_path(folder, name, weights_sha256, image_size, int8=True)
    if not quantised.is_file():
        quantise_encoder(fp32, quantised)
    return quantised


class OnnxEncoder:
    """Callable like the PyTorch encoder: (1, 3, S, S) float tensor -> embedding tensor."""

    def __init__(self, encoder: torch.nn.Module, image_size: int, name: str, weights_sha256: str | None,
                 threads: int | None = None, cache_dir: str | Path | None = None, int8: bool = False):
        if not onnx_runtime_available():
            raise missing_package("encoder backend 'onnx'", "ONNX Runtime", "onnxruntime")
        import onnxruntime

        folder = Path(cache_dir) if cache_dir is not None else cache_root() / "onnx"
        self.path = ensure_encoder(encoder, folder, name, weights_sha256, image_size, int8)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's arena and planned memory pattern held about 710 MB after three 256 px encodes
        # against 455 MB without them, at the same speed here: memory is what a long run is bounded by
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        if len(inputs) != 1:  # e.g. exported under a tracing mode that folded the input away
            self.path.unlink(missing_ok=True)
            raise RuntimeError(f"{self.path}: exported graph has {len(inputs)} inputs, expected 1; removed")
        self.input_name = inputs[0].name

    def __call__(self, model_input: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(model_input.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def export_encoder(encoder: torch.nn.Module, image_size: int, path: Path) -> None:
    """Export with a fixed (1, 3, S, S) input, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, image_size, image_size)
    with atomic_path(path) as temporary, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes (fixed here)
        torch.onnx.export(encoder, (example,), str(temporary), opset_version=OPSET, dynamo=False,
                          input_names=["image"], output_names=["embedding"])
