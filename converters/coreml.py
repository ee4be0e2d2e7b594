"""Core ML: an ML program (.mlpackage) made through torch.export (the jit.trace path is broken).

On macOS the runner uses the Core ML framework (a choice of compute units); elsewhere it runs the saved
program with the numpy reference executor (:mod:`.mil_executor`), and reports say which one ran.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from segformer_edge.errors import ExportError

from .base import EDGE_FEATURES, TAPS, Artifact, ExportOptions, ExportPlan, Target

if TYPE_CHECKING:
    from segformer_edge.calibration.spec import QuantSpec

logger = logging.getLogger(__name__)

COMPUTE_UNITS = ("all", "cpu", "gpu", "ane")


_PATTERN_GETTERS = ("get_conv_pattern", "get_conv_bn_pattern", "get_linear_pattern", "get_linear_bn_pattern",
                    "get_binary_op_act_pattern")  # fmt: skip


def _trace_pattern(pattern: Any, example_inputs: tuple[Any, ...], is_cuda: bool = False) -> Any:
    """torchao's ``_get_aten_graph_module_for_pattern`` traced non-strict: the same aten graph, line for line of
    its generated code (tests/test_int8.py holds each kind of pattern against the strict trace), several times faster
    (no dynamo frame capture for a two-op pattern). Its guard check is left out as torchao's strict trace
    has none; the copy_ nodes ``ep.module()`` adds for mutated inputs are dropped, as there."""
    import torch

    if is_cuda:
        example_inputs = tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in example_inputs)
    graph_module = torch.export.export(pattern, example_inputs).module(check_guards=False)  # non-strict (the default)
    graph_module.graph.eliminate_dead_code()
    for node in list(graph_module.graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.copy_.default and not node.users:
            graph_module.graph.erase_node(node)
    graph_module.recompile()
    return graph_module


def reuse_pattern_graphs() -> None:
    """Make Core ML's PT2E quantizer trace each of its pattern graphs once per process, non-strict.

    Its ``annotate`` traces every (op, activation, in-place) pattern it matches with a strict torch.export, about
    400 of them, on every quantization: most of a tiny model's int8 export time, whatever the model. Each pattern
    is a pure function of those hashable arguments, so each is traced once per process (the matcher rewrites the
    graph it is given: each call gets a fresh copy of the traced one), and non-strict by :func:`_trace_pattern`.
    Idempotent; the quantized graph is the same, op for op."""
    import copy
    import functools

    import executorch.backends.apple.coreml.quantizer._coreml_quantizer_utils as utils

    utils._get_aten_graph_module = _trace_pattern
    for name in _PATTERN_GETTERS:
        getter = getattr(utils, name)
        if getattr(getter, "_traced_once", False):
            continue
        traced = functools.cache(getter)

        def fresh(*args: Any, _traced: Any = traced, **kwargs: Any) -> Any:
            return copy.deepcopy(_traced(*args, **kwargs))

        fresh._traced_once = True  # type: ignore[attr-defined]
        setattr(utils, name, functools.wraps(getter)(fresh))


def _graph_structure(graph: Any) -> tuple[Any, ...]:
    """What a graph's generated code and its dead code depend on: each node in order, its op, target and arguments
    (the arguments say who uses what)."""
    return tuple((node, node.op, node.target, node.args, node.kwargs) for node in graph.nodes)


@contextlib.contextmanager
def recompiled_only_when_changed(model: Any) -> Iterator[None]:
    """Within this block, ``model.graph.eliminate_dead_code()`` and ``model.recompile()`` do their work only where the
    graph changed since they last did it.

    Core ML's quantizer calls both on the whole model before matching each of its ~400 patterns
    (``annotate_weighted_mod_pattern``, ``annotate_binary_op_act_pattern``), and annotating changes no node: the
    same b2 graph had its Python code generated and compiled some 400 times (benchmarks/COREML_ANNOTATE.md measures
    prepare_pt2e both ways). Here each call compares the graph's structure (:func:`_graph_structure`) with
    what it was when the work was last done, and does it again only where that differs; on leaving, the instance's
    own methods are back."""
    graph = model.graph
    real_dce, real_recompile = graph.eliminate_dead_code, model.recompile
    clean: list[Any] = [None]  # the structure after a dead-code pass that removed nothing
    compiled: list[Any] = [None]  # the structure the code was last generated from

    def eliminate_dead_code(*args: Any, **kwargs: Any) -> bool:
        if args or kwargs or clean[0] != _graph_structure(graph):
            changed = real_dce(*args, **kwargs)
            clean[0] = None if changed or args or kwargs else _graph_structure(graph)
            return changed
        return False

    def recompile() -> Any:
        structure = _graph_structure(graph)
        if compiled[0] != structure:
            compiled[0] = structure
            return real_recompile()
        return None

    graph.eliminate_dead_code, model.recompile = eliminate_dead_code, recompile
    try:
        yield
    finally:
        del graph.eliminate_dead_code, model.recompile


class _RecompileOnce:
    """Core ML's PT2E quantizer, its ``annotate`` run inside :func:`recompiled_only_when_changed`."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def label(self) -> str:
        """The name the manifest records: the quantizer's own."""
        return str(getattr(self._inner, "label", type(self._inner).__name__))

    def annotate(self, model: Any) -> Any:
        with recompiled_only_when_changed(model):
            return self._inner.annotate(model)


