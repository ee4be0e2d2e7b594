"""Evaluation: whole-image and sliding-window inference, and metrics from a confusion matrix.

mIoU is the mean over classes that appear in the ground truth or the predictions (union > 0), as mmseg
computes it; pixel accuracy counts every labelled pixel. Without labels, :class:`ExpectedDrop` estimates what they
would say about a model that departs from the float model.
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

__all__ = ["ConfusionMatrix", "ExpectedDrop", "evaluate", "infer", "metrics_from_confusion"]

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


class ExpectedDrop:
    """What the labels would say, estimated without them: the float model's softmax taken as the posterior of
    each pixel's true class.

    Where the float model says class ``c`` with probability ``p_c``, a pixel predicted as ``c`` is right with
    probability ``p_c``. So a disagreement where the float model's top two classes were nearly tied costs almost
    nothing, and one where it was sure costs almost a whole pixel. Per class, the expected true-positive mass, the
    expected ground-truth mass and the predicted pixels give an expected IoU for the float model's masks and for
    the artifact's; their mean over classes (mmseg's: classes present in the ground truth or the prediction, the
    float model's predictions standing in for what the ground truth holds) gives an estimated mIoU of each, and
    the difference the **estimated mIoU drop**. The expected pixel accuracy of each gives the estimated pixel
    accuracy drop. The uncertainty from the images sampled is a bootstrap over images.

    benchmarks/NO_LABEL_PARITY.md measures this estimate against the label-based drop on trained many-class models
    whose labels are known, on good and on deliberately damaged artifacts.
    """

    BOOTSTRAP = 200  # resamples of the images for the standard error
    MIN_CLASS_SHARE = 0.005  # per-class figures only for classes on at least this share of the pixels

    def __init__(self, num_classes: int) -> None:
        self.k = num_classes
        self.rows: list[np.ndarray] = []  # per image: (8, K) float64, see update

    CHUNK = 1 << 16  # pixels per softmax: the (K, CHUNK) probabilities are all that is held at once

    def update(self, logits: torch.Tensor, float_mask: np.ndarray, artifact_mask: np.ndarray, broken: np.ndarray) -> None:
        """One image: the float model's logits at the input size (1, K, H, W), the float and artifact masks
        (1, H, W) compared at that size, and the pixels a NaN or inf reaches (1, H, W; never right).

        The softmax runs in float32 over chunks of pixels (a 150-class 512x512 image in double at once held 315 MB
        and was a third of a verify's time); the sums over pixels are float64."""
        k = self.k
        flat = logits[0].reshape(k, -1)  # (K, H*W)
        f = torch.from_numpy(np.asarray(float_mask, np.int64).reshape(-1))  # (H*W,)
        a = torch.from_numpy(np.asarray(artifact_mask, np.int64).reshape(-1))  # (H*W,)
        valid = (a >= 0) & (a < k) & ~torch.from_numpy(np.asarray(broken).reshape(-1))  # an invalid class is never right
        a_safe = torch.where(valid, a, torch.zeros_like(a))
        gt = torch.zeros(k, dtype=torch.float64)
        p_f = torch.empty(f.numel(), dtype=torch.float64)  # (H*W,) the probability that the float model's class is right
        p_a = torch.empty(f.numel(), dtype=torch.float64)  # (H*W,) ... and the artifact's
        top = torch.zeros(k, dtype=torch.float32)  # (K,) each class's likeliest pixel
        for start in range(0, f.numel(), self.CHUNK):
            part = slice(start, start + self.CHUNK)
            probs = torch.softmax(flat[:, part].float(), dim=0)  # (K, chunk)
            gt += probs.sum(1, dtype=torch.float64)
            p_f[part] = probs.gather(0, f[None, part])[0]
            p_a[part] = probs.gather(0, a_safe[None, part])[0] * valid[part]
            top = torch.maximum(top, probs.max(1).values)
        row = np.zeros((8, k))
        row[0] = gt.numpy()  # expected ground-truth pixels per class
        row[1] = torch.bincount(f, minlength=k).numpy()  # float: predicted pixels per class
        row[2] = torch.bincount(f, weights=p_f, minlength=k).numpy()  # float: expected true positives
        row[3] = torch.bincount(a_safe[valid], minlength=k).numpy()  # artifact: predicted pixels per class
        row[4] = torch.bincount(a_safe, weights=p_a, minlength=k).numpy()  # artifact: expected true positives
        row[5, 0], row[6, 0] = float(p_f.sum()), float(p_a.sum())  # expected right pixels (float, artifact)
        row[5, 1] = f.numel()
        # log P(class c absent from this image's ground truth) <= log(1 - max_i p_c(i)): its likeliest pixel alone
        row[7] = torch.log1p(-top.double().clamp(max=1 - 1e-9)).numpy()
        self.rows.append(row)

    @staticmethod
    def _miou(gt: np.ndarray, pred: np.ndarray, tp: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """Expected mIoU (...,): the expected IoU of each class from (..., K) masses, averaged with ``weight`` (...,
        K), the probability that a class takes part in the mean (it is predicted, or in the ground truth)."""
        iou = tp / np.maximum(gt + pred - tp, 1e-12)
        return (weight * iou).sum(-1) / np.maximum(weight.sum(-1), 1e-12)

    def _drops(self, sums: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Estimated mIoU of the float model and of the artifact, and the pixel accuracy drop, from (..., 8, K)."""
        gt, pf, tpf, pa, tpa = (sums[..., i, :] for i in range(5))
        # mIoU averages over the classes in the ground truth or the prediction (mmseg). A class is in the ground truth
        # of some image at least as surely as its likeliest pixel there is: a lower bound, met where a class comes
        # as a region (the softmax's diffuse tail over many pixels is not a class in the picture).
        present = -np.expm1(sums[..., 7, :])  # (..., K)
        miou_f = self._miou(gt, pf, tpf, np.where(pf > 0, 1.0, present))
        miou_a = self._miou(gt, pa, tpa, np.where(pa > 0, 1.0, present))
        acc_drop = (sums[..., 5, 0] - sums[..., 6, 0]) / np.maximum(sums[..., 5, 1], 1)
        return miou_f, miou_a, acc_drop

    def figures(self, class_names: list[str] | None = None) -> dict[str, Any]:
        rows = np.stack(self.rows)  # (N, 8, K)
        miou_f, miou_a, acc_drop = self._drops(rows.sum(0))
        stderr = acc_stderr = None
        if len(rows) > 1:
            rng = np.random.default_rng(0)
            picks = rng.integers(0, len(rows), size=(self.BOOTSTRAP, len(rows)))  # (B, N) images per resample
            sums = np.stack([rows[p].sum(0) for p in picks])  # (B, 8, K)
            boot_f, boot_a, boot_acc = self._drops(sums)
            stderr, acc_stderr = float(100 * (boot_f - boot_a).std()), float(100 * boot_acc.std())
        total = rows.sum(0)
        gt, pf, tpf, pa, tpa = total[:5]
        names = class_names or [str(i) for i in range(self.k)]
        big = np.flatnonzero(pf >= self.MIN_CLASS_SHARE * total[5, 1])
        with np.errstate(divide="ignore", invalid="ignore"):
            iou_f = tpf / np.maximum(gt + pf - tpf, 1e-12)
            iou_a = tpa / np.maximum(gt + pa - tpa, 1e-12)
        by_class = sorted(((names[c], float(100 * (iou_f[c] - iou_a[c]))) for c in big), key=lambda kv: -kv[1])
        return {
            "estimated_miou_float": float(miou_f),
            "estimated_miou_artifact": float(miou_a),
            "estimated_miou_drop_points": float(100 * (miou_f - miou_a)),
            "estimated_miou_drop_stderr": stderr,
            "estimated_pixel_accuracy_drop_points": float(100 * acc_drop),
            "estimated_pixel_accuracy_drop_stderr": acc_stderr,
            "estimated_iou_drop_by_class": dict(by_class),
            "estimate_min_class_share": self.MIN_CLASS_SHARE,
        }


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
