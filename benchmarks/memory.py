"""Peak resident memory of `sam4med eval benchmark` on large images, and how much of it is the libraries.

    python benchmarks/memory.py --data ../shared/data/monuseg --images 3 [--tile 256] [--threads 2]
                                [--encoders onnx,openvino,torch]

Each figure is a fresh process, as a user runs the verb: its peak resident set (``ru_maxrss`` of the child)
and wall time. Printed, for each encoder backend of ``--encoders`` (ONNX Runtime, OpenVINO, PyTorch): the
floor (the process imports what the benchmark imports and loads the model, then stops), the benchmark on
``--images`` images of ``--data`` under every prompt mode (or ``--modes``), the part above the floor, and the
ratio against the 1.5 GB target of the speed issue; beside them the peak of the process's anonymous memory
(heap and arrays, sampled), since the resident set also counts pages of the shared libraries it maps
(PyTorch's CUDA libraries among them, on a CPU), which the system can drop and read again. With ``--tile``,
the same on tiled embeddings. Results go to a temporary folder that is removed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from processes import run_process_sampled

TARGET_MB = 1536
FLOOR = """
import sys
from sam4med.cli import app  # the command line, as the verb loads it
from sam4med.evaluation.benchmark import run_benchmark
from sam4med.engine.models import load_model
load_model(sys.argv[1], encoder_backend=sys.argv[2])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/monuseg"))
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--modes", default=None, help="comma-separated prompt modes (default: all)")
    parser.add_argument("--model", default="litemedsam-click")
    parser.add_argument("--tile", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--encoders", default="onnx,openvino,torch", help="comma-separated encoder backends")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"error: {args.data}: no such data set folder")
    configurations = [("whole images", [])] + ([(f"tiles of {args.tile} px", ["--tile", str(args.tile)])]
                                               if args.tile else [])
    print(f"sam4med eval benchmark, {args.model}, {args.images} images of {args.data.name}, modes "
          f"{args.modes or 'all'}; peak RSS of a fresh process")
    print(f"{'encoder':8s} {'images':16s} {'floor MB':>9s} {'peak MB':>8s} {'above floor':>12s} "
          f"{'wall s':>7s} {'peak / 1.5 GB':>14s} {'anon floor':>11s} {'anon peak':>10s}")
    with tempfile.TemporaryDirectory() as scratch:
        for encoder in args.encoders.split(","):
            _, floor, anonymous_floor = run_process_sampled([sys.executable, "-c", FLOOR, args.model, encoder])
            for label, options in configurations:
                out = Path(scratch) / f"{encoder}{len(options)}"
                command = [sys.executable, "-m", "sam4med", "eval", "benchmark", "--data", str(args.data),
                           "--out", str(out), "--model", args.model, "--encoder", encoder,
                           "--max-images", str(args.images), *options]
                command += ["--modes", args.modes] if args.modes else []
                command += ["--threads", str(args.threads)] if args.threads else []
                seconds, peak, anonymous = run_process_sampled(command)
                print(f"{encoder:8s} {label:16s} {floor:9.0f} {peak:8.0f} {peak - floor:12.0f} {seconds:7.1f} "
                      f"{peak / TARGET_MB:14.2f} {anonymous_floor:11.0f} {anonymous:10.0f}", flush=True)


if __name__ == "__main__":
    main()
