"""Arm Ethos-U (U55, U65, U85) NPUs through ExecuTorch's Arm backend: PT2E int8 -> TOSA -> Vela -> .pte.

The flow (ExecuTorch 1.5.1, ``executorch.backends.arm``): the float graph is quantized by ``EthosUQuantizer``
(int8 per-tensor affine activations, int8 symmetric weights, int32 bias), partitioned by
``EthosUPartitioner`` into TOSA subgraphs for the NPU, and each subgraph is compiled by Arm's Vela compiler
into the command stream that ``EthosUBackend`` stores in the .pte. What the NPU cannot run (on U55 and U65:
the 7x7 stride-4 patch embedding and the bilinear resizes of the decoder) stays on the Cortex-M as
portable kernels, in float between a dequantize and a quantize.

The artifact's model file is a folder, ``model.ethos-u/``, so that its sha256 covers everything a parity
check or a reader of the manifest relies on:

- ``model.pte``: the program the firmware runs (Corstone-300/320 FVP or a board; it cannot run on the host,
  whose ExecuTorch runtime has no EthosUBackend);
- ``vela/<delegate>_summary.csv`` and ``<delegate>_per-layer.csv``: Vela's own performance estimate of each
  delegate, from which the manifest's ``estimate`` block is read (the command stream of that Vela run is
  checked byte for byte against the one inside the .pte);
- ``reference/<delegate>.tosa`` and ``reference/program.pt2``: each delegate's TOSA flatbuffer (the exact
  input Vela compiled) and the lowered program (ExecuTorch's serializer, delegates included). The runner
  runs the program in torch and every NPU delegate's TOSA graph in the TOSA reference model of tosa-tools:
  integer-exact TOSA semantics, on Linux, without hardware. That is what ``verify`` compares with the float
  model. What it does not execute is Vela's compilation of the TOSA graph; only an FVP or hardware does.

Latency cannot be measured on the host: ``bench`` shows Vela's estimate, marked as an estimate.

Packages: ``ethos-u-vela`` and ``tosa-tools`` (pinned by ExecuTorch 1.5.1's own ``ethos-u`` extra). tosa-tools
pins numpy<2.2 and ml_dtypes 0.5.1, which pip cannot resolve beside onnx 1.23; both run with the export
stack's numpy 2.4 and ml_dtypes 0.6, so they are installed with ``--no-deps`` (see README).
"""

from __future__ import annotations

import configparser
import contextlib
import csv
import importlib.util
import io
import logging
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segformer_edge.errors import ExportError

from .base import Artifact, ArtifactError, ExportOptions, ExportPlan, Target

if TYPE_CHECKING:
    from segformer_edge.calibration.spec import QuantSpec

logger = logging.getLogger(__name__)

# Vela's --accelerator-config names (ethosu/vela/architecture_features.py, Accelerator).
ACCELERATORS = (
    "ethos-u55-128", "ethos-u55-32", "ethos-u55-64", "ethos-u55-256",
    "ethos-u65-256", "ethos-u65-512",
    "ethos-u85-256", "ethos-u85-128", "ethos-u85-512", "ethos-u85-1024", "ethos-u85-2048",
)  # fmt: skip
AUTO = "auto"  # system_config / memory_mode: the family's default, as EthosUCompileSpec resolves it
VELA_INI = "Arm/vela.ini"  # the config file EthosUCompileSpec passes to Vela (inside ethosu/config_files)
# What the README's `--no-deps` step installs beside the export extra (the pyproject `ethos-u` extra pins the same).
PACKAGES = {"ethos-u-vela": "5.1.0", "tosa-tools": "2026.5.0"}
INSTALL = "python -m pip install --no-deps " + " ".join(f"{k}=={v}" for k, v in PACKAGES.items())

MODEL_PTE = "model.pte"
VELA_DIR = "vela"
REFERENCE_DIR = "reference"
PROGRAM = "program.pt2"

# Nodes that are bookkeeping, not compute, in the delegation counts (q/dq at the CPU edges are counted apart).
_BOOKKEEPING = ("getitem", "quantized_decomposed_", "dim_order_ops_", "alloc")

