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
    "MASK_CANDIDATES",
    "TAPS",
    "DecomposedLayerNorm",
    "EdgeModule",
    "candidate_argmax",
    "candidate_mix",
    "mask_method",
    "RowSplitAttention",
    "decompose_layer_norms",
    "fold_batch_norm",
    "split_single_head_attention",
]


MASK_CANDIDATES = 2  # classes taken from each of a pixel's four low-resolution neighbours


def mask_method(output: str, mask_size: str, size: tuple[int, int], dynamic: bool) -> str | None:
    """How the graph makes its mask: ``candidates`` (see :func:`candidate_argmax`), ``exact`` (upsample all K
    class maps, then argmax: asked for with ``full-exact``, or where the candidate layout would need a static
    size that is a multiple of 4), or ``quarter`` (argmax at 1/4 resolution); None for logits and probs."""
    if output != "mask":
        return None
    if mask_size in ("quarter", "full-exact"):
        return mask_size.removeprefix("full-")
    h, w = size
    return "candidates" if not dynamic and h % 4 == 0 and w % 4 == 0 else "exact"


def candidate_mix(topk: int = MASK_CANDIDATES) -> Tensor:
    """The fixed 1x1-convolution weights of :func:`candidate_argmax` for ``topk`` classes per neighbour:
    (16 sub-pixels x 4t candidates, 4 corners x 4t candidates, 1, 1), candidate-major on both sides.

    Output row ``4c - 2 + r`` (r = 0..3) lies in cell c (between padded rows c and c+1) at the fraction
    ``(r + 0.5) / 4`` of it (``align_corners=False``); the same holds for columns. Made once, outside the
    graph: a constant, not ops the runtimes would have to run (LiteRT has no kernel for an in-graph iota).
    """
    frac = (torch.arange(4, dtype=torch.float64) + 0.5) / 4  # (4,)
    along = torch.stack([1 - frac, frac], dim=1)  # (4 sub-rows, 2 corner rows)
    weights = torch.einsum("ya,xc->yxac", along, along).reshape(16, 4)  # (16 sub-pixels, 4 corners)
    n = 4 * topk
    mix = torch.einsum("pi,jl->jpil", weights, torch.eye(n, dtype=torch.float64))  # (n, 16, 4, n)
    return mix.reshape(n * 16, 4 * n, 1, 1).float()


def _replicate_pad(x: Tensor) -> Tensor:
    """(B, K, h, w) -> (B, K, h+2, w+2), edges repeated once (concatenation: every runtime has it)."""
    x = torch.cat([x[:, :, :1], x, x[:, :, -1:]], dim=2)  # (B, K, h+2, w)
    return torch.cat([x[:, :, :, :1], x, x[:, :, :, -1:]], dim=3)  # (B, K, h+2, w+2)


def candidate_argmax(logits: Tensor, mix: Tensor) -> Tensor:
    """``argmax(interpolate(logits, scale_factor=4, mode="bilinear"))`` without upsampling the K class maps.

    Bilinear upsampling blends each output pixel from its four low-resolution neighbours, and the blend's
    argmax lies (almost always) among the neighbours' own top classes. So each cell between four neighbours
    takes their top classes as candidates, gathers those classes' logits at the four corners (at low
    resolution), blends them with the 16 fixed bilinear weights of a 4x upsampling (``mix``, from
    :func:`candidate_mix`), and picks the best candidate per output pixel. The work is a few gathers and a
    small 1x1 mix at 1/4 resolution, against K full-resolution maps: the cost no longer grows with K.

    Border pixels follow ``align_corners=False`` exactly: replicate padding by one low-resolution pixel
    gives the clamped source indices. Where the blend's winner is not a candidate the label differs from
    the exact argmax; benchmarks/MASK.md measures how often (verify measures it on the user's images).

    Args:
        logits: (B, K, h, w) float.
        mix: ``candidate_mix(topk)``; topk = ``mix.shape[1] // 16``.

    Returns:
        (B, 4h, 4w) int32 labels.
    """
    b, k, h, w = (int(d) for d in logits.shape)  # static (the candidate mask is made for static sizes only)
    n = mix.shape[1] // 4  # 4 * topk candidates per cell
    topk = n // 4
    padded = _replicate_pad(logits)  # (B, K, h+2, w+2)
    top = padded.topk(topk, dim=1).indices if topk > 1 else padded.argmax(dim=1, keepdim=True)  # (B, t, h+2, w+2)
    corners = [(0, 0), (0, 1), (1, 0), (1, 1)]
    # The 4t candidate classes of each of the (h+1) x (w+1) cells: its corners' top classes.
    cand = torch.cat([top[:, :, a : a + h + 1, c : c + w + 1] for a, c in corners], dim=1)  # (B, 4t, h+1, w+1)
    # Each candidate's logit at each corner of its cell.
    # The index is placed at each corner's offset in the padded grid and the result sliced: a gather whose
    # data is itself a slice is mis-read by OpenVINO's TorchScript frontend (it gathers from the whole tensor).
    gathered = torch.cat([torch.gather(padded, 1, F.pad(cand.float(), (c, 1 - c, a, 1 - a)).long())[:, :, a : a + h + 1, c : c + w + 1]
                          for a, c in corners], dim=1)  # (B, 4 corners x 4t, h+1, w+1)  # fmt: skip
    scores = F.conv2d(gathered, mix)  # (B, 4t x 16 sub-pixels, h+1, w+1), candidate-major
    best = scores.reshape(b, n, 16, h + 1, w + 1).argmax(dim=1)  # (B, 16, h+1, w+1): the winning candidate
    labels = torch.gather(cand, 1, best).float()  # (B, 16, h+1, w+1)
    full = F.pixel_shuffle(labels, 4)[:, 0]  # (B, 4h+4, 4w+4): cell c's sub-pixels at rows 4c..4c+3
    return full[:, 2 : 2 + 4 * h, 2 : 2 + 4 * w].to(torch.int32)  # (B, 4h, 4w)


