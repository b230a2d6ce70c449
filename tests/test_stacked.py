"""Stacked training (issue 22): K models stepped as one give each model what its own training would."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from domgen.errors import DomgenError
from domgen.training.stacked import StackedModels, stacked_step, train_stacked
from domgen.training.trainer import LOSSES, TrainSettings, predict_model_size, train, train_step
from tests.test_trainer import tiny_slices


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 1, 3, padding=1))


def linknet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return smp.Linknet("resnet18", encoder_weights=None, in_channels=1, classes=1)


# Linknet at 64x64 (ResNet's last BatchNorm normalises 2x2 x batch values; at 32x32 one value per slice amplifies
# rounding) and with SGD (biases before BatchNorm get rounding-noise gradients that Adam's first step makes +-lr)
@pytest.mark.parametrize("build,optimizer,steps,size", [(net, "adam", 4, 32), (net, "sgd", 4, 32), (linknet, "sgd", 2, 64)])
def test_stacked_steps_equal_each_models_own_steps(build, optimizer, steps, size):
    """K=2 models (different inits) on different batches: after the stacked steps each has the weights and the
    BatchNorm running statistics (and batch counts) of its own single-model steps with its own optimiser."""
    settings = TrainSettings(optimizer=optimizer, lr=1e-2, momentum=0.9)
    from domgen.training.trainer import OPTIMIZERS

    singles = [build(1), build(2)]
    stack = StackedModels([copy.deepcopy(m) for m in singles], "cpu")
    optimizers = [OPTIMIZERS[optimizer](list(m.parameters()), settings) for m in singles]
    stacked_optimizer = OPTIMIZERS[optimizer](list(stack.params.values()), settings)
    loss_fn = LOSSES["soft-dice-eq1"]()
    rng = torch.Generator().manual_seed(0)
    for m in singles:
        m.train()
    stack.train(True)
    for _ in range(steps):
        x = torch.randn(2, 2, 1, size, size, generator=rng)
        y = (torch.rand(2, 2, 1, size, size, generator=rng) > 0.8).float()
        losses = stacked_step(stack, stacked_optimizer, loss_fn, x, y)
        for k, (m, opt) in enumerate(zip(singles, optimizers)):
            torch.testing.assert_close(losses[k], train_step(m, opt, loss_fn, x[k], y[k]), rtol=1e-4, atol=1e-5)
    for k, m in enumerate(singles):
        own, stacked = m.state_dict(), stack.state_dict(k)
        assert own.keys() == stacked.keys()
        assert any("running_mean" in name for name in own)
        for name in own:
            torch.testing.assert_close(stacked[name], own[name], rtol=1e-3, atol=1e-4, msg=f"model {k}: {name}")


def test_batchnorm_statistics_move_per_model():
    """The stacked running means are each model's own: two models fed different data end with different statistics,
    and a model in eval mode leaves them unchanged."""
    stack = StackedModels([net(1), net(1)], "cpu")
    stack.train(True)
    x = torch.stack([torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8) * 3])
    stack.forward(x)
    means = stack.buffers["1.running_mean"]
    assert not torch.allclose(means[0], means[1])
    assert stack.buffers["1.num_batches_tracked"].tolist() == [1, 1]
    stack.train(False)
    before = means.clone()
    stack.forward(x)
    assert torch.equal(stack.buffers["1.running_mean"], before)


def test_train_stacked_trains_each_model_on_its_own_data():
    """Two lockstep models, each kept at its own best epoch, are useful on their own data (a held-out DSC)."""
    sets = [tiny_slices(n=6, size=32, seed=0), tiny_slices(n=6, size=32, seed=2)]
    vals = [tiny_slices(n=4, size=32, seed=1), tiny_slices(n=4, size=32, seed=3)]
    settings = TrainSettings(epochs=10, batch_size=2, patience=None, augment="enshaei", select_by="val_loss",
                             loss="dice+bce")
    results = train_stacked([linknet(0), linknet(1)], sets, vals, settings)
    for result, val in zip(results, vals):
        assert len(result.history) == 10 and 0 <= result.best_epoch < 10
        assert result.history[result.best_epoch]["val_loss"] == min(h["val_loss"] for h in result.history)
        pred = predict_model_size(result.model, val) > 0.5
        truth = val.targets > 0
        assert 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) > 0.4


def test_unstackable_requests_are_one_sentence():
    with pytest.raises(DomgenError, match="one architecture"):
        StackedModels([net(0), linknet(0)], "cpu")
    s = tiny_slices(n=4)
    with pytest.raises(DomgenError, match="patience"):
        train_stacked([net(0), net(1)], [s, s], [s, s], TrainSettings(patience=5))


def test_autocast_does_not_reach_inside_vmap_so_half_precision_is_refused():
    """Why stacking is fp32 only: under bf16 autocast one model's forward pass gives bf16 logits, the same pass under
    vmap gives fp32 (pytorch/pytorch#192617). If a PyTorch update makes this fail, stacked bf16 can be built."""
    from domgen.training.trainer import autocast

    model, stack = net(1), StackedModels([net(1), net(2)], "cpu")
    x = torch.randn(2, 2, 1, 16, 16)
    with autocast("bf16", "cpu"):
        assert model(x[0]).dtype == torch.bfloat16
        assert stack.forward(x).dtype == torch.float32


def test_train_stacked_records_what_train_records_and_calls_each_models_callback():
    """Each model's epoch records carry train's keys (the group's seconds shared out), and reach that model's callback."""
    s = tiny_slices(n=4, size=32, seed=0)
    seen: list[list[dict]] = [[], []]
    settings = TrainSettings(epochs=2, batch_size=2, patience=None, augment="enshaei")
    results = train_stacked([net(0), net(1)], [s, s], [s, s], settings, on_epoch=[seen[0].append, seen[1].append])
    single = train(net(0), s, s, TrainSettings(epochs=1, batch_size=2, patience=None, augment="enshaei", device_data=True),
                   progress=False)
    for k, result in enumerate(results):
        assert seen[k] == result.history and [r["epoch"] for r in seen[k]] == [0, 1]
        assert set(seen[k][0]) == set(single.history[0])
        assert seen[k][0]["precision"] == "fp32" and seen[k][0]["memory_format"] == "contiguous"
    assert seen[0][0]["train_seconds"] == seen[1][0]["train_seconds"] > 0
    assert seen[0][0]["val_loss"] != seen[1][0]["val_loss"]  # two models (different inits), each its own record


@pytest.mark.parametrize("change,needle", [({"patience": 5}, "train.patience"), ({"precision": "fp16"}, "fp16"),
                                           ({"precision": "bf16"}, "torch.vmap"),
                                           ({"channels_last": True}, "channels_last")])
def test_settings_the_stacked_step_cannot_honour_are_one_sentence(change, needle):
    from domgen.training.stacked import check_stackable

    with pytest.raises(DomgenError, match=needle) as refusal:
        check_stackable(TrainSettings(**{"patience": None, **change, **({"device": "cuda"} if "precision" in change else {})}))
    assert "\n" not in str(refusal.value) and "--stack 1" in str(refusal.value)
    check_stackable(TrainSettings(patience=None, precision="fp32", compile=True))  # what it accepts
