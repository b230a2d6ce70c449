"""3D patch sampling, the 3D U-Net, sliding-window inference and a short training run."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from domgen.data.case import Case
from domgen.errors import DomgenError
from domgen.models.unet3d import UNet3d, build_model_3d
from domgen.preprocessing.volume import LESION, Volume
from domgen.training.volume_trainer import (PatchSampler, TverskyCrossEntropyLoss, VolumeTrainSettings, muller_augmentation,
                                            predict_volume, train_volumes)


def index_volume(shape=(9, 7, 5)) -> tuple[np.ndarray, np.ndarray]:
    """An image whose voxel values are their flat indices, so a patch says where it came from."""
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(1, *shape)
    labels = np.zeros(shape, np.uint8)
    labels[tuple(s - 1 for s in shape)] = LESION
    return image, labels


def test_uniform_sampler_covers_every_voxel_and_every_position():
    image, labels = index_volume()
    sampler = PatchSampler((4, 4, 2), "uniform", seed=0)
    covered = np.zeros(image.shape[1:], bool)
    corners: dict[tuple, int] = {}
    for _ in range(1500):
        patch = np.asarray(sampler(image, labels)["image"])[0]
        assert patch.shape == (4, 4, 2)
        idx = np.unravel_index(patch.astype(int).ravel(), image.shape[1:])
        covered[idx] = True
        start = tuple(int(c.min()) for c in idx)
        corners[start] = corners.get(start, 0) + 1
        # a patch is a contiguous block of the volume
        assert len(set(idx[0])) == 4 and len(set(idx[1])) == 4 and len(set(idx[2])) == 2
    assert covered.all()
    # every one of the (9-4+1) x (7-4+1) x (5-2+1) start positions was drawn
    assert len(corners) == 6 * 4 * 4
    # uniformly: each start along x drawn about 1500 / 6 = 250 times (binomial SD ~14)
    per_x = np.bincount([c[0] for c, n in corners.items() for _ in range(n)], minlength=6)
    assert per_x.min() > 175 and per_x.max() < 325


def test_foreground_sampler_hits_the_lesion_half_of_the_time():
    image, labels = index_volume((24, 24, 12))
    labels[:] = 0
    labels[20, 3, 9] = LESION
    sampler = PatchSampler((4, 4, 4), "foreground", seed=1)
    lesion_value = np.ravel_multi_index((20, 3, 9), labels.shape)
    hits = sum(lesion_value in np.asarray(sampler(image, labels)["image"]) for _ in range(200))
    # uniform sampling would contain this voxel in ~1 % of patches; pos = neg = 1 gives about half
    assert 70 <= hits <= 140


def test_small_volume_is_padded_to_the_patch():
    image, labels = index_volume((3, 3, 3))
    patch = PatchSampler((4, 4, 4), "uniform")(image, labels)
    assert tuple(np.asarray(patch["image"]).shape) == (1, 4, 4, 4)


def test_unet3d_is_the_standard_architecture():
    model = build_model_3d({"features": [32, 64, 128, 256, 512]})
    enc = model.encoder
    assert len(enc.levels) == 5 and model.divisor == 16
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    assert all(c.kernel_size == (3, 3, 3) for c in convs[:-1]) and convs[-1].kernel_size == (1, 1, 1)
    assert sum(isinstance(m, nn.MaxPool3d) for m in model.modules()) == 4
    assert sum(isinstance(m, nn.ConvTranspose3d) for m in model.modules()) == 4
    small = build_model_3d({"features": [4, 8, 16]})
    out = small(torch.randn(1, 1, 16, 8, 12))
    assert out.shape == (1, 3, 16, 8, 12)
    with pytest.raises(DomgenError, match="model.features"):
        build_model_3d({"features": [8]})


def test_sliding_window_equals_whole_volume_when_the_window_is_the_volume():
    torch.manual_seed(0)
    model = UNet3d(1, 3, (4, 8)).eval()
    volume = Volume(np.random.default_rng(0).standard_normal((1, 8, 12, 6)).astype(np.float32), np.zeros((8, 12, 6), np.uint8),
                    np.eye(4), None)
    with torch.no_grad():
        whole = torch.softmax(model(torch.from_numpy(volume.image[None])), 1)[0].numpy()
    np.testing.assert_allclose(predict_volume(model, volume, (8, 12, 6)), whole, atol=1e-6)


def test_sliding_window_averages_half_overlapping_patches():
    """With a voxel-wise model every overlapping patch predicts the same value for a voxel, so the average of the
    windows must give back the whole-volume forward pass exactly; a wrong weighting or gap would not."""
    torch.manual_seed(0)
    model = nn.Conv3d(1, 3, 1).eval()
    image = np.random.default_rng(1).standard_normal((1, 10, 14, 7)).astype(np.float32)
    volume = Volume(image, np.zeros(image.shape[1:], np.uint8), np.eye(4), None)
    with torch.no_grad():
        whole = torch.softmax(model(torch.from_numpy(image[None])), 1)[0].numpy()
    np.testing.assert_allclose(predict_volume(model, volume, (4, 6, 4), overlap=0.5), whole, atol=1e-6)


def _eq6_plus_ce_by_hand(logits: np.ndarray, labels: np.ndarray, alpha: float, beta: float) -> float:
    """Müller et al.'s eq. 6 + cross-entropy with plain loops: per sample, N - sum over classes of TP / (TP + a FN + b FP)."""
    batch, classes = logits.shape[:2]
    per_sample, ce, voxels = [], 0.0, 0
    for b in range(batch):
        z = logits[b].reshape(classes, -1).astype(np.float64)
        y = labels[b].reshape(-1).astype(int)
        p = np.exp(z) / np.exp(z).sum(0)
        total = 0.0
        for c in range(classes):
            g = (y == c).astype(float)
            tp, fn, fp = (p[c] * g).sum(), ((1 - p[c]) * g).sum(), (p[c] * (1 - g)).sum()
            total += tp / (tp + alpha * fn + beta * fp)
        per_sample.append(classes - total)
        ce += -np.log(p[y, np.arange(y.size)]).sum()
        voxels += y.size
    return float(np.mean(per_sample) + ce / voxels)


