"""The Certainty Index (Enshaei et al., eq. 1) and the selection of pseudo-labelled slices.

CI = (1/N) * sum of p_i over the N pixels whose predicted lesion probability p_i exceeds the cut-off.
Slices with N < min_pixels (counted at the original resolution) are dropped: too few pixels to trust.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def certainty_index(probability: np.ndarray, cutoff: float) -> tuple[float, int]:
    """(CI, N) of one slice; CI is NaN when no pixel exceeds the cut-off."""
    p = np.asarray(probability, dtype=np.float64)
    above = p > cutoff
    n = int(np.count_nonzero(above))
    return (float(p[above].mean()) if n else float("nan")), n


@dataclass(frozen=True)
class Selection:
    """Which slices become pseudo-labels."""

    min_pixels: int = 50
    ci_min: float = 0.0
    top_k: int | None = None
    top_fraction: float | None = None


def rank_and_select(ci: np.ndarray, n_pixels: np.ndarray, selection: Selection) -> tuple[np.ndarray, np.ndarray]:
    """Rank slices by CI (descending) and choose the pseudo-labels.

    Returns (order, selected): ``order`` indexes the eligible slices (N >= min_pixels) from most to least
    certain; ``selected`` is a boolean mask over all slices. Among eligible slices with CI >= ci_min, the
    top_k (or top_fraction of the eligible slices, rounded up) are kept; ties keep the input order.
    """
    ci = np.asarray(ci, dtype=float)
    n_pixels = np.asarray(n_pixels)
    eligible = np.flatnonzero((n_pixels >= selection.min_pixels) & np.isfinite(ci))
    order = eligible[np.argsort(-ci[eligible], kind="stable")]
    chosen = order[ci[order] >= selection.ci_min]
    limit = len(chosen)
    if selection.top_k is not None:
        limit = min(limit, int(selection.top_k))
    if selection.top_fraction is not None:
        limit = min(limit, int(np.ceil(selection.top_fraction * len(order))))
    selected = np.zeros(len(ci), dtype=bool)
    selected[chosen[:limit]] = True
    return order, selected
