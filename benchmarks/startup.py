"""One image from a fresh process: ``sam4med segment`` end to end (imports, model, encode, decode, write).

    python benchmarks/startup.py [--image PATH --box X0 Y0 X1 Y1] [--model litemedsam-click] [--repeats 5]
                                 [--threads N]

Each run is a new ``python -m sam4med segment`` process, as a user (or a challenge's container) starts one.
Printed: the median wall time and peak resident memory of ``--runtime onnx`` (ONNX Runtime alone, graphs
already exported), the same with ``--int8`` (the encoder's int8 copy), ``--runtime openvino`` (the same graphs,
the encoder compiled by OpenVINO, its compiled graph cached) and ``--runtime torch`` (the PyTorch path, as
`segment` ran before), the ratios, and the one-off costs of the first ONNX run on an empty cache (the export,
which imports PyTorch) and of the first OpenVINO run (compiling with an empty OpenVINO cache).
Without ``--image`` a synthetic ellipse image is segmented. The machine's cores are not assumed: the
README's figures say on which CPU they were measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from processes import run_process


def _synthetic_image(folder: Path) -> tuple[Path, list[float]]:
    height, width = 300, 400
    yy, xx = np.mgrid[:height, :width]
    inside = ((yy - 150) / 60) ** 2 + ((xx - 200) / 90) ** 2 <= 1
    pixels = np.where(inside[..., None], 190, 50) + np.random.default_rng(0).normal(0, 12, (height, width, 3))
    path = folder / "ellipse.png"
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
    return path, [110, 90, 290, 210]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument("--box", type=float, nargs=4, default=None)
    parser.add_argument("--model", default="litemedsam-click")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        image, box = (args.image, args.box) if args.image else _synthetic_image(folder)
        if box is None:
            raise SystemExit("error: --box: needed with --image")
        base = [sys.executable, "-m", "sam4med", "segment", str(image), "--box", *map(str, box), "--model", args.model,
                "--out", str(folder / "mask.png")] + (["--threads", str(args.threads)] if args.threads else [])
        environment = {**os.environ, "SAM4MED_CACHE": str(folder / "cache")}
        first, _ = run_process(base + ["--runtime", "onnx"], environment)  # empty cache: exports the graphs
        first_openvino, _ = run_process(base + ["--runtime", "openvino"], environment)  # compiles, fills its cache
        rows = {}
        paths = {"onnx": ["--runtime", "onnx"], "onnx int8": ["--runtime", "onnx", "--int8"],
                 "openvino": ["--runtime", "openvino"], "torch": ["--runtime", "torch"]}
        measured: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        for _ in range(args.repeats):  # interleaved, so that a busy moment of the machine slows every path alike
            for name, options in paths.items():
                measured[name].append(run_process(base + options, environment))
        for name, runs in measured.items():
            rows[name] = (statistics.median(s for s, _ in runs), max(m for _, m in runs), [s for s, _ in runs])
    print(f"sam4med segment, fresh process, {args.model}, {args.repeats} runs each, image {image.name}")
    print(f"{'runtime':10s} {'median s':>9s} {'peak MB':>8s}  runs")
    for runtime, (median, peak, runs) in rows.items():
        print(f"{runtime:10s} {median:9.2f} {peak:8.0f}  {' '.join(f'{s:.2f}' for s in runs)}")
    print(f"torch / onnx: {rows['torch'][0] / rows['onnx'][0]:.1f}x, torch / onnx int8: "
          f"{rows['torch'][0] / rows['onnx int8'][0]:.1f}x, onnx / openvino: {rows['onnx'][0] / rows['openvino'][0]:.2f}x; "
          f"first onnx run on an empty cache (export included): {first:.1f} s, first openvino run: {first_openvino:.1f} s")


if __name__ == "__main__":
    main()
