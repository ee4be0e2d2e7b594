"""What every target shares: export options, the Target base class, artifacts, manifests and runners.

An artifact is a folder ``<out>/<variant>_<target>_<precision>/`` holding the model file and its
``manifest.json``. The folder is built under a temporary name and swapped into place only once its
manifest is complete (parity included), so a failed or interrupted export leaves the previous artifact
intact and no partial file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from segformer_edge.errors import ExportError, SegformerEdgeError
from segformer_edge.inputs import INPUT_KINDS, LAYOUTS, InputSpec

if TYPE_CHECKING:
    import torch
    from segformer_edge.calibration.spec import QuantSpec

__all__ = [
    "top_ops",
    "FEATURES",
    "MANIFEST",
    "Artifact",
    "ArtifactError",
    "ExportOptions",
    "ExportPlan",
    "Runner",
    "Target",
    "conversion_error",
    "file_sha256",
    "read_manifest",
    "tool_versions",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "segformer-edge-artifact/1"
OUTPUT_KINDS = ("logits", "mask", "probs")
MASK_SIZES = ("full", "quarter", "full-exact")
PRECISIONS = ("fp32", "fp16", "int8")
# The decoder's formulation in the exported graph (see segformer_edge.model.ProjectedHead): ``projected`` folds the
# fuse conv and BatchNorm into the stage projections before upsampling (the same function, a fraction of the MACs);
# ``as-trained`` keeps concat + fuse conv; ``auto`` projects unless a float-kept layer lies in the decoder.
DECODER_FORMS = ("auto", "projected", "as-trained")


class ArtifactError(SegformerEdgeError, ValueError):
    """An artifact folder is missing, damaged, or does not match its manifest."""


# Graph-edge features an export can ask for; a target lists the ones it takes.
FEATURES = {
    "nhwc": "--layout nhwc",
    "input:rgb01": "--input rgb01",
    "input:uint8": "--input uint8",
    "output:mask": "--output mask",
    "output:probs": "--output probs",
    "dynamic": "--dynamic",
    "image_input": "--image-input",
    "taps": "verify --layers (a debug graph with the stage outputs as extra outputs)",
}
TAPS = ("stage1", "stage2", "stage3", "stage4", "fused")  # the extra outputs of a debug (--layers) graph
EDGE_FEATURES = frozenset({"nhwc", "input:rgb01", "input:uint8", "output:mask", "output:probs"})


@dataclass
class ExportOptions:
    """How to cut the graph's edges, at which precision, and any options of the target itself.

    Attributes:
        precision: fp32, fp16 or int8.
        size: Static input (H, W) (for dynamic graphs, the size they are checked at).
        input_kind: ``normalized`` (float, already normalised), ``rgb01`` (float RGB in 0..1) or ``uint8``
            (0..255); the last two fuse the normalisation into the graph.
        output: ``logits`` at 1/4 resolution, ``probs`` (their softmax), or ``mask`` (int labels).
        mask_size: ``full`` (the input's size, by candidate argmax), ``full-exact`` (all K class maps upsampled,
            then argmax) or ``quarter`` (argmax at 1/4 resolution; the app upsamples).
        layout: ``nchw`` or ``nhwc`` (what mobile camera pipelines hand over).
        dynamic: Dynamic H and W.
        image_input: A camera-frame image input of the runtime, normalisation folded in.
        decoder: The decoder's formulation in the graph (:data:`DECODER_FORMS`): ``projected`` runs the fuse conv
            (and BatchNorm) folded into the four stage projections before upsampling, ``as-trained`` the
            concatenation and fuse conv, ``auto`` projected unless an int8 export keeps a decoder layer float.
        target_options: Options of the target itself (``--target-option KEY=VALUE``), checked by the target.
    """

    precision: str = "fp32"
    size: tuple[int, int] = (512, 512)
    input_kind: str = "normalized"
    output: str = "logits"
    mask_size: str = "full"
    layout: str = "nchw"
    dynamic: bool = False
    image_input: bool = False
    target_options: dict[str, str] = field(default_factory=dict)
    taps: bool = False  # a debug graph: the stage outputs and the fused decoder feature as extra outputs
    decoder: str = "auto"  # see DECODER_FORMS

    def __post_init__(self) -> None:
        if self.decoder not in DECODER_FORMS:
            raise ExportError(f"--decoder {self.decoder}: choose one of {', '.join(DECODER_FORMS)}")
        if self.precision not in PRECISIONS:
            raise ExportError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        if self.input_kind not in INPUT_KINDS:
            raise ExportError(f"--input {self.input_kind}: choose one of {', '.join(INPUT_KINDS)}")
        if self.output not in OUTPUT_KINDS:
            raise ExportError(f"--output {self.output}: choose one of {', '.join(OUTPUT_KINDS)}")
        if self.mask_size not in MASK_SIZES:
            raise ExportError(f"--mask-size {self.mask_size}: choose one of {', '.join(MASK_SIZES)}")
        if self.mask_size != "full" and self.output != "mask":
            raise ExportError(f"--mask-size {self.mask_size} needs --output mask (the output is {self.output})")
        if self.layout not in LAYOUTS:
            raise ExportError(f"--layout {self.layout}: choose nchw or nhwc")
        h, w = self.size
        if not (32 <= h <= 4096 and 32 <= w <= 4096):
            raise ExportError(f"--size {h} {w}: height and width must be within 32..4096")

    @property
    def features(self) -> set[str]:
        """The graph-edge features these options ask for (see :data:`FEATURES`)."""
        asked = {"nhwc"} if self.layout == "nhwc" else set()
        if self.input_kind != "normalized":
            asked.add(f"input:{self.input_kind}")
        if self.output != "logits":
            asked.add(f"output:{self.output}")
        if self.dynamic:
            asked.add("dynamic")
        if self.image_input:
            asked.add("image_input")
        if self.taps:
            asked.add("taps")
        return asked

    def input_spec(self, meta: Any, integer_input: bool = True) -> InputSpec:
        """The artifact's input: these options' edges on the model's normalisation."""
        kind = "uint8" if self.image_input else self.input_kind
        dtype = "uint8" if kind == "uint8" and integer_input and not self.image_input else "float32"
        return InputSpec(self.size, meta.mean, meta.std, kind=kind, layout=self.layout, dynamic=self.dynamic,
                         dtype=dtype, image=self.image_input)  # fmt: skip

    def graph_spec(self, meta: Any) -> InputSpec:
        """What the traced graph takes (an image input is traced as 0..1 RGB: the runtime scales by 1/255)."""
        kind = "rgb01" if self.image_input else self.input_kind
        return InputSpec(self.size, meta.mean, meta.std, kind=kind, layout=self.layout, dynamic=self.dynamic)


