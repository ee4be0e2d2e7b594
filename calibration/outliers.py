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

import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segformer_edge.errors import ExportError
from segformer_edge.model import SegFormer

from .spec import OUTLIER_MODES

__all__ = [
    "ALPHAS",
    "OUTLIER_MODES",
    "NormSite",
    "OutlierError",
    "SimulatedInt8",
    "channel_absmax",
    "correct_bias",
    "handle_outliers",
    "inject_outliers",
    "migrate",
    "norm_sites",
    "outlier_ratio",
    "quantize_weight",
    "smooth",
]

logger = logging.getLogger(__name__)

# SmoothQuant strengths searched on the calibration images; 1.0 moves each channel's whole range into the
# weights (RepQ-ViT's scale reparameterization of post-LayerNorm activations). Below 0.5 never won a search.
ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MIN_GAIN = 0.2  # "auto" applies a rewrite only where it lowers the measured error by at least 20% (beyond noise)
SEARCH_IMAGES = 8  # calibration images the strength search runs on (statistics use all of them)
BATCH = 4  # images per forward pass


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


def _batches(inputs: Tensor) -> Iterator[Tensor]:
    for start in range(0, len(inputs), BATCH):
        yield inputs[start : start + BATCH]  # (b, 3, H, W)


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


@torch.no_grad()
def smooth(model: nn.Module, sites: list[NormSite], absmax: dict[str, Tensor], alpha: float) -> list[dict[str, Any]]:
    """In place: SmoothQuant migration of strength ``alpha`` at every site; returns what each site got."""
    if not 0.0 <= alpha <= 1.0:
        raise OutlierError(f"SmoothQuant strength {alpha}: choose a value in 0..1")
    layers = []
    for site in sites:
        act = absmax[site.norm].clamp(min=1e-5)  # (C,)
        weight = _weight_absmax(model, site).clamp(min=1e-5)  # (C,)
        s = (act.pow(alpha) / weight.pow(1.0 - alpha)).clamp(min=1e-5)  # (C,)
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


