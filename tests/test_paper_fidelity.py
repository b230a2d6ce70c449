"""Papers as written: Bizopoulos et al.'s loss (Eq. 1) and metric conventions, Wang et al.'s optimiser and strategies."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from domgen.evaluation.metrics import overlap_metrics
from domgen.training.trainer import LOSSES, SquaredDiceLoss


def _sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, dtype=float)))


def test_eq1_loss_by_hand():
    # Bizopoulos et al.'s Eq. 1: 1 - 2 sum(Y Yhat) / (sum(Y^2) + sum(Yhat^2) + eps), eps in the denominator only,
    # sums over the whole batch (here two slices, the first with no lesion)
    logits = torch.tensor([[[[-1.0, 3.0], [0.5, -2.0]]], [[[0.0, 2.0], [-2.0, 0.0]]]])
    target = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [0.0, 0.0]]]])
    p = _sigmoid([-1.0, 3.0, 0.5, -2.0, 0.0, 2.0, -2.0, 0.0])
    t = np.array([0, 0, 0, 0, 1, 1, 0, 0], dtype=float)
    expected = 1 - 2 * (p * t).sum() / ((t ** 2).sum() + (p ** 2).sum() + 1e-5)
    assert float(LOSSES["soft-dice-eq1"]()(logits, target)) == pytest.approx(expected, abs=5e-7)
    # smp's soft Dice (the named alternative) has |P| + |T| in the denominator: a different number
    smp_value = 1 - (2 * (p * t).sum() + 1e-5) / (t.sum() + p.sum() + 1e-5)
    assert float(LOSSES["soft-dice"]()(logits, target)) == pytest.approx(smp_value, rel=1e-4)
    assert abs(expected - smp_value) > 1e-3


def test_eq1_eps_sits_in_the_denominator_only():
    # one pixel, t = 1, p = 0.5: Eq. 1 gives 1 - 1 / (1.25 + eps); eps in the numerator too would give 8e-6 less
    one = LOSSES["soft-dice-eq1"]()(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    assert float(one) == pytest.approx(1 - 1 / (1.25 + 1e-5), abs=1e-6)
    # a large eps makes the placement plain: 1 - 2 * 0.5 / (1 + 0.25 + 0.75) = 0.5 (numerator eps: 0.125)
    big = SquaredDiceLoss(eps=0.75)(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    assert float(big) == pytest.approx(0.5, abs=1e-6)


def test_eq1_loss_of_an_empty_target_is_one_whatever_the_prediction():
    # sum(Y Yhat) = 0 when Y is empty: Eq. 1 is 1 - 0 / (sum(Yhat^2) + eps) = 1, even for an empty prediction
    loss_fn = LOSSES["soft-dice-eq1"]()
    empty = torch.zeros(2, 1, 4, 4)
    for logits in (torch.full((2, 1, 4, 4), -30.0), torch.full((2, 1, 4, 4), 3.0)):
        assert float(loss_fn(logits, empty)) == 1.0
    # and it gives no gradient: nothing in the batch tells the model which way to move
    logits = torch.full((2, 1, 4, 4), -30.0, requires_grad=True)
    loss_fn(logits, empty).backward()
    assert float(logits.grad.abs().max()) == 0.0


def test_eq4_dice_eps_sits_in_the_denominator_only():
    # Eq. 4: DSC = 2TP / (2TP + FP + FN + eps); a large eps makes the placement plain: 6 / (6 + 1 + 2 + 1) = 0.6
    assert overlap_metrics(np.array([3, 1, 2, 10]), "nan", eps=1.0)["dsc"] == pytest.approx(0.6)
    # no lesion in truth or prediction: 0 / eps = 0 under Eq. 4 (eps makes the ratio defined, not 1)
    assert overlap_metrics(np.array([0, 0, 0, 16]), "nan", eps=1e-5)["dsc"] == 0.0
    # false positives only: exactly 0 (eps in the numerator would give eps / (5 + eps))
    assert overlap_metrics(np.array([0, 5, 0, 11]), "nan", eps=1e-5)["dsc"] == 0.0
    # eps 0 (leave-one-out, transfer): the plain 2TP / (2TP + FP + FN), 0/0 left to the convention
    assert overlap_metrics(np.array([3, 1, 2, 10]), "nan", eps=0.0)["dsc"] == pytest.approx(6 / 9)
    assert np.isnan(overlap_metrics(np.array([0, 0, 0, 16]), "nan", eps=0.0)["dsc"])


def test_bizopoulos_convention_wins_over_eq4_when_nothing_is_predicted():
    # evaluation.empty: bizopoulos with dice_eps 1e-5 (the benchmark profiles): TP + FP = 0 scores 1 on every metric,
    # before Eq. 4 is looked at (Eq. 4 alone would give 0 / eps = 0 for an empty slice, 0 for a missed lesion)
    for counts in ([0, 0, 0, 16], [0, 0, 7, 9]):
        assert overlap_metrics(np.array(counts), "bizopoulos", eps=1e-5) == {"dsc": 1.0, "sen": 1.0, "spc": 1.0, "iou": 1.0}
    # once something is predicted Eq. 4 decides: 2*6 / (12 + 2 + 2 + 1e-5); false positives alone score exactly 0
    assert overlap_metrics(np.array([6, 2, 2, 90]), "bizopoulos", eps=1e-5)["dsc"] == pytest.approx(12 / (16 + 1e-5), rel=1e-12)
    assert overlap_metrics(np.array([0, 5, 0, 95]), "bizopoulos", eps=1e-5)["dsc"] == 0.0


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
