"""Score predicted probabilities against the truth at the original resolution, per slice and per patient."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from domgen.evaluation.metrics import confusion, overlap_metrics, summarise, surface_metrics
from domgen.preprocessing.slices import SliceSet


@dataclass(frozen=True)
class EvaluationSettings:
    nsd_tolerance_mm: float = 3.0
    empty: str = "both-empty-one"  # an EMPTY_CONVENTIONS name, for per-slice ratios
    dice_eps: float = 0.0
    surface: bool = True  # NSD/HD95 cost a distance transform per slice

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
