"""Activation outliers: function-preserving rewrites of the float SegFormer before any target's quantizer.

Pretrained transformers carry a few LayerNorm output channels far larger than the rest (LLM.int8(),
SmoothQuant; RepQ-ViT and PTQ4ViT for vision transformers). A per-tensor INT8 activation scale then spends
its range on them and the other channels collapse to a few levels. Two rewrites are offered, each measured
on the calibration images before it is used:

- **SmoothQuant scale migration** (Xiao et al. 2023): for every LayerNorm whose output feeds only
  linear or conv layers, per-channel factors ``s_c = max|X_c|^a / max|W_c|^(1-a)`` are divided out of
  the LayerNorm affine (``gamma / s``, ``beta / s``) and multiplied into the consumers' input-channel
  weights (``W * s``). The float function is unchanged (checked); the activation the quantizer sees is
  flatter. The strength ``a`` is chosen on the calibration images.
- **Bias correction** (Nagel et al. 2019, data-free quantization): each linear and conv bias absorbs the
  mean error that rounding its weights to per-channel symmetric int8 adds, ``b -= E[(Wq - W) x]`` over
  the calibration activations. This one changes the float function by design (towards the int8 one).

What a choice costs is measured by :class:`SimulatedInt8`: the candidate model with every linear and conv
run in simulated W8A8 (per-channel symmetric int8 weights, per-tensor affine int8 inputs with an
MSE-searched range, as the targets' ``mse`` observers do), compared with the float model's logits. A
caller may pass its own measure instead (a target's real quantizer, say): this module imports no converter.

SegFormer's LayerNorms and what they feed (the sites): a block's ``norm1`` feeds ``attn.q`` and either
``attn.sr`` (a strided conv, sr_ratio > 1) or ``attn.k`` and ``attn.v`` (sr_ratio 1); ``attn.sr_norm``
feeds ``attn.k`` and ``attn.v``; ``norm2`` feeds ``mlp.fc1``; a stage's final ``norm`` feeds the next
stage's patch-embedding conv (zero padding keeps the migration exact) and the decoder's ``linear_c``.
The patch embeddings' ``norm`` feeds the residual stream (an addition and the next LayerNorm), where
there is no weight to fold a factor into: it is skipped, and the record says so.

``auto`` keeps a rewrite only where it lowers the measured error by :data:`MIN_GAIN` (20%): candidates that
differ by less are within the measure's noise (a few percent), and the reference model, which has no
outliers, is then exported exactly as before.

How the choice is searched (:func:`decide_outliers`, ``strategy="local"``; issue 27): one float pass over the
calibration images caches what each site needs (the LayerNorm's channel maxima and range, sampled tokens, its
consumers' sampled inputs, every layer's input range). Each SmoothQuant strength is scored where it acts: per
site, its consumers in simulated W8A8 on the cached inputs, against their float outputs. The whole model is then
measured only for the baseline and for the best strength, with the input ranges known (the rewrite changes no
other layer's float input), and only where the candidate can still win: a rewrite that lowers no site's own error by
:data:`MIN_GAIN` cannot lower the model's by that much either. Bias correction's shifts come from the same pass (each
layer's summed inputs: a layer is linear in them) and it is measured on the whole model, with the ranges known. The
result, an :class:`OutlierDecision` (what was chosen and measured, with the channel maxima or bias shifts that
redo the rewrite without measuring), is what the export records and reuses. Each pass runs on a budget of input pixels
(:func:`search_images`): the search on up to 8 images and 1 M pixels (4 images at 512x512), the statistics on up to
2 M (all of 16 images at 362x362 or less; 8 at 512x512); the record names both counts. ``strategy="full"`` is the search
before: every candidate measured on the whole model (benchmarks/OUTLIER_DECISION.md compares the two).

Measured and left out (benchmarks/OUTLIER_REWRITES.md: simulated W8A8 error of the built-in B0 at 128x128
and of its copy with x30..x120 outliers on three channels of every site): RepQ-ViT's per-channel scale
reparameterization of post-LayerNorm activations is this migration at ``a = 1``, one of the searched
strengths. Its zero-point part (centring each channel, the shift moved into the consumers' biases): -3%
alone on the reference model, +1% and +2% after SmoothQuant. Cross-layer equalization of ``fc1`` into the
depth-wise conv (the one exact pair before a non-linearity): -10% alone on the reference model, -7% after
SmoothQuant on both models; a small, steady gain under the 20% bar, where the reference model's INT8 is
already within 0.05 mIoU points of float: not added. Bias correction: -3% alone on the reference model,
+4% and +5% after SmoothQuant; on the real targets (the test suite's stressed tiny model, SmoothQuant a=0.6)
it changed the mIoU drop by +0.02 to +0.10 points. It is a mode, and an ``auto`` candidate that has to
clear the same bar.
"""

from __future__ import annotations

import base64
import binascii
import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segformer_edge.errors import ExportError
from segformer_edge.model import SegFormer

from .spec import OUTLIER_MODES

__all__ = [
    "ALPHAS",
    "OUTLIER_MODES",
    "SEARCH_PIXELS",
    "STAT_PIXELS",
    "STRATEGIES",
    "NormSite",
    "OutlierDecision",
    "OutlierError",
    "SimulatedInt8",
    "bias_statistics",
    "channel_absmax",
    "correct_bias",
    "decide_outliers",
    "handle_outliers",
    "inject_outliers",
    "migrate",
    "norm_sites",
    "outlier_ratio",
    "quantize_weight",
    "search_images",
    "shift_biases",
    "smooth",
]

logger = logging.getLogger(__name__)

