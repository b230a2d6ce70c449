"""The slices of one configuration kept on the training device, augmented there in batches (issue 22).

At the paper's batch of 2 a GPU waits for the DataLoader, albumentations and the host-to-device copy at every step;
with ``train.device_data`` the training and validation slices are copied once, and each batch is flipped, rotated and
scaled with one ``grid_sample`` on the device. The transforms have the same distribution as ``augment.py``'s
albumentations recipes as ``SliceDataset`` runs them (the same parameter ranges, probabilities, order, centre and zero
border, and independent apply decisions per step: the test compares the two), not the same numbers: the streams differ. A slice's parameters in an epoch are drawn for all slices
at once, in index order, from a generator seeded by (seed, epoch), so they depend on (seed, epoch, index) alone and
never on the batch order; the shuffled order has its own (seed, epoch) stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from domgen.errors import DomgenError
from domgen.preprocessing.slices import SliceSet


@dataclass(frozen=True)
class Recipe:
    """One ``augment.py`` recipe as parameters: ``steps`` are (transform, probability) in albumentations' order."""

    steps: tuple[tuple[str, float], ...]
    rotate: tuple[float, float] = (0.0, 0.0)  # degrees
    scale: tuple[float, float] = (1.0, 1.0)  # drawn for x and y apart (albumentations' keep_ratio=False)
    translate: tuple[float, float] = (0.0, 0.0)  # fraction of the width (x) / height (y), truncated to whole pixels
    shear: tuple[float, float] = (0.0, 0.0)  # degrees, drawn for x and y apart


# the same recipes as augment.py's albumentations pipelines (tests/test_device_augment.py checks the distributions)
RECIPES: dict[str, Recipe | None] = {
    "none": None,
    "enshaei": Recipe(steps=(("affine", 0.7), ("hflip", 0.5)), scale=(0.9, 1.1), translate=(-0.1, 0.1), shear=(-10.0, 10.0)),
    "bizopoulos": Recipe(steps=(("hflip", 0.5), ("vflip", 0.5), ("affine", 1.0)), rotate=(-180.0, 180.0), scale=(0.5, 1.5)),
}


def recipe(name: str) -> Recipe | None:
    if name not in RECIPES:
        raise DomgenError(f"train.augment {name!r} has no on-device version for train.device_data; use one of "
                          f"{', '.join(RECIPES)} or --set train.device_data=false")
    return RECIPES[name]


def stream_seed(seed: int, epoch: int, stream: int) -> int:
    """The seed of one epoch's random stream (0: the shuffled order, 1: the augmentation parameters)."""
    return int(np.random.SeedSequence([seed, epoch], spawn_key=(stream,)).generate_state(1)[0])


def _uniform(low: float, high: float, n: int, generator: torch.Generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device, dtype=torch.float64)


def affine_matrices(r: Recipe, n: int, height: int, width: int, generator: torch.Generator, device) -> torch.Tensor:
    """(n, 3, 3) float64 forward matrices in pixel coordinates (x right, y down, pixel centres at integers): where each
    input pixel goes, the composition of the recipe's steps in order, each applied with its probability."""
    eye = torch.eye(3, dtype=torch.float64, device=device).expand(n, 3, 3)
    total = eye.clone()
    cx, cy = width / 2 - 0.5, height / 2 - 0.5  # albumentations' centre of rotation and scale
    for step, p in r.steps:
        # each step decides on its own draw, as augment.py's seed_augmentation gives every transform its own seed
        applied = torch.rand(n, generator=generator, device=device, dtype=torch.float64) < p
        m = eye.clone()
        if step == "hflip":
            m[:, 0, 0], m[:, 0, 2] = -1.0, width - 1.0
        elif step == "vflip":
            m[:, 1, 1], m[:, 1, 2] = -1.0, height - 1.0
        else:  # albumentations' create_affine_transformation_matrix: centre <- translate shear rotate scale <- top-left
            sx, sy = _uniform(*r.scale, n, generator, device), _uniform(*r.scale, n, generator, device)
            angle = torch.deg2rad(_uniform(*r.rotate, n, generator, device))
            tx = torch.trunc(_uniform(*r.translate, n, generator, device) * width)
            ty = torch.trunc(_uniform(*r.translate, n, generator, device) * height)
            hx = torch.tan(torch.deg2rad(-_uniform(*r.shear, n, generator, device)))
            hy = torch.tan(torch.deg2rad(-_uniform(*r.shear, n, generator, device)))
            c, s = torch.cos(angle), torch.sin(angle)
            rot = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)
            linear = torch.stack([torch.stack([torch.ones_like(hx), hx], -1), torch.stack([hy, torch.ones_like(hy)], -1)], -2) \
                @ rot @ torch.diag_embed(torch.stack([sx, sy], -1))
            centre = torch.tensor([cx, cy], dtype=torch.float64, device=device)
            m[:, :2, :2] = linear
            m[:, :2, 2] = centre + torch.stack([tx, ty], -1) - linear @ centre
        total = torch.where(applied[:, None, None], m, eye) @ total
    return total


