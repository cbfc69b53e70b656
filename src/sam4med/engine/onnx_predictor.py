"""A predictor on ONNX Runtime alone: prompts to masks without importing PyTorch.

A fresh ``sam4med segment`` spends most of its time importing PyTorch, torchvision, timm and MONAI, not
segmenting. This predictor runs a model's exported graphs (``engine.onnx_bundle`` writes them once per
model and weights, with PyTorch) with NumPy and Pillow around them, so a process that segments one image
imports neither. It reproduces :class:`sam4med.engine.predictor.Predictor` (same preprocessing, prompt
routing and upscaling; a test holds the masks equal) for the registered models whose graphs it can run:
those resized along the longest side, min-max normalised, with a 256 px input.

The graphs and a manifest live in ``$SAM4MED_CACHE`` (default ``~/.cache/sam4med``)/onnx. The manifest
records the files the graphs were made from (path, size, modification time); a changed or moved file
makes the graphs stale, and they are exported again.
"""

from __future__ import annotations

import json
import os
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from PIL import Image

from sam4med.engine.errors import InputError, check_image_array, missing_package
from sam4med.engine.prompts import Prompt
from sam4med.engine.registry import ModelSpec
from sam4med.engine.runtime import release_free_memory

BUNDLE_FORMAT = 2  # raised whenever what the exporter writes changes, so older bundles are exported again
LOW_RES = 256  # the decoder's logits side, and the one input size this predictor serves


def cache_root() -> Path:
    return Path(os.environ.get("SAM4MED_CACHE", Path.home() / ".cache" / "sam4med"))


def onnx_runtime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def openvino_available() -> bool:
    return find_spec("openvino") is not None


def serves(spec: ModelSpec) -> bool:
    """Whether this predictor runs a registered model: bundled weights, the 256 px input it upscales from,
    longest-side resizing and min-max normalisation."""
    return spec.bundled_checkpoint is not None and spec.image_size == LOW_RES and spec.resize == "longest_side" \
        and spec.normalisation == "minmax"


RUNTIMES = ("auto", "onnx", "openvino", "torch")


