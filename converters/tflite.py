"""TFLite (LiteRT): litert-torch conversion, fp16 weights through the LiteRT quantizer, the LiteRT runner.

The runner uses ``ai_edge_litert``'s Interpreter, or ``tflite_runtime`` where only that is installed (as
on older boards); neither needs torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from segformer_edge.errors import ExportError

from .base import EDGE_FEATURES, Artifact, ArtifactError, ExportOptions, ExportPlan, Target

if TYPE_CHECKING:
    from segformer_edge.calibration.spec import QuantSpec

logger = logging.getLogger(__name__)

IO_TYPES = ("float", "int8", "uint8")  # the graph edges of a full-integer model (-O io=...)

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
        if y.dtype in (np.int8, np.uint8, np.int16) and scale:
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
    # int8: graph edges of a full-integer model (float: quantize/dequantize ops inside the model; int8 or uint8:
    # integer tensors, for NPUs and microcontrollers). activations: int8, or int16 with int8 weights (16x8).
    # attention: float (the matmuls and softmax between the int8 layers stay float: XNNPACK delegates them, and
    # has no int8 batch matmul or softmax) or int8 (a fully integer graph, for NPU delegates and microcontrollers;
    # on a CPU those ops fall back to LiteRT's built-in kernels: benchmarks/ATTENTION.md).
    options: ClassVar[dict[str, tuple[str, ...]]] = {"io": IO_TYPES, "activations": ("int8", "int16"), "attention": ("float", "int8")}

    def plan(self, options: ExportOptions, quant: QuantSpec | None) -> dict[str, str]:
        chosen = super().plan(options, quant)
        asked = options.target_options
        for key in ("io", "activations", "attention"):
            if key in asked and options.precision != "int8":
                raise ExportError(f"tflite: --target-option {key}={asked[key]} applies to --precision int8 only")
        if chosen["io"] != "float":
            if options.input_kind == "uint8" or options.output == "mask":
                raise ExportError(f"tflite: io={chosen['io']} quantizes the float input and logits: it takes --input normalized "
                                  "or rgb01 and --output logits (--input uint8 is already a byte input)")  # fmt: skip
            if chosen["activations"] == "int16":
                raise ExportError(f"tflite: io={chosen['io']} needs activations=int8 (16x8 models take io=float)")
        if chosen["activations"] == "int16" and quant is not None:
            if quant.method != "minmax":
                raise ExportError(f"tflite: activations=int16 calibrates with ai-edge-quantizer's min/max ranges: --method minmax or auto, not {quant.method}")
            if quant.float_groups:
                raise ExportError("tflite: activations=int16 quantizes every op ai-edge-quantizer supports; float-kept layer "
                                  "groups (--budget) need activations=int8")  # fmt: skip
            if quant.weights != "per_channel":
                raise ExportError("tflite: activations=int16 has per-channel int8 weights only (ai-edge-quantizer's static_wi8_ai16)")
            if chosen["attention"] == "int8":
                raise ExportError("tflite: attention=int8 needs activations=int8 (16x8 quantizes what ai-edge-quantizer supports)")
        return chosen if options.precision == "int8" else {}  # both options shape a quantized model only

    def prepare(self, module):  # type: ignore[no-untyped-def]
        from .graph import split_single_head_attention

        return split_single_head_attention(module)

    def method_for(self, options: ExportOptions) -> str:
        return "minmax" if options.target_options.get("activations") == "int16" else self.default_method

    def quantizer_for(self, quant: QuantSpec, target_options: dict[str, str] | None = None) -> Any:
        options = target_options or {}
        return self.pt2e_quantizer(quant, activations=options.get("activations", "int8"), attention=options.get("attention", "float"))

    def pt2e_quantizer(self, quant: QuantSpec, activations: str = "int8", attention: str = "float") -> Any:
        """litert-torch PT2E full integer: int8 weights and activations (the attention's matmuls and softmax too with
        ``attention="int8"``). None for 16x8 (activations=int16): litert-torch 0.10's lowering has no 16-bit form of
        some ops (``tfl.concatenation`` refuses QI16 operands), so 16x8 is made by ai-edge-quantizer's
        ``static_wi8_ai16`` recipe on the float model instead."""
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config

        if activations == "int16":
            return None  # 16x8 is made by ai-edge-quantizer on the float model (see _quantize_16x8)
        config = get_symmetric_quantization_config(is_per_channel=quant.weights == "per_channel", is_dynamic=False)
        quantizer = PT2EQuantizer().set_global(config)
        if attention == "int8":
            from segformer_edge.calibration.recipes import IntegerAttention

            return IntegerAttention(quantizer, config.input_activation, config.fixed_qparams)
        return quantizer

    def convert(self, module, example, path: Path, plan: ExportPlan) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        import litert_torch

        sixteen = plan.quant is not None and plan.target_options["activations"] == "int16"
        if plan.quant is not None and not sixteen:
            from litert_torch.quantize.quant_config import QuantConfig

            quant_config = QuantConfig(pt2e_quantizer=self.quantizer_for(plan.quant, plan.target_options))
            edge = litert_torch.convert(module, (example,), quant_config=quant_config)
        else:
            edge = litert_torch.convert(module, (example,))
        edge.export(str(path))
        lowered: dict[str, Any] = {}
        if sixteen:
            lowered["quantization"] = _quantize_16x8(path, plan)
        if plan.quant is not None:
            set_io(path, plan.target_options["io"])
            lowered.setdefault("quantization", {})["io"] = io_quantization(path)
        if plan.options.precision == "fp16":
            from ai_edge_quantizer import quantizer

            qt = quantizer.Quantizer(str(path), _FP16_RECIPE)
            path.write_bytes(bytes(qt.quantize().quantized_model))
        back = read_back(path)
        if plan.quant is not None:
            lowered["quantization"]["activations"] = back["compute_inputs"]  # the dtypes conv/FC read, from the flatbuffer
            lowered["quantization"]["attention_ops"] = attention_ops(path)
        return {"tflite": {"converter": "litert-torch", **back}, "delegation": delegation_report(path), "io": model_io(path),
                **lowered}  # fmt: skip

    def load(self, artifact: Artifact, threads: int | None = None) -> LiteRTRunner:
        return LiteRTRunner(artifact, threads=threads)

    def runner_factory(self, artifact: Artifact, threads: int, compute_units: str = "all") -> Any:
        _interpreter_class()  # ai_edge_litert, or tflite_runtime where only that is installed
        return lambda: LiteRTRunner(artifact, threads=threads)


def _quantize_16x8(path: Path, plan: ExportPlan) -> dict[str, Any]:
    """16-bit activations and int8 weights, in place: ai-edge-quantizer's ``static_wi8_ai16`` recipe (symmetric int16
    activations with min/max ranges over the calibration images, per-channel int8 weights) on the float model."""
    from ai_edge_quantizer import quantizer, recipe

    if plan.quant is None:
        raise ExportError("tflite: activations=int16 applies to --precision int8 only")
    calib = plan.quant.require_calibration("tflite")
    interpreter_cls, _ = _interpreter_class()
    signatures = interpreter_cls(model_path=str(path)).get_signature_list()  # {key: {"inputs": [...], "outputs": [...]}}
    key = next(iter(signatures))
    name = signatures[key]["inputs"][0]
    batch = plan.graph_input(calib.images)  # (N, ...) as the graph takes it
    qt = quantizer.Quantizer(str(path), recipe.static_wi8_ai16())
    result = qt.calibrate({key: [{name: batch[i : i + 1]} for i in range(len(batch))]})
    path.write_bytes(bytes(qt.quantize(result).quantized_model))
    return {"quantizer": "ai-edge-quantizer static_wi8_ai16 (min/max)", "calibration_images_used": len(batch)}


def set_io(path: Path, io: str) -> None:
    """Give a full-integer model (litert-torch's PT2E lowering takes the int8 tensors themselves as graph input and
    output) the graph edges ``io`` asks for, in place.

    ``int8`` leaves it as it is. ``float`` adds a QUANTIZE (float -> int8, or int16 for 16x8) in front of each
    quantized input and a DEQUANTIZE after each quantized output, what TFLiteConverter's full-integer default gives
    (edges that are not quantized tensors, a byte image or a mask, stay as they are). ``uint8`` adds QUANTIZE requantize ops
    (uint8 -> int8 in, int8 -> uint8 out, zero point + 128, same scale), what TensorFlow's
    ``modify_model_interface`` does for uint8 (that tool only rewrites float edges, so it cannot be used here). The
    new edge tensors take the old ones' names, so signatures and output order are unchanged.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    graph = model.subgraphs[0]
    if io == "int8":
        return
    edge_type = schema.TensorType.FLOAT32 if io == "float" else schema.TensorType.UINT8

    def opcode(builtin: int) -> int:
        for i, code in enumerate(model.operatorCodes):
            if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
                code.version = max(code.version, 2)
                return i
        model.operatorCodes.append(schema.OperatorCodeT(deprecatedBuiltinCode=min(builtin, 127), version=2, builtinCode=builtin))
        return len(model.operatorCodes) - 1

    def quantized(index: int) -> bool:
        tensor = graph.tensors[index]
        integer = (schema.TensorType.INT8, schema.TensorType.INT16) if io == "float" else (schema.TensorType.INT8,)
        return tensor.type in integer and tensor.quantization is not None and bool(tensor.quantization.scale)

    def edge_tensor(inner_index: int) -> int:
        """A new tensor of ``edge_type`` like ``inner``, taking its name; returns its index."""
        inner = graph.tensors[inner_index]
        if not quantized(inner_index):
            raise ExportError(f"tflite: io={io} needs quantized graph edges (found {flatbuffer_utils.type_to_name(inner.type)})")
        quant = None
        if io == "uint8":
            quant = schema.QuantizationParametersT()
            quant.scale = list(inner.quantization.scale)
            quant.zeroPoint = [int(z) + 128 for z in inner.quantization.zeroPoint]
        outer = schema.TensorT(shape=list(inner.shape), type=edge_type, buffer=0, name=inner.name, quantization=quant,
                               shapeSignature=None if inner.shapeSignature is None else list(inner.shapeSignature),
                               hasRank=inner.hasRank)  # fmt: skip
        inner.name = (inner.name.decode() if isinstance(inner.name, bytes) else str(inner.name)) + "/quantized"
        graph.tensors.append(outer)
        return len(graph.tensors) - 1

    # io=float leaves edges that are not quantized as they are: a --input uint8 byte image, a --output mask's labels.

    def keep(index: int) -> bool:
        return io == "float" and not quantized(index)

    remap: dict[int, int] = {}
    new_inputs, new_outputs, head, tail = [], [], [], []
    for index in graph.inputs:
        if keep(int(index)):
            new_inputs.append(int(index))
            continue
        outer = edge_tensor(int(index))
        remap[int(index)] = outer
        head.append(schema.OperatorT(opcodeIndex=opcode(schema.BuiltinOperator.QUANTIZE), inputs=[outer], outputs=[int(index)]))
        new_inputs.append(outer)
    for index in graph.outputs:
        if keep(int(index)):
            new_outputs.append(int(index))
            continue
        outer = edge_tensor(int(index))
        remap[int(index)] = outer
        builtin = schema.BuiltinOperator.DEQUANTIZE if io == "float" else schema.BuiltinOperator.QUANTIZE
        tail.append(schema.OperatorT(opcodeIndex=opcode(builtin), inputs=[int(index)], outputs=[outer]))
        new_outputs.append(outer)
    graph.inputs, graph.outputs = new_inputs, new_outputs
    graph.operators = head + list(graph.operators) + tail
    for signature in model.signatureDefs or []:
        for item in [*(signature.inputs or []), *(signature.outputs or [])]:
            item.tensorIndex = remap.get(int(item.tensorIndex), int(item.tensorIndex))
    flatbuffer_utils.write_model(model, str(path))


