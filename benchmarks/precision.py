"""Reduced precision and other runtimes against fp32: the int8 ONNX encoder, bfloat16, OpenVINO; speed and Dice.

    python benchmarks/precision.py --data ../shared/data [--images 30] [--model litemedsam-click] [--threads 2]
                                   [--modes box,point_center]

Five ways to run one model, all in this process:

- fp32: the encoder on ONNX Runtime in fp32, the decoders in fp32;
- int8: the encoder's int8 copy (``--encoder onnx-int8``), the decoders in fp32;
- bf16: the encoder and the decoders on PyTorch under bfloat16 autocast (``--precision bf16``);
- openvino: the same graph as fp32's compiled by OpenVINO in fp32 (``--encoder openvino``), the decoders in fp32;
- openvino-bf16: OpenVINO's encoder in bfloat16 where the CPU has it, the decoders under bfloat16 autocast
  (``--encoder openvino --precision bf16``).

Speed: the encoder of each way (and PyTorch's fp32 encoder, for reference), interleaved image by image so that
a busy machine slows all alike, median seconds per image; the decoder in fp32 and bf16 on batches of 8 lone
clicks with 3 masks each, milliseconds per prompt. The machine's GEMM rate in fp32 and bf16 is printed first:
bf16 pays only where the CPU multiplies bf16 in hardware. Accuracy: the benchmark's modes (at most 20 objects
per image) on the first ``--images`` images of every data set under ``--data``; per data set and mode the mean
Dice of each way and its difference to fp32 over the same objects. The rule a reduced precision has to meet
before it may become a default: >= 1.5x the fp32 encoder and every Dice within 0.005 of fp32.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sam4med.engine.datasets import load_dataset
from sam4med.engine.imageio import read_image
from sam4med.engine.models import load_model
from sam4med.engine.runtime import configure_cpu, native_bf16
from sam4med.engine.prompts import Prompt
from sam4med.engine.sam_model import SamModel
from sam4med.evaluation.benchmark import BenchmarkConfig, run_benchmark
from sam4med.evaluation.summary import load_results

from engine import measured_floor, median_seconds  # benchmarks/engine.py, beside this script

WAYS = {"fp32": ("onnx", "fp32"), "int8": ("onnx-int8", "fp32"), "bf16": ("torch", "bf16"),
        "openvino": ("openvino", "fp32"), "openvino-bf16": ("openvino", "bf16")}
OTHERS = [name for name in WAYS if name != "fp32"]


def encoder_seconds(models: dict[str, SamModel], images: list[np.ndarray]) -> dict[str, float]:
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for image in images:
        for name, model in models.items():
            model.encode(image)  # warm: sessions made, first-call costs paid
            start = time.perf_counter()
            model.encode(image)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def decoder_ms_per_prompt(model: SamModel, image: np.ndarray, batches: int = 4) -> float:
    """Lone clicks at random places, 8 per call, 3 masks each (everything mode's workload)."""
    embedding = model.encode(image)
    rng = np.random.default_rng(0)
    height, width = image.shape[:2]
    prompts = [Prompt(points=np.array([[rng.uniform(0, width - 1), rng.uniform(0, height - 1)]]), labels=np.array([1]))
               for _ in range(8 * batches)]

    def decode_all() -> None:
        embedding.decoder_states.clear()
        for start in range(0, len(prompts), 8):
            model.decode(embedding, prompts[start:start + 8], multimask=True)

    return median_seconds(decode_all, 5) / len(prompts) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder of data sets in the sam4med layout")
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--model", default="litemedsam-click")
    parser.add_argument("--modes", default="box,point_center")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    configure_cpu(args.threads)
    folders = sorted(p for p in args.data.iterdir() if (p / "dataset.json").is_file())
    floor = measured_floor(args.threads, 5)
    print(f"{args.threads} threads, native bf16: {native_bf16()}; GEMM fp32 {floor['fp32_gflops']:.0f} GFLOP/s, "
          f"bf16 {floor['bf16_gflops']:.0f} GFLOP/s ({floor['bf16_gflops'] / floor['fp32_gflops']:.1f}x)", flush=True)
    models = {name: load_model(args.model, device="cpu", encoder_backend=backend, precision=precision)
              for name, (backend, precision) in WAYS.items()}
    encoders = encoder_seconds({**models, "torch fp32": load_model(args.model, device="cpu")},
                               [read_image(sample.image_path) for folder in folders
                                for sample in load_dataset(folder).samples[:3]])
    print("encoder, s/image: " + ", ".join(f"{name} {value:.3f}" for name, value in encoders.items()) + "; "
          + ", ".join(f"{name} {encoders['fp32'] / encoders[name]:.2f}x" for name in OTHERS)
          + " the fp32 ONNX encoder", flush=True)
    image = read_image(load_dataset(folders[0]).samples[0].image_path)
    decoder = {name: decoder_ms_per_prompt(models[name], image) for name in ("fp32", "bf16")}
    print(f"decoder, ms/prompt: fp32 {decoder['fp32']:.1f}, bf16 {decoder['bf16']:.1f} "
          f"({decoder['fp32'] / decoder['bf16']:.2f}x)", flush=True)
    modes = tuple(args.modes.split(","))
    print(f"{'data set':16s} {'mode':13s} {'objects':>7s} {'fp32':>7s} "
          + " ".join(f"{name + ' - fp32':>21s}" for name in OTHERS), flush=True)
    worst = {name: 0.0 for name in OTHERS}
    with tempfile.TemporaryDirectory() as scratch:
        for folder in folders:
            frames = {}
            for name, model in models.items():
                out = Path(scratch) / f"{folder.name}-{name}"
                run_benchmark([folder], out, BenchmarkConfig(model=args.model, modes=modes, max_images=args.images),
                              model=model, overlays_per_dataset=0, show_progress=False, precision=model.precision)
                frame = load_results(out)
                frames[name] = frame[frame["status"] == "ok"]
            for mode in modes:
                means = {name: float(frame[frame["mode"] == mode]["dice"].mean()) for name, frame in frames.items()}
                for name in worst:
                    worst[name] = max(worst[name], abs(means[name] - means["fp32"]))
                count = int((frames["fp32"]["mode"] == mode).sum())
                print(f"{folder.name:16s} {mode:13s} {count:7d} {means['fp32']:7.4f} "
                      + " ".join(f"{means[name] - means['fp32']:+21.4f}" for name in OTHERS), flush=True)
    for name in worst:
        print(f"{name}: largest |Dice - fp32| {worst[name]:.4f}, encoder {encoders['fp32'] / encoders[name]:.2f}x "
              "(rule: <= 0.005 and >= 1.5x)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
