"""Shared pieces of the CLI: consoles, option types and small parsers. Imports no torch.

The commands are a thin layer over :mod:`segformer_edge.api`: parse options, call it, print. :func:`api_options` shows
the API's option errors as Typer shows its own, :class:`StepProgress` draws the API's step callbacks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

STATE = {"debug": False, "verbose": False}  # the root options, for commands that need them
console = Console()
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]
StrictFlag = Annotated[
    bool,
    typer.Option("--strict", help="Stop at the first photo that does not read (default: skip it with one warning naming it)."),
]
SizeOption = Annotated[
    tuple[int, int] | None,
    typer.Option("--size", metavar="H W", help="Input height and width in pixels (each at least 32)."),
]
NumClassesOption = Annotated[
    int | None, typer.Option("--num-classes", "-k", min=1, help="Number of output classes.")
]
CheckpointArgument = Annotated[
    str | None,
    typer.Argument(
        help="A segformer-edge .safetensors, a Hugging Face folder, a Hugging Face Hub id (org/name or "
        "org/name@revision, from the local cache or downloaded once) or an NVlabs/mmseg .pth."
    ),
]


class LineLogHandler(logging.Handler):
    """Log records as one line each on the stderr console (``warning: photos/a.jpg: ...``), never wrapped into
    a column as rich's own handler does, so that a line names its file whole; printed above a live progress bar."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = f"{record.levelname.lower()}: {self.format(record)}"
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise from a handler
            self.handleError(record)


def check_size(size: tuple[int, int] | None, default: tuple[int, int], option: str = "--size") -> tuple[int, int]:
    """Validate an (H, W) option: both within 32..8192."""
    h, w = size or default
    if not (32 <= h <= 8192 and 32 <= w <= 8192):
        raise typer.BadParameter(f"{h}x{w} is out of range: height and width must be within 32..8192", param_hint=option)
    return h, w


def progress_bar(label: str, *, auto_refresh: bool = True):  # type: ignore[no-untyped-def]
    """A rich progress bar on stderr for long work (``auto_refresh=False``: it redraws only on ``refresh()``, for
    work whose output is captured meanwhile)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err_console,
        auto_refresh=auto_refresh,
    )


class StepProgress:
    """One progress line per target on stderr, showing the step it is in (plan, capture, quantize, lower, ...).

    Tasks named in ``transient`` (the calibration that comes before every target) show a spinner while they run,
    gone when they are done or when the command stops with an error. The lines start with the first other task.
    """

    def __init__(self, transient: tuple[str, ...] = ("calibration",)) -> None:
        from rich.progress import Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console,
                                 auto_refresh=False)  # fmt: skip
        self.lines: dict[str, Any] = {}
        self.transient = transient
        self.status: Any = None
        self.started = False

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_status()
        if self.started:
            self.progress.stop()

    def _stop_status(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def step(self, task: str, step: str, done: bool = False) -> None:
        """The API's step callback (``on_step``): one line per task, made when it is first heard of."""
        if task in self.transient and not self.started:
            if done:
                self._stop_status()
            elif self.status is None:
                self.status = err_console.status(f"{step} ...")
                self.status.start()
            else:
                self.status.update(f"{step} ...")
            return
        self._stop_status()
        if not self.started:
            self.progress.start()
            self.started = True
        if task not in self.lines:
            self.lines[task] = self.line(task)
        self.lines[task](step, done=done)

    def line(self, label: str):  # type: ignore[no-untyped-def]
        """A new line for ``label``; returns the function that sets its current step (``done=True``: its
        last word, which stops its clock)."""
        task = self.progress.add_task(label, total=1)

        def update(step: str, done: bool = False) -> None:
            self.progress.update(task, description=f"{label}: {step}", completed=1 if done else 0)
            self.progress.refresh()

        return update


def check_data(data: str | None, split: str, strict: bool) -> None:
    """Open ``--data`` before any work: a photo folder is decoded once here, so that a file that does not read
    is named once on the terminal (or, with ``--strict``, is the command's one-line error), before the
    converters' output is captured. Later passes over the same folder reuse the verdicts."""
    if data is None:
        return
    from segformer_edge.data import open_source

    open_source(data, split, strict=strict)


def step_progress() -> StepProgress:
    return StepProgress()


def resolve_checkpoint(path: str | Path | None) -> Path:
    """A local path for a checkpoint argument: a path, a Hub id (through the Hugging Face cache) or None (built-in).

    Raises:
        CheckpointError: no such path, or a Hub id that cannot be resolved (see ``segformer_edge.hub``).
    """
    from segformer_edge.api import checkpoint_path

    return checkpoint_path(path)


@contextlib.contextmanager
def api_options() -> Iterator[None]:
    """An option error of the API (:class:`~segformer_edge.errors.OptionError`) as a usage error of its flag, as Typer
    shows its own (exit code 2)."""
    from segformer_edge.errors import OptionError

    try:
        yield
    except OptionError as exc:
        raise typer.BadParameter(str(exc), param_hint=exc.option) from exc
