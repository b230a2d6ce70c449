"""Training-loop efficiency: a bare smp forward+backward+step vs domgen's training step.

Same model (Linknet/resnet34, 1 channel), batch, image size, loss, optimiser and threads; the batches are
drawn from domgen's own SliceDataset/DataLoader in the domgen column, so augmentation and collation count.
Prints the mean seconds per step of each and the ratio bare/domgen (1.0 = no overhead).

    python benchmarks/train_step.py --size 64 --batch 16 --steps 20 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import segmentation_models_pytorch as smp
import torch
from torch.utils.data import DataLoader

from domgen.preprocessing.slices import SliceSet
from domgen.training.trainer import DiceBCELoss, SliceDataset, train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.batch * args.steps
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(n, 1, args.size, args.size)).astype(np.float32)
    targets = (rng.random((n, args.size, args.size)) > 0.9).astype(np.uint8)
    slices = SliceSet(inputs, targets, [f"s{i}" for i in range(n)], ["p"] * n, ["X"] * n, list(targets), list(targets), [(1.0, 1.0)] * n)

    def fresh():
        torch.manual_seed(0)
        model = smp.Linknet("resnet34", encoder_weights=None, in_channels=1, classes=1).train()
        return model, torch.optim.Adam(model.parameters(), lr=1e-3), DiceBCELoss()

    def bare() -> float:
        model, opt, loss_fn = fresh()
        x_all = torch.from_numpy(inputs)
        y_all = torch.from_numpy(targets)[:, None].float()
        start = time.perf_counter()
        for i in range(args.steps):
            x, y = x_all[i * args.batch:(i + 1) * args.batch], y_all[i * args.batch:(i + 1) * args.batch]
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) / args.steps

    def domgen() -> float:
        model, opt, loss_fn = fresh()
        loader = DataLoader(SliceDataset(slices, augment="enshaei", seed=0), batch_size=args.batch, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        for x, y in loader:
            train_step(model, opt, loss_fn, x, y)
        return (time.perf_counter() - start) / args.steps

    bare(), domgen()  # warm-up
    b = [bare() for _ in range(args.repeats)]
    d = [domgen() for _ in range(args.repeats)]
    mb, md = statistics.median(b), statistics.median(d)
    print(f"size {args.size} batch {args.batch} threads {args.threads} steps {args.steps} x {args.repeats}")
    print(f"bare smp step   : {mb * 1000:8.1f} ms")
    print(f"domgen step     : {md * 1000:8.1f} ms  (DataLoader + albumentations + train_step)")
    print(f"ratio bare/domgen: {mb / md:.3f}")


if __name__ == "__main__":
    main()
