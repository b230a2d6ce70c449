"""Müller et al.'s tables rebuilt from MLflow alone: median ± SD over volumes (their Table 2 and the
sensitivity analysis), from each child run's per_volume.csv artifact.

The paper reports each fold model on the external set; every table here carries those figures (per fold model
and pooled over the fold models). The ensemble of the fold models is domgen's addition (the paper leaves
ensembling to future work) and is labelled so wherever it appears."""
from __future__ import annotations

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from domgen.errors import DomgenError
from domgen.tracking import mlflow_store as store
from domgen.reports.report import children

METRIC_LABELS = {"dsc": "DSC", "iou": "IoU", "sen": "SEN", "spc": "SPC", "acc": "ACC", "prec": "PREC", "nsd": "NSD", "hd95": "HD95 (mm)"}
REGIONS = ("lung", "lesion")
ENSEMBLE = "ensemble (domgen's addition)"
FOLD_MODELS = "fold models, pooled"  # every fold model on every external volume: the paper's external figures


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


def _fold_order(models) -> list[str]:
    return sorted((m for m in models if m != "ensemble"), key=lambda m: int(m.split()[-1]))


def cross_validate_tables(parent_id: str) -> dict[str, pd.DataFrame]:
    """``validation``: every source volume scored by the fold model that did not see it (pooled over folds);
    ``external``: the external set per fold model, pooled over the fold models (what the paper reports) and for
    the ensemble (domgen's addition); all median ± SD over volumes."""
    rec = cross_validate_records(parent_id)
    validation = rec[rec["set"] == "validation"]
    tables = {"validation": pd.DataFrame(_rows(validation, {"set": "validation (cross-validation)"}))}
    external = rec[rec["set"] == "external"]
    if len(external):
        head = f"external ({external.dataset.iloc[0]})"
        folds = _fold_order(external.model.unique())
        rows = []
        for model in folds:
            rows += _rows(external[external.model == model], {"set": head, "model": model})
        if folds:
            rows += _rows(external[external.model.isin(folds)], {"set": head, "model": FOLD_MODELS})
        ensemble = external[external.model == "ensemble"]
        if len(ensemble):
            rows += _rows(ensemble, {"set": head, "model": ENSEMBLE})
        tables["external"] = pd.DataFrame(rows)
    return tables


def ablation_table(parent_ids: list[str]) -> pd.DataFrame:
    """The sensitivity analysis: one row per round (k, preprocessing, augmentation), lesion and lung DSC
    (median ± SD) on the validation folds, on the external set pooled over the fold models (the paper's
    figures) and for the ensemble (domgen's addition)."""
    client = MlflowClient()
    rows = []
    for parent_id in parent_ids:
        params = client.get_run(parent_id).data.params
        rec = cross_validate_records(parent_id)
        val = rec[rec["set"] == "validation"]
        ext = rec[rec["set"] == "external"]
        folds, ens = ext[ext.model != "ensemble"], ext[ext.model == "ensemble"]
        row = {"k": int(params["folds"]), "preprocessing": params["preprocessing.enabled"], "augmentation": params["train.augment"]}
        for region in ("lesion", "lung"):
            row[f"{region} DSC (validation)"] = median_sd_text(val.get(f"{region}_dsc", []))
            row[f"{region} DSC (external, {FOLD_MODELS})"] = median_sd_text(folds.get(f"{region}_dsc", []))
            row[f"{region} DSC (external, {ENSEMBLE})"] = median_sd_text(ens.get(f"{region}_dsc", []))
        rows.append({**row, "run_id": parent_id})
    return pd.DataFrame(rows)
