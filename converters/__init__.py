"""Edge targets (installed as ``segformer_edge.converters``): one module per runtime plus this registry.

A target is registered by name with the import path of its class; nothing is imported until a target is
used, so the CLI can list targets without torch. Adding a target adds one line here and one module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from segformer_edge.errors import ExportError

if TYPE_CHECKING:
    from .base import Target

__all__ = ["TARGETS", "get_target", "register"]

TARGETS: dict[str, str] = {
    "executorch": "segformer_edge.converters.executorch:ExecuTorchTarget",
    "executorch-coreml": "segformer_edge.converters.executorch_coreml:ExecuTorchCoreMLTarget",
    "tflite": "segformer_edge.converters.tflite:TFLiteTarget",
    "coreml": "segformer_edge.converters.coreml:CoreMLTarget",
    "onnx": "segformer_edge.converters.onnx:OnnxTarget",
}


def register(name: str, path: str) -> None:
    """Register a target class by ``module:Class`` path (for plugins)."""
    TARGETS[name] = path


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ExportError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)} or all")
    module_name, class_name = TARGETS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()
