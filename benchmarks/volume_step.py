"""Seconds per 3D training iteration of a cross-validate profile, and the FLOPs of one iteration.

One iteration = ``batch_size`` patches sampled and augmented (MONAI, p = 0.15 each) + forward + Tversky/CE
loss + backward + Adam step of the profile's 3D U-Net, on synthetic volumes of the given size. ``--patch``
measures a smaller patch when the full one does not fit the machine; the projection to the profile's patch
scales by voxels (convolution cost is linear in voxels) and is printed beside the measured FLOPs.

    python benchmarks/volume_step.py --profile quick --iterations 10 --threads 2
    python benchmarks/volume_step.py --profile paper --patch 80 80 40 --iterations 3 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from domgen.config import load_profile
from domgen.models.unet3d import build_model_3d
from domgen.preprocessing.volume import Volume
from domgen.training.volume_trainer import (PatchSampler, TverskyCrossEntropyLoss, VolumeTrainSettings, _batch,
                                            muller_augmentation)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--patch", type=int, nargs=3, default=None, help="x y z voxels (default: the profile's)")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_profile("cross_validate", args.profile)
    full = tuple(cfg["train"]["patch_size"])
    patch = tuple(args.patch) if args.patch else full
    settings = VolumeTrainSettings.from_config({**cfg["train"], "patch_size": list(patch)}, device=args.device)
    rng = np.random.default_rng(0)
    shape = tuple(int(p * 1.5) for p in patch)
    labels = (rng.random(shape) > 0.7).astype(np.uint8) + (rng.random(shape) > 0.9).astype(np.uint8)
    volumes = [Volume(rng.standard_normal((1, *shape)).astype(np.float32), labels, np.eye(4), None) for _ in range(2)]
    samplers = [PatchSampler(patch, settings.sampler, seed=i) for i in range(2)]
    augment = muller_augmentation(settings.augment_p, 0) if settings.augment else None
    torch.manual_seed(0)
    model = build_model_3d(cfg["model"]).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    loss_fn = TverskyCrossEntropyLoss()

    def step() -> None:
        x, y = _batch(volumes, samplers, rng, settings, augment)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x.to(args.device)), y.to(args.device))
        loss.backward()
        optimizer.step()
        if args.device == "cuda":
            torch.cuda.synchronize()

    with FlopCounterMode(display=False) as counter:
        step()  # also the warm-up
    times = []
    for _ in range(args.iterations):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    scale = float(np.prod(full)) / float(np.prod(patch))
    per = statistics.median(times)
    params = sum(p.numel() for p in model.parameters())
    print(f"profile {args.profile}: model {cfg['model']['features']} ({params / 1e6:.2f} M parameters), batch {settings.batch_size}, "
          f"patch {list(patch)}, {args.threads} threads, {args.device}")
    print(f"seconds per iteration: median {per:.3f} (min {min(times):.3f}, max {max(times):.3f}, {len(times)} iterations)")
    print(f"GFLOP per iteration (forward + backward): {counter.get_total_flops() / 1e9:.1f}")
    if scale != 1.0:
        print(f"projected to the profile's patch {list(full)} (x{scale:.1f} voxels): {per * scale:.1f} s per iteration, "
              f"{counter.get_total_flops() * scale / 1e12:.2f} TFLOP per iteration")
    epoch = per * scale * settings.iterations_per_epoch
    print(f"one epoch ({settings.iterations_per_epoch} iterations): {epoch:.0f} s; 100 epochs: {epoch * 100 / 3600:.1f} h")


if __name__ == "__main__":
    main()
