"""A tiny leave-one-out round through the CLI, read back from a real MLflow store; resume; determinism."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from domgen.cli import main
from domgen.families import leave_one_out as loo
from domgen.tracking import mlflow_store as store
from domgen.typed_config import typed
from stores import sqlite_store

TINY_RUN = ["--set", "train.epochs=1", "--set", "preprocessing.image_size=32", "--set", "train.batch_size=8",
            "--set", "pseudolabel.ci_min=0.0", "--min-pixels", "1", "--set", "pseudolabel.min_pixels_at=null",
            "--set", "split.protocol=repeated-holdout", "--folds", "1", "--quiet"]


def _runs(uri: str, query: str = ""):
    store.configure(uri)
    exp = MlflowClient().get_experiment_by_name(loo.EXPERIMENT)
    return store.runs_of(exp.experiment_id, query, status=None)


def test_round_through_cli_is_tracked_and_resumes(tmp_path, tiny_suite):
    uri = sqlite_store(tmp_path / "mlflow.db")
    args = ["leave-one-out", "--source", "A", "--targets", "B", "--suite", str(tiny_suite), "--tracking-uri", uri, *TINY_RUN]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "Table II" in result.output and "| A | B |" in result.output and "Table III" in result.output

    runs = _runs(uri)
    parents = [r for r in runs if r.data.tags.get("domgen.role") == "round"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    phases = sorted((r.data.tags["domgen.target"], r.data.tags["domgen.phase"]) for r in children)
    assert phases == [("A", "baseline"), ("B", "baseline"), ("B", "enhanced")]
    for run in children:
        t = run.data.tags
        assert t["domgen.family"] == "leave-one-out" and t["domgen.source"] == "A" and t["domgen.fold"] == "0"
        assert len(t["domgen.config_hash"]) == 16
        for metric in ("dsc", "sen", "spc", "iou", "nsd", "hd95"):
            assert metric in run.data.metrics or metric == "hd95", (metric, run.data.metrics)
        assert 0.0 <= run.data.metrics["dsc"] <= 1.0
        assert run.data.params["model.arch"] == "linknet" and run.data.params["train.epochs"] == "1"
    in_domain = next(r for r in children if r.data.tags["domgen.target"] == "A")
    assert "train_loss" in in_domain.data.metrics and 0.0 < in_domain.data.metrics["cutoff"] < 1.0
    history = MlflowClient().get_metric_history(in_domain.info.run_id, "val_loss")
    assert [m.step for m in history] == [0]

    baseline_b = next(r for r in children if r.data.tags["domgen.target"] == "B" and r.data.tags["domgen.phase"] == "baseline")
    csv = store.download_artifact(baseline_b.info.run_id, "ci_ranking.csv", tmp_path)
    ranking = pd.read_csv(csv)
    assert list(ranking.columns) == ["slice_id", "patient_id", "ci", "n_pixels", "min_pixels", "eligible", "selected", "dice"]
    ranked = ranking[ranking.n_pixels >= 1]
    assert (ranked.eligible).all() and not ranking[ranking.n_pixels < 1].eligible.any()
    assert (np.diff(ranked.ci.to_numpy()) <= 1e-12).all()  # most certain first
    assert ranking.selected.sum() == len(ranked)  # ci_min 0 and min_pixels 1: every ranked slice is chosen
    arts = {a.path for a in MlflowClient().list_artifacts(baseline_b.info.run_id)}
    assert {"ci_ranking.csv", "per_slice_metrics.csv", "predictions", "overlays"} <= arts
    nifti = MlflowClient().list_artifacts(baseline_b.info.run_id, "predictions")
    assert nifti and all(a.path.endswith(".nii.gz") for a in nifti)
    enhanced = next(r for r in children if r.data.tags["domgen.phase"] == "enhanced")
    assert enhanced.data.metrics["n_pseudo_labels"] == ranking.selected.sum()
    assert {"model"} <= {a.path for a in MlflowClient().list_artifacts(enhanced.info.run_id)}

    # the DSC change in Table II, by hand from the runs' per-slice confusion counts: per patient 2TP / (2TP + FP + FN)
    # pooled over the patient's slices, then the mean over patients of after - before
    per_patient = {}
    for run in (baseline_b, enhanced):
        (tmp_path / run.info.run_id).mkdir()
        table = pd.read_csv(store.download_artifact(run.info.run_id, "per_slice_metrics.csv", tmp_path / run.info.run_id))
        sums = table.groupby("patient_id")[["tp", "fp", "fn"]].sum()
        denom = 2 * sums.tp + sums.fp + sums.fn
        per_patient[run.data.tags["domgen.phase"]] = {str(p): 2 * row.tp / d for (p, row), d in zip(sums.iterrows(), denom) if d > 0}
    both = sorted(set(per_patient["baseline"]) & set(per_patient["enhanced"]))
    assert both
    mean_change = sum(per_patient["enhanced"][p] - per_patient["baseline"][p] for p in both) / len(both)
    row = next(line for line in result.output.splitlines() if line.startswith("| A | B |"))
    low, high = (float(x) for x in re.search(r"[+-]\d\.\d{3} \[([+-]\d\.\d{3}), ([+-]\d\.\d{3})\]", row).groups())
    assert f"{mean_change:+.3f} [" in row and low <= round(mean_change, 3) <= high
    assert enhanced.data.metrics["dsc_change"] == pytest.approx(mean_change)
    # the CI-DSC Spearman interval is logged exactly when rho is defined: >= 3 ranked slices with a true DSC, both varying
    ok = ranking[ranking.eligible & ranking.ci.notna() & ranking.dice.notna()]
    defined = len(ok) >= 3 and ok.ci.nunique() > 1 and ok.dice.nunique() > 1
    assert ("ci_dsc_spearman_low" in baseline_b.data.metrics) == defined

    # the same command again: nothing new is run
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert len(_runs(uri)) == len(runs)

    # report rebuilds the same tables from MLflow alone
    rep = CliRunner().invoke(main, ["report", "--experiment", loo.EXPERIMENT, "--tracking-uri", uri, "--out", str(tmp_path / "rep")])
    assert rep.exit_code == 0, rep.output
    table2 = (tmp_path / "rep" / loo.EXPERIMENT / parent.info.run_id / "table2.md").read_text()
    assert table2.strip() in result.output
    assert (tmp_path / "rep" / loo.EXPERIMENT / parent.info.run_id / "table3.tex").read_text().startswith("\\begin{tabular}")


def test_interrupted_round_resumes_without_repeating(tmp_path, tiny_suite, monkeypatch):
    uri = sqlite_store(tmp_path / "mlflow.db")
    args = ["leave-one-out", "--source", "A", "--targets", "B", "--suite", str(tiny_suite), "--tracking-uri", uri, *TINY_RUN]
    real = loo.enhance_target

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loo, "enhance_target", interrupted)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130 and "resume" in result.output
    first = _runs(uri)
    assert [r.info.status for r in first if r.data.tags.get("domgen.role") == "round"] == ["KILLED"]
    trained = [r.info.run_id for r in first if r.data.tags.get("domgen.role") == "in-domain"]
    assert len(trained) == 1

    monkeypatch.setattr(loo, "enhance_target", real)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    runs = _runs(uri)
    rounds = [r for r in runs if r.data.tags.get("domgen.role") == "round"]
    assert len(rounds) == 1 and rounds[0].info.status == "FINISHED"  # the same parent, reopened
    assert [r.info.run_id for r in runs if r.data.tags.get("domgen.role") == "in-domain"] == trained  # not retrained
    assert sum(r.data.tags.get("domgen.phase") == "enhanced" for r in runs) == 1


def test_same_seed_same_numbers(tiny_suite):
    """Determinism on CPU: the same config and seed train to identical weights and losses."""
    import torch

    from domgen.data.registry import load_cases, load_suite
    from domgen.models import build_model
    from domgen.preprocessing.slices import SlicePreprocessing, prepare_slices
    from domgen.training.trainer import TrainSettings, train

    spec = load_suite(str(tiny_suite)).get("A")
    slices = prepare_slices(load_cases(spec), SlicePreprocessing(image_size=32))
    settings = TrainSettings(epochs=2, batch_size=4, seed=7, augment="enshaei")

    def once(seed):
        torch.manual_seed(123)
        result = train(build_model("linknet", "resnet18", "none"), slices, slices, TrainSettings(**{**settings.__dict__, "seed": seed}), progress=False)
        return result.history, torch.cat([p.detach().flatten() for p in result.model.parameters()])

    h1, w1 = once(7)
    h2, w2 = once(7)
    h3, _ = once(8)
    assert [r["train_loss"] for r in h1] == [r["train_loss"] for r in h2]
    assert torch.equal(w1, w2)
    assert [r["train_loss"] for r in h1] != [r["train_loss"] for r in h3]


def test_default_kfold_round_tests_every_source_patient_once(tmp_path, tiny_suite):
    """The default protocol end to end (k-fold, k = 2): every source patient is in exactly one in-domain test set;
    with --select-by pseudo-val the pseudo-labels held out to choose the weights count as not used."""
    uri = sqlite_store(tmp_path / "mlflow.db")
    args = ["leave-one-out", "--source", "A", "--targets", "B", "--suite", str(tiny_suite), "--tracking-uri", uri,
            "--set", "train.epochs=1", "--set", "preprocessing.image_size=32", "--set", "train.batch_size=8",
            "--set", "pseudolabel.ci_min=0.0", "--min-pixels", "1", "--set", "pseudolabel.min_pixels_at=null",
            "--folds", "2", "--select-by", "pseudo-val", "--set", "pseudolabel.track_target_slices=0", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    runs = _runs(uri)
    [parent] = [r for r in runs if r.data.tags.get("domgen.role") == "round"]
    assert parent.data.params["split.protocol"] == "kfold"
    tested = []
    for run in (r for r in runs if r.data.tags.get("domgen.role") == "in-domain"):
        (tmp_path / run.info.run_id).mkdir()
        table = pd.read_csv(store.download_artifact(run.info.run_id, "per_slice_metrics.csv", tmp_path / run.info.run_id))
        tested += sorted(set(table.patient_id.astype(str)))
    from domgen.data.registry import load_cases, load_suite

    patients = sorted(c.patient_id for c in load_cases(load_suite(str(tiny_suite)).get("A")))
    assert len(patients) == 4 and sorted(tested) == patients  # each of the 4 patients in exactly one test fold
    enhanced = [r for r in runs if r.data.tags.get("domgen.phase") == "enhanced"]
    assert sorted(r.data.tags["domgen.fold"] for r in enhanced) == ["0", "1"]
    for run in enhanced:
        m = run.data.metrics
        (tmp_path / f"sel-{run.info.run_id}").mkdir()
        selection = pd.read_csv(store.download_artifact(run.info.run_id, "pseudo_label_selection.csv", tmp_path / f"sel-{run.info.run_id}"))
        selected = int(selection.selected.sum())
        # retrained-on + held out = selected; every slice not retrained on is in the unused metrics
        assert m["n_pseudo_labels"] + m["n_pseudo_val_held_out"] == selected
        assert m["n_slices_unused"] == len(selection) - m["n_pseudo_labels"]
        used = run.data.tags["domgen.select_by_used"]
        if selected >= 2:
            assert used == "pseudo-val" and m["n_pseudo_val_held_out"] >= 1
        else:
            assert used == "source-val" and f"fold {run.data.tags['domgen.fold']}, B: too few pseudo-labels" in result.output


def test_empty_validation_set_is_refused_not_scored_as_perfect(tiny_suite, tmp_path):
    from domgen.data.registry import load_cases, load_suite
    from domgen.errors import DomgenError
    from domgen.models import build_model
    from domgen.preprocessing.slices import SlicePreprocessing, prepare_slices
    from domgen.training.trainer import TrainSettings, train

    slices = prepare_slices(load_cases(load_suite(str(tiny_suite)).get("A")), SlicePreprocessing(image_size=32))
    empty = slices.subset([])
    with pytest.raises(DomgenError, match="validation set is empty"):
        train(build_model("linknet", "resnet18", "none"), slices, empty, TrainSettings(epochs=1, batch_size=8), progress=False)
    # nothing chosen on it: the last epoch's weights, every epoch run, the validation numbers NaN rather than 0 / 1
    result = train(build_model("linknet", "resnet18", "none"), slices, empty,
                   TrainSettings(epochs=2, batch_size=8, select_by="last", patience=None, augment="none"), progress=False)
    assert result.epochs_run == 2 and all(np.isnan(h["val_loss"]) and np.isnan(h["val_dsc"]) for h in result.history)
    # through the CLI: refused in one sentence before any run exists
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = CliRunner().invoke(main, ["leave-one-out", "--source", "A", "--targets", "B", "--suite", str(tiny_suite),
                                    "--tracking-uri", uri, *TINY_RUN, "--set", "split.val=0.0", "--set", "split.train=0.7"])
    assert out.exit_code == 2 and "have no validation patient" in out.output and out.output.count("\n") == 1
    store.configure(uri)
    assert MlflowClient().get_experiment_by_name(loo.EXPERIMENT) is None or not _runs(uri)
    # the fix the sentence offers is a setting the table accepts (it named train.select_by=last, a value it refused)
    from domgen.families import FAMILIES

    offered = re.findall(r"--set (\S+=\S+)", out.output)
    assert offered == ["train.select_by=last", "train.patience=null"]
    cfg = FAMILIES["leave-one-out"].config("quick", [*offered, "split.val=0.0", "split.train=0.7"])
    assert cfg.train.select_by == "last" and cfg.train.patience is None


def test_paper_profile_draws_five_independent_60_10_30_splits():
    import yaml

    from domgen.config import EXPERIMENTS_DIR

    cfg = yaml.safe_load((EXPERIMENTS_DIR / "leave_one_out" / "paper.yaml").read_text())
    assert cfg["split"]["protocol"] == "repeated-holdout" and cfg["folds"] == 5
    patients = [f"p{i:02d}" for i in range(20)]
    folds = loo.profile_folds(typed(cfg, loo.FAMILY), patients)
    assert len(folds) == 5
    for fold in folds:  # 20 patients: 12 / 2 / 6, disjoint, covering everyone
        assert [len(fold[p]) for p in ("train", "val", "test")] == [12, 2, 6]
        assert sorted(fold["train"] + fold["val"] + fold["test"]) == patients
    assert len({tuple(f["test"]) for f in folds}) > 1  # independent draws, not one split repeated
