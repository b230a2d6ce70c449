"""The training loop: Adam (or SGD), early stopping on validation loss, best weights by a chosen criterion.

Defaults follow Enshaei et al. (Dice + BCE, lr 1e-3, patience 5, keep best validation DSC); Bizopoulos
et al. use soft Dice and keep the lowest validation loss; Wang et al.'s Continual Learning uses the poly
schedule lr * (1 - epoch/max_epochs)^0.9.

Speed (issue 9): ``precision`` runs the forward pass under autocast (weights, gradients and the optimiser stay
fp32; the loss is taken on fp32 logits), and ``channels_last`` stores activations NHWC, which oneDNN's convolutions
prefer on CPU. ``bf16`` works on CPU and CUDA; ``fp16`` is CUDA only (float16 autocast with a ``GradScaler``, the
torch.amp recipe, so small gradients do not underflow). ``auto`` picks bf16 only on a CPU with native bf16 (AVX-512
BF16 or AMX); on CUDA it stays fp32 unless ``bf16`` or ``fp16`` is asked for.

Speed on a GPU (issue 12): ``loader_workers`` processes prepare and augment the batches while the GPU trains, and
``pin_memory`` (``auto``: on with CUDA) puts them in page-locked memory so the copy to the GPU is non-blocking. A
slice's augmentation is drawn from (seed, epoch, index) alone, so the number of workers never changes the numbers.

Near the GPU's limit (issue 22), both off by default: ``device_data`` keeps the slices on the device and augments each
batch there (``device_augment.py``: same distribution, other numbers), so no step waits for the host; ``compile`` runs
the training forward and backward through ``torch.compile`` (fewer kernel launches), eager where it cannot compile.
"""
from __future__ import annotations

import copy
import functools
import random
import time
from dataclasses import dataclass, field
from contextlib import nullcontext
from typing import Callable

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler
from tqdm.auto import tqdm

from domgen.errors import DomgenError
from domgen.preprocessing.slices import SliceSet
from domgen.settings import LOO, default
from domgen.training.augment import build_augmentation, seed_augmentation


@dataclass(frozen=True)
class TrainSettings:
    """The 2D train section; every default is its leave-one-out row of domgen/settings.py (the one home)."""

    epochs: int = default(LOO, "train.epochs")
    batch_size: int = default(LOO, "train.batch_size")
    lr: float = default(LOO, "train.lr")
    patience: int | None = default(LOO, "train.patience")  # epochs without a better validation loss before stopping
    loss: str = default(LOO, "train.loss")  # a LOSSES name
    # "val_dsc" (Enshaei), "val_loss" (Bizopoulos) or "last" (the final epoch's weights)
    select_by: str = default(LOO, "train.select_by")
    schedule: str = default(LOO, "train.schedule")  # "constant" or "poly" (Wang et al.)
    poly_power: float = default(LOO, "train.poly_power")
    augment: str = default(LOO, "train.augment")
    augment_params: dict | None = None  # keyword arguments of the recipe's builder (domgen compare: rows method.<name>.*)
    seed: int = 0
    device: str = "cpu"
    # an OPTIMIZERS name: adam (Enshaei, Bizopoulos) | sgd (Wang et al.: nnU-Net's SGD)
    optimizer: str = default(LOO, "train.optimizer")
    momentum: float = default(LOO, "train.momentum")  # sgd only
    nesterov: bool = default(LOO, "train.nesterov")  # sgd only
    precision: str = default(LOO, "train.precision")  # a PRECISIONS name: fp32 | bf16 | fp16 (CUDA only) | auto
    channels_last: bool = default(LOO, "train.channels_last")  # NHWC activations (faster convolutions on CPU with oneDNN)
    # DataLoader worker processes preparing batches (0: in the training process)
    loader_workers: int = default(LOO, "train.loader_workers")
    # page-locked batches for non-blocking copies to the GPU; auto: on with CUDA
    pin_memory: bool | str = default(LOO, "train.pin_memory")
    device_data: bool = default(LOO, "train.device_data")  # slices on the device, augmented there in batches (device_augment.py)
    compile: bool = default(LOO, "train.compile")  # torch.compile the training forward/backward (eager where it cannot compile)

    def __post_init__(self) -> None:
        resolve_precision(self.precision, self.device)  # an unknown name, or fp16 on a CPU, is one sentence
        if not isinstance(self.channels_last, bool):
            raise DomgenError(f"train.channels_last is {self.channels_last!r}; use true or false.")
        if isinstance(self.loader_workers, bool) or not isinstance(self.loader_workers, int) or self.loader_workers < 0:
            raise DomgenError(f"train.loader_workers is {self.loader_workers!r}; use 0 or more.")
        resolve_pin_memory(self.pin_memory, self.device)
        for key in ("device_data", "compile"):
            if not isinstance(getattr(self, key), bool):
                raise DomgenError(f"train.{key} is {getattr(self, key)!r}; use true or false.")
        if self.device_data:
            from domgen.training.device_augment import recipe

            recipe(self.augment)  # an augmentation with no device version: one sentence now, not after the first epoch

    @classmethod
    def from_config(cls, cfg: dict, **override) -> "TrainSettings":
        known = {k: v for k, v in {**cfg, **override}.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class DiceBCELoss(nn.Module):
    """Dice + binary cross-entropy on logits (Enshaei et al.)."""

    def __init__(self) -> None:
        super().__init__()
        self.dice = smp.losses.DiceLoss(mode="binary", from_logits=True)
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, target) + self.bce(logits, target)


