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