# Vela's summary CSV column -> manifest key. Numbers are copied as Vela wrote them; text columns stay text.
_SUMMARY_FIELDS = {
    "accelerator_configuration": "accelerator", "system_config": "system_config", "memory_mode": "memory_mode",
    "core_clock": "clock_hz", "cycles_total": "cycles", "cycles_npu": "cycles_npu",
    "inference_time": "inference_s", "inferences_per_second": "inferences_per_s",
    "sram_memory_used": "sram_used_kib", "dram_memory_used": "dram_used_kib",
    "on_chip_flash_memory_used": "on_chip_flash_used_kib", "off_chip_flash_memory_used": "off_chip_flash_used_kib",
    "sram_total_bytes": "sram_traffic_bytes", "dram_total_bytes": "dram_traffic_bytes",
    "on_chip_flash_total_bytes": "on_chip_flash_traffic_bytes", "off_chip_flash_total_bytes": "off_chip_flash_traffic_bytes",
    "nn_macs": "macs", "total_original_weights": "weights_bytes", "total_npu_encoded_weights": "encoded_weights_bytes",
}  # fmt: skip
_TEXT_FIELDS = ("accelerator", "system_config", "memory_mode")
# Summed over delegates (they run one after the other); SRAM used is a peak (their arenas are not live together).
_SUMMED = ("cycles", "cycles_npu", "inference_s", "macs", "sram_traffic_bytes", "dram_traffic_bytes",
           "on_chip_flash_traffic_bytes", "off_chip_flash_traffic_bytes", "weights_bytes", "encoded_weights_bytes",
           "dram_used_kib", "on_chip_flash_used_kib", "off_chip_flash_used_kib")  # fmt: skip


# -------------------------------------------------------------------------------------------------
# Vela's configuration file: the system configs and memory modes an export may name


def vela_ini() -> Path | None:
    """Vela's bundled Arm/vela.ini, or None when ethos-u-vela is not installed (found without importing Vela)."""
    spec = importlib.util.find_spec("ethosu")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "config_files" / VELA_INI
    return path if path.is_file() else None


def vela_sections() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(system configs, memory modes) defined in Vela's Arm/vela.ini, in file order (empty without Vela)."""
    path = vela_ini()
    if path is None:
        return (), ()
    parser = configparser.ConfigParser()
    parser.read(path)
    systems = tuple(s.split(".", 1)[1] for s in parser.sections() if s.startswith("System_Config."))
    modes = tuple(s.split(".", 1)[1] for s in parser.sections() if s.startswith("Memory_Mode."))
    return systems, modes


def family(npu: str) -> str:
    """ethos-u55-128 -> ethos-u55."""
    return npu.rsplit("-", 1)[0]


def check_vela_config(npu: str, system_config: str, memory_mode: str) -> None:
    """Refuse, in milliseconds and before any lowering, a configuration Vela would refuse after it.

    Vela checks --system-config/--memory-mode only when it compiles, at the end of a lowering that takes
    minutes; its own ArchitectureFeatures (what vela.main builds first) raises the same errors at once, e.g.
    u55 + Dedicated_Sram ("arena_mem_area=OffChipFlash (must be Sram or Dram)"). A system config of another
    NPU family is accepted by Vela and silently gives an estimate at that family's clock: refused here.
    """
    from ethosu.vela import architecture_features

    if system_config.startswith("Ethos_U") and not system_config.lower().startswith(family(npu).replace("-", "_")):
        fits = [s for s in vela_sections()[0] if s.lower().startswith(family(npu).replace("-", "_"))]
        raise ExportError(f"ethos-u: system_config={system_config} is not a system of {family(npu)} (npu={npu}); "
                          f"choose one of {', '.join(fits)}")  # fmt: skip
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # "Info: Changing const_mem_area ..." is printed
            architecture_features.ArchitectureFeatures(
                vela_config_files=[str(vela_ini())], accelerator_config=npu, system_config=system_config,
                memory_mode=memory_mode, max_blockdep=3, verbose_config=False, arena_cache_size=None,
            )  # fmt: skip
    except Exception as exc:
        reason = " ".join(str(exc).split()).strip("'\"").removeprefix("Error: ")  # Vela's errors quote themselves
        raise ExportError(f"ethos-u: Vela refuses npu={npu} system_config={system_config} memory_mode={memory_mode}: "
                          f"{reason}") from exc  # fmt: skip


