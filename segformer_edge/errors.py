"""Exceptions that carry a message a user can act on.

The CLI turns every :class:`SegformerEdgeError` into a one-line error and exit code 2 (bad input);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "DataError", "DeviceError", "ExportError", "SegformerEdgeError"]


class SegformerEdgeError(Exception):
    """Base class of the errors caused by the user's input (files, options, data)."""

    exit_code: int = 2


class CheckpointError(SegformerEdgeError, ValueError):
    """A checkpoint is missing, unreadable, of an unknown layout, or does not match the model."""


class DataError(SegformerEdgeError, ValueError):
    """A dataset, image or mask is missing, unreadable or inconsistent."""


class ExportError(SegformerEdgeError, RuntimeError):
    """A conversion to an edge runtime failed; the message names the target and, where known, the op."""


class DeviceError(SegformerEdgeError, RuntimeError):
    """A remote device (``--device ssh://...`` or ``adb``) cannot be reached, lacks what the run needs, or failed."""
