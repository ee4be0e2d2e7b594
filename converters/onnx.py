"""ONNX: the dynamo-based exporter with dynamic H and W, checked by the onnx checker, run by ONNX Runtime.

INT8 is QDQ static quantization with onnxruntime.quantization (its own calibrators), calibrated on the
same set as every target; float-kept layer groups are found by the torch name scopes the exporter records.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from segformer_edge.errors import ExportError

from .base import EDGE_FEATURES, TAPS, Artifact, ExportOptions, ExportPlan, Target

if TYPE_CHECKING:
    from segformer_edge.calibration.spec import QuantSpec

    from segformer_edge.inputs import InputSpec

logger = logging.getLogger(__name__)


class OnnxRunner:
    executor = "onnxruntime"

    def __init__(self, artifact: Artifact, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(artifact.file), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: x})

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[0]


class OnnxTarget(Target):
    name = "onnx"
    suffix = ".onnx"
    summary = "ONNX (dynamo exporter), run by ONNX Runtime (x86 and Arm CPUs, any ORT provider)"
    precisions = ("fp32", "fp16", "int8")
    features = EDGE_FEATURES | {"dynamic", "taps"}
    quant_methods = ("minmax", "moving_average", "percentile")  # ONNX Runtime's calibrators (entropy: see QuantSpec)
    # S8S8 (int8 activations and weights, ORT's default for QDQ) or U8S8 (uint8 activations, int8 weights).
    options: ClassVar[dict[str, tuple[str, ...]]] = {"activations": ("int8", "uint8")}
    default_method = "minmax"
    tools = ("onnx", "onnxruntime", "onnxscript")
    runtime_modules = ("onnxruntime",)
    extra = "runtime"

    def convert(self, module, example, path: Path, plan: ExportPlan) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        import onnx
        import torch
        from torch.export import Dim

        options = plan.options
        dynamic = None
        if options.dynamic:
            hd, wd = (1, 2) if options.layout == "nhwc" else (2, 3)
            dynamic = {"x": {hd: Dim("H", min=64, max=4096), wd: Dim("W", min=64, max=4096)}}
        outputs = ["out", *(TAPS if options.taps else ())]
        program = torch.onnx.export(
            module, (example,), dynamo=True, dynamic_shapes=dynamic, input_names=["x"], output_names=outputs,
            optimize=True, verbose=False,
        )  # fmt: skip
        model = program.model_proto
        if options.precision == "fp16":
            model = _to_fp16(model)
        onnx.checker.check_model(model, full_check=True)
        if plan.quant is not None:
            return self._quantize_static(model, path, plan.quant, plan.graph_input, plan.target_options["activations"])
        onnx.save_model(model, str(path))
        return {"onnx": read_back(path)}

    def plan(self, options: ExportOptions, quant: QuantSpec | None) -> dict[str, str]:
        chosen = super().plan(options, quant)
        if "activations" in options.target_options and options.precision != "int8":
            raise ExportError("onnx: --target-option activations=... applies to --precision int8 only")
        return chosen if options.precision == "int8" else {}  # the manifest lists only options that shaped the artifact

    def _quantize_static(self, model: Any, path: Path, quant: QuantSpec, spec: InputSpec, activations: str) -> dict[str, Any]:
        """QDQ static INT8 through onnxruntime.quantization, calibrated on the same set as every target; int8 weights
        with int8 (S8S8) or uint8 (U8S8) activations."""
        import tempfile

        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process

        calib = quant.require_calibration(self.name)
        inputs = [spec(calib.images[i : i + 1]) for i in range(len(calib.images))]

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.items = iter([{"x": x} for x in inputs])

            def get_next(self):  # type: ignore[no-untyped-def]
                return next(self.items, None)

        methods = {
            "minmax": (CalibrationMethod.MinMax, {}),
            "moving_average": (CalibrationMethod.MinMax, {"CalibMovingAverage": True}),
            "percentile": (CalibrationMethod.Percentile, {"CalibPercentile": 99.99}),
        }
        method, extra = methods[quant.method]
        used_method = method.name + (" (moving average)" if extra.get("CalibMovingAverage") else "")
        used = len(inputs)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            fp32, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
            onnx.save_model(model, str(fp32))
            # No ORT graph optimisation here: it renames nodes and drops the torch name scopes that tell which
            # layer group a node belongs to (float-kept groups would silently be quantized). ORT optimises
            # the quantized graph when a session loads it.
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True, skip_optimization=True)
            excluded = _float_nodes(pre, quant)
            # ORT's calibrators keep every intermediate tensor of every image until the end. (Its MinMax chunking,
            # CalibMaxIntermediateOutputs, discards each full chunk without folding its ranges in onnxruntime 1.32:
            # minmax then calibrated on the last N mod k images only, or failed with "No data is collected".)
            per_image = _activation_bytes(pre)
            used = max(1, min(len(inputs), int(_CALIBRATION_MEMORY // max(per_image, 1))))
            if used < len(inputs):
                logger.warning("onnx: %s calibration on %d of %d images (%.0f MB of activations each)",
                               used_method, used, len(inputs), per_image / 1e6)  # fmt: skip
                inputs = inputs[:used]
            quantize_static(
                str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=quant.weights == "per_channel",
                activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=method,
                nodes_to_exclude=excluded, extra_options=extra,
            )  # fmt: skip
        return {"onnx": {**read_back(path), "format": "QDQ"},
                "quantization": {"quantizer": f"onnxruntime quantize_static ({used_method})", "calibrate_method": used_method,
                                 "qdq_types": qdq_types(path),
                                 "calibration_images_used": used,
                                 "ops_by_group": ops_by_group(path)}}  # fmt: skip

    def load(self, artifact: Artifact, threads: int | None = None) -> OnnxRunner:
        self.check_runtime()
        return OnnxRunner(artifact, threads=threads)

    def profile(self, artifact: Artifact, x: np.ndarray, runs: int, threads: int) -> list[dict[str, Any]]:
        from .bench import top_ops

        return top_ops(profile_ort(artifact, x, runs, threads))


def profile_ort(artifact: Artifact, x: np.ndarray, runs: int, threads: int) -> dict[str, float]:
    """Per-op-type time (ms per run) from ONNX Runtime's own profiler."""
    import json
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:  # ORT writes its trace file; keep it out of the user's folder
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(artifact.file), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for _ in range(runs):
            session.run(None, {name: x})
        trace = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = {}
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + event["dur"] / 1000.0 / runs
    return totals


