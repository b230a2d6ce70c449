"""Are the lesion probabilities calibrated on a hospital the model never saw? Pixel-level calibration and
temperature scaling.

- Calibration errors (Guo et al., "On calibration of modern neural networks", ICML 2017): the lesion probability of
  every pixel is binned into equal-width bins on [0, 1]; a bin's error is |mean probability - share of lesion
  pixels|. **ECE** weights the bins by their pixel counts, **ACE** averages the non-empty bins, **MCE** takes the
  largest (MONAI's ``CalibrationErrorMetric``, one channel: the lesion). Background dominates a slice, so the same
  errors are also given over the *lesion region* (pixels inside the predicted or the true lesion).
- Temperature scaling (Guo et al., section 4.2): one scalar T > 0 divides the logits, fitted by minimising the
  binary cross-entropy on labelled source validation slices (never on a target's labels). It changes no
  prediction when the cut-off moves with it (``scaled_cutoff``), only the probabilities, hence the Certainty Index.

domgen's predictions are probabilities resized to each slice's own size; logits are recovered as log(p / (1 - p))
with p clipped to [1e-6, 1 - 1e-6] (|logit| <= 13.8, where fp32 sigmoids saturate anyway).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from domgen.errors import DomgenError

NUM_BINS = 20  # MONAI's default; 0.05-wide bins
EPS = 1e-6
REDUCTIONS = {"ece": "expected", "ace": "average", "mce": "maximum"}


def _pooled(probabilities: Sequence[np.ndarray], labels: Sequence[np.ndarray], regions: Sequence[np.ndarray] | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """All pixels of all slices (slices may differ in size), optionally only those inside ``regions``."""
    if len(probabilities) != len(labels):
        raise DomgenError(f"calibration needs one label map per probability map ({len(labels)} labels, {len(probabilities)} maps)")
    ps, ys = [], []
    for i, (p, y) in enumerate(zip(probabilities, labels)):
        p, y = np.asarray(p, dtype=np.float32), np.asarray(y)
        if p.shape != y.shape:
            raise DomgenError(f"slice {i}: probability map {p.shape} and label map {y.shape} differ in size")
        keep = np.ones(p.shape, bool) if regions is None else np.asarray(regions[i], bool)
        ps.append(p[keep])
        ys.append((y[keep] > 0).astype(np.float32))
    return (np.concatenate(ps) if ps else np.zeros(0, np.float32)), (np.concatenate(ys) if ys else np.zeros(0, np.float32))


def calibration_errors(probabilities: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                       regions: Sequence[np.ndarray] | None = None, num_bins: int = NUM_BINS) -> dict[str, float]:
    """{"ece", "ace", "mce"} of the lesion probabilities against the binary labels, over every pixel (or every
    pixel inside ``regions``) of every slice; NaN without pixels."""
    import torch
    from monai.metrics import CalibrationErrorMetric

    p, y = _pooled(probabilities, labels, regions)
    if p.size == 0:
        return {name: math.nan for name in REDUCTIONS}
    pt, yt = torch.from_numpy(p)[None, None], torch.from_numpy(y)[None, None]
    out = {}
    for name, reduction in REDUCTIONS.items():
        metric = CalibrationErrorMetric(num_bins=num_bins, calibration_reduction=reduction)
        metric(y_pred=pt, y=yt)
        out[name] = float(metric.aggregate())
    return out


def reliability_bins(probabilities: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                     regions: Sequence[np.ndarray] | None = None, num_bins: int = NUM_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean probability, share of lesion pixels, pixel count) per bin (MONAI's ``calibration_binning``)."""
    import torch
    from monai.metrics.calibration import calibration_binning

    p, y = _pooled(probabilities, labels, regions)
    if p.size == 0:
        return np.full(num_bins, np.nan), np.full(num_bins, np.nan), np.zeros(num_bins)
    mean_p, mean_y, counts = calibration_binning(torch.from_numpy(p)[None, None], torch.from_numpy(y)[None, None], num_bins)
    return mean_p[0, 0].numpy(), mean_y[0, 0].numpy(), counts[0, 0].numpy()


def to_logits(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def scale_probabilities(p: np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit(p) / T): the probabilities of the temperature-scaled model."""
    return (1.0 / (1.0 + np.exp(-to_logits(p) / float(temperature)))).astype(np.float32)


def scaled_cutoff(cutoff: float, temperature: float) -> float:
    """The cut-off that gives the scaled model the same binary prediction as ``cutoff`` gives the unscaled one."""
    return float(scale_probabilities(np.asarray([cutoff]), temperature)[0])


def binary_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean binary cross-entropy of sigmoid(logits / T) against the 0/1 labels."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    return float(np.mean(np.logaddexp(0.0, z) - np.asarray(labels, dtype=np.float64) * z))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The T in ``bounds`` that minimises the binary NLL of sigmoid(logits / T) (scipy's bounded scalar search over log T)."""
    from scipy.optimize import minimize_scalar

    z, y = np.asarray(logits, dtype=np.float64).ravel(), np.asarray(labels, dtype=np.float64).ravel()
    if z.size == 0 or z.shape != y.shape:
        raise DomgenError("temperature scaling needs labelled validation pixels (one label per logit); the fold has none")
    if y.min() == y.max():
        raise DomgenError("temperature scaling needs validation pixels of both classes (lesion and background); "
                          "the fold's source validation slices have only one")
    res = minimize_scalar(lambda t: binary_nll(z, y, math.exp(t)), bounds=(math.log(bounds[0]), math.log(bounds[1])),
                          method="bounded", options={"xatol": 1e-4})
    return float(math.exp(res.x))


def fit_temperature_on(probabilities: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> float:
    """T fitted on probability maps and their labels (e.g. the source validation slices)."""
    p, y = _pooled(probabilities, labels)
    return fit_temperature(to_logits(p), y)


def reliability_plot(path, panels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], title: str = ""):
    """One reliability diagram per named domain: share of lesion pixels against mean probability per bin, with the
    bins' pixel counts (log scale) below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(panels), figsize=(3.0 * len(panels), 4.6), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    for (name, (mean_p, mean_y, counts)), top, bottom in zip(panels.items(), axes[0], axes[1]):
        edges = np.linspace(0, 1, len(counts) + 1)
        centres = (edges[:-1] + edges[1:]) / 2
        ok = counts > 0
        top.plot([0, 1], [0, 1], "k--", lw=0.8)
        top.bar(centres[ok], mean_y[ok], width=1 / len(counts), alpha=0.5, edgecolor="k", lw=0.3, label="share lesion")
        top.plot(mean_p[ok], mean_y[ok], "o-", ms=3, color="tab:red", label="bin means")
        top.set_title(name, fontsize=9)
        top.set_ylim(0, 1)
        bottom.bar(centres, np.maximum(counts, 1), width=1 / len(counts), color="grey")
        bottom.set_yscale("log")
        bottom.set_xlabel("lesion probability")
    axes[0][0].set_ylabel("share of lesion pixels")
    axes[1][0].set_ylabel("pixels")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
