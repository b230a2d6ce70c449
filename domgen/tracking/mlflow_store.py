"""MLflow set-up and the run lookups that make every command resumable; every MLflow call of domgen goes here.

Default store: ``sqlite:///mlflow.db`` in the working directory, artifacts in ``./mlartifacts``;
``--tracking-uri`` points at any MLflow server (e.g. one on PostgreSQL shared by a Ray cluster).

Run lifecycle. A live run carries a lease: ``domgen.owner`` (host:pid) and ``domgen.heartbeat`` (epoch
seconds, refreshed every ``DOMGEN_HEARTBEAT_SECONDS`` by a thread). A run is stale when its owner process
is gone (same host) or its heartbeat is older than three periods; only stale runs are closed by a later
driver, so two drivers on one sweep never close each other's live runs. Ctrl-C and SIGTERM end a run
KILLED with ``domgen.interrupted = true`` (interrupted, not failed: a plain re-run does it again); an
exception ends it FAILED with ``domgen.error``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Iterator

# fail fast on an unreachable server instead of MLflow's default 7 retries x 120 s (set before mlflow reads them)
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
from mlflow.entities import Run, ViewType  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from domgen.config import flatten  # noqa: E402
from domgen.tracking.identity import config_hash  # noqa: E402
from domgen.errors import DomgenError  # noqa: E402
from domgen import interrupts  # noqa: E402
from domgen.interrupts import shield, shielded  # noqa: E402

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG = "domgen."
# MLflow 3 opens an experiment in its GenAI view (traces, token usage) unless told it holds model-training runs:
# the experiment tag says so where the UI reads it; where the UI has its GenAI / Model-training switch (3.x), the
# switch wins and is set by the page address, so domgen prints addresses with ``UI_VIEW``
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
UI_VIEW = "workflowType=machine_learning"
INTERRUPTED = f"{TAG}interrupted"
LEASE_PERIODS = 3  # a heartbeat older than this many periods means the owner is gone

for _noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent", "mlflow.utils.requirements_utils",
               "mlflow.tracking._tracking_service.client", "urllib3.connectionpool"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)


def _resolved(tracking_uri: str | None) -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def configure(tracking_uri: str | None = None) -> str:
    uri = _resolved(tracking_uri)
    mlflow.set_tracking_uri(uri)
    return uri


def tracking_uri() -> str:
    """The URI the store is configured with."""
    return mlflow.get_tracking_uri()


def ui_url(base: str, exp_id: str | None = None, run_id: str | None = None) -> str:
    """The MLflow UI address of a run, an experiment (or the experiment list) in its training-runs view."""
    run = f"/runs/{run_id}" if exp_id and run_id else ""
    return f"{base.rstrip('/')}/#/experiments{'/' + exp_id if exp_id else ''}{run}?{UI_VIEW}"


def run_address(run_id: str) -> str:
    """Where run ``run_id`` opens in the training-runs view: its address on an http(s) tracking server (which serves the
    UI too), else the `domgen ui` command for this store and the address that UI will serve. MLflow 3.17 reads the
    view from the address on every page, run pages included (the experiment tag only where it has no switch)."""
    from domgen.settings import TABLE, UI

    uri = tracking_uri()
    exp_id = get_run(run_id).info.experiment_id
    if uri.startswith(("http://", "https://")):
        return f"open it at {ui_url(uri, exp_id, run_id)}"
    # named unless it is ./mlflow.db (MLflow copies the configured URI into MLFLOW_TRACKING_URI, so that cannot tell)
    command = "domgen ui" + ("" if uri == _resolved(DEFAULT_TRACKING_URI) else f" --tracking-uri {uri}")
    base = f"http://127.0.0.1:{TABLE[(UI, 'port')].default}"
    return f"open it with `{command}`, then {ui_url(base, exp_id, run_id)}"


def check_store_exists(uri: str) -> None:
    """For commands that read runs: a local SQLite store that does not exist is one sentence (and is not created)."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise DomgenError(f"there is no MLflow store at {uri}; run an experiment first, or pass --tracking-uri of the store that holds the runs")