class SquaredDiceLoss(nn.Module):
    """Bizopoulos et al.'s Eq. 1: 1 - 2 sum(Y Yhat) / (sum(Y^2) + sum(Yhat^2) + eps), Yhat = sigmoid(logits),
    sums over the whole batch, eps = 1e-5 in the denominator only: a batch with no target pixel scores 1 (and gives
    no gradient), whatever is predicted."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits.float())
        t = target.float()
        return 1.0 - 2.0 * (p * t).sum() / ((t * t).sum() + (p * p).sum() + self.eps)  # Eq. 1: eps only below


LOSSES: dict[str, Callable[[], nn.Module]] = {
    "dice+bce": DiceBCELoss,
    # Bizopoulos et al.'s Eq. 1 (squares in the denominator)
    "soft-dice-eq1": SquaredDiceLoss,
    # smp's soft Dice, eps 1e-5: 1 - (2|P.T| + eps) / (|P| + |T| + eps) per channel, an empty target scores 0 (domgen < 0.2)
    "soft-dice": lambda: smp.losses.DiceLoss(mode="binary", from_logits=True, smooth=1e-5),
}


PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def cpu_has_native_bf16() -> bool:
    """True when oneDNN can run bf16 convolutions natively (AVX-512 BF16 or AMX); emulated bf16 is slower than fp32."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(check()) for check in checks if check is not None)


def resolve_precision(precision: str, device: str) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``device``.

    ``auto`` is bf16 on a CPU with native bf16 and fp32 elsewhere: on CUDA it stays fp32 unless AMP is asked for
    (``bf16``, or ``fp16`` with a gradient scaler). ``fp16`` on a CPU is refused: bf16 is the CPU's half precision.
    """
    if precision not in PRECISIONS:
        raise DomgenError(f"train.precision is {precision!r}; use one of {', '.join(PRECISIONS)}.")
    if precision == "fp16" and device_type(device) != "cuda":
        raise DomgenError(f"train.precision fp16 needs --device cuda (the device is {device}); on a CPU use "
                          "--set train.precision=bf16.")
    if precision == "auto":
        return "bf16" if device_type(device) == "cpu" and cpu_has_native_bf16() else "fp32"
    return precision


def memory_format_name(channels_last: bool) -> str:
    """The name a run records for its activations' layout (tag ``domgen.memory_format``)."""
    return "channels_last" if channels_last else "contiguous"


