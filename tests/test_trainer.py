"""Training speed settings: precision and channels_last change speed, not the model's answers (much)."""
from __future__ import annotations

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch

from domgen.errors import DomgenError
from domgen.preprocessing.slices import SliceSet
from domgen.training.trainer import (DiceBCELoss, SliceDataset, TrainSettings, grad_scaler, predict_model_size, resolve_pin_memory,
                                     resolve_precision, train, train_step)


def tiny_slices(n=6, size=32, seed=0) -> SliceSet:
    rng = np.random.default_rng(seed)
    targets = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        r, c = rng.integers(6, size - 10, 2)
        targets[i, r:r + 8, c:c + 8] = 1
    inputs = (targets[:, None] * 2.0 + rng.normal(0, 0.3, (n, 1, size, size))).astype(np.float32)
    return SliceSet(inputs, targets, [f"s{i}" for i in range(n)], [f"p{i // 2}" for i in range(n)], ["X"] * n,
                    list(targets), list(targets), [(1.0, 1.0)] * n)


def model():
    torch.manual_seed(0)
    return smp.Linknet("resnet18", encoder_weights=None, in_channels=1, classes=1)


def test_bad_precision_is_one_sentence():
    with pytest.raises(DomgenError, match="train.precision"):
        TrainSettings(precision="fp8")
    with pytest.raises(DomgenError, match="train.channels_last"):
        TrainSettings(channels_last="yes")
    assert TrainSettings.from_config({"precision": "bf16", "channels_last": True}).channels_last is True


def test_bad_loader_settings_and_fp16_on_a_cpu_are_one_sentence():
    with pytest.raises(DomgenError, match=r"^train\.loader_workers is -1; use 0 or more\.$"):
        TrainSettings(loader_workers=-1)
    with pytest.raises(DomgenError, match=r"^train\.loader_workers is 1\.5; use 0 or more\.$"):
        TrainSettings(loader_workers=1.5)
    with pytest.raises(DomgenError, match=r"^train\.pin_memory is 'sometimes'; use true, false or auto\.$"):
        TrainSettings(pin_memory="sometimes")
    with pytest.raises(DomgenError, match=r"fp16 needs --device cuda .*bf16"):
        TrainSettings(precision="fp16", device="cpu")
    assert TrainSettings(precision="fp16", device="cuda", loader_workers=2).loader_workers == 2  # checked, not run
    assert resolve_pin_memory("auto", "cuda") and not resolve_pin_memory("auto", "cpu") and not resolve_pin_memory(True, "cpu")
    assert resolve_precision("fp16", "cuda") == "fp16" and resolve_precision("auto", "cuda") == "fp32"


def test_fp16_train_step_is_refused_on_a_cpu():
    slices = tiny_slices(n=2)
    x, y = torch.from_numpy(slices.inputs), torch.from_numpy(slices.targets)[:, None].float()
    m = model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    with pytest.raises(DomgenError, match="fp16 needs --device cuda"):
        train_step(m, opt, DiceBCELoss(), x, y, "fp16")
    assert grad_scaler("fp32", "cpu") is None and grad_scaler("bf16", "cuda") is None


def test_auto_precision_is_fp32_on_gpu_and_bf16_only_with_native_cpu_support(monkeypatch):
    import domgen.training.trainer as trainer

    assert resolve_precision("auto", "cuda") == "fp32"
    assert resolve_precision("bf16", "cuda") == "bf16"
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"


def test_channels_last_predicts_what_contiguous_predicts():
    slices = tiny_slices()
    m = model()
    plain = predict_model_size(m, slices, precision="fp32", channels_last=False)
    nhwc = predict_model_size(m, slices, precision="fp32", channels_last=True)
    assert np.abs(plain - nhwc).max() < 1e-4


def test_bf16_step_matches_fp32_step_to_bf16_precision():
    slices = tiny_slices()
    x, y = torch.from_numpy(slices.inputs[:2]), torch.from_numpy(slices.targets[:2])[:, None].float()
    losses = {}
    for precision in ("fp32", "bf16"):
        m = model().train()
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        losses[precision] = float(train_step(m, opt, DiceBCELoss(), x, y, precision))
        assert all(p.dtype == torch.float32 for p in m.parameters())  # autocast leaves weights fp32
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_train_records_speed_settings_for_prediction_and_is_deterministic():
    slices = tiny_slices()
    settings = TrainSettings(epochs=2, batch_size=2, patience=None, channels_last=True, augment="none")
    a = train(model(), slices, slices, settings, progress=False)
    b = train(model(), slices, slices, settings, progress=False)
    assert a.model.domgen_channels_last is True and a.model.domgen_precision == "fp32"
    assert [h["val_loss"] for h in a.history] == [h["val_loss"] for h in b.history]
    np.testing.assert_array_equal(predict_model_size(a.model, slices), predict_model_size(b.model, slices))


