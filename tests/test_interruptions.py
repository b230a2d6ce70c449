"""Every interruption survived: SIGINT, SIGTERM and SIGKILL mid-run, then a plain re-run of the same command
finishes with no duplicate and no lost finished run, in every family; two benchmark drivers on one sweep
against a real ``mlflow server`` train each configuration once and never close each other's live runs."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from domgen.executors.ray_executor import tracking_server
from domgen.tracking import mlflow_store as store

ENV = {"HF_HUB_OFFLINE": "1", "DOMGEN_THREADS": "1", "DOMGEN_HEARTBEAT_SECONDS": "1"}


def _commands(suite: Path) -> dict[str, tuple[list[str], str]]:
    """family -> (command, the role of its work runs); tiny: 32 px, 1 epoch."""
    small = ["--quiet", "--set", "preprocessing.image_size=32", "--set", "train.epochs=1"]
    return {
        "benchmark": (["benchmark", "--suite", str(suite), "--experiments", "lung", "--archs", "linknet,pspnet",
                       "--encoders", "resnet18,mobilenet_v2", "--weights", "random", "--set", "evaluation.sample_slices=2", *small],
                      "configuration"),
        "transfer": (["transfer", "--suite", str(suite), "--folds", "2", "--strategy", "scratch,continual", "--pretrain", "msd",
                      "--set", "pretraining.train={epochs: 1}", "--set", "train.batch_size=4", *small], "strategy"),
        "leave-one-out": (["leave-one-out", "--suite", str(suite), "--source", "A", "--targets", "B", "--folds", "2",
                           "--set", "train.batch_size=4", "--set", "evaluation.surface=false", *small], None),
    }


def _runs(db: Path) -> list[tuple[str, str, str | None, str | None]]:
    """(run id, status, config hash, role) of every live (not deleted) run, read straight from SQLite."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=10) as con:
            return con.execute(
                "select r.run_uuid, r.status, "
                "(select value from tags t where t.run_uuid = r.run_uuid and t.key = 'domgen.config_hash'), "
                "(select value from tags t where t.run_uuid = r.run_uuid and t.key = 'domgen.role') "
                "from runs r where r.lifecycle_stage = 'active'").fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []


def _work(runs, role):
    return [r for r in runs if r[3] not in ("round", "sweep") and (role is None or r[3] == role)]


def _start(args: list[str], cwd: Path, uri: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "domgen.cli", *args, "--tracking-uri", uri], cwd=cwd,
                            env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _interrupt_mid_run(args, role, db: Path, uri: str, cwd: Path, sig) -> set[str]:
    """Start the command, send ``sig`` while one of its work runs is live (a new one, after one has finished);
    returns the ids of the runs finished before the signal."""
    seen = {r[0] for r in _runs(db)}
    proc = _start(args, cwd, uri)
    deadline = time.monotonic() + 400
    while True:
        runs = _work(_runs(db), role)
        if any(r[1] == "FINISHED" for r in runs) and any(r[1] == "RUNNING" and r[0] not in seen for r in runs):
            break
        assert proc.poll() is None, f"ended before it could be interrupted: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no run started in time"
        time.sleep(0.05)
    finished_before = {r[0] for r in runs if r[1] == "FINISHED"}
    live = {r[0] for r in runs if r[1] == "RUNNING"}
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        return finished_before
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    after = {r[0]: r for r in _runs(db)}
    # the interrupted run is ended as interrupted (KILLED + tag), not failed and not left RUNNING
    assert all(after[i][1] in ("KILLED", "FINISHED") for i in live), ([after[i] for i in live], stderr[-1500:])
    assert not [r for r in after.values() if r[1] == "RUNNING"]
    store.configure(uri)
    killed = [MlflowClient().get_run(i) for i in live if after[i][1] == "KILLED"]
    assert killed and all(store.is_interrupted(r) and r.data.tags.get("domgen.interrupted") == "true" for r in killed)
    return finished_before


