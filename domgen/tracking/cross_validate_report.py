"""Müller et al.'s tables rebuilt from MLflow alone: median ± SD over volumes (their Table 2 and the
sensitivity analysis), from each child run's per_volume.csv artifact."""
from __future__ import annotations

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from domgen.errors import DomgenError
from domgen.tracking import mlflow_store as store
from domgen.tracking.report import children

METRIC_LABELS = {"dsc": "DSC", "iou": "IoU", "sen": "SEN", "spc": "SPC", "acc": "ACC", "prec": "PREC", "nsd": "NSD", "hd95": "HD95 (mm)"}
REGIONS = ("lung", "lesion")


def median_sd_text(values) -> str:
    arr = pd.to_numeric(pd.Series(values), errors="coerce").dropna().to_numpy(dtype=float)
    if arr.size == 0:
        return "-"
    return f"{np.median(arr):.3f} ± {arr.std():.3f}" if arr.size > 1 else f"{arr[0]:.3f}"


def cross_validate_records(parent_id: str) -> pd.DataFrame:
    """One row per volume and evaluation set of every child run: model (fold k or ensemble), set, patient, metrics."""
    frames = []
    with store.artifact_dir() as tmp:
        for run in children(parent_id):
            fold = run.data.tags.get("domgen.fold", "?")
            path = store.download_artifact(run.info.run_id, "per_volume.csv", tmp / run.info.run_id)
            df = pd.read_csv(path)
            df.insert(0, "model", "ensemble" if fold == "ensemble" else f"fold {fold}")
            df.insert(1, "run_id", run.info.run_id)
            frames.append(df)
    if not frames:
        raise DomgenError(f"run {parent_id} has no finished child runs; run `domgen cross-validate` to completion first")
    return pd.concat(frames, ignore_index=True)


def _rows(part: pd.DataFrame, head: dict) -> list[dict]:
    rows = []
    for region in REGIONS:
        row = {**head, "class": region, "volumes": len(part)}
        for metric, label in METRIC_LABELS.items():
            row[label] = median_sd_text(part.get(f"{region}_{metric}", []))
        rows.append(row)
    return rows


def cross_validate_tables(parent_id: str) -> dict[str, pd.DataFrame]:
    """``validation``: every source volume scored by the fold model that did not see it (pooled over folds);
    ``external``: the external set per fold model and for the ensemble; both median ± SD over volumes."""
    rec = cross_validate_records(parent_id)
    validation = rec[rec["set"] == "validation"]
    tables = {"validation": pd.DataFrame(_rows(validation, {"set": "validation (cross-validation)"}))}
    external = rec[rec["set"] == "external"]
    if len(external):
        order = sorted((m for m in external.model.unique() if m != "ensemble"), key=lambda m: int(m.split()[-1])) + ["ensemble"]
        rows = []
        for model in order:
            part = external[external.model == model]
            if len(part):
                rows += _rows(part, {"set": f"external ({part.dataset.iloc[0]})", "model": model})
        tables["external"] = pd.DataFrame(rows)
    return tables


def ablation_table(parent_ids: list[str]) -> pd.DataFrame:
    """The sensitivity analysis: one row per round (k, preprocessing, augmentation), lesion and lung DSC
    (median ± SD) on the validation folds and on the external set (ensemble)."""
    client = MlflowClient()
    rows = []
    for parent_id in parent_ids:
        params = client.get_run(parent_id).data.params
        rec = cross_validate_records(parent_id)
        val = rec[rec["set"] == "validation"]
        ext = rec[(rec["set"] == "external") & (rec.model == "ensemble")]
        rows.append({"k": int(params["folds"]), "preprocessing": params["preprocessing.enabled"], "augmentation": params["train.augment"],
                     "lesion DSC (validation)": median_sd_text(val.get("lesion_dsc", [])),
                     "lesion DSC (external, ensemble)": median_sd_text(ext.get("lesion_dsc", [])),
                     "lung DSC (validation)": median_sd_text(val.get("lung_dsc", [])),
                     "lung DSC (external, ensemble)": median_sd_text(ext.get("lung_dsc", [])), "run_id": parent_id})
    return pd.DataFrame(rows)
