"""ExecuTorch: torch.export -> XNNPACK-delegated .pte, with the delegation breakdown in the manifest.

LayerNorm is swapped at export time for a 4-D mean/rsqrt formulation that XNNPACK delegates (its
partitioner has no LayerNorm); the checkpoint's modules are untouched. fp16 runs the whole graph in half
precision inside XNNPACK, with fp32 at the graph's edges.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .base import EDGE_FEATURES, Artifact, ExportPlan, Target

if TYPE_CHECKING:
    from segformer_edge.calibration.spec import QuantSpec

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

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        import torch

        return [out.numpy().copy() for out in self.method.execute([torch.from_numpy(np.ascontiguousarray(x))])]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[0]


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

            def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
                y = self.inner(x.half() if x.is_floating_point() else x)
                if isinstance(y, tuple):  # a debug graph's taps
                    return tuple(t.float() if t.is_floating_point() else t for t in y)
                return y.float() if y.is_floating_point() else y

        return HalfCompute(module).eval()


class ExecuTorchTarget(Target):
    name = "executorch"
    suffix = ".pte"
    summary = "ExecuTorch .pte, XNNPACK-delegated (Android, iOS, Linux)"
    precisions = ("fp32", "fp16", "int8")
    features = EDGE_FEATURES | {"taps"}
    quant_schemes = ("static", "dynamic")
    tools = ("executorch",)
    runtime_modules = ("executorch.runtime",)
    # The portable topk kernel sorts: 7.9 ms for the top 2 of 150 classes at 128x128, against 3.5 ms for two
    # argmax passes and a scatter (measured in isolation, 2 threads); LiteRT's TOPK_V2 is the faster there.
    mask_runner_up = "rescan"
    refused_options: ClassVar[dict[str, str]] = {
        "attention": "XNNPACK runs batch matmul in fp32 only (ExecuTorch 1.5.1's BMMConfig), so the attention's matmuls "
        "and softmax stay float; quantization.applied.attention in the manifest says so",
    }

    def prepare(self, module, plan=None):  # type: ignore[no-untyped-def]
        """LayerNorms decomposed (their statistics stay fp32 under the quantizer) and, for fp32 and static int8,
        Mix-FFN's linears as 1x1 convolutions on the map (fewer NCHW/NHWC transposes in XNNPACK:
        :class:`~.graph.ChannelsFirstMixFFN`). Not for ``--scheme dynamic``, whose dynamically quantized ops are
        the linears, nor for fp16, where XNNPACK keeps 1x1 convolution weights in fp32 (the .pte grew from 0.5 to
        0.9 of the fp32 weights' bytes)."""
        from .graph import channels_first_mix_ffn, decompose_layer_norms

        module = decompose_layer_norms(module)
        if plan is None or plan.options.precision == "fp16" or (plan.quant is not None and plan.quant.scheme == "dynamic"):
            return module
        return channels_first_mix_ffn(module)

    def pt2e_quantizer(self, quant: QuantSpec) -> Any:
        """XNNPACKQuantizer, per-channel weights; LayerNorm statistics deliberately stay fp32.

        ``static``: int8 activations with calibrated ranges. ``dynamic``: XNNPACK's dynamically quantized linears
        (int8 weights; each linear's input quantized per inference with its own min/max, no calibration); the
        convolutions, attention matmuls and everything else stay fp32."""
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

        from .graph import DecomposedLayerNorm

        per_channel = quant.weights == "per_channel"
        if quant.scheme == "dynamic":
            import torch

            # Linears only: XNNPACK's dynamically quantized convolutions break its channels-last pass (executorch 1.5.1:
            # "required rank 4 tensor to use channels_last format"); the convolutions stay fp32.
            config = get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=True)
            return XNNPACKQuantizer().set_operator_type(torch.ops.aten.linear.default, config).set_module_type(DecomposedLayerNorm, None)
        config = get_symmetric_quantization_config(is_per_channel=per_channel)
        return XNNPACKQuantizer().set_global(config).set_module_type(DecomposedLayerNorm, None)

    def convert(self, module, example, path: Path, plan: ExportPlan) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        import torch
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.backends.xnnpack.utils.configs import get_xnnpack_edge_compile_config
        from executorch.exir import to_edge_transform_and_lower

        if plan.options.precision == "fp16":
            module = _HalfCompute(module)
        program = torch.export.export(module, (example,))
        # XNNPACK's own edge config: no edge-dialect dtype check after every pass (~7% of a b2 lowering); the artifact
        # is checked where it counts, by running it (verify), and the delegation report below reads what was lowered.
        partitioner = XnnpackPartitioner()
        with idle_passes_skipped() as skipped, idle_decompositions_skipped(partitioner) as retraces:
            edge = to_edge_transform_and_lower(program, partitioner=[partitioner], compile_config=get_xnnpack_edge_compile_config())
        report = delegation_report(edge.exported_program().graph_module)
        path.write_bytes(edge.to_executorch().buffer)
        if report["portable_ops"]:
            logger.info("executorch: ops left to portable kernels: %s", ", ".join(report["portable_ops"]))
        lowered: dict[str, Any] = {"delegation": {**report, "passes_skipped": sorted(set(skipped)),
                                                  "decompositions_skipped": len(retraces)}, "io": program_io(path)}  # fmt: skip
        if plan.quant is not None:
            lowered["quantization"] = {"scheme": quantized_scheme(report)}
        return lowered

    def load(self, artifact: Artifact, threads: int | None = None) -> ExecuTorchRunner:
        self.check_runtime()
        if threads:
            set_threads(threads)
        return ExecuTorchRunner(artifact)

    def profile(self, artifact: Artifact, x: np.ndarray, runs: int, threads: int) -> list[dict[str, Any]]:
        from .base import top_ops

        return top_ops(profile_etdump(artifact, x, runs))


