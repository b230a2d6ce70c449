"""Certainty Index, the N filter and the selection against hand-computed examples."""
import numpy as np
import pytest

from domgen.methods.certainty import Selection, certainty_index, rank_and_select


def test_certainty_index_by_hand():
    p = np.array([[0.9, 0.6, 0.2], [0.7, 0.5, 0.0]])
    ci, n = certainty_index(p, cutoff=0.5)  # above 0.5: .9 .6 .7 (0.5 itself is not above)
    assert n == 3
    assert ci == pytest.approx((0.9 + 0.6 + 0.7) / 3)
    ci, n = certainty_index(p, cutoff=0.95)
    assert n == 0 and np.isnan(ci)


def test_min_pixels_filter_and_ranking():
    ci = np.array([0.95, 0.85, 0.99, 0.70, 0.90])
    n = np.array([60, 200, 10, 500, 50])  # slice 2 has too few pixels
    order, selected = rank_and_select(ci, n, Selection(min_pixels=50, ci_min=0.8))
    assert order.tolist() == [0, 4, 1, 3]
    assert selected.tolist() == [True, True, False, False, True]


def test_top_k_and_top_fraction():
    ci = np.array([0.95, 0.85, 0.99, 0.70, 0.90])
    n = np.full(5, 100)
    _, sel = rank_and_select(ci, n, Selection(min_pixels=50, ci_min=0.0, top_k=2))
    assert np.flatnonzero(sel).tolist() == [0, 2]
    # 40% of 5 eligible -> ceil(2.0) = 2
    _, sel = rank_and_select(ci, n, Selection(min_pixels=50, ci_min=0.0, top_fraction=0.4))
    assert np.flatnonzero(sel).tolist() == [0, 2]
    # ci_min applies before the top-k cut
    _, sel = rank_and_select(ci, n, Selection(min_pixels=50, ci_min=0.92, top_k=3))
    assert np.flatnonzero(sel).tolist() == [0, 2]
