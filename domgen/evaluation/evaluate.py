"""Score predicted probabilities against the truth at the original resolution, per slice and per patient.

``per_case_metrics`` scores each patient (case) as one volume, the unit Wang et al. report: the slices are
stacked at their original slice index with the voxel spacing and NSD/HD95 come from MONAI in 3D.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from domgen.evaluation.metrics import confusion, overlap_metrics, summarise, surface_metrics
from domgen.preprocessing.slices import SliceSet
from domgen.settings import LOO, default


@dataclass(frozen=True)
class EvaluationSettings:
    """How predictions are scored; every default is the leave-one-out row of domgen/settings.py. The cut-off rows
    (cutoff_candidates, cutoff, threshold) and the benchmark's resolution and sample_slices are read by the families."""

    nsd_tolerance_mm: float = default(LOO, "evaluation.nsd_tolerance_mm")
    empty: str = default(LOO, "evaluation.empty")  # an EMPTY_CONVENTIONS name, for per-slice ratios
    dice_eps: float = default(LOO, "evaluation.dice_eps")
    surface: bool = default(LOO, "evaluation.surface")  # NSD/HD95 cost a distance transform per slice

    @classmethod
    def from_config(cls, cfg: dict) -> "EvaluationSettings":
        return cls(**{k: v for k, v in cfg.items() if k in cls.__dataclass_fields__})


def evaluate(probabilities: list[np.ndarray], slices: SliceSet, cutoff: float, settings: EvaluationSettings) -> tuple[dict[str, float], pd.DataFrame]:
    """(summary, per-slice table). Summary keys: ``dsc sen spc iou`` per patient (confusion pooled over a
    patient's slices, then averaged over patients), ``slice_*`` averaged over slices, ``nsd``, ``hd95``,
    and ``*_std`` companions."""
    rows, per_patient = [], {}
    for prob, truth, sid, pid, spacing in zip(probabilities, slices.truths, slices.slice_ids, slices.patient_ids, slices.spacings):
        pred = prob > cutoff
        counts = confusion(pred, truth)
        per_patient[pid] = per_patient.get(pid, 0) + counts
        row = {"slice_id": sid, "patient_id": pid, "tp": counts[0], "fp": counts[1], "fn": counts[2], "tn": counts[3]}
        row.update(overlap_metrics(counts, settings.empty, settings.dice_eps))
        if settings.surface:
            row.update(surface_metrics(pred, truth, spacing, settings.nsd_tolerance_mm))
        rows.append(row)
    table = pd.DataFrame(rows)
    summary: dict[str, float] = {}
    patient_scores = [overlap_metrics(c, "nan", settings.dice_eps) for c in per_patient.values()]
    for name in ("dsc", "sen", "spc", "iou"):
        summary[name], summary[f"{name}_std"] = summarise([s[name] for s in patient_scores])
        summary[f"slice_{name}"], summary[f"slice_{name}_std"] = summarise(table[name]) if len(table) else (np.nan, np.nan)
    if settings.surface and len(table):
        for name in ("nsd", "hd95"):
            summary[name], summary[f"{name}_std"] = summarise(table[name])
    summary["n_slices"] = float(len(table))
    summary["n_patients"] = float(len(per_patient))
    return summary, table


# per-case columns summarised as mean ± std over cases (nsd_slice: the case's mean per-slice 2D NSD, the older reading)
CASE_METRICS = ("dsc", "nsd", "hd95", "sen", "f1", "acc", "nsd_slice")


def case_volume_index(slices: SliceSet, index: list[int]) -> tuple[list[int] | None, str]:
    """(z position of each slice in the case volume, "") or (None, why the slices make no volume).

    The rule: a case is a volume when all its slices have one size, one in-plane spacing, a known slice spacing
    and distinct slice indices (the last part of the slice id); slices dropped by ``keep_slices`` leave empty
    planes (truth and prediction both empty there), so distances between the kept slices stay true."""
    shapes = {tuple(np.shape(slices.truths[i])) for i in index}
    if len(shapes) > 1:
        return None, "slice sizes differ"
    if len({tuple(slices.spacings[i]) for i in index}) > 1:
        return None, "pixel spacings differ"
    gaps = {slices.slice_spacings[i] for i in index} if slices.slice_spacings else {None}
    if len(gaps) != 1 or None in gaps or not next(iter(gaps)) > 0:
        return None, "slice spacing unknown"
    try:
        z = [int(str(slices.slice_ids[i]).rsplit("/", 1)[-1]) for i in index]
    except ValueError:
        return None, "slice order unknown"
    if len(set(z)) != len(z):
        return None, "slice order unknown"
    return [v - min(z) for v in z], ""


