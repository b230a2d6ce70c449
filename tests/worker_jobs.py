"""Jobs the executor tests send to spawned worker processes. A worker imports the module a job is defined in; here
that is this light module, not a test file that imports torch, MLflow and the families (~10 s a worker on CI)."""
from __future__ import annotations

import os
import time

from domgen.errors import DomgenError


def fails_on_odd(job: dict, shared: dict) -> None:
    if job["i"] % 2:
        raise DomgenError(f"unit {job['i']} cannot read {shared['file']}")
    (shared["out"] / f"done-{job['i']}").touch()


def exit_or_square(job: dict) -> int:
    if job["action"] == "exit":
        os._exit(1)
    time.sleep(0.5)
    return job["x"] ** 2
