"""The int8 encoder against the fp32 ONNX encoder it is made from: speed and box Dice on every data set.

    python benchmarks/int8.py --data ../shared/data [--images 30] [--model litemedsam] [--threads 2]

Speed: both encoders in this process, interleaved image by image (so a busy machine slows both alike), the
median seconds per image and their ratio. Accuracy: the benchmark's ``box`` mode (tight box of every object,
at most 20 per image) on the first ``--images`` images of every data set under ``--data``, with each
encoder; per data set the mean Dice of both and the difference. The target the int8 path has to meet
before it may become a default: >= 1.5x and a box Dice within 0.005 of fp32 on every data set.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sam4med.engine.datasets import load_dataset
from sam4med.engine.imageio import read_image
from sam4med.engine.models import load_model
from sam4med.engine.runtime import configure_cpu
from sam4med.evaluation.benchmark import BenchmarkConfig, run_benchmark
from sam4med.evaluation.summary import load_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder of data sets in the sam4med layout")
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    configure_cpu(args.threads)
    folders = sorted(p for p in args.data.iterdir() if (p / "dataset.json").is_file())
    models = {backend: load_model(args.model, device="cpu", encoder_backend=backend) for backend in ("onnx", "onnx-int8")}
    seconds: dict[str, list[float]] = {backend: [] for backend in models}
    for folder in folders:
        for sample in load_dataset(folder).samples[:3]:
            image = read_image(sample.image_path)
            for backend, model in models.items():
                model.encode(image)  # warm: sessions made, first-call costs paid
                start = time.perf_counter()
                model.encode(image)
                seconds[backend].append(time.perf_counter() - start)
    fp32, int8 = (statistics.median(seconds[b]) for b in models)
    print(f"encoder, {args.model}, {args.threads} threads, {len(seconds['onnx'])} images: fp32 ONNX {fp32:.3f} s, "
          f"int8 {int8:.3f} s, {fp32 / int8:.2f}x", flush=True)
    print(f"{'data set':16s} {'objects':>7s} {'fp32':>7s} {'int8':>7s} {'int8-fp32':>9s}", flush=True)
    worst = 0.0
    with tempfile.TemporaryDirectory() as scratch:
        for folder in folders:
            means = []
            for backend, model in models.items():
                out = Path(scratch) / f"{folder.name}-{backend}"
                run_benchmark([folder], out, BenchmarkConfig(model=args.model, modes=("box",), max_images=args.images),
                              model=model, overlays_per_dataset=0, show_progress=False)
                frame = load_results(out)
                frame = frame[frame["status"] == "ok"]
                means.append(float(frame["dice"].mean()))
            worst = min(worst, means[1] - means[0])
            print(f"{folder.name:16s} {len(frame):7d} {means[0]:7.4f} {means[1]:7.4f} {means[1] - means[0]:+9.4f}",
                  flush=True)
    print(f"largest drop {-worst:.4f}; speed-up {fp32 / int8:.2f}x (targets: <= 0.005 and >= 1.5x)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
