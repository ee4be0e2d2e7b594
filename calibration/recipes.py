"""Quantization recipes: activation observers per method, the QuantSpec wrapper around every target's PT2E
quantizer, the read-back of what was quantized, and the PT2E prepare/calibrate/convert.

Weights are symmetric int8 with each target quantizer's own weight observer, per channel unless the spec says
per tensor. Activations are per-tensor int8, observed by the method's observer:

- ``minmax``: the running min and max;
- ``moving_average``: exponential moving average of per-batch min and max;
- ``percentile``: the 0.01% / 99.99% points of the activation histogram (outliers clipped);
- ``mse``: the histogram search for the range that minimises the quantization error (L2), the histogram of a large
  activation built from an even sample of ~1 M of its values (:class:`SampledHistogramObserver`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torchao.quantization.pt2e.observer import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation,
    QuantizationSpec,
    QuantizationSpecBase,
    Quantizer,
    SharedQuantizationSpec,
)

from .spec import LAYER_GROUPS, QuantSpec, group_of

PT2E_METHODS = ("minmax", "moving_average", "percentile", "mse")  # what the PT2E observers below implement

__all__ = [
    "PT2E_METHODS",
    "IntegerAttention",
    "PercentileObserver",
    "SampledHistogramObserver",
    "SpecQuantizer",
    "activation_observer",
    "activation_observers",
    "attention_precision",
    "count_quantized_ops",
    "pt2e_quantize",
    "reuse_exports",
]

logger = logging.getLogger(__name__)


class PercentileObserver(HistogramObserver):
    """Histogram observer whose range is the [1 - p, p] percentiles of the observed values."""

    def __init__(self, *args: Any, percentile: float = 99.99, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.percentile = percentile

    def _non_linear_param_search(self) -> tuple[torch.Tensor, torch.Tensor]:
        hist = self.histogram.double()
        total = hist.sum()
        if total <= 0:
            return self.min_val, self.max_val
        cdf = torch.cumsum(hist, 0) / total
        edges = torch.linspace(float(self.min_val), float(self.max_val), self.bins + 1, dtype=torch.float64)
        tail = 1.0 - self.percentile / 100.0
        lo = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64)))
        hi = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=torch.float64)))
        new_min, new_max = edges[lo].float(), edges[min(hi + 1, self.bins)].float()
        return torch.minimum(new_min, torch.zeros(())), torch.maximum(new_max, torch.zeros(()))


class SampledHistogramObserver(HistogramObserver):
    """torchao's HistogramObserver (the ``mse`` method: the range with the least L2 error, searched on a 2048-bin
    histogram), with the histogram of a large activation built from an even sample of about :attr:`sample` of its
    values, its exact minimum and maximum among them.

    ``torch.histc`` over every value was ~40% of a PT2E calibration pass at 512x512 (b2's decoder concatenation alone
    holds 50 M values per image); benchmarks/HISTOGRAM_SAMPLE.md measures the time saved and the calibrated scales against
    the full histogram's. Tensors up to :attr:`sample` values are histogrammed whole, exactly as before. The sample is
    every ``p``-th value, ``p`` a prime that divides none of the tensor's dimensions: a stride that divided the
    channel count would see only some channels of a (tokens, C) activation.
    """

    sample = 1 << 20

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:  # pyre-ignore[14]
        x = x_orig.detach()
        step = -(-x.numel() // self.sample)
        if step <= 1:
            return super().forward(x_orig)
        low, high = torch.aminmax(x)
        if not (torch.isfinite(low) and torch.isfinite(high)):  # inf or nan: the parent's own handling
            return super().forward(x_orig)
        step = _coprime_step(step, x.shape)
        super().forward(torch.cat([x.reshape(-1)[::step], low.reshape(1), high.reshape(1)]))  # (M / step + 2,)
        return x_orig


def _coprime_step(step: int, shape: torch.Size) -> int:
    """The least prime >= ``step`` that divides none of ``shape``'s dimensions."""

    def prime(n: int) -> bool:
        return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))

    while not prime(step) or any(d % step == 0 for d in shape):
        step += 1
    return step