def _name(node: Any) -> str:
    return str(getattr(node.target, "__name__", node.target))


def _is_batch_norm(node: Any) -> bool:
    return "batch_norm" in _name(node)


def _is_conv1d(node: Any) -> bool:
    val = node.meta.get("val")
    return "convolution" in _name(node) and (val is None or val.dim() != 4)


def _is_wide_cat(node: Any) -> bool:
    return _name(node) == "aten.cat.default" and len(node.args[0]) > 5


def _is_prelu(node: Any) -> bool:
    return "prelu" in _name(node)


def _is_dim_order_op(node: Any) -> bool:
    return _name(node).startswith("dim_order_ops.")


def _is_sdpa_mask_test(node: Any) -> bool:
    return _name(node) == "aten.any.dim"


def _is_matmul_or_viewed_linear(node: Any) -> bool:
    name = _name(node)
    if name in ("aten.mm.default", "aten.addmm.default"):
        return True
    if name != "aten.linear.default":
        return False
    return any(hasattr(n, "target") and _name(n) == "aten.view_copy.default" for n in (node.args[0], *node.users))


def _has_custom_meta(node: Any) -> bool:
    return "custom" in node.meta


def _is_constant_op(node: Any) -> bool:
    return "quantized_decomposed" not in _name(node) and all(n.op == "get_attr" for n in node.all_input_nodes)


def _is_max_with_indices(node: Any) -> bool:
    return _name(node) in ("aten.max_pool2d_with_indices.default", "aten.max.dim")


def _is_to_copy(node: Any) -> bool:
    return _name(node) == "aten._to_copy.default"


def _never(node: Any) -> bool:
    return False


def _is_symbolic(node: Any) -> bool:
    from torch import SymBool, SymFloat, SymInt

    return isinstance(node.meta.get("val"), (SymInt, SymFloat, SymBool))


def _tensor_args(node: Any) -> Iterator[Any]:
    """The values a call gives to its op's tensor-typed parameters, matched to its schema as ExecuTorch's
    ``map_args`` matches them."""
    import torch

    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return
    for i, param in enumerate(schema.arguments):
        if param.name in node.kwargs:
            value = node.kwargs[param.name]
        elif not param.kwarg_only and i < len(node.args):
            value = node.args[i]
        else:
            continue
        if isinstance(param.type, torch.TensorType):
            yield value


def _is_scalar_for_tensor(node: Any) -> bool:
    return any(isinstance(value, (bool, int, float)) for value in _tensor_args(node))


@functools.cache
def _aten(*names: str) -> frozenset[Any]:
    """The aten op overloads named ``op.overload``."""
    import torch

    return frozenset(getattr(getattr(torch.ops.aten, op), overload) for op, overload in (n.split(".") for n in names))


def _is_transpose(node: Any) -> bool:
    return node.target in _aten("t.default")


def _is_view(node: Any) -> bool:
    return node.op == "call_function" and bool(getattr(node.target, "is_view", False))


