"""Executors: the local one and Ray (a local Ray instance, 2 trials at once) log the same results to a real
MLflow tracking server started on 127.0.0.1."""
from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch
from mlflow.tracking import MlflowClient
from worker_jobs import exit_or_square

from domgen.config import apply_overrides, load_profile
from domgen.data.synthetic import ensure_synthetic_suite
from domgen.errors import DomgenError
from domgen.executors import EXECUTORS, get_executor
from domgen.executors.ray_executor import tracking_server
from domgen.families import benchmark as bm
from domgen.tracking import mlflow_store as store
from stores import sqlite_store

torch.set_num_threads(1)
GRID = {"experiments": "lesion-b", "archs": "pspnet", "encoders": "resnet18,mobilenet_v2", "weights": "random"}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    suite = ensure_synthetic_suite(tmp_path_factory.mktemp("suite") / "synthetic",
                                   patients={"A": 0, "B": 0, "tumour": 0, "effusion": 0, "D": 5, "C": 2}, slices_per_patient=4)
    base = apply_overrides(load_profile("benchmark", "quick"), [f"suite={suite}", "train.epochs=2", "threads=1", "evaluation.sample_slices=2"])
    return bm.resolve(base, **GRID)


def _sweep_on_server(tmp_path, cfg, executor: str, workers: int):
    """Run the sweep on ``executor`` logging to its own `mlflow server`; returns {encoder: run} and the history."""
    with tracking_server(sqlite_store(tmp_path / "mlflow.db"), tmp_path / "artifacts") as url:
        assert url.startswith("http://127.0.0.1:")
        store.configure(url)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
            result = bm.run_benchmark(cfg, executor=executor, workers=workers, progress=False)
        assert result.finished == 2 and not result.failed, result.failed
        client = MlflowClient()
        exp = client.get_experiment_by_name(bm.EXPERIMENT)
        runs = {r.data.tags["domgen.encoder"]: r for r in store.runs_of(exp.experiment_id, "tags.`domgen.role` = 'configuration'")}
        history = {enc: [m.value for m in sorted(client.get_metric_history(r.info.run_id, "val_loss"), key=lambda m: m.step)]
                   for enc, r in runs.items()}
        samples = {enc: client.list_artifacts(r.info.run_id, "predictions") for enc, r in runs.items()}
    return runs, history, samples


def test_local_and_ray_executors_give_the_same_results_on_a_shared_tracking_server(cfg, tmp_path):
    local_runs, local_history, _ = _sweep_on_server(tmp_path / "local", cfg, "local", workers=1)
    ray_runs, ray_history, ray_samples = _sweep_on_server(tmp_path / "ray", cfg, "ray", workers=2)
    assert set(local_runs) == set(ray_runs) == {"resnet18", "mobilenet_v2"}
    for encoder in local_runs:
        for key in ("dice", "sens", "spec", "params_m", "best_val_loss"):
            assert ray_runs[encoder].data.metrics[key] == pytest.approx(local_runs[encoder].data.metrics[key], abs=1e-6), (encoder, key)
        assert ray_history[encoder] == pytest.approx(local_history[encoder], abs=1e-6)
        assert [a.path for a in ray_samples[encoder]] == ["predictions/samples.npz"]  # artifacts went through the server


def test_ray_executor_runs_its_workers_at_the_same_time(tmp_path):
    """Each job announces itself and waits for the other: both finish only if two run at once (no clock compared)."""
    def meet(job):  # defined here so Ray ships it by value to its workers
        import time
        from pathlib import Path

        Path(job["me"]).touch()
        deadline = time.monotonic() + 60
        while not Path(job["other"]).exists():
            if time.monotonic() > deadline:
                return {"met": False}
            time.sleep(0.05)
        return {"met": True}

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    runner = get_executor("ray", workers=2, threads=1)
    results = [result for _, result, error in runner.map(meet, [{"me": a, "other": b}, {"me": b, "other": a}], progress=False)]
    assert results == [{"met": True}, {"met": True}]


def test_ray_on_a_cluster_refuses_a_local_sqlite_store():
    runner = get_executor("ray", workers=1, address="ray://head:10001")
    with pytest.raises(DomgenError, match="shared MLflow tracking server"):
        with runner.tracking("sqlite:///mlflow.db"):
            pass


def test_executor_registry_and_flag_errors():
    assert set(EXECUTORS) == {"local", "ray"}
    with pytest.raises(DomgenError, match="--executor dask"):
        get_executor("dask")
    with pytest.raises(DomgenError, match="--address is for --executor ray"):
        get_executor("local", address="auto")
    assert get_executor("local", workers=2, threads=None).threads >= 1


def test_gpus_per_trial_reaches_the_ray_task_and_is_refused_where_it_means_nothing():
    runner = get_executor("ray", workers=2, gpus_per_trial=0.25, device="cuda")  # Ray is not started by building it
    assert runner.gpus_per_trial == 0.25 and runner.task_options()["num_gpus"] == 0.25
    assert get_executor("ray", workers=2, gpus_per_trial=2, device="cuda").task_options()["num_gpus"] == 2
    assert get_executor("ray", workers=2, device="cuda").task_options()["num_gpus"] == 1  # the default: one GPU each
    assert get_executor("ray", workers=2, device="cpu").task_options()["num_gpus"] == 0
    with pytest.raises(DomgenError, match="^--gpus-per-trial is for --executor ray; the local executor's workers share this machine's GPU$"):
        get_executor("local", workers=2, gpus_per_trial=0.5, device="cuda")
    with pytest.raises(DomgenError, match="^--gpus-per-trial needs --device cuda"):
        get_executor("ray", workers=2, gpus_per_trial=0.5, device="cpu")
    for bad in (1.5, -0.25, 0.0):
        with pytest.raises(DomgenError, match="--gpus-per-trial"):
            get_executor("ray", workers=2, gpus_per_trial=bad, device="cuda")


def test_benchmark_refuses_gpus_per_trial_on_a_cpu_in_one_sentence(tmp_path, tiny_suite):
    from click.testing import CliRunner

    from domgen.cli import main

    result = CliRunner().invoke(main, ["benchmark", "--suite", str(tiny_suite), "--device", "cpu", "--gpus-per-trial", "0.5", "--dry-run",
                                       "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.strip() == "error: --gpus-per-trial needs --device cuda (it is 0.5 with --device cpu); leave it out on a CPU"
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store was touched


def test_local_worker_pool_records_a_dead_worker_and_goes_on():
    runner = get_executor("local", workers=2, threads=1)
    jobs = [{"action": "exit"}, {"action": "square", "x": 3}]
    results = {job.get("x", "dead"): (result, error) for job, result, error in runner.map(exit_or_square, jobs, progress=False)}
    assert results["dead"][0] is None and "re-run with --retry-failed" in results["dead"][1]
    # the healthy job either finished or was reported with a reason (caught in the broken pool); never silently lost
    result, error = results[3]
    assert result == 9 or "re-run with --retry-failed" in error
