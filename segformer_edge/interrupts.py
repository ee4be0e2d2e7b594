"""SIGTERM and Ctrl-C that stop a command cleanly, even while third-party code runs.

A signal handler that raises ``KeyboardInterrupt`` at once can land anywhere: inside an ``import`` of a large
native package (TensorFlow, coremltools), where a half-initialised extension may abort the interpreter at exit,
or inside third-party ``try/except`` blocks that swallow it, so that the command goes on and commits. Here the
first signal is recorded first; it is raised at once only when the interpreter is not inside an import, and
otherwise re-checked every 0.2 s (SIGALRM) until the import has finished. Commit points (the atomic rename in
:mod:`segformer_edge.io`) call :func:`raise_if_interrupted`, so a signal whose exception some library swallowed
still stops the command before anything is replaced.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["install", "interrupted", "raise_if_interrupted", "restore"]

_RETRY_S = 0.2
_state = {"signum": 0}


def interrupted() -> bool:
    """True once SIGTERM or SIGINT has been received by a process that called :func:`install`."""
    return bool(_state["signum"])


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if a stop signal has been received (call before anything is committed)."""
    if _state["signum"]:
        raise KeyboardInterrupt(f"signal {_state['signum']}")


def _in_import(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _state["signum"] = _state["signum"] or signum
    if _in_import(frame) and hasattr(signal, "setitimer"):
        signal.setitimer(signal.ITIMER_REAL, _RETRY_S)  # raise once the import has returned
        return
    raise KeyboardInterrupt(f"signal {_state['signum']}")


def _on_retry(signum: int, frame: FrameType | None) -> None:
    if _state["signum"]:
        _on_signal(_state["signum"], frame)


def install() -> dict[int, Any]:
    """Route SIGTERM and SIGINT through the deferred handler (main thread only; a no-op elsewhere).

    Returns the handlers it replaced, for :func:`restore` (a command run in-process, as tests do, leaves the
    host's handlers as it found them)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    _state["signum"] = 0
    signals = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGALRM] if hasattr(signal, "SIGALRM") else [])
    previous = {int(s): signal.getsignal(s) for s in signals}
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, _on_retry)
    return previous


def restore(previous: dict[int, Any]) -> None:
    """Put back the handlers that :func:`install` replaced (and cancel a pending re-check)."""
    if not previous:
        return
    if hasattr(signal, "setitimer"):
        signal.setitimer(signal.ITIMER_REAL, 0)
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
