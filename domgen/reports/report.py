"""Paper tables rebuilt from MLflow alone (Markdown, CSV, LaTeX)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
from scipy import stats

from domgen.errors import DomgenError
from domgen.evaluation.evaluate import paired_patients, patient_dsc
from domgen.evaluation.statistics import paired_bootstrap_change
from domgen.tracking import mlflow_store as store
from domgen.tracking.tables import log_tables, to_markdown, write_tables  # noqa: F401 - the report commands' writers

METRICS = ("dsc", "spc", "sen")


def children(parent_id: str) -> list:
    run = store.get_run(parent_id)
    return store.runs_of(run.info.experiment_id, f"tags.`mlflow.parentRunId` = '{parent_id}'")


def mean_std_text(values: list[float]) -> str:
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if arr.size == 0:
        return "-"
    return f"{arr.mean():.3f} ± {arr.std():.3f}" if arr.size > 1 else f"{arr.mean():.3f}"


def finite_mean(values) -> float:
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    return float(arr.mean()) if arr.size else float("nan")


def round_ids(run_id: str) -> list[str]:
    """The round runs behind ``run_id``: itself for a round, the listed rounds for a multi-source experiment run."""
    run = store.get_run(run_id)
    if run.data.tags.get("domgen.role") == "experiment":
        return json.loads(run.data.tags.get("domgen.rounds", "[]"))
    return [run_id]


def leave_one_out_records(parent_id: str) -> pd.DataFrame:
    """One row per child run of a round: source, target, fold, phase and its metrics."""
    rows = []
    for run in children(parent_id):
        t = run.data.tags
        rows.append({"source": t.get("domgen.source"), "target": t.get("domgen.target"), "fold": int(t.get("domgen.fold", -1)),
                     "phase": t.get("domgen.phase"), "role": t.get("domgen.role"), "run_id": run.info.run_id, **run.data.metrics})
    return pd.DataFrame(rows)


def _patient_dsc_over_folds(runs: pd.DataFrame) -> dict[str, float]:
    """Each patient's DSC averaged over the folds' runs (read from their per_slice_metrics.csv artifacts)."""
    per_fold = []
    with store.artifact_dir() as tmp:
        for i, run_id in enumerate(runs.run_id):
            (tmp / str(i)).mkdir()
            per_fold.append(patient_dsc(pd.read_csv(store.download_artifact(run_id, "per_slice_metrics.csv", tmp / str(i)))))
    patients = sorted(set().union(*per_fold)) if per_fold else []
    return {p: finite_mean([f.get(p) for f in per_fold]) for p in patients}


def change_text(change) -> tuple[str, str]:
    """('+0.012 [-0.004, +0.031]', '0.21') for a PairedChange."""
    if not np.isfinite(change.mean_change):
        return "-", "-"
    p = f"{change.p_wilcoxon:.3g}" if np.isfinite(change.p_wilcoxon) else "-"
    return f"{change.mean_change:+.3f} [{change.low:+.3f}, {change.high:+.3f}]", p


def runs_interval_text(values: list[float]) -> str:
    """Mean [95 % t interval] over runs, e.g. the DSC change of each fold x seed; the mean alone for one run."""
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if arr.size == 0:
        return "-"
    if arr.size == 1 or np.all(arr == arr[0]):
        return f"{arr.mean():+.3f} (n={arr.size})"
    low, high = stats.t.interval(0.95, arr.size - 1, loc=arr.mean(), scale=stats.sem(arr))
    return f"{arr.mean():+.3f} [{low:+.3f}, {high:+.3f}] (n={arr.size})"


def _values(part: pd.DataFrame, metric: str) -> list[float]:
    return part.get(metric, pd.Series(dtype=float)).tolist()


def _round_tables(round_id: str) -> tuple[list[dict], list[dict], list[dict], list[dict], dict]:
    """Table II rows, extended rows, selection rows, slice-count rows and the round's Table III means."""
    rec = leave_one_out_records(round_id)
    if rec.empty:
        raise DomgenError(f"run {round_id} has no finished child runs; run `domgen leave-one-out` to completion first")
    source = rec[rec.role == "in-domain"].source.iloc[0] if (rec.role == "in-domain").any() else rec.source.iloc[0]
    order = [source] + sorted(t for t in rec.target.unique() if t != source)
    rows, extended, selection = [], [], []
    unseen_before, unseen_after = {m: [] for m in METRICS}, {m: [] for m in METRICS}
    indomain_after = {m: [] for m in METRICS}
    for target in order:
        before = rec[(rec.target == target) & (rec.phase == "baseline")]
        after = rec[(rec.target == target) & (rec.phase == "enhanced")]
        row = {"source": source, "test set": f"{target} (in-domain)" if target == source else target}
        for m in METRICS:
            row[f"{m.upper()} before"] = mean_std_text(_values(before, m))
            row[f"{m.upper()} after"] = mean_std_text(_values(after, m)) if target != source else "-"
        if target == source:
            row.update({"in-domain DSC after": "-", "CI-DSC Spearman": mean_std_text(_values(before, "ci_dsc_spearman")),
                        "pseudo-labels": "-", "note": ""})
        else:
            n_pseudo = _values(after, "n_pseudo_labels")
            ranked = _values(before, "n_slices_ranked")
            row["in-domain DSC after"] = mean_std_text(_values(after, "indomain_dsc"))
            row["CI-DSC Spearman"] = mean_std_text(_values(before, "ci_dsc_spearman"))
            row["pseudo-labels"] = f"{finite_mean(n_pseudo):.0f} of {finite_mean(ranked):.0f}" if len(after) else "-"
            # paired by patient: each patient's DSC (mean over folds) after minus before, patient bootstrap 95 % interval
            change = paired_bootstrap_change(*paired_patients(_patient_dsc_over_folds(before), _patient_dsc_over_folds(after)))
            row["DSC change [95 % CI]"], row["Wilcoxon p"] = change_text(change)
            # the spread of the change over retraining runs (folds x seeds): one lucky epoch does not decide
            row["change over seeds x folds"] = runs_interval_text(_values(after, "dsc_change"))
            row["note"] = ("no slice selected in any fold: after = before" if len(after) and all(v == 0 for v in n_pseudo)
                           else "no slice selected in some folds" if any(v == 0 for v in n_pseudo) else "")
            for m in METRICS:
                unseen_before[m].append(finite_mean(_values(before, m)))
                unseen_after[m].append(finite_mean(_values(after, m)))
                indomain_after[m].append(finite_mean(_values(after, f"indomain_{m}")))
            sel = {"source": source, "target": target, "folds": len(before)}
            for key, label in (("n_slices_ranked", "ranked (N filter passed)"), ("n_selected", "selected (profile rule)"),
                               ("n_selected_ci_fixed", "CI >= ci_min"), ("n_selected_ci_indomain", "CI >= in-domain quantile"),
                               ("n_selected_top_fraction", "top fraction"), ("ci_limit_indomain", "in-domain CI limit")):
                values = _values(before, key)
                sel[label] = (f"{finite_mean(values):.3f}" if key == "ci_limit_indomain" else f"{finite_mean(values):.1f}") if values else "-"
            selection.append(sel)
        rows.append(row)
        for phase in ("baseline", "enhanced"):
            part = rec[(rec.target == target) & (rec.phase == phase)]
            if part.empty:
                continue
            ext = {"source": source, "test set": target, "phase": phase, "folds": len(part)}
            for m in ("dsc", "iou", "nsd", "hd95", "slice_dsc", "slice_sen", "slice_spc", "cutoff", "n_slices"):
                ext[m.upper()] = mean_std_text(_values(part, m))
            extended.append(ext)
    indomain = rec[(rec.target == source) & (rec.phase == "baseline")]
    means = {"in-domain": {m: finite_mean(_values(indomain, m)) for m in METRICS},
             "unseen change (after - before)": {m: finite_mean(np.subtract(unseen_after[m], unseen_before[m])) for m in METRICS},
             "in-domain after enhancement": {m: finite_mean(indomain_after[m]) for m in METRICS},
             "unseen before": {m: finite_mean(unseen_before[m]) for m in METRICS},
             "unseen after": {m: finite_mean(unseen_after[m]) for m in METRICS}}
    metrics = store.get_run(round_id).data.metrics
    counts = []
    for key in sorted(k for k in metrics if k.startswith("slices_kept.")):
        name = key.split(".", 1)[1]
        counts.append({"source": source, "dataset": name, "slices kept": int(metrics[key]),
                       "slices dropped": int(metrics.get(f"slices_dropped.{name}", 0))})
    return rows, extended, selection, counts, means


