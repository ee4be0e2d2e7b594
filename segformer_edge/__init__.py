"""segformer-edge: SegFormer from training to the edge.

The public API is imported lazily, so that ``import segformer_edge`` (and the CLI's ``--help``) does not
import torch: the model (:mod:`.model`, :mod:`.weights`) and the workflow of the CLI as Python functions
(:mod:`.api`: ``export``, ``verify``, ``calibrate``, ``bench``, ``predict``, ``open_artifact``).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "create_model": "segformer_edge.model",
    "SegFormer": "segformer_edge.model",
    "SegFormerConfig": "segformer_edge.model",
    "ModelMeta": "segformer_edge.model",
    "VARIANTS": "segformer_edge.model",
    "load_pretrained": "segformer_edge.weights",
    "save_checkpoint": "segformer_edge.weights",
    "export": "segformer_edge.api",
    "verify": "segformer_edge.api",
    "calibrate": "segformer_edge.api",
    "bench": "segformer_edge.api",
    "predict": "segformer_edge.api",
    "open_artifact": "segformer_edge.api",
    "Artifact": "segformer_edge.api",
    "ParityReport": "segformer_edge.api",
    "BenchRecord": "segformer_edge.api",
    "Predictions": "segformer_edge.api",
    "CalibrationSet": "segformer_edge.calibration.calibset",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:
    from .api import (
        Artifact,
        BenchRecord,
        CalibrationSet,
        ParityReport,
        Predictions,
        bench,
        calibrate,
        export,
        open_artifact,
        predict,
        verify,
    )
    from .model import VARIANTS, ModelMeta, SegFormer, SegFormerConfig, create_model
    from .weights import load_pretrained, save_checkpoint


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segformer_edge' has no attribute {name!r}")


class _Package(types.ModuleType):
    """``segformer_edge.predict`` is the API's function, although a submodule has that name too.

    Importing a submodule binds it on its package; for ``predict`` that binding is dropped, so the name stays the
    function (served by ``__getattr__``). The module itself is reached as always: ``from segformer_edge.predict
    import ...``, or ``sys.modules["segformer_edge.predict"]``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "predict" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    """``segformer_edge.converters`` and ``segformer_edge.calibration`` for a checkout run as it is.

    DESIGN.md's layout keeps converters/ and calibration/ at the repository's root, and an install maps them into
    this package (pyproject's package-dir). A run from the source tree (``PYTHONPATH=.``, as on a training machine
    that has its own torch and none of the edge stack) has no such mapping: this finder gives the two names their
    folders, and nothing else. It sits after every other finder, so an installed package always wins.
    """

    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        init = folder / "__init__.py"
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(folder)])


def _install_source_tree_finder() -> None:
    root = Path(__file__).resolve().parent.parent
    folders = {f"{__name__}.{name}": root / name for name in ("converters", "calibration")}
    if not all((folder / "__init__.py").is_file() for folder in folders.values()):
        return  # an installed copy: the subpackages live inside it
    if any(isinstance(finder, _SourceTreeFinder) for finder in sys.meta_path):
        return
    sys.meta_path.append(_SourceTreeFinder(folders))


_install_source_tree_finder()
