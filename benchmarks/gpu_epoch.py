"""Seconds per epoch of the benchmark's paper profile on a GPU, through domgen's own ``train`` (DataLoader,
augmentation, validation included), and how many trials one GPU holds at once.

The paper profile: 512x512, batch 2, 80 training + 20 validation slices (MedSeg 100's ordered split), soft Dice
Eq. 1, Bizopoulos augmentation, 200 epochs, 600 configurations. Random slices stand in for MedSeg (the cost of an
epoch does not depend on the pixel values). Epoch 0 (cuDNN autotuning, allocations) is left out of the median.

    python benchmarks/gpu_epoch.py sample  [--encoders resnet34,efficientnet-b3] [--epochs 3]   # arch x encoder, fp32
    python benchmarks/gpu_epoch.py modes   [--arch linknet --encoder resnet34]                   # fp32 / channels_last / bf16 / fp16, loader workers
    python benchmarks/gpu_epoch.py share   [--trials 1,2,4]                                      # K trials on one GPU at once
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from domgen.models import build_model
from domgen.preprocessing.slices import SliceSet
from domgen.training.trainer import TrainSettings, train

SIZE, BATCH, N_TRAIN, N_VAL, EPOCHS_PAPER, CONFIGURATIONS = 512, 2, 80, 20, 200, 600


def random_slices(n: int, size: int, seed: int) -> SliceSet:
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(n, 1, size, size)).astype(np.float32)
    targets = (rng.random((n, size, size)) > 0.9).astype(np.uint8)
    return SliceSet(inputs, targets, [f"s{i}" for i in range(n)], ["p"] * n, ["X"] * n, list(targets), list(targets),
                    [(1.0, 1.0)] * n)


def seconds_per_epoch(arch: str, encoder: str, epochs: int, device: str, **train_keys) -> dict:
    """Median seconds per epoch (training + validation) of epochs 1.. of a fresh model."""
    torch.manual_seed(0)
    model = build_model(arch, encoder, "none", 1)
    settings = TrainSettings(epochs=epochs, batch_size=BATCH, lr=1e-3, patience=None, loss="soft-dice-eq1", select_by="val_loss",
                             augment="bizopoulos", device=device, **train_keys)
    result = train(model, random_slices(N_TRAIN, SIZE, 0), random_slices(N_VAL, SIZE, 1), settings, progress=False)
    later = result.history[1:] or result.history
    epoch = statistics.median(h["train_seconds"] + h["val_seconds"] for h in later)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return {"arch": arch, "encoder": encoder, "s_per_epoch": epoch, "params_m": params,
            "train_s": statistics.median(h["train_seconds"] for h in later), "val_s": statistics.median(h["val_seconds"] for h in later),
            **{k: str(v) for k, v in train_keys.items()}}


def sample(args) -> None:
    rows = []
    for encoder in args.encoders.split(","):
        for arch in args.archs.split(","):
            row = seconds_per_epoch(arch, encoder, args.epochs, args.device, loader_workers=args.loader_workers)
            rows.append(row)
            print(f"  {arch:8s} {encoder:16s} {row['params_m']:6.1f} M params  {row['s_per_epoch']:6.2f} s/epoch "
                  f"(train {row['train_s']:.2f}, validation {row['val_s']:.2f})", flush=True)
    mean = float(np.mean([r["s_per_epoch"] for r in rows]))
    hours = mean * EPOCHS_PAPER * CONFIGURATIONS / 3600
    print(f"\nsample: {len(rows)} configurations on {name(args.device)}, fp32, loader_workers {args.loader_workers}: "
          f"mean {mean:.2f} s/epoch at {SIZE}x{SIZE}, batch {BATCH}, {N_TRAIN} + {N_VAL} slices")
    print(f"projection: {CONFIGURATIONS} configurations x {EPOCHS_PAPER} epochs x {mean:.2f} s = {hours:.1f} GPU-hours "
          "at one trial per GPU (test inference, model building and logging not counted)")


MODES = {"fp32": {}, "fp32 + channels_last": {"channels_last": True}, "bf16 AMP": {"precision": "bf16"},
         "fp16 AMP": {"precision": "fp16"}, "fp16 AMP + channels_last": {"precision": "fp16", "channels_last": True}}


def modes(args) -> None:
    for workers in (0, args.loader_workers):
        for label, keys in MODES.items():
            row = seconds_per_epoch(args.arch, args.encoder, args.epochs, args.device, loader_workers=workers, **keys)
            print(f"  {args.arch} {args.encoder}  {label:26s} loader_workers {workers}: {row['s_per_epoch']:6.2f} s/epoch "
                  f"(train {row['train_s']:.2f}, validation {row['val_s']:.2f})", flush=True)


def share(args) -> None:
    """K copies of one trial started together on the one GPU; each prints its seconds per epoch."""
    for k in (int(t) for t in args.trials.split(",")):
        started = time.perf_counter()
        cmd = [sys.executable, __file__, "one", "--arch", args.arch, "--encoder", args.encoder, "--epochs", str(args.epochs),
               "--device", args.device, "--loader-workers", str(args.loader_workers), "--size", str(SIZE)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(k)]
        rows = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        wall = time.perf_counter() - started
        per_trial = statistics.median(r["s_per_epoch"] for r in rows)
        print(f"  {k} trial(s) of {args.arch}/{args.encoder} at once: {per_trial:6.2f} s/epoch each -> "
              f"{per_trial / k:6.2f} s per configuration-epoch on the GPU (wall {wall:.0f} s with start-up)", flush=True)


def one(args) -> None:
    print(json.dumps(seconds_per_epoch(args.arch, args.encoder, args.epochs, args.device, loader_workers=args.loader_workers)))


def name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else os.uname().machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sample", "modes", "share", "one"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--archs", default="unet,linknet,fpn,pspnet")
    parser.add_argument("--encoders", default="resnet34,efficientnet-b3")
    parser.add_argument("--arch", default="linknet")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--loader-workers", type=int, default=4)
    parser.add_argument("--trials", default="1,2,4")
    parser.add_argument("--size", type=int, default=SIZE, help="slice size (the paper's: 512; smaller only to try the script)")
    args = parser.parse_args()
    globals()["SIZE"] = args.size
    {"sample": sample, "modes": modes, "share": share, "one": one}[args.what](args)


if __name__ == "__main__":
    main()