# -------------------------------------------------------------------------------------------------
# The target


class EthosURunner:
    """The lowered program on the host: CPU ops in torch, each NPU delegate's TOSA graph in the TOSA reference model.

    Not the NPU: Vela's command stream is not executed (an FVP or hardware does that). The TOSA graph is what
    ExecuTorch's lowering decided, in integer-exact TOSA semantics, so this is the parity a machine without
    hardware can give.
    """

    def __init__(self, artifact: Artifact) -> None:
        import torch
        import tosa_reference_model as reference
        from executorch.exir.serde.serialize import load
        from tosa.TosaGraph import TosaGraph

        self.reference = reference
        folder = artifact.file / REFERENCE_DIR
        with _quiet_arm():
            self.module = load(str(folder / PROGRAM)).module()
        self.graphs: dict[int, tuple[str, bytes, list[tuple[int, ...]], list[torch.Size]]] = {}
        for node in self.module.graph.nodes:
            if node.op != "get_attr" or not str(node.target).startswith("lowered_module"):
                continue
            lowered = getattr(self.module, node.target)
            flatbuffer = (folder / f"{node.target}.tosa").read_bytes()
            block = TosaGraph.GetRootAsTosaGraph(flatbuffer, 0).Regions(0).Blocks(0)
            tensors = {block.Tensors(i).Name().decode(): block.Tensors(i) for i in range(block.TensorsLength())}
            shapes = [tuple(tensors[block.Inputs(i).decode()].ShapeAsNumpy()) for i in range(block.InputsLength())]
            outputs = [n.meta["val"].shape for n in lowered.original_module.graph.output_node().args[0]]
            self.graphs[id(lowered)] = (node.target, flatbuffer, shapes, outputs)
        if not self.graphs:
            raise ArtifactError(f"{artifact.file}: the program has no Ethos-U delegate; re-export it")
        self.delegate_calls = 0
        self.executor = f"TOSA reference model {_version('tosa-tools')} (NPU delegates) + torch (CPU ops); not the NPU"

    def _dispatch(self) -> Any:
        import torch
        from torch.overrides import TorchFunctionMode

        runner = self

        class Dispatch(TorchFunctionMode):
            """Intercepts executorch_call_delegate while the lowered program runs eagerly (as ExecuTorch's own
            TosaReferenceModelDispatch does for TOSABackend delegates), int8 NCHW in and out."""

            def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                if func is not torch._higher_order_ops.executorch_call_delegate:
                    return func(*args, **(kwargs or {}))
                name, flatbuffer, shapes, outputs = runner.graphs[id(args[0])]
                inputs = [a.detach().contiguous().numpy() for a in args[1:]]
                if [tuple(i.shape) for i in inputs] != shapes:
                    raise ArtifactError(f"{name}: inputs {[i.shape for i in inputs]} do not match its TOSA graph's {shapes}")
                results, status = runner.reference.run(flatbuffer, inputs)
                if status != runner.reference.GraphStatus.TOSA_VALID:
                    raise ArtifactError(f"{name}: the TOSA reference model returned {status}")
                runner.delegate_calls += 1
                return tuple(torch.from_numpy(np.asarray(r)).reshape(shape) for r, shape in zip(results, outputs))

        return Dispatch()

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        import torch

        with torch.no_grad(), self._dispatch():
            out = self.module(torch.from_numpy(np.ascontiguousarray(x)))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.numpy().copy() for o in outs]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[0]


