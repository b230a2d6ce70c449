"""A family's independent units of work through an executor: the folds of leave-one-out and cross-validate,
the pretraining runs and fold x strategy runs of transfer.

``--executor ray --workers N`` (or ``--executor local --workers N``) sends them where the benchmark sends its
configurations (``domgen.executors``). Each unit finds its finished runs by their config hashes and logs to
one MLflow store (for Ray, a tracking server: the executor starts one over a local SQLite store); the
driver keeps the round's parent run and writes the tables once every unit is done. With the default
(``--executor local --workers 1``) the units run in this process one after the other, as they always did.

The numbers do not depend on where a unit runs: every unit seeds itself (seed + fold). They can depend on
the torch thread count of the CPU kernels, so give ``threads`` (``--set threads=1``) when two runs are to be
compared digit for digit.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Callable, Iterator

from domgen import interrupts
from domgen.errors import DomgenError
from domgen.executors.local import LocalExecutor
from domgen.tracking import mlflow_store as store


def in_process(runner) -> bool:
    """True when the units run in this process (no executor, or the local one with a single worker)."""
    return runner is None or (isinstance(runner, LocalExecutor) and runner.workers == 1)


@contextlib.contextmanager
def shared_store(runner, experiment: str) -> Iterator[str]:
    """The tracking URI every unit logs to, configured for the block: the store as it is, or (Ray) a server over it."""
    uri = store.tracking_uri()
    if in_process(runner):
        yield uri
        return
    # created through the configured store first, so a local SQLite store keeps file artifacts behind a server
    store.experiment_id(experiment)
    try:
        with runner.tracking(uri) as shared:
            store.configure(shared)
            yield shared
    finally:
        store.configure(uri)


def for_units(runner, r):
    """``r`` (a dataclass with a ``progress`` field) as the units get it: as it is in this process, without progress
    bars in workers (those of several processes would interleave)."""
    return r if in_process(runner) else replace(r, progress=False)


def run_units(runner, fn: Callable[[dict, object], None], jobs: list[dict], shared: object = None, what: str = "unit",
              progress: bool = True) -> None:
    """``fn(job, shared)`` for every job (each names itself in ``job["name"]``).

    In this process an error ends the command at once, as it always did. In workers, a failed unit is
    recorded by its own run (FAILED, with the error as a tag); the others go on, and the command then stops
    with one sentence naming the first failure. Re-running the same command redoes only what did not finish."""
    if in_process(runner):
        for job in jobs:
            fn(job, shared)
        return
    uri = store.tracking_uri()
    sent = [{"fn": fn, "job": job, "index": i, "tracking_uri": uri, "threads": runner.threads} for i, job in enumerate(jobs)]
    failed = {}
    for unit, result, error in runner.map(_in_worker, sent, progress=progress, shared=shared, desc=f"{what}s"):
        reason = error or (result or {}).get("error")
        if reason:
            failed[unit["index"]] = f"{unit['job']['name']}: {reason}"
    if failed:  # the first failure in the order of the jobs, whichever finished first
        raise DomgenError(f"{len(failed)} of {len(jobs)} {what}s failed ({failed[min(failed)]}); fix the cause and re-run the "
                          f"same command: the finished {what}s are kept")


def _in_worker(unit: dict, shared: object = None) -> dict:
    """One unit in a worker process: the shared store, Ctrl-C / SIGTERM handling and its share of the cores."""
    import torch

    store.configure(unit["tracking_uri"])
    interrupts.install()  # SIGTERM from a stopping driver ends the unit's run as interrupted, redone on the next run
    torch.set_num_threads(int(unit["threads"]))
    try:
        unit["fn"](unit["job"], shared)
    except Exception as exc:  # recorded on the unit's run by store.finishing; reported to the driver here
        return {"error": str(exc) if isinstance(exc, DomgenError) else f"{type(exc).__name__}: {exc}"[:500]}
    return {}