@pytest.mark.parametrize("alpha,beta,classes", [(0.5, 0.5, 3), (0.3, 0.7, 3), (0.5, 0.5, 2)])
def test_tversky_loss_is_eq6_summed_over_classes_plus_ce(alpha, beta, classes):
    """Eq. 6 sums the N classes' Tversky indices (a mean over classes would be 1/N of it); 2 classes is transfer --dims 3."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, classes, 3, 2, 2)).astype(np.float32)
    labels = rng.integers(0, classes, (2, 1, 3, 2, 2)).astype(np.float32)
    labels[1, 0, 0, 0, 0] = classes - 1  # every class present in the batch
    expected = _eq6_plus_ce_by_hand(logits, labels, alpha, beta)
    got = float(TverskyCrossEntropyLoss(alpha, beta)(torch.from_numpy(logits), torch.from_numpy(labels)))
    assert got == pytest.approx(expected, rel=1e-5)


def test_tversky_loss_of_a_perfect_prediction_is_zero_and_sums_per_sample():
    """Confident and right: every Tversky index is 1 and CE is 0, so L = 0. One sample confidently wrong for class 2
    (absent from its truth, present in the other's): that sample's index for class 2 is 0, costing exactly 1 / batch."""
    labels = np.zeros((2, 1, 2, 2, 1), np.float32)
    labels[:, 0, 0, 0, 0], labels[:, 0, 1, 1, 0] = 1, 2
    onehot = np.moveaxis(np.eye(3)[labels[:, 0].astype(int)], -1, 1)
    logits = torch.from_numpy((60.0 * onehot).astype(np.float32))
    loss = TverskyCrossEntropyLoss()
    assert float(loss(logits, torch.from_numpy(labels))) == pytest.approx(0.0, abs=1e-5)
    labels[1, 0, 1, 1, 0] = 0  # sample 1 has no class 2 now, its prediction still says 2 at one voxel
    # by hand, sample 1: background TP 2, FN 1, FP 0 -> 2 / 2.5 = 0.8; lung 1; class 2 TP 0, FP 1 -> 0; L = 3 - 1.8 = 1.2.
    # Sample 0: 0. CE: one voxel of 8 at -log softmax = 60. (Pooling the batch would give class 2 1 / 1.5 instead.)
    got = float(loss(logits, torch.from_numpy(labels)))
    assert got == pytest.approx(1.2 / 2 + 60.0 / 8, rel=1e-4)


def test_augmentation_keeps_labels_integral_and_is_seeded():
    image, labels = index_volume((16, 16, 8))
    labels[4:9, 4:9, 2:5] = LESION
    data = {"image": image / image.max(), "label": labels[None].astype(np.float32)}
    a = muller_augmentation(1.0, seed=3)(dict(data))
    b = muller_augmentation(1.0, seed=3)(dict(data))
    np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert set(np.unique(np.asarray(a["label"]))) <= {0.0, float(LESION)}
    assert np.asarray(a["image"]).shape == (1, 16, 16, 8)


def test_training_lowers_the_loss_and_is_deterministic():
    rng = np.random.default_rng(0)
    labels = np.zeros((16, 16, 8), np.uint8)
    labels[2:14, 2:14, :] = 1
    labels[5:10, 5:10, 2:6] = LESION
    image = (labels.astype(np.float32) + 0.3 * rng.standard_normal(labels.shape)).astype(np.float32)[None]
    volumes = [Volume(image, labels, np.eye(4), None)]
    settings = VolumeTrainSettings(patch_size=(16, 16, 8), batch_size=2, iterations_per_epoch=4, epochs=6, augment=False)

    def run():
        torch.manual_seed(0)
        return train_volumes(UNet3d(1, 3, (4, 8)), volumes, settings)

    first, second = run(), run()
    assert first.history[-1]["loss"] < first.history[0]["loss"]
    assert [h["loss"] for h in first.history] == [h["loss"] for h in second.history]
    with pytest.raises(DomgenError, match="multiples of 2"):
        train_volumes(UNet3d(1, 3, (4, 8)), volumes, VolumeTrainSettings(patch_size=(15, 16, 8), epochs=1))
    with pytest.raises(DomgenError, match="train.sampler"):
        VolumeTrainSettings.from_config({"sampler": "random"})


def test_multi_encoder_3d_trains_its_own_encoder_and_decoder_only(tmp_path):
    from domgen.models.checkpoint import load_checkpoint, save_checkpoint
    from domgen.models.unet3d import MultiEncoderUNet3d

    torch.manual_seed(0)
    pretrained = build_model_3d({"features": [4, 8, 16]})
    model = MultiEncoderUNet3d.from_pretrained(pretrained)
    enc = {k: v.clone() for k, v in pretrained.encoder.state_dict().items()}
    assert all(torch.equal(model.adapted_encoder.state_dict()[k], v) for k, v in enc.items())
    assert not any(p.requires_grad for p in model.adapted_encoder.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    own = sum(p.numel() for p in model.encoder.parameters()) + sum(p.numel() for p in model.decoder.parameters())
    assert trainable == own
    # the decoder takes the doubled channels of both encoders at every level
    assert model.decoder.up[0].in_channels == 2 * 16 and model.decoder.blocks[-1][0].in_channels == 4 + 2 * 4
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    x, y = torch.randn(2, 1, 8, 8, 8), torch.randint(0, 3, (2, 1, 8, 8, 8)).float()
    for _ in range(2):
        optimizer.zero_grad()
        TverskyCrossEntropyLoss()(model(x), y).backward()
        optimizer.step()
    # the adapted encoder (weights and BatchNorm statistics) is untouched, the own encoder has learnt
    assert all(torch.equal(model.adapted_encoder.state_dict()[k], v) for k, v in enc.items())
    assert not all(torch.equal(model.encoder.state_dict()[k], v) for k, v in enc.items())
    back = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model), dims=3)[0]
    assert isinstance(back, MultiEncoderUNet3d)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model.eval()(x))