@dataclass
class ExportPlan:
    """Everything decided before any conversion runs: what :meth:`Target.convert` is given."""

    target: Target
    options: ExportOptions
    quant: QuantSpec | None  # None for float exports; the method is resolved for this target
    target_options: dict[str, str]  # this target's own options, defaults filled in
    folder: Path  # where the artifact lands
    input: InputSpec  # what the artifact takes
    graph_input: InputSpec  # what the traced graph takes
    meta: Any  # the model's ModelMeta: class names, palette, normalisation
    variant: str


@dataclass
class Artifact:
    """An exported model: its folder, the model file inside it, and the manifest."""

    folder: Path
    file: Path
    manifest: dict[str, Any]

    @property
    def target(self) -> str:
        return str(self.manifest["target"])

    @property
    def precision(self) -> str:
        return str(self.manifest["precision"])

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_manifest(self.manifest["input"])

    def write_manifest(self) -> None:
        from segformer_edge.io import atomic_write_json

        atomic_write_json(self.folder / MANIFEST, self.manifest)


class Runner(Protocol):
    """Runs an artifact: a numpy batch in the manifest's input layout -> its (first) output.

    Runners of targets with the ``taps`` feature also have ``run(x) -> list[np.ndarray]``: every output, in
    the graph's order (the main output, then the taps).
    """

    executor: str

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


