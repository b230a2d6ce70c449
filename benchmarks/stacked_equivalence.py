"""Does a stacked configuration compute what it would alone (issue 22)? Trains configurations of the benchmark's
quick profile (train.device_data: true) one at a time with 1 and with 2 threads, and as one stacked model, then prints
per configuration the validation loss of each epoch and the test Dice (the paper's per-slice mean).

One vs two threads reorders the float sums of the same training, and so gives the yardstick: a stacked model
is "the same within numerical tolerance" when it lies as close to its one-at-a-time run as the two thread counts do.
The next seed (alone, 2 threads) shows the seed noise beside it.

    python benchmarks/stacked_equivalence.py --epochs 5 --experiments lung,lesion-a,lesion-b --arch linknet --encoder resnet18
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from domgen.families import FAMILIES  # noqa: E402
from domgen.families import benchmark as bm  # noqa: E402
from domgen.training.stacked import train_stacked  # noqa: E402
from domgen.training.trainer import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--experiments", default="lung,lesion-a,lesion-b")
    parser.add_argument("--arch", default="linknet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = bm.resolve(FAMILIES["benchmark"].config("quick", [f"train.epochs={args.epochs}", "train.device_data=true",
                                                            f"seed={args.seed}"]))
    configurations = [bm.Configuration(e, args.arch, args.encoder, "random") for e in args.experiments.split(",")]
    settings = bm.train_settings_of(cfg)
    runs = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for c in configurations:
            model, data = bm.built(cfg, c)
            result = train(model, data[0], data[1], settings, progress=False)
            runs[(c, f"alone, {threads} thread{'s' * (threads > 1)}")] = (result, data)
    other = cfg.replace(seed=args.seed + 1)
    for c in configurations:
        model, data = bm.built(other, c)
        runs[(c, f"alone, 2 threads, seed {args.seed + 1}")] = (train(model, data[0], data[1], bm.train_settings_of(other),
                                                                     progress=False), data)
    built = [bm.built(cfg, c) for c in configurations]
    stacked = train_stacked([m for m, _ in built], [d[0] for _, d in built], [d[1] for _, d in built], settings)
    for c, result, (_, data) in zip(configurations, stacked, built):
        runs[(c, f"stacked K={len(configurations)}, 2 threads")] = (result, data)
    print(f"benchmark quick profile, {cfg.preprocessing.image_size} px, {args.epochs} epochs, seed {args.seed}, "
          f"train.device_data true, fp32")
    print(f"{'configuration':38s} {'how':26s} {'val loss per epoch':>{8 * args.epochs}s}  {'best':>4s} {'test dice':>9s}")
    for c in configurations:
        for how in [h for (cc, h) in runs if cc == c]:
            result, data = runs[(c, how)]
            dice = bm.score(result.model, data[2], cfg)[0]["dice"]
            losses = " ".join(f"{h['val_loss']:7.4f}" for h in result.history)
            print(f"{c.name:38s} {how:26s} {losses}  {result.best_epoch:4d} {dice:9.4f}")


if __name__ == "__main__":
    main()
