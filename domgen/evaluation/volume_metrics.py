"""Metrics of one whole volume (Müller et al., Table 2): DSC, IoU, sensitivity, specificity, accuracy and
precision for the lungs and the lesion, plus NSD and HD95 in 3D with the voxel spacing (MONAI).

Scored on the case's own grid, the predicted label map against background 0 / lung 1 / lesion 2. Each
class is scored on its own label, as Müller et al. score their classes: "lung" is label 1, the lung WITHOUT
its lesions (the paper averages its left and right lung classes; domgen's lung masks are one binary class,
so there is one lung score), "lesion" is label 2.
"""
from __future__ import annotations

import numpy as np

from domgen.evaluation.metrics import confusion, overlap_metrics, surface_metrics
from domgen.preprocessing.volume import LESION, LUNG

REGIONS = {"lung": (LUNG,), "lesion": (LESION,)}  # one label each: Müller et al.'s lung classes exclude the infection
VOLUME_METRICS = ("dsc", "iou", "sen", "spc", "acc", "prec", "nsd", "hd95")


def volume_metrics(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float], tolerance_mm: float = 3.0,
                   empty: str = "nan", surface: bool = True) -> dict[str, float]:
    """``{"lung_dsc": ..., "lesion_hd95": ...}`` of a label map ``pred`` against ``truth`` (same shape, any axis order
    matching ``spacing``). ``empty`` is the 0/0 convention of ``domgen.evaluation.metrics``."""
    out: dict[str, float] = {}
    for region, labels in REGIONS.items():
        p, t = np.isin(pred, labels), np.isin(truth, labels)
        counts = confusion(p, t)
        tp, fp, fn, tn = (float(c) for c in counts)
        scores = overlap_metrics(counts, empty)
        scores["acc"] = (tp + tn) / max(tp + fp + fn + tn, 1.0)
        scores["prec"] = tp / (tp + fp) if tp + fp > 0 else (1.0 if empty != "nan" and tp + fn == 0 else float("nan"))
        if surface:
            scores.update(surface_metrics(p, t, spacing, tolerance_mm))
        out.update({f"{region}_{m}": float(scores[m]) for m in VOLUME_METRICS if m in scores})
    return out
