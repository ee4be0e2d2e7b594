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
from segformer_edge.model import EfficientSelfAttention, MixFFN, ProjectedHead, SegFormer

from .base import TAPS

__all__ = [
    "MASK_CANDIDATES",
    "TAPS",
    "CandidateMask",
    "DecomposedLayerNorm",
    "EdgeModule",
    "RowSplitAttention",
    "candidate_argmax",
    "candidate_base",
    "candidate_mix",
    "decompose_layer_norms",
    "fold_batch_norm",
    "mask_method",
    "project_decoder",
    "split_single_head_attention",
]


MASK_CANDIDATES = 2  # classes taken from each of a pixel's four low-resolution neighbours (its top two)


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


def candidate_mix() -> Tensor:
    """The bilinear weights of a 4x upsampling inside one cell between four low-resolution pixels:
    (4 corners, 16 sub-pixels), corners (0,0), (0,1), (1,0), (1,1), sub-pixels row-major.

    Output row ``4c - 2 + r`` (r = 0..3) lies in cell c (between padded rows c and c+1) at the fraction
    ``(r + 0.5) / 4`` of it (``align_corners=False``); the same holds for columns. Made once, outside the
    graph: a constant, not ops the runtimes would have to run (LiteRT has no kernel for an in-graph iota).
    """
    frac = (torch.arange(4, dtype=torch.float64) + 0.5) / 4  # (4,)
    along = torch.stack([1 - frac, frac], dim=1)  # (4 sub-rows, 2 corner rows)
    weights = torch.einsum("ya,xc->yxac", along, along).reshape(16, 4)  # (16 sub-pixels, 4 corners)
    return weights.t().contiguous().float()  # (4 corners, 16 sub-pixels)


def candidate_base(num_classes: int, h: int, w: int, batch: int = 1) -> Tensor:
    """(B, h, w, 1) int64: where each low-resolution pixel's K logits start in the flattened (B, h, w, K) logits,
    the offsets :func:`candidate_argmax`'s lookup adds to class indices. A constant made outside the graph, for
    the same reason as :func:`candidate_mix`."""
    return (torch.arange(batch * h * w, dtype=torch.int64) * num_classes).reshape(batch, h, w, 1)


_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))
_OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))  # a pixel's 3x3 neighbourhood, row-major


def _replicate_pad(x: Tensor, dims: tuple[int, int]) -> Tensor:
    """Edges repeated once along the two spatial ``dims`` (concatenation: every runtime has it)."""
    for d in dims:
        n = x.shape[d]
        x = torch.cat([x.narrow(d, 0, 1), x, x.narrow(d, n - 1, 1)], dim=d)
    return x


def _shift_offsets(g: Tensor, axis: int, shift: int, topk: int) -> Tensor:
    """(B, n, m, 9t) -> the same with each neighbour offset moved by ``shift`` (-1 or +1) along ``axis`` (0: rows,
    1: columns): the value a replicate-padded border pixel holds for offset o is its inner twin's for o + shift
    (an offset pushed out of range holds any value: no cell reads it)."""
    b, n, m, _ = (int(d) for d in g.shape)
    v = g.reshape(b, n * m, 3, 3 * topk) if axis == 0 else g.reshape(b, n * m * 3, 3, topk)  # offsets along dim 2
    v = torch.cat([v[:, :, :1], v[:, :, :2]], dim=2) if shift < 0 else torch.cat([v[:, :, 1:], v[:, :, 2:]], dim=2)
    return v.reshape(b, n, m, 9 * topk)


