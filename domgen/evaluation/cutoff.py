"""The cut-off threshold: the one with the best DSC on the in-domain test set (Enshaei et al., section II).

It is chosen once and reused unchanged on every unseen set.
"""
from __future__ import annotations

import numpy as np

DEFAULT_CANDIDATES = np.round(np.arange(0.05, 0.951, 0.05), 2)


def dsc_per_cutoff(probabilities: list[np.ndarray], truths: list[np.ndarray], candidates=DEFAULT_CANDIDATES) -> np.ndarray:
    """Pooled DSC over all pixels of all slices for each candidate cut-off (pixel counts from histograms)."""
    candidates = np.asarray(candidates, dtype=float)
    tp = np.zeros(len(candidates))
    fp = np.zeros(len(candidates))
    positives = 0
    for prob, truth in zip(probabilities, truths):
        prob = np.asarray(prob, dtype=float).ravel()
        t = np.asarray(truth, dtype=bool).ravel()
        positives += int(t.sum())
        # a pixel is predicted lesion when prob > cut-off; sort once, count with searchsorted
        pos_sorted = np.sort(prob[t])
        neg_sorted = np.sort(prob[~t])
        tp += len(pos_sorted) - np.searchsorted(pos_sorted, candidates, side="right")
        fp += len(neg_sorted) - np.searchsorted(neg_sorted, candidates, side="right")
    fn = positives - tp
    den = 2 * tp + fp + fn
    return np.where(den > 0, 2 * tp / np.maximum(den, 1), np.nan)


def best_cutoff(probabilities: list[np.ndarray], truths: list[np.ndarray], candidates=DEFAULT_CANDIDATES) -> float:
    """The candidate with the highest pooled DSC; ties go to the cut-off nearest 0.5."""
    candidates = np.asarray(candidates, dtype=float)
    dsc = np.nan_to_num(dsc_per_cutoff(probabilities, truths, candidates), nan=-1.0)
    best = dsc.max()
    tied = candidates[np.isclose(dsc, best)]
    return float(tied[np.argmin(np.abs(tied - 0.5))])