def device_type(device: str) -> str:
    return torch.device(device).type


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: str):
    """bf16 or fp16 autocast context for ``device`` (a resolved precision), or a no-op for fp32."""
    if precision not in AUTOCAST_DTYPES:
        return nullcontext()
    resolve_precision(precision, device)  # fp16 on a CPU: one sentence, not torch's warning
    return torch.autocast(device_type(device), dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(precision: str, device: str) -> torch.amp.GradScaler | None:
    """The loss scaler fp16 training needs (torch.amp); None for fp32 and bf16, whose range needs none."""
    return torch.amp.GradScaler(device_type(device)) if precision == "fp16" else None


def resolve_pin_memory(pin_memory: bool | str, device: str) -> bool:
    """Whether batches go to page-locked memory: ``auto`` means on with CUDA; pinning only helps a copy to a GPU,
    so on a CPU device it is always off."""
    if not isinstance(pin_memory, bool) and pin_memory != "auto":
        raise DomgenError(f"train.pin_memory is {pin_memory!r}; use true, false or auto.")
    return device_type(device) == "cuda" and pin_memory in (True, "auto")


def to_device(x: torch.Tensor, device: str, pin_memory: bool = False) -> torch.Tensor:
    """``x`` on ``device``; with ``pin_memory`` the host tensor is page-locked first and the copy is non-blocking."""
    if not pin_memory:
        return x.to(device)
    if not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


OPTIMIZERS: dict[str, Callable[[list, "TrainSettings"], torch.optim.Optimizer]] = {
    "adam": lambda params, s: torch.optim.Adam(params, lr=s.lr),
    # Wang et al. (nnU-Net): SGD, lr 0.01, Nesterov momentum 0.99, with the poly schedule
    "sgd": lambda params, s: torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, nesterov=s.nesterov and s.momentum > 0),
}


def poly_lr(base_lr: float, epoch: int, max_epochs: int, power: float = 0.9) -> float:
    """Poly schedule: base_lr * (1 - epoch / max_epochs) ** power (Wang et al.)."""
    return base_lr * (1.0 - epoch / max_epochs) ** power


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one slice's augmentation in one epoch: a function of (seed, epoch, index) only."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class SliceDataset(Dataset):
    """Slices with their augmentation. An item is ``i`` (epoch 0) or ``(epoch, i)`` from an ``EpochSampler``: the
    augmentation is reseeded from (seed, epoch, i) for each item, so no worker process's own random state enters."""

    def __init__(self, slices: SliceSet, augment: str = "none", seed: int = 0, params: dict | None = None) -> None:
        self.slices = slices
        self.seed = seed
        self.transform = build_augmentation(augment, seed, params)

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        image = self.slices.inputs[i, 0]
        mask = self.slices.targets[i]
        if self.transform is not None:
            seed_augmentation(self.transform, augmentation_seed(self.seed, epoch, i))
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return torch.from_numpy(np.ascontiguousarray(image))[None], torch.from_numpy(np.ascontiguousarray(mask))[None].float()


class EpochSampler(Sampler):
    """A shuffled epoch of ``(epoch, index)`` keys for ``SliceDataset``; ``set_epoch`` is called before each epoch.

    It runs in the training process with its own generator, so the order does not depend on the loader's workers."""

    def __init__(self, n: int, seed: int) -> None:
        self.order = RandomSampler(range(n), generator=torch.Generator().manual_seed(seed))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, i) for i in self.order)