def _is_mixed_type(node: Any) -> bool:
    """An add/mul/sub/div/minimum whose tensor operands are not all of one floating dtype (where
    RemoveMixedTypeOperators could cast one)."""
    import torch

    promoting = _aten("add.Tensor", "mul.Tensor", "sub.Tensor", "div.Tensor", "div.Tensor_mode", "minimum.default")
    if node.target not in promoting or len(node.args) <= 1:
        return False
    dtypes = set()
    for value in _tensor_args(node):
        val = value.meta.get("val") if hasattr(value, "meta") else value
        if not isinstance(val, torch.Tensor):
            return True  # a scalar, a symbolic value or no value recorded: it may be cast
        dtypes.add(val.dtype)
    return len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point


# ExecuTorch's passes (executorch 1.5: XNNPACK's delegate passes, and the edge dialect's of EDGE_PASSES) that change
# only graphs holding these ops; on any other graph each one is a full retrace with fake tensors and a check, and
# changes nothing: 1-6 s apiece for a b2 int8 graph of ~2,700 nodes. Each is still run where its ops are there. What
# each acts on is read from its source in executorch 1.5; the two that match pattern graphs are checked against the
# patterns themselves by tests/test_scale.py. benchmarks/XNNPACK_IDLE_PASSES.md: the b2 int8 lowering 47 s with
# these skipped, 90 s with the five of stop 33 only, 133 s with none, the same .pte byte for byte.
IDLE_UNLESS: dict[str, Callable[[Any], bool]] = {
    "PReLUReshapePass": _is_prelu,  # PReLU weights repeated per channel
    "Conv1dUnsqueezePass": _is_conv1d,  # 1-D convolutions as 2-D
    "FuseBatchNormPass": _is_batch_norm,  # BatchNorm into the conv or linear before it
    "DecomposeBatchNorm": _is_batch_norm,  # a BatchNorm left alone as a depthwise conv
    "DecomposeConcatenate": _is_wide_cat,  # concatenations of more than 5 inputs split
    "DimOrderOpsRevertPass": _is_dim_order_op,  # dim-order copies back to memory-format copies
    # Its patterns (partition/graphs/bilinear_2d.py) trace to upsample_bilinear2d.vec itself, which it leaves as it is
    # ("Op was not decomposed, do nothing"): in 1.5 it has nothing to act on in any graph.
    "ConvertToUpsampleBilinear2d": _never,
    "ConvertToSDPAPass": _is_sdpa_mask_test,  # every SDPA pattern (partition/graphs/sdpa.py) holds the mask's any.dim
    "ConvertToLinearPass": _is_matmul_or_viewed_linear,  # [add]mm as linear; view copies around a linear folded
    "PropagateCustomMetaPass": _has_custom_meta,  # node.meta["custom"] copied to the q/dq nodes after it
    "ConstPropPass": _is_constant_op,  # an op on constants only (no graph input, no parameter) folded
    "RemoveGetItemPass": _is_max_with_indices,  # max_pool2d_with_indices / max.dim with their getitem
    "RemoveRedundantCopyPass": _is_to_copy,  # back-to-back _to_copy pairs removed
    # The edge dialect's (to_edge, before the partitioner), each an ExportPass retrace too:
    "NormalizeTransposePass": _is_transpose,  # aten.t as t_copy
    "ReplaceBrokenOpsWithFunctionalOpsPass": _is_view,  # a view op as its _copy
    "ScalarToTensorPass": _is_scalar_for_tensor,  # a Python number given for a tensor parameter, as a tensor
    # A symbolic int/float/bool given where an op takes a tensor, as a scalar_tensor (any node whose value is
    # symbolic, inputs included: an export with static shapes has none).
    "SymToTensorPass": _is_symbolic,
    "RemoveMixedTypeOperators": _is_mixed_type,  # an operand cast to the promoted dtype
}
# Those run by to_edge on the graph module (their ``call`` patched), not by XNNPACK's pass manager: module, class.
EDGE_PASSES = {
    "NormalizeTransposePass": "executorch.exir.passes.normalize_transpose_pass",
    "ReplaceBrokenOpsWithFunctionalOpsPass": "executorch.exir.passes.replace_broken_ops_with_function_ops_pass",
    "ScalarToTensorPass": "executorch.exir.passes.scalar_to_tensor_pass",
    "SymToTensorPass": "executorch.exir.passes.sym_to_tensor_pass",
    "RemoveMixedTypeOperators": "executorch.exir.passes.remove_mixed_type_operators",
}
_VERIFIED_EXECUTORCH = "1.5."  # the version whose XNNPACKPassManager.transform the loop below repeats