# SmoothQuant strengths searched on the calibration images; 1.0 moves each channel's whole range into the
# weights (RepQ-ViT's scale reparameterization of post-LayerNorm activations). Below 0.5 never won a search.
ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MIN_GAIN = 0.2  # "auto" applies a rewrite only where it lowers the measured error by at least 20% (beyond noise)
SEARCH_IMAGES = 8  # calibration images the strength search runs on, at most ...
SEARCH_PIXELS = 4 * 512 * 512  # ... and at most this many input pixels (at least MIN_SEARCH images) ...
STAT_PIXELS = 8 * 512 * 512  # ... and the statistics (channel maxima, bias shifts) this many (all images up to it).
MIN_SEARCH = 2  # Every pass of the decision costs a forward per image: at b2 512x512 ~2.5 s with the measures' hooks,
# and a first int8 export runs ~7 passes (capture, the baseline and each candidate that can win, the bias statistics).
# 8 images of 128x128 (the tests' and the reference model's) are 0.13 M pixels; 4 of 512x512 already hold 1 M, with
# 16x the tokens per image: the search keeps 8 images up to 362x362 and then bounds pixels, not images.
BATCH = 4  # images per forward pass, at most ...
BATCH_PIXELS = 512 * 512  # ... and at most this many input pixels: a b2 pass at 512x512 holds ~0.5 GB per image in
# its decoder (four 768-channel maps at 1/4 size, concatenated) and the measures' hooks copy layer inputs. The b2 int8
# export's peak was in the decision, in batches of 4: 7.6 GiB; one image at a time, the whole export peaks at 2.5 GiB
# (benchmarks/EXPORT_SCALE.md, before and after). Large images gain nothing from batching on a CPU.


class OutlierError(ExportError):
    """Outlier handling cannot be applied to this model or was asked for wrongly."""


Measure = Callable[[nn.Module], float]  # a float candidate model -> its int8 error (lower is better)


@dataclass(frozen=True)
class NormSite:
    """A LayerNorm and the layers that take its output on their input channels."""

    norm: str  # module name, e.g. "encoder.stages.0.blocks.0.norm1"
    consumers: tuple[str, ...]  # e.g. ("encoder.stages.0.blocks.0.attn.q", "encoder.stages.0.blocks.0.attn.sr")


def norm_sites(model: nn.Module) -> tuple[list[NormSite], list[dict[str, str]]]:
    """Every LayerNorm of a SegFormer whose output feeds only linear/conv layers, and the ones skipped (why)."""
    if not isinstance(model, SegFormer):
        raise OutlierError(f"outlier handling rewrites a SegFormer, not a {type(model).__name__}; pass --outliers none")
    sites: list[NormSite] = []
    skipped: list[dict[str, str]] = []
    stages = model.encoder.stages
    for i, stage in enumerate(stages):
        prefix = f"encoder.stages.{i}"
        skipped.append({"norm": f"{prefix}.patch_embed.norm",
                        "why": "feeds the residual stream (an addition and the next LayerNorm): no weight to fold into"})  # fmt: skip
        for j, block in enumerate(stage.blocks):
            b = f"{prefix}.blocks.{j}"
            if block.attn.sr_ratio > 1:
                sites.append(NormSite(f"{b}.norm1", (f"{b}.attn.q", f"{b}.attn.sr")))
                sites.append(NormSite(f"{b}.attn.sr_norm", (f"{b}.attn.k", f"{b}.attn.v")))
            else:
                sites.append(NormSite(f"{b}.norm1", (f"{b}.attn.q", f"{b}.attn.k", f"{b}.attn.v")))
            sites.append(NormSite(f"{b}.norm2", (f"{b}.mlp.fc1",)))
        consumers = [f"decoder.linear_c.{i}"]
        if i + 1 < len(stages):
            consumers.insert(0, f"encoder.stages.{i + 1}.patch_embed.proj")
        sites.append(NormSite(f"{prefix}.norm", tuple(consumers)))
    modules = dict(model.named_modules())
    for site in sites:  # the layout this module relies on, checked rather than assumed
        if not isinstance(modules.get(site.norm), nn.LayerNorm):
            raise OutlierError(f"{site.norm} is not a LayerNorm in this model; pass --outliers none")
        for name in site.consumers:
            layer = modules.get(name)
            if not isinstance(layer, (nn.Linear, nn.Conv2d)) or (isinstance(layer, nn.Conv2d) and layer.groups != 1):
                raise OutlierError(f"{name} is not a linear or dense conv layer; pass --outliers none")
    return sites, skipped


# -------------------------------------------------------------------------------------------------
# The rewrite: per-channel factors moved between a LayerNorm and its consumers


def _input_channel_view(layer: nn.Module, s: Tensor) -> Tensor:
    """``s`` (C,) shaped to broadcast over the input-channel axis of a linear (out, in) or conv (out, in, kh, kw) weight."""
    return s.reshape(1, -1) if isinstance(layer, nn.Linear) else s.reshape(1, -1, 1, 1)


@torch.no_grad()
def migrate(model: nn.Module, site: NormSite, s: Tensor) -> None:
    """In place: the LayerNorm's output channels divided by ``s`` (C,), its consumers' inputs multiplied by it.

    ``LN(x) * gamma / s`` feeds ``W * s``: the same function, with ``s`` moved from the activation into the
    weights. A zero-padded conv consumer stays exact (a padded zero divided by ``s`` is still zero).
    """
    modules = dict(model.named_modules())
    norm = modules[site.norm]
    norm.weight.div_(s)  # (C,)
    norm.bias.div_(s)  # (C,)
    for name in site.consumers:
        layer = modules[name]
        layer.weight.mul_(_input_channel_view(layer, s))  # (out, C[, kh, kw]) * (1, C[, 1, 1])