def seed_loader_worker(seed: int, worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: numpy, random and torch seeded from (seed, worker id), the same on every run."""
    import cv2

    cv2.setNumThreads(0)  # OpenCV's thread pool does not survive the fork; a worker is one thread anyway
    state = np.random.SeedSequence([seed, worker_id]).generate_state(2)
    np.random.seed(int(state[0]))
    random.seed(int(state[1]))
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


def slice_loader(train_set: SliceSet, settings: "TrainSettings") -> tuple[DataLoader, EpochSampler]:
    """The training DataLoader (and its sampler, whose epoch the loop sets): shuffled, augmented, ``loader_workers``
    processes (kept alive between epochs), batches pinned when ``pin_memory`` resolves on."""
    sampler = EpochSampler(len(train_set), settings.seed)
    workers = settings.loader_workers
    loader = DataLoader(
        SliceDataset(train_set, settings.augment, settings.seed, settings.augment_params),
        batch_size=settings.batch_size, sampler=sampler, drop_last=len(train_set) > settings.batch_size,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=resolve_pin_memory(settings.pin_memory, settings.device),
        worker_init_fn=functools.partial(seed_loader_worker, settings.seed) if workers > 0 else None,
        # its own generator: the loader draws worker base seeds from it, never from the global torch RNG
        generator=torch.Generator().manual_seed(settings.seed),
    )
    return loader, sampler


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor,
               precision: str = "fp32", scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """One optimisation step; returns the (detached) loss. Kept bare: the benchmark compares it with smp's.

    ``precision`` (resolved: fp32, bf16 or fp16) autocasts the forward pass only; the loss is taken in fp32 and
    backward runs outside autocast, as torch.amp recommends. fp16 (CUDA) needs ``scaler`` (``grad_scaler``): the
    loss is scaled before backward, the step unscales and skips on inf/NaN, and the scale is updated.
    """
    if precision == "fp16" and scaler is None:
        resolve_precision(precision, str(x.device))  # on a CPU: the one-sentence refusal
        raise ValueError("train_step with precision fp16 needs scaler=grad_scaler('fp16', device)")
    optimizer.zero_grad(set_to_none=True)
    with autocast(precision, str(x.device)):
        logits = model(x)
    loss = loss_fn(logits.float(), y)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # unscales first; skipped when a gradient is inf/NaN
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach()


def set_train_mode(model: nn.Module) -> None:
    """train(), but frozen parts (no parameter requiring grad) keep their BatchNorm statistics fixed."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()


def compile_model(model: nn.Module | Callable, device: str) -> nn.Module | Callable:
    """``torch.compile(model)`` (sharing its parameters) for the training step, or ``model`` itself with a warning
    where this machine cannot compile (Inductor on a CPU needs a C++ compiler; dynamo needs a supported Python).
    ``model`` may be a function too (the stacked models' vmapped forward pass)."""
    import shutil
    import warnings

    from torch._dynamo import is_dynamo_supported

    if not is_dynamo_supported():
        reason = "torch.compile does not support this Python"
    elif device_type(device) == "cpu" and not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        reason = "Inductor on a CPU needs a C++ compiler and none is on PATH"
    else:
        return torch.compile(model)
    warnings.warn(f"train.compile: {reason}; training eagerly (the same numbers, more kernel launches)")
    return model


@dataclass
class TrainResult:
    model: nn.Module
    best_epoch: int
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    seconds_per_epoch: float = 0.0


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def _padded_batches(inputs: np.ndarray | torch.Tensor, batch_size: int):
    for start in range(0, len(inputs), batch_size):
        yield start, torch.as_tensor(inputs[start:start + batch_size])  # a tensor already on the device stays there


def inference_settings(model: nn.Module, precision: str | None, channels_last: bool | None, device: str) -> tuple[str, bool]:
    """(resolved precision, channels_last) for inference: explicit arguments win, else what ``train`` used for ``model``
    (a model trained in fp16 on a GPU predicts in fp32 on a CPU)."""
    if precision is None:
        precision = getattr(model, "domgen_precision", "fp32")
        if precision == "fp16" and device_type(device) != "cuda":
            precision = "fp32"
    channels_last = channels_last if channels_last is not None else getattr(model, "domgen_channels_last", False)
    return resolve_precision(precision, device), bool(channels_last)


def mark_speed_settings(model: nn.Module, precision: str, channels_last: bool) -> None:
    """Record on ``model`` the precision and memory format it was trained with, so prediction uses them too."""
    model.domgen_precision = precision
    model.domgen_channels_last = channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)