def io_quantization(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The graph inputs' and outputs' dtype, scale and zero point, read back by the interpreter (what a caller of an
    integer-I/O model must quantize with)."""
    interpreter_cls, _ = _interpreter_class()
    interpreter = interpreter_cls(model_path=str(path), num_threads=1)

    def one(detail: dict[str, Any]) -> dict[str, Any]:
        scale, zero = detail.get("quantization", (0.0, 0))
        entry: dict[str, Any] = {"dtype": np.dtype(detail["dtype"]).name}
        if scale:
            entry.update(scale=float(scale), zero_point=int(zero))
        return entry

    return {"inputs": [one(d) for d in interpreter.get_input_details()],
            "outputs": [one(d) for d in _in_graph_order(interpreter.get_output_details())]}  # fmt: skip


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


def attention_ops(path: Path) -> dict[str, dict[str, int]]:
    """Each attention's q @ k^T, softmax and attn @ v by the dtype they compute in, read from the flatbuffer: the
    BATCH_MATMUL feeding each SOFTMAX and the one it feeds (through QUANTIZE/DEQUANTIZE ops)."""
    interpreter_cls, _ = _interpreter_class()
    interpreter = interpreter_cls(model_path=str(path), num_threads=1)
    ops = interpreter._get_ops_details()
    dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    producer = {int(t): op for op in ops for t in op["outputs"]}
    readers: dict[int, list[dict[str, Any]]] = {}
    for op in ops:
        for t in op["inputs"]:
            readers.setdefault(int(t), []).append(op)
    passthrough = ("QUANTIZE", "DEQUANTIZE")

    def back(tensor: int) -> dict[str, Any] | None:
        op = producer.get(tensor)
        while op is not None and op["op_name"] in passthrough:
            op = producer.get(int(op["inputs"][0]))
        return op

    def forward(tensor: int) -> dict[str, Any] | None:
        users = readers.get(tensor, [])
        while len(users) == 1 and users[0]["op_name"] in passthrough:
            users = readers.get(int(users[0]["outputs"][0]), [])
        return users[0] if len(users) == 1 else None

    counts: dict[str, dict[str, int]] = {part: {} for part in ("q_kT", "softmax", "attn_v")}
    for op in ops:
        if op["op_name"] != "SOFTMAX":
            continue
        qk, av = back(int(op["inputs"][0])), forward(int(op["outputs"][0]))
        if qk is None or qk["op_name"] != "BATCH_MATMUL":
            continue
        for part, node in (("q_kT", qk), ("softmax", op), ("attn_v", av)):
            if node is not None and (part == "softmax" or node["op_name"] == "BATCH_MATMUL"):
                dtype = dtypes[int(node["inputs"][0])]
                counts[part][dtype] = counts[part].get(dtype, 0) + 1
    return counts