class Target:
    """One edge runtime: every fact about it lives on its subclass, in its own module.

    A subclass sets the class attributes below and implements :meth:`convert` and :meth:`load`; targets
    with a PT2E quantizer implement :meth:`pt2e_quantizer`, others quantize inside :meth:`convert`. The
    registry (:mod:`segformer_edge.converters`) is the only list of targets.
    """

    name: ClassVar[str] = ""
    suffix: ClassVar[str] = ""  # the model file's suffix (the model file may be a folder: .mlpackage, .openvino)
    summary: ClassVar[str] = ""  # one line for --help and `info --targets`
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16")
    features: ClassVar[frozenset[str]] = EDGE_FEATURES
    quant_schemes: ClassVar[tuple[str, ...]] = ("static",)
    quant_methods: ClassVar[tuple[str, ...]] = ("minmax", "moving_average", "percentile", "mse")
    default_method: ClassVar[str] = "mse"  # what --method auto means for this target
    quant_weights: ClassVar[tuple[str, ...]] = ("per_channel", "per_tensor")
    options: ClassVar[dict[str, tuple[str, ...]]] = {}  # --target-option KEY -> allowed values (first: default)
    # Another target's option this one cannot honour, and why: refused with the reason, not as an unknown option.
    refused_options: ClassVar[dict[str, str]] = {}
    tools: ClassVar[tuple[str, ...]] = ()  # packages whose versions the manifest records
    runtime_modules: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str] = "export"  # the pip extra that installs what the runner needs
    integer_input: ClassVar[bool] = True  # whether a uint8 input stays uint8 (Core ML multi-arrays have no uint8)
    in_all: ClassVar[bool] = True  # exported by --target all
    fold_quantize: ClassVar[bool] = True  # False keeps weight quantize ops (what litert-torch's lowering expects)
    # How the candidate mask finds each pixel's second class (graph.candidate_argmax): "topk", or "rescan" (argmax
    # again with the top class pushed down), for runtimes whose top-k kernel is a slow sort.
    mask_runner_up: ClassVar[str] = "topk"
    not_here: ClassVar[str] = "cannot run on this machine"  # the bench/verify status where runs_here() is False

    # -- the host ------------------------------------------------------------------------------------

    def runs_here(self) -> bool:
        """Whether this machine can run the target's artifacts (parity is checked only where it can)."""
        return True

    def times_here(self) -> bool:
        """Whether a latency measured here means anything (False where only a reference executor runs)."""
        return self.runs_here()

    def tool_versions(self) -> dict[str, str]:
        return tool_versions(*self.tools)

    def check_runtime(self) -> None:
        """Raise a clear error naming the extra to install when the runtime is missing."""
        import importlib.util

        for module in self.runtime_modules:
            if importlib.util.find_spec(module.split(".")[0]) is None:
                raise ArtifactError(
                    f"{self.name} artifacts need {module}, which is not installed; "
                    f"pip install 'segformer-edge[{self.extra}]'"
                )

    # -- plan ----------------------------------------------------------------------------------------

    def plan(self, options: ExportOptions, quant: QuantSpec | None) -> dict[str, str]:
        """Check the options against what this target supports; return its own options with defaults.

        Raises ExportError naming the option, and where possible the targets that do support it.
        """
        if options.precision not in self.precisions:
            raise ExportError(f"{self.name}: --precision {options.precision} is not supported (choose {', '.join(self.precisions)})")
        for feature in sorted(options.features - self.features):
            raise ExportError(f"{self.name}: {FEATURES[feature]} is not supported by this target{_who_supports(feature)}")
        if options.precision == "int8":
            if quant is None:
                raise ExportError(f"{self.name}: int8 needs a quantization spec")
            for attr, allowed, flag in (("scheme", self.quant_schemes, "scheme"), ("method", self.quant_methods, "--method"),
                                        ("weights", self.quant_weights, "weights")):  # fmt: skip
                value = getattr(quant, attr)
                if value not in allowed:
                    raise ExportError(f"{self.name}: int8 {flag} {value} is not supported (choose {', '.join(allowed)})")
        chosen = {}
        for key, value in options.target_options.items():
            if key in self.refused_options:
                raise ExportError(f"{self.name}: --target-option {key} is not supported: {self.refused_options[key]}")
            if key not in self.options:
                known = ", ".join(self.options) or "none"
                raise ExportError(f"{self.name}: unknown --target-option {key} (this target's options: {known})")
            if value not in self.options[key]:
                raise ExportError(f"{self.name}: --target-option {key}={value}: choose one of {', '.join(self.options[key])}")
            chosen[key] = value
        return {key: chosen.get(key, values[0]) for key, values in self.options.items()}

    # -- capture, quantize, lower --------------------------------------------------------------------

    def prepare(self, module: torch.nn.Module, plan: ExportPlan | None = None) -> torch.nn.Module:
        """Export-time module swaps this target needs (the checkpoint's modules are never changed), for the
        export ``plan`` (its precision, options and quantization spec)."""
        return module

    def pt2e_quantizer(self, quant: QuantSpec) -> Any:
        """This target's PT2E quantizer for ``quant``, or None where it quantizes while lowering."""
        return None

    def method_for(self, options: ExportOptions) -> str:
        """What ``--method auto`` means for static int8 under these options (its own options may change the quantizer)."""
        return self.default_method

    def quantizer_for(self, quant: QuantSpec, target_options: dict[str, str] | None = None) -> Any:
        """The PT2E quantizer for ``quant`` under this target's own options (``-O``); by default
        :meth:`pt2e_quantizer`, for targets whose quantizer no option changes."""
        return self.pt2e_quantizer(quant)

    def quantize(self, module: torch.nn.Module, example: torch.Tensor, quant: QuantSpec, inputs: list[torch.Tensor],
                 target_options: dict[str, str] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:  # fmt: skip
        """PT2E prepare -> calibrate -> convert with this target's quantizer, honouring ``quant`` exactly.

        Returns the quantized module and what was done, read from the graphs themselves: the activation
        observers that calibrated it (the method actually used) and, per layer group, quantized and float
        compute ops of the converted graph. Targets without a PT2E quantizer return the module unchanged and
        quantize in :meth:`convert`.
        """
        quantizer = self.quantizer_for(quant, target_options)
        if quantizer is None:
            return module, {}
        from segformer_edge.calibration.recipes import (
            SpecQuantizer,
            attention_precision,
            count_quantized_ops,
            pt2e_quantize,
        )

        wrapped = SpecQuantizer(quantizer, quant)
        quantized, observers = pt2e_quantize(module, example, wrapped, inputs, fold_quantize=self.fold_quantize)
        return quantized, {"quantizer": getattr(quantizer, "label", type(quantizer).__name__), "activation_observers": observers,
                           "ops_by_group": count_quantized_ops(quantized),
                           "attention": attention_precision(quantized)}  # fmt: skip

    def convert(self, module: torch.nn.Module, example: torch.Tensor, path: Path, plan: ExportPlan) -> dict[str, Any]:
        """Write the model file at ``path``; return manifest fields read back from what was written.

        ``module`` is the float graph (or the quantized one, for targets with a PT2E quantizer); ``plan``
        holds the options, the quantization spec (targets without a PT2E quantizer quantize here), this
        target's own options and the model's metadata."""
        raise NotImplementedError

    # -- run -----------------------------------------------------------------------------------------

    def load(self, artifact: Artifact, threads: int | None = None) -> Runner:
        raise NotImplementedError

    def runner_factory(self, artifact: Artifact, threads: int, compute_units: str = "all") -> Callable[[], Runner]:
        """A zero-argument constructor of a runner, with the runtime already imported (bench times the load
        alone, not the runtime's import)."""
        import importlib

        self.check_runtime()
        for module in self.runtime_modules:
            importlib.import_module(module)
        return lambda: self.load(artifact, threads=threads)

    def estimate(self, artifact: Artifact) -> dict[str, Any] | None:
        """Where a latency cannot be measured here (:meth:`times_here` is False) but the target's compiler predicts one:
        bench's record fields for it, a ``status`` that says it is an estimate and an ``estimate`` block (None: no
        estimate; the row then says :attr:`not_here`). Never timing fields: an estimate is not a measurement."""
        return None

    def profile(self, artifact: Artifact, x: np.ndarray, runs: int, threads: int) -> list[dict[str, Any]] | None:
        """The ops that take the time, where the runtime can say (None where it cannot)."""
        return None

    def parity_precision(self, manifest: dict[str, Any]) -> str:
        """The precision whose parity thresholds an artifact is held to: its own, unless its own options tell
        the runtime to compute lower (an fp32 OpenVINO IR run with a bf16 hint is held to fp16's)."""
        return str(manifest["precision"])


def _who_supports(feature: str) -> str:
    from . import get_target, target_names

    names = [n for n in target_names() if feature in get_target(n).features]
    return f"; targets that support it: {', '.join(names)}" if names else ""


def top_ops(totals: dict[str, float], n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` ops that take the most time, with their share of the total."""
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:n]
    return [{"op": op, "ms": ms, "share": ms / whole} for op, ms in ranked]


def file_sha256(path: Path) -> str:
    """sha256 of a file, or of every file in a folder (sorted relative paths and contents)."""
    digest = hashlib.sha256()
    if path.is_dir():
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(item.relative_to(path)).encode())
            digest.update(item.read_bytes())
    else:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def tool_versions(*packages: str) -> dict[str, str]:
    versions = {"python": platform.python_version(), "segformer-edge": _version("segformer-edge")}
    for name in ("torch", "numpy", *packages):
        versions[name] = _version(name)
    return versions


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def read_manifest(path: str | Path, *, check_hash: bool = True) -> Artifact:
    """Open an artifact from its folder, its model file or its manifest; check the file's sha256."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such artifact")
    # A folder is the artifact's own unless it is a model file that is a folder (.mlpackage, .openvino) beside a manifest.
    inner = path.is_dir() and not (path / MANIFEST).is_file() and (path.parent / MANIFEST).is_file()
    folder = path if path.is_dir() and not inner else path.parent
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path}: no {MANIFEST} beside the artifact; re-export it with segformer-edge export")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{manifest_path}: not a readable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ArtifactError(f"{manifest_path}: not a segformer-edge manifest (format {MANIFEST_FORMAT!r})")
    name = str(manifest.get("file", ""))
    file = (folder / name).resolve()
    if not name or Path(name).name != name or file.parent != folder.resolve():
        raise ArtifactError(f"{manifest_path}: the manifest's file {name!r} is not a plain name inside the artifact folder")
    if not file.exists():
        raise ArtifactError(f"{file}: the model file named by {manifest_path.name} is missing")
    if check_hash:
        actual = file_sha256(file)
        if actual != manifest.get("sha256"):
            raise ArtifactError(
                f"{file}: sha256 {actual[:12]}... does not match the manifest ({str(manifest.get('sha256'))[:12]}...); "
                "the file was changed or truncated: re-export it"
            )
    return Artifact(folder, file, manifest)


def conversion_error(target: str, exc: BaseException) -> ExportError:
    """A one-line ExportError naming the target and, where the message has one, the op."""
    import re

    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    op = re.search(r"(aten\.[\w.]+|aten::\w+|torch\.ops\.[\w.]+)", text)
    where = f" at op {op.group(1)}" if op else ""
    return ExportError(f"{target}: conversion failed{where}: {type(exc).__name__}: {first[:300]}")