def activation_observer(method: str) -> Any:
    """The observer constructor for ``method`` (with the quantizers' usual eps)."""
    observers = {
        "minmax": MinMaxObserver,
        "moving_average": MovingAverageMinMaxObserver,
        "percentile": PercentileObserver,
        "mse": SampledHistogramObserver,
    }
    if method not in observers:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(observers)}")
    return observers[method].with_args(eps=2**-12)


def _module_path(node: torch.fx.Node) -> str:
    """The innermost module path a node was traced in (``model.encoder.stages.0.blocks.0.attn.q``), or ''."""
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else ""


class SpecQuantizer(Quantizer):
    """A target's PT2E quantizer made to honour a :class:`QuantSpec` the same way on every target.

    The inner quantizer annotates the graph as its backend wants it; then every node traced inside a
    float-kept layer group loses its annotation (so it stays float, whatever the inner quantizer's own
    module-name filter understands), and every per-tensor activation spec gets the observer of
    ``spec.method`` (weights keep the inner quantizer's observers).
    """

    def __init__(self, inner: Quantizer, spec: QuantSpec) -> None:
        super().__init__()
        if spec.method not in PT2E_METHODS:
            raise ValueError(f"--method {spec.method}: this target's PT2E quantizer takes {', '.join(PT2E_METHODS)}")
        self.inner = inner
        self.spec = spec
        self.observer = activation_observer(spec.method)

    def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return self.inner.transform_for_annotation(model)

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        model = self.inner.annotate(model)
        for node in model.graph.nodes:
            if "quantization_annotation" in node.meta and self.spec.keeps_float(_module_path(node)):
                del node.meta["quantization_annotation"]
        _drop_broken_sharing(model)
        for node in model.graph.nodes:
            annotation = node.meta.get("quantization_annotation")
            if annotation is None:
                continue
            annotation.input_qspec_map = {
                arg: qspec if arg.op == "get_attr" else self._observed(qspec) for arg, qspec in annotation.input_qspec_map.items()
            }
            annotation.output_qspec = self._observed(annotation.output_qspec)
        return model

    def _observed(self, qspec: Any) -> Any:
        per_tensor = (torch.per_tensor_affine, torch.per_tensor_symmetric)
        if isinstance(qspec, QuantizationSpec) and not qspec.is_dynamic and qspec.qscheme in per_tensor:
            return dataclasses.replace(qspec, observer_or_fake_quant_ctr=self.observer)
        return qspec

    def validate(self, model: torch.fx.GraphModule) -> None:
        self.inner.validate(model)

    def prepare_obs_or_fq_callback(self, model: torch.fx.GraphModule, edge_or_node_to_obs_or_fq: dict[Any, Any]) -> None:
        self.inner.prepare_obs_or_fq_callback(model, edge_or_node_to_obs_or_fq)


_SOFTMAX = ("aten._softmax.default", "aten.softmax.int")
_MATMUL = ("aten.bmm.default", "aten.matmul.default")


def _attentions(model: torch.fx.GraphModule) -> Iterator[tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node | None]]:
    """(q @ k^T, softmax, attn @ v) of every attention in a graph, looking through quantize/dequantize pairs:
    each softmax fed by a matmul, with the matmul that takes its output first (None where there is none)."""

    def source(node: Any) -> Any:
        while isinstance(node, torch.fx.Node) and node.op == "call_function" and "quantize_per_tensor" in str(node.target):
            node = node.args[0]  # a dequantize or quantize: the tensor it reads
        return node

    def consumer(node: torch.fx.Node) -> torch.fx.Node | None:
        users = list(node.users)
        while len(users) == 1 and "quantize_per_tensor" in str(users[0].target):
            users = list(users[0].users)
        matmuls = [u for u in users if str(u.target) in _MATMUL and source(u.args[0]) is node]
        return matmuls[0] if len(matmuls) == 1 else None

    for node in model.graph.nodes:
        if node.op != "call_function" or str(node.target) not in _SOFTMAX:
            continue
        qk = source(node.args[0])
        if isinstance(qk, torch.fx.Node) and str(qk.target) in _MATMUL:
            yield qk, node, consumer(node)


