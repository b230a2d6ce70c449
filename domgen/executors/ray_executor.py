"""The Ray executor: one Ray task per configuration (with ``--device cuda`` one GPU each, or the fraction
``--gpus-per-trial`` gives: 0.25 runs four trials on one GPU), every task logging to a shared MLflow tracking server.

A local SQLite file cannot be shared safely by many writers on many machines, so Ray needs an
``http(s)://`` tracking URI. On a single machine without ``--address`` domgen starts ``mlflow server``
on 127.0.0.1 over the SQLite store for the duration of the sweep; on a cluster, start one yourself
(docs/cluster.md: MLflow on PostgreSQL) and pass ``--tracking-uri``.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

from tqdm.auto import tqdm

from domgen.errors import DomgenError


# domgen's MLflow servers run without MLflow's job runner (a second process for GenAI jobs domgen never submits):
# faster to start and to stop
NO_JOB_RUNNER = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tracking_server(backend_uri: str, artifacts: Path, port: int | None = None,
                          timeout: float = 120.0) -> tuple[subprocess.Popen, str, str]:
    """Start ``mlflow server`` on 127.0.0.1 over ``backend_uri`` (artifacts served from ``artifacts``) and wait until it
    answers: (its process, in a session of its own; its URL; its log file, which the caller removes)."""
    port = port or free_port()
    artifacts.mkdir(parents=True, exist_ok=True)
    log = tempfile.NamedTemporaryFile(prefix="domgen-mlflow-server-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **NO_JOB_RUNNER})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return process, url, log.name
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.terminate()
            process.wait()
            tail = Path(log.name).read_text(errors="replace")[-800:]
            os.unlink(log.name)
            raise DomgenError(f"could not start `mlflow server` on port {port} (log {log.name}): {tail.strip().splitlines()[-1] if tail.strip() else 'no output'}")
        time.sleep(0.2)


@contextlib.contextmanager
def tracking_server(backend_uri: str, artifacts: Path, port: int | None = None, timeout: float = 120.0) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 over ``backend_uri`` (artifacts served from ``artifacts``); yields its URL."""
    process, url, log = start_tracking_server(backend_uri, artifacts, port, timeout)
    try:
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        os.unlink(log)


class RayExecutor:
    def __init__(self, workers: int = 1, address: str | None = None, device: str = "cpu", threads: int | None = None,
                 gpus_per_trial: float | None = None) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise DomgenError("--executor ray needs Ray: pip install 'domgen[ray]' (or 'ray[default]')") from None
        self.workers, self.address, self.device = workers, address, device
        # a trial's CPU share: on a cluster one GPU and a few cores each; locally the cores split between the workers
        self.threads = threads or (1 if address else max(1, (os.cpu_count() or 1) // workers))
        # a trial's GPU share (Ray schedules fractions): one whole GPU with CUDA unless --gpus-per-trial says less
        self.gpus_per_trial = gpus_per_trial if gpus_per_trial is not None else (1 if device == "cuda" else 0)

    def task_options(self) -> dict:
        """The resources each configuration's Ray task asks for."""
        return {"num_cpus": self.threads, "num_gpus": self.gpus_per_trial, "max_retries": 0}

    @contextlib.contextmanager
    def tracking(self, uri: str) -> Iterator[str]:
        if uri.startswith(("http://", "https://")):
            yield uri
            return
        if self.address or not uri.startswith("sqlite:///"):
            raise DomgenError(f"--executor ray needs a shared MLflow tracking server, not {uri}; start `mlflow server "
                              "--backend-store-uri postgresql://... --host 0.0.0.0` and pass --tracking-uri http://HOST:5000 (docs/cluster.md)")
        db = Path(uri[len("sqlite:///"):])
        with tracking_server(uri, db.parent / "mlartifacts") as url:
            yield url

    def map(self, fn: Callable[..., dict], jobs: list[dict], progress: bool = True, shared: object = None,
            desc: str = "configurations") -> Iterator[tuple[dict, dict | None, str | None]]:
        import ray

        started_here = not ray.is_initialized()
        if started_here:
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                # GPUs: Ray detects them; each task asks for gpus_per_trial, so at most GPUs / that many trials share them
                ray.init(num_cpus=self.workers * self.threads, num_gpus=None if self.device == "cuda" else 0,
                         include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024 ** 2)
        task = ray.remote(**self.task_options())(fn)
        bar = tqdm(total=len(jobs), desc=f"{desc} (ray)", unit="run", disable=not progress)
        # the data every job reads goes to the object store once, not once per job
        extra = {} if shared is None else {"shared": ray.put(shared)}
        pending = {task.remote(job, **extra): job for job in jobs}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(done[0])
                try:
                    yield job, ray.get(done[0]), None
                except ray.exceptions.RayError as exc:  # the worker died (OOM killer, segfault, node lost)
                    yield job, None, f"Ray task failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                bar.update()
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            bar.close()
            if started_here:
                ray.shutdown()
