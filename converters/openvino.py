"""OpenVINO: the torch module converted through OpenVINO's TorchScript frontend, run by the OpenVINO CPU plugin.

The artifact's model file is a folder, ``model.openvino/``, holding the IR (``model.xml`` and ``model.bin``),
so that the manifest's sha256 covers both. fp32 keeps f32 weights, fp16 stores f16 weights, and INT8 is NNCF
post-training quantization of the converted model, calibrated on the same set as every target.

The CPU plugin picks its inference precision itself: on CPUs with bf16 (avx512_bf16, AMX) its default is
bf16, with no word said. The runner therefore always states a precision hint (``--target-option hint=...``,
``f32`` unless asked otherwise; ``auto`` leaves the plugin's choice), reads back the precision the plugin
really uses, and the manifest and every runner's ``executor`` record both (an ``f16`` hint runs in bf16 on a
CPU without f16 arithmetic, and in f32 on one with neither).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segformer_edge.errors import ExportError

from .base import EDGE_FEATURES, TAPS, Artifact, ArtifactError, ExportOptions, ExportPlan, Target

if TYPE_CHECKING:
    from segformer_edge.calibration.spec import QuantSpec

logger = logging.getLogger(__name__)

XML = "model.xml"
DEVICE = "CPU"
HINTS = ("f32", "auto", "bf16", "f16")  # --target-option hint: the CPU plugin's INFERENCE_PRECISION_HINT
_COMPUTE_OPS = ("MatMul", "Convolution", "GroupConvolution")
_LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze")
_MODULE = re.compile(r"^__module\.([\w.]+?)/")  # TorchScript-path friendly names: "__module.<module path>/aten::..."
_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_fp16",
              "amx_int8")  # fmt: skip


class OpenVINORunner:
    """An IR compiled for the CPU plugin with an explicit inference precision; ``precision`` says what it uses."""

    def __init__(self, artifact: Artifact, threads: int | None = None, *, hint: str | None = None,
                 profile: bool = False) -> None:  # fmt: skip
        import openvino as ov

        asked = hint or (artifact.manifest.get("target_options") or {}).get("hint") or "f32"
        if asked not in HINTS:
            raise ArtifactError(f"openvino: precision hint {asked!r}: choose one of {', '.join(HINTS)}")
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(artifact.file / XML)), DEVICE,
                                           compile_config(asked, threads, profile=profile))  # fmt: skip
        self.request = self.compiled.create_infer_request()
        used = _type_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.precision = {"asked": asked, "used": used}
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        self.outputs = len(self.compiled.outputs)
        note = "" if asked == used else "; auto" if asked == "auto" else f"; {asked} asked"
        self.executor = f"openvino {DEVICE} ({used}{note})"
        if asked not in ("auto", used):  # bf16 and f16 fall back to what the CPU has, silently
            logger.warning("openvino: inference precision %s asked, %s used on this CPU", asked, used)

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        result = self.request.infer({0: np.ascontiguousarray(x)})  # copies the outputs out of the request
        return [np.asarray(result[i]) for i in range(self.outputs)]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[0]


class OpenVINOTarget(Target):
    name = "openvino"
    suffix = ".openvino"  # a folder: model.xml + model.bin
    summary = "OpenVINO IR, run by the OpenVINO CPU plugin (x86 and Arm CPUs); INT8 through NNCF"
    precisions = ("fp32", "fp16", "int8")
    features = EDGE_FEATURES | {"dynamic", "taps"}
    quant_methods = ("minmax", "percentile", "mse")  # NNCF range estimators (see _range_estimator)
    default_method = "mse"
    options = {"hint": HINTS, "smooth_quant": ("off", "on")}
    tools = ("openvino", "nncf")
    runtime_modules = ("openvino",)
    extra = "openvino"

    def plan(self, options: ExportOptions, quant: QuantSpec | None) -> dict[str, str]:
        chosen = super().plan(options, quant)  # hint f32 unless asked: a CPU default never changes precision unsaid
        if chosen["smooth_quant"] == "on" and options.precision != "int8":
            raise ExportError("openvino: --target-option smooth_quant=on applies to --precision int8 only")
        return chosen

    def parity_precision(self, manifest: dict[str, Any]) -> str:
        """An fp32 IR run with a hint other than f32 computes in bf16 or f16 (or may: auto): fp16's thresholds."""
        hint = (manifest.get("target_options") or {}).get("hint", "f32")
        return "fp16" if manifest["precision"] == "fp32" and hint != "f32" else str(manifest["precision"])

    def convert(self, module, example, path: Path, plan: ExportPlan) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        import openvino as ov
        import torch

        options = plan.options
        shape = list(example.shape)
        if options.dynamic:
            h, w = (1, 2) if options.layout == "nhwc" else (2, 3)
            shape[h] = shape[w] = -1
        element = ov.Type.u8 if example.dtype == torch.uint8 else ov.Type.f32
        # The nn.Module (TorchScript) path keeps the module path in every op's name
        # ("__module.model.encoder.stages.0.blocks.0.attn.q/aten::linear/MatMul"): what maps ops to layer groups.
        with _no_telemetry():
            model = ov.convert_model(module, example_input=(example,), input=[(ov.PartialShape(shape), element)],
                                     share_weights=False)  # fmt: skip
        model.input(0).get_tensor().set_names({"x"})
        for output, name in zip(model.outputs, ("out", *(TAPS if options.taps else ()))):
            output.get_tensor().set_names({name})  # the TorchScript path leaves the outputs unnamed
        applied: dict[str, Any] = {}
        if plan.quant is not None:
            model, applied = _quantize(model, plan.quant, plan)
        for key, value in (("precision", options.precision), ("variant", plan.variant), ("output", options.output)):
            model.set_rt_info(value, ["segformer_edge", key])
        path.mkdir()
        # save_model compresses weights to f16 unless told not to: only the fp32 and int8 IRs keep f32 constants.
        ov.save_model(model, str(path / XML), compress_to_fp16=options.precision == "fp16")
        saved = ov.Core().read_model(str(path / XML))
        facts = runtime_facts(saved, plan.target_options["hint"])
        back = read_back(saved)
        lowered: dict[str, Any] = {"openvino": {**back, **facts},
                                   "io": {"inputs": [_NUMPY.get(p["type"], p["type"]) for p in back["inputs"]],
                                          "outputs": [_NUMPY.get(p["type"], p["type"]) for p in back["outputs"]]}}  # fmt: skip
        if plan.quant is not None:
            lowered["quantization"] = {**applied, "ops_by_group": ops_by_group(saved)}
        return lowered

    def load(self, artifact: Artifact, threads: int | None = None) -> OpenVINORunner:
        self.check_runtime()
        return OpenVINORunner(artifact, threads=threads)

    def profile(self, artifact: Artifact, x: np.ndarray, runs: int, threads: int) -> list[dict[str, Any]]:
        """Per-layer-type time from the CPU plugin's own counters (PERF_COUNT), ms per run."""
        from .base import top_ops

        runner = OpenVINORunner(artifact, threads=threads, profile=True)
        totals: dict[str, float] = {}
        for _ in range(runs):
            runner.request.infer({0: np.ascontiguousarray(x)})
            for info in runner.request.get_profiling_info():
                if info.status == info.Status.EXECUTED:
                    kind = f"{info.node_type} ({info.exec_type})"
                    totals[kind] = totals.get(kind, 0.0) + info.real_time.total_seconds() * 1000.0 / runs
        return top_ops(totals)


