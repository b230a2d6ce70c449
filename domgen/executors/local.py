"""The local executor: in this process (``workers=1``) or in N spawned worker processes."""
from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterator

from tqdm.auto import tqdm

from domgen.errors import DomgenError


@contextlib.contextmanager
def _stopping_workers(pool: ProcessPoolExecutor) -> Iterator[None]:
    """On Ctrl-C / SIGTERM of the driver, stop the workers at once instead of waiting for their trials: their runs
    are left RUNNING with a dead owner, which the next run of the command closes as interrupted and redoes."""
    try:
        yield
    except BaseException:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            with contextlib.suppress(Exception):
                process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise


class LocalExecutor:
    def __init__(self, workers: int = 1, address: str | None = None, device: str = "cpu", threads: int | None = None,
                 gpus_per_trial: float | None = None) -> None:
        if address:
            raise DomgenError("--address is for --executor ray; the local executor runs on this machine")
        if gpus_per_trial is not None:
            raise DomgenError("--gpus-per-trial is for --executor ray; the local executor's workers share this machine's GPU")
        self.workers = workers
        # the cores shared out between the trials, so N workers do not oversubscribe the CPU
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)

    @contextlib.contextmanager
    def tracking(self, uri: str) -> Iterator[str]:
        yield uri

    def map(self, fn: Callable[..., dict], jobs: list[dict], progress: bool = True, shared: object = None,
            desc: str = "configurations") -> Iterator[tuple[dict, dict | None, str | None]]:
        bar = tqdm(total=len(jobs), desc=desc, unit="run", disable=not progress)
        if shared is not None:
            fn = functools.partial(fn, shared=shared)
        try:
            if self.workers == 1:
                for job in jobs:
                    yield job, fn(job), None
                    bar.update()
            else:
                yield from self._pool(fn, jobs, bar)
        finally:
            bar.close()

    def _pool(self, fn, jobs: list[dict], bar) -> Iterator[tuple[dict, dict | None, str | None]]:
        queue = list(jobs)
        while queue:
            # spawn, not fork: torch and MLflow clients do not survive a fork
            with ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn")) as pool, _stopping_workers(pool):
                running = {}
                broken = False
                while (queue or running) and not broken:
                    while queue and len(running) < self.workers:
                        job = queue.pop(0)
                        running[pool.submit(fn, job)] = job
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        job = running.pop(future)
                        try:
                            yield job, future.result(), None
                        except BrokenProcessPool:
                            broken = True
                            yield job, None, ("a worker process died while this configuration ran (out of memory or a crash); "
                                              "re-run with --retry-failed")
                        bar.update()
                # a dead worker breaks the whole pool: the others in flight are reported, the rest go to a new pool
                for future, job in running.items():
                    yield job, None, "its worker pool broke while it ran (another configuration crashed); re-run with --retry-failed"
                    bar.update()
