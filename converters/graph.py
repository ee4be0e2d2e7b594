"""Export-time graph surgery: the graph edges (fused preprocessing, mask output) and module swaps.

The checkpoint's module layout never changes; targets that need another formulation of an op get a
deep copy with that op swapped in (same parameters, same arithmetic).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segformer_edge.inputs import InputSpec
from segformer_edge.model import EfficientSelfAttention, SegFormer

from .base import TAPS

__all__ = [
    "TAPS",
    "DecomposedLayerNorm",
    "EdgeModule",
    "RowSplitAttention",
    "decompose_layer_norms",
    "fold_batch_norm",
    "split_single_head_attention",
]


class EdgeModule(nn.Module):
    """SegFormer plus its graph edges: input layout and normalisation, logits or a fused argmax mask.

    With ``taps`` the graph also outputs the four encoder stage maps and the fused decoder feature
    (:data:`TAPS`), after its main output: what ``verify --layers`` compares with the float model.
    """

    def __init__(self, model: SegFormer, spec: InputSpec, output: str = "logits", taps: bool = False) -> None:
        super().__init__()
        self.model = model
        self.input_kind = spec.kind
        self.output = output
        self.taps = taps
        self.nhwc = spec.layout == "nhwc"
        mean = torch.tensor(spec.mean).reshape(1, 3, 1, 1) * spec.scale
        std = torch.tensor(spec.std).reshape(1, 3, 1, 1) * spec.scale
        # (x - mean) / std as one multiply-add: x * (1 / std) + (-mean / std).
        self.register_buffer("in_scale", 1.0 / std, persistent=False)
        self.register_buffer("in_shift", -mean / std, persistent=False)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
        if self.input_kind != "normalized":
            x = x.float() * self.in_scale + self.in_shift  # (B, 3, H, W), normalised
        if self.taps:
            features = self.model.encoder(x)  # four (B, C_i, H / 2^(i+2), W / 2^(i+2))
            fused = self.model.decoder.fuse_features(features)  # (B, C, H/4, W/4)
            logits = self.model.decoder.classifier(fused)  # (B, K, H/4, W/4)
        else:
            logits = self.model(x)  # (B, K, H/4, W/4)
        out = logits
        if self.output == "mask":
            up = F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)  # (B, K, H, W)
            out = up.argmax(dim=1).to(torch.int32)  # (B, H, W)
        return (out, *features, fused) if self.taps else out


class DecomposedLayerNorm(nn.Module):
    """LayerNorm over the last dim written as 4-D mean/sub/mul/rsqrt, which XNNPACK delegates.

    XNNPACK (ExecuTorch 1.5) has no LayerNorm kernel, and delegates ``mean.dim`` only for 4-D tensors over
    dims (2, 3) with keepdim: (B, N, C) is viewed as (B, N, C, 1) so that the mean over C is such a mean.
    """

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.weight = norm.weight
        self.bias = norm.bias
        self.eps = norm.eps

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        x4 = x.reshape(b, n, c, 1)  # (B, N, C, 1)
        mean = x4.mean(dim=(2, 3), keepdim=True)  # (B, N, 1, 1)
        centred = x4 - mean
        var = (centred * centred).mean(dim=(2, 3), keepdim=True)  # (B, N, 1, 1)
        y = (centred * torch.rsqrt(var + self.eps)).reshape(b, n, c)  # (B, N, C)
        return y * self.weight + self.bias


def decompose_layer_norms(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every LayerNorm replaced by :class:`DecomposedLayerNorm`."""
    module = copy.deepcopy(module)
    for child in list(module.modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, nn.LayerNorm):
                setattr(child, attr, DecomposedLayerNorm(sub))
    return module


class RowSplitAttention(nn.Module):
    """Efficient self-attention whose single-head query rows run as a batch of ``parts`` matmuls.

    With one image and one head (SegFormer's stage 1), ``bmm(q, k^T)`` has batch 1, and the TFLite
    converter rewrites it as a FULLY_CONNECTED op whose weights are the activation ``k``. XNNPACK only
    delegates FULLY_CONNECTED with constant weights, so both attention matmuls of stage 1 then ran in the
    reference kernels (12 ms of a 16384 x 256 x 32 attention at 512x512, against 4 ms delegated). Attention
    rows are independent: splitting the N queries into ``parts`` batches, each against the same keys and
    values, keeps a real BATCH_MATMUL and gives the same numbers.
    """

    def __init__(self, attn: EfficientSelfAttention, parts: int = 2) -> None:
        super().__init__()
        self.attn = attn
        self.parts = parts

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        a = self.attn
        b, n, c = x.shape  # (B, N, C)
        parts = self.parts
        if b * a.num_heads != 1 or n % parts:
            return a(x, h, w)
        kv = a.reduce_kv(x, h, w)  # (B, M, C)
        q = a.q(x).reshape(parts, n // parts, c)  # (1, N, C) -> (P, N / P, C): query rows in P batches
        k = torch.cat([a.k(kv)] * parts)  # (P, M, C)
        v = torch.cat([a.v(kv)] * parts)  # (P, M, C)
        out = a.attend(q, k, v).reshape(b, n, c)  # (P, N / P, C) -> (1, N, C)
        return a.proj(out)


def split_single_head_attention(module: nn.Module, parts: int = 2) -> nn.Module:
    """A deep copy of ``module`` with every single-head attention wrapped in :class:`RowSplitAttention`."""
    module = copy.deepcopy(module)
    for child in list(module.modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, EfficientSelfAttention) and sub.num_heads == 1:
                setattr(child, attr, RowSplitAttention(sub, parts))
    return module


def fold_batch_norm(model: SegFormer) -> SegFormer:
    """A deep copy whose decoder BatchNorm is folded into the bias-free fuse conv (eval statistics)."""
    model = copy.deepcopy(model).eval()
    head = model.decoder
    if isinstance(head.bn, nn.Identity):
        return model
    bn, conv = head.bn, head.fuse
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C,)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=1, bias=True)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
    head.fuse = fused
    head.bn = nn.Identity()
    return model
