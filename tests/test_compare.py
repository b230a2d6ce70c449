"""`domgen compare` end to end on a tiny suite: erm is leave-one-out's fold model, a researcher's own method runs
beside it, test-time methods reuse the erm model, resume, report, and bad input refused before any run."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from domgen.cli import main
from domgen.families import compare as cmp
from domgen.families import leave_one_out as loo
from domgen.methods.dg import METHODS, Method, register
from domgen.models.checkpoint import load_checkpoint
from domgen.tracking import mlflow_store as store
from domgen.training.trainer import predict_model_size
from stores import sqlite_store

TINY = ["--set", "train.epochs=1", "--set", "preprocessing.image_size=32", "--set", "train.batch_size=8",
        "--set", "split.protocol=repeated-holdout", "--folds", "1", "--quiet"]


def _runs(uri: str, experiment: str):
    store.configure(uri)
    exp = MlflowClient().get_experiment_by_name(experiment)
    return [] if exp is None else store.runs_of(exp.experiment_id, "", status=None)


def _weights(run, tmp_path):
    folder = tmp_path / run.info.run_id
    folder.mkdir()
    model, _ = load_checkpoint(store.download_artifact(run.info.run_id, "model/checkpoint.pt", folder))
    return model.state_dict()


def test_erm_is_leave_one_outs_fold_model_bit_for_bit(tmp_path, tiny_suite):
    uri = sqlite_store(tmp_path / "mlflow.db")
    common = ["--suite", str(tiny_suite), "--tracking-uri", uri, *TINY]
    out = CliRunner().invoke(main, ["leave-one-out", "--source", "A", "--targets", "B", *common, "--set", "pseudolabel.retrain_epochs=1"])
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(main, ["compare", "--sources", "A", "--targets", "B", "--methods", "erm", *common])
    assert out.exit_code == 0, out.output
    ours = [r for r in _runs(uri, loo.EXPERIMENT) if r.data.tags.get("domgen.role") == "in-domain"]
    theirs = [r for r in _runs(uri, cmp.EXPERIMENT) if r.data.tags.get("domgen.role") == "in-domain"]
    assert len(ours) == len(theirs) == 1
    assert theirs[0].data.tags["domgen.method"] == "erm" and theirs[0].data.tags["domgen.selection"] == "training-domain"
    a, b = _weights(ours[0], tmp_path), _weights(theirs[0], tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for metric in ("dsc", "sen", "spc", "cutoff", "best_epoch"):
        assert ours[0].data.metrics[metric] == theirs[0].data.metrics[metric]


class FlipTTA(Method):
    """The README's example: average the prediction of the slice and of its left-right mirror (test-time augmentation)."""

    name = "flip-tta"
    paper = "test-time augmentation (a README example)"
    trains = False
    seen_labels: list = []

    def predict(self, model, target, ctx):
        FlipTTA.seen_labels.append(int(target.targets.sum()) + sum(int(t.sum()) for t in target.truths))
        mirrored = target.subset(range(len(target)))
        mirrored.inputs = np.ascontiguousarray(target.inputs[..., ::-1])
        back = predict_model_size(model, mirrored, device=ctx.device)[..., ::-1]
        return (predict_model_size(model, target, device=ctx.device) + back) / 2


@pytest.fixture
def flip_tta():
    register(FlipTTA)
    yield FlipTTA
    METHODS.pop(FlipTTA.name, None)


