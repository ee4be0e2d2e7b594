"""Effective receptive fields, as in the SegFormer paper's analysis (its Figure 3).

For each encoder stage (and the decoder's output), the gradient of the centre position's activation with
respect to the input image; the absolute gradient is summed over colour channels, averaged over images
and normalised to [0, 1]. The centre activation is reduced to a scalar by its squared L2 norm: a plain
channel sum would be degenerate after the stages' final LayerNorm (its outputs sum to a constant).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .model import SegFormer

__all__ = ["effective_receptive_fields"]


def effective_receptive_fields(
    model: SegFormer, images: Tensor, progress: Callable[[int], None] | None = None
) -> dict[str, np.ndarray]:
    """Maps ``stage1..stage4`` and ``head`` -> (H, W) float in [0, 1]; ``images`` is (N, 3, H, W) normalised."""
    model.eval()
    names = ["stage1", "stage2", "stage3", "stage4", "head"]
    sums = {name: np.zeros(images.shape[2:], np.float64) for name in names}
    for image in images:
        x = image[None].clone().requires_grad_(True)  # (1, 3, H, W)
        features = model.encoder(x)
        outputs = [*features, model.decoder(features)]
        for name, out in zip(names, outputs):
            _, _, h, w = out.shape
            centre = out[0, :, h // 2, w // 2].pow(2).sum() / 2
            (grad,) = torch.autograd.grad(centre, x, retain_graph=True)
            sums[name] += grad[0].abs().sum(0).numpy()  # (H, W)
        if progress is not None:
            progress(1)
    result = {}
    for name, total in sums.items():
        peak = total.max()
        result[name] = (total / peak if peak > 0 else total).astype(np.float32)
    return result
