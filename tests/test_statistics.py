"""domgen.evaluation.statistics against hand-enumerated bootstrap and sign-pattern distributions and hand-ranked data."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from domgen.errors import DomgenError
from domgen.evaluation.statistics import (pair_by_patient, paired_bootstrap_change, spearman_interval,
                                          wilcoxon_p)


def exact_bootstrap_quantiles(d, probs):
    """Quantiles of the exact bootstrap distribution of mean(d): every one of n^n resamples, equally likely."""
    means = np.sort([np.mean(c) for c in itertools.product(d, repeat=len(d))])
    cdf = np.arange(1, means.size + 1) / means.size
    return [float(means[np.searchsorted(cdf, p - 1e-12)]) for p in probs]


def test_two_patients_interval_is_the_enumerated_one():
    # differences 0 and 1: resampled means 0 (1/4), 0.5 (1/2), 1 (1/4) -> the 2.5 % and 97.5 % points are 0 and 1
    change = paired_bootstrap_change([0.5, 0.2], [0.5, 1.2])
    assert change.mean_change == pytest.approx(0.5)
    assert (change.low, change.high) == pytest.approx((0.0, 1.0))
    assert change.n_patients == 2


def test_three_patients_interval_matches_exact_enumeration():
    # differences 0, 0, 1: means k/3 with P = 8/27, 12/27, 6/27, 1/27; 5 % point 0, 95 % point 2/3 (cdf 26/27 >= 0.95)
    d = [0.0, 0.0, 1.0]
    change = paired_bootstrap_change(np.zeros(3), d, confidence=0.90, n_resamples=20000, seed=3)
    assert exact_bootstrap_quantiles(d, [0.05, 0.95]) == pytest.approx([0.0, 2 / 3])
    assert (change.low, change.high) == pytest.approx((0.0, 2 / 3))


def test_interval_of_a_larger_sample_is_close_to_the_exact_bootstrap_and_deterministic():
    rng = np.random.default_rng(0)
    before = rng.uniform(0.3, 0.7, 5)
    after = before + np.array([0.10, -0.05, 0.20, 0.02, 0.07])
    exact_low, exact_high = exact_bootstrap_quantiles(after - before, [0.025, 0.975])
    change = paired_bootstrap_change(before, after, n_resamples=20000, seed=1)
    assert change.low == pytest.approx(exact_low, abs=0.011)
    assert change.high == pytest.approx(exact_high, abs=0.011)
    assert change.low <= change.mean_change <= change.high
    assert paired_bootstrap_change(before, after, n_resamples=20000, seed=1) == change


def test_pairing_is_by_patient_id_not_by_order():
    before = {"p1": 0.4, "p2": 0.6, "p3": 0.5}
    after = {"p3": 0.9, "p1": 0.4, "p2": 0.6}  # only p3 changed
    ids, b, a = pair_by_patient(before, after)
    assert ids == ["p1", "p2", "p3"] and list(a - b) == pytest.approx([0.0, 0.0, 0.4])
    change = paired_bootstrap_change(before, after)
    assert change.mean_change == pytest.approx(0.4 / 3)
    with pytest.raises(DomgenError, match="p4"):
        paired_bootstrap_change(before, {**after, "p4": 0.1})


def test_degenerate_cases():
    same = paired_bootstrap_change([0.2, 0.4, 0.6], [0.3, 0.5, 0.7])  # every patient +0.1
    assert (same.mean_change, same.low, same.high) == pytest.approx((0.1, 0.1, 0.1))
    one = paired_bootstrap_change([0.5], [0.8])
    assert (one.low, one.high) == pytest.approx((0.3, 0.3)) and one.n_patients == 1
    none = paired_bootstrap_change([], [])
    assert none.n_patients == 0 and math.isnan(none.mean_change) and math.isnan(none.low)
    assert wilcoxon_p([0.1, 0.2], [0.1, 0.2]) == 1.0
    with pytest.raises(DomgenError, match="one per patient"):
        paired_bootstrap_change([0.1, 0.2], [0.1])
    with pytest.raises(DomgenError, match="confidence"):
        paired_bootstrap_change([0.1, 0.2], [0.2, 0.1], confidence=95)


def test_wilcoxon_exact_p_by_enumerating_sign_patterns():
    # all five patients improved: W- = 0, only 1 of the 2^5 sign patterns is as extreme on each side -> p = 2 / 32
    assert wilcoxon_p([0.1, 0.2, 0.3, 0.4, 0.5], [0.15, 0.3, 0.33, 0.6, 0.51]) == pytest.approx(2 / 32)
    assert paired_bootstrap_change([0.1, 0.2, 0.3, 0.4, 0.5], [0.15, 0.3, 0.33, 0.6, 0.51]).p_wilcoxon == pytest.approx(1 / 16)
    # d = +1, +2, +3, -4 (ranks 1..4): W- = 4; subsets of {1,2,3,4} summing to <= 4: {}, 1, 2, 3, 1+2, 4, 1+3 -> 7 of 16
    assert wilcoxon_p([0, 0, 0, 0], [0.1, 0.2, 0.3, -0.4]) == pytest.approx(2 * 7 / 16)
    # d = +1, +2, -3, +4, +5, +6: W- = 3; subsets of {1..6} summing to <= 3: {}, 1, 2, 3, 1+2 -> 5 of 64
    assert wilcoxon_p([0] * 6, [0.1, 0.2, -0.3, 0.4, 0.5, 0.6]) == pytest.approx(2 * 5 / 64)
    # by brute force over every sign pattern of ranks 1..7 for one more case: d ranks 1..7, negatives at ranks 2 and 5
    ranks = np.arange(1, 8)
    w_minus = 2 + 5
    sums = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=7)]
    expected = 2 * np.mean(np.asarray(sums) <= w_minus)
    d = np.array([1, -2, 3, 4, -5, 6, 7]) / 10
    assert wilcoxon_p(np.zeros(7), d) == pytest.approx(expected)


def test_spearman_point_estimate_by_hand_with_ties():
    x = np.array([0.9, 0.8, 0.8, 0.5, 0.3, 0.3, 0.1])
    y = np.array([0.7, 0.9, 0.6, 0.4, 0.4, 0.2, 0.3])
    result = spearman_interval(x, y, n_resamples=2000)
    # by hand: average ranks (ties share their mean rank), then Pearson's r of the ranks
    rx = np.array([7, 5.5, 5.5, 4, 2.5, 2.5, 1]) - 4
    ry = np.array([6, 7, 5, 3.5, 3.5, 1, 2]) - 4
    assert result.rho == pytest.approx((rx * ry).sum() / np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    assert result.low <= result.rho <= result.high and result.n_slices == 7


def test_spearman_interval_of_two_slices_is_enumerable():
    # two distinct slices: a resample is both slices (rho +1, probability 1/2) or one slice twice (no rho)
    result = spearman_interval([0.1, 0.9], [0.2, 0.8], n_resamples=1000, seed=0)
    assert (result.rho, result.low, result.high) == (1.0, 1.0, 1.0)
    assert 400 < result.n_resamples < 600


def test_spearman_interval_covers_and_is_deterministic():
    rng = np.random.default_rng(7)
    x = rng.random(60)
    y = x + rng.normal(0, 0.4, 60)
    a = spearman_interval(x, y, seed=5)
    assert a == spearman_interval(x, y, seed=5)
    assert a.low < a.rho < a.high
    assert 0.1 < a.high - a.low < 0.6
    flat = spearman_interval(x, np.ones(60))
    assert math.isnan(flat.rho) and math.isnan(flat.low)
    with pytest.raises(DomgenError, match="one per slice"):
        spearman_interval(x, y[:-1])
