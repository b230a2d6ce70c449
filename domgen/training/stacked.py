"""K models of one architecture and encoder trained in lockstep as one (issue 22): many configurations per GPU without
many processes.

The grid's configurations that share an architecture x encoder (random vs ImageNet init, the three experiments) have
the same shapes, so their parameters and BatchNorm buffers are stacked (``torch.func.stack_module_state``) and one
``vmap`` of ``functional_call`` runs all K forward passes, each on its own batch, as one set of kernel launches.
The loss is the sum of the K models' losses, so each model's gradient is its own; Adam and SGD act element by element,
so one optimiser over the stacked tensors updates each model exactly as its own optimiser would. BatchNorm's running
statistics are stacked buffers updated in place under vmap, one slice per model.

``domgen benchmark --stack K`` (``domgen.families.benchmark.run_group``) trains up to K configurations of the grid that
share an architecture and encoder this way, one MLflow run each, as if each had been trained alone with
``train.device_data: true``. fp32 only: autocast does not reach inside ``torch.vmap`` in this PyTorch (a bf16 or fp16
step would run, partly or wholly, in fp32 under a half-precision label; pytorch/pytorch#192617, #184890); channels_last
is not built for the stacked step either. Each is refused in one sentence (``check_stackable``). ``train.compile``
compiles the stacked training forward pass (``torch.compile`` of the vmapped call; validation stays eager, as in
``train``).
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state
from tqdm.auto import tqdm

from domgen.errors import DomgenError
from domgen.preprocessing.slices import SliceSet
from domgen.training.device_augment import DeviceBatches, DeviceSlices
from domgen.training.trainer import (LOSSES, OPTIMIZERS, TrainResult, TrainSettings, compile_model, device_type,
                                     mark_speed_settings, memory_format_name, poly_lr, resolve_precision, seed_everything)


class StackedModels:
    """K same-shaped models as stacked parameters (leaves the optimiser updates) and buffers, with a vmapped forward."""

    def __init__(self, models: list[nn.Module], device: str) -> None:
        shapes = [[(k, tuple(v.shape)) for k, v in m.state_dict().items()] for m in models]
        if any(s != shapes[0] for s in shapes):
            raise DomgenError("stacked training needs models of one architecture and encoder; these differ in their "
                              "parameters' names or shapes")
        self.template = copy.deepcopy(models[0]).to("meta")  # the structure only; the numbers are in the stacks
        params, buffers = stack_module_state([m.to(device) for m in models])
        self.params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        self.buffers = buffers
        self.k = len(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(K, B, C, H, W) -> (K, B, 1, H, W): model k on batch k."""
        def one(params, buffers, xb):
            return functional_call(self.template, (params, buffers), (xb,))

        return torch.vmap(one, randomness="different")(self.params, self.buffers, x)

    def train(self, mode: bool = True) -> None:
        self.template.train(mode)

    def state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Model k's weights and buffers, as its own ``state_dict``."""
        return {**{n: p[k].detach().clone() for n, p in self.params.items()},
                **{n: b[k].clone() for n, b in self.buffers.items()}}


