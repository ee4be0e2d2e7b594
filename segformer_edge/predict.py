"""Prediction on photos: labels from a checkpoint or an exported artifact, palette masks, overlays, disagreement.

An artifact is run through whatever runner its target gives (any callable from a numpy batch in the
artifact's :class:`~segformer_edge.inputs.InputSpec` to its outputs): the photo is resized to the spec's
size and turned into the spec's kind, layout and dtype, and the output is brought back to the photo's own
size (logits: bilinear upsampling then argmax; mask outputs: nearest-neighbour resizing). Everything but
:func:`predict_mask` and :func:`float_predictor` is numpy and Pillow only, so that predicting with a LiteRT or
ONNX artifact needs no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .data.folders import Sample
from .errors import DataError
from .inputs import InputSpec

if TYPE_CHECKING:
    from .model import SegFormer

__all__ = [
    "DIFF_COLOUR",
    "ArtifactPredictor",
    "PredictItem",
    "agreement",
    "colorize",
    "disagreement_image",
    "float_predictor",
    "image_items",
    "logits_to_labels",
    "overlay",
    "predict_mask",
    "resize_labels",
    "upsample_bilinear",
]

DIFF_COLOUR = (255, 0, 255)  # disagreement pixels: magenta over the photo darkened to a third
_ROWS_PER_CHUNK = 64  # output rows upsampled at a time: bounds memory for 150 classes on large photos


def predict_mask(model: SegFormer, image: np.ndarray, *, size: tuple[int, int] | None = None, mode: str = "whole") -> np.ndarray:
    """Labels (H, W) uint8 for an RGB uint8 image (H, W, 3), at the image's own resolution (torch)."""
    import torch

    from .data.transforms import EvalTransform
    from .evaluate import infer

    meta = model.meta
    h, w = image.shape[:2]
    x = torch.from_numpy(EvalTransform(meta.mean, meta.std, size if mode == "whole" else None)(image))[None]
    x = x.to(next(model.parameters()).device)
    with torch.no_grad():
        logits = infer(model, x, model.config.num_classes, mode=mode, crop=meta.input_size)  # (1, K, h', w')
        if logits.shape[2:] != (h, w):
            logits = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()


# -------------------------------------------------------------------------------------------------
# Outputs -> labels at the photo's size (numpy only)