@pytest.mark.parametrize("family", ["benchmark", "transfer", "leave-one-out"])
def test_sigterm_sigint_sigkill_then_a_plain_rerun_finishes_without_duplicates(family, tiny_suite, tmp_path):
    """SIGTERM mid-run, re-run and SIGINT mid-run, re-run and SIGKILL mid-run, then a plain re-run."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    args, role = _commands(tiny_suite)[family]
    finished_before: set[str] = set()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
        finished_before |= _interrupt_mid_run(args, role, db, uri, tmp_path, sig)
    again = subprocess.run([sys.executable, "-m", "domgen.cli", *args, "--tracking-uri", uri], cwd=tmp_path, env={**os.environ, **ENV},
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = _runs(db)
    finished = [r for r in runs if r[1] == "FINISHED"]
    hashes = [r[2] for r in finished]
    assert len(hashes) == len(set(hashes)), "a configuration finished twice"
    assert finished_before <= {r[0] for r in finished}, "a run finished before an interruption was lost or redone"
    assert not [r for r in runs if r[1] in ("RUNNING", "FAILED")]
    parents = [r for r in runs if r[3] in ("round", "sweep")]
    assert len(parents) == 1 and parents[0][1] == "FINISHED"  # the interrupted parent was resumed, not duplicated
    assert len([r for r in runs if r[1] == "KILLED"]) >= 3  # each interruption left its run marked, none was reused
    if role is not None:
        assert len(_work(finished, role)) == 4


def test_two_drivers_on_one_sweep_share_the_work(tiny_suite, tmp_path):
    """Against a real `mlflow server`: two drivers started a moment apart train each configuration once."""
    args, role = _commands(tiny_suite)["benchmark"]
    db = tmp_path / "mlflow.db"
    with tracking_server(f"sqlite:///{db}", tmp_path / "artifacts") as url:
        first = _start(args, tmp_path, url)
        deadline = time.monotonic() + 300
        while not [r for r in _work(_runs(db), role) if r[1] == "RUNNING"]:
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        second = _start(args, tmp_path, url)
        outs = [p.communicate(timeout=600)[1] for p in (first, second)]
        assert first.returncode == 0 and second.returncode == 0, "\n".join(o[-2000:] for o in outs)
        store.configure(url)
        exp = MlflowClient().get_experiment_by_name("domgen-benchmark")
        runs = store.runs_of(exp.experiment_id, "tags.`domgen.role` = 'configuration'", status=None)
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4, [(r.info.status, r.data.tags.get("domgen.error")) for r in runs]
    assert len({r.data.tags["domgen.config_hash"] for r in runs}) == 4  # no configuration trained twice, none closed by the other


def _server(db: Path, artifacts: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination",
                             str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no GenAI job runner beside it
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    raise AssertionError("mlflow server did not start")


def test_a_server_that_drops_mid_run_loses_no_finished_run(tiny_suite, tmp_path):
    from domgen.executors.ray_executor import free_port

    args, role = _commands(tiny_suite)["benchmark"]
    db, artifacts = tmp_path / "mlflow.db", tmp_path / "artifacts"
    port = free_port()
    server = _server(db, artifacts, port)
    url = f"http://127.0.0.1:{port}"
    driver = _start(args, tmp_path, url)
    deadline = time.monotonic() + 400
    while not [r for r in _work(_runs(db), role) if r[1] == "FINISHED"]:
        assert driver.poll() is None, driver.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    finished_before = {r[0] for r in _work(_runs(db), role) if r[1] == "FINISHED"}
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    _, stderr = driver.communicate(timeout=300)
    lines = [line for line in stderr.splitlines() if line.strip() and not line[:4].isdigit()]  # MLflow's own log lines start with a date
    assert driver.returncode == 2 and lines[-1].startswith("error: the MLflow tracking store") and "Traceback" not in stderr, stderr[-2000:]
    server = _server(db, artifacts, port)
    try:
        again = subprocess.run([sys.executable, "-m", "domgen.cli", *args, "--tracking-uri", url], cwd=tmp_path,
                               env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert again.returncode == 0, again.stderr[-3000:]
    finished = [r for r in _work(_runs(db), role) if r[1] == "FINISHED"]
    assert finished_before <= {r[0] for r in finished} and len(finished) == len({r[2] for r in finished}) == 4
