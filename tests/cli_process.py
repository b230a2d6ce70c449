"""`domgen` commands as processes of their own that start in milliseconds: forked (multiprocessing's forkserver) from
one process that has imported domgen, torch, timm and MLflow once, instead of the ~9 s each import takes on CI's two
cores. Each is a real process: domgen's own signal handlers, exit code, stderr and exit handlers; SIGKILL kills it.
For the tests that interrupt commands again and again; the plain re-run after them stays a fresh ``python -m``.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import sys
from pathlib import Path

# what a command imports before its first run; the fork inherits them (nothing is started: no thread, no client)
PRELOAD = ["domgen.cli", "domgen.families.leave_one_out", "domgen.families.transfer", "domgen.families.benchmark",
           "domgen.tracking.mlflow_store", "mlflow.store.tracking.sqlalchemy_store", "mlflow.tracking"]
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _run(args: list[str], env: dict, cwd: str, stderr: str) -> None:
    """In the forked process: the environment, folder and streams of ``python -m domgen.cli ARGS``, then its exit."""
    os.environ.update(env)
    os.chdir(cwd)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    from domgen.cli import main

    code = 0
    try:
        main(args=args, prog_name="domgen")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        atexit._run_exitfuncs()  # what the interpreter runs at a normal exit (MLflow's among them)
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


class CliProcess:
    """The subset of ``subprocess.Popen`` the tests use: ``pid``, ``poll()``, ``communicate()`` -> (None, stderr),
    ``returncode`` (negative for a signal, as Popen's)."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.stderr_path = Path(cwd) / f".stderr-{os.getpid()}-{id(self)}"
        self.process = _forkserver().Process(target=_run, args=(list(args), dict(env), str(cwd), str(self.stderr_path)))
        self.process.start()
        self.pid = self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def stderr_text(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def communicate(self, timeout: float | None = None) -> tuple[None, str]:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise TimeoutError(f"domgen {self.process} still running after {timeout} s")
        return None, self.stderr_text()


def start(args: list[str], cwd: Path, env: dict[str, str]) -> CliProcess:
    return CliProcess(args, cwd, env)
