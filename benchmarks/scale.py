"""The benchmark's item loop locally and on Ray with 1 and 2 workers: throughput, ratio, overhead per image.

    python benchmarks/scale.py --data ../shared/data/kvasir_seg --images 20 [--modes box,everything,...]

Every path runs the same protocol on the same images with one thread per process (the local loop is
set to one thread too), so the ratios show what Ray adds and what a second worker buys, not thread
scaling. The Ray cluster is started once, before the timed runs (its start-up is printed apart). Each run
is split at its first finished image: before it, a Ray run starts its actors and ships them the model
(once per run); after it, the rate is the steady one that a long run sees. Per image overhead and the
ratios are given for the steady part and for the whole run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sam4med.engine.executors import LocalExecutor, RayExecutor, ray_module
from sam4med.engine.models import load_model
from sam4med.evaluation.benchmark import BenchmarkConfig, run_benchmark
from sam4med.evaluation.modes import DEFAULT_MODES


def _rows(folder: Path) -> int:
    return sum(1 for _ in (folder / "results.jsonl").open(encoding="utf-8"))


class FirstFinished:
    """An executor wrapper that notes when the first image finished."""

    def __init__(self, inner: object):
        self.inner, self.first = inner, float("nan")

    def outcomes(self, process, items):  # noqa: ANN001, ANN201 - the Executor protocol
        for outcome in self.inner.outcomes(process, items):
            if self.first != self.first:  # nan: none yet
                self.first = time.perf_counter()
            yield outcome


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
    steady: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, executor in (("local", LocalExecutor()), ("ray x1", RayExecutor(workers=1)),
                               ("ray x2", RayExecutor(workers=2))):
            out = Path(scratch) / name.replace(" ", "")
            timed = FirstFinished(executor)
            started = time.perf_counter()
            run_benchmark([args.data], out, config, model=model, show_progress=False, executor=timed)
            ended = time.perf_counter()
            timings[name] = ended - started
            steady[name] = (ended - timed.first) / (args.images - 1)
            print(f"{name:7s} {timings[name]:7.1f} s in all, first image after {timed.first - started:5.1f} s, then "
                  f"{steady[name]:.2f} s/image  ({_rows(out)} rows)", flush=True)
    ray.shutdown()
    local, one, two = timings["local"], timings["ray x1"], timings["ray x2"]
    summary = {"images": args.images, "model": config.model, "modes": list(config.modes), "encoder": args.encoder,
               "ray_start_s": round(cluster_seconds, 1), "seconds": {k: round(v, 1) for k, v in timings.items()},
               "steady_s_per_image": {k: round(v, 2) for k, v in steady.items()},
               "ray1_vs_local_steady": round(steady["ray x1"] / steady["local"], 3),
               "ray1_vs_local_whole": round(one / local, 3),
               "ray2_speedup_vs_ray1_steady": round(steady["ray x1"] / steady["ray x2"], 2),
               "ray2_speedup_vs_ray1_whole": round(one / two, 2),
               "ray_overhead_per_image_steady_s": round(steady["ray x1"] - steady["local"], 3)}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