class EthosUTarget(Target):
    name = "ethos-u"
    suffix = ".ethos-u"  # a folder: model.pte, Vela's reports, the TOSA graphs the reference model runs
    summary = "Arm Ethos-U55/U65/U85 NPU .pte (ExecuTorch Arm backend, Vela); int8; parity in the TOSA reference model"
    precisions = ("int8",)
    features = frozenset()  # normalized NCHW in, logits out: the graph edges of other targets are not lowered here
    tools = ("executorch", "ethos-u-vela", "tosa-tools")
    runtime_modules = ("tosa_reference_model", "executorch.exir")
    extra = "ethos-u"
    # Not in --target all: int8 only (an fp32 `export` would stop at it), minutes of lowering per model, and its
    # own packages (installed apart, see the module docstring).
    in_all = False
    not_here = "not timed: an Ethos-U NPU runs it (Corstone FVP or a board)"
    # The quantizer depends on the NPU family's TOSA spec (u55/u65 or u85): plan() records the resolved configuration
    # on this instance (the pipeline quantizes and converts with the instance that planned).
    def __init__(self) -> None:
        self.planned = {"npu": ACCELERATORS[0], "system_config": AUTO, "memory_mode": AUTO}

    # npu's default, ethos-u55-128: the most widely shipped Ethos-U (Corstone-300, Alif Ensemble, ...) and the
    # default of ExecuTorch's own Arm examples; it is also the configuration whose delegation report says the most
    # (what falls back to the Cortex-M). U85 takes the whole SegFormer.
    @property
    def options(self) -> dict[str, tuple[str, ...]]:  # type: ignore[override]
        systems, modes = vela_sections()
        return {"npu": ACCELERATORS, "system_config": (AUTO, *systems), "memory_mode": (AUTO, *modes)}

    def check_runtime(self) -> None:
        modules = (("tosa-tools", "tosa_reference_model"), ("ethos-u-vela", "ethosu"))
        missing = [package for package, module in modules if importlib.util.find_spec(module) is None]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise ArtifactError(f"ethos-u needs {' and '.join(missing)}, which {verb} not installed; "
                                f"{INSTALL} (beside the export extra; see README)")  # fmt: skip
        super().check_runtime()

    def plan(self, options: ExportOptions, quant: QuantSpec | None) -> dict[str, str]:
        if options.precision != "int8":
            raise ExportError(f"ethos-u: --precision {options.precision} is not supported: Ethos-U NPUs compute in integers "
                              "only (TOSA INT profile); use --precision int8")  # fmt: skip
        try:
            self.check_runtime()
        except ArtifactError as exc:
            raise ExportError(str(exc)) from exc
        chosen = super().plan(options, quant)
        system_config, memory_mode = resolve_defaults(chosen["npu"], chosen["system_config"], chosen["memory_mode"])
        check_vela_config(chosen["npu"], system_config, memory_mode)
        # The manifest records what Vela was given, not "auto".
        self.planned = {"npu": chosen["npu"], "system_config": system_config, "memory_mode": memory_mode}
        return dict(self.planned)

    def pt2e_quantizer(self, quant: QuantSpec) -> Any:
        """EthosUQuantizer for the planned NPU: int8 per-tensor affine activations, int8 symmetric weights
        (per channel unless the spec says per_tensor), int32 bias."""
        from executorch.backends.arm import EthosUQuantizer, get_symmetric_quantization_config

        config = get_symmetric_quantization_config(is_per_channel=quant.weights == "per_channel")
        return EthosUQuantizer(compile_spec(**self.planned)).set_global(config)

    def convert(self, module, example, path: Path, plan: ExportPlan) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        import torch
        from executorch.backends.arm import EthosUPartitioner
        from executorch.exir import to_edge_transform_and_lower

        chosen = plan.target_options
        path.mkdir()
        (path / VELA_DIR).mkdir()
        (path / REFERENCE_DIR).mkdir()
        with tempfile.TemporaryDirectory(prefix="ethos-u-") as tmp:  # a fresh folder: stale TOSA files never count
            work = Path(tmp)
            spec = compile_spec(chosen["npu"], chosen["system_config"], chosen["memory_mode"], intermediates=work)
            program = torch.export.export(module, (example,))
            rejections: list[dict[str, str]] = []
            with _quiet_arm(), _collect_rejections(rejections):
                edge = to_edge_transform_and_lower(program, partitioner=[EthosUPartitioner(spec)])
            delegation = delegation_report(edge.exported_program().graph_module, rejections)
            if delegation["delegates"] == 0:
                raise ExportError(f"ethos-u: nothing was delegated to the NPU ({chosen['npu']}); every op stayed on the CPU")
            (path / MODEL_PTE).write_bytes(edge.to_executorch().buffer)
            delegates = _delegates(edge.exported_program().graph_module)
            per_delegate = []
            for name, lowered, tag in delegates:
                tosa = work / f"output_{tag}_{spec.tosa_spec}.tosa"
                shutil.copyfile(tosa, path / REFERENCE_DIR / f"{name}.tosa")
                per_delegate.append(vela_estimate(spec, tosa, name, path / VELA_DIR, lowered.processed_bytes, work))
            save_program(edge.exported_program(), path / REFERENCE_DIR / PROGRAM)
        estimate = summed_estimate(per_delegate, delegation)
        total = estimate["total"]
        logger.info("ethos-u %s: %d delegate(s), %d NPU / %d CPU compute ops; Vela estimate %.3f ms (%s cycles at %.0f MHz)",
                    chosen["npu"], delegation["delegates"], delegation["npu_compute_ops"], delegation["cpu_compute_ops"],
                    total["inference_ms"], f"{total['cycles']:,.0f}", total["clock_hz"] / 1e6)  # fmt: skip
        for fallback in delegation["cpu_fallbacks"]:
            logger.info("ethos-u: on the CPU: %s x%d: %s", fallback["op"], fallback["nodes"], fallback["reason"])
        return {
            "ethos_u": {**chosen, "tosa_spec": str(spec.tosa_spec), "compiler_flags": list(spec.compiler_flags),
                        "files": {"program": MODEL_PTE, "vela_reports": VELA_DIR, "reference": REFERENCE_DIR}},
            "delegation": delegation,
            "estimate": estimate,
            "io": _program_io(path / MODEL_PTE),
        }  # fmt: skip

    def load(self, artifact: Artifact, threads: int | None = None) -> EthosURunner:
        self.check_runtime()
        if threads:
            import torch

            torch.set_num_threads(threads)
        return EthosURunner(artifact)

    def times_here(self) -> bool:
        return False  # the host runs a reference model, not the NPU: its time means nothing

    def estimate(self, artifact: Artifact) -> dict[str, Any] | None:
        """Vela's estimate from the manifest, for bench's row (an estimate, never a measurement)."""
        block = artifact.manifest.get("estimate")
        if not block:
            return None
        total = block["total"]
        options = artifact.manifest["target_options"]
        cpu = artifact.manifest.get("delegation", {}).get("cpu_compute_ops", 0)
        status = (f"estimate (Vela, not measured): {total['inference_ms']:.3f} ms NPU on {options['npu']} at "
                  f"{total['clock_hz'] / 1e6:.0f} MHz ({options['system_config']}, {options['memory_mode']})"
                  + (f"; {cpu} CPU op(s) not included" if cpu else ""))  # fmt: skip
        return {"status": status, "estimate": {"source": block["source"], **total}}


