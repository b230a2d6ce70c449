"""Training-loop efficiency: a bare fp32 smp step vs domgen's step in fp32, channels_last, bf16, bf16+channels_last.

Same model (Linknet/resnet34, 1 channel), batch, image size, loss, optimiser and threads in every column, all in
one run. The bare column is plain PyTorch on pre-made tensors; the domgen columns draw their batches from domgen's
own SliceDataset/DataLoader, so augmentation and collation count against them. Inference is measured the same way
(bare fp32 ``model(x)`` vs ``predict_model_size``). ``--train-epochs N`` also trains each precision for N epochs on
synthetic site-A slices and prints the validation DSC, to show the faster modes do not hurt accuracy.

    python benchmarks/train_step.py --size 128 --batch 8 --steps 8 --repeats 3 --threads 2 --train-epochs 6
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
from domgen.training.trainer import (DiceBCELoss, SliceDataset, TrainSettings, cpu_has_native_bf16, mark_speed_settings,
                                     predict_model_size, to_memory_format, train, train_step)

MODES = {"fp32": ("fp32", False), "channels_last": ("fp32", True), "bf16": ("bf16", False),
         "bf16+channels_last": ("bf16", True)}


def random_slices(n: int, size: int) -> SliceSet:
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(n, 1, size, size)).astype(np.float32)
    targets = (rng.random((n, size, size)) > 0.9).astype(np.uint8)
    return SliceSet(inputs, targets, [f"s{i}" for i in range(n)], ["p"] * n, ["X"] * n, list(targets), list(targets),
                    [(1.0, 1.0)] * n)


def fresh():
    torch.manual_seed(0)
    model = smp.Linknet("resnet34", encoder_weights=None, in_channels=1, classes=1).train()
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), DiceBCELoss()


def bare_train(slices: SliceSet, batch: int, steps: int) -> float:
    model, opt, loss_fn = fresh()
    x_all = torch.from_numpy(slices.inputs)
    y_all = torch.from_numpy(slices.targets)[:, None].float()
    start = time.perf_counter()
    for i in range(steps):
        x, y = x_all[i * batch:(i + 1) * batch], y_all[i * batch:(i + 1) * batch]
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def domgen_train(slices: SliceSet, batch: int, steps: int, precision: str, channels_last: bool) -> float:
    model, opt, loss_fn = fresh()
    mark_speed_settings(model, precision, channels_last)
    loader = DataLoader(SliceDataset(slices, augment="enshaei", seed=0), batch_size=batch, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for x, y in loader:
        train_step(model, opt, loss_fn, to_memory_format(x, channels_last), y, precision)
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def bare_predict(slices: SliceSet, batch: int) -> float:
    model = fresh()[0].eval()
    x_all = torch.from_numpy(slices.inputs)
    start = time.perf_counter()
    for i in range(0, len(x_all), batch):
        torch.sigmoid(model(x_all[i:i + batch]))
    return (time.perf_counter() - start) / len(x_all)


def domgen_predict(slices: SliceSet, batch: int, precision: str, channels_last: bool) -> float:
    model = fresh()[0]
    start = time.perf_counter()
    predict_model_size(model, slices, batch_size=batch, precision=precision, channels_last=channels_last)
    return (time.perf_counter() - start) / len(slices)


def median_of(fn, repeats: int) -> float:
    fn()  # warm-up (oneDNN primitive creation)
    return statistics.median(fn() for _ in range(repeats))


def short_training(size: int, batch: int, epochs: int, modes: dict) -> None:
    """Train each mode for ``epochs`` on synthetic site-A slices (seeded); print best validation DSC and time."""
    from domgen.data.synthetic import SITES, generate_case
    from domgen.preprocessing.slices import SlicePreprocessing, prepare_slices

    pre = SlicePreprocessing(image_size=size)
    cases = [generate_case(SITES["A"], i, seed=0, scale=size / 512) for i in range(8)]
    slices = prepare_slices(cases, pre)
    patients = slices.patients()
    train_set, val_set = slices.of_patients(patients[:6]), slices.of_patients(patients[6:])
    print(f"\nshort training: site A, {len(train_set)} train / {len(val_set)} val slices, {epochs} epochs, "
          f"batch {batch}, {size} px, no early stopping")
    print(f"{'mode':<20} {'best val DSC':>12} {'final val DSC':>13} {'s/epoch':>8}")
    for name, (precision, channels_last) in modes.items():
        model = fresh()[0]
        settings = TrainSettings(epochs=epochs, batch_size=batch, patience=None, seed=0, precision=precision,
                                 channels_last=channels_last)
        result = train(model, train_set, val_set, settings, progress=False)
        dscs = [h["val_dsc"] for h in result.history]
        print(f"{name:<20} {max(dscs):12.3f} {dscs[-1]:13.3f} {result.seconds_per_epoch:8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-epochs", type=int, default=0, help="also train each mode this many epochs (0: skip)")
    ap.add_argument("--modes", default=None,
                    help=f"comma-separated subset of {','.join(MODES)}; default: all, bf16 ones only on a CPU with "
                         "native bf16 (emulated bf16 on AVX2 is ~25x slower than fp32)")
    args = ap.parse_args()
    if args.modes:
        unknown = sorted(set(args.modes.split(",")) - set(MODES))
        if unknown:
            ap.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
        modes = {m: MODES[m] for m in args.modes.split(",")}
    else:
        modes = {m: v for m, v in MODES.items() if v[0] == "fp32" or cpu_has_native_bf16()}
    torch.set_num_threads(args.threads)
    slices = random_slices(args.batch * args.steps, args.size)
    print(f"size {args.size} batch {args.batch} threads {args.threads} steps {args.steps} x {args.repeats} "
          f"(median); native CPU bf16: {cpu_has_native_bf16()}; torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    bare_t = median_of(lambda: bare_train(slices, args.batch, args.steps), args.repeats)
    bare_p = median_of(lambda: bare_predict(slices, args.batch), args.repeats)
    print(f"{'mode':<28} {'train ms/step':>13} {'x bare':>7} {'predict ms/slice':>17} {'x bare':>7}")
    print(f"{'bare smp (fp32)':<28} {bare_t * 1000:13.1f} {1.0:7.2f} {bare_p * 1000:17.2f} {1.0:7.2f}")
    for name, (precision, channels_last) in modes.items():
        t = median_of(lambda: domgen_train(slices, args.batch, args.steps, precision, channels_last), args.repeats)
        p = median_of(lambda: domgen_predict(slices, args.batch, precision, channels_last), args.repeats)
        print(f"{'domgen ' + name:<28} {t * 1000:13.1f} {bare_t / t:7.2f} {p * 1000:17.2f} {bare_p / p:7.2f}")
    if args.train_epochs:
        short_training(args.size, args.batch, args.train_epochs, modes)


if __name__ == "__main__":
    main()