def test_own_method_beside_erm_with_oracle_selection_reuses_the_erm_model_resumes_and_reports(tmp_path, tiny_suite, flip_tta):
    uri = sqlite_store(tmp_path / "mlflow.db")
    args = ["compare", "--sources", "A", "--targets", "B,C", "--methods", "erm,flip-tta,adabn", "--selection", "oracle",
            "--suite", str(tiny_suite), "--tracking-uri", uri, *TINY]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    runs = _runs(uri, cmp.EXPERIMENT)
    trained = [r for r in runs if r.data.tags.get("domgen.role") == "in-domain"]
    evaluated = [r for r in runs if r.data.tags.get("domgen.role") == "unseen"]
    assert len(trained) == 1  # one fold, one seed: the test-time methods adapted the erm model, none retrained
    assert sorted((r.data.tags["domgen.method"], r.data.tags["domgen.target"]) for r in evaluated) == sorted(
        (m, t) for m in ("erm", "flip-tta", "adabn") for t in ("B", "C"))
    assert all(r.data.tags["domgen.selection"] == "oracle" for r in trained + evaluated)
    assert flip_tta.seen_labels and not any(flip_tta.seen_labels)  # the target's labels were hidden from it
    assert "[oracle]" in out.output and "oracle (the targets' labels chose the epoch)" in out.output
    # resume: the same command finds the finished comparison and starts nothing
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert len(_runs(uri, cmp.EXPERIMENT)) == len(runs)
    # the report rebuilds the tables and the plot from MLflow alone
    rep = CliRunner().invoke(main, ["report", "--experiment", cmp.EXPERIMENT, "--out", str(tmp_path / "rep"), "--tracking-uri", uri])
    assert rep.exit_code == 0, rep.output
    files = {p.name for p in (tmp_path / "rep").rglob("*") if p.is_file()}
    assert {"results.md", "results.csv", "results.tex", "ranks.md", "method_target_dsc.png"} <= files
    table = cmp.compare_tables(next(r for r in runs if r.data.tags.get("domgen.role") == "comparison").info.run_id)["results"]
    assert len(table) == 6 and all("oracle" in m for m in table.method)


@pytest.mark.parametrize("extra, words", [
    (["--methods", "erm,nonsense"], "not a known method"),
    (["--methods", "erm,tent", "--set", "method.tent.steps=0"], "method.tent.steps"),
    (["--methods", "tent+transfer", "--init-run", "abc"], "test-time method and trains no model"),
    (["--methods", "bigaug@tent"], "test-time method and trains no model"),
    (["--methods", "erm@bigaug"], "is a training method"),
    (["--methods", "transfer"], "--init-run"),
    (["--methods", "erm-multi"], "two or more"),
    (["--methods", "erm", "--selection", "best"], "selection"),
    (["--methods", "erm,gin", "--set", "method.gin.layers=0"], "method.gin.layers"),
    (["--methods", "erm,bigaug", "--set", "method.bigaug.p=1.5"], "method.bigaug.p"),
    (["--methods", "erm", "--executor", "dask"], "--executor"),
    (["--methods", "erm", "--workers", "0"], "workers"),
])
def test_bad_input_is_one_sentence_exit_2_before_any_run(tmp_path, tiny_suite, extra, words):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = CliRunner().invoke(main, ["compare", "--sources", "A", "--targets", "B", "--suite", str(tiny_suite), "--tracking-uri", uri,
                                    *TINY, *extra])
    assert out.exit_code == 2, out.output
    assert words in out.output and "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1
    assert not _runs(uri, cmp.EXPERIMENT)


def test_oracle_without_target_labels_is_refused_before_any_run(tmp_path, tiny_suite, monkeypatch):
    monkeypatch.setattr(cmp, "has_labels", lambda slices: False)  # a target read without masks
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = CliRunner().invoke(main, ["compare", "--sources", "A", "--targets", "B", "--selection", "oracle", "--suite", str(tiny_suite),
                                    "--tracking-uri", uri, *TINY])
    assert out.exit_code == 2 and "oracle" in out.output and "has none" in out.output, out.output
    assert not _runs(uri, cmp.EXPERIMENT)


def _metrics(uri: str) -> dict:
    return {(r.data.tags["domgen.method"], r.data.tags["domgen.target"], r.data.tags["domgen.fold"]): r.data.metrics
            for r in _runs(uri, cmp.EXPERIMENT) if r.data.tags.get("domgen.role") == "unseen"}


@pytest.fixture
def one_thread(monkeypatch):
    """One torch thread here and in each worker (numbers can depend on the thread count), restored afterwards."""
    before = torch.get_num_threads()
    monkeypatch.setenv("DOMGEN_THREADS", "1")
    yield
    torch.set_num_threads(before)