# -------------------------------------------------------------------------------------------------
# Compile spec, lowering helpers


def resolve_defaults(npu: str, system_config: str, memory_mode: str) -> tuple[str, str]:
    """``auto`` -> the family's default system config and memory mode, read back from EthosUCompileSpec itself."""
    spec = compile_spec(npu, system_config, memory_mode)
    flags = dict(f.removeprefix("--").split("=", 1) for f in spec.compiler_flags if f.startswith("--") and "=" in f)
    return flags["system-config"], flags["memory-mode"]


def compile_spec(npu: str, system_config: str = AUTO, memory_mode: str = AUTO, *, intermediates: Path | None = None) -> Any:
    """EthosUCompileSpec for Vela's accelerator ``npu``; with ``intermediates``, every delegate's TOSA file lands there
    (``output_<tag>_<tosa spec>.tosa``)."""
    from executorch.backends.arm import EthosUCompileSpec

    spec = EthosUCompileSpec(npu, system_config=None if system_config == AUTO else system_config,
                             memory_mode=None if memory_mode == AUTO else memory_mode)  # fmt: skip
    return spec.dump_intermediate_artifacts_to(str(intermediates)) if intermediates is not None else spec


@contextlib.contextmanager
def _quiet_arm() -> Iterator[None]:
    """The Arm backend's loggers at WARNING while it works.

    EthosUBackend passes ``--verbose-all`` to Vela whenever its logger is at INFO (it is while the export's
    OutputCapture records INFO, or under --verbose): megabytes of debug dump per delegate. At INFO the TOSA
    partitioner also adds a FileHandler to its module logger on every call.
    """
    arm = logging.getLogger("executorch.backends.arm")
    old = arm.level
    arm.setLevel(logging.WARNING)
    try:
        yield
    finally:
        arm.setLevel(old)


