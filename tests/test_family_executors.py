"""Every family's independent units through the executors: a leave-one-out round with its 2 folds on a local Ray
instance (2 at once, logging to a real `mlflow server`), transfer's pretraining and strategy runs in 2 local worker
processes, and the numbers equal to the same work run in one process."""
from __future__ import annotations

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from worker_jobs import fails_on_odd

from domgen.cli import main
from domgen.errors import DomgenError
from domgen.executors import get_executor
from domgen.families import leave_one_out as loo
from domgen.families import transfer as tr
from domgen.families import units
from domgen.tracking import mlflow_store as store
from stores import sqlite_store

LOO_RUN = ["--set", "train.epochs=1", "--set", "preprocessing.image_size=32", "--set", "train.batch_size=8",
           "--set", "pseudolabel.ci_min=0.0", "--min-pixels", "1", "--set", "pseudolabel.min_pixels_at=null",
           "--folds", "2", "--quiet"]
METRICS = ("dsc", "sen", "spc", "cutoff", "ci_dsc_spearman", "n_pseudo_labels")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One torch thread per unit wherever it runs, so the numbers can be compared digit for digit."""
    monkeypatch.setenv("DOMGEN_THREADS", "1")


def _children(uri: str, experiment: str, role: str) -> dict[tuple, object]:
    store.configure(uri)
    exp = MlflowClient().get_experiment_by_name(experiment)
    runs = store.runs_of(exp.experiment_id, "", status=None)
    parents = [r for r in runs if r.data.tags.get("domgen.role") == role]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert all(r.info.status == "FINISHED" for r in children)
    key = ("domgen.fold", "domgen.target", "domgen.phase", "domgen.strategy", "domgen.pretrain")
    return {tuple(r.data.tags.get(k) for k in key): r for r in children}


def _same_numbers(here: dict, there: dict, metrics) -> None:
    assert set(here) == set(there)
    for key, run in here.items():
        for metric in metrics:
            if metric in run.data.metrics:
                assert there[key].data.metrics[metric] == pytest.approx(run.data.metrics[metric], abs=1e-6), (key, metric)


def _tables(output: str) -> list[str]:
    """The table rows of a command's output, less the columns of seconds (time, not results)."""
    rows, timed = [], None
    for line in output.splitlines():
        if not line.startswith("|"):
            timed = None
            continue
        cells = line.strip("|").split("|")
        if timed is None:
            timed = [i for i, cell in enumerate(cells) if "s / epoch" in cell or "seconds" in cell]
        rows.append("|".join(c for i, c in enumerate(cells) if i not in timed))
    return rows


def _here_and_there(tmp_path, args: list[str], experiment: str, executor: str):
    """The command in this process and with ``--executor EXECUTOR --workers 2``, each into its own store: (output
    here, output there, child runs here, child runs there)."""
    outputs, runs = [], []
    for name, extra in (("here", []), ("there", ["--executor", executor, "--workers", "2"])):
        uri = sqlite_store(tmp_path / f"{name}.db")
        result = CliRunner().invoke(main, [*args, "--tracking-uri", uri, *extra])
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
        runs.append(_children(uri, experiment, "round"))
    return (*outputs, *runs)


def test_leave_one_out_folds_on_ray_give_the_numbers_of_one_process(tmp_path, tiny_suite):
    args = ["leave-one-out", "--source", "A", "--targets", "B", "--suite", str(tiny_suite), *LOO_RUN]
    here, there, runs_here, runs_there = _here_and_there(tmp_path, args, loo.EXPERIMENT, "ray")
    assert {k[:3] for k in runs_here} == {(f, t, p) for f in "01" for t, p in (("A", "baseline"), ("B", "baseline"), ("B", "enhanced"))}
    _same_numbers(runs_here, runs_there, METRICS)
    assert _tables(here) == _tables(there)
    # the workers' artifacts went to the store the tables are read from
    enhanced = runs_there[("1", "B", "enhanced", None, None)]
    assert "model" in {a.path for a in MlflowClient().list_artifacts(enhanced.info.run_id)}
    # a plain re-run finds every fold finished and trains nothing
    again = CliRunner().invoke(main, [*args, "--tracking-uri", f"sqlite:///{tmp_path}/there.db", "--executor", "ray", "--workers", "2"])
    assert again.exit_code == 0 and _tables(again.output) == _tables(there)
    assert len(_children(f"sqlite:///{tmp_path}/there.db", loo.EXPERIMENT, "round")) == len(runs_there)


def test_transfer_units_in_local_workers_give_the_numbers_of_one_process(tmp_path, tiny_suite):
    args = ["transfer", "--target", "A", "--pretrain", "msd,nsclc", "--strategy", "scratch,continual", "--folds", "2",
            "--encoder", "resnet18", "--suite", str(tiny_suite), "--set", "train.epochs=1", "--set", "pretraining.train.epochs=1",
            "--set", "preprocessing.image_size=32", "--set", "train.batch_size=8", "--quiet"]
    here, there, runs_here, runs_there = _here_and_there(tmp_path, args, tr.EXPERIMENT, "local")
    # 2 folds x (scratch + continual from each of the 2 pretrained models)
    assert len(runs_here) == 2 * (1 + 2)
    _same_numbers(runs_here, runs_there, ("dsc", "nsd", "sen", "f1", "acc", "best_epoch"))
    assert _tables(here) == _tables(there)
    for uri in (f"sqlite:///{tmp_path}/here.db", f"sqlite:///{tmp_path}/there.db"):
        store.configure(uri)
        exp = MlflowClient().get_experiment_by_name(tr.EXPERIMENT)
        assert len(store.runs_of(exp.experiment_id, "tags.`domgen.role` = 'pretrain'")) == 2


def test_a_failed_unit_in_a_worker_stops_the_command_with_its_sentence_after_the_others(tmp_path, tracking_uri):
    runner = get_executor("local", workers=2, threads=1)
    jobs = [{"name": f"fold {i}", "i": i} for i in range(4)]
    with pytest.raises(DomgenError, match=r"^2 of 4 folds failed \(fold 1: unit 1 cannot read x.nii\); fix the cause and re-run"):
        units.run_units(runner, fails_on_odd, jobs, shared={"file": "x.nii", "out": tmp_path}, what="fold", progress=False)
    assert sorted(p.name for p in tmp_path.glob("done-*")) == ["done-0", "done-2"]  # the others ran to the end
    # in this process (the default) the error is raised as it is, at once
    with pytest.raises(DomgenError, match="^unit 1 cannot read x.nii$"):
        units.run_units(None, fails_on_odd, jobs, shared={"file": "x.nii", "out": tmp_path}, what="fold")


def test_executor_flags_are_checked_before_any_run(tmp_path, tiny_suite):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = CliRunner().invoke(main, ["leave-one-out", "--source", "A", "--suite", str(tiny_suite), "--tracking-uri", uri,
                                       "--workers", "0", *LOO_RUN])
    assert result.exit_code == 2 and "--workers 0: give 1 or more" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["cross-validate", "--suite", str(tiny_suite), "--tracking-uri", uri, "--address", "auto", "--quiet"])
    assert result.exit_code == 2 and "--address is for --executor ray" in result.output
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store was opened
