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


def test_paper_rule_indomain_median_limit_and_top_fraction_by_hand():
    """The paper profile's rule: CI >= the median CI of the in-domain test slices AND within the top fraction of the
    target's ranked slices (N filter first)."""
    import pandas as pd
    import yaml

    from domgen.config import EXPERIMENTS_DIR
    from domgen.methods.pseudolabel import PseudoLabelSettings, indomain_ci_limit

    cfg = yaml.safe_load((EXPERIMENTS_DIR / "leave_one_out" / "paper.yaml").read_text())["pseudolabel"]
    settings = PseudoLabelSettings.from_config({**cfg, "min_pixels_at": None})
    assert (settings.ci_rule, settings.ci_quantile, settings.top_fraction) == ("indomain-quantile", 0.5, 0.25)
    # in-domain: CIs 0.6, 0.9, 0.7 pass N; 0.99 does not (N filter) -> median of 0.6, 0.7, 0.9 = 0.7
    indomain = pd.DataFrame({"ci": [0.6, 0.9, 0.7, 0.99], "eligible": [True, True, True, False]})
    limit = indomain_ci_limit(indomain, settings.ci_quantile)
    assert limit == pytest.approx(0.7)
    rule = settings.with_ci_limit(limit).selection
    # target: 9 slices; slice 7 has N = 10 < 50 (not ranked) -> 8 ranked, top 25 % = 2 slices
    ci = np.array([0.95, 0.65, 0.85, 0.72, 0.99, 0.50, 0.69, 0.999, 0.80])
    n = np.array([100, 100, 100, 100, 100, 100, 100, 10, 100])
    order, selected = rank_and_select(ci, n, rule)
    assert order.tolist() == [4, 0, 2, 8, 3, 6, 1, 5]
    assert np.flatnonzero(selected).tolist() == [0, 4]  # 0.99 and 0.95: the two best, both >= 0.7
    # a limit above the second best leaves one slice: the CI limit binds before the fraction
    _, selected = rank_and_select(ci, n, settings.with_ci_limit(0.96).selection)
    assert np.flatnonzero(selected).tolist() == [4]
    # an undefined in-domain limit (no eligible in-domain slice) falls back to ci_min
    assert settings.with_ci_limit(indomain_ci_limit(indomain[~indomain.eligible], 0.5)).ci_min == settings.ci_min
