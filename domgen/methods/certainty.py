"""The Certainty Index (Enshaei et al., eq. 1) and the selection of pseudo-labelled slices.

CI = (1/N) * sum of p_i over the N pixels whose predicted lesion probability p_i exceeds the cut-off.
Slices with N < min_pixels (counted at the original resolution) are dropped: too few pixels to trust.
The paper set N >= 50 for 512x512 slices; ``min_pixels_at`` keeps that meaning at any matrix by scaling
the limit with the slice's area (50 at 512x512 is 12.5 at 256x256 and about 76 at 630x630).
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
    min_pixels_at: int | None = None  # the matrix (pixels per side) min_pixels is defined at; None: absolute
    per_patient_max: int | None = None  # at most this many slices of one patient
    min_patients: int | None = None  # fewer selected patients than this: select nothing
    size_strata: int | None = None  # spread the selection evenly over this many lesion-size (N) strata

    def min_pixels_for(self, shape: tuple[int, int]) -> float:
        """The N limit for a slice of ``shape``: min_pixels scaled by area from a min_pixels_at x min_pixels_at matrix."""
        if self.min_pixels_at is None:
            return float(self.min_pixels)
        return float(self.min_pixels) * (int(shape[0]) * int(shape[1])) / float(self.min_pixels_at) ** 2


def rank_and_select(ci: np.ndarray, n_pixels: np.ndarray, selection: Selection,
                    min_pixels: np.ndarray | None = None, patients: np.ndarray | None = None,
                    passes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rank slices by a confidence score ``ci`` (descending) and choose the pseudo-labels.

    Returns (order, selected): ``order`` indexes the eligible slices (N >= min_pixels, score defined) from most
    to least confident; ``selected`` is a boolean mask over all slices. Candidates are the eligible slices that
    pass the limits (``passes``; by default score >= ci_min). Then, in rank order: at most ``per_patient_max``
    slices per patient, spread round-robin over ``size_strata`` quantile strata of N if asked, at most top_k
    (or top_fraction of the eligible slices, rounded up); if the chosen slices come from fewer than
    ``min_patients`` patients nothing is selected. Ties keep the input order. ``min_pixels`` gives each slice
    its own N limit (see :meth:`Selection.min_pixels_for`); by default every slice uses ``selection.min_pixels``.
    """
    ci = np.asarray(ci, dtype=float)
    n_pixels = np.asarray(n_pixels)
    limit_n = np.full(len(ci), float(selection.min_pixels)) if min_pixels is None else np.asarray(min_pixels, dtype=float)
    eligible = np.flatnonzero((n_pixels >= limit_n) & np.isfinite(ci))
    order = eligible[np.argsort(-ci[eligible], kind="stable")]
    ok = (ci >= selection.ci_min) if passes is None else np.asarray(passes, dtype=bool)
    chosen = order[ok[order]]
    if selection.per_patient_max is not None and patients is not None:
        seen: dict = {}
        keep = []
        for i in chosen:
            seen[patients[i]] = seen.get(patients[i], 0) + 1
            if seen[patients[i]] <= selection.per_patient_max:
                keep.append(i)
        chosen = np.asarray(keep, dtype=int)
    if selection.size_strata and len(chosen) > 1:
        # quantile strata of the lesion size N among the candidates, then round-robin in rank order
        edges = np.quantile(n_pixels[chosen], np.linspace(0, 1, selection.size_strata + 1)[1:-1])
        stratum = np.searchsorted(edges, n_pixels[chosen], side="right")
        queues = [list(chosen[stratum == s]) for s in range(selection.size_strata)]
        mixed = []
        while any(queues):
            for q in queues:
                if q:
                    mixed.append(q.pop(0))
        chosen = np.asarray(mixed, dtype=int)
    limit = len(chosen)
    if selection.top_k is not None:
        limit = min(limit, int(selection.top_k))
    if selection.top_fraction is not None:
        limit = min(limit, int(np.ceil(selection.top_fraction * len(order))))
    selected = np.zeros(len(ci), dtype=bool)
    selected[chosen[:limit]] = True
    if selection.min_patients is not None and patients is not None and selected.any():
        if len(set(np.asarray(patients)[selected].tolist())) < selection.min_patients:
            selected[:] = False
    return order, selected
