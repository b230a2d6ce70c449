"""Wang et al.'s tables and the four-way comparison, rebuilt from MLflow alone.

Wang et al. report per scan: every cell is mean ± std over test cases (patients), read from each strategy
run's ``per_case.csv`` (``domgen.evaluation.evaluate.per_case_metrics``: DSC, 3D NSD at 3 mm, SEN, F1, ACC).
Table I: DSC and NSD per strategy x pretrained model x fold (over the fold's test cases) and overall (over
every test case of every fold), with the older per-slice 2D NSD beside it. Table II: sensitivity, F1 and
accuracy overall. Table III: the multi-lesion model's strategies with parameters and seconds per epoch.
``note``: the cases whose slices make no volume (NSD per slice for them), when there are any. Runs logged
before per-case metrics (no ``per_case.csv``) count with their fold means instead. ``comparison_table``: unseen
DSC/SEN/SPC of a leave-one-out round started from scratch and one started from a Multi-encoder transfer
model, each before and after Certainty-Index pseudo-labels.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from domgen.errors import DomgenError
from domgen.tracking import mlflow_store as store
from domgen.reports.report import finite_mean, mean_std_text, children, leave_one_out_records

TRANSFER_EXPERIMENT = "domgen-transfer"
LEAVE_ONE_OUT_EXPERIMENT = "domgen-leave-one-out"
STRATEGY_ORDER = ("scratch", "continual", "body", "frozen", "multi-encoder")
PRETRAIN_ORDER = ("none", "msd", "structseg", "nsclc", "multi")


def transfer_records(parent_id: str) -> pd.DataFrame:
    """One row per strategy run: strategy, pretrained model, fold and its metrics."""
    tags = ("strategy", "pretrain", "target", "init_run")
    rec = pd.DataFrame([{**{t: run.data.tags.get(f"domgen.{t}") for t in tags}, "fold": int(run.data.tags.get("domgen.fold", -1)),
                         "run_id": run.info.run_id, **run.data.metrics} for run in children(parent_id)])
    if rec.empty:
        raise DomgenError(f"run {parent_id} has no finished strategy runs; run `domgen transfer` to completion first")
    rank = lambda order: (lambda v: order.index(v) if v in order else len(order))  # noqa: E731
    key = rec.strategy.map(rank(STRATEGY_ORDER)) * 100 + rec.pretrain.map(rank(PRETRAIN_ORDER))
    return rec.assign(_key=key).sort_values(["_key", "pretrain", "fold"]).drop(columns="_key").reset_index(drop=True)


def _column(part: pd.DataFrame, metric: str) -> list[float]:
    return part[metric].tolist() if metric in part else []


def case_records(rec: pd.DataFrame) -> pd.DataFrame:
    """One row per strategy run x test case (``per_case.csv``); a run without one gives one row of its fold means."""
    parts = []
    with store.artifact_dir() as tmp:
        for _, run in rec.iterrows():
            (tmp / run.run_id).mkdir()
            try:
                cases = pd.read_csv(store.download_artifact(run.run_id, "per_case.csv", tmp / run.run_id), dtype={"patient_id": str})
            except Exception:  # a run logged before per-case metrics: MLflow raises several types for a missing artifact
                cases = pd.DataFrame([{m: run.get(m, np.nan) for m in ("dsc", "nsd", "sen", "f1", "acc", "slice_nsd")}])
                cases["nsd_slice"] = run.get("slice_nsd", np.nan)
            parts.append(cases.assign(strategy=run.strategy, pretrain=run.pretrain, fold=run.fold, run_id=run.run_id))
    return pd.concat(parts, ignore_index=True)


def volume_note(cases: pd.DataFrame) -> str:
    """One sentence naming the cases whose NSD is the mean of their per-slice 2D NSD, and why; "" when none."""
    if "nsd_mode" not in cases:
        return ""
    fallback = cases[cases.nsd_mode.fillna("3d") != "3d"].drop_duplicates("patient_id")
    if fallback.empty:
        return ""
    named = ", ".join(f"{p} ({m.removeprefix('per-slice: ')})" for p, m in zip(fallback.patient_id, fallback.nsd_mode))
    return f"NSD is the mean per-slice 2D NSD, not 3D, for cases whose slices make no volume: {named}."


def transfer_tables(parent_id: str) -> dict[str, pd.DataFrame]:
    rec = transfer_records(parent_id)
    cases = case_records(rec)
    folds = sorted(rec.fold.unique())
    groups = list(cases.groupby(["strategy", "pretrain"], sort=False))
    table1, table2 = [], []
    for (strategy, pretrain), part in groups:
        row = {"strategy": strategy, "pretrained model": pretrain}
        for metric in ("dsc", "nsd"):
            for k in folds:
                row[f"{metric.upper()} fold {k}"] = mean_std_text(_column(part[part.fold == k], metric))
            row[f"{metric.upper()} overall"] = mean_std_text(_column(part, metric))
        row["NSD per slice overall"] = mean_std_text(_column(part, "nsd_slice"))
        table1.append(row)
        table2.append({"strategy": strategy, "pretrained model": pretrain, "SEN": mean_std_text(_column(part, "sen")),
                       "F1": mean_std_text(_column(part, "f1")), "ACC": mean_std_text(_column(part, "acc"))})
    # Table III: the multi-lesion model (else the first pretrained model of the round), with scratch for reference
    pretrained = [p for p in PRETRAIN_ORDER if p in set(rec.pretrain) and p != "none"] or sorted(set(rec.pretrain) - {"none"})
    chosen = "multi" if "multi" in pretrained else (pretrained[0] if pretrained else "none")
    table3 = []
    for (strategy, pretrain), part in groups:
        if pretrain in (chosen, "none"):
            runs = rec[(rec.strategy == strategy) & (rec.pretrain == pretrain)]
            table3.append({"strategy": strategy, "pretrained model": pretrain, "DSC": mean_std_text(_column(part, "dsc")),
                           "NSD": mean_std_text(_column(part, "nsd")), "trainable params": f"{finite_mean(_column(runs, 'trainable_params')):,.0f}",
                           "total params": f"{finite_mean(_column(runs, 'total_params')):,.0f}",
                           "s / epoch": f"{finite_mean(_column(runs, 'seconds_per_epoch')):.2f}"})
    tables = {"table1": pd.DataFrame(table1), "table2": pd.DataFrame(table2), "table3": pd.DataFrame(table3)}
    note = volume_note(cases)
    if note:
        tables["note"] = pd.DataFrame([{"note": note}])
    return tables


def _round_params(run) -> dict[str, str]:
    return {k: v for k, v in run.data.params.items() if k not in ("init_run", "init_checkpoint")}


def _is_fresh(run) -> bool:
    return run.data.params.get("init_run", "None") == "None" and run.data.params.get("init_checkpoint", "None") == "None"


def comparison_rounds(round_id: str | None = None) -> tuple[object, object]:
    """(a round from a fresh model, the newest round from a Multi-encoder transfer model) with the same config otherwise."""
    loo, transfer = (store.get_experiment(n) for n in (LEAVE_ONE_OUT_EXPERIMENT, TRANSFER_EXPERIMENT))
    how = ("run `domgen transfer --target A --pretrain multi --strategy multi-encoder`, then `domgen leave-one-out --source A "
           "--set splits_file=FILE` without and with `--init-run RUN_ID` (a multi-encoder fold run; FILE keeps its train "
           "patients out of every test part), or benchmarks/four_way.py, which does all of it")
    if loo is None or transfer is None:
        raise DomgenError(f"--compare needs the experiments {LEAVE_ONE_OUT_EXPERIMENT} and {TRANSFER_EXPERIMENT} in this store; {how}")
    multi = {r.info.run_id for r in store.runs_of(transfer.experiment_id, "tags.`domgen.strategy` = 'multi-encoder'")}
    rounds = store.runs_of(loo.experiment_id, "tags.`domgen.role` = 'round'")
    if round_id is not None:
        started = [r for r in rounds if r.info.run_id == round_id]
    else:
        started = [r for r in rounds if r.data.params.get("init_run") in multi]
    if not started:
        raise DomgenError(f"no finished leave-one-out round started from a Multi-encoder transfer model{' with id ' + round_id if round_id else ''}; {how}")
    transferred = max(started, key=lambda r: r.info.end_time or 0)
    twins = [r for r in rounds if _is_fresh(r) and _round_params(r) == _round_params(transferred)]
    if not twins:
        raise DomgenError(f"no finished leave-one-out round with the same settings as {transferred.info.run_id} but no --init-run; "
                          "run the same `domgen leave-one-out` command without --init-run")
    return max(twins, key=lambda r: r.info.end_time or 0), transferred


def comparison_table(round_id: str | None = None) -> pd.DataFrame:
    """Unseen DSC/SEN/SPC (mean ± std over every unseen target and fold) for (a)-(d), and in-domain DSC."""
    fresh, transferred = comparison_rounds(round_id)
    rows = []
    for label, run, phase in (("(a) baseline", fresh, "baseline"), ("(b) baseline + CI pseudo-labels", fresh, "enhanced"),
                              ("(c) Multi-encoder transfer", transferred, "baseline"),
                              ("(d) Multi-encoder + CI pseudo-labels", transferred, "enhanced")):
        rec = leave_one_out_records(run.info.run_id)
        unseen = rec[(rec.role == "unseen") & (rec.phase == phase)]
        indomain = rec[(rec.role == "in-domain") & (rec.phase == "baseline")]
        row = {"setting": label, "source": run.data.params.get("source"), "unseen targets": ", ".join(sorted(unseen.target.unique()))}
        for metric in ("dsc", "sen", "spc"):
            row[f"unseen {metric.upper()}"] = mean_std_text(_column(unseen, metric))
        row["in-domain DSC"] = mean_std_text(_column(indomain, "dsc") if phase == "baseline" else _column(unseen, "indomain_dsc"))
        row["round"] = run.info.run_id
        rows.append(row)
    return pd.DataFrame(rows)