def check_server(uri: str, timeout: float = 5.0) -> None:
    """One sentence, within seconds, when an ``http(s)://`` tracking server does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as reply:
            if reply.status == 200:
                return
            problem = f"HTTP {reply.status}"
    except urllib.error.HTTPError as exc:
        problem = f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        problem = str(getattr(exc, "reason", exc)) or type(exc).__name__
    raise DomgenError(f"the MLflow tracking server {uri} does not answer ({problem}); start it "
                      "(`mlflow server --host 127.0.0.1 --port PORT`) or pass another --tracking-uri")


def versions() -> dict[str, str]:
    """The versions a run's numbers depend on; recorded as tags on every run."""
    out = {}
    for tag, package in (("domgen_version", "domgen"), ("smp_version", "segmentation_models_pytorch"), ("torch_version", "torch")):
        try:
            out[f"{TAG}{tag}"] = metadata.version(package.replace("_", "-")) if package != "torch" else __import__("torch").__version__
        except metadata.PackageNotFoundError:
            out[f"{TAG}{tag}"] = "unknown"
    return out


@shield
def experiment_id(name: str) -> str:
    """The id of experiment ``name``, created if needed (artifacts beside a local SQLite store), tagged so
    MLflow's UI shows the runs table."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        uri = mlflow.get_tracking_uri()
        location = None
        if uri.startswith("sqlite:"):
            location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name).resolve().as_uri()
        try:
            exp_id = client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except MlflowException:  # created meanwhile by a parallel worker
            exp_id = client.get_experiment_by_name(name).experiment_id
        return exp_id
    if exp.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
        for key, value in EXPERIMENT_KIND.items():  # experiments made by an older domgen
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


@shield
def get_experiment(name: str):
    """The experiment called ``name`` or None (never creates one)."""
    return MlflowClient().get_experiment_by_name(name)


@shield
def get_run(run_id: str, what: str = "run") -> Run:
    """The run ``run_id``, or one sentence when the store does not know it."""
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException:
        raise DomgenError(f"{what} {run_id} is not in the MLflow store at {mlflow.get_tracking_uri()}; pass the id of an "
                          "existing run (see `domgen ui`) or the right --tracking-uri") from None


@shield
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


@shield
def runs_of(exp_id: str, query: str = "", status: str | None = "FINISHED") -> list[Run]:
    """All runs of an experiment matching an MLflow filter string (paged)."""
    if status:
        query = f"{query} and attributes.status = '{status}'" if query else f"attributes.status = '{status}'"
    out, token = [], None
    client = MlflowClient()
    while True:
        page = client.search_runs([exp_id], query, max_results=1000, page_token=token, run_view_type=ViewType.ACTIVE_ONLY)
        out.extend(page)
        token = page.token
        if not token:
            return out


def tags(**values) -> dict[str, str]:
    """``domgen.<key>`` tags; None values are left out."""
    return {f"{TAG}{k}": str(v) for k, v in values.items() if v is not None}


@shield
def set_tag(run_id: str, key: str, value) -> None:
    MlflowClient().set_tag(run_id, key, str(value))


# ---------------------------------------------------------------- leases
def heartbeat_seconds() -> float:
    from domgen.settings import environment

    return environment("DOMGEN_HEARTBEAT_SECONDS") or 30.0


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _lease_tags() -> dict[str, str]:
    return {f"{TAG}owner": owner(), f"{TAG}heartbeat": f"{time.time():.3f}", f"{TAG}lease_seconds": f"{heartbeat_seconds():g}"}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(run: Run, now: float | None = None) -> bool:
    """A RUNNING run whose owner is gone: its process has died (same host) or its heartbeat is too old."""
    if run.info.status != "RUNNING":
        return False
    t = run.data.tags
    host, _, pid = t.get(f"{TAG}owner", "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
        return True
    try:
        beat, lease = float(t[f"{TAG}heartbeat"]), float(t.get(f"{TAG}lease_seconds", 30))
    except (KeyError, ValueError):
        return True  # no lease at all: written by a domgen without leases, and nobody refreshes it
    return (now or time.time()) - beat > LEASE_PERIODS * lease


@shield
def close_stale(runs: list[Run], reason: str) -> list[str]:
    """End the stale ones among ``runs`` as interrupted (KILLED); live ones of other drivers are left alone."""
    client, closed = MlflowClient(), []
    for run in runs:
        if run.info.run_id == _current_run_id() or not is_stale(run):
            continue
        client.set_tag(run.info.run_id, INTERRUPTED, "true")
        client.set_tag(run.info.run_id, f"{TAG}error", f"interrupted: {reason}")
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    return closed


def close_stale_of_hash(exp_id: str, h: str) -> list[str]:
    return close_stale(runs_of(exp_id, f"tags.`domgen.config_hash` = '{h}'", status="RUNNING"),
                       "its driver stopped (kill -9, crash or lost machine) while it ran")


def close_stale_children(exp_id: str, parent_id: str) -> list[str]:
    return close_stale(runs_of(exp_id, f"tags.`mlflow.parentRunId` = '{parent_id}'", status="RUNNING"),
                       "its driver stopped (kill -9, crash or lost machine) while it ran")


_local = threading.local()


def _current_run_id() -> str | None:
    return getattr(_local, "run_id", None)


class _Heartbeat:
    """Refreshes ``domgen.heartbeat`` of one run from a daemon thread until stopped."""

    def __init__(self, run_id: str) -> None:
        self.run_id, self.period = run_id, heartbeat_seconds()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"domgen-heartbeat-{run_id[:8]}", daemon=True)

    def _beat(self) -> None:
        client = MlflowClient()
        while not self.stop_event.wait(self.period):
            with contextlib.suppress(Exception):  # a missed beat is harmless; three in a row free the lease
                client.set_tag(self.run_id, f"{TAG}heartbeat", f"{time.time():.3f}")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)


# ---------------------------------------------------------------- runs
@shield(hold=True)  # a new run is handed over before a held Ctrl-C is raised
def _create(exp_id: str, name: str, cfg: dict, run_tags: dict[str, str], parent_run_id: str | None) -> Run:
    all_tags = {**run_tags, **versions(), **_lease_tags()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = MlflowClient().create_run(exp_id, run_name=name, tags=all_tags)
    log_config(run.info.run_id, cfg)
    return run


def _first(run: Run) -> tuple:
    return (run.info.start_time or 0, run.info.run_id)


@shield(hold=True)  # a new run is handed over before a held Ctrl-C is raised
def claim_run(exp_id: str, name: str, cfg: dict, run_tags: dict[str, str], parent_run_id: str | None = None) -> Run | None:
    """A new run for ``run_tags['domgen.config_hash']``, or None when that work is finished or live elsewhere.

    Stale attempts are closed first. Two drivers that create a run for the same hash at the same moment both
    look again afterwards; the later one (start time, then run id) deletes its run and returns None.
    """
    h = run_tags[f"{TAG}config_hash"]
    if find_run(exp_id, h) is not None:
        return None
    close_stale_of_hash(exp_id, h)
    if runs_of(exp_id, f"tags.`domgen.config_hash` = '{h}'", status="RUNNING"):
        return None
    run = _create(exp_id, name, cfg, run_tags, parent_run_id)
    rivals = [r for r in runs_of(exp_id, f"tags.`domgen.config_hash` = '{h}'", status=None)
              if r.info.run_id != run.info.run_id and r.info.status in ("RUNNING", "FINISHED")]
    if any(r.info.status == "FINISHED" or _first(r) < _first(run) for r in rivals):
        MlflowClient().delete_run(run.info.run_id)
        return None
    return run


@contextlib.contextmanager
def tracked_run(exp_id: str, name: str, cfg: dict, run_tags: dict[str, str], parent_run_id: str | None = None) -> Iterator[Run]:
    """Start a run (nested under ``parent_run_id``), log the whole resolved config as params; see ``finishing``."""
    run = _create(exp_id, name, cfg, run_tags, parent_run_id)
    with finishing(run.info.run_id):
        yield run


@contextlib.contextmanager
def finishing(run_id: str) -> Iterator[str]:
    """Hold the run's lease while the block runs; then FINISHED, or KILLED + ``domgen.interrupted`` on Ctrl-C /
    SIGTERM, or FAILED with the error as a tag."""
    client = MlflowClient()
    previous = _current_run_id()
    _local.run_id = run_id
    try:
        with _Heartbeat(run_id):
            interrupts.check()  # one held while the run was created ends it here, as interrupted
            yield run_id
    except BaseException as exc:
        interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
        # a second Ctrl-C while the run is being closed is dropped: the run is ending anyway
        with shielded(discard=True), contextlib.suppress(Exception):  # the store itself may be what failed
            if interrupted:
                client.set_tag(run_id, INTERRUPTED, "true")
            client.set_tag(run_id, f"{TAG}error", f"{type(exc).__name__}: {exc}"[:5000])
            client.set_terminated(run_id, "KILLED" if interrupted else "FAILED")
        raise
    finally:
        _local.run_id = previous
    with shielded():
        client.set_terminated(run_id, "FINISHED")


def is_interrupted(run: Run) -> bool:
    """KILLED runs are interrupted work (Ctrl-C, SIGTERM, a closed stale run), never failures."""
    return run.info.status == "KILLED" or run.data.tags.get(INTERRUPTED) == "true"


@shield
def log_config(run_id: str, cfg: dict) -> None:
    """The whole resolved config as params (MLflow takes at most 100 a call and 6000 characters a value)."""
    items = [mlflow.entities.Param(k, v[:6000]) for k, v in flatten(cfg).items()]
    for start in range(0, len(items), 100):
        MlflowClient().log_batch(run_id, params=items[start:start + 100])


@shield(hold=True)  # a new run is handed over before a held Ctrl-C is raised
def start_or_resume_run(exp_id: str, name: str, cfg: dict, run_tags: dict[str, str]) -> tuple[str, bool]:
    """(run id, already finished) of the run tagged ``run_tags['domgen.config_hash']``.

    A finished one is returned as is; an unfinished one (Ctrl-C, SIGTERM, ``kill -9``) is reopened, not
    duplicated, its stale children are closed (so only they are redone), and a change of domgen / smp
    version since it started is said on stderr and kept as a tag.
    """
    h = run_tags[f"{TAG}config_hash"]
    done = find_run(exp_id, h)
    if done is not None:
        return done.info.run_id, True
    old = find_run(exp_id, h, status=None)
    client = MlflowClient()
    if old is None:
        return _create(exp_id, name, cfg, run_tags, None).info.run_id, False
    run_id = old.info.run_id
    now = versions()
    changed = [f"{k[len(TAG):]} {old.data.tags[k]} -> {v}" for k, v in now.items() if k in old.data.tags and old.data.tags[k] != v]
    if changed:
        import click

        click.echo(f"warning: resuming run {run_id} with different versions ({'; '.join(changed)}); "
                   "its finished children keep the numbers of the old versions", err=True)
        client.set_tag(run_id, f"{TAG}resumed_with_versions", "; ".join(changed)[:5000])
    close_stale_children(exp_id, run_id)
    client.update_run(run_id, status="RUNNING")
    for key, value in _lease_tags().items():
        client.set_tag(run_id, key, value)
    return run_id, False


@shield
def end_run(run_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(run_id, status)


@shield
def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """Finite values only (NaN means 'undefined' and is left out)."""
    items = [mlflow.entities.Metric(k, float(v), int(time.time() * 1000), step or 0)
             for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
    for start in range(0, len(items), 500):
        MlflowClient().log_batch(run_id, metrics=items[start:start + 500])


@shield
def log_artifact_file(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    MlflowClient().log_artifact(run_id, str(path), artifact_path)


@shield
def log_artifact_folder(run_id: str, folder: Path, artifact_path: str | None = None) -> None:
    MlflowClient().log_artifacts(run_id, str(folder), artifact_path)


@shield
def metric_history(run_id: str, key: str) -> list:
    return MlflowClient().get_metric_history(run_id, key)


@contextlib.contextmanager
def artifact_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="domgen-") as tmp:
        yield Path(tmp)


@shield
def artifact_names(run_id: str, folder: str | None = None) -> list[str]:
    """The paths of the artifacts directly under ``folder`` (the run's root by default)."""
    return [f.path for f in MlflowClient().list_artifacts(run_id, folder)]


def download_artifact(run_id: str, path: str, dest: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dest)))


def epoch_logger(run_id: str):
    """A ``train(on_epoch=...)`` callback logging each epoch's record: numbers as metrics at step = epoch, text (the
    precision and memory format ``train`` resolved) as ``domgen.<key>`` tags, written when first seen or changed."""
    tagged: dict[str, str] = {}

    def log(record: dict) -> None:
        for key, value in record.items():
            if isinstance(value, str) and tagged.get(key) != value:
                set_tag(run_id, f"{TAG}{key}", value)
                tagged[key] = value
        log_metrics(run_id, {k: v for k, v in record.items() if k != "epoch" and not isinstance(v, str)}, step=record["epoch"])

    return log


def tracking_error(exc: BaseException) -> str | None:
    """One sentence for a fault of the tracking store itself (unreachable, failing, unknown run), else None."""
    import requests

    if isinstance(exc, MlflowException) or isinstance(exc, requests.exceptions.RequestException):
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return (f"the MLflow tracking store at {tracking_uri()} failed ({first}); finished runs are kept - "
                "re-run the same command when the store answers again")
    return None
