"""Executors: where the configurations of a sweep run. One registry, names -> small classes.

Every executor offers the same two things:

- ``tracking(uri)``: a context manager yielding the MLflow tracking URI its workers log to;
- ``map(fn, jobs, progress, shared=None, desc=...)``: runs ``fn(job)`` (``fn(job, shared=shared)`` when
  ``shared`` is given: data every job reads, sent to each worker once) for every job and yields
  ``(job, result, error)`` as they finish, ``error`` being a one-line reason when the worker itself died
  (``fn`` records its own failures).

``threads`` is how many torch threads one trial gets.
"""
from __future__ import annotations

from domgen.errors import DomgenError
from domgen.executors.local import LocalExecutor
from domgen.executors.ray_executor import RayExecutor

EXECUTORS = {"local": LocalExecutor, "ray": RayExecutor}


def get_executor(name: str, workers: int = 1, address: str | None = None, device: str = "cpu", threads: int | None = None):
    if name not in EXECUTORS:
        raise DomgenError(f"--executor {name} is not one of {', '.join(EXECUTORS)}")
    if workers < 1:
        raise DomgenError(f"--workers {workers}: give 1 or more")
    return EXECUTORS[name](workers=workers, address=address, device=device, threads=threads)