def test_units_run_through_the_local_executor_with_the_same_numbers_and_erm_multi_and_transfer_end_to_end(tmp_path, tiny_suite,
                                                                                                          one_thread):
    """Two sources pooled (leave-one-domain-out), seed x fold units in two worker processes: the same numbers as in this
    process; then transfer starts from a fold model of the comparison (--init-run) and is tagged and reported."""
    common = ["compare", "--sources", "A,B", "--targets", "C", "--suite", str(tiny_suite), *TINY,
              "--set", "split.protocol=kfold", "--folds", "2"]
    here, there = sqlite_store(tmp_path / "here.db"), sqlite_store(tmp_path / "there.db")
    out = CliRunner().invoke(main, [*common, "--methods", "erm,erm-multi", "--tracking-uri", here])
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(main, [*common, "--methods", "erm,erm-multi", "--tracking-uri", there, "--executor", "local",
                                    "--workers", "2"])
    assert out.exit_code == 0, out.output
    a, b = _metrics(here), _metrics(there)
    assert sorted(a) == sorted((m, "C", str(k)) for m in ("erm", "erm-multi") for k in (0, 1))
    assert a.keys() == b.keys() and all(a[key]["dsc"] == b[key]["dsc"] and a[key]["cutoff"] == b[key]["cutoff"] for key in a)
    trained = [r for r in _runs(there, cmp.EXPERIMENT) if r.data.tags.get("domgen.role") == "in-domain"]
    assert sorted(r.data.tags["domgen.method"] for r in trained) == ["erm", "erm", "erm-multi", "erm-multi"]
    start = next(r for r in trained if r.data.tags["domgen.method"] == "erm").info.run_id
    out = CliRunner().invoke(main, [*common, "--methods", "erm,transfer", "--init-run", start, "--tracking-uri", there])
    assert out.exit_code == 0, out.output
    runs = _runs(there, cmp.EXPERIMENT)
    moved = [r for r in runs if r.data.tags.get("domgen.role") == "in-domain" and r.data.tags["domgen.method"] == "transfer"]
    assert len(moved) == 2 and all(r.data.params.get("init_run") == start for r in moved)
    assert len([r for r in runs if r.data.tags.get("domgen.role") == "in-domain"]) == 6  # erm found again, not retrained
    parent = max((r for r in runs if r.data.tags.get("domgen.role") == "comparison"), key=lambda r: r.info.start_time)
    assert list(cmp.compare_tables(parent.info.run_id)["results"].method) == ["erm", "transfer"]


def test_the_gin_and_bigaug_rows_reach_their_augmentation_and_their_models_identity():
    from domgen.config import load_profile
    from domgen.training.augment import build_augmentation
    from domgen.typed_config import typed

    cfg = typed({**load_profile("compare", "quick"), "sources": ["A"], "targets": ["B"], "suite": "x"}, cmp.FAMILY)
    cfg = cfg.replace(**{"method.gin.layers": 2, "method.gin.channels": 5})
    rc = cmp.model_config(cfg, 0, "gin", False, ["A"], ["B"])
    settings = cmp.train_settings(rc, 0)
    assert settings.augment == "gin" and settings.augment_params == {"layers": 2, "channels": 5}
    gin = build_augmentation(settings.augment, 0, settings.augment_params).transforms[0]
    assert (gin.layers, gin.channels) == (2, 5)
    convs = gin.get_params()["convs"]
    assert [w.shape[:2] for w, _ in convs] == [(5, 1), (1, 5)]  # first layer 1 -> 5 channels, last 5 -> 1
    bigaug = build_augmentation("bigaug", 0, {"p": 0.25}).transforms
    assert len(bigaug) == 9 and all(t.p == 0.25 for t in bigaug)
    other = cmp.model_config(cfg.replace(**{"method.gin.layers": 3}), 0, "gin", False, ["A"], ["B"])
    assert loo.child_hash(rc.as_dict(), fold=0, phase="baseline", target="A") != loo.child_hash(other.as_dict(), fold=0, phase="baseline",
                                                                                                target="A")
    erm = cmp.model_config(cfg, 0, "erm", False, ["A"], ["B"])
    assert "dg" not in erm.as_dict() and cmp.train_settings(erm, 0).augment_params is None  # erm keeps leave-one-out's identity
