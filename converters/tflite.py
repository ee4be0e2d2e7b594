"""TFLite (LiteRT): litert-torch conversion, fp16 weights through the LiteRT quantizer, the LiteRT runner.

The runner uses ``ai_edge_litert``'s Interpreter, or ``tflite_runtime`` where only that is installed (as
on older boards); neither needs torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .base import Artifact, ArtifactError, ExportOptions, Target

logger = logging.getLogger(__name__)

_FP16_RECIPE = [
    {
        "regex": ".*",
        "operation": "*",
        "algorithm_key": "float_casting",
        "op_config": {
            "weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"},
            "compute_precision": "FLOAT",
            "explicit_dequantize": True,
        },
    }
]


def _interpreter_class():  # type: ignore[no-untyped-def]
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai_edge_litert"
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore[import-not-found]

            return Interpreter, "tflite_runtime"
        except ImportError as exc:
            raise ArtifactError(
                "tflite artifacts need ai-edge-litert (or tflite-runtime); pip install 'segformer-edge[runtime]'"
            ) from exc


class LiteRTRunner:
    """Runs a .tflite with the LiteRT interpreter; int8 inputs/outputs are (de)quantized at the edges."""

    def __init__(self, artifact: Artifact, threads: int | None = None) -> None:
        interpreter_cls, self.executor = _interpreter_class()
        self.interpreter = interpreter_cls(model_path=str(artifact.file), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = self._quantize(x, self.input)
        if tuple(self.input["shape"]) != x.shape:
            self.interpreter.resize_tensor_input(self.input["index"], list(x.shape))
            self.interpreter.allocate_tensors()
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        return self._dequantize(self.interpreter.get_tensor(self.output["index"]), self.output)

    @staticmethod
    def _quantize(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
        dtype = detail["dtype"]
        scale, zero = detail.get("quantization", (0.0, 0))
        if np.issubdtype(dtype, np.integer) and not np.issubdtype(x.dtype, np.integer) and scale:
            info = np.iinfo(dtype)
            return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)
        return x.astype(dtype)

    @staticmethod
    def _dequantize(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
        scale, zero = detail.get("quantization", (0.0, 0))
        if y.dtype in (np.int8, np.uint8) and scale:
            return (y.astype(np.float32) - zero) * scale
        return y.copy()


def delegation_report(path: Path) -> dict[str, Any] | None:
    """Which ops LiteRT's default XNNPACK delegate took, and which run in the built-in (reference) kernels.

    The interpreter lists the model's original nodes next to the DELEGATE nodes that replaced them. A node
    runs outside XNNPACK exactly when its output feeds a partition or the graph output without being a
    partition output itself, or feeds another such node; walking back from those gives the set.
    """
    interpreter_cls, _ = _interpreter_class()
    interpreter = interpreter_cls(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    details = getattr(interpreter, "_get_ops_details", None)
    if details is None:  # tflite_runtime before 2.5 has no op listing
        return None
    ops = details()
    partitions = [op for op in ops if op["op_name"] == "DELEGATE"]
    nodes = [op for op in ops if op["op_name"] != "DELEGATE"]
    partition_in = {int(t) for op in partitions for t in op["inputs"]}
    partition_out = {int(t) for op in partitions for t in op["outputs"]}
    graph_out = {int(d["index"]) for d in interpreter.get_output_details()}
    producer = {int(t): op for op in nodes for t in op["outputs"]}
    by_index = {op["index"]: op for op in nodes}
    outputs = {op["index"]: {int(t) for t in op["outputs"]} for op in nodes}
    outside = {i for i, out in outputs.items() if out & (partition_in | graph_out) and not out & partition_out}
    frontier = list(outside)
    while frontier:
        for t in by_index[frontier.pop()]["inputs"]:
            src = producer.get(int(t))
            if src is not None and src["index"] not in outside and int(t) not in partition_out:
                outside.add(src["index"])
                frontier.append(src["index"])
    by_op: dict[str, dict[str, int]] = {}
    for op in nodes:
        entry = by_op.setdefault(op["op_name"], {"delegated": 0, "portable": 0})
        entry["portable" if op["index"] in outside else "delegated"] += 1
    return {
        "backend": "XNNPACK (LiteRT default delegate; portable = built-in kernels)",
        "delegated_subgraphs": len(partitions),
        "delegated_nodes": len(nodes) - len(outside),
        "portable_nodes": len(outside),
        "portable_ops": sorted(op for op, n in by_op.items() if n["portable"]),
        "by_op": dict(sorted(by_op.items())),
    }


class TFLiteTarget(Target):
    name = "tflite"
    suffix = ".tflite"
    precisions = ("fp32", "fp16", "int8")
    runtime_modules = ("ai_edge_litert",)
    extra = "runtime"

    def prepare(self, module):  # type: ignore[no-untyped-def]
        from .graph import split_single_head_attention

        return split_single_head_attention(module)

    def convert(self, module, example, options: ExportOptions, path: Path) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        import litert_torch

        if options.precision == "int8":
            return self._convert_int8(module, example, options, path)
        edge = litert_torch.convert(module, (example,))
        edge.export(str(path))
        if options.precision == "fp16":
            from ai_edge_quantizer import quantizer

            qt = quantizer.Quantizer(str(path), _FP16_RECIPE)
            path.write_bytes(bytes(qt.quantize().quantized_model))
        return {"tflite": {"converter": "litert-torch", "weights": "fp16" if options.precision == "fp16" else "fp32"},
                "delegation": delegation_report(path)}

    @staticmethod
    def _convert_int8(module, example, options: ExportOptions, path: Path) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        """litert-torch PT2E full integer: int8 weights and activations, int8 input and output tensors."""
        import litert_torch
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig

        from segformer_edge.calibration.recipes import keep_float, pt2e_quantize, with_activation_observer

        from .base import calibration_inputs

        calib = options.extra["calibration"]
        config = with_activation_observer(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False), calib.method)
        quantizer = PT2EQuantizer().set_global(config)
        keep_float(quantizer, options.extra.get("float_modules", []))
        quantized = pt2e_quantize(module, example, quantizer, calibration_inputs(options, example), fold_quantize=False)
        edge = litert_torch.convert(quantized, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
        edge.export(str(path))
        return {"tflite": {"converter": "litert-torch", "weights": "int8"}, "delegation": delegation_report(path),
                "quantization": {"quantizer": "litert-torch PT2EQuantizer (static, per-channel weights)", "io": "int8"}}

    def load(self, artifact: Artifact) -> LiteRTRunner:
        return LiteRTRunner(artifact)
