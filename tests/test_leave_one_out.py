"""A tiny leave-one-out round through the CLI, read back from a real MLflow store; resume; determinism."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from domgen.cli import main
from domgen.families import leave_one_out as loo
from domgen.tracking import mlflow_store as store

TINY_RUN = ["--set", "train.epochs=1", "--set", "preprocessing.image_size=32", "--set", "train.batch_size=8",
            "--set", "pseudolabel.ci_min=0.0", "--min-pixels", "1", "--set", "pseudolabel.min_pixels_at=null",
            "--set", "split.protocol=repeated-holdout", "--folds", "1", "--quiet"]


def _runs(uri: str, query: str = ""):
    store.configure(uri)
    exp = MlflowClient().get_experiment_by_name(loo.EXPERIMENT)
    return store.runs_of(exp.experiment_id, query, status=None)


def test_round_through_cli_is_tracked_and_resumes(tmp_path, tiny_suite):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
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

    # the DSC change in Table II is the paired patient bootstrap of the per-patient DSCs in the runs' artifacts
    from domgen.evaluation.evaluate import patient_dsc
    from domgen.evaluation.statistics import paired_bootstrap_change

    per_patient = {}
    for run in (baseline_b, enhanced):
        (tmp_path / run.info.run_id).mkdir()
        per_patient[run.data.tags["domgen.phase"]] = patient_dsc(pd.read_csv(
            store.download_artifact(run.info.run_id, "per_slice_metrics.csv", tmp_path / run.info.run_id)))
    both = [p for p in per_patient["baseline"] if np.isfinite(per_patient["baseline"][p]) and np.isfinite(per_patient["enhanced"][p])]
    change = paired_bootstrap_change({p: per_patient["baseline"][p] for p in both}, {p: per_patient["enhanced"][p] for p in both})
    row = next(line for line in result.output.splitlines() if line.startswith("| A | B |"))
    assert f"{change.mean_change:+.3f} [{change.low:+.3f}, {change.high:+.3f}]" in row
    assert enhanced.data.metrics["dsc_change"] == pytest.approx(change.mean_change)
    assert "ci_dsc_spearman_low" in baseline_b.data.metrics or "ci_dsc_spearman" not in baseline_b.data.metrics

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
    uri = f"sqlite:///{tmp_path}/mlflow.db"
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