def table2_frame(rows: list[dict]) -> pd.DataFrame:
    """Table II from its rows: a cell a row does not have (the in-domain row's change columns) reads '-', not nan."""
    return pd.DataFrame(rows).fillna("-")


def leave_one_out_tables(run_id: str) -> dict[str, pd.DataFrame]:
    """The paper's tables for a round or a multi-source experiment.

    table2: per round and test set, DSC/SPC/SEN before and after (mean ± std over folds), the in-domain DSC
    of the enhanced model, CI-DSC Spearman, pseudo-labels used and a note when none were selected;
    table3: in-domain, in-domain after enhancement, unseen before and unseen after, mean ± std over rounds
    (each round's value is its mean over folds and unseen sets); table2_extended: IoU, NSD, HD95, per-slice
    means, cut-off; selection: how many slices each label-free rule selects per target; slices: slices
    kept and dropped per dataset by the keep_slices rule."""
    table2, extended, selection, counts, per_round = [], [], [], [], []
    for rid in round_ids(run_id):
        rows, ext, sel, cnt, means = _round_tables(rid)
        table2 += rows
        extended += ext
        selection += sel
        counts += cnt
        per_round.append(means)
    t3 = []
    for row in ("in-domain", "in-domain after enhancement", "unseen before", "unseen after", "unseen change (after - before)"):
        entry = {"test": row, "rounds": len(per_round)}
        for m in METRICS:
            entry[m.upper()] = mean_std_text([r[row][m] for r in per_round])
        t3.append(entry)
    return {"table2": table2_frame(table2), "table3": pd.DataFrame(t3), "table2_extended": pd.DataFrame(extended),
            "selection": pd.DataFrame(selection), "slices": pd.DataFrame(counts)}