@torch.no_grad()
def correct_bias(model: nn.Module, inputs: Tensor, weights: str = "per_channel") -> dict[str, Any]:
    """In place: every linear/conv bias minus the mean output error its int8 weights add, ``E[(Wq - W) x]``.

    The expectation is over the calibration inputs (N, 3, H, W) as the float model sees them, per output
    channel (over batch, tokens and positions). Layers without a bias are left alone.
    """
    layers = [(name, m) for name, m in _layers(model) if m.bias is not None]
    deltas = {name: quantize_weight(m.weight, weights) - m.weight for name, m in layers}
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            err = _apply(module, args[0], deltas[name])  # (..., out) or (B, out, H', W')
            err = err.flatten(0, -2) if isinstance(module, nn.Linear) else err.transpose(0, 1).flatten(1).T  # (M, out)
            sums[name] = sums.get(name, 0) + err.double().sum(0)  # (out,)
            counts[name] = counts.get(name, 0) + err.shape[0]

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers]
    try:
        for batch in _batches(inputs):
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    shifts = []
    for name, m in layers:
        if name in sums:
            mean = (sums[name] / counts[name]).to(m.bias.dtype)  # (out,)
            m.bias.sub_(mean)
            shifts.append(float(mean.abs().max()))
    return {"layers": len(shifts), "weights": weights, "largest_shift": max(shifts, default=0.0)}


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
    def __call__(self, model: nn.Module) -> float:
        model = copy.deepcopy(model).eval()
        layers = _layers(model)
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
        lows: dict[str, float] = {}
        highs: dict[str, float] = {}
        samples: dict[str, list[Tensor]] = {}

        def hook(name: str) -> Callable[..., None]:
            def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
                x = args[0].detach().flatten()  # (M,)
                lows[name] = min(lows.get(name, 0.0), float(x.min()))
                highs[name] = max(highs.get(name, 0.0), float(x.max()))
                step = max(1, x.numel() // self.sample)
                samples.setdefault(name, []).append(x[::step])

            return record

        handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers]
        try:
            for batch in _batches(self.inputs):
                model(batch)
        finally:
            for handle in handles:
                handle.remove()
        ranges = {}
        for name, parts in samples.items():
            sample = torch.cat(parts)  # (M,)
            ranges[name] = _mse_range(sample[:: max(1, sample.numel() // self.sample)], lows[name], highs[name])
        return ranges


# -------------------------------------------------------------------------------------------------
# The choice


@torch.no_grad()
def _check_preserved(original: nn.Module, rewritten: nn.Module, inputs: Tensor) -> float:
    """The largest |logit difference| relative to the largest |logit|; raises where the rewrite changed the function."""
    x = inputs[:BATCH]  # (b, 3, H, W)
    ref, out = original(x), rewritten(x)  # (b, K, H/4, W/4)
    diff = float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
    if not diff <= 1e-4:
        raise OutlierError(f"the SmoothQuant rewrite changed the float logits by {diff:.2e} (relative); pass --outliers none")
    return diff


def handle_outliers(
    model: SegFormer,
    inputs: Tensor,
    mode: str = "auto",
    *,
    weights: str = "per_channel",
    measure: Measure | None = None,
    alphas: tuple[float, ...] = ALPHAS,
    min_gain: float = MIN_GAIN,
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
            on the first ``SEARCH_IMAGES`` calibration images).
        alphas: SmoothQuant strengths to search.
        min_gain: For ``auto``, the relative error reduction a rewrite must bring to be kept.

    Returns:
        (the model to quantize, the record for the manifest: mode, applied, the measured error before and
        after, the strength and its candidates, the rewritten and skipped LayerNorms).
    """
    if mode not in OUTLIER_MODES:
        raise OutlierError(f"--outliers {mode}: choose one of {', '.join(OUTLIER_MODES)}")
    if not alphas:
        raise OutlierError("SmoothQuant needs at least one strength to try")
    started = time.perf_counter()
    model = model.eval()
    if mode == "none":
        return model, {"mode": "none", "applied": []}
    sites, skipped = norm_sites(model)
    with torch.no_grad():
        reference = torch.cat([model(b) for b in _batches(inputs[:SEARCH_IMAGES])])  # (n, K, H/4, W/4)
    measured_with = "caller's measure" if measure is not None else SimulatedInt8.metric
    if measure is None:
        measure = SimulatedInt8(inputs[:SEARCH_IMAGES], reference, weights)
    want_smooth = mode in ("auto", "smoothquant", "smoothquant+bias_correction")
    want_bias = mode in ("auto", "bias_correction", "smoothquant+bias_correction")
    before = measure(model)
    record: dict[str, Any] = {"mode": mode, "applied": [], "metric": measured_with, "images": min(len(inputs), SEARCH_IMAGES),
                              "error_before": before}  # fmt: skip
    best, best_err = model, before
    if want_smooth:
        absmax = channel_absmax(model, inputs, sites)
        candidates: dict[str, float] = {}
        chosen: tuple[float, float, SegFormer, list[dict[str, Any]]] | None = None  # (error, alpha, model, layers)
        for alpha in alphas:
            candidate = copy.deepcopy(model)
            layers = smooth(candidate, sites, absmax, alpha)
            candidates[f"{alpha:g}"] = err = measure(candidate)
            logger.info("outliers: SmoothQuant a=%g: error %.4g (none: %.4g)", alpha, err, before)
            if chosen is None or err < chosen[0]:
                chosen = (err, alpha, candidate, layers)  # only the best copy is kept (memory)
        err, alpha, candidate, layers = chosen  # type: ignore[misc]  # alphas is not empty
        keep = mode != "auto" or err <= (1.0 - min_gain) * before
        record["smoothquant"] = {"alpha": alpha, "candidates": candidates, "applied": keep}
        if keep:
            record["smoothquant"].update({"max_logit_change": _check_preserved(model, candidate, inputs), "layers": layers,
                                          "skipped": skipped})  # fmt: skip
            record["applied"].append("smoothquant")
            best, best_err = candidate, err
    if want_bias:
        candidate = copy.deepcopy(best)
        info = correct_bias(candidate, inputs, weights)
        err = measure(candidate)
        logger.info("outliers: bias correction: error %.4g (without: %.4g)", err, best_err)
        keep = mode != "auto" or err <= (1.0 - min_gain) * best_err
        record["bias_correction"] = {**info, "error_without": best_err, "error_with": err, "applied": keep}
        if keep:
            record["applied"].append("bias_correction")
            best, best_err = candidate, err
    record["error_after"] = best_err
    record["seconds"] = round(time.perf_counter() - started, 2)
    logger.info("outliers: applied %s; measured int8 error %.4g -> %.4g", " + ".join(record["applied"]) or "nothing",
                before, best_err)  # fmt: skip
    return best, record
