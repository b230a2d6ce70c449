"""Uncertainty a reviewer asks for: paired patient-level bootstrap of a change in DSC, Wilcoxon signed-rank,
and the CI-DSC Spearman correlation with a bootstrap interval over slices.

The patient is the unit of the DSC change (slices of one patient are not independent), so the change is paired
by patient and resampled by patient (scipy.stats.bootstrap, ``paired=True``, percentile interval). The
Spearman interval resamples slices, as the correlation is computed over slices. Everything is seeded: the same
inputs and seed give the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from domgen.errors import DomgenError

N_RESAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedChange:
    """Mean per-patient change ``after - before`` with its bootstrap interval and Wilcoxon signed-rank p."""

    mean_change: float
    low: float
    high: float
    p_wilcoxon: float
    n_patients: int
    confidence: float = CONFIDENCE

    def metrics(self, prefix: str = "dsc_change") -> dict[str, float]:
        """Flat MLflow metrics: ``{prefix, prefix_low, prefix_high, prefix_wilcoxon_p, prefix_n_patients}``."""
        return {prefix: self.mean_change, f"{prefix}_low": self.low, f"{prefix}_high": self.high,
                f"{prefix}_wilcoxon_p": self.p_wilcoxon, f"{prefix}_n_patients": float(self.n_patients)}


@dataclass(frozen=True)
class CorrelationInterval:
    """Spearman's rho over slices with a percentile bootstrap interval (resampling slices)."""

    rho: float
    low: float
    high: float
    n_slices: int
    n_resamples: int  # resamples with a defined rho (a resample where one variable is constant has none)
    confidence: float = CONFIDENCE

    def metrics(self, prefix: str = "ci_dsc_spearman") -> dict[str, float]:
        return {prefix: self.rho, f"{prefix}_low": self.low, f"{prefix}_high": self.high}


def pair_by_patient(before: Mapping[str, float], after: Mapping[str, float]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(patient ids, before, after) aligned by patient id; both mappings must name the same patients."""
    missing = sorted(set(before) ^ set(after))
    if missing:
        raise DomgenError(f"paired comparison needs the same patients before and after; {missing[0]!r} is only in one "
                          "of them. Compare per-patient scores of the same test set.")
    ids = sorted(before)
    return ids, np.array([before[p] for p in ids], dtype=float), np.array([after[p] for p in ids], dtype=float)


def _as_pairs(before, after) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(before, Mapping) or isinstance(after, Mapping):
        if not (isinstance(before, Mapping) and isinstance(after, Mapping)):
            raise DomgenError("paired comparison: give both before and after as {patient_id: score} mappings, or both "
                              "as sequences in the same patient order.")
        _, b, a = pair_by_patient(before, after)
        return b, a
    b, a = np.asarray(before, dtype=float).ravel(), np.asarray(after, dtype=float).ravel()
    if b.shape != a.shape:
        raise DomgenError(f"paired comparison needs as many scores after ({a.size}) as before ({b.size}), one per patient.")
    return b, a


def _check_options(confidence: float, n_resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise DomgenError(f"confidence must be between 0 and 1 (exclusive), got {confidence}; use e.g. 0.95.")
    if int(n_resamples) < 1:
        raise DomgenError(f"n_resamples must be at least 1, got {n_resamples}; use e.g. 10000.")


def wilcoxon_p(before: Sequence[float], after: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p of ``after - before`` (scipy.stats.wilcoxon; exact for small samples).

    NaN with fewer than one patient; 1.0 when no patient changed (no evidence of a change).
    """
    b, a = _as_pairs(before, after)
    d = a - b
    if d.size == 0:
        return math.nan
    if np.all(d == 0):
        return 1.0
    return float(stats.wilcoxon(d).pvalue)


def paired_bootstrap_change(before: Mapping[str, float] | Sequence[float], after: Mapping[str, float] | Sequence[float],
                            n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0) -> PairedChange:
    """Mean change ``after - before`` over patients, its paired bootstrap percentile interval and Wilcoxon p.

    ``before``/``after``: per-patient scores (e.g. DSC) as ``{patient_id: score}`` mappings (paired by id) or as
    equal-length sequences in the same patient order. Patients are resampled with replacement (pairs kept
    together) ``n_resamples`` times with ``numpy.random.default_rng(seed)``. With one patient, or when every
    patient changed by the same amount, the bootstrap distribution is a single point and so is the interval.
    No patients: every field NaN.
    """
    _check_options(confidence, n_resamples)
    b, a = _as_pairs(before, after)
    d = a - b
    if d.size == 0:
        return PairedChange(math.nan, math.nan, math.nan, math.nan, 0, confidence)
    mean = float(d.mean())
    if d.size == 1 or np.all(d == d[0]):
        return PairedChange(mean, mean, mean, wilcoxon_p(b, a), int(d.size), confidence)
    res = stats.bootstrap((b, a), lambda x, y, axis: np.mean(y - x, axis=axis), paired=True, vectorized=True,
                          n_resamples=int(n_resamples), confidence_level=confidence, method="percentile",
                          random_state=np.random.default_rng(seed))
    low, high = res.confidence_interval
    return PairedChange(mean, float(low), float(high), wilcoxon_p(b, a), int(d.size), confidence)


def _rowwise_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair: Pearson correlation of average ranks (ties averaged, as scipy does)."""
    rx = stats.rankdata(x, axis=-1)
    ry = stats.rankdata(y, axis=-1)
    rx -= rx.mean(axis=-1, keepdims=True)
    ry -= ry.mean(axis=-1, keepdims=True)
    denom = np.sqrt((rx * rx).sum(axis=-1) * (ry * ry).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rx * ry).sum(axis=-1) / np.where(denom > 0, denom, 1.0), np.nan)


def spearman_interval(x: Sequence[float], y: Sequence[float], n_resamples: int = N_RESAMPLES,
                      confidence: float = CONFIDENCE, seed: int = 0, chunk: int = 1000) -> CorrelationInterval:
    """Spearman's rho of ``x`` and ``y`` (e.g. per-slice CI and true slice DSC) with a bootstrap percentile interval.

    Slices are resampled with replacement (pairs kept together) ``n_resamples`` times with
    ``numpy.random.default_rng(seed)``; a resample in which either variable is constant has no rho and is left
    out (``n_resamples`` in the result counts those kept). Fewer than two slices, or a constant variable: NaN.
    """
    _check_options(confidence, n_resamples)
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise DomgenError(f"Spearman correlation needs as many y values ({y.size}) as x values ({x.size}), one per slice.")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    rho = float(_rowwise_spearman(x[None], y[None])[0]) if n >= 2 else math.nan
    if math.isnan(rho):
        return CorrelationInterval(rho, math.nan, math.nan, n, 0, confidence)
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, int(n_resamples), chunk):  # chunks bound memory at chunk x n
        index = rng.integers(0, n, size=(min(chunk, int(n_resamples) - start), n))
        draws.append(_rowwise_spearman(x[index], y[index]))
    dist = np.concatenate(draws)
    dist = dist[np.isfinite(dist)]
    if dist.size == 0:
        return CorrelationInterval(rho, math.nan, math.nan, n, 0, confidence)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(dist, [100 * alpha, 100 * (1 - alpha)])
    return CorrelationInterval(rho, float(low), float(high), n, int(dist.size), confidence)
