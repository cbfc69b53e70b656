"""Engine timings on this machine: encoder, decoder per prompt, everything mode (medians).

    python benchmarks/engine.py [--model litemedsam] [--threads 2] [--repeats 5] [--image PATH]

Prints seconds and achieved GFLOP/s (FLOPs counted by PyTorch's FlopCounterMode), plus the
process's peak resident memory. Without --image it times a synthetic 256x256 image; the decoder
and everything mode depend on the image only through the number of kept masks.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from sam4med.engine.data import read_image
from sam4med.engine.everything import EverythingSettings, generate_masks
from sam4med.engine.models import load_model
from sam4med.engine.predictor import Predictor
from sam4med.engine.prompts import Prompt
from sam4med.engine.runtime import configure_cpu


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    function()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def flops(function: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image", default=None)
    args = parser.parse_args()
    configure_cpu(args.threads)
    model = load_model(args.model, args.checkpoint, "cpu")
    if args.image:
        image = read_image(args.image)
    else:
        yy, xx = np.mgrid[:256, :256]
        blob = ((yy - 120) / 60) ** 2 + ((xx - 130) / 80) ** 2 <= 1
        image = np.repeat(np.where(blob, 190, 50).astype(np.uint8)[..., None], 3, axis=2)
    print(f"model {model.name}, {args.threads} threads, image {image.shape[1]}x{image.shape[0]}, "
          f"median of {args.repeats}")

    encode_flops = flops(lambda: model.encode(image))
    encode_s = median_seconds(lambda: model.encode(image), args.repeats)
    print(f"encoder            {encode_s * 1000:8.1f} ms/image   {encode_flops / 1e9:6.1f} GFLOP  "
          f"{encode_flops / encode_s / 1e9:6.1f} GFLOP/s")

    embedding = model.encode(image)
    boxes = [Prompt(box=[40 + i, 50, 200 + i, 190]) for i in range(16)]
    decode_flops = flops(lambda: model.decode(embedding, boxes[:1]))
    for batch in (1, 4, 16):
        seconds = median_seconds(lambda: model.decode(embedding, boxes[:batch]), args.repeats) / batch
        print(f"decoder batch {batch:2d}   {seconds * 1000:8.1f} ms/prompt  {decode_flops / 1e9:6.1f} GFLOP  "
              f"{decode_flops / seconds / 1e9:6.1f} GFLOP/s")

    predictor = Predictor(model)
    predictor.set_image(image)
    settings = EverythingSettings()
    kept = len(generate_masks(predictor, image, settings))
    everything_s = median_seconds(lambda: generate_masks(predictor, image, settings), max(1, args.repeats // 2))
    print(f"everything (boxes) {everything_s:8.2f} s/image     {kept} masks kept")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory        {peak_mb:8.0f} MB")


if __name__ == "__main__":
    main()