def candidate_argmax(logits: Tensor, mix: Tensor, base: Tensor, topk: int = MASK_CANDIDATES, runner_up: str = "topk") -> Tensor:
    """``argmax(interpolate(logits, scale_factor=4, mode="bilinear"))`` without upsampling the K class maps.

    Bilinear upsampling blends each output pixel from its four low-resolution neighbours. Where the four share
    their top class the blend's argmax is that class, exactly (weights >= 0); elsewhere it lies almost always
    among the neighbours' top classes. So each cell between four neighbours takes their ``topk`` classes as
    candidates, blends the candidates' logits at the four corners with the 16 fixed bilinear weights of a 4x
    upsampling (``mix``), and keeps the best candidate per output pixel.

    Laid out for the runtimes' fast paths: the classes on the last (contiguous) axis, one top-class pass and one
    lookup over the K classes at 1/4 resolution (each pixel's logits at its 3x3 neighbours' top classes, as an
    embedding lookup in the flattened logits: LiteRT's EMBEDDING_LOOKUP, where torch.gather becomes a GATHER_ND
    three times slower), and every full-resolution step (the blend, the pairwise pick of the best candidate as
    max/clamp arithmetic, the pixel shuffle) an op XNNPACK and LiteRT delegate. The tail always computes in float32 (an fp16 graph's
    half-precision logits are widened first). Borders follow ``align_corners=False`` exactly: replicate padding
    by one pixel gives the clamped source indices. Where the blend's winner is no candidate the label differs
    from the exact argmax; benchmarks/MASK.md measures how often (verify measures it on the user's images).

    Args:
        logits: (B, K, h, w) float.
        mix: :func:`candidate_mix`, (4, 16).
        base: :func:`candidate_base` for these logits' shape.
        topk: candidate classes per neighbour (K: every class, the exact argmax).
        runner_up: ``topk``, or ``rescan`` (two classes: argmax, then argmax again with the first pushed to -inf:
            the same two classes as topk, for runtimes whose top-k kernel is slow).

    Returns:
        (B, 4h, 4w) int32 labels.
    """
    b, k, h, w = (int(d) for d in logits.shape)  # static (the candidate mask is made for static sizes only)
    t = topk
    x = logits.float().permute(0, 2, 3, 1)  # (B, h, w, K): classes contiguous
    if t == 2 and runner_up == "rescan":  # argmax, then argmax again with the top class pushed to -inf
        first = x.argmax(dim=-1, keepdim=True)  # (B, h, w, 1)
        top = torch.cat([first, x.scatter(-1, first, float("-inf")).argmax(dim=-1, keepdim=True)], dim=-1)  # (B, h, w, 2)
    else:
        top = x.topk(t, dim=-1).indices if t > 1 else x.argmax(dim=-1, keepdim=True)  # (B, h, w, t)
    top_pad = _replicate_pad(top, (1, 2))  # (B, h+2, w+2, t)
    # Each pixel's logits at the top classes of its 3x3 neighbourhood (in the padded grid): one lookup.
    around = torch.cat([top_pad[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in _OFFSETS], dim=-1)  # (B, h, w, 9t)
    g = F.embedding(around + base, x.reshape(b * h * w * k, 1))[..., 0]  # (B, h, w, 9t): g[q, o, s] = L(q, top(q + o)[s])
    # The padded grid: a border pixel repeats its inner twin, whose neighbour offsets lie one step further in.
    g = torch.cat([_shift_offsets(g[:, :1], 0, -1, t), g, _shift_offsets(g[:, -1:], 0, 1, t)], dim=1)  # (B, h+2, w, 9t)
    g = torch.cat([_shift_offsets(g[:, :, :1], 1, -1, t), g, _shift_offsets(g[:, :, -1:], 1, 1, t)], dim=2)  # (B, h+2, w+2, 9t)
    labels_pad = top_pad.float()  # (B, h+2, w+2, t): class indices as exact small floats
    scores, labels = [], []
    for aj, cj in _CORNERS:  # the candidates: corner j's top classes
        for s in range(t):
            # Candidate (j, s)'s logit at each corner i of every cell: corner i's gather at offset j - i.
            at = [g[:, ai : ai + h + 1, ci : ci + w + 1, (c := _OFFSETS.index((aj - ai, cj - ci)) * t + s) : c + 1] for ai, ci in _CORNERS]
            scores.append(torch.cat(at, dim=-1) @ mix.float())  # (B, h+1, w+1, 4 corners) @ (4, 16) -> (B, h+1, w+1, 16)
            labels.append(labels_pad[:, aj : aj + h + 1, cj : cj + w + 1, s : s + 1])  # (B, h+1, w+1, 1)
    # Pairwise knock-out: the first of two equal scores wins, as argmax's first index does.
    while len(scores) > 1:
        next_scores, next_labels = [], []
        for i in range(0, len(scores) - 1, 2):
            a, c = scores[i], scores[i + 1]
            # 1 where a >= c, else 0; a fraction only for two logits closer than 1e-30 (0 < c - a < 1e-30).
            keep_a = ((a - c) * 1e30 + 1.0).clamp(0.0, 1.0)
            next_scores.append(torch.maximum(a, c))
            next_labels.append(labels[i + 1] + keep_a * (labels[i] - labels[i + 1]))  # (B, h+1, w+1, 16)
        if len(scores) % 2:
            next_scores.append(scores[-1])
            next_labels.append(labels[-1])
        scores, labels = next_scores, next_labels
    full = labels[0].reshape(b, h + 1, w + 1, 4, 4).permute(0, 1, 3, 2, 4).reshape(b, 4 * h + 4, 4 * w + 4)  # cell c: rows 4c..4c+3
    return full[:, 2 : 2 + 4 * h, 2 : 2 + 4 * w].to(torch.int32)  # (B, 4h, 4w)


class CandidateMask(nn.Module):
    """The full-size mask of :func:`candidate_argmax` as a module of its own (``EdgeModule.mask_head``): its
    constants travel as buffers, and its ops carry the module path the quantizers keep float
    (:data:`segformer_edge.calibration.spec.FLOAT_EDGES`): labels and the blend are not numbers to quantize."""

    def __init__(self, num_classes: int, size: tuple[int, int], runner_up: str = "topk") -> None:
        super().__init__()
        self.runner_up = runner_up
        h, w = size[0] // 4, size[1] // 4  # the logits' size (static wherever the candidate mask is made)
        self.register_buffer("mix", candidate_mix(), persistent=False)
        self.register_buffer("base", candidate_base(num_classes, h, w), persistent=False)

    def forward(self, logits: Tensor) -> Tensor:
        return candidate_argmax(logits, self.mix, self.base, runner_up=self.runner_up)  # (B, K, h, w) -> (B, 4h, 4w)


class EdgeModule(nn.Module):
    """SegFormer plus its graph edges: input layout and normalisation, and its output: logits, class
    probabilities, or a label mask (full size by :func:`candidate_argmax`, or at 1/4 resolution).

    With ``taps`` the graph also outputs the four encoder stage maps and the fused decoder feature
    (:data:`TAPS`), after its main output: what ``verify --layers`` compares with the float model.
    """

    def __init__(self, model: SegFormer, spec: InputSpec, output: str = "logits", taps: bool = False,
                 mask_size: str = "full", runner_up: str = "topk") -> None:  # fmt: skip
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
        self.mask_head = CandidateMask(model.config.num_classes, spec.size, runner_up) if self.mask == "candidates" else None

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
            out = self.mask_head(logits)  # (B, H, W)
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


class ChannelsFirstMixFFN(nn.Module):
    """:class:`MixFFN` with ``fc1`` and ``fc2`` as 1x1 convolutions on the NCHW map: the same function, the same
    weights, under the same module paths (float-kept layers and per-group counts find them).

    ExecuTorch's XNNPACK delegate runs convolutions in NHWC and puts a transpose wherever a token view (B, N, C)
    meets an NCHW map. MixFFN goes tokens -> map -> tokens around its depth-wise conv, on the hidden tensor, four
    times as wide as the block (4 transposes of (B, 4C, H, W) per block; int8 Transpose was 18% of b0's INT8 time at
    512x512). With fc1 and fc2 on the map, the round trip happens on the block's C channels instead, and
    everything between fc1 and fc2 stays in NHWC.
    """

    def __init__(self, mlp: MixFFN) -> None:
        super().__init__()
        self.fc1 = _linear_as_conv(mlp.fc1)
        self.dwconv = mlp.dwconv
        self.act = mlp.act
        self.fc2 = _linear_as_conv(mlp.fc2)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, h, w)  # (B, N, C) -> (B, C, H, W)
        x = self.fc2(self.act(self.dwconv(self.fc1(x))))  # (B, C, H, W) -> (B, Ch, H, W) -> (B, C, H, W)
        return x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, C)


def _linear_as_conv(linear: nn.Linear) -> nn.Conv2d:
    """A 1x1 convolution computing ``linear`` over the channels of an NCHW map."""
    conv = nn.Conv2d(linear.in_features, linear.out_features, kernel_size=1, bias=linear.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(linear.weight[:, :, None, None])  # (out, in) -> (out, in, 1, 1)
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    return conv


def channels_first_mix_ffn(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every :class:`MixFFN` replaced by :class:`ChannelsFirstMixFFN`."""
    module = copy.deepcopy(module)
    for child in list(module.modules()):
        for attr, sub in list(child.named_children()):
            if type(sub) is MixFFN:
                setattr(child, attr, ChannelsFirstMixFFN(sub))
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


def project_decoder(model: SegFormer) -> SegFormer:
    """A deep copy whose decoder is :class:`ProjectedHead`: fuse conv and BatchNorm (eval statistics) folded into
    the four stage projections, which run before the upsampling. The same function; at b2 512x512 the network's
    MACs fall from 62 to 24 G."""
    model = copy.deepcopy(model).eval()
    model.decoder = ProjectedHead(model.decoder).eval()
    return model
