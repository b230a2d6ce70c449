"""Selective risk (AURC, E-AURC) and calibration (ECE/ACE/MCE, temperature scaling) against hand computations."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from domgen.evaluation.calibration import (calibration_errors, fit_temperature, fit_temperature_on, reliability_bins,
                                           scale_probabilities, scaled_cutoff)
from domgen.evaluation.selective_risk import aurc, e_aurc, optimal_aurc, risk_coverage_curve, selective_risk


def test_aurc_of_a_four_slice_case_by_hand():
    risk = [0.1, 0.4, 0.2, 0.8]
    confidence = [0.9, 0.3, 0.7, 0.5]
    # by confidence: risks 0.1, 0.2, 0.8, 0.4 -> selective risks 0.1, 0.15, 1.1/3, 1.5/4
    assert aurc(confidence, risk) == pytest.approx((0.1 + 0.15 + 1.1 / 3 + 1.5 / 4) / 4)
    # best order 0.1, 0.2, 0.4, 0.8 -> 0.1, 0.15, 0.7/3, 1.5/4
    assert optimal_aurc(risk) == pytest.approx((0.1 + 0.15 + 0.7 / 3 + 1.5 / 4) / 4)
    assert e_aurc(confidence, risk) == pytest.approx((1.1 / 3 - 0.7 / 3) / 4)
    coverage, selective = risk_coverage_curve(confidence, risk)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert selective == pytest.approx([0.1, 0.15, 1.1 / 3, 0.375])


def test_a_perfect_order_has_e_aurc_zero_and_the_reversed_order_the_maximum():
    rng = np.random.default_rng(3)
    risk = rng.uniform(0, 1, 6)
    assert e_aurc(-risk, risk) == pytest.approx(0.0, abs=1e-12)
    worst = max(e_aurc(np.argsort(perm), risk) for perm in itertools.permutations(range(6)))
    assert e_aurc(risk, risk) == pytest.approx(worst)  # most confident where the risk is highest
    assert worst > 0


def test_slices_without_a_score_are_left_out_and_the_interval_is_seeded():
    risk = np.array([0.1, 0.4, 0.2, 0.8, 0.3])
    conf = np.array([0.9, 0.3, 0.7, 0.5, np.nan])
    assert aurc(conf, risk) == pytest.approx(aurc(conf[:4], risk[:4]))
    a = selective_risk(conf, risk, n_resamples=500, seed=1)
    b = selective_risk(conf, risk, n_resamples=500, seed=1)
    assert a == b and a.n == 4
    assert a.aurc_low <= a.aurc <= a.aurc_high and a.e_aurc_low <= a.e_aurc_high


def test_a_calibrated_prediction_has_ece_near_zero():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, (4, 128, 128)).astype(np.float32)
    y = rng.uniform(0, 1, p.shape) < p
    errors = calibration_errors(list(p), list(y))
    assert errors["ece"] < 0.01 and errors["ace"] < 0.01 and errors["mce"] < 0.03


def test_an_over_confident_prediction_has_the_hand_computed_errors():
    # 500 pixels at 0.93 of which 300 are lesion (share 0.6), 500 at 0.07 of which 100 are lesion (0.2)
    p = np.r_[np.full(500, 0.93), np.full(500, 0.07)].astype(np.float32).reshape(10, 100)
    y = np.r_[np.ones(300), np.zeros(200), np.ones(100), np.zeros(400)].reshape(10, 100)
    errors = calibration_errors([p], [y])
    assert errors["ece"] == pytest.approx(0.5 * 0.33 + 0.5 * 0.13, abs=1e-5)
    assert errors["ace"] == pytest.approx((0.33 + 0.13) / 2, abs=1e-5)
    assert errors["mce"] == pytest.approx(0.33, abs=1e-5)
    # the lesion region: the 0.93 block (predicted) and the 100 missed lesion pixels at 0.07 (share 1.0 there)
    region = (p > 0.5) | (y > 0)
    inside = calibration_errors([p], [y], regions=[region])
    assert inside["ece"] == pytest.approx((500 * 0.33 + 100 * 0.93) / 600, abs=1e-5)
    mean_p, share, counts = reliability_bins([p], [y])
    assert counts.sum() == 1000 and counts[1] == 500 and counts[18] == 500
    assert share[18] == pytest.approx(0.6, abs=1e-5) and mean_p[1] == pytest.approx(0.07, abs=1e-5)


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 4, 200_000)
    labels = rng.uniform(0, 1, logits.size) < 1 / (1 + np.exp(-logits / 2.5))
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.03)
    # from probability maps (what domgen's predictions are): the same T within tolerance
    p = (1 / (1 + np.exp(-logits))).astype(np.float32).reshape(100, 2000)
    assert fit_temperature_on(list(p), list(labels.reshape(100, 2000))) == pytest.approx(2.5, rel=0.03)


def test_temperature_scaling_keeps_the_prediction_when_the_cutoff_moves_with_it():
    rng = np.random.default_rng(2)
    p = rng.uniform(0, 1, (64, 64)).astype(np.float32)
    for t, cutoff in ((2.0, 0.35), (0.5, 0.7)):
        scaled = scale_probabilities(p, t)
        assert np.array_equal(scaled > scaled_cutoff(cutoff, t), p > cutoff)
    assert np.all(np.abs(scale_probabilities(p, 2.0) - 0.5) <= np.abs(p - 0.5) + 1e-6)  # T > 1 softens


def test_temperature_scaling_needs_both_classes():
    from domgen.errors import DomgenError

    with pytest.raises(DomgenError, match="both classes"):
        fit_temperature(np.zeros(10), np.zeros(10))


def _ctx(probabilities, cutoff=0.5, temperature=None):
    from domgen.methods.confidence import ScoreContext

    return ScoreContext(None, None, probabilities, None, cutoff, "cpu", temperature)


def test_ci_of_the_temperature_scaled_model_by_hand():
    from domgen.errors import DomgenError
    from domgen.methods.confidence import get_score

    p = np.array([[0.9, 0.6, 0.2], [0.45, 0.1, 0.05]], dtype=np.float32)
    t, cutoff = 2.0, 0.4
    scaled = [1 / (1 + np.exp(-np.log(v / (1 - v)) / t)) for v in (0.9, 0.6, 0.45)]  # the three pixels above 0.4
    assert get_score("ci-ts")(_ctx([p], cutoff, t))[0] == pytest.approx(np.mean(scaled), rel=1e-5)
    with pytest.raises(DomgenError, match="temperature"):
        get_score("ci-ts")(_ctx([p], cutoff))


def test_boundary_and_interior_entropy_by_hand():
    from domgen.methods.confidence import binary_entropy, get_score

    p = np.full((12, 12), 0.1, dtype=np.float32)
    p[2:10, 2:10] = 0.7  # an 8 x 8 predicted lesion
    p[4:8, 4:8] = 0.99  # its interior after two erosions (4 x 4)
    interior = get_score("interior")(_ctx([p]))[0]
    assert interior == pytest.approx(1 - binary_entropy(np.array([0.99]))[0], rel=1e-5)
    # the band: pixels at most two 4-connected steps from the square (city-block distance <= 2), minus the interior
    rows, cols = np.mgrid[0:12, 0:12]
    distance = np.maximum(2 - rows, 0) + np.maximum(rows - 9, 0) + np.maximum(2 - cols, 0) + np.maximum(cols - 9, 0)
    band = distance <= 2
    band[4:8, 4:8] = False
    assert band.sum() == 12 * 12 - 4 * 3 - 16  # three corner pixels of each corner are too far
    assert get_score("boundary")(_ctx([p]))[0] == pytest.approx(1 - binary_entropy(p[band]).mean(), rel=1e-5)
    assert np.isnan(get_score("interior")(_ctx([np.full((5, 5), 0.2, np.float32)]))[0])  # nothing predicted


class _Pixelwise(__import__("torch").nn.Module):
    """logit = 3 x - 1 per pixel: a model whose probabilities are known in closed form."""

    def forward(self, x):
        return 3.0 * x - 1.0


def _slices(inputs, truths):
    from domgen.preprocessing.slices import SliceSet

    n, _, h, w = inputs.shape
    return SliceSet(inputs.astype(np.float32), (truths > 0).astype(np.uint8), [f"X/p{i}/{i:04d}" for i in range(n)],
                    [f"p{i}" for i in range(n)], ["X"] * n, [t.astype(np.uint8) for t in truths],
                    [np.ones((h, w), np.uint8)] * n, [(1.0, 1.0)] * n)


def test_pseudo_label_ranking_by_the_scaled_ci_fits_the_temperature_on_the_source_validation_slices():
    from domgen.errors import DomgenError
    from domgen.methods.pseudolabel import PseudoLabelSettings, rank_target
    from domgen.methods.confidence import fit_fold_temperature

    rng = np.random.default_rng(0)
    val_inputs = rng.uniform(0, 1, (6, 1, 16, 16))
    truths = rng.uniform(0, 1, (6, 16, 16)) < 1 / (1 + np.exp(-(3 * val_inputs[:, 0] - 1) / 2.0))  # labels of a T = 2 model
    val = _slices(val_inputs, truths)
    target = _slices(rng.uniform(0, 1, (4, 1, 16, 16)), np.zeros((4, 16, 16)))
    settings = PseudoLabelSettings(confidence="ci-ts", ci_min=0.0, min_pixels=1, min_pixels_at=None)
    with pytest.raises(DomgenError, match="source validation slices"):
        rank_target(_Pixelwise(), target, 0.5, settings)
    ranking, _ = rank_target(_Pixelwise(), target, 0.5, settings, calibration=val)
    t = fit_fold_temperature(_Pixelwise(), val)
    assert t == pytest.approx(2.0, rel=0.25)  # 1536 pixels: a rough recovery
    for i, sid in enumerate(target.slice_ids):
        x = target.inputs[i, 0]
        above = (3 * x - 1) > 0  # p > 0.5
        by_hand = (1 / (1 + np.exp(-(3 * x[above] - 1) / t))).mean()
        assert ranking.set_index("slice_id").loc[sid, "ci-ts"] == pytest.approx(by_hand, rel=1e-4)
    assert list(ranking["ci-ts"][ranking.eligible]) == sorted(ranking["ci-ts"][ranking.eligible], reverse=True)
