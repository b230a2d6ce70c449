"""Paper tables rebuilt from MLflow alone (Markdown, CSV, LaTeX)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from domgen.errors import DomgenError
from domgen.tracking import mlflow_store as store

METRICS = ("dsc", "spc", "sen")


def children(parent_id: str) -> list:
    run = MlflowClient().get_run(parent_id)
    return store.runs_of(run.info.experiment_id, f"tags.`mlflow.parentRunId` = '{parent_id}'")


def mean_std_text(values: list[float]) -> str:
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if arr.size == 0:
        return "-"
    return f"{arr.mean():.3f} ± {arr.std():.3f}" if arr.size > 1 else f"{arr.mean():.3f}"


def finite_mean(values) -> float:
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    return float(arr.mean()) if arr.size else float("nan")


def leave_one_out_records(parent_id: str) -> pd.DataFrame:
    """One row per child run: source, target, fold, phase and its metrics."""
    rows = []
    for run in children(parent_id):
        t = run.data.tags
        rows.append({"source": t.get("domgen.source"), "target": t.get("domgen.target"), "fold": int(t.get("domgen.fold", -1)),
                     "phase": t.get("domgen.phase"), "role": t.get("domgen.role"), "run_id": run.info.run_id, **run.data.metrics})
    return pd.DataFrame(rows)


def leave_one_out_tables(parent_id: str) -> dict[str, pd.DataFrame]:
    """Table II (per test set, DSC/SPC/SEN before and after, mean ± std over folds), Table III (averages over
    unseen sets) and an extended Table II (IoU, NSD, HD95 in mm, per-slice means, cut-off) per phase."""
    rec = leave_one_out_records(parent_id)
    if rec.empty:
        raise DomgenError(f"run {parent_id} has no finished child runs; run `domgen leave-one-out` to completion first")
    rows, averages = [], []
    source = rec.source.iloc[0]
    order = [source] + sorted(t for t in rec.target.unique() if t != source)
    for target in order:
        before = rec[(rec.target == target) & (rec.phase == "baseline")]
        after = rec[(rec.target == target) & (rec.phase == "enhanced")]
        row = {"source": source, "test set": f"{target} (in-domain)" if target == source else target}
        for m in METRICS:
            row[f"{m.upper()} before"] = mean_std_text(before.get(m, pd.Series(dtype=float)).tolist())
            row[f"{m.upper()} after"] = mean_std_text(after.get(m, pd.Series(dtype=float)).tolist()) if target != source else "-"
        if target != source:
            row["CI-DSC Spearman"] = mean_std_text(before.get("ci_dsc_spearman", pd.Series(dtype=float)).tolist())
            averages.append({m: (finite_mean(before.get(m, [])), finite_mean(after.get(m, []))) for m in METRICS})
        else:
            row["CI-DSC Spearman"] = "-"
        rows.append(row)
    table2 = pd.DataFrame(rows)
    extended = []
    for target in order:
        for phase in ("baseline", "enhanced"):
            part = rec[(rec.target == target) & (rec.phase == phase)]
            if part.empty:
                continue
            row = {"source": source, "test set": target, "phase": phase, "folds": len(part)}
            for m in ("dsc", "iou", "nsd", "hd95", "slice_dsc", "slice_sen", "slice_spc", "cutoff"):
                row[m.upper()] = mean_std_text(part.get(m, pd.Series(dtype=float)).tolist())
            extended.append(row)
    t3 = {"source": source, "unseen sets": len(averages)}
    for m in METRICS:
        b = finite_mean([a[m][0] for a in averages])
        a = finite_mean([a[m][1] for a in averages])
        t3.update({f"{m.upper()} before": f"{b:.3f}", f"{m.upper()} after": f"{a:.3f}", f"{m.upper()} change": f"{a - b:+.3f}"})
    return {"table2": table2, "table3": pd.DataFrame([t3]), "table2_extended": pd.DataFrame(extended)}


def to_markdown(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(str(v) for v in row.tolist()) + " |")
    return "\n".join(lines)


def write_tables(tables: dict[str, pd.DataFrame], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, df in tables.items():
        for suffix, text in ((".md", to_markdown(df)), (".csv", df.to_csv(index=False)),
                             (".tex", df.to_latex(index=False).replace("±", r"$\pm$"))):
            path = folder / f"{name}{suffix}"
            tmp = path.with_suffix(suffix + ".part")
            tmp.write_text(text)
            tmp.replace(path)
            paths.append(path)
    return paths


def log_tables(run_id: str, tables: dict[str, pd.DataFrame]) -> None:
    with store.artifact_dir() as tmp:
        write_tables(tables, tmp / "tables")
        MlflowClient().log_artifacts(run_id, str(tmp / "tables"), "tables")