@torch.no_grad()
def predict_model_size(model: nn.Module, slices: SliceSet, batch_size: int = 32, device: str = "cpu",
                       progress: bool = False, desc: str = "predict", precision: str | None = None,
                       channels_last: bool | None = None, pin_memory: bool | str = "auto") -> np.ndarray:
    """Lesion probabilities at model size, (N, S, S) float32.

    ``precision``/``channels_last`` default to what ``train`` used for this model (fp32, NCHW for a model it did
    not train); the sigmoid is taken on fp32 logits. ``pin_memory`` (auto: on with CUDA) copies batches to the
    GPU from page-locked memory, non-blocking.
    """
    precision, channels_last = inference_settings(model, precision, channels_last, device)
    pin = resolve_pin_memory(pin_memory, device)
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    out = np.empty(slices.targets.shape, dtype=np.float32)
    bar = tqdm(total=len(slices), desc=desc, unit="slice", disable=not progress, leave=False)
    for start, x in _padded_batches(slices.inputs, batch_size):
        with autocast(precision, device):
            logits = model(to_memory_format(to_device(x, device, pin), channels_last))
        out[start:start + len(x)] = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
        bar.update(len(x))
    bar.close()
    return out


def to_original_size(probabilities: np.ndarray, slices: SliceSet) -> list[np.ndarray]:
    """Bilinear resize of each model-size probability map back to its slice's original shape."""
    out = []
    for prob, truth in zip(probabilities, slices.truths):
        t = torch.from_numpy(prob)[None, None]
        out.append(F.interpolate(t, size=truth.shape, mode="bilinear", align_corners=False)[0, 0].numpy())
    return out


def _validate(model, loss_fn, slices: SliceSet, batch_size: int, device: str, precision: str = "fp32",
              channels_last: bool = False, pin_memory: bool = False) -> tuple[float, float]:
    model.eval()
    losses, counts = [], []
    with torch.no_grad():
        for start, x in _padded_batches(slices.inputs, batch_size):
            y = to_device(torch.as_tensor(slices.targets[start:start + len(x)])[:, None].float(), device, pin_memory)
            with autocast(precision, device):
                logits = model(to_memory_format(to_device(x, device, pin_memory), channels_last))
            logits = logits.float()
            losses.append(loss_fn(logits, y).double() * len(x))
            pred = logits > 0
            # TP, FP, FN summed on the device: one copy back per epoch instead of four per batch
            counts.append(torch.stack([(pred & (y > 0)).sum(), (pred & (y == 0)).sum(), (~pred & (y > 0)).sum()]))
    if not counts:
        return float("nan"), float("nan")  # no validation slice: nothing measured (train refuses to choose by it)
    tp, fp, fn = (float(c) for c in torch.stack(counts).sum(0).cpu())
    dsc = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else 1.0
    return float(np.sum(torch.stack(losses).cpu().tolist()) / max(len(slices), 1)), dsc


