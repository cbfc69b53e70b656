"""Engine speed on this machine: the reference path against the optimised one, same weights, same outputs.

    python benchmarks/engine.py [--model litemedsam] [--threads 2] [--repeats 5] [--image PATH]
                                [--protocol-data ../shared/data/kvasir_seg --protocol-images 20]

Each measurement runs in a fresh subprocess, so peak memory and allocator settings belong to one path:

- reference: the straightforward eager use of the model: one encoder call per image, one
  segment_anything MaskDecoder call per prompt, no embedding cache, glibc's default allocator;
- optimised: what sam4med does: allocator tuned at start-up, the encoder on ONNX Runtime
  (``--encoder onnx``, the default when onnxruntime is installed; ``--encoder openvino``: OpenVINO), the
  shared-image decoder (``engine.decoder``) on batches of ``--batch`` prompts, mask inputs included, and everything mode's
  early rejection (prompts below the predicted-IoU threshold skip the upscaling).

In the protocol rows both paths use the benchmark's own predictor, which hands the reference decoder
4 prompts per call where a mode has several (everything mode); segment_anything's decoder costs about
the same per prompt at 1 to 4.

Printed per component: median time of each path, their ratio, GFLOP/s (FLOPs of the reference
computation, counted by PyTorch's FlopCounterMode, divided by each path's time: useful work per
second), and the subprocess's peak resident memory. Everything mode also prints the IoU of the two
paths' summed mask maps (1.0 = the same masks). With --protocol-data the 9-mode COSMOS benchmark
runs on the first N images of that data set by both paths and the time for all its images is
projected from the per-image rate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

PATHS = ("reference", "optimised")
GEMM_SIZE = 2048  # square matrices: large enough that a GEMM runs at the cores' sustained peak


def measured_floor(threads: int, repeats: int) -> dict[str, float | None]:
    """What this machine's cores sustain on ``threads`` threads: fp32 and bf16 GEMM GFLOP/s (torch.mm) and
    int8 GEMM GOP/s (torch._int_mm where PyTorch has it on CPUs). Measured, not derived from a clock and an
    assumed instruction set: machines of one kind differ (AVX2 only, or AVX-512 with VNNI and BF16)."""
    import torch

    torch.set_num_threads(threads)
    n = GEMM_SIZE
    a, b = torch.randn(n, n), torch.randn(n, n)
    floor: dict[str, float | None] = {"fp32_gflops": 2 * n**3 / median_seconds(lambda: torch.mm(a, b), repeats) / 1e9}
    ha, hb = a.bfloat16(), b.bfloat16()
    floor["bf16_gflops"] = 2 * n**3 / median_seconds(lambda: torch.mm(ha, hb), repeats) / 1e9
    qa = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    qb = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    try:
        floor["int8_gops"] = 2 * n**3 / median_seconds(lambda: torch._int_mm(qa, qb), repeats) / 1e9
    except (RuntimeError, AttributeError, NotImplementedError):
        floor["int8_gops"] = None
    return floor


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    function()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _flops(function: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def _image(path: str | None) -> np.ndarray:
    from sam4med.engine.imageio import read_image

    if path:
        return read_image(path)
    yy, xx = np.mgrid[:256, :256]
    blob = ((yy - 120) / 60) ** 2 + ((xx - 130) / 80) ** 2 <= 1
    return np.repeat(np.where(blob, 190, 50).astype(np.uint8)[..., None], 3, axis=2)


def _measure(args: argparse.Namespace) -> dict[str, object]:
    """One component on one path, in this (fresh) process."""
    if args.component == "floor":
        return measured_floor(args.threads, args.repeats)
    import torch

    from sam4med.engine.runtime import tune_allocator

    optimised = args.path == "optimised"
    if optimised:
        tune_allocator()
    torch.set_num_threads(args.threads)
    from sam4med.engine.everything import EverythingSettings, generate_masks
    from sam4med.engine.models import load_model
    from sam4med.engine.sam_model import Embedding
    from sam4med.engine.predictor import Predictor
    from sam4med.engine.prompts import Prompt

    model = load_model(args.model, args.checkpoint, "cpu", use_shared_decoder=optimised,
                       encoder_backend=args.encoder if optimised else "torch", tune_memory=optimised)
    image = _image(args.image)
    result: dict[str, object] = {}
    # FLOPs are those of the reference computation, counted in the reference child only (the parent
    # divides them by either path's time), so no process holds a second model.
    if args.component == "encoder":
        if not optimised:
            result["flops"] = _flops(lambda: model.encode(image))
        result["seconds"] = median_seconds(lambda: model.encode(image), args.repeats)
    elif args.component == "decoder":
        embedding = model.encode(image)
        boxes = [Prompt(box=[40 + i, 50, 200 + i, 190]) for i in range(16)]
        if not optimised:
            result["flops"] = _flops(lambda: model.decode(embedding, boxes[:1]))
        batch = 1 if not optimised else args.batch

        def decode_all() -> None:
            fresh = Embedding(embedding.features, embedding.geometry)  # per-image work counted every time
            for start in range(0, len(boxes), batch):
                model.decode(fresh, boxes[start : start + batch])

        result["seconds"] = median_seconds(decode_all, args.repeats) / len(boxes)
        result["batch"] = batch
    elif args.component == "protocol":
        from sam4med.evaluation.benchmark import BenchmarkConfig, run_benchmark

        out = Path(tempfile.mkdtemp(prefix=f"sam4med-bench-{args.path}-"))
        start = time.perf_counter()
        try:
            run_benchmark([args.protocol_data], out, BenchmarkConfig(model=args.model, max_images=args.protocol_images),
                          overlays_per_dataset=0, show_progress=False, model=model)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        result["seconds"] = time.perf_counter() - start
    else:
        method = args.component.split("_", 1)[1]
        predictor = Predictor(model, batch_size=args.batch if optimised else 1)
        settings = EverythingSettings(method=method)  # type: ignore[arg-type]
        masks = generate_masks(predictor, image, settings)  # also encodes the image once
        result["seconds"] = median_seconds(lambda: generate_masks(predictor, image, settings),
                                            max(1, args.repeats // 2))
        summed = np.zeros(image.shape[:2], np.int32)
        for mask in masks:
            summed += mask.mask
        result["masks"] = len(masks)
        result["summed"] = summed.tolist()
    result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _run_child(args: argparse.Namespace, component: str, path: str) -> dict[str, object]:
    command = [sys.executable, __file__, "--child", "--component", component, "--path", path,
               "--model", args.model, "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--batch", str(args.batch), "--encoder", args.encoder]
    if args.protocol_data:
        command += ["--protocol-data", args.protocol_data, "--protocol-images", str(args.protocol_images)]
    if args.checkpoint:
        command += ["--checkpoint", args.checkpoint]
    if args.image:
        command += ["--image", args.image]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _iou(a: list[list[int]], b: list[list[int]]) -> float:
    """IoU of two summed mask maps: sum of minima over sum of maxima."""
    x, y = np.asarray(a), np.asarray(b)
    union = np.maximum(x, y).sum()
    return float(np.minimum(x, y).sum() / union) if union else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="prompts per decoder call on the optimised path (the predictor's default)")
    parser.add_argument("--image", default=None)
    parser.add_argument("--encoder", choices=("torch", "onnx", "openvino"), default=None,
                        help="encoder backend of the optimised path (default: onnx when onnxruntime is installed)")
    parser.add_argument("--protocol-data", default=None)
    parser.add_argument("--protocol-images", type=int, default=20)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--component", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.encoder is None:
        from sam4med.engine.onnx_predictor import onnx_runtime_available

        args.encoder = "onnx" if onnx_runtime_available() else "torch"
    if args.child:
        print(json.dumps(_measure(args)))
        return

    print(f"model {args.model}, {args.threads} threads (of {os.cpu_count()} CPUs), "
          f"image {args.image or 'synthetic 256x256'}, median of {args.repeats}, optimised encoder: {args.encoder}")
    floor = _run_child(args, "floor", "reference")
    peak = floor["fp32_gflops"]
    int8 = f"{floor['int8_gops']:.0f} GOP/s" if floor["int8_gops"] else "not measurable (no torch._int_mm here)"
    print(f"measured floor on {args.threads} threads ({GEMM_SIZE}^2 GEMM): fp32 {peak:.0f} GFLOP/s, "
          f"bf16 {floor['bf16_gflops']:.0f} GFLOP/s, int8 {int8}")
    print(f"{'component':22s} {'reference':>12s} {'optimised':>12s} {'ratio':>6s} {'GFLOP/s ref/opt':>16s} "
          f"{'peak MB ref/opt':>16s}")
    for component, unit in (("encoder", "s/image"), ("decoder", "ms/prompt"), ("everything_boxes", "s/image"),
                            ("everything_points", "s/image")):
        ref, opt = (_run_child(args, component, path) for path in PATHS)
        scale = 1000 if unit == "ms/prompt" else 1
        rate = ""
        if "flops" in ref:
            rate = f"{ref['flops'] / ref['seconds'] / 1e9:7.1f}/{ref['flops'] / opt['seconds'] / 1e9:<7.1f}"
        extra = ""
        if "summed" in ref:
            extra = f"  masks {ref['masks']}/{opt['masks']}, IoU of summed maps {_iou(ref['summed'], opt['summed']):.4f}"
        if component == "decoder":
            extra = f"  {ref['flops'] / 1e9:.2f} GFLOP/prompt, optimised batch {opt['batch']}"
        if component == "encoder":
            extra = f"  {ref['flops'] / 1e9:.1f} GFLOP/image"
            if peak:
                extra += f", optimised at {ref['flops'] / opt['seconds'] / 1e9 / peak:.0%} of the fp32 GEMM floor"
        print(f"{component + ' (' + unit + ')':22s} {ref['seconds'] * scale:12.3f} {opt['seconds'] * scale:12.3f} "
              f"{ref['seconds'] / opt['seconds']:6.2f} {rate:>16s} {ref['peak_mb']:7.0f}/{opt['peak_mb']:<7.0f}{extra}")
    if args.protocol_data:
        from sam4med.engine.datasets import load_dataset

        total = len(load_dataset(args.protocol_data))
        ref, opt = (_run_child(args, "protocol", path) for path in PATHS)
        n = args.protocol_images
        print(f"{'protocol (s/image)':22s} {ref['seconds'] / n:12.3f} {opt['seconds'] / n:12.3f} "
              f"{ref['seconds'] / opt['seconds']:6.2f} {'':>16s} {ref['peak_mb']:7.0f}/{opt['peak_mb']:<7.0f}"
              f"  9 modes on {n} images; all {total}: {ref['seconds'] / n * total / 60:.1f} / "
              f"{opt['seconds'] / n * total / 60:.1f} min projected")


if __name__ == "__main__":
    main()