def warp(images: torch.Tensor, masks: torch.Tensor, matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` (B, C, H, W) bilinear and ``masks`` (B, 1, H, W) nearest, moved by the forward pixel ``matrices``
    (B, 3, 3) with a zero border, as cv2.warpAffine does: each output pixel reads the input at the inverse map."""
    _, _, height, width = images.shape
    # pixel -> normalised coordinates of grid_sample with align_corners=True (-1 and 1 are the outer pixel centres)
    norm = torch.tensor([[2.0 / max(width - 1, 1), 0.0, -1.0], [0.0, 2.0 / max(height - 1, 1), -1.0], [0.0, 0.0, 1.0]],
                        dtype=torch.float64, device=matrices.device)
    theta = (norm @ torch.linalg.inv(matrices) @ torch.linalg.inv(norm))[:, :2].to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=True)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out_masks = F.grid_sample(masks.to(images.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=True)
    return out, out_masks.to(masks.dtype)


@dataclass
class DeviceSlices:
    """Inputs (N, 1, H, W) float32 and targets (N, H, W) float32 of a ``SliceSet``, on the training device."""

    inputs: torch.Tensor
    targets: torch.Tensor

    @classmethod
    def of(cls, slices: SliceSet, device: str) -> "DeviceSlices":
        return cls(torch.as_tensor(slices.inputs).to(device), torch.as_tensor(slices.targets).float().to(device))

    def __len__(self) -> int:
        return len(self.inputs)


class DeviceBatches:
    """The training batches of one configuration, made on the device: a shuffled epoch (``set_epoch`` first), each
    batch augmented with the recipe, the last short batch dropped as ``slice_loader`` does (unless it is the only one)."""

    def __init__(self, slices: SliceSet | DeviceSlices, augment: str, seed: int, batch_size: int, device: str) -> None:
        self.data = slices if isinstance(slices, DeviceSlices) else DeviceSlices.of(slices, device)
        self.recipe = recipe(augment)
        self.seed, self.batch_size, self.device = seed, batch_size, device
        self.generator = torch.Generator(device=device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if n > self.batch_size else 1

    def epoch_matrices(self) -> torch.Tensor | None:
        """(N, 3, 3): slice i's transform in this epoch, drawn in index order from the (seed, epoch) stream."""
        if self.recipe is None:
            return None
        self.generator.manual_seed(stream_seed(self.seed, self.epoch, 1))
        _, _, height, width = self.data.inputs.shape
        return affine_matrices(self.recipe, len(self.data), height, width, self.generator, self.device)

    def __iter__(self):
        n = len(self.data)
        matrices = self.epoch_matrices()
        self.generator.manual_seed(stream_seed(self.seed, self.epoch, 0))
        order = torch.randperm(n, generator=self.generator, device=self.device)
        for b in range(len(self)):
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            x, y = self.data.inputs[index], self.data.targets[index][:, None]
            if matrices is not None:
                x, y = warp(x, y, matrices[index])
            yield x, y