@contextlib.contextmanager
def _collect_rejections(sink: list[dict[str, str]]) -> Iterator[None]:
    """Record why the partitioner left nodes on the CPU (node name, op, reason).

    TOSAPartitioner keeps its WhyNoPartitionReporter's verdicts to itself (it only logs them as a table at INFO),
    so for the duration of the lowering the reporter class it instantiates is a subclass that keeps each instance.
    """
    from executorch.backends.arm.tosa import partitioner as tosa_partitioner

    base = tosa_partitioner.WhyNoPartitionReporter
    made: list[Any] = []

    class Keeping(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    tosa_partitioner.WhyNoPartitionReporter = Keeping
    try:
        yield
    finally:
        tosa_partitioner.WhyNoPartitionReporter = base
        for reporter in made:
            for node, reason in getattr(reporter, "_rejected_nodes", {}).items():
                if node.op in ("placeholder", "output"):
                    continue
                sink.append({"node": node.name, "op": str(getattr(node.target, "_op", node.target)), "reason": str(reason)})


def _delegates(graph_module: Any) -> list[tuple[str, Any, str]]:
    """(submodule name, LoweredBackendModule, partition tag) of every Ethos-U delegate, in graph order."""
    from executorch.backends.arm.tosa.backend import arm_get_first_delegation_tag

    found = []
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" and str(node.target).startswith("lowered_module"):
            lowered = getattr(graph_module, node.target)
            found.append((str(node.target), lowered, arm_get_first_delegation_tag(lowered.original_module.graph_module)))
    return found


def delegation_report(graph_module: Any, rejections: list[dict[str, str]]) -> dict[str, Any]:
    """The NPU delegates, compute ops on the NPU and on the CPU, and why each CPU op fell back.

    Quantize/dequantize nodes left on the CPU (the graph's input quantize and output dequantize, and those around
    each fallback) are counted apart; getitem and dim-order bookkeeping is not counted.
    """
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    npu: dict[str, int] = {}
    cpu: dict[str, int] = {}
    qdq_cpu = 0
    for op, counts in sorted(info.delegation_by_operator.items()):
        if op.startswith(_BOOKKEEPING):
            qdq_cpu += counts.non_delegated if op.startswith("quantized_decomposed_") else 0
            continue
        if counts.delegated:
            npu[op] = counts.delegated
        if counts.non_delegated:
            cpu[op] = counts.non_delegated
    cpu_nodes = {n.name: n for n in graph_module.graph.nodes if n.op == "call_function"}
    reasons: dict[tuple[str, str], int] = {}
    for r in rejections:  # the partitioner's verdicts, for the nodes that really stayed outside
        if r["node"] in cpu_nodes and "quantize" not in r["op"]:
            reasons[(r["op"], r["reason"])] = reasons.get((r["op"], r["reason"]), 0) + 1
    return {
        "backend": "EthosUBackend",
        "delegates": info.num_delegated_subgraphs,
        "npu_compute_ops": sum(npu.values()),
        "cpu_compute_ops": sum(cpu.values()),
        "cpu_quantize_dequantize": qdq_cpu,
        "npu_ops": npu,
        "cpu_ops": cpu,
        "cpu_fallbacks": [{"op": op, "nodes": n, "reason": why} for (op, why), n in sorted(reasons.items())],
    }


# -------------------------------------------------------------------------------------------------
# Vela's performance estimate


def vela_estimate(spec: Any, tosa: Path, name: str, reports: Path, processed: bytes, work: Path) -> dict[str, Any]:
    """Vela's estimate of one delegate, from Vela's own summary and per-layer CSVs (kept in ``reports``).

    EthosUBackend runs Vela once per delegate into one output folder, so only the last delegate's report survives
    the lowering; Vela is therefore run again on the delegate's TOSA file with the compile spec's own flags (well
    under a second per delegate), and that run's command stream must equal the one inside the .pte, byte for byte.
    """
    from ethosu.vela import vela

    out = work / f"vela_{name}"
    args = [*spec.compiler_flags, "--verbose-performance", f"--output-dir={out}", str(tosa)]
    try:
        code = vela.main(args)
    except (Exception, SystemExit) as exc:
        raise ExportError(f"ethos-u: Vela failed on {name}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
    if code:
        raise ExportError(f"ethos-u: Vela exited with {code} on {name} (vela {' '.join(args)})")
    summary = next(out.glob("*_summary_*.csv"))
    per_layer = next(out.glob("*_per-layer.csv"))
    with np.load(next(out.glob("*_vela.npz"))) as data:
        matches = data["cmd_data"].tobytes() == vela_block(processed, "cmd_data")
    if not matches:
        raise ExportError(f"ethos-u: Vela's estimate of {name} describes another command stream than the .pte's; "
                          "the estimate would not be of what ships")  # fmt: skip
    shutil.copyfile(summary, reports / f"{name}_summary.csv")
    shutil.copyfile(per_layer, reports / f"{name}_per-layer.csv")
    return {"delegate": name, **read_summary_csv(summary), "top_ops_by_cycles": read_per_layer_csv(per_layer),
            "reports": [f"{VELA_DIR}/{name}_summary.csv", f"{VELA_DIR}/{name}_per-layer.csv"]}  # fmt: skip


def estimate_for(artifact: Artifact, npu: str, system_config: str = AUTO, memory_mode: str = AUTO) -> dict[str, Any]:
    """Vela's estimate of an artifact's NPU delegates on another configuration of the same TOSA family, with Vela
    alone (no new lowering): the TOSA graphs and the partition depend only on the TOSA spec (U55 and U65 share one,
    U85 has its own), so one export per family serves a sweep over MAC counts, system configs and memory modes.
    The estimate of the artifact's own configuration is its manifest's ``estimate`` block."""
    from ethosu.vela import vela

    if npu not in ACCELERATORS:
        raise ExportError(f"ethos-u: npu={npu}: choose one of {', '.join(ACCELERATORS)}")
    system_config, memory_mode = resolve_defaults(npu, system_config, memory_mode)
    check_vela_config(npu, system_config, memory_mode)
    spec = compile_spec(npu, system_config, memory_mode)
    exported = artifact.manifest["ethos_u"]["tosa_spec"]
    if str(spec.tosa_spec) != exported:
        raise ExportError(f"ethos-u: {npu} compiles {spec.tosa_spec}, the artifact holds {exported} graphs; export for {npu}")
    per_delegate = []
    with tempfile.TemporaryDirectory(prefix="ethos-u-sweep-") as tmp:
        graphs = (artifact.file / REFERENCE_DIR).glob("lowered_module_*.tosa")
        for tosa in sorted(graphs, key=lambda p: int(p.stem.rsplit("_", 1)[1])):  # graph order: lowered_module_0, 1, ...
            out = Path(tmp) / tosa.stem
            try:
                with contextlib.redirect_stdout(io.StringIO()) as printed:  # Vela's network summary: to the log
                    code = vela.main([*spec.compiler_flags, f"--output-dir={out}", str(tosa)])
                logger.debug("vela %s on %s:\n%s", npu, tosa.name, printed.getvalue())
            except (Exception, SystemExit) as exc:
                raise ExportError(f"ethos-u: Vela failed on {tosa.name} for {npu}: {' '.join(str(exc).split())[:300]}") from exc
            if code:
                raise ExportError(f"ethos-u: Vela exited with {code} on {tosa.name} for {npu}")
            per_delegate.append({"delegate": tosa.stem, **read_summary_csv(next(out.glob("*_summary_*.csv")))})
    return summed_estimate(per_delegate, artifact.manifest["delegation"])


def read_summary_csv(path: Path) -> dict[str, Any]:
    """Vela's ``<network>_summary_<system config>.csv`` (a header row and one row) -> the manifest's fields."""
    with open(path, newline="") as fh:
        row = next(csv.DictReader(fh))
    out: dict[str, Any] = {}
    for column, key in _SUMMARY_FIELDS.items():
        value = row.get(column)
        out[key] = value if key in _TEXT_FIELDS else (float(value) if value not in (None, "") else None)
    return out


def read_per_layer_csv(path: Path, top: int = 5) -> list[dict[str, Any]]:
    """The operators that take the cycles, from Vela's ``<network>_per-layer.csv`` (--verbose-performance)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    per_op: dict[str, float] = {}
    for r in rows:
        op = (r.get("Original Operator") or "?").strip()
        per_op[op] = per_op.get(op, 0.0) + float(r.get("Op Cycles") or 0)
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    return [{"op": op, "cycles": int(c)} for op, c in ranked]


def summed_estimate(per_delegate: list[dict[str, Any]], delegation: dict[str, Any]) -> dict[str, Any]:
    """The network's estimate: per-delegate figures summed (delegates run one after the other), SRAM used as a peak."""
    total: dict[str, Any] = {key: per_delegate[0][key] for key in ("accelerator", "system_config", "memory_mode", "clock_hz")}
    for key in _SUMMED:
        values = [p[key] for p in per_delegate if p.get(key) is not None]
        total[key] = sum(values) if values else None
    total["peak_sram_used_kib"] = max(p["sram_used_kib"] or 0.0 for p in per_delegate)
    total["inference_ms"] = total["inference_s"] * 1e3
    return {
        "source": f"Vela {_version('ethos-u-vela')} performance estimate (its summary CSVs); not a measurement",
        "covers": "the NPU delegates only" + (f"; {delegation['cpu_compute_ops']} op(s) on the CPU are not estimated"
                                              if delegation["cpu_compute_ops"] else ""),  # fmt: skip
        "total": total,
        "per_delegate": per_delegate,
    }


def vela_block(processed: bytes, name: str) -> bytes:
    """One named block of the vela_bin_stream EthosUBackend stores as a delegate's payload
    (16-byte name, ``<IB11s`` header: length, external flag, padding; blocks 16-byte aligned)."""
    header = struct.Struct("<16sIB11s")
    pos = 0
    while pos < len(processed):
        raw, length, _external, _ = header.unpack_from(processed, pos)
        pos += header.size
        if raw.rstrip(b"\0").decode() == name:
            return processed[pos : pos + length]
        pos += length + (-length % 16)
    raise ExportError(f"ethos-u: the delegate payload has no {name!r} block")


def save_program(program: Any, path: Path) -> None:
    """The lowered program, delegates included, through ExecuTorch's serializer (``torch.export.save`` refuses
    ``executorch_call_delegate``), deflated: its JSON graph is ~14x smaller compressed."""
    import zipfile

    from executorch.exir.serde.serialize import save

    buffer = io.BytesIO()
    with _quiet_arm():
        save(program, buffer)
    with zipfile.ZipFile(buffer) as stored, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as deflated:
        for item in stored.infolist():
            deflated.writestr(item.filename, stored.read(item.filename))


def _program_io(path: Path) -> dict[str, list[str]]:
    """The .pte's input and output dtypes, read back from the program (the ExecuTorch runtime loads a program whose
    backend it lacks; only its methods need the backend)."""
    from .executorch import program_io

    return program_io(path)


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"