class CoreMLRunner:
    """Core ML framework on macOS, the numpy MIL reference executor elsewhere."""

    def __init__(self, artifact: Artifact, compute_units: str = "all", force_reference: bool = False) -> None:
        if compute_units not in COMPUTE_UNITS:
            raise ValueError(f"--compute-units {compute_units}: choose one of {', '.join(COMPUTE_UNITS)}")
        self.output_names = ["out", *artifact.manifest["output"].get("taps", [])]
        self.input_name = "x"
        self.image_input = bool(artifact.manifest.get("coreml", {}).get("image_input"))
        if platform.system() == "Darwin" and not force_reference:
            import coremltools as ct

            units = {"all": ct.ComputeUnit.ALL, "cpu": ct.ComputeUnit.CPU_ONLY, "gpu": ct.ComputeUnit.CPU_AND_GPU,
                     "ane": ct.ComputeUnit.CPU_AND_NE}[compute_units]  # fmt: skip
            self.model = ct.models.MLModel(str(artifact.file), compute_units=units)
            self.executor = f"coreml-framework ({compute_units})"
            self.program = None
        else:
            from .mil_executor import MilProgram

            self.program = MilProgram(artifact.file)
            self.executor = "mil-reference-executor (numpy)"

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        if self.program is not None:
            outs = self.program(**{self.input_name: x})
        elif self.image_input:  # pragma: no cover - macOS only
            from PIL import Image

            frames = [self.model.predict({self.input_name: Image.fromarray(img.transpose(1, 2, 0).astype(np.uint8))}) for img in x]
            outs = {name: np.concatenate([f[name] for f in frames]) for name in self.output_names}
        else:  # pragma: no cover - macOS only
            outs = self.model.predict({self.input_name: x})
        return [np.asarray(outs[name]) for name in self.output_names]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[0]