def read_back(path: Path) -> dict[str, Any]:
    """Opset, op types, I/O dtypes and shapes (dynamic dims by name) and initializer dtypes of a saved model."""
    import onnx

    model = onnx.load(str(path))
    elem = lambda t: onnx.helper.tensor_dtype_to_np_dtype(t.tensor_type.elem_type).name
    dims = lambda t: [d.dim_param or d.dim_value for d in t.tensor_type.shape.dim]
    initializers: dict[str, int] = {}
    for init in model.graph.initializer:
        name = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name
        initializers[name] = initializers.get(name, 0) + 1
    return {
        "opset": int(model.opset_import[0].version),
        "ops": sorted({node.op_type for node in model.graph.node}),
        "io": {"inputs": [elem(i.type) for i in model.graph.input], "outputs": [elem(o.type) for o in model.graph.output]},
        "input_shape": dims(model.graph.input[0].type),
        "initializers": initializers,
    }


def qdq_types(path: Path) -> dict[str, Any]:
    """The integer types of a QDQ model, read from its zero points: activations (QuantizeLinear) and the weights
    (initializers dequantized straight into a compute op), with the ORT name of the pair (``S8S8``, ``U8S8``)."""
    import onnx

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}

    def dtype(name: str) -> str:
        return onnx.helper.tensor_dtype_to_np_dtype(inits[name].data_type).name if name in inits else "unknown"

    weight_inputs = {node.input[1] for node in graph.node if node.op_type in _COMPUTE_OPS and len(node.input) > 1}
    activations: dict[str, int] = {}
    weights: dict[str, int] = {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2:
            name = dtype(node.input[2])
            activations[name] = activations.get(name, 0) + 1
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits and node.output[0] in weight_inputs and len(node.input) > 2:
            name = dtype(node.input[2])  # a weight dequantized straight into Conv, MatMul or Gemm
            weights[name] = weights.get(name, 0) + 1
    letter = {"int8": "S8", "uint8": "U8"}
    pair = (letter.get(next(iter(activations)), "?") + letter.get(next(iter(weights)), "?")
            if len(activations) == 1 and len(weights) == 1 else "mixed")  # fmt: skip
    return {"activations": activations, "weights": weights, "format": pair}


_COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
_SCOPES = "pkg.torch.onnx.name_scopes"


def _node_scopes(node: Any) -> list[str]:
    """The torch module paths (outermost first) the dynamo exporter recorded for an ONNX node."""
    import ast

    scopes = next((p.value for p in node.metadata_props if p.key == _SCOPES), None)
    if scopes is None:
        return []
    try:
        return [str(s) for s in ast.literal_eval(scopes)]
    except (ValueError, SyntaxError):
        return []


def _node_group(node: Any) -> str | None:
    """The layer group of an ONNX node, from its torch name scopes."""
    from segformer_edge.calibration.spec import group_of

    return next((g for s in reversed(_node_scopes(node)) if (g := group_of(s)) is not None), None)


def _float_nodes(path: Path, quant: QuantSpec) -> list[str]:
    """Names of the ONNX nodes that the dynamo exporter traced inside the spec's float-kept groups or layers, or
    inside a graph edge every quantizer keeps float (:data:`FLOAT_EDGES`)."""
    import onnx
    from segformer_edge.calibration.spec import within

    nodes = onnx.load(str(path)).graph.node
    names = [node.name for node in nodes if any(map(quant.keeps_float, _node_scopes(node)))]
    if quant.float_groups:
        wanted = ", ".join(quant.float_groups)
        if not any(within(s, quant.float_modules) for node in nodes for s in _node_scopes(node)):
            raise ExportError(f"onnx: no node found in the float-kept {wanted} (no torch name scopes)")
        logger.info("onnx: %d nodes kept in float for %s (and the float graph edges)", len(names), wanted)
    return names


def ops_by_group(path: Path) -> dict[str, dict[str, int]]:
    """Per layer group, the compute ops (Conv, MatMul, Gemm) whose two operands (activation and weight) both
    come out of a DequantizeLinear (int8) or not (float), read from the quantized model itself."""
    import onnx

    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    counts: dict[str, dict[str, int]] = {}
    for node in graph.node:
        if node.op_type not in _COMPUTE_OPS:
            continue
        sources = [producer.get(name) for name in node.input[:2]]
        quantized = len(sources) == 2 and all(src is not None and src.op_type == "DequantizeLinear" for src in sources)
        entry = counts.setdefault(_node_group(node) or "other", {"quantized": 0, "float": 0})
        entry["quantized" if quantized else "float"] += 1
    return counts


_CALIBRATION_MEMORY = 3e9  # bytes of intermediate tensors ORT's calibration may hold


def _activation_bytes(path: Path) -> int:
    """Bytes of all float intermediate tensors of one inference (from ONNX shape inference)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    total = 0
    for info in model.graph.value_info:
        t = info.type.tensor_type
        if t.elem_type != onnx.TensorProto.FLOAT or not t.shape.dim:
            continue
        n = 1
        for d in t.shape.dim:
            n *= d.dim_value if d.dim_value > 0 else 1
        total += 4 * n
    return total


def _to_fp16(model):  # type: ignore[no-untyped-def]
    """fp16 weights and compute with fp32 graph inputs and outputs (casts at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(model, keep_io_types=True)
    _sort_nodes(model.graph)
    return model


def _sort_nodes(graph) -> None:  # type: ignore[no-untyped-def]
    """Topologically sort ``graph.node`` in place (the fp16 pass appends its input casts at the end)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError("the ONNX graph has a cycle or an undefined input")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)
