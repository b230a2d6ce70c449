"""Selective risk: if only the slices a confidence score trusts are kept, how much error is left at each coverage?

Definitions of Geifman, Uziel and El-Yaniv ("Bias-reduced uncertainty estimation for deep neural classifiers",
ICLR 2019), as used by the failure-detection benchmarks (Jaeger et al., FD-Shifts, ICLR 2023; Zenk et al.'s
segmentation benchmark), with a slice's risk = 1 - its true DSC:

- slices are sorted by decreasing confidence; at coverage k/n the *selective risk* is the mean risk of the k most
  confident slices (the risk-coverage curve, k = 1..n);
- **AURC** is the area under that curve, the mean of the n selective risks (the discrete sum of Geifman et al.);
- **E-AURC** = AURC - AURC*, where AURC* is the AURC of the best possible order (slices sorted by increasing risk):
  0 for a score that orders slices perfectly, the score's excess risk otherwise. Geifman et al.'s closed form for
  AURC* assumes 0/1 risks; with a continuous risk the optimal order is computed directly.

Ties in the confidence are broken by slice order (stable sort), as a selection rule would break them. Intervals
resample slices with replacement (a percentile bootstrap, seeded), like the Spearman interval of
``domgen.evaluation.statistics``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from domgen.errors import DomgenError
from domgen.evaluation.statistics import CONFIDENCE, N_RESAMPLES, _check_options


def _pairs(confidence: Sequence[float], risk: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    c, r = np.asarray(confidence, dtype=float).ravel(), np.asarray(risk, dtype=float).ravel()
    if c.shape != r.shape:
        raise DomgenError(f"selective risk needs one risk per confidence value ({r.size} risks, {c.size} confidences)")
    keep = np.isfinite(c) & np.isfinite(r)
    return c[keep], r[keep]


def risk_coverage_curve(confidence: Sequence[float], risk: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(coverage k/n, selective risk of the k most confident slices) for k = 1..n; slices without a finite confidence
    or risk are left out (a score that says nothing about a slice cannot rank it)."""
    c, r = _pairs(confidence, risk)
    order = np.argsort(-c, kind="stable")
    k = np.arange(1, c.size + 1)
    return k / max(c.size, 1), np.cumsum(r[order]) / k


def aurc(confidence: Sequence[float], risk: Sequence[float]) -> float:
    """Area under the risk-coverage curve (mean selective risk over k = 1..n); NaN without slices."""
    _, selective = risk_coverage_curve(confidence, risk)
    return float(selective.mean()) if selective.size else math.nan


def optimal_aurc(risk: Sequence[float]) -> float:
    """AURC of the best possible order: slices sorted by increasing risk."""
    r = np.sort(np.asarray(risk, dtype=float)[np.isfinite(risk)])
    return float((np.cumsum(r) / np.arange(1, r.size + 1)).mean()) if r.size else math.nan


def e_aurc(confidence: Sequence[float], risk: Sequence[float]) -> float:
    """Excess AURC over the best possible order (Geifman et al.'s E-AURC): 0 for a perfect ranking."""
    c, r = _pairs(confidence, risk)
    return aurc(c, r) - optimal_aurc(r)


@dataclass(frozen=True)
class SelectiveRisk:
    """AURC and E-AURC of one score with their slice-bootstrap percentile intervals."""

    aurc: float
    aurc_low: float
    aurc_high: float
    e_aurc: float
    e_aurc_low: float
    e_aurc_high: float
    n: int
    confidence: float = CONFIDENCE

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_aurc": self.aurc, f"{prefix}_aurc_low": self.aurc_low, f"{prefix}_aurc_high": self.aurc_high,
                f"{prefix}_eaurc": self.e_aurc, f"{prefix}_eaurc_low": self.e_aurc_low, f"{prefix}_eaurc_high": self.e_aurc_high}


def selective_risk(confidence: Sequence[float], risk: Sequence[float], n_resamples: int = N_RESAMPLES,
                   level: float = CONFIDENCE, seed: int = 0, chunk: int = 1000) -> SelectiveRisk:
    """AURC and E-AURC of ``confidence`` against ``risk`` (1 - slice DSC) with bootstrap intervals over slices."""
    _check_options(level, n_resamples)
    c, r = _pairs(confidence, risk)
    n = int(c.size)
    if n == 0:
        return SelectiveRisk(*([math.nan] * 6), 0, level)
    rng = np.random.default_rng(seed)
    k = np.arange(1, n + 1)
    draws = []
    for start in range(0, int(n_resamples), chunk):  # chunks bound memory at chunk x n
        index = rng.integers(0, n, size=(min(chunk, int(n_resamples) - start), n))
        ci, ri = c[index], r[index]
        by_score = np.take_along_axis(ri, np.argsort(-ci, axis=1, kind="stable"), axis=1)
        a = (np.cumsum(by_score, axis=1) / k).mean(axis=1)
        draws.append(np.stack([a, a - (np.cumsum(np.sort(ri, axis=1), axis=1) / k).mean(axis=1)], axis=1))
    draws = np.concatenate(draws)
    alpha = (1.0 - level) / 2.0
    (a_low, e_low), (a_high, e_high) = np.percentile(draws, [100 * alpha, 100 * (1 - alpha)], axis=0)
    return SelectiveRisk(aurc(c, r), float(a_low), float(a_high), e_aurc(c, r), float(e_low), float(e_high), n, level)


def risk_coverage_plot(path, curves: dict[str, tuple[Sequence[float], Sequence[float]]], risk: Sequence[float],
                       coverage_marks: dict[str, float] | None = None, title: str = ""):
    """Risk-coverage curves of several scores beside the oracle (best order) and random (mean risk) curves;
    ``coverage_marks``: vertical lines at named coverages (e.g. what the profile's selection rule keeps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = np.asarray(risk, dtype=float)
    r = r[np.isfinite(r)]
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for name, (conf, rk) in curves.items():
        cov, sel = risk_coverage_curve(conf, rk)
        ax.plot(cov, sel, label=f"{name} (AURC {sel.mean():.3f})" if sel.size else name)
    if r.size:
        k = np.arange(1, r.size + 1)
        oracle = np.cumsum(np.sort(r)) / k
        ax.plot(k / r.size, oracle, "k--", lw=1, label=f"oracle (AURC {oracle.mean():.3f})")
        ax.axhline(r.mean(), color="grey", ls=":", lw=1, label=f"random ({r.mean():.3f})")
    for name, coverage in (coverage_marks or {}).items():
        ax.axvline(coverage, color="tab:red", lw=0.8, alpha=0.6)
        ax.text(coverage, ax.get_ylim()[1], f" {name}", rotation=90, va="top", fontsize=7, color="tab:red")
    ax.set_xlabel("coverage (share of slices kept)")
    ax.set_ylabel("selective risk (1 - mean DSC kept)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