def test_loader_workers_do_not_change_the_numbers():
    """Augmentation is drawn from (seed, epoch, index): 0 or 2 worker processes train the very same weights."""
    slices = tiny_slices(n=5)
    results = {}
    for workers in (0, 2):
        settings = TrainSettings(epochs=2, batch_size=2, patience=None, augment="enshaei", loader_workers=workers, select_by="last")
        results[workers] = train(model(), slices, slices, settings, progress=False)
    a, b = results[0], results[2]
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert [h["val_loss"] for h in a.history] == [h["val_loss"] for h in b.history]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_augmentation_depends_on_seed_epoch_and_index_only():
    slices = tiny_slices(n=3)
    one, other = SliceDataset(slices, "bizopoulos", seed=1), SliceDataset(slices, "bizopoulos", seed=1)
    other[(5, 2)]  # another draw first: no state carries over
    assert torch.equal(one[(0, 1)][0], other[(0, 1)][0])
    assert not torch.equal(one[(0, 1)][0], one[(1, 1)][0])  # a new epoch, a new augmentation
    assert torch.equal(one[1][0], one[(0, 1)][0])  # a bare index is epoch 0


def test_a_training_run_records_the_precision_and_memory_format_it_resolved(tracking_uri, monkeypatch):
    """`auto` is tagged as what ran (a real SQLite MLflow store), on a CPU without and with native bf16."""
    import domgen.training.trainer as trainer
    from mlflow.tracking import MlflowClient

    from domgen.tracking import mlflow_store as store

    exp_id = store.experiment_id("precision-tags")
    slices = tiny_slices(n=2)
    seen = {}
    for native, channels_last in ((False, False), (True, True)):
        monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda native=native: native)
        run_id = MlflowClient().create_run(exp_id).info.run_id
        settings = TrainSettings(epochs=1, batch_size=2, patience=None, augment="none", precision="auto", channels_last=channels_last)
        train(model(), slices, slices, settings, on_epoch=store.epoch_logger(run_id), progress=False)
        run = MlflowClient().get_run(run_id)
        seen[native] = (run.data.tags.get("domgen.precision"), run.data.tags.get("domgen.memory_format"))
        assert len(MlflowClient().get_metric_history(run_id, "val_loss")) == 1  # the numbers are still metrics
        assert "precision" not in run.data.metrics and "memory_format" not in run.data.metrics
    assert seen == {False: ("fp32", "contiguous"), True: ("bf16", "channels_last")}


def test_the_transforms_of_a_slice_augmentation_draw_independently():
    """Two flips at p = 0.5 with one seed per slice: each of the four combinations about a quarter of the time (they
    coincided when albumentations gave every transform the slice's seed)."""
    import albumentations as A

    from domgen.training.augment import build_augmentation, seed_augmentation
    from domgen.training.trainer import augmentation_seed

    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    pipeline = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    counts = {}
    n = 4000
    for i in range(n):
        seed_augmentation(pipeline, augmentation_seed(0, 0, i))
        out = pipeline(image=image)["image"]
        key = (bool(out[0, 0] in (3, 15)), bool(out[0, 0] in (12, 15)))  # (mirrored left-right, upside down)
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) == {(False, False), (True, False), (False, True), (True, True)}
    for combination, count in counts.items():  # binomial(4000, 1/4): sd 27, so +-120 is over 4 sd
        assert abs(count - n / 4) < 120, (combination, counts)
    seed_augmentation(pipeline, 5)
    first = pipeline(image=image)["image"]
    seed_augmentation(pipeline, 5)
    assert np.array_equal(first, pipeline(image=image)["image"])  # still a function of the seed alone
    for name in ("enshaei", "bizopoulos"):
        transforms = build_augmentation(name, 3).transforms
        assert len({t.seed for t in transforms}) == len(transforms)  # a seed of its own for every transform
