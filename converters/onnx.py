"""ONNX: the dynamo-based exporter with dynamic H and W, checked by the onnx checker, run by ONNX Runtime.

INT8 is QDQ static quantization with onnxruntime.quantization (its own calibrators), calibrated on the
same set as every target; float-kept layer groups are found by the torch name scopes the exporter records.
The attention's softmax takes the float output of q @ k^T (no quantize/dequantize pair between them): ONNX
Runtime then runs q @ k^T as an int8 MatMulIntegerToFloat and the softmax in float, where a DQ -> Softmax -> Q
triple becomes its QLinearSoftmax, several times slower than the float softmax (benchmarks/ONNX_INT8.md).
"""

from __future__ import annotations

import logging
import platform
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
    # U8S8 (uint8 activations, int8 weights) or S8S8 (int8 both, ORT's default for QDQ); auto: U8S8 where this
    # machine's CPU has ORT's fast U8S8 kernels without their saturation (VNNI, Arm64), S8S8 elsewhere.
    # softmax=float: the attention's softmax reads q @ k^T unquantized (ORT: MatMulIntegerToFloat + float Softmax);
    # int8: the full QDQ graph, for execution providers that want every op quantized (QLinearSoftmax on the CPU).
    options: ClassVar[dict[str, tuple[str, ...]]] = {"activations": ("auto", "uint8", "int8"), "softmax": ("float", "int8")}
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
            return self._quantize_static(model, path, plan.quant, plan.graph_input, plan.target_options)
        onnx.save_model(model, str(path))
        return {"onnx": read_back(path)}

    def plan(self, options: ExportOptions, quant: QuantSpec | None) -> dict[str, str]:
        chosen = super().plan(options, quant)
        for key in ("activations", "softmax"):
            if key in options.target_options and options.precision != "int8":
                raise ExportError(f"onnx: --target-option {key}=... applies to --precision int8 only")
        if options.precision != "int8":
            return {}  # the manifest lists only options that shaped the artifact
        if chosen["activations"] == "auto":
            chosen["activations"] = "uint8" if u8s8_is_fast() else "int8"
            logger.info("onnx: activations=auto -> %s (%s)", chosen["activations"], platform.machine())
        return chosen

    def _quantize_static(self, model: Any, path: Path, quant: QuantSpec, spec: InputSpec, options: dict[str, str]) -> dict[str, Any]:
        """QDQ static INT8 through onnxruntime.quantization, calibrated on the same set as every target; int8 weights
        with int8 (S8S8) or uint8 (U8S8) activations; the attention softmax float or quantized."""
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
                activation_type=QuantType.QUInt8 if options["activations"] == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                nodes_to_exclude=excluded, extra_options=extra,
            )  # fmt: skip
            if options["softmax"] == "float":
                float_softmax(path)
        return {"onnx": {**read_back(path), "format": "QDQ"},
                "quantization": {"quantizer": f"onnxruntime quantize_static ({used_method})", "calibrate_method": used_method,
                                 "qdq_types": qdq_types(path),
                                 "calibration_images_used": used,
                                 "attention": attention_precision(path),
                                 "ops_by_group": ops_by_group(path)}}  # fmt: skip

    def load(self, artifact: Artifact, threads: int | None = None) -> OnnxRunner:
        self.check_runtime()
        return OnnxRunner(artifact, threads=threads)

    def profile(self, artifact: Artifact, x: np.ndarray, runs: int, threads: int) -> list[dict[str, Any]]:
        from .base import top_ops

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


def u8s8_is_fast() -> bool:
    """Whether ONNX Runtime's U8S8 kernels run here at full speed without saturating: x86 CPUs with VNNI
    (AVX512-VNNI or AVX-VNNI, read from /proc/cpuinfo) and Arm64. Without VNNI, ORT's x86 U8S8 path
    (VPMADDUBSW) adds pairs in 16 bits and can saturate; S8S8 is the safe choice there."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False  # not Linux: no cheap way to read the flags, take the safe choice
    return "avx512_vnni" in flags or "avx_vnni" in flags


def float_softmax(path: Path) -> int:
    """Rewire every Softmax fed by a QuantizeLinear -> DequantizeLinear pair to the pair's float input, and drop
    the pair where nothing else reads it; returns how many were rewired.

    Without the pair ONNX Runtime cannot fuse DQ -> Softmax -> Q into QLinearSoftmax (several times slower than
    the float softmax: benchmarks/ONNX_INT8.md); the int8 MatMul before it (q @ k^T) fuses into
    MatMulIntegerToFloat instead, so the attention keeps both matmuls in int8 and its softmax gets unrounded scores."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    dropped: set[str] = set()  # by output name (protobuf hands out new wrapper objects per access)
    rewired = 0
    for node in graph.node:
        dq = producer.get(node.input[0]) if node.op_type == "Softmax" else None
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        node.input[0] = q.input[0]
        rewired += 1
        readers[dq.output[0]] -= 1
        if readers[dq.output[0]] == 0:
            dropped.add(dq.output[0])
            readers[q.output[0]] -= 1
            if readers[q.output[0]] == 0:
                dropped.add(q.output[0])
    if not rewired:
        return 0
    kept = [node for node in graph.node if not (node.output and node.output[0] in dropped)]
    used = {name for node in kept for name in node.input}
    initializers = [init for init in graph.initializer if init.name in used]  # the dropped pairs' scales and zero points
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return rewired


def attention_precision(path: Path) -> dict[str, dict[str, int]]:
    """Each attention's q @ k^T, softmax and attn @ v as int8 or float, read from the quantized model: a MatMul
    is int8 when both its operands come out of a DequantizeLinear, the softmax when it sits between a
    DequantizeLinear and a QuantizeLinear (which ONNX Runtime fuses to QLinearSoftmax)."""
    import onnx

    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def before(node: Any, op: str) -> Any:
        src = producer.get(node.input[0])
        return src if src is not None and src.op_type == op else None

    def after(node: Any, op: str | None = None) -> Any:
        nodes = readers.get(node.output[0], [])
        return nodes[0] if len(nodes) == 1 and op in (None, nodes[0].op_type) else None

    def int8_matmul(node: Any) -> bool:
        return all((src := producer.get(name)) is not None and src.op_type == "DequantizeLinear" for name in node.input[:2])

    counts = {part: {"int8": 0, "float": 0} for part in ("q_kT", "softmax", "attn_v")}
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        dq_in = before(node, "DequantizeLinear")
        q_in = before(dq_in, "QuantizeLinear") if dq_in is not None else None
        qk = producer.get(q_in.input[0]) if q_in is not None else producer.get(node.input[0])
        if qk is None or qk.op_type != "MatMul":
            continue  # not an attention's softmax (a probs output)
        q_out = after(node, "QuantizeLinear")
        dq_out = after(q_out, "DequantizeLinear") if q_out is not None else None
        av = after(dq_out) if dq_out is not None else after(node)
        counts["q_kT"]["int8" if int8_matmul(qk) else "float"] += 1
        counts["softmax"]["int8" if dq_in is not None and q_out is not None else "float"] += 1
        if av is not None and av.op_type == "MatMul":
            counts["attn_v"]["int8" if int8_matmul(av) else "float"] += 1
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