# -------------------------------------------------------------------------------------------------
# INT8: NNCF post-training quantization of the converted model


def _quantize(model: Any, quant: QuantSpec, plan: ExportPlan) -> tuple[Any, dict[str, Any]]:
    """``quant`` -> nncf.quantize on the ov.Model, fed by the calibration images one at a time.

    The recipe: transformer patterns, asymmetric activations (preset MIXED), the spec's range estimator,
    symmetric int8 weights at the spec's granularity, fast bias correction, SmoothQuant only when asked
    (``-O smooth_quant=on``: matmul alpha 0.95), the depthwise convs in float (:data:`_FLOAT_TYPES`). On the
    reference b0 its logits' argmax agrees with the float model's on 99.6-99.9% of pixels at 128x128, 256x256
    and 512x512 (logits SQNR 34-38 dB); with NNCF's defaults (MEAN_MINMAX activations, SmoothQuant 0.95) the
    masks agreed on 70-76% at 128x128, with the CNN patterns (no model type) on 66-75%.
    """
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        QuantizationParameters,
    )
    from segformer_edge.calibration.spec import FLOAT_EDGES

    from .graph import mask_method

    _route_nncf_logging()
    calib = quant.require_calibration("openvino")
    dtype = np.uint8 if model.input(0).get_element_type().get_type_name() == "u8" else np.float32
    inputs = [plan.graph_input(calib.images[i : i + 1]).astype(dtype) for i in range(len(calib.images))]
    smooth = plan.target_options["smooth_quant"] == "on"
    advanced = AdvancedQuantizationParameters(
        activations_range_estimator_params=_range_estimator(quant.method),
        weights_quantization_params=QuantizationParameters(per_channel=quant.weights == "per_channel"),
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=0.95 if smooth else -1, convolution=-1),
    )  # fmt: skip
    # The float-kept layer groups by op name (NNCF applies the patterns with re.match; validate: a pattern that
    # matches nothing raises), and every depthwise conv by type (see _FLOAT_TYPES).
    patterns = [rf"__module\.{re.escape(name)}[./]" for name in quant.float_modules]
    if mask_method(plan.options.output, plan.options.mask_size, plan.options.size, plan.options.dynamic) == "candidates":
        patterns += [rf"__module\.{re.escape(name)}[./]" for name in FLOAT_EDGES]  # the candidate mask (CandidateMask)
    ignored = nncf.IgnoredScope(patterns=patterns, types=list(_FLOAT_TYPES), validate=True)
    with _no_telemetry():
        quantized = nncf.quantize(
            model, nncf.Dataset(inputs), subset_size=len(inputs), model_type=nncf.ModelType.TRANSFORMER,
            fast_bias_correction=True, ignored_scope=ignored, advanced_parameters=advanced,
        )  # fmt: skip
    recipe = {"model_type": "transformer", "preset": "mixed (asymmetric activations, symmetric weights)",
              "range_estimator": _ESTIMATORS[quant.method], "weights": quant.weights, "bias_correction": "fast",
              "smooth_quant": "matmul alpha 0.95" if smooth else "off",
              "ignored_scope": {"patterns": patterns, "types": list(_FLOAT_TYPES)}}  # fmt: skip
    return quantized, {"quantizer": f"nncf.quantize {_version('nncf')} (OpenVINO backend)", "nncf": recipe,
                       "calibration_images_used": len(inputs)}  # fmt: skip


