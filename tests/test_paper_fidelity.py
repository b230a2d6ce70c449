"""Papers as written: Bizopoulos et al.'s loss (Eq. 1) and metric conventions, Wang et al.'s optimiser and strategies."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from domgen.evaluation.metrics import overlap_metrics
from domgen.training.trainer import LOSSES


def test_eq1_loss_by_hand():
    logits = torch.tensor([[[[0.0, 2.0], [-2.0, 0.0]]]])
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    p = 1 / (1 + np.exp(-np.array([0.0, 2.0, -2.0, 0.0])))
    t = np.array([1.0, 1.0, 0.0, 0.0])
    expected = 1 - (2 * (p * t).sum() + 1e-5) / ((t ** 2).sum() + (p ** 2).sum() + 1e-5)
    assert float(LOSSES["soft-dice-eq1"]()(logits, target)) == pytest.approx(expected, rel=1e-6)
    # smp's soft Dice (the named alternative) has |P| + |T| in the denominator: a different number
    smp_value = 1 - (2 * (p * t).sum() + 1e-5) / (t.sum() + p.sum() + 1e-5)
    assert float(LOSSES["soft-dice"]()(logits, target)) == pytest.approx(smp_value, rel=1e-4)
    assert abs(expected - smp_value) > 1e-3


def test_eq1_loss_of_an_empty_target_and_empty_prediction_is_zero():
    logits = torch.full((2, 1, 4, 4), -30.0)
    assert float(LOSSES["soft-dice-eq1"]()(logits, torch.zeros(2, 1, 4, 4))) == pytest.approx(0.0, abs=1e-6)


def test_bizopoulos_sensitivity_of_false_positives_on_an_empty_slice_is_zero():
    counts = np.array([0, 5, 0, 95])  # no true lesion, 5 false positives
    paper = overlap_metrics(counts, "bizopoulos")
    assert paper["sen"] == 0.0 and paper["dsc"] == 0.0 and paper["spc"] == pytest.approx(0.95)
    assert np.isnan(overlap_metrics(counts, "no-prediction-one")["sen"])  # the old reading, kept by name
    nothing = overlap_metrics(np.array([0, 0, 7, 93]), "bizopoulos")  # TP + FP = 0: every metric is 1
    assert nothing == {"dsc": 1.0, "sen": 1.0, "spc": 1.0, "iou": 1.0}
    regular = overlap_metrics(np.array([6, 2, 2, 90]), "bizopoulos")
    assert regular["dsc"] == pytest.approx(12 / 16) and regular["sen"] == pytest.approx(0.75)


def test_sgd_optimiser_is_nesterov_with_the_papers_momentum():
    from domgen.training.trainer import OPTIMIZERS, TrainSettings

    params = [torch.nn.Parameter(torch.zeros(3))]
    sgd = OPTIMIZERS["sgd"](params, TrainSettings(optimizer="sgd", lr=0.01))
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert group["lr"] == 0.01 and group["momentum"] == 0.99 and group["nesterov"] is True
    assert isinstance(OPTIMIZERS["adam"](params, TrainSettings()), torch.optim.Adam)


def test_strategy_changes_come_from_the_profile():
    from domgen.methods.transfer import prepare_strategy

    cfg = {"arch": "linknet", "encoder": "resnet18", "encoder_weights": "none"}
    _, built_in = prepare_strategy("scratch", None, cfg)
    assert built_in == {}
    _, changed = prepare_strategy("scratch", None, cfg, {"scratch": {"lr": 0.005}})
    assert changed == {"lr": 0.005}


def test_transfer_refuses_a_target_that_is_a_pretraining_dataset(tiny_suite, tmp_path):
    from click.testing import CliRunner

    from domgen.cli import main

    out = CliRunner().invoke(main, ["transfer", "--target", "A", "--pretrain", "msd", "--strategy", "frozen", "--suite", str(tiny_suite),
                                    "--set", "pretrain_datasets={msd: A}", "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--quiet"])
    assert out.exit_code == 2 and "also a pretraining dataset" in out.output and out.output.count("\n") == 1
