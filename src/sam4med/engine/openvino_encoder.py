"""An OpenVINO backend for the image encoder (``--encoder openvino``).

OpenVINO's CPU plugin compiles the graph the ``onnx`` backend exports (``onnx_encoder.ensure_encoder``, one file
per model and weights) into oneDNN kernels chosen for the CPU it runs on. Whether that is faster than ONNX
Runtime depends on the CPU: ``benchmarks/engine.py`` measures both (README, Speed). In fp32 its embedding is
PyTorch's to float rounding (a test holds it to 1e-4), so, like ``onnx``, it is not part of a protocol. With the
model's ``precision="bf16"`` the graph is compiled to compute in bfloat16 where the CPU multiplies it in hardware
(AVX-512 BF16 or AMX; elsewhere in fp32): that changes the embedding, and the protocol records the precision the
compiled graph reports. Compiled graphs are cached under ``$SAM4MED_CACHE/openvino/<precision>``. CPU only.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

from sam4med.engine.errors import InputError
from sam4med.engine.onnx_encoder import ensure_encoder
from sam4med.engine.onnx_predictor import cache_root


def openvino_available() -> bool:
    return find_spec("openvino") is not None


class OpenVinoEncoder:
    """Callable like the PyTorch encoder: (1, 3, S, S) float tensor -> embedding tensor."""

    def __init__(self, encoder: torch.nn.Module, image_size: int, name: str, weights_sha256: str | None,
                 threads: int | None = None, cache_dir: str | Path | None = None, bf16: bool = False):
        if not openvino_available():
            raise InputError("encoder backend 'openvino' needs OpenVINO: pip install openvino")
        import openvino

        root = Path(cache_dir) if cache_dir is not None else cache_root()
        self.path = ensure_encoder(encoder, root / "onnx", name, weights_sha256, image_size)
        core = openvino.Core()
        precision = "bf16" if bf16 else "f32"
        # compiling again from the cache is quicker; one folder per precision, as OpenVINO's cache key leaves the
        # precision hint out (a graph compiled for one, loaded for the other, crashed its first inference)
        core.set_property({"CACHE_DIR": str(root / "openvino" / precision)})
        compiled = core.compile_model(str(self.path), "CPU", {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY",  # one image at a time, every thread on it
        })
        # what the compiled graph computes in, as the plugin reports it (recorded in the protocol)
        self.precision = "bf16" if compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "bf16" else "fp32"
        self.request = compiled.create_infer_request()

    def __call__(self, model_input: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(model_input.detach().cpu().numpy(), dtype=np.float32)
        output = self.request.infer([array])[0]
        return torch.from_numpy(np.array(output, dtype=np.float32))  # a copy: the request reuses its output buffer