class EdgeModule(nn.Module):
    """SegFormer plus its graph edges: input layout and normalisation, and its output: logits, class
    probabilities, or a label mask (full size by :func:`candidate_argmax`, or at 1/4 resolution).

    With ``taps`` the graph also outputs the four encoder stage maps and the fused decoder feature
    (:data:`TAPS`), after its main output: what ``verify --layers`` compares with the float model.
    """

    def __init__(self, model: SegFormer, spec: InputSpec, output: str = "logits", taps: bool = False,
                 mask_size: str = "full") -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.input_kind = spec.kind
        self.output = output
        self.taps = taps
        self.nhwc = spec.layout == "nhwc"
        self.mask = mask_method(output, mask_size, spec.size, spec.dynamic)
        mean = torch.tensor(spec.mean).reshape(1, 3, 1, 1) * spec.scale
        std = torch.tensor(spec.std).reshape(1, 3, 1, 1) * spec.scale
        # (x - mean) / std as one multiply-add: x * (1 / std) + (-mean / std).
        self.register_buffer("in_scale", 1.0 / std, persistent=False)
        self.register_buffer("in_shift", -mean / std, persistent=False)
        self.register_buffer("mask_mix", candidate_mix() if self.mask == "candidates" else None, persistent=False)

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
        if self.output == "probs":
            out = logits.softmax(dim=1)  # (B, K, H/4, W/4)
        elif self.mask == "quarter":
            out = logits.argmax(dim=1).to(torch.int32)  # (B, H/4, W/4)
        elif self.mask == "candidates":
            out = candidate_argmax(logits, self.mask_mix)  # (B, H, W)
        elif self.mask == "exact":
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


class RowSplitAttention(EfficientSelfAttention):
    """Efficient self-attention whose single-head query rows run as a batch of ``parts`` matmuls.

    With one image and one head (SegFormer's stage 1), ``bmm(q, k^T)`` has batch 1, and the TFLite
    converter rewrites it as a FULLY_CONNECTED op whose weights are the activation ``k``. XNNPACK only
    delegates FULLY_CONNECTED with constant weights, so both attention matmuls of stage 1 then ran in the
    reference kernels (12 ms of a 16384 x 256 x 32 attention at 512x512, against 4 ms delegated). Attention
    rows are independent: splitting the N queries into ``parts`` batches, each against the same keys and
    values, keeps a real BATCH_MATMUL and gives the same numbers.

    It takes over the attention's own layers (the same objects, under the same names), so every module path
    (``...blocks.0.attn.q``) is what it was: float-kept layers and per-group counts find them.
    """

    def __init__(self, attn: EfficientSelfAttention, parts: int = 2) -> None:
        nn.Module.__init__(self)
        for name in ("num_heads", "head_dim", "scale", "sr_ratio"):
            setattr(self, name, getattr(attn, name))
        for name, child in attn.named_children():
            self.add_module(name, child)
        self.parts = parts

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape  # (B, N, C)
        parts = self.parts
        if b * self.num_heads != 1 or n % parts:
            return super().forward(x, h, w)
        kv = self.reduce_kv(x, h, w)  # (B, M, C)
        q = self.q(x).reshape(parts, n // parts, c)  # (1, N, C) -> (P, N / P, C): query rows in P batches
        k = torch.cat([self.k(kv)] * parts)  # (P, M, C)
        v = torch.cat([self.v(kv)] * parts)  # (P, M, C)
        out = self.attend(q, k, v).reshape(b, n, c)  # (P, N / P, C) -> (1, N, C)
        return self.proj(out)


def split_single_head_attention(module: nn.Module, parts: int = 2) -> nn.Module:
    """A deep copy of ``module`` with every single-head attention wrapped in :class:`RowSplitAttention`."""
    module = copy.deepcopy(module)
    for child in list(module.modules()):
        for attr, sub in list(child.named_children()):
            if type(sub) is EfficientSelfAttention and sub.num_heads == 1:
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