@contextlib.contextmanager
def idle_passes_skipped() -> Iterator[list[str]]:
    """While lowering to XNNPACK: the passes of :data:`IDLE_UNLESS` skipped where the graph has none of their ops
    (the names of those skipped are appended to the list yielded): XNNPACK's, and the edge dialect's of
    :data:`EDGE_PASSES` (their ``call`` returns the graph as it is). The .pte is the same byte for byte (checked on the
    b2 int8 graph and by tests/test_scale.py); another ExecuTorch version runs every pass, as it comes."""
    from importlib.metadata import version

    skipped: list[str] = []
    if not version("executorch").startswith(_VERIFIED_EXECUTORCH):
        yield skipped
        return
    from executorch.backends.xnnpack import _passes
    from executorch.backends.xnnpack._passes.xnnpack_pass import XNNPACKPass
    from executorch.exir.pass_base import ExportPass, PassResult
    from executorch.exir.program._program import _transform
    from torch.fx import GraphModule

    original = _passes.XNNPACKPassManager.transform
    edge_passes = {name: getattr(importlib.import_module(module), name) for name, module in EDGE_PASSES.items()}
    edge_calls = {name: cls.call for name, cls in edge_passes.items()}
    own = {name for name, cls in edge_passes.items() if "call" in vars(cls)}  # the others inherit ExportPass.call

    def edge_call(name: str) -> Callable[[Any, Any], Any]:
        def call(self: Any, graph_module: Any) -> Any:
            acts_on = IDLE_UNLESS.get(name)
            graphs = [m.graph for m in graph_module.modules() if isinstance(m, GraphModule)]  # nested ones too
            if acts_on is not None and not any(acts_on(node) for graph in graphs for node in graph.nodes):
                skipped.append(name)
                return PassResult(graph_module, False)
            return edge_calls[name](self, graph_module)

        return call

    def transform(self: Any) -> Any:  # XNNPACKPassManager.transform of executorch 1.5, with the skip
        ep = self.exported_program
        for pass_ in self.passes:
            acts_on = IDLE_UNLESS.get(pass_.__name__)
            if acts_on is not None and not any(node.op == "call_function" and acts_on(node) for node in ep.graph.nodes):
                skipped.append(pass_.__name__)
                continue
            if issubclass(pass_, XNNPACKPass):
                transform_pass = pass_(ep)
            elif issubclass(pass_, ExportPass):
                transform_pass = pass_()
            else:
                raise RuntimeError(f"Expecting ExportPass or ExportPass(), but got pass: {pass_} with type: {type(pass_)}")
            ep = _transform(ep, transform_pass)
        return ep

    _passes.XNNPACKPassManager.transform = transform
    for name, cls in edge_passes.items():
        cls.call = edge_call(name)  # type: ignore[method-assign]
    try:
        yield skipped
    finally:
        _passes.XNNPACKPassManager.transform = original
        for name, cls in edge_passes.items():
            if name in own:
                cls.call = edge_calls[name]  # type: ignore[method-assign]
            else:
                del cls.call


# Whether :func:`idle_decompositions_skipped` skips (tests and benchmarks/XNNPACK_IDLE_PASSES.md run both ways).
SKIP_IDLE_DECOMPOSITIONS = True


