"""Patch-wise training and sliding-window inference of 3D models (Müller et al.'s MIScnn set-up).

Every iteration draws ``batch_size`` patches from randomly chosen training volumes (uniformly at random, or
foreground-biased: half the patches centred on a lesion voxel), augments them on the fly (MONAI, each
transform with probability ``augment_p``), and minimises Tversky (alpha = beta = 0.5, eq. 6: summed over the
classes) + cross-entropy with Adam; the learning rate drops x0.1 after ``plateau_patience`` epochs without a lower training loss and
training stops after ``early_stopping_patience`` (the paper monitors the training loss, Keras-style).
``optimizer: sgd`` with ``schedule: poly`` is Wang et al.'s nnU-Net set-up (``domgen transfer --dims 3``); parameters
that do not require grad (a frozen encoder) are left out of the optimiser and keep their BatchNorm statistics.
Inference averages softmax outputs of patches overlapping by half a patch (MONAI sliding_window_inference).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.transforms import (Compose, Rand3DElasticd, RandAdjustContrastd, RandCropByPosNegLabeld, RandFlipd,
                              RandGaussianNoised, RandRotated, RandScaleIntensityd, RandScaleIntensityFixedMeand,
                              RandSpatialCropd, RandZoomd, SpatialPadd)
from torch import nn

from domgen.errors import DomgenError
from domgen.preprocessing.volume import LESION, Volume
from domgen.settings import CV, default
from domgen.training.trainer import OPTIMIZERS, poly_lr, set_train_mode

SAMPLERS = ("uniform", "foreground")
SCHEDULES = ("plateau", "poly", "constant")


@dataclass(frozen=True)
class VolumeTrainSettings:
    """Müller et al.'s patch trainer; every default with a row is its cross-validate ``train.*`` row of domgen/settings.py
    (transfer --dims 3 passes its whole ``volume.train`` section, filled from its own rows). The optimiser fields have no
    cross-validate row: Müller et al.'s Adam on a plateau schedule is fixed there, only transfer's rows change it."""

    patch_size: tuple[int, int, int] = default(CV, "train.patch_size")  # x, y, z voxels
    batch_size: int = default(CV, "train.batch_size")
    iterations_per_epoch: int = default(CV, "train.iterations_per_epoch")
    epochs: int = default(CV, "train.epochs")  # an upper bound; early stopping ends training (the paper: patience 100)
    lr: float = default(CV, "train.lr")
    plateau_factor: float = default(CV, "train.plateau_factor")
    plateau_patience: int = default(CV, "train.plateau_patience")
    min_lr: float = default(CV, "train.min_lr")
    early_stopping_patience: int = default(CV, "train.early_stopping_patience")
    sampler: str = default(CV, "train.sampler")
    augment: bool = default(CV, "train.augment")
    augment_p: float = default(CV, "train.augment_p")
    tversky_alpha: float = default(CV, "train.tversky_alpha")
    tversky_beta: float = default(CV, "train.tversky_beta")
    optimizer: str = "adam"  # an OPTIMIZERS name of domgen.training.trainer: adam (Müller et al.) | sgd (Wang et al.)
    momentum: float = 0.99  # sgd only
    nesterov: bool = True  # sgd only
    schedule: str = "plateau"  # plateau (Müller et al.) | poly: lr * (1 - epoch/epochs)^poly_power (Wang et al.) | constant
    poly_power: float = 0.9
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def from_config(cls, cfg: dict, **override) -> "VolumeTrainSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise DomgenError(f"unknown train key(s) {', '.join(unknown)}; known: {', '.join(sorted(known - {'seed', 'device'}))}")
        values = {**cfg, **override}
        patch = values.get("patch_size", cls.patch_size)
        if not isinstance(patch, (list, tuple)) or len(patch) != 3 or not all(isinstance(p, int) and p > 0 for p in patch):
            raise DomgenError(f"train.patch_size {patch!r} must be three positive voxel counts [x, y, z], e.g. [160, 160, 80]")
        values["patch_size"] = tuple(patch)
        if values.get("sampler", cls.sampler) not in SAMPLERS:
            raise DomgenError(f"train.sampler {values['sampler']!r} is unknown; choose one of {', '.join(SAMPLERS)}")
        if values.get("schedule", cls.schedule) not in SCHEDULES:
            raise DomgenError(f"train.schedule {values['schedule']!r} is unknown; choose one of {', '.join(SCHEDULES)}")
        if values.get("optimizer", cls.optimizer) not in OPTIMIZERS:
            raise DomgenError(f"train.optimizer {values['optimizer']!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
        for key in ("batch_size", "iterations_per_epoch", "epochs"):
            if not isinstance(values.get(key, 1), int) or values.get(key, 1) < 1:
                raise DomgenError(f"train.{key} must be a positive integer, not {values[key]!r}")
        if not 0.0 <= float(values.get("augment_p", cls.augment_p)) <= 1.0:
            raise DomgenError(f"train.augment_p {values['augment_p']!r} must be a probability in 0..1")
        return cls(**values)


def check_patch_fits(patch_size: tuple[int, int, int], divisor: int) -> None:
    bad = [p for p in patch_size if p % divisor]
    if bad:
        raise DomgenError(f"train.patch_size {list(patch_size)} must be multiples of {divisor} (2 ** the U-Net's depth); "
                          f"change the patch size or model.features")


class PatchSampler:
    """Random training patches of one volume: pads to at least the patch size, then crops.

    ``uniform``: every patch position equally likely (RandSpatialCrop); ``foreground``: half of the patches
    centred on a lesion voxel, half anywhere (RandCropByPosNegLabel with pos = neg = 1). ``lesion``: the lesion's
    label value (2 of background/lung/lesion, 1 of a binary background/lesion target).
    """

    def __init__(self, patch_size: tuple[int, int, int], sampler: str = "uniform", seed: int = 0, lesion: int = LESION) -> None:
        self.pad = SpatialPadd(["image", "label"], spatial_size=patch_size, mode="constant")
        if sampler == "uniform":
            self.crop = RandSpatialCropd(["image", "label"], roi_size=patch_size, random_size=False)
        else:
            self.crop = RandCropByPosNegLabeld(["image", "label"], label_key="lesion", spatial_size=patch_size, pos=1, neg=1,
                                               num_samples=1, allow_smaller=True)
        self.crop.set_random_state(seed)
        self.sampler = sampler
        self.lesion = lesion

    def __call__(self, image: np.ndarray, labels: np.ndarray) -> dict:
        data = self.pad({"image": image, "label": labels[None]})
        if self.sampler == "foreground":
            data["lesion"] = data["label"] == self.lesion
            data = self.crop(data)[0]
            data.pop("lesion")
            return data
        return self.crop(data)


def muller_augmentation(p: float, seed: int) -> Compose:
    """Mirroring on each axis, elastic deformation, rotation +-15 degrees, scaling 0.85..1.25, brightness,
    contrast, gamma and Gaussian noise, each with probability ``p`` (Müller et al., batchgenerators in MIScnn)."""
    keys = ["image", "label"]
    angle = math.radians(15.0)
    transforms = Compose([
        RandFlipd(keys, prob=p, spatial_axis=0), RandFlipd(keys, prob=p, spatial_axis=1), RandFlipd(keys, prob=p, spatial_axis=2),
        Rand3DElasticd(keys, sigma_range=(9.0, 13.0), magnitude_range=(0.0, 200.0), prob=p, mode=("bilinear", "nearest"),
                       padding_mode="zeros"),
        RandRotated(keys, range_x=angle, range_y=angle, range_z=angle, prob=p, mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandZoomd(keys, min_zoom=0.85, max_zoom=1.25, prob=p, mode=("trilinear", "nearest"), keep_size=True),
        RandScaleIntensityd("image", factors=0.25, prob=p),  # brightness (multiplicative, batchgenerators-style)
        RandScaleIntensityFixedMeand("image", factors=0.25, prob=p, preserve_range=True),  # contrast around the mean
        RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=p),  # gamma
        RandGaussianNoised("image", std=0.1, prob=p),
    ])
    transforms.set_random_state(seed)
    return transforms


class TverskyCrossEntropyLoss(nn.Module):
    """Müller et al.'s eq. 6, L = N - sum_c TP_c / (TP_c + alpha FN_c + beta FP_c), plus cross-entropy.

    Soft TP/FN/FP of each class over one sample's voxels, the N classes' Tversky indices SUMMED (not averaged),
    then the mean over the batch, as MIScnn's ``tversky_crossentropy`` (miscnn/neural_network/metrics.py) that the
    authors trained with; ``smooth`` is MIScnn's 1e-6 in numerator and denominator. Cross-entropy is the mean over voxels.
    """

    def __init__(self, alpha: float = 0.5, beta: float = 0.5, smooth: float = 1e-6) -> None:
        super().__init__()
        self.alpha, self.beta, self.smooth = alpha, beta, smooth
        self.ce = nn.CrossEntropyLoss()

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = labels[:, 0].long()
        probs = torch.softmax(logits, dim=1)
        onehot = nn.functional.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
        spatial = tuple(range(2, logits.ndim))
        tp = (probs * onehot).sum(spatial)  # (batch, classes)
        fn = ((1 - probs) * onehot).sum(spatial)
        fp = (probs * (1 - onehot)).sum(spatial)
        tversky = (tp + self.smooth) / (tp + self.alpha * fn + self.beta * fp + self.smooth)
        return (logits.shape[1] - tversky.sum(1)).mean() + self.ce(logits, target)


@dataclass
class VolumeTrainResult:
    model: nn.Module
    history: list[dict]
    epochs_run: int
    seconds_per_iteration: float


def _batch(volumes: list[Volume], samplers: list[PatchSampler], rng: np.random.Generator, settings: VolumeTrainSettings,
           augment: Compose | None) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for _ in range(settings.batch_size):
        i = int(rng.integers(len(volumes)))
        patch = samplers[i](volumes[i].image, volumes[i].labels)
        if augment is not None:
            patch = augment(patch)
        images.append(torch.as_tensor(np.asarray(patch["image"]), dtype=torch.float32))
        labels.append(torch.as_tensor(np.asarray(patch["label"]), dtype=torch.float32))
    return torch.stack(images), torch.stack(labels)


def train_volumes(model: nn.Module, volumes: list[Volume], settings: VolumeTrainSettings,
                  on_epoch: Callable[[dict], None] | None = None, progress: bool = False, desc: str = "train") -> VolumeTrainResult:
    """Train ``model`` on patches of ``volumes``; deterministic in ``settings.seed`` on CPU. Returns the last model."""
    from tqdm import tqdm

    if not volumes:
        raise DomgenError("no training volumes: the fold's training part is empty; use fewer folds or more patients")
    check_patch_fits(settings.patch_size, getattr(model, "divisor", 1))
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    lesion = int(getattr(model, "domgen_model_config", {}).get("classes", 3)) - 1  # the lesion is the last class
    samplers = [PatchSampler(settings.patch_size, settings.sampler, seed=settings.seed * 1000 + i, lesion=lesion)
                for i in range(len(volumes))]
    augment = muller_augmentation(settings.augment_p, settings.seed) if settings.augment else None
    device = torch.device(settings.device)
    model.to(device)
    optimizer = OPTIMIZERS[settings.optimizer]([p for p in model.parameters() if p.requires_grad], settings)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=settings.plateau_factor,
                                                           patience=settings.plateau_patience, min_lr=settings.min_lr)
    loss_fn = TverskyCrossEntropyLoss(settings.tversky_alpha, settings.tversky_beta)
    history: list[dict] = []
    best, stale, seconds, iterations = math.inf, 0, 0.0, 0
    bar = tqdm(range(settings.epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        set_train_mode(model)
        if settings.schedule == "poly":
            for group in optimizer.param_groups:
                group["lr"] = poly_lr(settings.lr, epoch, settings.epochs, settings.poly_power)
        losses, start = [], time.perf_counter()
        for _ in range(settings.iterations_per_epoch):
            x, y = _batch(volumes, samplers, rng, settings, augment)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        seconds += time.perf_counter() - start
        iterations += settings.iterations_per_epoch
        epoch_loss = float(np.mean(losses))
        if settings.schedule == "plateau":
            scheduler.step(epoch_loss)
        record = {"epoch": epoch, "loss": epoch_loss, "lr": optimizer.param_groups[0]["lr"]}
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        bar.set_postfix(loss=f"{epoch_loss:.4f}")
        if epoch_loss < best - 1e-6:
            best, stale = epoch_loss, 0
        else:
            stale += 1
            if stale >= settings.early_stopping_patience:
                break
    model.eval()
    return VolumeTrainResult(model, history, len(history), seconds / max(iterations, 1))


@torch.no_grad()
def predict_volume(model: nn.Module, volume: Volume, patch_size: tuple[int, int, int], overlap: float = 0.5,
                   sw_batch_size: int = 1, device: str = "cpu") -> np.ndarray:
    """Class probabilities (C, X, Y, Z) on the volume's grid: softmax of overlapping patches (half a patch), averaged."""
    model.eval()
    x = torch.as_tensor(volume.image[None], dtype=torch.float32, device=device)
    probs = sliding_window_inference(x, roi_size=patch_size, sw_batch_size=sw_batch_size,
                                     predictor=lambda patch: torch.softmax(model(patch), dim=1), overlap=overlap, mode="constant")
    return probs[0].cpu().numpy().astype(np.float32)
