"""Keeping third-party chatter off the terminal: converters and runtimes write to a log file instead.

Converters print from Python (warnings, progress bars, ``print``) and from C++ (absl, XNNPACK, cpuinfo)
straight to file descriptors 1 and 2, so :class:`OutputCapture` redirects the descriptors themselves, and
``sys.stdout``/``sys.stderr`` (which are not those descriptors in a notebook or under a test's capture),
Python's logging and warnings with them, into a log file for the duration of one export. The caller's own
progress lines are written while the capture is paused (:meth:`OutputCapture.paused`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TextIO

__all__ = ["OutputCapture"]


class OutputCapture:
    """Redirect fds 1 and 2, ``sys.stdout``/``sys.stderr``, Python logging (INFO and up) and warnings into
    ``path`` (appending)."""

    def __init__(self, path: str | os.PathLike[str], *, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._saved: tuple[int, int] | None = None  # the terminal's fds 1 and 2
        self._streams: tuple[TextIO, TextIO] | None = None  # the caller's sys.stdout and sys.stderr
        self._log: int | None = None
        self._text: TextIO | None = None  # the log file as a text stream
        self._handler: logging.Handler | None = None
        self._root_level = logging.WARNING
        self._warnings: contextlib.ExitStack | None = None

    def __enter__(self) -> OutputCapture:
        if not self.enabled:
            return self
        self._log = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._saved = (os.dup(1), os.dup(2))
        self._streams = (sys.stdout, sys.stderr)
        self._text = open(self._log, "w", closefd=False, buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
        self._redirect()
        root = logging.getLogger()
        self._handler = logging.StreamHandler(self._text)  # type: ignore[arg-type]
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._handler.setLevel(logging.INFO)
        self._root_level = root.level
        root.addHandler(self._handler)
        root.setLevel(min(root.level or logging.WARNING, logging.INFO))
        self._terminal_handlers = [h for h in root.handlers if h is not self._handler]
        for handler in self._terminal_handlers:  # the terminal's handlers see nothing while captured
            handler.addFilter(_drop_all)
        self._warnings = contextlib.ExitStack()
        self._warnings.enter_context(warnings.catch_warnings())
        warnings.simplefilter("default")
        logging.captureWarnings(True)
        return self

    def _redirect(self) -> None:
        _flush()
        os.dup2(self._log, 1)  # type: ignore[arg-type]
        os.dup2(self._log, 2)  # type: ignore[arg-type]
        sys.stdout = sys.stderr = self._text  # type: ignore[assignment]

    def _restore(self) -> None:
        _flush()
        os.dup2(self._saved[0], 1)  # type: ignore[index]
        os.dup2(self._saved[1], 2)  # type: ignore[index]
        sys.stdout, sys.stderr = self._streams  # type: ignore[misc]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Write to the real terminal for a moment (progress lines)."""
        if not self.enabled or self._saved is None:
            yield
            return
        self._restore()
        try:
            yield
        finally:
            self._redirect()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self.enabled or self._saved is None:
            return
        logging.captureWarnings(False)
        if self._warnings is not None:
            self._warnings.close()
        root = logging.getLogger()
        if self._handler is not None:
            self._handler.flush()
            root.removeHandler(self._handler)
        for handler in self._terminal_handlers:
            handler.removeFilter(_drop_all)
        root.setLevel(self._root_level)
        self._restore()
        self._text.close()  # type: ignore[union-attr]
        for fd in (*self._saved, self._log):
            os.close(fd)  # type: ignore[arg-type]
        self._saved = None


def _drop_all(record: logging.LogRecord) -> bool:
    return False


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()  # type: ignore[union-attr]
