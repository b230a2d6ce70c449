"""On-device batched augmentation (train.device_data) against the albumentations pipeline it stands in for."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from domgen.errors import DomgenError
from domgen.training.augment import build_augmentation, seed_augmentation
from domgen.training.device_augment import RECIPES, DeviceBatches, DeviceSlices, affine_matrices, recipe, warp
from tests.test_trainer import tiny_slices


def albumentations_matrix(name: str, seed: int, height: int, width: int, image=None, mask=None):
    """The forward pixel matrix albumentations applied with ``seed`` (its flips and its Affine's own matrix, in the
    order applied), and its outputs; an independent account of what the CPU pipeline does."""
    transform = build_augmentation(name, 0)
    transform.save_applied_params = True
    seed_augmentation(transform, seed)  # as SliceDataset seeds it for one slice
    image = np.zeros((height, width), np.float32) if image is None else image
    mask = np.zeros((height, width), np.uint8) if mask is None else mask
    out = transform(image=image, mask=mask)
    total = np.eye(3)
    for step, params in out["applied_transforms"]:
        m = np.eye(3)
        if step == "HorizontalFlip":
            m[0, 0], m[0, 2] = -1, width - 1
        elif step == "VerticalFlip":
            m[1, 1], m[1, 2] = -1, height - 1
        else:
            assert step == "Affine"
            m = np.asarray(params["matrix"], np.float64)
        total = m @ total
    return total, out["image"], out["mask"]


@pytest.mark.parametrize("name", ["bizopoulos", "enshaei"])
def test_warp_reproduces_albumentations_for_its_own_parameters(name):
    """Given albumentations' drawn transform, the device warp moves image and mask to the same place (cv2's bilinear
    weights are 5-bit fixed point and nearest breaks ties its own way, hence the tolerances)."""
    size = 48
    yy, xx = np.mgrid[:size, :size]
    image = (np.sin(xx / 5.0) + np.cos(yy / 7.0) + xx / size).astype(np.float32)  # smooth and asymmetric
    mask = ((xx - 14) ** 2 + (yy - 20) ** 2 < 60).astype(np.uint8) | ((xx > 30) & (yy > 8) & (yy < 16))
    for seed in range(8):
        matrix, a_image, a_mask = albumentations_matrix(name, seed, size, size, image, mask.astype(np.uint8))
        d_image, d_mask = warp(torch.from_numpy(image)[None, None], torch.from_numpy(mask.astype(np.float32))[None, None],
                               torch.from_numpy(matrix)[None])
        d_image, d_mask = d_image[0, 0].numpy(), d_mask[0, 0].numpy()
        inside = (a_image != 0) & (d_image != 0)  # the border pixels' half-in neighbours are interpolated differently
        assert np.abs(a_image - d_image)[inside].mean() < 0.02
        assert np.mean((a_image == 0) != (d_image == 0)) < 0.03
        assert np.mean(a_mask != d_mask) < 0.02
        assert abs(int(a_mask.sum()) - int(d_mask.sum())) <= 0.1 * max(int(a_mask.sum()), 1)


@pytest.mark.parametrize("name", ["bizopoulos", "enshaei"])
def test_drawn_transforms_have_albumentations_distribution(name):
    """Over many seeds, every entry of the composed matrix (flips, rotation, scale, shear, shift) has the same
    distribution as albumentations' (two-sample Kolmogorov-Smirnov), and so has the chance of no transform at all."""
    n, size = 1500, 40
    cpu = np.stack([albumentations_matrix(name, seed, size, size)[0] for seed in range(n)])
    dev = affine_matrices(RECIPES[name], n, size, size, torch.Generator().manual_seed(1), "cpu").numpy()
    for i in range(2):
        for j in range(3):
            p = stats.ks_2samp(cpu[:, i, j], dev[:, i, j]).pvalue
            assert p > 1e-3, f"{name}: matrix entry ({i}, {j}) differs (KS p {p:.2g})"
    identity = lambda m: np.mean(np.all(np.abs(m - np.eye(3)) < 1e-9, axis=(1, 2)))
    assert abs(identity(cpu) - identity(dev)) < 0.05  # enshaei: 0.3 x 0.5 (independent steps); bizopoulos: never
    # mirror images (negative determinant): half of bizopoulos's (one flip of two), half of enshaei's
    mirrored = lambda m: np.mean(np.linalg.det(m[:, :2, :2]) < 0)
    assert abs(mirrored(cpu) - mirrored(dev)) < 0.05


def test_labels_move_with_the_images():
    """A mask equal to the (binary) image stays equal to it after the device augmentation, away from edges."""
    slices = tiny_slices(n=6, size=40)
    slices.inputs[:] = slices.targets[:, None].astype(np.float32)
    batches = DeviceBatches(slices, "bizopoulos", seed=3, batch_size=2, device="cpu")
    for epoch in range(3):
        batches.set_epoch(epoch)
        for x, y in batches:
            assert x.shape == y.shape == (2, 1, 40, 40)
            assert ((x > 0.5).float() != y).float().mean() < 0.02


def test_a_slice_transform_depends_on_seed_epoch_and_index_only():
    slices = tiny_slices(n=5, size=32)
    a = DeviceBatches(slices, "bizopoulos", seed=0, batch_size=2, device="cpu")
    b = DeviceBatches(DeviceSlices.of(slices, "cpu"), "bizopoulos", seed=0, batch_size=4, device="cpu")
    a.set_epoch(2), b.set_epoch(2)
    assert torch.equal(a.epoch_matrices(), b.epoch_matrices())
    b.set_epoch(3)
    assert not torch.equal(a.epoch_matrices(), b.epoch_matrices())
    assert len(a) == 2 and len(list(a)) == 2  # the short last batch is dropped, as slice_loader does


def test_an_augmentation_without_device_version_is_one_sentence():
    with pytest.raises(DomgenError, match="train.device_data"):
        recipe("mixup")


def test_a_mirror_image_is_as_likely_as_the_recipes_say():
    """Bizopoulos: two independent flips at p = 0.5 mirror half the slices; Enshaei: one flip at p = 0.5 (the affine
    keeps orientation), half as well: a hand count, not a comparison of the two pipelines."""
    n, size = 2000, 24
    for name in ("bizopoulos", "enshaei"):
        dev = affine_matrices(RECIPES[name], n, size, size, torch.Generator().manual_seed(2), "cpu").numpy()
        cpu = np.stack([albumentations_matrix(name, seed, size, size)[0] for seed in range(n)])
        for m in (dev, cpu):
            assert abs(np.mean(np.linalg.det(m[:, :2, :2]) < 0) - 0.5) < 0.05, name