def choose_runtime(runtime: str, spec: ModelSpec, checkpoint: object = None, device: str | None = None,
                   tile: int | None = None, precision: str = "fp32") -> str:
    """``onnx``, ``openvino`` or ``torch`` for a one-image command. ``onnx`` runs the exported graphs on ONNX Runtime
    alone; ``openvino`` the same graphs with the encoder compiled by OpenVINO (the same embedding, faster where
    ``benchmarks/startup.py`` measured it; with ``precision="bf16"`` in bfloat16, the decoders staying fp32). ``auto``
    takes ``onnx`` wherever it serves the request (a registered model it runs, no --checkpoint, the CPU, whole images,
    fp32) and PyTorch elsewhere."""
    if runtime not in RUNTIMES:
        raise InputError(f"--runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if runtime in ("onnx", "openvino") and not onnx_runtime_available():
        raise missing_package(f"--runtime {runtime}", "ONNX Runtime", "onnxruntime")
    if runtime == "openvino" and not openvino_available():
        raise missing_package("--runtime openvino", "OpenVINO", "openvino")
    blockers = [reason for reason, present in (
        (f"model '{spec.name}' (it serves {LOW_RES} px longest-side min-max models with bundled weights)", not serves(spec)),
        ("--checkpoint", checkpoint is not None),
        (f"--device {device}", device not in (None, "cpu")),
        ("--tile", bool(tile)),
        (f"--precision {precision} (PyTorch's autocast, or --runtime openvino's encoder)",
         precision != "fp32" and runtime != "openvino"),
        ("ONNX Runtime, which is not installed", not onnx_runtime_available()),
    ) if present]
    if runtime in ("onnx", "openvino") and blockers:
        raise InputError(f"--runtime {runtime}: not with {blockers[0]}; use --runtime torch")
    if runtime == "auto":
        return "torch" if blockers else "onnx"
    return runtime


def check_encoder_graph(int8: bool, openvino: bool) -> None:
    """The int8 encoder is a graph of ONNX Runtime's own quantisation; OpenVINO compiles the fp32 one."""
    if int8 and openvino:
        raise InputError("--int8 is ONNX Runtime's int8 graph: not with --runtime openvino")


def manifest_path(model_name: str, folder: Path | None = None) -> Path:
    return (folder or cache_root() / "onnx") / f"{model_name}.json"


def file_stamp(path: Path) -> dict[str, object]:
    """What tells a source file changed, without hashing it on every start."""
    status = path.stat()
    return {"path": str(path.resolve()), "size": status.st_size, "mtime_ns": status.st_mtime_ns}


def current_manifest(model_name: str, folder: Path | None = None) -> dict | None:
    """The model's manifest if its graphs are there and were made from the files now installed, else None."""
    path = manifest_path(model_name, folder)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != BUNDLE_FORMAT:
            return None
        for source in manifest["sources"]:
            if file_stamp(Path(source["path"])) != source:
                return None
        if not all((path.parent / name).is_file() for name in manifest["graphs"].values() if name):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest


def longest_side_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    """(h, w) of an image scaled so that its longer side is ``side``, rounded as segment_anything rounds, and at
    least 1 px (a strip a few pixels wide would otherwise round to nothing)."""
    scale = side / max(size)
    return max(1, int(size[0] * scale + 0.5)), max(1, int(size[1] * scale + 0.5))


def model_input(image: np.ndarray, side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 (H, W, 3) -> the (1, 3, side, side) float32 input (antialiased bilinear resize of the longer side
    to ``side``, min-max to [0, 1], zero padding at the bottom and right) and the content's (h, w).

    Pillow's float resize is the filter PyTorch's ``antialias=True`` was written to reproduce."""
    check_image_array(image)
    height, width = longest_side_size(image.shape[:2], side)
    # each channel becomes a float image inside Pillow ("L" to "F" is exact), without a float copy in NumPy too
    content = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c])).convert("F")
                                   .resize((width, height), Image.Resampling.BILINEAR)) for c in range(3)])
    low, high = content.min(), content.max()
    content = (content - low) / max(high - low, 1e-8)
    framed = np.zeros((1, 3, side, side), dtype=np.float32)
    framed[0, :, :height, :width] = content
    return framed, (height, width)


def _linear_taps(size_out: int, size_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows (or columns) and weights of bilinear resizing without antialiasing, half-pixel centres
    (PyTorch's ``interpolate(mode="bilinear", align_corners=False)``)."""
    source = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    first = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
    second = np.minimum(first + 1, size_in - 1)
    return first, second, (source - first).astype(np.float32)


STRIP_PIXELS = 1 << 22  # output pixels a plane is resized in at once


def resize_bilinear(planes: np.ndarray, size: tuple[int, int], above: float | None = None) -> np.ndarray:
    """(M, h, w) float -> (M, H, W), separably, as the PyTorch path upscales logits; with ``above``, the masks
    ``> above`` instead. Made in strips of rows: on a large image (12000 px) image-sized float temporaries
    were several times the result."""
    top, bottom, fy = _linear_taps(size[0], planes.shape[1])
    left, right, fx = _linear_taps(size[1], planes.shape[2])
    result = np.empty((planes.shape[0], *size), dtype=np.float32 if above is None else bool)
    step = max(1, STRIP_PIXELS // size[1])
    for y0 in range(0, size[0], step):
        rows = slice(y0, y0 + step)
        strip = planes[:, top[rows]] * (1 - fy[rows])[:, None] + planes[:, bottom[rows]] * fy[rows][:, None]
        strip = strip[:, :, left] * (1 - fx) + strip[:, :, right] * fx
        result[:, rows] = strip if above is None else strip > above
    return result


class OnnxPredictor:
    """Holds one image's embedding and decodes prompts against it, on ONNX Runtime (``segment.PromptMasks``).

    Made with :func:`onnx_predictor`, which exports the graphs first when they are missing or stale."""

    def __init__(self, manifest: dict, folder: Path, threads: int | None = None, int8: bool = False,
                 openvino: bool = False, bf16: bool = False):
        import onnxruntime

        self.options = onnxruntime.SessionOptions()
        self.options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's choice, one per physical core
        self.threads = threads
        # the memory arena: a fifth off the first encode, for a few hundred MB that a short process can spare
        # (the long-running encoder of engine.onnx_encoder goes without it)
        self.folder, self.graphs = folder, manifest["graphs"]
        self.model_name: str = manifest["model"]["model"]
        self.openvino, self.bf16 = openvino, False
        self._decoders: dict[str, object] = {}
        self.protocol: dict[str, object] = manifest["model"]
        if int8:
            self.protocol = {**self.protocol, "encoder": "onnx-int8"}
        if bf16:  # an embedding of its own where the CPU computes it (fp32 OpenVINO gives ONNX Runtime's)
            from sam4med.engine.openvino_encoder import computes_bf16

            self.bf16 = computes_bf16()
            self.protocol = {**self.protocol, "precision": f"bf16 (encoder on openvino in "
                                                            f"{'bf16' if self.bf16 else 'fp32'}, decoders fp32)"}
        # the encoder: ONNX Runtime's session, or OpenVINO's request on the same graph (the same embedding in fp32)
        self.encoder = self._graph("encoder_int8" if int8 else "encoder", openvino)
        self.default_mask_rule: str = manifest["default_mask_rule"]
        self.takes_point_prompts: bool = manifest["takes_point_prompts"]
        self.image_size: int = int(self.protocol["image_size"])  # type: ignore[call-overload]
        self.image: np.ndarray | None = None
        self.features: np.ndarray | None = None
        self.resized: tuple[int, int] = (0, 0)

    def _graph(self, graph: str, openvino: bool = False):  # noqa: ANN202
        """A graph's ONNX Runtime session (or, ``openvino``, an OpenVINO infer request on it); a damaged file (either
        runtime raises its own types) is exported again, once."""
        import onnxruntime

        def load():  # noqa: ANN202
            path = self.folder / self.graphs[graph]
            if openvino:
                from sam4med.engine.openvino_encoder import compile_encoder

                return compile_encoder(path, self.threads, bf16=self.bf16).create_infer_request()
            return onnxruntime.InferenceSession(str(path), self.options, providers=["CPUExecutionProvider"])
        try:
            return load()
        except Exception:
            from sam4med.engine.onnx_bundle import export_bundle

            (self.folder / self.graphs[graph]).unlink(missing_ok=True)
            self.graphs = json.loads(export_bundle(self.model_name, self.folder).read_text(encoding="utf-8"))["graphs"]
            return load()

    def _decoder(self, graph: str):  # noqa: ANN202 - made on first use: a box alone never needs the other
        if graph not in self._decoders:
            self._decoders[graph] = self._graph(graph)
        return self._decoders[graph]

    def set_image(self, image: np.ndarray) -> None:
        """Encode ``image``; a no-op for the image already set."""
        if image is self.image and self.features is not None:
            return
        pixels, self.resized = model_input(image, self.image_size)
        release_free_memory()  # a large image's float channels, else kept by the tuned allocator under the encoder
        if self.openvino:
            from sam4med.engine.openvino_encoder import run_encoder

            self.features = run_encoder(self.encoder, pixels)
        else:
            self.features = self.encoder.run(None, {self.encoder.get_inputs()[0].name: pixels})[0]
        release_free_memory()  # the encoder's activations, as ``SamModel.encode`` hands them back
        self.image = image

    def decode(self, prompt: Prompt, mask_input: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All four low-res logits (4, 256, 256) of one prompt (single-mask output first, as SAM's decoder
        orders them) and their predicted IoUs (4,). ``mask_input``: a previous round's (256, 256) logits."""
        if self.image is None or self.features is None:
            raise RuntimeError("call set_image before decode")
        prompt.check_inside(self.image.shape[:2])
        scale = np.array([self.resized[1] / self.image.shape[1], self.resized[0] / self.image.shape[0]], np.float32)
        coords, labels = [], []
        if prompt.points is not None:
            coords.append(prompt.points * scale)
            labels.append(prompt.labels.astype(np.float32))
        if prompt.box is not None:  # SAM's ONNX convention: the box's corners as points labelled 2 and 3
            coords.append(prompt.box.reshape(2, 2) * scale)
            labels.append(np.array([2, 3], np.float32))
        else:  # the padding point SAM's prompt encoder adds when there is no box
            coords.append(np.zeros((1, 2), np.float32))
            labels.append(np.array([-1], np.float32))
        box_only = self.graphs.get("box_decoder") is not None and prompt.points is None and mask_input is None
        graph = self._decoder("box_decoder" if box_only else "decoder")
        has_mask = mask_input is not None
        low_res, iou = graph.run(None, {
            "image_embeddings": self.features,
            "point_coords": np.concatenate(coords)[None].astype(np.float32),
            "point_labels": np.concatenate(labels)[None],
            "mask_input": (mask_input if has_mask else np.zeros((LOW_RES, LOW_RES)))[None, None].astype(np.float32),
            "has_mask_input": np.array([float(has_mask)], np.float32),
        })
        return low_res[0], iou[0]

    def upscale(self, low_res: np.ndarray, above: float | None = None) -> np.ndarray:
        """Low-res logits (M, 256, 256) -> logits (M, H, W) at the image's size, or with ``above`` the masks
        ``> above``: the content is cut out of the padded frame and resized."""
        assert self.image is not None
        height, width = self.resized
        return resize_bilinear(low_res[:, :height, :width], self.image.shape[:2], above)

    def prompt_masks(self, image: np.ndarray, prompt: Prompt, multimask: bool) -> tuple[np.ndarray, np.ndarray]:
        """Masks (M, H, W) of one prompt on ``image`` and their predicted IoUs (M,)."""
        self.set_image(image)
        low_res, iou = self.decode(prompt)
        keep = slice(1, None) if multimask else slice(0, 1)
        return self.upscale(low_res[keep], above=0.0), iou[keep]


def onnx_predictor(model_name: str, threads: int | None = None, folder: Path | None = None,
                   int8: bool = False, openvino: bool = False, bf16: bool = False) -> OnnxPredictor:
    """The ONNX Runtime predictor of a registered model with bundled weights; its graphs are exported first
    (which imports PyTorch, once per model and weights) when missing or stale. ``int8``: the encoder's int8
    copy (``engine.onnx_encoder``); ``openvino``: the encoder compiled by OpenVINO (``engine.openvino_encoder``), in
    bfloat16 with ``bf16``."""
    if not onnx_runtime_available():
        raise missing_package("the ONNX Runtime path", "ONNX Runtime", "onnxruntime")
    check_encoder_graph(int8, openvino)
    if bf16 and not openvino:
        raise InputError("--precision bf16: on the exported graphs only with --runtime openvino")
    folder = folder or cache_root() / "onnx"
    manifest = current_manifest(model_name, folder)
    if manifest is None:
        from sam4med.engine.onnx_bundle import export_bundle

        export_bundle(model_name, folder)
        manifest = current_manifest(model_name, folder)
        if manifest is None:
            raise RuntimeError(f"{manifest_path(model_name, folder)}: exported, but not readable back")
    return OnnxPredictor(manifest, folder, threads, int8, openvino, bf16)
