"""Segmentation metrics at the original resolution.

Overlap metrics come from the confusion counts (TP, FP, FN, TN). What happens when a ratio is 0/0 is a
choice the papers make differently, so it is explicit (``EMPTY_CONVENTIONS``):

- ``nan``: an undefined ratio is NaN and left out of means;
- ``both-empty-one``: a slice with no lesion in truth and prediction scores 1 on DSC/IoU/SEN, other 0/0 -> NaN;
- ``bizopoulos``: Bizopoulos et al. exactly: when TP + FP = 0 every metric is 1; any other 0/0 ratio is 0 (e.g. the
  sensitivity of a slice with no true lesion and some false positives);
- ``no-prediction-one``: domgen < 0.2's reading of it: every metric 1 when TP + FP = 0, other 0/0 -> NaN (left out).

Surface metrics (NSD at a tolerance in mm, HD95 in mm) are MONAI's, per 2D slice with the pixel spacing.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

EMPTY_CONVENTIONS = ("nan", "both-empty-one", "bizopoulos", "no-prediction-one")
OVERLAP_METRICS = ("dsc", "sen", "spc", "iou")


def confusion(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """[TP, FP, FN, TN] of two binary arrays (any shape)."""
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    return np.array([tp, fp, fn, p.size - tp - fp - fn], dtype=np.int64)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


def overlap_metrics(counts: np.ndarray, empty: str = "nan", eps: float = 0.0) -> dict[str, float]:
    """DSC, sensitivity, specificity and IoU from [TP, FP, FN, TN] under an empty-set convention.

    ``eps`` is added to the Dice's denominator only, Bizopoulos et al.'s Eq. 4: 2TP / (2TP + FP + FN + eps) (they use
    1e-5). With eps > 0 an empty truth and an empty prediction score 0 / eps = 0, unless the convention decides first:
    ``bizopoulos`` and ``no-prediction-one`` give 1 whenever TP + FP = 0, ``both-empty-one`` gives 1 when TP + FP + FN = 0.
    """
    if empty not in EMPTY_CONVENTIONS:
        raise ValueError(f"empty convention must be one of {EMPTY_CONVENTIONS}, not {empty!r}")
    tp, fp, fn, tn = (float(c) for c in counts)
    if empty in ("no-prediction-one", "bizopoulos") and tp + fp == 0:
        return {m: 1.0 for m in OVERLAP_METRICS}
    out = {
        "dsc": 2 * tp / (2 * tp + fp + fn + eps) if (2 * tp + fp + fn + eps) > 0 else float("nan"),  # Eq. 4 (Bizopoulos)
        "sen": _ratio(tp, tp + fn),
        "spc": _ratio(tn, tn + fp),
        "iou": _ratio(tp, tp + fp + fn),
    }
    if empty == "both-empty-one" and tp + fp + fn == 0:
        out.update(dsc=1.0, iou=1.0, sen=1.0)
    if empty == "bizopoulos":
        out = {k: 0.0 if np.isnan(v) else v for k, v in out.items()}
    return out


def surface_metrics(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float], tolerance_mm: float) -> dict[str, float]:
    """NSD at ``tolerance_mm`` and HD95 (mm) of one 2D slice (MONAI). NaN where undefined (an empty mask)."""
    # imported here: loading MONAI takes seconds, and a command that stops at a bad input never needs it
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    if not p.any() and not t.any():
        return {"nsd": 1.0, "hd95": 0.0}
    if not p.any() or not t.any():
        return {"nsd": 0.0, "hd95": float("nan")}
    yp = torch.from_numpy(np.stack([~p, p])[None].astype(np.float32))
    yt = torch.from_numpy(np.stack([~t, t])[None].astype(np.float32))
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nsd = compute_surface_dice(yp, yt, class_thresholds=[tolerance_mm], spacing=spacing)
        hd = compute_hausdorff_distance(yp, yt, percentile=95, spacing=spacing)
    return {"nsd": float(nsd.reshape(-1)[0]), "hd95": float(hd.reshape(-1)[0])}


def summarise(values: list[float] | np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation ignoring NaN; (nan, nan) when nothing is defined."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std())
