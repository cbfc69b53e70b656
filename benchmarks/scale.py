"""The benchmark's item loop locally and on Ray with 1 and 2 workers: throughput, ratio, overhead per image.

    python benchmarks/scale.py --data ../shared/data/kvasir_seg --images 20 [--modes box,everything,...]

Every path runs the same protocol on the same images with one thread per process (the local loop is
set to one thread too), so the ratios show what Ray adds and what a second worker buys, not thread
scaling. The Ray cluster is started once, before the timed runs (its start-up is printed apart), and
each Ray run ships the model to its actors inside the timed part, as a user's run does.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sam4med.engine.executors import RayExecutor, ray_module
from sam4med.engine.models import load_model
from sam4med.evaluation.benchmark import BenchmarkConfig, run_benchmark
from sam4med.evaluation.modes import DEFAULT_MODES


def _rows(folder: Path) -> int:
    return sum(1 for _ in (folder / "results.jsonl").open(encoding="utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--model", default=None)
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES))
    parser.add_argument("--encoder", choices=("torch", "onnx"), default="onnx")
    args = parser.parse_args()
    config = BenchmarkConfig(**({"model": args.model} if args.model else {}), modes=tuple(args.modes.split(",")),
                             max_images=args.images)
    torch.set_num_threads(1)
    model = load_model(config.model, device="cpu", encoder_backend=args.encoder)
    ray = ray_module()
    started = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    cluster_seconds = time.perf_counter() - started
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, executor in (("local", None), ("ray x1", RayExecutor(workers=1)), ("ray x2", RayExecutor(workers=2))):
            out = Path(scratch) / name.replace(" ", "")
            started = time.perf_counter()
            run_benchmark([args.data], out, config, model=model, show_progress=False, executor=executor)
            timings[name] = time.perf_counter() - started
            print(f"{name:7s} {timings[name]:7.1f} s  {args.images / timings[name]:.3f} images/s  {_rows(out)} rows",
                  flush=True)
    ray.shutdown()
    local, one, two = timings["local"], timings["ray x1"], timings["ray x2"]
    summary = {"images": args.images, "model": config.model, "modes": list(config.modes), "encoder": args.encoder,
               "ray_start_s": round(cluster_seconds, 1), "seconds": {k: round(v, 1) for k, v in timings.items()},
               "ray1_vs_local": round(one / local, 3), "ray2_speedup_vs_ray1": round(one / two, 2),
               "ray_overhead_per_image_s": round((one - local) / args.images, 3)}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
