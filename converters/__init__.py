"""Edge targets (installed as ``segformer_edge.converters``): one module per runtime, and this registry.

The registry is the only list of targets: the CLI's choices, ``--target all``, ``bench``, ``info`` and the
manifests read it. A target is registered by name with the import path of its class (nothing is imported
until it is used, so ``--help`` needs no torch), or as a class. Plugins register through the entry point
group ``segformer_edge.targets`` (``name = "package.module:TargetClass"``) and appear everywhere with no
edit to this project.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from segformer_edge.errors import ExportError

if TYPE_CHECKING:
    from .base import Target

__all__ = ["ENTRY_POINT_GROUP", "get_target", "register", "registry_entry", "target_names", "unregister"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "segformer_edge.targets"

_BUILTIN: dict[str, str] = {
    "executorch": "segformer_edge.converters.executorch:ExecuTorchTarget",
    "tflite": "segformer_edge.converters.tflite:TFLiteTarget",
    "coreml": "segformer_edge.converters.coreml:CoreMLTarget",
    "onnx": "segformer_edge.converters.onnx:OnnxTarget",
    "executorch-coreml": "segformer_edge.converters.executorch_coreml:ExecuTorchCoreMLTarget",
    "openvino": "segformer_edge.converters.openvino:OpenVINOTarget",
    "ethos-u": "segformer_edge.converters.ethos_u:EthosUTarget",
}
_registry: dict[str, str | type[Target]] = dict(_BUILTIN)
_plugins_loaded = False


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _registry:
            logger.warning("target plugin %s (%s) ignored: the name is taken", ep.name, ep.value)
            continue
        _registry[ep.name] = ep.value


def register(target: str | type[Target], path: str | None = None) -> None:
    """Register a target: ``register(MyTarget)`` (its ``name`` attribute) or ``register("name", "module:Class")``."""
    if isinstance(target, str):
        if path is None:
            raise ValueError("register(name, 'module:Class'): the import path is missing")
        _registry[target] = path
    else:
        if not target.name:
            raise ValueError(f"{target.__name__}: a target class needs a name")
        _registry[target.name] = target


def registry_entry(name: str) -> str | type[Target]:
    """What ``name`` is registered as (an import path or a class): what a worker process registers to see the same
    target, where it was registered in this process only."""
    _load_plugins()
    entry = _registry.get(name)
    if entry is None:
        raise ExportError(f"unknown target {name!r}; choose one of {', '.join(_registry)} or all")
    return entry


def unregister(name: str) -> None:
    _registry.pop(name, None)


def target_names(*, in_all: bool = False) -> list[str]:
    """Every registered target (``in_all``: only those ``--target all`` exports), built-ins first."""
    _load_plugins()
    names = list(_registry)
    return [n for n in names if get_target(n).in_all] if in_all else names


def get_target(name: str) -> Target:
    _load_plugins()
    entry = _registry.get(name)
    if entry is None:
        raise ExportError(f"unknown target {name!r}; choose one of {', '.join(_registry)} or all")
    if isinstance(entry, str):
        module_name, _, class_name = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise ExportError(f"target {name!r}: cannot import {module_name}:{class_name} ({exc})") from exc
    return entry()  # type: ignore[operator]