def search_images(inputs: Tensor, pixels: int = SEARCH_PIXELS, most: int = SEARCH_IMAGES) -> int:
    """How many of the calibration images (N, 3, H, W) a pass of the decision runs on: ``most``, fewer where they
    would hold more than ``pixels`` input pixels, never fewer than :data:`MIN_SEARCH` (nor than there are)."""
    per_image = max(1, inputs.shape[-2] * inputs.shape[-1])
    return min(len(inputs), max(MIN_SEARCH, min(most, pixels // per_image)))


def _batch_size(inputs: Tensor) -> int:
    """Images per forward pass for inputs (N, 3, H, W): BATCH, fewer where that would pass BATCH_PIXELS."""
    return max(1, min(BATCH, BATCH_PIXELS // max(1, inputs.shape[-2] * inputs.shape[-1])))


def _batches(inputs: Tensor) -> Iterator[Tensor]:
    size = _batch_size(inputs)
    for start in range(0, len(inputs), size):
        yield inputs[start : start + size]  # (b, 3, H, W)


@torch.no_grad()
def channel_absmax(model: nn.Module, inputs: Tensor, sites: list[NormSite]) -> dict[str, Tensor]:
    """Per LayerNorm, the largest |output| of each channel over the inputs (N, 3, H, W): {norm: (C,)}."""
    modules = dict(model.named_modules())
    stats: dict[str, Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, out: Tensor) -> None:
            amax = out.detach().abs().flatten(0, -2).amax(0)  # (B, N, C) -> (C,)
            stats[name] = amax if name not in stats else torch.maximum(stats[name], amax)

        return record

    handles = [modules[site.norm].register_forward_hook(hook(site.norm)) for site in sites]
    try:
        for batch in _batches(inputs):
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _weight_absmax(model: nn.Module, site: NormSite) -> Tensor:
    """The largest |weight| on each input channel over all of a site's consumers: (C,)."""
    modules = dict(model.named_modules())
    per_layer = []
    for name in site.consumers:
        w = modules[name].weight.detach()  # (out, C) or (out, C, kh, kw)
        per_layer.append(w.abs().transpose(0, 1).flatten(1).amax(1))  # -> (C,)
    return torch.stack(per_layer).amax(0)  # (C,)


def outlier_ratio(amax: Tensor) -> float:
    """How far the largest channel stands out: max over median of the per-channel |activation| maxima."""
    return float(amax.max() / amax.median().clamp(min=1e-12))


def _smooth_factors(model: nn.Module, site: NormSite, absmax: dict[str, Tensor], alpha: float) -> Tensor:
    """SmoothQuant's per-channel factors of strength ``alpha`` at one site: ``max|X_c|^a / max|W_c|^(1-a)``, (C,)."""
    act = absmax[site.norm].clamp(min=1e-5)  # (C,)
    weight = _weight_absmax(model, site).clamp(min=1e-5)  # (C,)
    return (act.pow(alpha) / weight.pow(1.0 - alpha)).clamp(min=1e-5)  # (C,)


@torch.no_grad()
def smooth(model: nn.Module, sites: list[NormSite], absmax: dict[str, Tensor], alpha: float) -> list[dict[str, Any]]:
    """In place: SmoothQuant migration of strength ``alpha`` at every site; returns what each site got."""
    if not 0.0 <= alpha <= 1.0:
        raise OutlierError(f"SmoothQuant strength {alpha}: choose a value in 0..1")
    layers = []
    for site in sites:
        act = absmax[site.norm].clamp(min=1e-5)  # (C,)
        s = _smooth_factors(model, site, absmax, alpha)  # (C,)
        migrate(model, site, s)
        layers.append({"norm": site.norm, "consumers": list(site.consumers), "outlier_ratio_before": outlier_ratio(act),
                       "outlier_ratio_after": outlier_ratio(act / s), "scale_range": [float(s.min()), float(s.max())]})  # fmt: skip
    return layers


@torch.no_grad()
def inject_outliers(model: SegFormer, factors: tuple[float, ...] = (100.0, 60.0, 30.0), *, seed: int = 0,
                    stage_norms: bool = True) -> SegFormer:  # fmt: skip
    """A deep copy whose float function is unchanged but whose LayerNorm outputs carry outlier channels.

    The reverse of :func:`smooth`, for tests and benchmarks: at every site (every block's ``norm1``,
    ``sr_norm`` and ``norm2``, and the stage norms where ``stage_norms``), ``len(factors)`` channels picked
    by ``seed`` are multiplied by ``factors`` in the LayerNorm affine and divided out of the consumers'
    input-channel weights.
    """
    model = copy.deepcopy(model).eval()
    sites, _ = norm_sites(model)
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    for site in sites:
        if not stage_norms and ".blocks." not in site.norm:
            continue
        c = modules[site.norm].weight.numel()
        s = torch.ones(c)
        channels = torch.randperm(c, generator=generator)[: len(factors)]
        s[channels] = 1.0 / torch.tensor(factors[: len(channels)], dtype=s.dtype)
        migrate(model, site, s)
    return model


# -------------------------------------------------------------------------------------------------
# Weight quantization error and bias correction


def quantize_weight(w: Tensor, granularity: str = "per_channel") -> Tensor:
    """Symmetric int8 fake quantization of a weight (out, ...): one scale per output channel or per tensor."""
    if granularity == "per_channel":
        amax = w.abs().flatten(1).amax(1).reshape(-1, *([1] * (w.ndim - 1)))  # (out, 1, ...)
    else:
        amax = w.abs().amax()
    scale = amax.clamp(min=1e-12) / 127.0
    return (w / scale).round().clamp(-127, 127) * scale


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _apply(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """``layer`` with ``weight`` and no bias on ``x``."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight)  # (..., in) -> (..., out)
    return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)  # (B, out, H', W')


def _plain_conv(layer: nn.Module) -> bool:
    """A conv whose input :func:`_row_sums` reads: zero, numeric padding."""
    return isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)


def _taps(size: int, kernel: int, stride: int, dilation: int, padding: int) -> list[slice]:
    """Per kernel tap, the slice of an input axis of ``size`` that the tap reads over every output position (the
    positions that fall in the zero padding read nothing)."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    taps = []
    for k in range(kernel):
        offset = k * dilation - padding  # input index read by output position o: o * stride + offset
        first = max(0, -(offset // stride))  # the first o whose index is >= 0: ceil(-offset / stride)
        last = min(out - 1, (size - 1 - offset) // stride)  # the last o whose index is < size
        taps.append(slice(first * stride + offset, last * stride + offset + 1, stride) if last >= first else slice(0, 0))
    return taps


def _row_sums(layer: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """``layer``'s input rows summed over all its rows, float64 out of float32 sums (torch sums float32 in cascades,
    ~10x faster than in float64): (in,) over the tokens of a linear, (C, kh, kw) over a conv's output positions (each
    position's patch, zero padding included), read from strided slices of the input, never unfolded; and how many rows."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).sum(0).double(), x.numel() // x.shape[-1]
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = layer.kernel_size, layer.stride, layer.dilation, layer.padding
    rows, cols = _taps(x.shape[2], kh, sh, dh, ph), _taps(x.shape[3], kw, sw, dw, pw)
    sums = torch.zeros(x.shape[1], kh, kw, dtype=torch.float64)  # (C, kh, kw)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            sums[:, i, j] = x[:, :, r, c].sum((0, 2, 3))
    out_h = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return sums, x.shape[0] * out_h * out_w


def _rows(layer: nn.Module, y: Tensor) -> Tensor:
    """A linear's or conv's output as rows (M, out): tokens, or output positions."""
    return y.flatten(0, -2) if isinstance(layer, nn.Linear) else y.transpose(0, 1).flatten(1).T


class _RowSums:
    """Per biased linear/conv layer, its input rows summed over a pass (:func:`_row_sums`) and how many rows: what
    ``E[(Wq - W) x]`` is computed from, for the model of the pass or a SmoothQuant rewrite of it (:meth:`shifts`)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def hook(self, name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if isinstance(module, nn.Conv2d) and not _plain_conv(module):
                raise OutlierError(f"{name}: bias statistics read zero-padded convolutions only, not padding {module.padding!r} ({module.padding_mode})")
            total, rows = _row_sums(module, args[0])
            self.sums[name] = self.sums.get(name, 0) + total
            self.counts[name] = self.counts.get(name, 0) + rows

        return record

    @torch.no_grad()
    def shifts(self, model: nn.Module, weights: str, scaled: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Per layer of ``model`` (the pass's model, or its SmoothQuant rewrite: ``scaled`` maps each consumer to the
        factors (C,) its input channels were divided by, its weight multiplied by), ``E[(Wq - W) x]`` (out,): exact,
        since a layer is linear in its input."""
        shifts = {}
        for name, m in _layers(model):
            if m.bias is None or name not in self.sums:
                continue
            total = self.sums[name]  # (in,) or (C, kh, kw)
            if scaled is not None and name in scaled:
                total = total / scaled[name].double().reshape(-1, *([1] * (total.ndim - 1)))  # the input it sees: x / s
            groups = m.groups if isinstance(m, nn.Conv2d) else 1
            dw = (quantize_weight(m.weight, weights) - m.weight).double().reshape(groups, m.weight.shape[0] // groups, -1)  # (g, out/g, in/g)
            shifts[name] = ((dw @ total.reshape(groups, -1, 1)).flatten() / self.counts[name]).to(m.bias.dtype)  # (out,)
        return shifts


@torch.no_grad()
def bias_statistics(model: nn.Module, inputs: Tensor, weights: str = "per_channel",
                    ranges: dict[str, tuple[float, float]] | None = None,
                    search: int = SEARCH_IMAGES) -> tuple[dict[str, Tensor], float | None]:  # fmt: skip
    """Per biased linear/conv layer, the mean output error its int8 weights add, ``E[(Wq - W) x]`` (out,), and the
    most that correcting it lowers any one layer's own error (a fraction; an upper bound of what it can do).

    The expectation is over the calibration inputs (N, 3, H, W) as the float model sees them, per output channel (over
    batch, tokens and positions). A layer is linear in its input: the expectation is ``(Wq - W)`` applied to the mean
    input row (a conv's mean patch), exact, without running the layer again. A layer's own error is its weight-rounding
    error, or, with ``ranges`` (each layer's int8 input range), its whole simulated W8A8 error ``Wq Q(x) - W x`` on the
    first ``search`` images (those the measure runs on): subtracting ``mu`` from an error ``e`` of mean ``m`` over ``M``
    outputs lowers ``sum |e|^2`` by ``M (2 m.mu - |mu|^2)``.
    """
    layers = [(name, m) for name, m in _layers(model) if m.bias is not None]
    quantized = {name: quantize_weight(m.weight, weights) for name, m in layers}
    sums = _RowSums()
    totals: dict[str, Tensor] = {}  # over the search images: the sum of the whole error, its energy, its count
    energy: dict[str, float] = {}
    searched: dict[str, int] = {}
    whole = [ranges is not None]

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            if not whole[0]:
                return
            simulated = _apply(module, _fake_quant(args[0], *ranges[name]), quantized[name])  # type: ignore[index]
            total = _rows(module, simulated) - (_rows(module, out) - module.bias)  # (M, out): Wq Q(x) - W x
            totals[name] = totals.get(name, 0) + total.sum(0, dtype=torch.float64)  # (out,)
            energy[name] = energy.get(name, 0.0) + float(total.pow(2).sum(dtype=torch.float64))
            searched[name] = searched.get(name, 0) + total.shape[0]

        return record

    handles = [m.register_forward_pre_hook(sums.hook(name)) for name, m in layers]
    handles += [m.register_forward_hook(hook(name)) for name, m in layers]
    try:
        for batch in _batches(inputs[:search]):
            model(batch)
        whole[0] = False
        for batch in _batches(inputs[search:]):
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    shifts = sums.shifts(model, weights)
    gain = 0.0
    for name, m in layers:
        if name in totals:
            mu = shifts[name].double()
            drop = searched[name] * float(2 * (totals[name] / searched[name]).dot(mu) - mu.dot(mu))
            gain = max(gain, drop / max(energy[name], 1e-30))
    return shifts, gain if ranges is not None else None


@torch.no_grad()
def shift_biases(model: nn.Module, shifts: dict[str, Tensor]) -> None:
    """In place: each named layer's bias minus its shift (out,)."""
    modules = dict(model.named_modules())
    for name, shift in shifts.items():
        modules[name].bias.sub_(shift.to(modules[name].bias.dtype))


@torch.no_grad()
def correct_bias(model: nn.Module, inputs: Tensor, weights: str = "per_channel") -> dict[str, Any]:
    """In place: every linear/conv bias minus the mean output error its int8 weights add, ``E[(Wq - W) x]``.

    See :func:`bias_statistics`. Layers without a bias are left alone.
    """
    shifts, _ = bias_statistics(model, inputs, weights)
    shift_biases(model, shifts)
    return _bias_info(shifts, weights)


def _bias_info(shifts: dict[str, Tensor], weights: str) -> dict[str, Any]:
    return {"layers": len(shifts), "weights": weights, "largest_shift": max((float(s.abs().max()) for s in shifts.values()), default=0.0)}


# -------------------------------------------------------------------------------------------------
# The measure: simulated W8A8 against the float logits


def _fake_quant(x: Tensor, lo: Tensor | float, hi: Tensor | float) -> Tensor:
    """Affine 8-bit fake quantization of ``x`` on the range [lo, hi] (which holds 0); ranges broadcast."""
    scale = torch.as_tensor(hi - lo).clamp(min=1e-8) / 255.0
    zero = (-lo / scale).round()
    return ((x / scale).round() + zero).clamp(0, 255).sub(zero).mul(scale)


def _mse_range(sample: Tensor, lo: float, hi: float) -> tuple[float, float]:
    """The range [r * lo, r * hi] that quantizes ``sample`` (M,) with the least squared error."""
    r = torch.linspace(1.0, 0.05, 24).reshape(-1, 1)  # (R, 1) candidate shrink ratios
    err = (_fake_quant(sample.reshape(1, -1), r * lo, r * hi) - sample).pow(2).sum(1)  # (R, M) -> (R,)
    best = float(r[int(err.argmin()), 0])
    return best * lo, best * hi


class SimulatedInt8:
    """A measure of how much a candidate model loses in W8A8: the noise-to-signal ratio of its logits.

    Every linear and conv runs on int8-fake-quantized weights (symmetric, ``weights`` granularity) and
    inputs (per-tensor affine, range searched for the least squared error over the calibration
    activations, as ``mse`` observers do). The error is ``sum((y_q - y)^2) / sum(y^2)`` over the images,
    ``y`` the original float model's logits.
    """

    metric = "logits noise-to-signal ratio of simulated W8A8 (per-tensor affine int8 inputs, MSE ranges; symmetric int8 weights)"

    def __init__(self, inputs: Tensor, reference: Tensor, weights: str = "per_channel", sample: int = 1 << 13) -> None:
        self.inputs = inputs  # (N, 3, H, W)
        self.reference = reference  # (N, K, H/4, W/4), the float model's logits
        self.weights = weights
        self.sample = sample

    @torch.no_grad()
    def __call__(self, model: nn.Module, ranges: dict[str, tuple[float, float]] | None = None) -> float:
        """The error of ``model``; ``ranges`` (per layer, its input range) where they are known already (a rewrite
        that keeps every other layer's float input the same), else searched on the images first (one more pass)."""
        model = copy.deepcopy(model).eval()
        layers = _layers(model)
        if ranges is None:
            ranges = self._ranges(model, layers)
        for _, m in layers:
            m.weight.copy_(quantize_weight(m.weight, self.weights))
        handles = [m.register_forward_pre_hook(lambda mod, args, r=ranges[name]: (_fake_quant(args[0], *r),))
                   for name, m in layers]  # fmt: skip
        try:
            out = torch.cat([model(batch) for batch in _batches(self.inputs)])  # (N, K, H/4, W/4)
        finally:
            for handle in handles:
                handle.remove()
        return float((out - self.reference).double().pow(2).sum() / self.reference.double().pow(2).sum().clamp(min=1e-30))

    def _ranges(self, model: nn.Module, layers: list[tuple[str, nn.Module]]) -> dict[str, tuple[float, float]]:
        """Per layer, the MSE-searched input range over the calibration activations (float model)."""
        recorder = _RangeRecorder(self.sample)
        handles = [m.register_forward_pre_hook(recorder.hook(name)) for name, m in layers]
        try:
            for batch in _batches(self.inputs):
                model(batch)
        finally:
            for handle in handles:
                handle.remove()
        return recorder.ranges()


class _RangeRecorder:
    """Per layer, the range of its inputs over a pass (holding 0) and a strided sample of them; then the MSE range."""

    def __init__(self, sample: int = 1 << 13) -> None:
        self.sample = sample
        self.lows: dict[str, float] = {}
        self.highs: dict[str, float] = {}
        self.samples: dict[str, list[Tensor]] = {}
        self.active = True

    def hook(self, name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if not self.active:
                return
            x = args[0].detach().flatten()  # (M,)
            self.lows[name] = min(self.lows.get(name, 0.0), float(x.min()))
            self.highs[name] = max(self.highs.get(name, 0.0), float(x.max()))
            step = max(1, x.numel() // self.sample)
            self.samples.setdefault(name, []).append(x[::step].clone())

        return record

    def ranges(self) -> dict[str, tuple[float, float]]:
        ranges = {}
        for name, parts in self.samples.items():
            sample = torch.cat(parts)  # (M,)
            ranges[name] = _mse_range(sample[:: max(1, sample.numel() // self.sample)], self.lows[name], self.highs[name])
        return ranges


# -------------------------------------------------------------------------------------------------
# The local measure: each site's consumers in simulated W8A8, on activations cached once

LOCAL_ROWS = 2048  # sampled tokens (linear consumers) or output positions (conv consumers) per consumer
PATCH_FLOATS = 1 << 20  # at most this many floats of cached input patches per conv consumer (4 MiB)
RANGE_SAMPLE = 1 << 13  # values the MSE range search runs on, as SimulatedInt8


@dataclass
class _SiteSample:
    """What the local measure needs of one LayerNorm site, cached from one float pass over the search images."""

    lo: Tensor  # (C,) per-channel minimum of the LayerNorm output
    hi: Tensor  # (C,) per-channel maximum
    tokens: Tensor  # (M, C) sampled LayerNorm output tokens (the range search's sample)
    inputs: dict[str, Tensor]  # consumer -> its sampled input rows: (M, C) for a linear, (M, C*kh*kw) patches for a conv
    outputs: dict[str, Tensor] = field(default_factory=dict)  # consumer -> its float outputs on them (M, out), bias aside


@dataclass
class _Capture:
    absmax: dict[str, Tensor]  # per site, (C,) over all calibration images (as channel_absmax)
    reference: Tensor  # (n, K, H/4, W/4) float logits of the search images
    samples: dict[str, _SiteSample]  # per site
    ranges: dict[str, tuple[float, float]]  # per linear/conv layer, its input range as SimulatedInt8 searches it
    row_sums: _RowSums  # per biased linear/conv layer, its input rows summed over all calibration images


def _take(rows: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``k`` rows of ``rows`` (M, D) drawn without replacement (all of them where there are fewer): (k, D)."""
    if rows.shape[0] <= k:
        return rows.clone()
    return rows[torch.randperm(rows.shape[0], generator=generator)[:k]].clone()


@torch.no_grad()
def _capture(model: nn.Module, inputs: Tensor, sites: list[NormSite], search: int) -> _Capture:
    """One float pass over the calibration images: every site's channel maxima (all images), and for the first
    ``search`` images their logits, each LayerNorm output's per-channel range and sampled tokens, and each
    consumer's sampled inputs (im2col patches for convs). Memory is bounded by the samples, not the image count."""
    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(0)
    batches = -(-min(len(inputs), search) // _batch_size(inputs))
    absmax: dict[str, Tensor] = {}
    lo: dict[str, Tensor] = {}
    hi: dict[str, Tensor] = {}
    tokens: dict[str, list[Tensor]] = {site.norm: [] for site in sites}
    consumed: dict[str, list[Tensor]] = {name: [] for site in sites for name in site.consumers}
    searching = [True]

    def norm_hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, out: Tensor) -> None:
            t = out.detach().flatten(0, -2)  # (B, N, C) -> (B * N, C)
            amax = t.abs().amax(0)  # (C,)
            absmax[name] = amax if name not in absmax else torch.maximum(absmax[name], amax)
            if searching[0]:
                low, high = t.amin(0), t.amax(0)  # (C,)
                lo[name] = low if name not in lo else torch.minimum(lo[name], low)
                hi[name] = high if name not in hi else torch.maximum(hi[name], high)
                tokens[name].append(_take(t, -(-LOCAL_ROWS // batches), generator))

        return record

    def consumer_hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if not searching[0]:
                return
            x = args[0].detach()
            if isinstance(module, nn.Linear):
                rows = x.flatten(0, -2)  # (B * N, C)
                cap = LOCAL_ROWS
            else:
                cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (B, C*kh*kw, L)
                rows = cols.transpose(1, 2).flatten(0, 1)  # (B * L, C*kh*kw)
                cap = max(1, min(LOCAL_ROWS, PATCH_FLOATS // rows.shape[1]))
            consumed[name].append(_take(rows, -(-cap // batches), generator))

        return record

    recorder = _RangeRecorder(RANGE_SAMPLE)  # every layer's input range, as SimulatedInt8 searches it
    row_sums = _RowSums()  # what bias correction's shifts are computed from, without a pass of their own
    handles = [modules[site.norm].register_forward_hook(norm_hook(site.norm)) for site in sites]
    handles += [m.register_forward_pre_hook(row_sums.hook(name)) for name, m in _layers(model) if m.bias is not None]
    handles += [modules[name].register_forward_pre_hook(consumer_hook(name)) for name in consumed]
    handles += [m.register_forward_pre_hook(recorder.hook(name)) for name, m in _layers(model)]
    reference = []
    try:
        for batch in _batches(inputs[:search]):
            reference.append(model(batch))  # (b, K, H/4, W/4)
        searching[0] = recorder.active = False
        for batch in _batches(inputs[search:]):
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    samples = {site.norm: _SiteSample(lo[site.norm], hi[site.norm], torch.cat(tokens[site.norm]),
                                      {name: torch.cat(consumed[name]) for name in site.consumers})
               for site in sites}  # fmt: skip
    return _Capture(absmax, torch.cat(reference), samples, recorder.ranges(), row_sums)


@torch.no_grad()
def _site_error(modules: dict[str, nn.Module], site: NormSite, sample: _SiteSample, s: Tensor | None,
                weights: str) -> tuple[float, tuple[float, float]]:  # fmt: skip
    """Noise-to-signal ratio of a site's consumers' outputs (bias aside) in simulated W8A8 with factors ``s`` (C,)
    migrated (none: ``s`` is None), against their float outputs, on the cached samples; and the consumers' input
    range it used."""
    s = torch.ones_like(sample.lo) if s is None else s  # (C,)
    low = min(0.0, float((sample.lo / s).min()))  # the per-tensor range of LN(x) / s: exact, since s > 0
    high = max(0.0, float((sample.hi / s).max()))
    values = (sample.tokens / s).flatten()  # (M * C,)
    low, high = _mse_range(values[:: max(1, values.numel() // RANGE_SAMPLE)], low, high)
    noise = signal = 0.0
    for name in site.consumers:
        layer = modules[name]
        w = layer.weight.flatten(1)  # (out, C) or (out, C*kh*kw): unfold's column order is (C, kh, kw)
        per_column = s.repeat_interleave(w.shape[1] // s.numel())  # (C*kh*kw,)
        x = sample.inputs[name]  # (M, C*k)
        if name not in sample.outputs:  # the float outputs are the same for every candidate: computed once
            sample.outputs[name] = x @ w.T  # (M, out)
        ref = sample.outputs[name]
        out = _fake_quant(x / per_column, low, high) @ quantize_weight(w * per_column, weights).T  # (M, out)
        noise += float((out - ref).pow(2).sum(dtype=torch.float64))
        signal += float(ref.pow(2).sum(dtype=torch.float64))
    return noise / max(signal, 1e-30), (low, high)


# -------------------------------------------------------------------------------------------------
# The choice


@torch.no_grad()
def _check_preserved(original: nn.Module, rewritten: nn.Module, inputs: Tensor) -> float:
    """The largest |logit difference| relative to the largest |logit|; raises where the rewrite changed the function."""
    x = inputs[: _batch_size(inputs)]  # (b, 3, H, W)
    ref, out = original(x), rewritten(x)  # (b, K, H/4, W/4)
    diff = float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
    if not diff <= 1e-4:
        raise OutlierError(f"the SmoothQuant rewrite changed the float logits by {diff:.2e} (relative); pass --outliers none")
    return diff


STRATEGIES = ("local", "full")
DECISION_FORMAT = "segformer-edge-outlier-decision/2"  # 2: images bounded by pixels


@dataclass
class OutlierDecision:
    """What ``--outliers`` chose for one model and calibration set, and what it measured: enough to redo the
    rewrite without measuring again (:meth:`apply`), and small (no model weights).

    ``arrays`` holds, where SmoothQuant is applied, each site's measured channel maxima (``absmax/<norm>``, (C,)),
    from which the factors follow at the recorded strength; where bias correction is applied, each layer's
    measured mean int8 weight error (``bias/<layer>``, (out,)).
    """

    record: dict[str, Any]
    arrays: dict[str, Tensor]

    def apply(self, model: SegFormer) -> SegFormer:
        """The rewrite the decision records, on a deep copy of ``model`` (``model`` itself where nothing is applied)."""
        applied = self.record.get("applied", [])
        model = model.eval()
        if not applied:
            return model
        model = copy.deepcopy(model).eval()
        try:
            if "smoothquant" in applied:
                sites, _ = norm_sites(model)
                smooth(model, sites, {site.norm: self.arrays[f"absmax/{site.norm}"] for site in sites},
                       float(self.record["smoothquant"]["alpha"]))  # fmt: skip
            if "bias_correction" in applied:
                shift_biases(model, {k.removeprefix("bias/"): v for k, v in self.arrays.items() if k.startswith("bias/")})
        except (KeyError, RuntimeError) as exc:
            raise OutlierError(f"the recorded outlier decision does not fit this model ({exc}); delete it to measure again") from exc
        return model

    def to_json(self, key: dict[str, str]) -> dict[str, Any]:
        """The decision as JSON: the record, the key it was made for, the arrays as base64 little-endian float32."""
        arrays = {name: {"shape": list(t.shape), "float32_le": base64.b64encode(t.detach().cpu().float().numpy().astype("<f4").tobytes()).decode()}
                  for name, t in self.arrays.items()}  # fmt: skip
        return {"format": DECISION_FORMAT, "key": key, "record": self.record, "arrays": arrays}

    @classmethod
    def from_json(cls, data: dict[str, Any], key: dict[str, str]) -> OutlierDecision | None:
        """The decision in ``data`` if it was made for ``key`` and reads whole; None otherwise."""
        try:
            if data.get("format") != DECISION_FORMAT or data.get("key") != key:
                return None
            arrays = {name: torch.from_numpy(np.frombuffer(base64.b64decode(a["float32_le"]), dtype="<f4").copy()).reshape(a["shape"])
                      for name, a in data["arrays"].items()}  # fmt: skip
            return cls(dict(data["record"]), arrays)
        except (KeyError, TypeError, ValueError, RuntimeError, binascii.Error):
            return None


def decide_outliers(
    model: SegFormer,
    inputs: Tensor,
    mode: str = "auto",
    *,
    weights: str = "per_channel",
    measure: Measure | None = None,
    alphas: tuple[float, ...] = ALPHAS,
    min_gain: float = MIN_GAIN,
    strategy: str = "local",
) -> OutlierDecision:
    """What ``mode`` chooses for ``model`` on the calibration images, and what was measured (see :func:`handle_outliers`).

    ``strategy`` ``local`` (the default) searches the SmoothQuant strength per site on activations cached in one
    float pass, then measures the whole model only for the baseline and for a candidate that can still win;
    ``full`` measures the whole model in simulated W8A8 for every candidate (the search before, kept as the
    benchmark's baseline).
    """
    if mode not in OUTLIER_MODES:
        raise OutlierError(f"--outliers {mode}: choose one of {', '.join(OUTLIER_MODES)}")
    if strategy not in STRATEGIES:
        raise OutlierError(f"outlier search strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if not alphas:
        raise OutlierError("SmoothQuant needs at least one strength to try")
    started = time.perf_counter()
    model = model.eval()
    if mode == "none":
        return OutlierDecision({"mode": "none", "applied": []}, {})
    sites, skipped = norm_sites(model)
    calibration_images = len(inputs)
    search = search_images(inputs)
    inputs = inputs[: search_images(inputs, STAT_PIXELS, len(inputs))]  # (n, 3, H, W): what the statistics see
    if strategy == "local":
        captured = _capture(model, inputs, sites, search)
        reference, absmax = captured.reference, captured.absmax
    else:
        with torch.no_grad():
            reference = torch.cat([model(b) for b in _batches(inputs[:search])])  # (n, K, H/4, W/4)
    measured_with = "caller's measure" if measure is not None else SimulatedInt8.metric
    simulated = measure is None and strategy == "local"  # its input ranges are known from the capture pass
    if measure is None:
        measure = SimulatedInt8(inputs[:search], reference, weights)
    want_smooth = mode in ("auto", "smoothquant", "smoothquant+bias_correction")
    want_bias = mode in ("auto", "bias_correction", "smoothquant+bias_correction")
    before = measure(model, ranges=captured.ranges) if simulated else measure(model)  # type: ignore[call-arg]
    record: dict[str, Any] = {"mode": mode, "applied": [], "metric": measured_with, "images": search,
                              "statistics_images": len(inputs), "calibration_images": calibration_images,
                              "strategy": strategy, "error_before": before}  # fmt: skip
    arrays: dict[str, Tensor] = {}
    best, best_err = model, before
    if want_smooth:
        if strategy == "local":
            modules = dict(model.named_modules())
            plain = {site.norm: _site_error(modules, site, captured.samples[site.norm], None, weights)[0] for site in sites}
            candidates: dict[str, float] = {}
            gains: dict[str, float] = {}
            site_ranges: dict[str, dict[str, tuple[float, float]]] = {}  # per strength, each consumer's input range
            for a in alphas:
                errors = {}
                for site in sites:
                    s = _smooth_factors(model, site, absmax, a)  # (C,)
                    errors[site.norm], span = _site_error(modules, site, captured.samples[site.norm], s, weights)
                    site_ranges.setdefault(f"{a:g}", {}).update({name: span for name in site.consumers})
                candidates[f"{a:g}"] = sum(errors.values()) / len(errors)
                gains[f"{a:g}"] = max(1.0 - errors[n] / max(plain[n], 1e-30) for n in errors)
                logger.info("outliers: SmoothQuant a=%g: local error %.4g (none: %.4g)", a, candidates[f"{a:g}"],
                            sum(plain.values()) / len(plain))  # fmt: skip
            alpha = min(alphas, key=lambda a: candidates[f"{a:g}"])
            smooth_record: dict[str, Any] = {
                "alpha": alpha, "candidates": candidates,
                "search": f"per LayerNorm site, its consumers in simulated W8A8 on up to {LOCAL_ROWS} sampled inputs each; "
                          "candidates: the mean over sites of their outputs' noise-to-signal ratio",
                "local_error_none": sum(plain.values()) / len(plain), "largest_site_gain": gains[f"{alpha:g}"],
            }  # fmt: skip
            if mode == "auto" and gains[f"{alpha:g}"] < min_gain:
                # The rewrite changes only the noise of the sites' consumers: where none of them loses min_gain of
                # its error, the model's error (their sum, carried to the logits) cannot fall by min_gain either.
                smooth_record.update(applied=False, stopped=f"no site's local error falls by {min_gain:.0%}: it cannot win")
                record["smoothquant"] = smooth_record
            else:
                candidate = copy.deepcopy(model)
                layers = smooth(candidate, sites, absmax, alpha)
                # The rewrite keeps every other layer's float input as it was: only its consumers' ranges change.
                ranges = {**captured.ranges, **site_ranges[f"{alpha:g}"]}
                err = measure(candidate, ranges=ranges) if simulated else measure(candidate)  # type: ignore[call-arg]
                logger.info("outliers: SmoothQuant a=%g: error %.4g (none: %.4g)", alpha, err, before)
                smooth_record["error"] = err
                chosen: tuple[float, float, SegFormer, list[dict[str, Any]]] | None = (err, alpha, candidate, layers)
                record["smoothquant"] = smooth_record
        else:
            absmax = channel_absmax(model, inputs, sites)
            candidates = {}
            chosen = None  # (error, alpha, model, layers)
            for a in alphas:
                candidate = copy.deepcopy(model)
                layers = smooth(candidate, sites, absmax, a)
                candidates[f"{a:g}"] = err = measure(candidate)
                logger.info("outliers: SmoothQuant a=%g: error %.4g (none: %.4g)", a, err, before)
                if chosen is None or err < chosen[0]:
                    chosen = (err, a, candidate, layers)  # only the best copy is kept (memory)
            record["smoothquant"] = {"alpha": chosen[1], "candidates": candidates}  # type: ignore[index]
        if "applied" not in record["smoothquant"]:
            err, alpha, candidate, layers = chosen  # type: ignore[misc]  # alphas is not empty
            keep = mode != "auto" or err <= (1.0 - min_gain) * before
            record["smoothquant"]["applied"] = keep
            if keep:
                record["smoothquant"].update({"max_logit_change": _check_preserved(model, candidate, inputs), "layers": layers,
                                              "skipped": skipped})  # fmt: skip
                record["applied"].append("smoothquant")
                arrays.update({f"absmax/{site.norm}": absmax[site.norm] for site in sites})
                best, best_err = candidate, err
    if want_bias:
        if strategy == "local":  # the shifts follow from the capture pass's summed layer inputs: no pass of their own
            scaled = None
            if best is not model:  # SmoothQuant applied: its consumers see x / s
                factors = {site.norm: _smooth_factors(model, site, absmax, record["smoothquant"]["alpha"]) for site in sites}
                scaled = {name: factors[site.norm] for site in sites for name in site.consumers}
            shifts = captured.row_sums.shifts(best, weights, scaled)
        else:
            shifts, _ = bias_statistics(best, inputs, weights)
        info = _bias_info(shifts, weights)
        # Measured on the whole model: a bound from each layer's own error (one more pass over the search images, as
        # costly as the measure) stopped it no sooner. Each layer's input range is the uncorrected model's: a shift
        # moves an output by its mean weight error (b2's largest: 0.01), not its range.
        candidate = copy.deepcopy(best)
        shift_biases(candidate, shifts)
        if simulated:
            err = measure(candidate, ranges=ranges if best is not model else captured.ranges)  # type: ignore[call-arg]
        else:
            err = measure(candidate)
        logger.info("outliers: bias correction: error %.4g (without: %.4g)", err, best_err)
        keep = mode != "auto" or err <= (1.0 - min_gain) * best_err
        record["bias_correction"] = {**info, "error_without": best_err, "error_with": err, "applied": keep}
        if keep:
            record["applied"].append("bias_correction")
            arrays.update({f"bias/{name}": shift for name, shift in shifts.items()})
            best, best_err = candidate, err
    record["error_after"] = best_err
    record["seconds"] = round(time.perf_counter() - started, 2)
    logger.info("outliers: applied %s; measured int8 error %.4g -> %.4g", " + ".join(record["applied"]) or "nothing",
                before, best_err)  # fmt: skip
    return OutlierDecision(record, arrays)


def handle_outliers(
    model: SegFormer,
    inputs: Tensor,
    mode: str = "auto",
    *,
    weights: str = "per_channel",
    measure: Measure | None = None,
    alphas: tuple[float, ...] = ALPHAS,
    min_gain: float = MIN_GAIN,
    strategy: str = "local",
) -> tuple[SegFormer, dict[str, Any]]:
    """The float model rewritten for INT8 as ``mode`` says, and the record of what was done.

    The rewritten model is a deep copy; where nothing is applied it is ``model`` itself (in eval mode).

    Args:
        model: The float SegFormer (eval); it is never modified.
        inputs: The calibration images as the float model's input, (N, 3, H, W) normalised.
        mode: ``none``; ``smoothquant`` and/or ``bias_correction`` (each applied, the strength searched);
            ``auto``: each is applied only where it lowers the measured error by ``min_gain`` or more.
        weights: The int8 weight granularity the target will use (``per_channel`` or ``per_tensor``).
        measure: Error of a candidate float model in int8, lower is better (default :class:`SimulatedInt8`
            on the first :func:`search_images` calibration images).
        alphas: SmoothQuant strengths to search.
        min_gain: For ``auto``, the relative error reduction a rewrite must bring to be kept.
        strategy: ``local`` or ``full`` (see :func:`decide_outliers`).

    Returns:
        (the model to quantize, the record for the manifest: mode, applied, the measured error before and
        after, the strength and its candidates, the rewritten and skipped LayerNorms).
    """
    decision = decide_outliers(model, inputs, mode, weights=weights, measure=measure, alphas=alphas, min_gain=min_gain,
                               strategy=strategy)  # fmt: skip
    return decision.apply(model), decision.record