class CoreMLTarget(Target):
    name = "coreml"
    suffix = ".mlpackage"
    summary = "Core ML ML program (iOS, macOS); checked off macOS by a numpy MIL executor"
    precisions = ("fp32", "fp16", "int8")
    features = EDGE_FEATURES | {"image_input", "taps"}
    tools = ("coremltools",)
    runtime_modules = ("coremltools",)
    integer_input = False  # Core ML multi-arrays have no uint8: 0..255 values come in as float32
    not_here = "needs macOS"
    quant_schemes = ("static", "weight_only")  # W8A8, or compressed weights with float activations
    # Weight-only compression: int8 linear (per-channel symmetric), or k-means palettization to 4, 6 or 8 bits.
    options: ClassVar[dict[str, tuple[str, ...]]] = {"weights": ("int8", "palettize4", "palettize6", "palettize8")}

    def plan(self, options: ExportOptions, quant: QuantSpec | None) -> dict[str, str]:
        chosen = super().plan(options, quant)
        asked = options.target_options.get("weights")
        if asked is not None and (quant is None or quant.scheme != "weight_only"):
            raise ExportError(f"coreml: --target-option weights={asked} applies to --precision int8 --scheme weight_only")
        if quant is not None and quant.scheme == "weight_only" and quant.float_groups:
            raise ExportError("coreml: --scheme weight_only compresses every weight of more than 2048 values; "
                              "float-kept layer groups (--budget) need --scheme static")  # fmt: skip
        if quant is None or quant.scheme != "weight_only":
            chosen.pop("weights")  # the manifest lists only options that shaped the artifact
        return chosen

    def times_here(self) -> bool:
        return platform.system() == "Darwin"  # elsewhere only the numpy reference executor runs: no latency

    def parity_precision(self, manifest: dict[str, Any]) -> str:
        """4-bit palettized weights are held to the ``int4`` thresholds (16 values per weight tensor), read from
        the weights the program stores."""
        storage = (manifest.get("coreml") or {}).get("weight_storage") or {}
        return "int4" if manifest["precision"] == "int8" and "palettized_4bit" in storage else str(manifest["precision"])

    def pt2e_quantizer(self, quant: QuantSpec) -> Any:
        """W8A8 made on the torch side (coremltools' activation calibration needs macOS): PT2E with Core ML's
        quantizer, symmetric int8 weights and uint8 activations. None for weight-only (compressed after conversion)."""
        if quant.scheme == "weight_only":
            return None
        import torch
        from coremltools.optimize.torch.quantization.quantization_config import (
            LinearQuantizerConfig,
            QuantizationScheme,
        )
        from executorch.backends.apple.coreml.quantizer import CoreMLQuantizer

        config = LinearQuantizerConfig.from_dict({
            "global_config": {"quantization_scheme": QuantizationScheme.symmetric, "activation_dtype": torch.quint8,
                              "weight_dtype": torch.qint8, "weight_per_channel": quant.weights == "per_channel"},
        })  # fmt: skip
        reuse_pattern_graphs()
        return _RecompileOnce(CoreMLQuantizer(config))

    def convert(self, module, example, path: Path, plan: ExportPlan) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        import coremltools as ct
        import torch

        meta, variant, options = plan.meta, plan.variant, plan.options
        program = torch.export.export(module, (example.float(),)).run_decompositions({})
        if options.image_input:
            inputs = [ct.ImageType(name="x", shape=tuple(example.shape), scale=1.0 / 255.0, color_layout=ct.colorlayout.RGB)]
        else:
            inputs = [ct.TensorType(name="x", shape=tuple(example.shape), dtype=np.float32)]
        precision = ct.precision.FLOAT16 if options.precision == "fp16" else ct.precision.FLOAT32
        weight_only = plan.quant is not None and plan.quant.scheme == "weight_only"
        # W8A8's quantize/dequantize ops need iOS17; weight-only int8 and palettization keep the iOS16 constexpr ops.
        target = ct.target.iOS17 if plan.quant is not None and not weight_only else ct.target.iOS16
        model = ct.convert(
            program, convert_to="mlprogram", inputs=inputs,
            outputs=[ct.TensorType(name=n) for n in ("out", *(TAPS if options.taps else ()))],
            compute_precision=precision, minimum_deployment_target=target,
        )  # fmt: skip
        applied: dict[str, Any] = {}
        if weight_only:
            model, applied = compress_weights(model, plan.target_options["weights"], plan.quant.weights)
        model.short_description = f"SegFormer-{variant.upper()} semantic segmentation ({options.output})"
        model.user_defined_metadata.update({
            "classes": json.dumps(list(meta.class_names)),
            "palette": json.dumps([list(c) for c in meta.palette]),
            "mean": json.dumps(list(meta.mean)),
            "std": json.dumps(list(meta.std)),
            "output": options.output,
            "source": "segformer-edge",
        })  # fmt: skip
        model.save(str(path))
        back = read_back(path)
        lowered: dict[str, Any] = {"coreml": {**back, "image_input": options.image_input, "deployment_target": str(target.name)}}
        if weight_only:
            lowered["quantization"] = {**applied, "weight_storage": back["weight_storage"]}
        return lowered

    def load(self, artifact: Artifact, threads: int | None = None, compute_units: str = "all") -> CoreMLRunner:
        return CoreMLRunner(artifact, compute_units=compute_units)

    def runner_factory(self, artifact: Artifact, threads: int, compute_units: str = "all") -> Any:
        import coremltools  # noqa: F401

        return lambda: CoreMLRunner(artifact, compute_units=compute_units)


def compress_weights(model: Any, weights: str, granularity: str) -> tuple[Any, dict[str, Any]]:
    """Weight-only compression of a converted fp32 program with ``coremltools.optimize.coreml``: ``int8`` is
    ``linear_quantize_weights`` (symmetric, per channel unless ``granularity`` says per tensor), ``palettize<n>``
    is k-means ``palettize_weights`` with one n-bit look-up table per weight. coremltools' default threshold
    applies: weights of 2048 values or fewer stay fp32."""
    import coremltools.optimize.coreml as cto

    if weights == "int8":
        config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity=granularity)
        record = {"compression": "linear_quantize_weights", "mode": "linear_symmetric", "dtype": "int8", "granularity": granularity}
        model = cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=config))
    else:
        nbits = int(weights.removeprefix("palettize"))
        config = cto.OpPalettizerConfig(mode="kmeans", nbits=nbits, granularity="per_tensor")
        record = {"compression": "palettize_weights", "mode": "kmeans", "nbits": nbits, "granularity": "per_tensor"}
        model = cto.palettize_weights(model, cto.OptimizationConfig(global_config=config))
    return model, {**record, "weight_threshold": config.weight_threshold}


def read_back(path: Path) -> dict[str, Any]:
    """The saved program's ops, its tensor dtypes, how its compute ops' weights are stored, and its I/O, read back
    from the .mlpackage."""
    from .mil_executor import MilProgram

    program = MilProgram(path)
    return {"ops": program.op_types, "dtypes": program.dtype_counts(), "weight_storage": program.weight_storage(),
            "io": program.io_dtypes()}  # fmt: skip