def per_case_metrics(probabilities: list[np.ndarray], slices: SliceSet, cutoff: float, settings: EvaluationSettings,
                     per_slice: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per case (patient): DSC, sensitivity, F1 and accuracy of the case's pooled pixels, NSD at
    ``settings.nsd_tolerance_mm`` and HD95 in 3D (MONAI, voxel spacing (slice, row, col)), and ``nsd_slice``, the
    mean of the case's per-slice 2D NSD (from ``per_slice``, the table ``evaluate`` returns).

    A case whose slices make no volume (``case_volume_index``) takes ``nsd_slice`` as its NSD and no HD95;
    ``nsd_mode`` says which ("3d" or "per-slice: <why>"). A case with no lesion in truth and prediction has no
    DSC, F1 or NSD (NaN, left out of means), as the per-patient DSC of ``evaluate``. Pixel-wise F1 is
    2TP / (2TP + FP + FN), the case's DSC without ``dice_eps``: Wang et al. report both."""
    cases: dict[str, list[int]] = {}
    for i, pid in enumerate(slices.patient_ids):
        cases.setdefault(pid, []).append(i)
    rows = []
    for pid, index in cases.items():
        preds = [np.asarray(probabilities[i]) > cutoff for i in index]
        truths = [np.asarray(slices.truths[i]) > 0 for i in index]
        counts = sum((confusion(p, t) for p, t in zip(preds, truths)), np.zeros(4, dtype=np.int64))
        tp, fp, fn, tn = (float(c) for c in counts)
        scores = overlap_metrics(counts, "nan", settings.dice_eps)
        row = {"patient_id": pid, "n_slices": len(index), "tp": int(tp), "fp": int(fp), "fn": int(fn), "tn": int(tn),
               "dsc": scores["dsc"], "sen": scores["sen"], "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else float("nan"),
               "acc": (tp + tn) / max(tp + fp + fn + tn, 1.0)}
        if settings.surface:
            row["nsd_slice"] = float(per_slice.loc[per_slice.patient_id == pid, "nsd"].mean()) if per_slice is not None \
                and "nsd" in per_slice else float("nan")
            z, why = case_volume_index(slices, index)
            if tp + fp + fn == 0:
                row.update(nsd=float("nan"), hd95=float("nan"), nsd_mode="3d" if z is not None else f"per-slice: {why}")
            elif z is None:
                row.update(nsd=row["nsd_slice"], hd95=float("nan"), nsd_mode=f"per-slice: {why}")
            else:
                shape = (max(z) + 1, *np.shape(truths[0]))
                pred, truth = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
                pred[z], truth[z] = np.stack(preds), np.stack(truths)
                spacing = (float(slices.slice_spacings[index[0]]), *(float(s) for s in slices.spacings[index[0]]))
                row.update(surface_metrics(pred, truth, spacing, settings.nsd_tolerance_mm), nsd_mode="3d")
        rows.append(row)
    return pd.DataFrame(rows)


def case_summary(cases: pd.DataFrame) -> dict[str, float]:
    """``{metric: mean over cases, metric_std: std over cases}`` of ``CASE_METRICS`` (NaN left out), and how many
    cases fell back to per-slice NSD."""
    out: dict[str, float] = {}
    for name in CASE_METRICS:
        if name in cases:
            out[name], out[f"{name}_std"] = summarise(cases[name])
    if "nsd_mode" in cases:
        out["n_cases_nsd_per_slice"] = float((cases.nsd_mode != "3d").sum())
    out["n_cases"] = float(len(cases))
    return out


def patient_dsc(per_slice: pd.DataFrame) -> dict[str, float]:
    """Per-patient DSC from a per-slice table (confusion counts pooled over each patient's slices), the unit of the
    paired comparison before/after enhancement."""
    out = {}
    for pid, part in per_slice.groupby("patient_id"):
        counts = part[["tp", "fp", "fn", "tn"]].sum().to_numpy()
        out[str(pid)] = overlap_metrics(counts, "nan")["dsc"]
    return out


def paired_patients(before: dict[str, float], after: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """The patients with a defined DSC on both sides (a patient with no lesion and no prediction has none)."""
    both = [p for p in before if p in after and np.isfinite(before[p]) and np.isfinite(after[p])]
    return {p: before[p] for p in both}, {p: after[p] for p in both}