def train(
    model: nn.Module,
    train_set: SliceSet,
    val_set: SliceSet,
    settings: TrainSettings,
    on_epoch: Callable[[dict], None] | None = None,
    progress: bool = True,
    desc: str = "train",
    monitor: Callable[[nn.Module], dict] | None = None,
) -> TrainResult:
    """Train ``model`` in place; returns it loaded with the best weights (the last ones with select_by "last").

    ``monitor(model)`` adds metrics to each epoch's record (e.g. the target's DSC, for plots); it never chooses.
    Each record also names the precision ``auto`` resolved to and the memory format (text, not metrics: the
    ``store.epoch_logger`` callback writes them as the run's tags ``domgen.precision`` / ``domgen.memory_format``)."""
    if not len(val_set) and (settings.select_by != "last" or settings.patience is not None):
        # an empty validation set used to score loss 0 / DSC 1, so early stopping kept the first epoch's weights
        raise DomgenError(f"the validation set is empty, so train.select_by {settings.select_by} and early stopping "
                          f"(train.patience {settings.patience}) have nothing to measure; give the split a validation part "
                          "(split.val > 0) or use --set train.select_by=last --set train.patience=null")
    seed_everything(settings.seed)
    device = settings.device
    precision = resolve_precision(settings.precision, device)
    pin = resolve_pin_memory(settings.pin_memory, device)
    model.to(device)
    mark_speed_settings(model, precision, settings.channels_last)
    loss_fn = LOSSES[settings.loss]()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = OPTIMIZERS[settings.optimizer](params, settings)
    scaler = grad_scaler(precision, device)
    if settings.device_data:
        from domgen.training.device_augment import DeviceBatches, DeviceSlices

        pin = False  # nothing is copied from the host after this
        loader = sampler = DeviceBatches(train_set, settings.augment, settings.seed, settings.batch_size, device)
        val_set = DeviceSlices.of(val_set, device)
    else:
        loader, sampler = slice_loader(train_set, settings)
    step_model = compile_model(model, device) if settings.compile else model
    best_score, best_loss, best_state, best_epoch, stale = -np.inf, np.inf, None, 0, 0
    history: list[dict] = []
    started = time.perf_counter()
    bar = tqdm(range(settings.epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        if settings.schedule == "poly":
            for group in optimizer.param_groups:
                group["lr"] = poly_lr(settings.lr, epoch, settings.epochs, settings.poly_power)
        set_train_mode(model)
        sampler.set_epoch(epoch)
        epoch_started = time.perf_counter()
        # summed on the device: reading each loss back would wait for the GPU at every step
        total, count = torch.zeros((), device=device), 0
        for x, y in loader:
            x = to_memory_format(to_device(x, device, pin), settings.channels_last)
            loss = train_step(step_model, optimizer, loss_fn, x, to_device(y, device, pin), precision, scaler)
            total += loss * len(x)
            count += len(x)
        if device_type(device) == "cuda":
            torch.cuda.synchronize(device)  # the queued steps belong to the training seconds, not the validation's
        val_started = time.perf_counter()
        val_loss, val_dsc = _validate(model, loss_fn, val_set, settings.batch_size, device, precision,
                                      settings.channels_last, pin)
        # training and validation seconds apart: Bizopoulos et al. Table II reports both
        record = {"epoch": epoch, "train_loss": float(total) / max(count, 1), "val_loss": val_loss,
                  "val_dsc": val_dsc, "lr": optimizer.param_groups[0]["lr"],
                  "train_seconds": val_started - epoch_started, "val_seconds": time.perf_counter() - val_started,
                  # what ran, not what was asked: `auto` differs between CPUs with and without native bf16
                  "precision": precision, "memory_format": memory_format_name(settings.channels_last)}
        if monitor is not None:
            record.update(monitor(model))
        history.append(record)
        if on_epoch:
            on_epoch(record)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_loss=f"{val_loss:.3f}", val_dsc=f"{val_dsc:.3f}")
        score = val_dsc if settings.select_by == "val_dsc" else -val_loss
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(model.state_dict())
        if val_loss < best_loss - 1e-6:
            best_loss, stale = val_loss, 0
        else:
            stale += 1
            if settings.patience is not None and stale >= settings.patience:
                break
    seconds = (time.perf_counter() - started) / max(len(history), 1)
    if best_state is not None and settings.select_by != "last":
        model.load_state_dict(best_state)
    mark_speed_settings(model, precision, settings.channels_last)
    return TrainResult(model, best_epoch, len(history), history, seconds)