# Op types NNCF leaves in float. GroupConvolution is the Mix-FFN depthwise 3x3 conv: the CPU plugin (2026.4.1) runs
# it in f32 even with int8 weights, and with a quantized input it gives different results from one inference to the
# next on the same compiled model (seen at 256x256 and 512x512: 91-97% agreement with the float model, logits
# SQNR 6-10 dB; with it float, 99.6-99.9% and 34-38 dB, the same every time). Keeping it float costs no int8 kernel.
_FLOAT_TYPES = ("GroupConvolution",)
_ESTIMATORS = {"minmax": "MINMAX", "percentile": "QUANTILE 1e-4, averaged per image", "mse": "HISTOGRAM (L2 search)"}


def _range_estimator(method: str) -> Any:
    """The spec's activation method -> NNCF's range estimator.

    moving_average would be NNCF's MEAN_MINMAX (the mean of per-image min/max), which is unstable on SegFormer
    (86-94% agreement, and different masks from one compile to the next); entropy has no NNCF counterpart.
    Both are refused at plan time (``quant_methods``).
    """
    from nncf.quantization.range_estimator import (
        AggregatorType,
        RangeEstimatorParameters,
        RangeEstimatorParametersSet,
        StatisticsCollectorParameters,
        StatisticsType,
    )

    if method == "minmax":
        return RangeEstimatorParametersSet.MINMAX
    if method == "percentile":  # 0.01% / 99.99% quantiles of each image, averaged
        q = StatisticsCollectorParameters(statistics_type=StatisticsType.QUANTILE, aggregator_type=AggregatorType.MEAN,
                                          quantile_outlier_prob=1e-4)  # fmt: skip
        return RangeEstimatorParameters(min=q, max=q)
    if method == "mse":  # NNCF's port of the HistogramObserver: the range with the least L2 error
        return RangeEstimatorParametersSet.HISTOGRAM
    raise ExportError(f"openvino: int8 --method {method} has no NNCF range estimator (choose {', '.join(_ESTIMATORS)})")


def _route_nncf_logging() -> None:
    """NNCF logs through its own handler on sys.stdout with propagate off: hand its records to logging
    (the export's log file gets them; the terminal stays clean)."""
    nncf_logger = logging.getLogger("nncf")
    for handler in list(nncf_logger.handlers):
        nncf_logger.removeHandler(handler)
    nncf_logger.propagate = True


@contextlib.contextmanager
def _no_telemetry() -> Iterator[None]:
    """convert_model and nncf send usage telemetry unless opted out; both skip it under CI=true."""
    old = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = old


# -------------------------------------------------------------------------------------------------
# Read-back: what the saved IR holds and what the CPU plugin runs


