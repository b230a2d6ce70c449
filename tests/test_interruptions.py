"""Every interruption survived: SIGINT, SIGTERM and SIGKILL mid-run, then a plain re-run of the same command
finishes with no duplicate and no lost finished run, in every family (the tracking server's faults:
``test_tracking_server_faults.py``, a file of its own so the two pytest workers share the load)."""
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

import cli_process

from domgen.tracking import mlflow_store as store
from stores import sqlite_store

ENV = {"HF_HUB_OFFLINE": "1", "DOMGEN_THREADS": "1", "DOMGEN_HEARTBEAT_SECONDS": "1"}


def _commands(suite: Path) -> dict[str, tuple[list[str], str]]:
    """family -> (command, the role of its work runs); tiny: 32 px, 1 epoch."""
    small = ["--quiet", "--set", "preprocessing.image_size=32", "--set", "train.epochs=1"]
    return {
        "benchmark": (["benchmark", "--suite", str(suite), "--experiments", "lung", "--archs", "linknet,pspnet",
                       "--encoders", "resnet18,mobilenet_v2", "--weights", "random", "--set", "evaluation.sample_slices=2", *small],
                      "configuration"),
        # two configuration groups of lung and lesion-a, each trained as one stacked model
        "benchmark-stacked": (["benchmark", "--suite", str(suite), "--experiments", "lung,lesion-a", "--archs", "linknet",
                               "--encoders", "resnet18,mobilenet_v2", "--weights", "random", "--stack", "2", "--set",
                               "train.device_data=true", "--set", "evaluation.sample_slices=2", *small], "configuration"),
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


def _start(args: list[str], cwd: Path, uri: str) -> cli_process.CliProcess:
    """``domgen ARGS`` as a process of its own, forked from one that imported domgen already (``cli_process``)."""
    return cli_process.start([*args, "--tracking-uri", uri], cwd, ENV)


# how many new runs must be live before the signal: a stacked group's runs end one after another, so while the first
# group closes one of its runs is still RUNNING for a moment with its work done; both of the next group's are live
# only while it trains
LIVE_AT_ONCE = {"benchmark-stacked": 2}


def _interrupt_mid_run(args, role, db: Path, uri: str, cwd: Path, sig, live_at_once: int = 1) -> set[str]:
    """Start the command, send ``sig`` while ``live_at_once`` of its work runs are live (new ones, after one has
    finished); returns the ids of the runs finished before the signal."""
    seen = {r[0] for r in _runs(db)}
    proc = _start(args, cwd, uri)
    deadline = time.monotonic() + 400
    while True:
        runs = _work(_runs(db), role)
        if (any(r[1] == "FINISHED" for r in runs)
                and sum(r[1] == "RUNNING" and r[0] not in seen for r in runs) >= live_at_once):
            break
        assert proc.poll() is None, f"ended before it could be interrupted: {proc.stderr_text()[-2000:]}"
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


@pytest.mark.parametrize("family", ["benchmark", "benchmark-stacked", "transfer", "leave-one-out"])
def test_sigterm_sigint_sigkill_then_a_plain_rerun_finishes_without_duplicates(family, tiny_suite, tmp_path):
    """SIGTERM mid-run, re-run and SIGINT mid-run, re-run and SIGKILL mid-run, then a plain re-run."""
    db = tmp_path / "mlflow.db"
    uri = sqlite_store(db)
    args, role = _commands(tiny_suite)[family]
    finished_before: set[str] = set()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
        finished_before |= _interrupt_mid_run(args, role, db, uri, tmp_path, sig, LIVE_AT_ONCE.get(family, 1))
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
