"""Ctrl-C and SIGTERM as one interruption, never in the middle of a write to the tracking store.

The CLI routes SIGINT and SIGTERM here. Outside a shielded block the signal raises ``KeyboardInterrupt``
at once (training stops where it is); inside one (an MLflow call, see ``tracking.mlflow_store``) it is held
and raised when the block ends, so the store is never left with a half-done transaction and the run can
still be marked interrupted.
"""
from __future__ import annotations

import contextlib
import functools
import signal
import threading
from typing import Iterator

_depth = 0
_pending: int | None = None


def _interrupt(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def on_signal(signum, frame) -> None:
    global _pending
    if _depth:
        _pending = signum
        return
    raise _interrupt(signum)


def install() -> dict:
    """Route SIGINT and SIGTERM here; returns the previous handlers (for ``restore``)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}


def restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def check() -> None:
    """Raise a held interruption now (the caller is at a point where it can be handled)."""
    global _pending
    if _pending is not None and not _depth and threading.current_thread() is threading.main_thread():
        signum, _pending = _pending, None
        raise _interrupt(signum)


@contextlib.contextmanager
def shielded(discard: bool = False, hold: bool = False) -> Iterator[None]:
    """Hold SIGINT / SIGTERM until the block ends (``discard``: drop one that arrives, the run is already ending;
    ``hold``: keep it held after the block, for a ``check()`` by the caller - e.g. once a new run is inside
    ``finishing``, which marks it interrupted)."""
    global _depth, _pending
    main = threading.current_thread() is threading.main_thread()
    if not main:
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if discard:
            _pending = None
        if _depth == 0 and _pending is not None and not hold:
            signum, _pending = _pending, None
            raise _interrupt(signum)


def shield(fn=None, *, hold: bool = False):
    """Decorator: ``fn`` runs shielded (``hold``: see ``shielded``)."""
    def wrap(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with shielded(hold=hold):
                return fn(*args, **kwargs)
        return wrapper
    return wrap(fn) if fn is not None else wrap
