"""Evaluation: whole-image and sliding-window inference, and metrics from a confusion matrix.

mIoU is the mean over classes that appear in the ground truth or the predictions (union > 0), as mmseg
computes it; pixel accuracy counts every labelled pixel.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import IGNORE_INDEX, Source
from .data.transforms import EvalTransform
from .model import ModelMeta

__all__ = ["ConfusionMatrix", "evaluate", "infer", "metrics_from_confusion"]

logger = logging.getLogger(__name__)

# What a user with photos but no masks can do instead of eval.
EVAL_HINT = "; to compare an exported artifact with the float model on photos, use segformer-edge verify --data"


class ConfusionMatrix:
    """Accumulates a (K, K) confusion matrix (rows: ground truth, columns: prediction), int64."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray | Tensor, target: np.ndarray | Tensor) -> None:
        pred = _labels(pred)
        target = _labels(target)
        keep = target != IGNORE_INDEX
        k = self.num_classes
        counts = torch.bincount(target[keep] * k + pred[keep], minlength=k * k)
        self.matrix += counts.reshape(k, k).cpu().numpy()

    def metrics(self, class_names: list[str] | None = None) -> dict[str, Any]:
        return metrics_from_confusion(self.matrix, class_names)


def _labels(x: np.ndarray | Tensor) -> Tensor:
    """Flat int64 labels from a numpy array or tensor (copied: numpy inputs may be read-only)."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.array(x, dtype=np.int64).reshape(-1))
    return x.reshape(-1).long()


def metrics_from_confusion(matrix: np.ndarray, class_names: list[str] | None = None) -> dict[str, Any]:
    """mIoU, per-class IoU, pixel accuracy and mean class accuracy of a confusion matrix."""
    matrix = matrix.astype(np.float64)
    tp = np.diag(matrix)
    gt, pred = matrix.sum(1), matrix.sum(0)
    union = gt + pred - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    names = class_names or [str(i) for i in range(len(tp))]
    total = matrix.sum()
    return {
        "miou": float(np.nanmean(iou)) if np.any(union > 0) else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "mean_accuracy": float(np.nanmean(acc)) if np.any(gt > 0) else float("nan"),
        "per_class_iou": {n: (None if math.isnan(v) else float(v)) for n, v in zip(names, iou)},
        "pixels": int(total),
    }


@torch.no_grad()
def infer(
    model: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    num_classes: int,
    *,
    mode: str = "whole",
    crop: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
) -> Tensor:
    """Logits upsampled to the input size: ``(B, 3, H, W)`` -> ``(B, K, H, W)``.

    ``mode="slide"`` runs overlapping ``crop`` windows every ``stride`` pixels and averages them (mmseg's
    slide inference), for images larger than the training crop.
    """
    b, _, h, w = x.shape
    if mode == "whole":
        return F.interpolate(model(x), size=(h, w), mode="bilinear", align_corners=False)
    if mode != "slide":
        raise ValueError(f"unknown inference mode {mode!r}; choose whole or slide")
    if crop is None:
        raise ValueError("slide inference needs a crop size")
    ch, cw = crop
    sh, sw = stride or (max(1, ch * 2 // 3), max(1, cw * 2 // 3))
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    logits = x.new_zeros((b, num_classes, h, w))
    count = x.new_zeros((1, 1, h, w))
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh, max(h - ch, 0)), min(c * sw, max(w - cw, 0))
            y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
            window = x[:, :, y1:y2, x1:x2]
            out = F.interpolate(model(window), size=window.shape[2:], mode="bilinear", align_corners=False)
            logits[:, :, y1:y2, x1:x2] += out
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def evaluate(
    model: nn.Module,
    source: Source,
    meta: ModelMeta,
    *,
    mode: str = "whole",
    size: tuple[int, int] | None = None,
    device: str | torch.device = "cpu",
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
    shard: tuple[int, int] = (0, 1),
    reduce: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy of ``model`` on ``source``.

    In ``whole`` mode each image is resized to ``size`` (when given) and the prediction is resized back to
    the mask; in ``slide`` mode the image keeps its size and windows of ``meta.input_size`` are used.
    ``shard=(rank, world)`` evaluates every ``world``-th image from ``rank``; ``reduce`` then sums the ranks'
    confusion matrices (an all_reduce), so that the metrics are those of the whole set.
    """
    labels = source.require_masks("eval", EVAL_HINT)
    if labels.num_classes != model.config.num_classes:
        from .errors import DataError

        raise DataError(
            f"{source.name}: the data has {labels.num_classes} classes but the model has "
            f"{model.config.num_classes}; evaluate on data with the model's classes"
        )
    transform = EvalTransform(meta.mean, meta.std, size if mode == "whole" else None)
    confusion = ConfusionMatrix(labels.num_classes)
    was_training = model.training
    model.eval()
    n = len(source) if limit is None else min(limit, len(source))
    rank, world = shard
    for i in range(rank, n, world):
        image, mask = source.load(i)
        x = torch.from_numpy(transform(image))[None].to(device)  # (1, 3, H, W)
        logits = infer(model, x, labels.num_classes, mode=mode, crop=meta.input_size)
        if logits.shape[2:] != mask.shape:
            logits = F.interpolate(logits, size=mask.shape, mode="bilinear", align_corners=False)
        confusion.update(logits.argmax(1).cpu(), torch.from_numpy(mask.astype(np.int64)))
        if progress is not None:
            progress(1)
    model.train(was_training)
    if reduce is not None:
        confusion.matrix = reduce(confusion.matrix)
    result = confusion.metrics(labels.classes)
    result["images"] = n
    result["mode"] = mode
    return result
