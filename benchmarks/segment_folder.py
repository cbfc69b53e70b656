"""`sam4med segment-folder` on a real data set, as a user runs it: time, memory and Dice against the truth.

    python benchmarks/segment_folder.py --data ../shared/data/kvasir_seg --images 100 [--prompt box|click]
                                        [--tile 256] [--threads 2]

Writes a prompt table of every object (8-connected component of at least 16 px) in the masks of the first
``--images`` images of the data set's test side (the split every trainer uses, seed 0: the click model never
saw them): its tight box, or one click at its centre (``engine.prompts.center_point``),
runs `sam4med segment-folder` on it in a fresh process for each runtime (ONNX Runtime, the default path, and
PyTorch; PyTorch alone with ``--tile``), and prints wall time, peak resident memory and the mean per-image
Dice of each label map (foreground = any object) against the data set's mask. Everything is written to a
temporary folder that is removed.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from processes import run_process

from sam4med.engine.datasets import load_dataset
from sam4med.engine.imageio import read_mask
from sam4med.engine.objects import object_labels
from sam4med.engine.prompts import center_point, tight_box
from sam4med.engine.splits import DEFAULT_FRACTIONS, training_split


def write_table(data: Path, images: int, prompt: str, path: Path) -> dict[str, Path]:
    """The table of a box or a centre click for every object of the first ``images`` images; image path in the
    table -> mask file."""
    dataset = load_dataset(data)
    samples = training_split(dataset, DEFAULT_FRACTIONS, 0)["test"][:images]
    masks = {}
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "x0", "y0", "x1", "y1", "points"])
        for sample in samples:
            image = sample.image_path.relative_to(dataset.root / "images").as_posix()
            masks[image] = sample.mask_path
            labels, ids = object_labels(read_mask(sample.mask_path), min_area=16)
            for number, label in enumerate(ids, start=1):
                obj = labels == label
                if prompt == "box":
                    writer.writerow([image, f"object {number}", *(int(v) for v in tight_box(obj)), ""])
                else:
                    writer.writerow([image, f"object {number}", "", "", "", "", "{} {}".format(*center_point(obj))])
    return masks


def mean_dice(out: Path, masks: dict[str, Path]) -> float:
    scores = []
    for image, mask_path in masks.items():
        predicted = np.array(Image.open(out / "masks" / Path(image).with_suffix(".png"))) > 0
        truth = read_mask(mask_path) > 0
        total = predicted.sum() + truth.sum()
        scores.append(2 * np.logical_and(predicted, truth).sum() / total if total else 1.0)
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/kvasir_seg"))
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--prompt", choices=("box", "click"), default="box")
    parser.add_argument("--tile", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if not (args.data / "images").is_dir():
        raise SystemExit(f"error: {args.data}: no such data set folder (images/, masks/)")
    with tempfile.TemporaryDirectory() as scratch:
        table = Path(scratch) / "prompts.csv"
        masks = write_table(args.data, args.images, args.prompt, table)
        objects = sum(1 for _ in table.open(encoding="utf-8")) - 1
        print(f"sam4med segment-folder, {len(masks)} test images of {args.data.name}, {objects} objects, a "
              f"{'tight box' if args.prompt == 'box' else 'centre click'} each"
              f"{f', tiles of {args.tile} px' if args.tile else ''}; fresh process")
        print(f"{'runtime':8s} {'wall s':>7s} {'s/image':>8s} {'peak MB':>8s} {'mean Dice':>10s}")
        for runtime in ("torch",) if args.tile else ("onnx", "torch"):
            out = Path(scratch) / runtime
            command = [sys.executable, "-m", "sam4med", "segment-folder", str(args.data / "images"), "--prompts",
                       str(table), "--out", str(out), "--runtime", runtime]
            command += ["--tile", str(args.tile)] if args.tile else []
            command += ["--threads", str(args.threads)] if args.threads else []
            seconds, peak = run_process(command)
            print(f"{runtime:8s} {seconds:7.1f} {seconds / len(masks):8.3f} {peak:8.0f} {mean_dice(out, masks):10.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
