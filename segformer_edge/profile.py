"""Model statistics: parameters, multiply-accumulates and stage shapes, computed on the meta device.

MACs count the multiply-accumulates of convolutions, linear layers and attention matmuls (the paper's
"GFLOPs" count exactly these). Normalisation, softmax, GELU, interpolation and additions are not counted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .model import ProjectedHead, SegFormer, SegFormerConfig

__all__ = ["model_stats"]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_stats(config: SegFormerConfig, size: tuple[int, int] = (512, 512), projected: bool = False) -> dict[str, Any]:
    """Parameters (encoder, decoder, total), MACs at ``size`` and the shape of each stage, for batch 1; with
    ``projected`` the decoder as exported by default (:class:`ProjectedHead`: the fuse conv folded into the stage
    projections before upsampling).

    Runs on the meta device: no memory is allocated and no arithmetic is done, so even b5 is instant.
    """
    h, w = size
    if h < 32 or w < 32:
        raise ValueError(f"input size {h}x{w} is too small: SegFormer needs H, W >= 32")
    with torch.device("meta"):
        model = SegFormer(config).eval()
        if projected:
            model.decoder = ProjectedHead(model.decoder)
        x = torch.empty(1, config.in_chans, h, w)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        features = model.encoder(x)
        logits = model.decoder(features)
    by_op = {str(op).removeprefix("aten."): flops // 2 for op, flops in counter.get_flop_counts()["Global"].items()}
    return {
        "variant": config.variant,
        "num_classes": config.num_classes,
        "size": [h, w],
        "params": _count(model),
        "params_encoder": _count(model.encoder),
        "params_decoder": _count(model.decoder),
        "macs": counter.get_total_flops() // 2,
        "macs_by_op": by_op,
        "stages": [
            {
                "stage": i + 1,
                "stride": 4 * 2**i,
                "shape": list(f.shape),
                "depth": config.depths[i],
                "heads": config.num_heads[i],
                "sr_ratio": config.sr_ratios[i],
            }
            for i, f in enumerate(features)
        ],
        "output_shape": list(logits.shape),
    }