@contextlib.contextmanager
def idle_decompositions_skipped(partitioner: Any) -> Iterator[list[int]]:
    """While lowering for ``partitioner``: the program decomposed once, as ExecuTorch's three decompositions leave it,
    and the calls that then find nothing to do return the program as it is (the size of each graph so left is appended
    to the list yielded).

    ExecuTorch 1.5 retraces a program three times before XNNPACK partitions it (``_gen_edge_manager_for_partitioners``,
    the ``EDGE_DO_NOT_DECOMP`` path XNNPACK's partitioner takes): functionalize (``{}``), decompose by the default table
    but the partitioner's ops, then by the whole table once the ops it takes are renamed. Here the first call decomposes
    by the second's table (functionalizing with it: one retrace); the second then finds none of its table's ops, nor
    the third, which only retraced (each ~10 s of a b2 int8 lowering, 2,660 nodes). ExecuTorch skips the same idle call
    on its other path, with the same test (``contains_any_call_fn_target_op``); an op the partitioner did not take is
    still in the third table, and is decomposed by it. The .pte is the same byte for byte (tests/test_scale.py on the
    tiny graph, benchmarks/XNNPACK_IDLE_PASSES.md on b2 int8). Another ExecuTorch version runs every call."""
    from importlib.metadata import version

    skipped: list[int] = []
    if not SKIP_IDLE_DECOMPOSITIONS or not version("executorch").startswith(_VERIFIED_EXECUTORCH):
        yield skipped
        return
    from executorch.exir.graph_module import contains_any_call_fn_target_op
    from executorch.exir.program._program import _remove_invalid_ops_for_not_decompose
    from executorch.exir.tracer import _default_decomposition_table
    from torch.export import ExportedProgram

    original = ExportedProgram.run_decompositions

    def run_decompositions(self: Any, decomp_table: Any = None, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or decomp_table is None:  # None: the default table, as ExecuTorch never calls it here
            return original(self, decomp_table, *args, **kwargs)
        if type(decomp_table) is dict and not decomp_table:  # {}: functionalize; here by the table ExecuTorch decomposes
            # by next, in the same retrace. (Its tables are CustomDecompTables, which compare equal to {}: not these.)
            keep, _ = partitioner.ops_to_not_decompose(self)
            table = _default_decomposition_table()
            for op in _remove_invalid_ops_for_not_decompose(keep):
                table.pop(op, None)
            return original(self, table)
        if not contains_any_call_fn_target_op(self.graph_module, decomp_table):
            skipped.append(len(self.graph.nodes))
            return self
        return original(self, decomp_table)

    ExportedProgram.run_decompositions = run_decompositions  # type: ignore[method-assign]
    try:
        yield skipped
    finally:
        ExportedProgram.run_decompositions = original  # type: ignore[method-assign]


def quantized_scheme(report: dict[str, Any]) -> dict[str, Any]:
    """What the lowered graph quantizes, read from its ops: activations quantized per inference (dynamic: a
    ``choose_qparams`` computes each scale at run time) or with calibrated constant scales (static)."""
    by_op = report["by_op"]

    def count(name: str) -> int:
        return sum(v["delegated"] + v["portable"] for op, v in by_op.items() if op.startswith(name))

    dynamic = count("quantized_decomposed_choose_qparams")
    static = count("quantized_decomposed_quantize_per_tensor_default")
    return {"kind": "dynamic" if dynamic and not static else "static" if static and not dynamic else "mixed" if dynamic else "none",
            "runtime_quantized_activations": dynamic, "calibrated_quantize_ops": static}  # fmt: skip


def program_io(path: Path) -> dict[str, list[str]]:
    """The input and output dtypes of a .pte's forward method, read back from the program."""
    from executorch.runtime import Runtime

    meta = Runtime.get().load_program(path).metadata("forward")

    def dtype(tensor: Any) -> str:
        return _SCALAR_TYPES.get(int(tensor.dtype()), f"scalar type {int(tensor.dtype())}")

    return {"inputs": [dtype(meta.input_tensor_meta(i)) for i in range(meta.num_inputs())],
            "outputs": [dtype(meta.output_tensor_meta(i)) for i in range(meta.num_outputs())]}  # fmt: skip


# c10::ScalarType codes, as a program's tensor metadata gives them.
_SCALAR_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 7: "float64",
                 11: "bool", 15: "bfloat16"}  # fmt: skip


def profile_etdump(artifact: Artifact, x: np.ndarray, runs: int) -> dict[str, float]:
    """Per-op time (ms, median per run) from ETDump through the devtools Inspector (XNNPACK reports each
    of its kernels)."""
    import re
    import tempfile
    import warnings

    import torch
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    # No debug buffer: only timings are read, and logging every output tensor overflows any fixed buffer.
    program = Runtime.get().load_program(artifact.file, enable_etdump=True, debug_buffer_size=0)
    method = program.load_method("forward")
    for _ in range(runs):
        method.execute([torch.from_numpy(x)])
    with tempfile.TemporaryDirectory() as tmp:
        program.write_etdump_result_to_file(f"{tmp}/run.etdp", f"{tmp}/debug.bin")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame = Inspector(etdump_path=f"{tmp}/run.etdp").to_dataframe()
    frame = frame[frame["event_block_name"] == "Execute"]
    totals: dict[str, float] = {}
    for name, raw in zip(frame["event_name"], frame["raw"]):
        if name in ("Method::execute", "DELEGATE_CALL"):  # wrappers around the ops below
            continue
        kind = re.sub(r" #\d+$", "", str(name))
        totals[kind] = totals.get(kind, 0.0) + float(np.median(raw))
    return totals


def set_threads(threads: int) -> None:
    """Size ExecuTorch's CPU threadpool (XNNPACK runs on it)."""
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(threads)