def group_of_op(name: str) -> str:
    """The layer group of an op's friendly name (``__module.model.decoder.fuse/aten::_convolution/...``)."""
    from segformer_edge.calibration.spec import group_of

    match = _MODULE.match(name)
    return (group_of(match.group(1)) if match else None) or "other"


def _fed_by_fake_quantize(node: Any) -> bool:
    """Whether a data input comes from a FakeQuantize (NNCF moves them above reshapes, transposes and concats)."""
    while node.get_type_name() in _LAYOUT_OPS:
        node = node.input(0).get_source_output().get_node()
    if node.get_type_name() == "Concat":
        return all(_fed_by_fake_quantize(i.get_source_output().get_node()) for i in node.inputs())
    return node.get_type_name() == "FakeQuantize"


def ops_by_group(model: Any) -> dict[str, dict[str, int]]:
    """Per layer group, the compute ops (MatMul, Convolution) whose data input is quantized (fed by a
    FakeQuantize) or float, read from the saved IR."""
    counts: dict[str, dict[str, int]] = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() not in _COMPUTE_OPS:
            continue
        quantized = _fed_by_fake_quantize(op.input(0).get_source_output().get_node())
        entry = counts.setdefault(group_of_op(op.get_friendly_name()), {"quantized": 0, "float": 0})
        entry["quantized" if quantized else "float"] += 1
    return dict(sorted(counts.items()))


_NUMPY = {"u8": "uint8", "i8": "int8", "i32": "int32", "i64": "int64", "f16": "float16", "f32": "float32", "bf16": "bfloat16"}


def read_back(model: Any) -> dict[str, Any]:
    """Op types, I/O names, element types and shapes (dynamic dims as ?), and constant element types of an IR."""
    ops = Counter(op.get_type_name() for op in model.get_ordered_ops())
    constants = Counter(op.get_element_type().get_type_name() for op in model.get_ordered_ops()
                        if op.get_type_name() == "Constant")  # fmt: skip
    io = lambda port: {"name": port.get_any_name(), "type": port.get_element_type().get_type_name(),
                       "shape": str(port.get_partial_shape())}  # fmt: skip
    return {
        "files": [XML, "model.bin"],
        "ops": sorted(ops),
        "fake_quantize": ops.get("FakeQuantize", 0),
        "constants": dict(sorted(constants.items())),
        "inputs": [io(p) for p in model.inputs],
        "outputs": [io(p) for p in model.outputs],
    }


def compile_config(hint: str, threads: int | None = None, *, profile: bool = False) -> dict[str, Any]:
    """The CPU plugin's configuration for a precision hint (``auto``: the plugin's own choice)."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if hint != "auto":  # never leave it unset: the CPU default is bf16 wherever the CPU has bf16
        config["INFERENCE_PRECISION_HINT"] = hint
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if profile:
        config["PERF_COUNT"] = True
    return config


def runtime_facts(model: Any, hint: str) -> dict[str, Any]:
    """Compile the IR as the runner will, on this machine: the precision asked and used, and the precision the
    CPU plugin gives each layer group's compute layers (its ``runtimePrecision``: u8/i8 is int8; on an fp16 IR,
    f16 means f16 weights, converted as the layer runs)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(model, DEVICE, compile_config(hint))
    used = _type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
    kernels: dict[str, Counter[str]] = defaultdict(Counter)
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str)
        names = info["originalLayersNames"].astype(str).split(",")
        attention = layer == "Subgraph" and any("MatMul" in n for n in names)  # a fused attention
        if layer not in ("Convolution", "FullyConnected", "MatMul") and not attention:
            continue
        group = next((g for g in map(group_of_op, names) if g != "other"), "other")
        kernels[group][info["runtimePrecision"].astype(str)] += 1
    if hint not in ("auto", used):
        logger.warning("openvino: inference precision %s asked, %s used on this CPU", hint, used)
    return {
        "inference_precision": {"asked": hint, "used": used, "device": DEVICE},
        "runtime_precision_by_group": {g: dict(c) for g, c in sorted(kernels.items())},
        "cpu": cpu_facts(core),
    }


def cpu_facts(core: Any = None) -> dict[str, Any]:
    """The CPU plugin's device name and default precision, and the ISA flags that decide bf16 and f16."""
    import openvino as ov

    core = core or ov.Core()
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return {
        "device": str(core.get_property(DEVICE, "FULL_DEVICE_NAME")),
        "default_inference_precision": _type_name(core.get_property(DEVICE, "INFERENCE_PRECISION_HINT")),
        "isa": sorted(f for f in _ISA_FLAGS if f in flags),
    }


def _type_name(value: Any) -> str:
    """ov.Type -> 'f32' / 'bf16' / 'f16'."""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"
