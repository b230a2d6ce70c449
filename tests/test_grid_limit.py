"""benchmarks/grid_limit.py counts a training step's FLOPs as the hand formula for convolutions says."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from torch import nn

spec = importlib.util.spec_from_file_location("grid_limit", Path(__file__).parents[1] / "benchmarks" / "grid_limit.py")
grid_limit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(grid_limit)


def conv_forward_flops(c_in: int, c_out: int, k: int, h: int, w: int) -> int:
    return 2 * c_in * c_out * k * k * h * w  # one multiply-add (2 FLOPs) per weight per output pixel ('same' padding)


def test_one_convolution_counts_forward_and_weight_gradient():
    """The input needs no gradient, so backward is the weight gradient alone: as many FLOPs as the forward."""
    model = nn.Conv2d(1, 1, 5, padding=2, bias=False)
    assert grid_limit.training_flops_per_slice(model, size=24, batch=2) == 2 * conv_forward_flops(1, 1, 5, 24, 24)


def test_two_convolutions_count_the_input_gradient_of_the_second():
    """The second layer's backward also computes its input's gradient: 3x its forward, 2x the first layer's."""
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1, bias=False))
    expected = 2 * conv_forward_flops(1, 8, 3, 16, 16) + 3 * conv_forward_flops(8, 1, 3, 16, 16)
    assert grid_limit.training_flops_per_slice(model, size=16, batch=3) == expected


def test_figures_of_a_measurement_are_the_hand_computed_ones():
    """Epoch 0 left out; a stacked record's seconds are already each model's share; the grid is 600 x 200 epochs."""
    history = [{"train_seconds": 9.0, "val_seconds": 9.0}] + [{"train_seconds": 2.0, "val_seconds": 0.5}] * 2
    row = grid_limit._row(1e9, [history], k=4)
    steps = grid_limit.N_TRAIN // grid_limit.BATCH  # 40
    assert row["train_s"] == 2.0 and row["epoch_s"] == 2.5
    assert row["tflops"] == 1e9 * steps * grid_limit.BATCH / 2.0 / 1e12
    assert row["ms_per_step"] == 1e3 * 2.0 * 4 / steps  # one stacked step trains all four
    assert row["grid_gpu_hours"] == 600 * 200 * 2.5 / 3600


def test_a_stacked_measurement_runs_on_a_cpu(monkeypatch):
    monkeypatch.setattr(grid_limit, "N_TRAIN", 4)
    monkeypatch.setattr(grid_limit, "N_VAL", 2)
    row = grid_limit.measure_stacked("linknet", "resnet18", size=32, epochs=2, device="cpu", k=2)
    assert row["k"] == 2 and row["flops_per_slice"] > 0 and row["train_s"] > 0 and row["epoch_s"] > row["train_s"]
