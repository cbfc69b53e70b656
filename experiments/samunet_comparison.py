"""SAM-UNet against the zero-shot backbone and decoder-only fine-tuning, in-domain and on left-out data sets.

    python experiments/samunet_comparison.py --train ../shared/data/kvasir_seg --train ../shared/data/monuseg \
        --train ../shared/data/isbi2012_em --left-out ../shared/data/drive --left-out ../shared/data/brain_mr \
        --out runs/samunet/litemedsam --threads 2

CPU defaults: 4 epochs over at most 150 training images per data set, 2 images x 4 masks per step. A
SAM-UNet step on LiteMedSAM took about 10 s for 2 images on one shared core here, so three data sets at
these defaults are some hours; lower --max-train-images or --epochs to fit a budget (decoder fine-tuning is
cheaper: no gradients through the encoder). GPU recipe: --epochs 20 --images-per-step 8 --max-train-images 0.
Training can run apart (`sam4med finetune` / `sam4med train-samunet --out OUT/decoder|samunet`, two
processes, a GPU) and be scored with --score-only. Writes OUT/scores.csv (one row per object x model),
OUT/table.csv (Dice mean, std, count per data set and model) and OUT/protocol.json (configuration,
data, and each run's own configuration, epochs done, best epoch and training seconds).
"""

from __future__ import annotations

import argparse

import pandas as pd

from sam4med.engine.runtime import configure_cpu
from sam4med.samunet.comparison import paired_gain, run_comparison
from sam4med.samunet.training import PromptTrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", action="append", required=True, help="data set trained on (repeatable)")
    parser.add_argument("--left-out", action="append", default=[],
                        help="data set left out of training, scored on all its images (repeatable)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--backbone", default="litemedsam")
    parser.add_argument("--conv-branch", default="resnet34")
    parser.add_argument("--cold-start", action="store_true",
                        help="SAM-UNet's new output token and feature paths from random values (the paper)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images-per-step", type=int, default=2)
    parser.add_argument("--max-train-images", type=int, default=150, help="per data set (0: all)")
    parser.add_argument("--max-test-images", type=int, default=0,
                        help="per data set, the first N of its test images (0: all)")
    parser.add_argument("--score-only", action="store_true",
                        help="score the runs in OUT/decoder and OUT/samunet as they are (trained by the CLI or stopped early)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    configure_cpu(args.threads)
    config = PromptTrainConfig(backbone=args.backbone, conv_branch=args.conv_branch,
                               warm_start=not args.cold_start, epochs=args.epochs,
                               images_per_step=args.images_per_step, max_train_images=args.max_train_images or None)
    table = run_comparison(args.train, args.left_out, args.out, config, args.max_test_images or None,
                           train=not args.score_only)
    print(table.round(4).to_string(index=False))
    scores = pd.read_csv(f"{args.out}/scores.csv")
    for row, baseline in (("decoder", "zero_shot"), ("samunet", "zero_shot"), ("samunet", "decoder")):
        gain = paired_gain(scores, row, baseline)
        gain.to_csv(f"{args.out}/gain_{row}_vs_{baseline}.csv", index=False)
        print(f"\nDice gain of {row} over {baseline} (paired by object; 95% interval resampling images):")
        print(gain.round(4).to_string(index=False))


if __name__ == "__main__":
    main()
