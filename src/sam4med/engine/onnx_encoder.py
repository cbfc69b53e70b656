"""An optional ONNX Runtime backend for the image encoder (``pip install onnxruntime``).

The encoder is exported once per model and weights (PyTorch's TorchScript exporter, opset 17) to
``$SAM4MED_CACHE`` (default ``~/.cache/sam4med``)/onnx and then run by ONNX Runtime, whose fused CPU
kernels are faster than eager PyTorch for TinyViT on a few cores. The embedding matches PyTorch's to
float rounding (a test holds it to 1e-4). CPU only; on CUDA the PyTorch path is used.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from sam4med.engine.errors import InputError
from sam4med.engine.onnx_predictor import cache_root, onnx_runtime_available

OPSET = 17


def encoder_path(folder: Path, name: str, weights_sha256: str | None, image_size: int) -> Path:
    """Where a model's exported encoder lives: one file per model, weights and input size."""
    return folder / f"{name}-{(weights_sha256 or 'unhashed')[:16]}-{image_size}px-opset{OPSET}.onnx"


class OnnxEncoder:
    """Callable like the PyTorch encoder: (1, 3, S, S) float tensor -> embedding tensor."""

    def __init__(self, encoder: torch.nn.Module, image_size: int, name: str, weights_sha256: str | None,
                 threads: int | None = None, cache_dir: str | Path | None = None):
        if not onnx_runtime_available():
            raise InputError("encoder backend 'onnx' needs onnxruntime: pip install onnxruntime")
        import onnxruntime

        folder = Path(cache_dir) if cache_dir is not None else cache_root() / "onnx"
        self.path = encoder_path(folder, name, weights_sha256, image_size)
        if not self.path.is_file():
            export_encoder(encoder, image_size, self.path)
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
    """Export with a fixed (1, 3, S, S) input; written to a temporary name, then moved into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    example = torch.zeros(1, 3, image_size, image_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes (fixed here)
        torch.onnx.export(encoder, (example,), str(temporary), opset_version=OPSET, dynamo=False,
                          input_names=["image"], output_names=["embedding"])
    os.replace(temporary, path)
