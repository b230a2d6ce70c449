"""train.device_data and train.compile (issue 22): other paths to the same kind of model, off by default."""
from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
from torch import nn

from domgen.errors import DomgenError
from domgen.training.trainer import DiceBCELoss, TrainSettings, compile_model, predict_model_size, train, train_step
from tests.test_trainer import model, tiny_slices


def dsc(model, slices) -> float:
    pred = predict_model_size(model, slices) > 0.5
    truth = slices.targets > 0
    return 2 * float((pred & truth).sum()) / float(pred.sum() + truth.sum())


def test_device_data_trains_a_model_as_good_as_the_loader_path():
    """Same problem, same settings: the on-device batches (other random numbers) reach a comparable held-out DSC."""
    train_set, held_out = tiny_slices(n=8, size=32, seed=0), tiny_slices(n=6, size=32, seed=1)
    scores = {}
    for device_data in (False, True):
        settings = TrainSettings(epochs=12, batch_size=2, patience=None, augment="enshaei", select_by="last",
                                 device_data=device_data)
        result = train(model(), train_set, held_out, settings, progress=False)
        scores[device_data] = dsc(result.model, held_out)
        assert np.isfinite([h["train_loss"] for h in result.history]).all()
    assert scores[False] > 0.5 and scores[True] > 0.5, scores
    assert abs(scores[True] - scores[False]) < 0.25, scores


def test_device_data_is_deterministic_and_leaves_the_default_path_alone():
    slices = tiny_slices(n=5)
    settings = TrainSettings(epochs=2, batch_size=2, patience=None, augment="bizopoulos", select_by="last", device_data=True)
    a = train(model(), slices, slices, settings, progress=False)
    b = train(model(), slices, slices, settings, progress=False)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    default = train(model(), slices, slices, TrainSettings(epochs=2, batch_size=2, patience=None, augment="bizopoulos",
                                                           select_by="last"), progress=False)
    assert [h["train_loss"] for h in default.history] != [h["train_loss"] for h in a.history]  # other random numbers


def test_bad_device_data_and_compile_values_are_one_sentence():
    with pytest.raises(DomgenError, match="train.device_data"):
        TrainSettings(device_data="yes")
    with pytest.raises(DomgenError, match="train.compile"):
        TrainSettings(compile=1)


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    # no bias before BatchNorm: its gradient is rounding noise, which Adam would blow up to full steps either way
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))


def test_compiled_step_equals_the_eager_step():
    """Three Adam steps through torch.compile give the eager steps' weights, BatchNorm statistics and losses."""
    eager, compiled = tiny_net(), tiny_net()
    step_model = compile_model(compiled, "cpu")
    if step_model is compiled:
        pytest.skip("torch.compile is unavailable here (compile_model fell back to eager)")
    opt_e, opt_c = torch.optim.Adam(eager.parameters(), 1e-2), torch.optim.Adam(compiled.parameters(), 1e-2)
    loss_fn = DiceBCELoss()
    rng = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(3):
        x = torch.randn(2, 1, 16, 16, generator=rng)
        y = (torch.rand(2, 1, 16, 16, generator=rng) > 0.7).float()
        try:
            loss_c = train_step(step_model, opt_c, loss_fn, x, y)
        except Exception as error:  # noqa: BLE001 - Inductor's toolchain failures come in many types
            pytest.skip(f"torch.compile could not compile on this CPU: {type(error).__name__}: {str(error)[:200]}")
        loss_e = train_step(eager, opt_e, loss_fn, x, y)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    print(f"compiled 3 steps in {time.perf_counter() - started:.1f} s")


def test_compiled_stacked_step_equals_the_eager_stacked_step():
    """--stack with train.compile: three Adam steps of two stacked models through torch.compile of the vmapped forward
    pass give the eager stacked steps' weights, BatchNorm statistics and losses (here, beside the single-model case,
    so the two compilations share one process's warm-up)."""
    from domgen.training.stacked import StackedModels, stacked_step

    eager, compiled = StackedModels([tiny_net(), tiny_net()], "cpu"), StackedModels([tiny_net(), tiny_net()], "cpu")
    forward = compile_model(compiled.forward, "cpu")
    if forward is compiled.forward:
        pytest.skip("torch.compile is unavailable here (compile_model fell back to eager)")
    opt_e, opt_c = torch.optim.Adam(list(eager.params.values()), 1e-2), torch.optim.Adam(list(compiled.params.values()), 1e-2)
    loss_fn = DiceBCELoss()
    rng = torch.Generator().manual_seed(0)
    eager.train(True)
    compiled.train(True)
    for _ in range(3):
        x = torch.randn(2, 2, 1, 16, 16, generator=rng)
        y = (torch.rand(2, 2, 1, 16, 16, generator=rng) > 0.7).float()
        try:
            loss_c = stacked_step(compiled, opt_c, loss_fn, x, y, forward)
        except Exception as error:  # noqa: BLE001 - Inductor's toolchain failures come in many types
            pytest.skip(f"torch.compile could not compile on this CPU: {type(error).__name__}: {str(error)[:200]}")
        torch.testing.assert_close(loss_c, stacked_step(eager, opt_e, loss_fn, x, y), rtol=1e-4, atol=1e-5)
    for k in range(2):
        for name, value in eager.state_dict(k).items():
            torch.testing.assert_close(compiled.state_dict(k)[name], value, rtol=1e-4, atol=1e-5, msg=f"model {k}: {name}")
    assert compiled.buffers["1.num_batches_tracked"].tolist() == [3, 3]  # the compiled pass moved the statistics