def stacked_step(stack: StackedModels, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, x: torch.Tensor,
                 y: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """One step of all K models, model k on (x[k], y[k]); returns the K detached losses (no host sync).
    ``forward``: the stack's forward pass to use (a compiled one), by default ``stack.forward``."""
    optimizer.zero_grad(set_to_none=True)
    logits = (forward or stack.forward)(x).float()
    losses = torch.stack([loss_fn(logits[k], y[k]) for k in range(stack.k)])
    losses.sum().backward()  # the models share nothing, so the sum's gradient w.r.t. model k is model k's own
    optimizer.step()
    return losses.detach()


@torch.no_grad()
def _validate(stack: StackedModels, loss_fn: nn.Module, val: list[DeviceSlices], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each model's validation loss (mean over slices) and DSC (pixels pooled), one host sync."""
    stack.train(False)
    n = len(val[0])
    losses = torch.zeros(stack.k, dtype=torch.float64, device=val[0].inputs.device)
    counts = torch.zeros(stack.k, 3, device=val[0].inputs.device)
    for start in range(0, n, batch_size):
        x = torch.stack([v.inputs[start:start + batch_size] for v in val])
        y = torch.stack([v.targets[start:start + batch_size][:, None] for v in val])
        logits = stack.forward(x).float()
        for k in range(stack.k):
            losses[k] += loss_fn(logits[k], y[k]).double() * len(x[k])
            pred, truth = logits[k] > 0, y[k] > 0
            counts[k] += torch.stack([(pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()]).float()
    losses, counts = (losses / n).cpu().numpy(), counts.cpu().numpy().astype(np.float64)
    denominator = 2 * counts[:, 0] + counts[:, 1] + counts[:, 2]
    dsc = np.where(denominator > 0, 2 * counts[:, 0] / np.maximum(denominator, 1), 1.0)
    return losses, dsc


def check_stackable(settings: TrainSettings) -> None:
    """Nothing, or one sentence naming the setting the stacked step cannot honour and the fix."""
    precision = resolve_precision(settings.precision, settings.device)
    problems = [(settings.patience is not None, f"train.patience is {settings.patience} (the models would stop apart)",
                 "train.patience=null"),
                (precision != "fp32", f"train.precision {settings.precision} runs {precision} here, and autocast does not "
                 "reach inside torch.vmap (the step would run fp32 under a half-precision label)", "train.precision=fp32"),
                (settings.channels_last, "train.channels_last is true (not built for the stacked step)",
                 "train.channels_last=false")]
    for bad, what, fix in problems:
        if bad:
            raise DomgenError(f"stacked training cannot run here: {what}; use --set {fix}, or train one model at a "
                              "time (--stack 1)")


def train_stacked(models: list[nn.Module], train_sets: list[SliceSet], val_sets: list[SliceSet],
                  settings: TrainSettings, on_epoch: list[Callable[[dict], None]] | None = None,
                  progress: bool = False, desc: str = "train stacked") -> list[TrainResult]:
    """Train model k on (train_sets[k], val_sets[k]) for ``settings.epochs``, all K in lockstep on ``settings.device``;
    each keeps its best epoch by ``settings.select_by``. The data stay on the device (``device_augment``), augmented
    per model with its own (seed, epoch) stream, as ``train`` with ``device_data`` does; no early stopping (the models
    would stop apart). ``on_epoch[k]`` gets model k's record of each epoch, with the keys ``train``'s records have;
    its ``train_seconds`` / ``val_seconds`` are the group's seconds divided by K (each model's share of the device)."""
    if not (len(models) == len(train_sets) == len(val_sets)) or not models or (on_epoch and len(on_epoch) != len(models)):
        raise DomgenError("train_stacked needs as many training and validation sets (and epoch callbacks) as models")
    if len({len(s) for s in train_sets}) != 1 or len({len(s) for s in val_sets}) != 1 or not len(val_sets[0]):
        raise DomgenError("stacked training needs training sets of one size and validation sets of one (non-zero) size; "
                          "train these configurations one by one")
    check_stackable(settings)
    seed_everything(settings.seed)
    device = settings.device
    stack = StackedModels(models, device)
    loss_fn = LOSSES[settings.loss]()
    optimizer = OPTIMIZERS[settings.optimizer](list(stack.params.values()), settings)
    forward = compile_model(stack.forward, device) if settings.compile else stack.forward
    batches = [DeviceBatches(s, settings.augment, settings.seed, settings.batch_size, device) for s in train_sets]
    val = [DeviceSlices.of(s, device) for s in val_sets]
    k = len(models)
    histories: list[list[dict]] = [[] for _ in range(k)]
    best = [(-np.inf, 0, None)] * k
    started = time.perf_counter()
    bar = tqdm(range(settings.epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        if settings.schedule == "poly":
            for group in optimizer.param_groups:
                group["lr"] = poly_lr(settings.lr, epoch, settings.epochs, settings.poly_power)
        stack.train(True)
        for b in batches:
            b.set_epoch(epoch)
        epoch_started = time.perf_counter()
        total, count = torch.zeros(k, device=device), 0
        for pairs in zip(*batches):
            x, y = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            total += stacked_step(stack, optimizer, loss_fn, x, y, forward) * x.shape[1]
            count += x.shape[1]
        if device_type(device) == "cuda":
            torch.cuda.synchronize(device)  # the queued steps belong to the training seconds
        val_started = time.perf_counter()
        val_loss, val_dsc = _validate(stack, loss_fn, val, settings.batch_size)
        train_loss = (total / max(count, 1)).cpu().numpy()  # one sync per epoch
        val_seconds = time.perf_counter() - val_started
        for i in range(k):
            record = {"epoch": epoch, "train_loss": float(train_loss[i]), "val_loss": float(val_loss[i]),
                      "val_dsc": float(val_dsc[i]), "lr": optimizer.param_groups[0]["lr"],
                      "train_seconds": (val_started - epoch_started) / k, "val_seconds": val_seconds / k,
                      "precision": "fp32", "memory_format": memory_format_name(False)}
            histories[i].append(record)
            if on_epoch:
                on_epoch[i](record)
            score = val_dsc[i] if settings.select_by == "val_dsc" else -val_loss[i]
            if settings.select_by == "last" or score > best[i][0]:
                best[i] = (score, epoch, stack.state_dict(i))
        bar.set_postfix(loss=f"{float(train_loss.mean()):.3f}", val_loss=f"{float(val_loss.mean()):.3f}")
    seconds = (time.perf_counter() - started) / max(settings.epochs, 1)
    results = []
    for i, model in enumerate(models):
        model.load_state_dict(best[i][2])
        mark_speed_settings(model, "fp32", False)
        results.append(TrainResult(model, best[i][1], settings.epochs, histories[i], seconds))
    return results
