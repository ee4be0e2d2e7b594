"""segformer-edge: SegFormer from training to the edge.

The public API is imported lazily, so that ``import segformer_edge`` (and the CLI's ``--help``) does not
import torch.
"""

from __future__ import annotations

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
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:
    from .model import VARIANTS, ModelMeta, SegFormer, SegFormerConfig, create_model
    from .weights import load_pretrained, save_checkpoint


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segformer_edge' has no attribute {name!r}")