def _linear_taps(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and the weight of i1 for each output position: torch's bilinear sampling with
    ``align_corners=False`` (source = (dst + 0.5) * in / out - 0.5, clamped at 0)."""
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _column_pass(logits: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(K, h, w) -> the columns resized to W (K, h, W), and the row taps (r0, r1, weight of r1) for H."""
    x = np.asarray(logits, np.float32)
    _, h, w = x.shape
    c0, c1, cw = _linear_taps(size[1], w)
    r0, r1, rw = _linear_taps(size[0], h)
    return x[:, :, c0] * (1 - cw) + x[:, :, c1] * cw, r0, r1, rw


def _row_pass(cols: np.ndarray, r0: np.ndarray, r1: np.ndarray, rw: np.ndarray) -> np.ndarray:
    return cols[:, r0, :] * (1 - rw)[:, None] + cols[:, r1, :] * rw[:, None]


def upsample_bilinear(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, h, w) -> (K, H, W) float32: bilinear resizing as ``torch.nn.functional.interpolate(...,
    mode="bilinear", align_corners=False)`` computes it, without torch."""
    return _row_pass(*_column_pass(logits, size))


def logits_to_labels(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, h, w) logits -> (H, W) int64 labels: bilinear upsampling to ``size``, then argmax over classes.

    Done a band of rows at a time: 150 classes at a 12-megapixel photo's size would need gigabytes at once.
    """
    cols, r0, r1, rw = _column_pass(logits, size)
    labels = np.empty(size, np.int64)
    for top in range(0, size[0], _ROWS_PER_CHUNK):
        rows = slice(top, min(top + _ROWS_PER_CHUNK, size[0]))
        labels[rows] = _row_pass(cols, r0[rows], r1[rows], rw[rows]).argmax(0)  # (K, rows, W) -> (rows, W)
    return labels


def _nearest_taps(out_size: int, in_size: int) -> np.ndarray:
    """The source index of each output position: the pixel whose centre is nearest, floor((dst + 0.5) * in /
    out), in float32 as torch's ``nearest-exact`` computes it (so that ties fall the same way)."""
    centres = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    return np.minimum(np.floor(centres * np.float32(in_size / out_size)).astype(np.int64), in_size - 1)


def resize_labels(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) labels -> (H, W) by nearest neighbour, labels intact."""
    h, w = mask.shape
    return np.asarray(mask)[_nearest_taps(size[0], h)[:, None], _nearest_taps(size[1], w)[None, :]]


@dataclass
class ArtifactPredictor:
    """Photo (H, W, 3) uint8 -> labels (H, W) with an exported artifact.

    Attributes:
        runner: The artifact's runner: a numpy batch in ``spec``'s kind, layout and dtype -> its outputs.
        spec: The artifact's input (its manifest's ``input`` block); photos are resized to ``spec.size``.
        output: ``logits`` or ``probs`` (N, K, H/4, W/4), or ``mask`` (N, H, W) or (N, H/4, W/4) labels: ``output.kind``.
        num_classes: K.
    """

    runner: Callable[[np.ndarray], Any]
    spec: InputSpec
    output: str
    num_classes: int

    def __call__(self, image: np.ndarray) -> np.ndarray:
        resized, _ = self.spec.resize(image)
        out = np.asarray(self.runner(self.spec(resized[None])))
        return self.labels(out, image.shape[:2])

    def labels(self, out: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """The artifact's raw output for one image -> (H, W) labels at ``size``."""
        h, w = self.spec.size
        if self.output == "mask":  # full size, or 1/4 (a mask --mask-size quarter artifact)
            labels = out.reshape(out.shape[-2:]).astype(np.int64)
            return resize_labels(labels, size)
        logits = out.astype(np.float32).reshape(self.num_classes, -(-h // 4), -(-w // 4))
        return logits_to_labels(logits, size)


def float_predictor(model: SegFormer, spec: InputSpec) -> Callable[[np.ndarray], np.ndarray]:
    """Photo -> labels of the float model fed exactly what an artifact with ``spec`` is fed (resized to its
    size), its logits brought back to the photo's size the same way: the two differ only by the model."""
    import torch

    float_spec = spec.float_spec

    def predict(image: np.ndarray) -> np.ndarray:
        resized, _ = float_spec.resize(image)
        with torch.no_grad():
            logits = model(torch.from_numpy(float_spec(resized[None]))).numpy()[0]  # (K, h/4, w/4)
        return logits_to_labels(logits, image.shape[:2])

    return predict


# -------------------------------------------------------------------------------------------------
# Pictures


def colorize(mask: np.ndarray, palette: list[tuple[int, int, int]] | list[list[int]]) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) uint8 colours; the ignore label (and labels past the palette) are black."""
    lut = np.zeros((max(256, len(palette)), 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8).reshape(-1, 3)
    return lut[np.clip(mask, 0, len(lut) - 1)]


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colour mask over an RGB image."""
    return (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """The fraction of pixels where two label maps agree."""
    return float((np.asarray(a) == np.asarray(b)).mean())


def disagreement_image(image: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the photo darkened to a third, with the pixels where ``a`` and ``b`` differ in magenta."""
    return np.where((np.asarray(a) != np.asarray(b))[..., None], np.array(DIFF_COLOUR, np.uint8), (image // 3).astype(np.uint8))


# -------------------------------------------------------------------------------------------------
# Which photos


@dataclass(frozen=True)
class PredictItem:
    """One photo to predict: its path and the name its outputs get (``NAME_mask.png``; may hold subfolders)."""

    path: Path
    name: str


def image_items(specs: list[str], *, strict: bool = False) -> list[PredictItem]:
    """Image files, folders (searched recursively) and glob patterns -> the photos that read, in order, each once.

    A photo found in a folder keeps its subfolders in its output name (``trip/beach``), so that two photos
    with the same file name in different subfolders never write the same file. A file that does not read is
    left out with one warning naming it (:func:`~segformer_edge.data.folders.check_photos`).

    Raises:
        DataError: a path that does not exist, a folder or pattern without images, a file that is not an
            image, two photos whose outputs would get the same name, no photo that reads, or (``strict``) a
            photo that does not read.
    """
    from .data import list_photos
    from .data.folders import check_photos

    items: dict[Path, PredictItem] = {}
    seen: dict[str, Path] = {}
    for spec in specs:
        root = Path(spec)
        for sample in list_photos(spec):
            path = sample.image
            name = path.relative_to(root).with_suffix("").as_posix() if root.is_dir() else path.stem
            if path in items:
                continue
            if name in seen:
                raise DataError(f"{path} and {seen[name]} would both write {name}_mask.png; predict them in separate runs")
            seen[name] = path
            items[path] = PredictItem(path, name)
    readable = check_photos([Sample(path, None) for path in items], " ".join(specs), strict=strict)
    return [items[sample.image] for sample in readable.samples]
