"""ONNX: the dynamo-based exporter with dynamic H and W, checked by the onnx checker, run by ONNX Runtime."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .base import Artifact, ExportOptions, Target

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

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


class OnnxTarget(Target):
    name = "onnx"
    suffix = ".onnx"
    precisions = ("fp32", "fp16", "int8")
    dynamic_shapes = True
    runtime_modules = ("onnxruntime",)
    extra = "runtime"

    def convert(self, module, example, options: ExportOptions, path: Path) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        import onnx
        import torch
        from torch.export import Dim

        if options.precision == "int8":
            return self._convert_int8(module, example, options, path)
        dynamic = None
        if options.dynamic:
            hd, wd = (1, 2) if options.layout == "nhwc" else (2, 3)
            dynamic = {"x": {hd: Dim("H", min=64, max=4096), wd: Dim("W", min=64, max=4096)}}
        program = torch.onnx.export(
            module, (example,), dynamo=True, dynamic_shapes=dynamic, input_names=["x"], output_names=["out"],
            optimize=True, verbose=False,
        )  # fmt: skip
        model = program.model_proto
        if options.precision == "fp16":
            model = _to_fp16(model)
        onnx.checker.check_model(model, full_check=True)
        onnx.save_model(model, str(path))
        ops = sorted({node.op_type for node in model.graph.node})
        return {"onnx": {"opset": int(model.opset_import[0].version), "ops": ops}}

    def _convert_int8(self, module, example, options: ExportOptions, path: Path) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        """QDQ static INT8 through onnxruntime.quantization, calibrated on the same set as every target."""
        import tempfile
        from dataclasses import replace

        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        from .base import calibration_inputs

        calib = options.extra["calibration"]
        inputs = [x.numpy() for x in calibration_inputs(options, example)]

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.items = iter([{"x": x} for x in inputs])

            def get_next(self):  # type: ignore[no-untyped-def]
                return next(self.items, None)

        methods = {
            "minmax": (CalibrationMethod.MinMax, {}),
            "moving_average": (CalibrationMethod.MinMax, {"CalibMovingAverage": True}),
            "percentile": (CalibrationMethod.Percentile, {"CalibPercentile": 99.99}),
            "mse": (CalibrationMethod.Entropy, {}),  # ORT has no MSE search; entropy (KL) is its closest
        }
        method, extra = methods[calib.method]
        used = len(inputs)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            fp32, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
            self.convert(module, example, replace(options, precision="fp32", dynamic=False), fp32)
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            excluded = _nodes_in_modules(pre, options.extra.get("float_modules", []))
            if method == CalibrationMethod.MinMax:
                extra["CalibMaxIntermediateOutputs"] = 4  # fold ranges every 4 images: memory stays bounded
            else:
                # ORT's histogram calibrators keep every intermediate tensor of every image until the end.
                per_image = _activation_bytes(pre)
                used = max(1, min(len(inputs), int(_HISTOGRAM_MEMORY // max(per_image, 1))))
                if used < len(inputs):
                    logger.warning("onnx: %s calibration on %d of %d images (%.0f MB of activations each)",
                                   method.name, used, len(inputs), per_image / 1e6)  # fmt: skip
                    inputs = inputs[:used]
            quantize_static(
                str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                nodes_to_exclude=excluded, extra_options=extra,
            )  # fmt: skip
        return {"onnx": {"format": "QDQ"}, "quantization": {"quantizer": f"onnxruntime quantize_static ({method.name})",
                                                            "ort_calibration_images": used}}

    def load(self, artifact: Artifact) -> OnnxRunner:
        self.check_runtime()
        return OnnxRunner(artifact)


_HISTOGRAM_MEMORY = 3e9  # bytes of intermediate tensors ORT's histogram calibration may hold


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


def _nodes_in_modules(path: Path, modules: list[str]) -> list[str]:
    """Names of the ONNX nodes that the dynamo exporter traced inside any of ``modules`` (its name scopes)."""
    if not modules:
        return []
    import ast

    import onnx

    names = []
    for node in onnx.load(str(path)).graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        if scopes is None:
            continue
        try:
            scope_list = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            continue
        if any(m in scope_list for m in modules):
            names.append(node.name)
    logger.info("onnx: %d nodes kept in float for %s", len(names), ", ".join(modules))
    return names


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