def attention_precision(model: torch.fx.GraphModule) -> dict[str, dict[str, int]]:
    """Each attention's q @ k^T, softmax and attn @ v as int8 or float, read from a converted PT2E graph: an op is
    int8 in PT2E's form of a quantized op, its tensor inputs out of dequantizes and its output into a quantize. (A
    matmul of two dequantized operands whose output is not quantized computes in float, as XNNPACK's does.)"""

    def dequantized(arg: Any) -> bool:
        return isinstance(arg, torch.fx.Node) and "dequantize" in str(arg.target)

    def integer(node: torch.fx.Node, operands: int) -> bool:
        quantized_out = bool(node.users) and all("quantize_per_tensor" in str(u.target) and "dequantize" not in str(u.target)
                                                 for u in node.users)  # fmt: skip
        return quantized_out and all(map(dequantized, node.args[:operands]))

    counts = {part: {"int8": 0, "float": 0} for part in ("q_kT", "softmax", "attn_v")}
    for qk, softmax, av in _attentions(model):
        counts["q_kT"]["int8" if integer(qk, 2) else "float"] += 1
        counts["softmax"]["int8" if integer(softmax, 1) else "float"] += 1
        if av is not None:
            counts["attn_v"]["int8" if integer(av, 2) else "float"] += 1
    return counts


class IntegerAttention(Quantizer):
    """A target's PT2E quantizer with the attention in integer: both matmuls of every attention take quantized
    operands and give a quantized output, and the softmax between them runs on integers with the fixed output
    range integer softmax kernels require (``softmax_output``; TFLite: scale 1/256, zero point -128).

    The backends' own quantizers leave ``bmm`` and the softmax float. Everything else is the inner quantizer's;
    attributes it has (a lowering may read ``global_config``) pass through.
    """

    def __init__(self, inner: Quantizer, activation: QuantizationSpec, softmax_output: QuantizationSpecBase) -> None:
        super().__init__()
        self.inner = inner
        self.activation = activation
        self.softmax_output = softmax_output

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    @property
    def label(self) -> str:
        """What the manifest names as the quantizer: the inner one, and this wrapper."""
        return f"{type(self.inner).__name__} + IntegerAttention"

    def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return self.inner.transform_for_annotation(model)

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        for qk, softmax, av in list(_attentions(model)):
            qk.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={arg: self.activation for arg in qk.args[:2]}, output_qspec=self.activation, _annotated=True
            )
            softmax.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={qk: SharedQuantizationSpec(qk)}, output_qspec=self.softmax_output, _annotated=True
            )
            if av is not None:  # its first operand is the softmax: the same (fixed) range, not a second observer
                specs = {arg: SharedQuantizationSpec(softmax) if arg is softmax else self.activation for arg in av.args[:2]}
                av.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map=specs, output_qspec=self.activation, _annotated=True
                )
        return self.inner.annotate(model)

    def validate(self, model: torch.fx.GraphModule) -> None:
        self.inner.validate(model)


def _drop_broken_sharing(model: torch.fx.GraphModule) -> None:
    """Un-annotate every node that shares its quantization with a node or edge left float (a float-kept layer
    next to a quantized one: a reshape sharing its input's range, for one), until none is left: PT2E's prepare
    cannot resolve a shared spec whose root has no spec. Those nodes stay float too, which the read-back counts."""

    def resolvable(ref: Any) -> bool:
        if isinstance(ref, tuple):  # an edge (producer, consumer): the consumer's input spec for it
            annotation = ref[1].meta.get("quantization_annotation")
            return annotation is not None and annotation.input_qspec_map.get(ref[0]) is not None
        annotation = ref.meta.get("quantization_annotation")
        return annotation is not None and annotation.output_qspec is not None

    changed = True
    while changed:
        changed = False
        for node in model.graph.nodes:
            annotation = node.meta.get("quantization_annotation")
            if annotation is None:
                continue
            specs = [*annotation.input_qspec_map.values(), annotation.output_qspec]
            if any(isinstance(q, SharedQuantizationSpec) and not resolvable(q.edge_or_node) for q in specs):
                del node.meta["quantization_annotation"]
                changed = True


