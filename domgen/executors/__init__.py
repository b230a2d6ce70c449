"""Executors: where the configurations of a sweep run. One registry, names -> small classes.

Every executor offers the same two things:

- ``tracking(uri)``: a context manager yielding the MLflow tracking URI its workers log to;
- ``map(fn, jobs, progress, shared=None, desc=...)``: runs ``fn(job)`` (``fn(job, shared=shared)`` when
  ``shared`` is given: data every job reads, sent to each worker once) for every job and yields
  ``(job, result, error)`` as they finish, ``error`` being a one-line reason when the worker itself died
  (``fn`` records its own failures).

``threads`` is how many torch threads one trial gets; ``gpus_per_trial`` (Ray only) how much of a GPU: 0.25 puts
four small trials on one GPU at once.
"""
from __future__ import annotations

import math

from domgen.errors import DomgenError
from domgen.executors.local import LocalExecutor
from domgen.executors.ray_executor import RayExecutor

EXECUTORS = {"local": LocalExecutor, "ray": RayExecutor}


def check_gpus_per_trial(gpus_per_trial: float | None, device: str) -> float | None:
    """``--gpus-per-trial`` as Ray takes it: a fraction in (0, 1] or a whole number of GPUs, and only with CUDA."""
    if gpus_per_trial is None:
        return None
    value = float(gpus_per_trial)
    if not math.isfinite(value) or value < 0 or (value > 1 and not value.is_integer()):
        raise DomgenError(f"--gpus-per-trial {gpus_per_trial:g}: give a fraction in (0, 1] (0.25: four trials share a GPU) "
                          "or a whole number of GPUs")
    if value > 0 and device != "cuda":
        raise DomgenError(f"--gpus-per-trial needs --device cuda (it is {value:g} with --device {device}); leave it out on a CPU")
    if value == 0 and device == "cuda":
        raise DomgenError("--gpus-per-trial 0 with --device cuda gives a trial no GPU; give a fraction in (0, 1] or a whole number")
    return value


def get_executor(name: str, workers: int = 1, address: str | None = None, device: str = "cpu", threads: int | None = None,
                 gpus_per_trial: float | None = None):
    if name not in EXECUTORS:
        raise DomgenError(f"--executor {name} is not one of {', '.join(EXECUTORS)}")
    if workers < 1:
        raise DomgenError(f"--workers {workers}: give 1 or more")
    gpus_per_trial = check_gpus_per_trial(gpus_per_trial, device)
    return EXECUTORS[name](workers=workers, address=address, device=device, threads=threads, gpus_per_trial=gpus_per_trial)
