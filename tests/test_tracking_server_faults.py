"""A real ``mlflow server`` under the benchmark: two drivers on one sweep train each configuration once and never
close each other's live runs; a server that drops mid-run loses no finished run, and a plain re-run finishes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from mlflow.tracking import MlflowClient

from domgen.executors.ray_executor import free_port, start_tracking_server, tracking_server
from domgen.tracking import mlflow_store as store
from test_interruptions import ENV, _commands, _runs, _start, _work
from stores import sqlite_store


def test_two_drivers_on_one_sweep_share_the_work(tiny_suite, tmp_path):
    """Against a real `mlflow server`: two drivers started a moment apart train each configuration once."""
    args, role = _commands(tiny_suite)["benchmark"]
    db = tmp_path / "mlflow.db"
    with tracking_server(sqlite_store(db), tmp_path / "artifacts") as url:
        first = _start(args, tmp_path, url)
        deadline = time.monotonic() + 300
        while not [r for r in _work(_runs(db), role) if r[1] == "RUNNING"]:
            assert first.poll() is None, first.stderr_text()[-2000:]
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


def test_a_server_that_drops_mid_run_loses_no_finished_run(tiny_suite, tmp_path):
    args, role = _commands(tiny_suite)["benchmark"]
    db = tmp_path / "mlflow.db"
    port = free_port()
    server, url, log = start_tracking_server(sqlite_store(db), tmp_path / "artifacts", port)
    driver = _start(args, tmp_path, url)
    deadline = time.monotonic() + 400
    while not [r for r in _work(_runs(db), role) if r[1] == "FINISHED"]:
        assert driver.poll() is None, driver.stderr_text()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    finished_before = {r[0] for r in _work(_runs(db), role) if r[1] == "FINISHED"}
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    _, stderr = driver.communicate(timeout=300)
    lines = [line for line in stderr.splitlines() if line.strip() and not line[:4].isdigit()]  # MLflow's own log lines start with a date
    assert driver.returncode == 2 and lines[-1].startswith("error: the MLflow tracking store") and "Traceback" not in stderr, stderr[-2000:]
    os.unlink(log)
    with tracking_server(f"sqlite:///{db}", tmp_path / "artifacts", port):  # the same URL again
        again = subprocess.run([sys.executable, "-m", "domgen.cli", *args, "--tracking-uri", url], cwd=tmp_path,
                               env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    finished = [r for r in _work(_runs(db), role) if r[1] == "FINISHED"]
    assert finished_before <= {r[0] for r in finished} and len(finished) == len({r[2] for r in finished}) == 4
