"""MLflow set-up and the run lookups that make every command resumable.

Default store: ``sqlite:///mlflow.db`` in the working directory, artifacts in ``./mlartifacts``;
``--tracking-uri`` points at any MLflow server (e.g. one on PostgreSQL shared by a Ray cluster).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from domgen.config import config_hash, flatten
from domgen.errors import DomgenError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG = "domgen."

for _noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent", "mlflow.utils.requirements_utils"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def configure(tracking_uri: str | None = None) -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id(name: str) -> str:
    """The id of experiment ``name``, created if needed (artifacts beside a local SQLite store)."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = mlflow.get_tracking_uri()
    location = None
    if uri.startswith("sqlite:"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel worker
        return client.get_experiment_by_name(name).experiment_id


def find_run(exp_id: str, config_hash: str, status: str | None = "FINISHED") -> Run | None:
    """The newest run of ``exp_id`` tagged with ``config_hash`` (and ``status``), or None."""
    query = f"tags.`domgen.config_hash` = '{config_hash}'"
    if status:
        query += f" and attributes.status = '{status}'"
    runs = MlflowClient().search_runs([exp_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def round_lookup(experiment: str, cfg: dict) -> tuple[str, str, str | None]:
    """(experiment id, config hash, id of the finished round with this config or None): the start of every family."""
    exp_id = experiment_id(experiment)
    h = config_hash(cfg)
    done = find_run(exp_id, h)
    return exp_id, h, done.info.run_id if done is not None else None


def runs_of(exp_id: str, query: str = "", status: str | None = "FINISHED") -> list[Run]:
    """All runs of an experiment matching an MLflow filter string (paged)."""
    if status:
        query = f"{query} and attributes.status = '{status}'" if query else f"attributes.status = '{status}'"
    out, token = [], None
    client = MlflowClient()
    while True:
        page = client.search_runs([exp_id], query, max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def tags(**values) -> dict[str, str]:
    """``domgen.<key>`` tags; None values are left out."""
    return {f"{TAG}{k}": str(v) for k, v in values.items() if v is not None}


@contextlib.contextmanager
def tracked_run(exp_id: str, name: str, cfg: dict, run_tags: dict[str, str], parent_run_id: str | None = None) -> Iterator[Run]:
    """Start a run (nested under ``parent_run_id``), log the whole resolved config as params.

    A run that raises is marked FAILED, so a re-run does not mistake it for finished work.
    """
    client = MlflowClient()
    all_tags = dict(run_tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=name, tags=all_tags)
    log_config(run.info.run_id, cfg)
    with finishing(run.info.run_id):
        yield run


@contextlib.contextmanager
def finishing(run_id: str) -> Iterator[str]:
    """Mark ``run_id`` FINISHED when the block ends; FAILED (KILLED on Ctrl-C), with the error as a tag, when it raises."""
    client = MlflowClient()
    try:
        yield run_id
    except BaseException as exc:
        client.set_tag(run_id, f"{TAG}error", f"{type(exc).__name__}: {exc}"[:5000])
        client.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def log_config(run_id: str, cfg: dict) -> None:
    """The whole resolved config as params (MLflow takes at most 100 a call and 6000 characters a value)."""
    items = [mlflow.entities.Param(k, v[:6000]) for k, v in flatten(cfg).items()]
    for start in range(0, len(items), 100):
        MlflowClient().log_batch(run_id, params=items[start:start + 100])


def start_or_resume_run(exp_id: str, name: str, cfg: dict, run_tags: dict[str, str]) -> tuple[str, bool]:
    """(run id, already finished) of the run tagged ``run_tags['domgen.config_hash']``.

    A finished one is returned as is; an unfinished one (crash, ``kill -9``) is reopened, not duplicated.
    """
    h = run_tags[f"{TAG}config_hash"]
    done = find_run(exp_id, h)
    if done is not None:
        return done.info.run_id, True
    old = find_run(exp_id, h, status=None)
    client = MlflowClient()
    if old is not None:
        client.update_run(old.info.run_id, status="RUNNING")
        return old.info.run_id, False
    run = client.create_run(exp_id, run_name=name, tags=run_tags)
    log_config(run.info.run_id, cfg)
    return run.info.run_id, False


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """Finite values only (NaN means 'undefined' and is left out)."""
    items = [mlflow.entities.Metric(k, float(v), int(time.time() * 1000), step or 0)
             for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
    for start in range(0, len(items), 500):
        MlflowClient().log_batch(run_id, metrics=items[start:start + 500])


def log_artifact_file(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    MlflowClient().log_artifact(run_id, str(path), artifact_path)


@contextlib.contextmanager
def artifact_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="domgen-") as tmp:
        yield Path(tmp)


def download_artifact(run_id: str, path: str, dest: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dest)))


def epoch_logger(run_id: str):
    """A ``train(on_epoch=...)`` callback logging each epoch's record as metrics at step = epoch."""
    return lambda record: log_metrics(run_id, {k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])


def set_tag(run_id: str, key: str, value: str) -> None:
    MlflowClient().set_tag(run_id, key, value)


def get_run(run_id: str) -> Run:
    """The run ``run_id``; an unknown id is one sentence, not an MLflow traceback."""
    try:
        return MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise DomgenError(f"run {run_id} does not exist in the tracking store {mlflow.get_tracking_uri()}; "
                          "copy a run id from `domgen ui` or the command's output") from None
