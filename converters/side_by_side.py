"""Several targets of one export run side by side, each in a worker process of its own.

A target's lowering is single-threaded Python (ExecuTorch's passes, litert-torch's, coremltools' MIL passes: most of
an int8 export's wall time at b2), so on a machine with cores to spare one target lowers while another calibrates or
verifies. Workers are spawned (a fresh interpreter: no forked OpenMP pool or native-runtime state) and share the
machine's cores between them (``torch.set_num_threads``). Each call's step lines come back to the caller's
``step`` through a queue; its result or its :class:`SegformerEdgeError` comes back as a value. Another exception
is a bug and is raised in the caller, with the worker's traceback.

Ctrl-C or SIGTERM in the caller stops the workers with SIGTERM, which they turn into the same clean stop
(:mod:`segformer_edge.interrupts`): an artifact being built is left as it was, never half-written.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from segformer_edge.errors import SegformerEdgeError

__all__ = ["default_jobs", "run_side_by_side", "shared_float_logits"]

logger = logging.getLogger(__name__)

Step = Callable[[str, str, bool], None]  # (task, what, done)

_events: Any = None  # the worker's queue of step events


def machine_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_jobs(targets: int) -> int:
    """Targets exported at once when the caller does not say: two where there are two targets and two cores (each
    worker holds one export's memory: a b5 int8 export peaks at ~7 GiB), else one."""
    return max(1, min(2, targets, machine_cores()))


def _start(events: Any, threads: int, targets: dict[str, Any]) -> None:
    """Worker initializer: its share of the cores, its step queue, the caller's targets as the caller registered
    them, and SIGTERM/SIGINT as a clean stop."""
    import torch

    from segformer_edge import interrupts

    from . import register

    global _events
    _events = events
    torch.set_num_threads(threads)
    for name, entry in targets.items():
        register(name, entry) if isinstance(entry, str) else register(entry)
    interrupts.install()


def _step(task: str, what: str, done: bool = False) -> None:
    _events.put((task, what, done))


def _call(fn: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[str, Any]:
    """Run one call in a worker: ("ok", its value) or ("error", the SegformerEdgeError it raised)."""
    try:
        return "ok", fn(**kwargs, step=_step)
    except SegformerEdgeError as exc:
        exc.__traceback__ = None
        return "error", exc


def run_side_by_side(fn: Callable[..., Any], calls: dict[str, dict[str, Any]], jobs: int, step: Step,
                     targets: dict[str, Any]) -> dict[str, tuple[str, Any]]:  # fmt: skip
    """``fn(**kwargs, step=...)`` for each named call, ``jobs`` at a time in spawned workers, in the order given.

    ``fn``, the keyword arguments and ``targets`` (name -> :func:`registry_entry`, registered in every worker) must
    pickle (``fn`` a module-level function, a target class one importable by its module and name). Returns, per
    name, ``("ok", value)`` or ``("error", exc)`` for a :class:`SegformerEdgeError`; any other exception of a call is
    raised here."""
    with shared_float_logits():
        return _run(fn, calls, jobs, step, targets)


@contextlib.contextmanager
def shared_float_logits() -> Iterator[None]:
    """Within this block, the float logits computed by this process and by the workers it spawns are left in one
    temporary folder for the others (:data:`.reference.SHARED_LOGITS_ENV`), removed on leaving. Opened before the
    calibration set is picked, the workers' verify reads the float logits that picking computed (the same photos at
    the same size): no worker runs the float model on them again. Where a block is already open, it is that one."""
    import tempfile

    from .reference import SHARED_LOGITS_ENV

    if os.environ.get(SHARED_LOGITS_ENV):
        yield
        return
    shared = tempfile.mkdtemp(prefix="segformer-edge-logits-")
    try:
        with _environ(SHARED_LOGITS_ENV, shared):  # the spawned workers inherit it
            yield
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _run(fn: Callable[..., Any], calls: dict[str, dict[str, Any]], jobs: int, step: Step,
         targets: dict[str, Any]) -> dict[str, tuple[str, Any]]:  # fmt: skip
    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    threads = max(1, machine_cores() // jobs)

    def relay() -> None:
        while (event := events.get()) is not None:
            step(*event)

    listener = threading.Thread(target=relay, name="export-steps", daemon=True)
    listener.start()
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start, initargs=(events, threads, targets))
    results: dict[str, tuple[str, Any]] = {}
    try:
        futures: dict[str, Future[tuple[str, Any]]] = {name: pool.submit(_call, fn, kwargs) for name, kwargs in calls.items()}
        for name, future in futures.items():
            results[name] = future.result()
    except BaseException:
        for process in list((getattr(pool, "_processes", None) or {}).values()):  # the workers stop cleanly on SIGTERM
            if process.is_alive():
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        events.put(None)
        listener.join()
    return results
