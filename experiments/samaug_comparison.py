"""SAMAug's comparison on the real data sets: U-Net on raw input vs U-Net with SAMAug (dual training).

Priors missing from --priors are computed first for the images the experiment uses (LiteMedSAM's
everything mode, SAMAug's weights, the preset's tiling), or run `sam4med priors` beforehand. Example:

    python experiments/samaug_comparison.py monuseg --data ../shared/data/monuseg \
        --priors runs/samaug/priors --out runs/samaug/monuseg --threads 1

Each preset fixes image size, scale, epochs, prior tiling and metrics for one data set, identical for
every arm and seed; writes OUT/metrics.csv (image x arm x seed), OUT/summary.csv and OUT/summary.png.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from sam4med.engine.runtime import configure_cpu
from sam4med.samaug.experiment import images_used, run_experiment, write_summary
from sam4med.samaug.priors import PriorSettings
from sam4med.samaug.store import generate_priors
from sam4med.samaug.training import TrainConfig

BASE = TrainConfig(net="unet", policy="add", dual_update="summed", image_size=128, features=16, batch_size=8,
                   learning_rate=1e-3, split_seed=0)
PRESETS = {  # training, priors, instance metrics
    # 1000 px H&E tiles: halved to 512 px so nuclei keep ~10 px, trained on 8 random 128 px patches per
    # image; priors from everything mode on 500 px tiles (a whole tile at 256 px loses the nuclei)
    "monuseg": (replace(BASE, scale_to=512, patches_per_image=8, epochs=40), PriorSettings(tile=500), True),
    # 256 px frames: whole images at 128 px; CVC split by video sequence (groups), Kvasir by seed 0
    "cvc_clinicdb": (replace(BASE, epochs=20), PriorSettings(), False),
    "kvasir_seg": (replace(BASE, epochs=20), PriorSettings(), False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--data", required=True)
    parser.add_argument("--priors", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    parser.add_argument("--max-train-images", type=int, default=None,
                        help="train on the first N images of the training side (same validation and test sides)")
    parser.add_argument("--encoder", choices=("torch", "onnx"), default="torch", help="encoder backend for priors")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    configure_cpu(args.threads)
    config, prior_settings, instances = PRESETS[args.preset]
    if args.epochs:
        config = replace(config, epochs=args.epochs)
    if args.max_train_images:
        config = replace(config, max_train_images=args.max_train_images)
    for summary in generate_priors([args.data], args.priors, settings=prior_settings, encoder_backend=args.encoder,
                                   image_ids=images_used(args.data, config)):
        print(f"{summary.folder}: {summary.computed} computed, {summary.skipped} already there, "
              f"{summary.failed} failed, {summary.seconds_per_image:.2f} s/image")
    seeds = [int(s) for s in args.seeds.split(",")]
    results = run_experiment(args.data, args.priors, args.out, config, seeds, instances=instances)
    table = write_summary(args.out, results)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(table.round(4).to_string(index=False))


if __name__ == "__main__":
    main()