_COMPUTE = ("linear", "conv2d", "convolution", "matmul", "bmm", "addmm", "aten.mm")


def count_quantized_ops(graph_module: torch.fx.GraphModule) -> dict[str, dict[str, int]]:
    """Per layer group: how many compute ops (linear, conv, matmul) run in int8 (both operands, weight and
    activation, come out of a dequantize) and how many stay float, read from a converted PT2E graph: what the
    quantizer did, not what was asked of it."""
    counts = {group: {"quantized": 0, "float": 0} for group in (*LAYER_GROUPS, "other")}
    for node in graph_module.graph.nodes:
        target = str(node.target)
        if node.op != "call_function" or "quantize" in target or not any(name in target for name in _COMPUTE):
            continue
        operands = node.args[1:3] if "addmm" in target else node.args[:2]
        quantized = len(operands) == 2 and all(isinstance(a, torch.fx.Node) and "dequantize" in str(a.target) for a in operands)
        group = group_of(_module_path(node)) or "other"
        counts[group]["quantized" if quantized else "float"] += 1
    return {g: c for g, c in counts.items() if c["quantized"] or c["float"]}


def activation_observers(prepared: torch.fx.GraphModule) -> dict[str, int]:
    """How many activations each observer class watches in a prepared PT2E graph (weights and constants, fed by
    ``get_attr``, excluded): the calibration method that actually ran, read from the graph, not the request."""
    counts: dict[str, int] = {}
    for node in prepared.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        if node.args[0].op == "get_attr":
            continue
        module = prepared.get_submodule(str(node.target))
        observer = getattr(module, "activation_post_process", module)  # a fake-quantize wraps its observer
        name = type(observer).__name__
        if "Observer" in name:
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


_EXPORTS: dict[tuple[Any, ...], torch.fx.GraphModule] | None = None  # see reuse_exports


@contextlib.contextmanager
def reuse_exports() -> Iterator[None]:
    """Within this block, :func:`pt2e_quantize` traces each distinct float module once: a sensitivity analysis
    or ``--budget`` search quantizes the same model dozens of times with different float-kept layers, and
    torch.export is 60% of each (the tiny test model at 64x64: 2.5 of 4.2 s)."""
    global _EXPORTS
    outer, _EXPORTS = _EXPORTS, {}
    try:
        yield
    finally:
        _EXPORTS = outer


def _exported(module: torch.nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """torch.export of ``module`` on ``example``, as an unlifted graph module (a fresh copy from the cache of
    :func:`reuse_exports` where one is open: the key is the module's structure and every weight's bytes)."""
    # check_guards=False: the guard submodule torch 2.13 adds is a call_module node that some backends' quantizer
    # passes (the Arm backend's) refuse, and the graph only ever runs on the traced shape.
    if _EXPORTS is None:
        return torch.export.export(module, (example,)).module(check_guards=False)
    digest = hashlib.sha256(str(module).encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    key = (digest.hexdigest(), tuple(example.shape), str(example.dtype))
    if key not in _EXPORTS:
        _EXPORTS[key] = torch.export.export(module, (example,)).module(check_guards=False)
    return copy.deepcopy(_EXPORTS[key])


def pt2e_quantize(
    module: torch.nn.Module,
    example: torch.Tensor,
    quantizer: Any,
    inputs: Iterable[torch.Tensor],
    *,
    fold_quantize: bool = True,
) -> tuple[torch.nn.Module, dict[str, int]]:
    """torch.export -> prepare_pt2e -> run the calibration inputs -> convert_pt2e (deterministic in order).

    Returns the converted module and the activation observers that calibrated it (see
    :func:`activation_observers`). ``fold_quantize=False`` keeps weight quantize ops in the graph (what
    litert-torch's lowering expects).
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    graph = _exported(module, example)
    prepared = prepare_pt2e(graph, quantizer)
    observers = activation_observers(prepared)
    count = 0
    with torch.no_grad():
        for x in inputs:
            prepared(x)
            count += 1
    logger.info("calibrated on %d images (%s)", count, ", ".join(f"{n} {name}" for name, n in observers.items()))
    return convert_pt2e(prepared, fold_quantize=fold_quantize), observers
