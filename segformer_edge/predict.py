"""Prediction on single images, palette masks and overlays."""

from __future__ import annotations

import numpy as np
import torch

from .data.transforms import EvalTransform
from .evaluate import infer
from .model import SegFormer

__all__ = ["colorize", "overlay", "predict_mask"]


@torch.no_grad()
def predict_mask(model: SegFormer, image: np.ndarray, *, size: tuple[int, int] | None = None, mode: str = "whole") -> np.ndarray:
    """Labels (H, W) uint8 for an RGB uint8 image (H, W, 3), at the image's own resolution."""
    meta = model.meta
    h, w = image.shape[:2]
    x = torch.from_numpy(EvalTransform(meta.mean, meta.std, size if mode == "whole" else None)(image))[None]
    x = x.to(next(model.parameters()).device)
    logits = infer(model, x, model.config.num_classes, mode=mode, crop=meta.input_size)  # (1, K, h', w')
    if logits.shape[2:] != (h, w):
        logits = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()


def colorize(mask: np.ndarray, palette: list[tuple[int, int, int]]) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) uint8 colours; the ignore label (and unknown labels) are black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    return lut[mask]


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colour mask over an RGB image."""
    return (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)
