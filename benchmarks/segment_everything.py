"""`sam4med segment-everything` on a real data set, as a user runs it: time, memory and instance scores.

    python benchmarks/segment_everything.py --data ../shared/data/dsb2018_fluo --images 20 [--tile 256] [--threads 2]

Links the first ``--images`` images of the data set's test side (the split every trainer uses, seed 0: the
click model never saw them) into a temporary folder, runs the verb on it in a fresh
process (the verb's defaults: litemedsam-click, the ONNX encoder, the model's point-grid thresholds), and
scores each instance label map against the truth's instances (the 8-connected components of the mask:
touching objects merge in the truth), with engine.metrics: object precision, recall and F1 at IoU 0.5, and
AJI. Prints wall time, peak resident memory and the mean scores over images. Everything written is removed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from processes import run_process

from sam4med.engine.datasets import load_dataset
from sam4med.engine.imageio import read_mask
from sam4med.engine.metrics import aggregated_jaccard_index, label_instances, object_f1
from sam4med.engine.splits import DEFAULT_FRACTIONS, training_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/dsb2018_fluo"))
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--tile", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if not (args.data / "images").is_dir():
        raise SystemExit(f"error: {args.data}: no such data set folder (images/, masks/)")
    samples = training_split(load_dataset(args.data), DEFAULT_FRACTIONS, 0)["test"][: args.images]
    with tempfile.TemporaryDirectory() as scratch:
        folder, out = Path(scratch) / "images", Path(scratch) / "out"
        folder.mkdir()
        for sample in samples:
            (folder / sample.image_path.name).symlink_to(sample.image_path.resolve())
        command = [sys.executable, "-m", "sam4med", "segment-everything", str(folder), "--out", str(out)]
        command += ["--tile", str(args.tile)] if args.tile else []
        command += ["--threads", str(args.threads)] if args.threads else []
        seconds, peak = run_process(command)
        scores = []
        for sample in samples:
            predicted = np.array(Image.open(out / "masks" / Path(sample.image_path.name).with_suffix(".png")))
            truth = label_instances(read_mask(sample.mask_path) > 0)
            detection = object_f1(predicted.astype(np.int64), truth)
            scores.append((*detection, aggregated_jaccard_index(predicted.astype(np.int64), truth),
                           len(np.unique(predicted)) - 1, len(np.unique(truth)) - 1))
    precision, recall, f1, aji, found, objects = np.mean(scores, axis=0)
    print(f"sam4med segment-everything, {len(samples)} test images of {args.data.name}, "
          f"{'tiles of ' + str(args.tile) + ' px' if args.tile else 'whole images'}; fresh process")
    print(f"wall {seconds:.1f} s ({seconds / len(samples):.2f} s an image), peak RSS {peak:.0f} MB")
    print(f"per image: {found:.1f} masks, {objects:.1f} true objects; object precision {precision:.3f}, "
          f"recall {recall:.3f}, F1 {f1:.3f} (IoU >= 0.5); AJI {aji:.3f}")


if __name__ == "__main__":
    main()
