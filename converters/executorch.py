"""ExecuTorch: torch.export -> XNNPACK-delegated .pte, with the delegation breakdown in the manifest.

LayerNorm is swapped at export time for a 4-D mean/rsqrt formulation that XNNPACK delegates (its
partitioner has no LayerNorm); the checkpoint's modules are untouched. fp16 runs the whole graph in half
precision inside XNNPACK, with fp32 at the graph's edges.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .base import Artifact, ExportOptions, Target

logger = logging.getLogger(__name__)

# The compute ops the manifest must show delegated, by their edge-dialect names.
COMPUTE_OPS = ("convolution", "linear", "addmm", "mm", "bmm", "softmax", "gelu", "upsample_bilinear2d", "mean", "rsqrt")


class ExecuTorchRunner:
    executor = "executorch.runtime"

    def __init__(self, artifact: Artifact) -> None:
        from executorch.runtime import Runtime

        self.runtime = Runtime.get()
        self.program = self.runtime.load_program(artifact.file)
        self.method = self.program.load_method("forward")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        (out,) = self.method.execute([torch.from_numpy(np.ascontiguousarray(x))])
        return out.numpy().copy()


def delegation_report(graph_module: Any) -> dict[str, Any]:
    """Which ops XNNPACK took and which fell back to portable kernels."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    by_op = {
        op: {"delegated": b.delegated, "portable": b.non_delegated}
        for op, b in sorted(info.delegation_by_operator.items())
    }
    portable = sorted(op for op, b in by_op.items() if b["portable"] and not op.startswith(("getitem", "alloc")))
    return {
        "backend": "XnnpackBackend",
        "delegated_subgraphs": info.num_delegated_subgraphs,
        "delegated_nodes": info.num_delegated_nodes,
        "portable_nodes": info.num_non_delegated_nodes,
        "portable_ops": portable,
        "by_op": by_op,
    }


class _HalfCompute:
    """Wraps a module so that it computes in fp16 with fp32 (or integer) tensors at its edges."""

    def __new__(cls, module):  # type: ignore[no-untyped-def]
        import torch

        class HalfCompute(torch.nn.Module):
            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.inner = inner.half()

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                y = self.inner(x.half() if x.is_floating_point() else x)
                return y.float() if y.is_floating_point() else y

        return HalfCompute(module).eval()


class ExecuTorchTarget(Target):
    name = "executorch"
    suffix = ".pte"
    precisions = ("fp32", "fp16", "int8")
    runtime_modules = ("executorch",)

    def prepare(self, module):  # type: ignore[no-untyped-def]
        from .graph import decompose_layer_norms

        return decompose_layer_norms(module)

    def convert(self, module, example, options: ExportOptions, path: Path) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        import torch
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        if options.precision == "fp16":
            module = _HalfCompute(module)
        quantization = None
        if options.precision == "int8":
            module, quantization = self._quantize(module, example, options)
        program = torch.export.export(module, (example,))
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        report = delegation_report(edge.exported_program().graph_module)
        path.write_bytes(edge.to_executorch().buffer)
        if report["portable_ops"]:
            logger.warning("executorch: ops left to portable kernels: %s", ", ".join(report["portable_ops"]))
        return {"delegation": report, **({"quantization": quantization} if quantization else {})}

    @staticmethod
    def _quantize(module, example, options: ExportOptions):  # type: ignore[no-untyped-def]
        """XNNPACKQuantizer, static, per-channel weights; LayerNorm statistics deliberately stay fp32."""
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

        from segformer_edge.calibration.recipes import keep_float, pt2e_quantize, with_activation_observer

        from .base import calibration_inputs
        from .graph import DecomposedLayerNorm

        calib = options.extra["calibration"]
        config = with_activation_observer(get_symmetric_quantization_config(is_per_channel=True), calib.method)
        quantizer = XNNPACKQuantizer().set_global(config)
        quantizer.set_module_type(DecomposedLayerNorm, None)
        keep_float(quantizer, options.extra.get("float_modules", []))
        quantized = pt2e_quantize(module, example, quantizer, calibration_inputs(options, example))
        return quantized, {"quantizer": "XNNPACKQuantizer (static, per-channel weights)", "float_ops": ["layer_norm", "softmax", "gelu"]}

    def load(self, artifact: Artifact) -> ExecuTorchRunner:
        self.check_runtime()
        return ExecuTorchRunner(artifact)


def set_threads(threads: int) -> None:
    """Size ExecuTorch's CPU threadpool (XNNPACK runs on it)."""
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(threads)
