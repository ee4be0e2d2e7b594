"""Quantization recipes: activation observers per calibration method, and the PT2E prepare/calibrate/convert.

Weights are always per-channel symmetric int8 (each target quantizer's own per-channel weight observer).
Activations are per-tensor affine int8, observed by the method's observer:

- ``minmax``: the running min and max;
- ``moving_average``: exponential moving average of per-batch min and max;
- ``percentile``: the 0.01% / 99.99% points of the activation histogram (outliers clipped);
- ``mse``: the histogram search for the range that minimises the quantization error (L2).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torchao.quantization.pt2e.observer import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver

__all__ = ["PercentileObserver", "activation_observer", "keep_float", "pt2e_quantize", "with_activation_observer"]

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


def activation_observer(method: str) -> Any:
    """The observer constructor for ``method`` (with the quantizers' usual eps)."""
    observers = {
        "minmax": MinMaxObserver,
        "moving_average": MovingAverageMinMaxObserver,
        "percentile": PercentileObserver,
        "mse": HistogramObserver,
    }
    if method not in observers:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(observers)}")
    return observers[method].with_args(eps=2**-12)


def with_activation_observer(config: Any, method: str) -> Any:
    """A copy of a PT2E QuantizationConfig whose activation specs use ``method``'s observer."""
    ctr = activation_observer(method)
    changes = {}
    for name in ("input_activation", "output_activation"):
        spec = getattr(config, name, None)
        if spec is not None:
            changes[name] = dataclasses.replace(spec, observer_or_fake_quant_ctr=ctr)
    return dataclasses.replace(config, **changes)


def keep_float(quantizer: Any, module_names: Iterable[str]) -> Any:
    """Leave these submodules unquantized in an XNNPACK-style PT2E quantizer.

    ``set_module_name(name, None)`` asserts in the XNNPACK and litert-torch quantizers, but their annotation
    already treats a ``None`` config as "do not annotate" (the path ``set_module_type(T, None)`` takes); the
    entry is written directly so that those modules also drop out of the global config.
    """
    for name in module_names:
        quantizer.module_name_config[name] = None
    return quantizer


def pt2e_quantize(
    module: torch.nn.Module,
    example: torch.Tensor,
    quantizer: Any,
    inputs: Iterable[torch.Tensor],
    *,
    fold_quantize: bool = True,
) -> torch.nn.Module:
    """torch.export -> prepare_pt2e -> run the calibration inputs -> convert_pt2e (deterministic in order).

    ``fold_quantize=False`` keeps weight quantize ops in the graph (what litert-torch's lowering expects).
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    graph = torch.export.export(module, (example,)).module()
    prepared = prepare_pt2e(graph, quantizer)
    count = 0
    with torch.no_grad():
        for x in inputs:
            prepared(x)
            count += 1
    logger.info("calibrated on %d images", count)
    return convert_pt2e(prepared, fold_quantize=fold_quantize)
