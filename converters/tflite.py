"""TFLite (LiteRT): litert-torch conversion, fp16 weights through the LiteRT quantizer, the LiteRT runner.

The runner uses ``ai_edge_litert``'s Interpreter, or ``tflite_runtime`` where only that is installed (as
on older boards); neither needs torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import EDGE_FEATURES, Artifact, ArtifactError, ExportPlan, Target

if TYPE_CHECKING:
    from segformer_edge.calibration.spec import QuantSpec

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
        self.outputs = _in_graph_order(self.interpreter.get_output_details())

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        x = self._quantize(x, self.input)
        if tuple(self.input["shape"]) != x.shape:
            self.interpreter.resize_tensor_input(self.input["index"], list(x.shape))
            self.interpreter.allocate_tensors()
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        return [self._dequantize(self.interpreter.get_tensor(d["index"]), d) for d in self.outputs]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[0]

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


def _in_graph_order(details: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Output details in the traced graph's order: litert-torch names them ``serving_default_output_<i>_output``."""
    import re

    def key(d: dict[str, Any]) -> tuple[int, int]:
        m = re.search(r"output_(\d+)", str(d.get("name", "")))
        return (int(m.group(1)) if m else 0, int(d["index"]))

    return sorted(details, key=key)


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
    summary = "LiteRT (TFLite) flatbuffer, XNNPACK by default (Android, Linux boards, microcontrollers)"
    precisions = ("fp32", "fp16", "int8")
    features = EDGE_FEATURES | {"taps"}
    tools = ("litert-torch", "ai-edge-litert", "ai-edge-quantizer")
    runtime_modules = ("ai_edge_litert",)
    extra = "runtime"
    fold_quantize = False  # litert-torch's lowering expects the weight quantize ops in the graph

    def prepare(self, module):  # type: ignore[no-untyped-def]
        from .graph import split_single_head_attention

        return split_single_head_attention(module)

    def pt2e_quantizer(self, quant: QuantSpec) -> Any:
        """litert-torch PT2E full integer: int8 weights and activations."""
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config

        config = get_symmetric_quantization_config(is_per_channel=quant.weights == "per_channel", is_dynamic=False)
        return PT2EQuantizer().set_global(config)

    def convert(self, module, example, path: Path, plan: ExportPlan) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        import litert_torch

        if plan.quant is not None:
            from litert_torch.quantize.quant_config import QuantConfig

            quant_config = QuantConfig(pt2e_quantizer=self.pt2e_quantizer(plan.quant))
            edge = litert_torch.convert(module, (example,), quant_config=quant_config)
        else:
            edge = litert_torch.convert(module, (example,))
        edge.export(str(path))
        if plan.options.precision == "fp16":
            from ai_edge_quantizer import quantizer

            qt = quantizer.Quantizer(str(path), _FP16_RECIPE)
            path.write_bytes(bytes(qt.quantize().quantized_model))
        return {"tflite": {"converter": "litert-torch", **read_back(path)}, "delegation": delegation_report(path),
                "io": model_io(path)}  # fmt: skip

    def load(self, artifact: Artifact, threads: int | None = None) -> LiteRTRunner:
        return LiteRTRunner(artifact, threads=threads)

    def runner_factory(self, artifact: Artifact, threads: int, compute_units: str = "all") -> Any:
        _interpreter_class()  # ai_edge_litert, or tflite_runtime where only that is installed
        return lambda: LiteRTRunner(artifact, threads=threads)


def model_io(path: Path) -> dict[str, list[str]]:
    """The input and output tensor dtypes, read back from the flatbuffer by the interpreter."""
    interpreter_cls, _ = _interpreter_class()
    interpreter = interpreter_cls(model_path=str(path), num_threads=1)
    return {"inputs": [np.dtype(d["dtype"]).name for d in interpreter.get_input_details()],
            "outputs": [np.dtype(d["dtype"]).name for d in interpreter.get_output_details()]}  # fmt: skip


def read_back(path: Path) -> dict[str, Any]:
    """Weight storage, read from the flatbuffer: the dtypes of the constant tensors that feed compute ops."""
    interpreter_cls, _ = _interpreter_class()
    interpreter = interpreter_cls(model_path=str(path), num_threads=1)
    ops = interpreter._get_ops_details()
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    compute = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
    weight_dtypes: dict[str, int] = {}
    activation_dtypes: dict[str, int] = {}
    for op in ops:
        if op["op_name"] not in compute or len(op["inputs"]) < 2:
            continue
        act, weight = tensors.get(int(op["inputs"][0])), tensors.get(int(op["inputs"][1]))
        if weight is not None:
            producer = next((o for o in ops if int(op["inputs"][1]) in [int(t) for t in o["outputs"]]), None)
            source = tensors.get(int(producer["inputs"][0])) if producer and producer["op_name"] == "DEQUANTIZE" else weight
            name = np.dtype(source["dtype"]).name
            weight_dtypes[name] = weight_dtypes.get(name, 0) + 1
        if act is not None:
            name = np.dtype(act["dtype"]).name
            activation_dtypes[name] = activation_dtypes.get(name, 0) + 1
    return {"weights": weight_dtypes, "compute_inputs": activation_dtypes}
