"""An OpenVINO backend for the image encoder (``--encoder openvino``).

OpenVINO's CPU plugin compiles the graph the ``onnx`` backend exports (``onnx_encoder.ensure_encoder``, one file
per model and weights) into oneDNN kernels chosen for the CPU it runs on. Whether that is faster than ONNX
Runtime depends on the CPU: ``benchmarks/engine.py`` measures both (README, Speed). In fp32 its embedding is
PyTorch's to float rounding (a test holds it to 1e-4), so, like ``onnx``, it is not part of a protocol. With the
model's ``precision="bf16"`` the graph is compiled to compute in bfloat16 where the CPU multiplies it in hardware
(AVX-512 BF16 or AMX; elsewhere in fp32): that changes the embedding, and the protocol records the precision the
graph is compiled for (a graph the plugin compiled otherwise is refused). Compiled graphs are cached under ``$SAM4MED_CACHE/openvino/<precision>``. CPU only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sam4med.engine.errors import missing_package
from sam4med.engine.onnx_predictor import cache_root, openvino_available

if TYPE_CHECKING:  # not imported at run time: the ONNX Runtime path of ``segment`` compiles with it without PyTorch
    import torch


def compile_encoder(path: Path, threads: int | None, bf16: bool, cache_dir: Path | None = None):  # noqa: ANN201
    """An exported encoder graph compiled for this CPU (an ``openvino.CompiledModel``), in the precision asked for or
    not at all; ``threads=None``: OpenVINO's choice."""
    if not openvino_available():
        raise missing_package("encoder backend 'openvino'", "OpenVINO", "openvino")
    import openvino

    precision = "bf16" if bf16 else "f32"
    core = openvino.Core()
    # compiling again from the cache is quicker; one folder per precision, as OpenVINO's cache key leaves the
    # precision hint out (a graph compiled for one, loaded for the other, crashed its first inference)
    core.set_property({"CACHE_DIR": str((cache_dir or cache_root()) / "openvino" / precision)})
    settings: dict[str, object] = {"INFERENCE_PRECISION_HINT": precision,
                                   "PERFORMANCE_HINT": "LATENCY"}  # one image at a time, every thread on it
    if threads:
        settings["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(str(path), "CPU", settings)
    computed = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    if computed != precision:  # the protocol records the precision asked for
        raise RuntimeError(f"{path}: OpenVINO compiled the encoder for {computed}, not the {precision} asked for")
    return compiled


def computes_bf16() -> bool:
    """Whether OpenVINO multiplies bfloat16 on this CPU (AVX-512 BF16 or AMX); asked of OpenVINO itself, so that the
    ONNX Runtime path need not import PyTorch to know."""
    if not openvino_available():
        raise missing_package("--runtime openvino", "OpenVINO", "openvino")
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoEncoder:
    """Callable like the PyTorch encoder: (1, 3, S, S) float tensor -> embedding tensor."""

    def __init__(self, encoder: torch.nn.Module, image_size: int, name: str, weights_sha256: str | None,
                 threads: int | None = None, cache_dir: str | Path | None = None, bf16: bool = False):
        import torch

        from sam4med.engine.onnx_encoder import ensure_encoder

        root = Path(cache_dir) if cache_dir is not None else cache_root()
        self.path = ensure_encoder(encoder, root / "onnx", name, weights_sha256, image_size)
        self.request = compile_encoder(self.path, threads or torch.get_num_threads(), bf16, root).create_infer_request()

    def __call__(self, model_input: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.from_numpy(run_encoder(self.request, model_input.detach().cpu().numpy()))


def run_encoder(request, pixels: np.ndarray) -> np.ndarray:  # noqa: ANN001 - an openvino.InferRequest
    """The embedding of a (1, 3, S, S) input, as a float32 array of its own (the request reuses its output buffer)."""
    output = request.infer([np.ascontiguousarray(pixels, dtype=np.float32)])[0]
    return np.array(output, dtype=np.float32)
