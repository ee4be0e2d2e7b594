"""Exceptions that carry a message a user can act on.

The CLI turns every :class:`SegformerEdgeError` into a one-line error and exit code 2 (bad input);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CheckpointError",
    "DataError",
    "DeviceError",
    "ExportError",
    "ExportFailed",
    "OptionError",
    "SegformerEdgeError",
]


class SegformerEdgeError(Exception):
    """Base class of the errors caused by the user's input (files, options, data).

    It pickles with its attributes whatever its constructor takes: a target exported in a worker process
    (:mod:`segformer_edge.converters.side_by_side`) hands its error back as a value."""

    exit_code: int = 2

    def __reduce__(self) -> tuple[Any, ...]:
        return _restore, (type(self), self.args, dict(self.__dict__))


def _restore(cls: type[SegformerEdgeError], args: tuple[Any, ...], state: dict[str, Any]) -> SegformerEdgeError:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class CheckpointError(SegformerEdgeError, ValueError):
    """A checkpoint is missing, unreadable, of an unknown layout, or does not match the model."""


class DataError(SegformerEdgeError, ValueError):
    """A dataset, image or mask is missing, unreadable or inconsistent."""


class ExportError(SegformerEdgeError, RuntimeError):
    """A conversion to an edge runtime failed; the message names the target and, where known, the op."""


class DeviceError(SegformerEdgeError, RuntimeError):
    """A remote device (``--device ssh://...`` or ``adb``) cannot be reached, lacks what the run needs, or failed."""


class OptionError(SegformerEdgeError, ValueError):
    """An option (a keyword of the Python API, a flag of the CLI) is out of range or does not go with another.

    ``option`` is the CLI flag it names (``--size``): the CLI shows it as a usage error of that flag, exactly as
    Typer shows its own; the message is the same from Python and from the CLI.
    """

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class ExportFailed(SegformerEdgeError):
    """Some targets of a many-target export failed; the others landed.

    Attributes:
        targets: Every target asked for, in order.
        artifacts: The artifacts that landed, by target (``segformer_edge.api.Artifact``).
        errors: What each failed target raised, by target (a parity failure is a ``ParityFailed``: the
            artifact was kept aside as ``NAME.failed/``).
    """

    def __init__(self, targets: list[str], artifacts: dict[str, Any], errors: dict[str, SegformerEdgeError]) -> None:
        lines = "; ".join(str(exc) if str(exc).startswith(f"{name}") else f"{name}: {exc}" for name, exc in errors.items())
        super().__init__(f"{len(errors)} of {len(targets)} targets failed: {lines}")
        self.targets = targets
        self.artifacts = artifacts
        self.errors = errors
        self.exit_code = max(exc.exit_code for exc in errors.values())
