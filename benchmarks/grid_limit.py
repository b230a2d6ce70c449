"""How far the benchmark grid's training is from the GPU's limit (issue 22): per configuration, the FLOPs of one
training step per slice (forward + backward, counted by torch.utils.flop_counter.FlopCounterMode, not estimated),
the seconds per training epoch measured through domgen's ``train``, the TFLOP/s that makes, and its fraction of a
peak. ``--peak-tflops`` defaults to 989, the H100/H200 SXM dense bf16 tensor-core peak (no sparsity); an fp32 run is
compared with it too, so the fraction is of what the chip could do, not of what fp32 could.

``--stack 2,6`` also measures K models of the configuration trained as one stacked model (``train_stacked``, what
``domgen benchmark --stack K`` does; fp32, data on the device). Every row gives the seconds per configuration-epoch
(training + validation, a stacked group's divided by K) and what the 600-configuration x 200-epoch grid would take
in hours of this device if every configuration cost what this one does.

    python benchmarks/grid_limit.py --device cuda                                  # paper size, default modes
    python benchmarks/grid_limit.py --device cuda --modes default,device_data,device_data+compile,device_data+compile+bf16 --stack 2,6 --stack-compile
    python benchmarks/grid_limit.py --size 64 --device cpu --epochs 2 --archs unet --encoders resnet18   # a try on a CPU
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from domgen.models import build_model  # noqa: E402
from domgen.training.stacked import train_stacked  # noqa: E402
from domgen.training.trainer import LOSSES, TrainSettings, train  # noqa: E402

BATCH, N_TRAIN, N_VAL = 2, 80, 20
GRID_CONFIGURATIONS, GRID_EPOCHS = 600, 200
H100_BF16_DENSE_TFLOPS = 989.0
MODES = {"default": {}, "device_data": {"device_data": True}, "device_data+compile": {"device_data": True, "compile": True},
         "device_data+compile+bf16": {"device_data": True, "compile": True, "precision": "bf16"}}


def training_flops_per_slice(model: torch.nn.Module, size: int, batch: int = BATCH, loss: str = "soft-dice-eq1",
                             device: str = "cpu") -> float:
    """FLOPs (a multiply-add counts 2) of one forward + backward of ``model`` on a (batch, 1, size, size) batch, per
    slice, as FlopCounterMode counts them (convolutions and matrix products; element-wise work is not counted)."""
    model = model.to(device).train()
    x = torch.randn(batch, 1, size, size, device=device)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.9).float()
    with FlopCounterMode(display=False) as counter:
        LOSSES[loss]()(model(x).float(), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def _settings(epochs: int, device: str, **mode) -> TrainSettings:
    return TrainSettings(epochs=epochs, batch_size=BATCH, lr=1e-3, patience=None, loss="soft-dice-eq1",
                         select_by="val_loss", augment="bizopoulos", device=device, **mode)


def _row(flops: float, histories: list[list[dict]], k: int = 1) -> dict:
    """Figures of one measurement: ``histories`` of the K models trained together (one for a single model)."""
    later = histories[0][1:] or histories[0]  # epoch 0: autotuning, allocation, compilation
    # a stacked record's seconds are the group's divided by K already
    train_s = statistics.median(h["train_seconds"] for h in later)
    epoch_s = statistics.median(h["train_seconds"] + h["val_seconds"] for h in later)
    steps = N_TRAIN // BATCH
    return {"flops_per_slice": flops, "k": k, "train_s": train_s, "epoch_s": epoch_s,
            "tflops": flops * steps * BATCH / train_s / 1e12, "ms_per_step": 1e3 * train_s * k / steps,
            "grid_gpu_hours": GRID_CONFIGURATIONS * GRID_EPOCHS * epoch_s / 3600}


def measure(arch: str, encoder: str, size: int, epochs: int, device: str, mode: dict) -> dict:
    from benchmarks.gpu_epoch import random_slices  # the same stand-in slices as gpu_epoch.py

    torch.manual_seed(0)
    flops = training_flops_per_slice(build_model(arch, encoder, "none", 1), size, device=device)
    torch.manual_seed(0)
    model = build_model(arch, encoder, "none", 1)
    result = train(model, random_slices(N_TRAIN, size, 0), random_slices(N_VAL, size, 1), _settings(epochs, device, **mode),
                   progress=False)
    return _row(flops, [result.history])


def measure_stacked(arch: str, encoder: str, size: int, epochs: int, device: str, k: int, compile: bool = False) -> dict:
    """K models of one configuration (other inits, other data) trained as one stacked model (``compile``: its
    training forward pass through torch.compile)."""
    from benchmarks.gpu_epoch import random_slices

    torch.manual_seed(0)
    flops = training_flops_per_slice(build_model(arch, encoder, "none", 1), size, device=device)
    models = []
    for i in range(k):
        torch.manual_seed(i)
        models.append(build_model(arch, encoder, "none", 1))
    results = train_stacked(models, [random_slices(N_TRAIN, size, 2 * i) for i in range(k)],
                            [random_slices(N_VAL, size, 2 * i + 1) for i in range(k)],
                            _settings(epochs, device, device_data=True, compile=compile))
    return _row(flops, [r.history for r in results], k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512, help="slice size (the paper's: 512)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per configuration (the first is left out)")
    parser.add_argument("--archs", default="unet,linknet,fpn,pspnet")
    parser.add_argument("--encoders", default="resnet34,efficientnet-b3")
    parser.add_argument("--modes", default="default,device_data,device_data+compile", help=f"of {', '.join(MODES)}")
    parser.add_argument("--stack", default="", help="comma-separated K > 1: also K models trained as one stacked model")
    parser.add_argument("--stack-compile", action="store_true", help="each --stack K also with its forward pass compiled")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="the chip's peak; default 989 = H100/H200 SXM dense bf16 tensor cores")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        parser.error(f"--modes {','.join(unknown)} unknown; use some of {', '.join(MODES)}")
    try:
        stacks = [int(k) for k in args.stack.split(",") if k]
    except ValueError:
        parser.error(f"--stack {args.stack}: give whole numbers above 1, e.g. 2,6")
    if any(k < 2 for k in stacks):
        parser.error(f"--stack {args.stack}: give whole numbers above 1, e.g. 2,6")
    print(f"{args.device}, {args.size}x{args.size}, batch {BATCH}, {N_TRAIN} training + {N_VAL} validation slices; "
          f"peak {args.peak_tflops:g} TFLOP/s; grid = {GRID_CONFIGURATIONS} configurations x {GRID_EPOCHS} epochs")
    print(f"{'arch':8s} {'encoder':16s} {'mode':26s} {'GFLOP/slice':>11s} {'train s':>8s} {'ms/step':>8s} {'TFLOP/s':>8s} "
          f"{'of peak':>8s} {'s/config-epoch':>14s} {'grid hours':>10s}")
    for encoder in args.encoders.split(","):
        for arch in args.archs.split(","):
            rows = [(mode, lambda mode=mode: measure(arch, encoder, args.size, args.epochs, args.device, MODES[mode])) for mode in modes]
            rows += [(f"stacked K={k}" + "+compile" * c,
                      lambda k=k, c=c: measure_stacked(arch, encoder, args.size, args.epochs, args.device, k, c))
                     for k in stacks for c in ((False, True) if args.stack_compile else (False,))]
            for name, run in rows:
                row = run()
                print(f"{arch:8s} {encoder:16s} {name:26s} {row['flops_per_slice'] / 1e9:11.2f} {row['train_s']:8.2f} "
                      f"{row['ms_per_step']:8.1f} {row['tflops']:8.3f} {100 * row['tflops'] / args.peak_tflops:7.3f}% "
                      f"{row['epoch_s']:14.3f} {row['grid_gpu_hours']:10.1f}", flush=True)


if __name__ == "__main__":
    main()
