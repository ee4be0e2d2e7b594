"""What every target shares: export options, the graph-edge wrapper, artifacts, manifests and runners.

An artifact is a folder ``<out>/<variant>_<target>_<precision>/`` holding the model file and its
``manifest.json``. The folder is built under a temporary name and swapped into place, so a failed or
interrupted export leaves the previous artifact intact and no partial file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from segformer_edge.errors import ExportError, SegformerEdgeError

if TYPE_CHECKING:
    import torch

    from segformer_edge.model import SegFormer

__all__ = [
    "MANIFEST",
    "Artifact",
    "ArtifactError",
    "ExportOptions",
    "Runner",
    "Target",
    "file_sha256",
    "read_manifest",
    "tool_versions",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "segformer-edge-artifact/1"
INPUT_KINDS = ("normalized", "rgb01", "uint8")
OUTPUT_KINDS = ("logits", "mask")
PRECISIONS = ("fp32", "fp16", "int8")


class ArtifactError(SegformerEdgeError, ValueError):
    """An artifact folder is missing, damaged, or does not match its manifest."""


@dataclass
class ExportOptions:
    """How to cut the graph's edges and at which precision.

    Attributes:
        precision: fp32, fp16 (or int8, with a calibration).
        size: Static input (H, W).
        input_kind: ``normalized`` (float, already normalised), ``rgb01`` (float RGB in 0..1) or ``uint8``
            (0..255); the last two fuse the normalisation into the graph.
        output: ``logits`` at 1/4 resolution, or ``mask`` (upsample to the input size, argmax: int labels).
        layout: ``nchw`` or ``nhwc`` (what mobile camera pipelines hand over); where a target supports it.
        dynamic: Dynamic H and W, where the target supports it.
        image_input: Core ML only: a camera-frame ImageType input with the normalisation folded in.
    """

    precision: str = "fp32"
    size: tuple[int, int] = (512, 512)
    input_kind: str = "normalized"
    output: str = "logits"
    layout: str = "nchw"
    dynamic: bool = False
    image_input: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ExportError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        if self.input_kind not in INPUT_KINDS:
            raise ExportError(f"--input {self.input_kind}: choose one of {', '.join(INPUT_KINDS)}")
        if self.output not in OUTPUT_KINDS:
            raise ExportError(f"--output {self.output}: choose one of {', '.join(OUTPUT_KINDS)}")
        if self.layout not in ("nchw", "nhwc"):
            raise ExportError(f"--layout {self.layout}: choose nchw or nhwc")
        h, w = self.size
        if not (32 <= h <= 4096 and 32 <= w <= 4096):
            raise ExportError(f"--size {h} {w}: height and width must be within 32..4096")


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

    def write_manifest(self) -> None:
        from segformer_edge.io import atomic_write_json

        atomic_write_json(self.folder / MANIFEST, self.manifest)


class Runner(Protocol):
    """Runs an artifact: a numpy batch in the manifest's input layout -> numpy outputs."""

    executor: str

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


class Target:
    """One edge runtime. Subclasses set ``name``, ``suffix``, ``precisions`` and implement the two hooks."""

    name: str = ""
    suffix: str = ""
    precisions: tuple[str, ...] = ("fp32", "fp16")
    dynamic_shapes: bool = False
    runtime_modules: tuple[str, ...] = ()
    extra: str = "export"  # the pip extra that installs what the runner needs
    integer_input: bool = True  # whether a uint8 input stays uint8 (Core ML multi-arrays have no uint8)

    @staticmethod
    def runs_here() -> bool:
        """Whether this machine can run the target's artifacts (parity is checked only where it can)."""
        return True

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """Export-time module swaps this target needs (the checkpoint's modules are never changed)."""
        return module

    def convert(self, module: torch.nn.Module, example: torch.Tensor, options: ExportOptions, path: Path) -> dict[str, Any]:
        """Write the model file at ``path``; return target-specific manifest fields."""
        raise NotImplementedError

    def load(self, artifact: Artifact) -> Runner:
        raise NotImplementedError

    def check_runtime(self) -> None:
        """Raise a clear error naming the extra to install when the runtime is missing."""
        import importlib.util

        for module in self.runtime_modules:
            if importlib.util.find_spec(module.split(".")[0]) is None:
                raise ArtifactError(
                    f"{self.name} artifacts need {module}, which is not installed; "
                    f"pip install 'segformer-edge[{self.extra}]'"
                )


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
    folder = path if path.is_dir() and not path.suffix == ".mlpackage" else path.parent
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


def model_manifest(model: SegFormer, options: ExportOptions) -> dict[str, Any]:
    """The manifest fields that describe the model and its graph edges."""
    meta = model.meta
    h, w = options.size
    shape: list[Any] = [1, h, w, 3] if options.layout == "nhwc" else [1, 3, h, w]
    if options.dynamic:
        if options.layout == "nhwc":
            shape[1], shape[2] = "H", "W"
        else:
            shape[2], shape[3] = "H", "W"
    k = model.config.num_classes
    if options.output == "mask":
        out_shape: list[Any] = [1, h, w]
    else:
        out_shape = [1, k, -(-h // 4), -(-w // 4)]
    return {
        "variant": model.config.variant,
        "num_classes": k,
        "class_names": list(meta.class_names),
        "palette": [list(c) for c in meta.palette],
        "input": {
            "shape": shape,
            "layout": options.layout,
            "dtype": "uint8" if options.input_kind == "uint8" else "float32",
            "kind": options.input_kind,
            "normalization": {
                "mean": list(meta.mean),
                "std": list(meta.std),
                "fused": options.input_kind != "normalized",
                "scale": 255.0 if options.input_kind == "uint8" else 1.0,
            },
            "dynamic_hw": options.dynamic,
        },
        "output": {"kind": options.output, "shape": out_shape, "dtype": "int32" if options.output == "mask" else "float32"},
    }


def prepare_input(images: np.ndarray, manifest: dict[str, Any]) -> np.ndarray:
    """uint8 RGB images (N, H, W, 3) -> the artifact's input (kind and layout from the manifest)."""
    spec = manifest["input"]
    if spec["kind"] == "uint8":
        x = images.astype(np.uint8)
    elif spec["kind"] == "rgb01":
        x = images.astype(np.float32) / 255.0
    else:
        mean = np.asarray(spec["normalization"]["mean"], np.float32)
        std = np.asarray(spec["normalization"]["std"], np.float32)
        x = (images.astype(np.float32) / 255.0 - mean) / std
    if spec["layout"] == "nchw":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def calibration_inputs(options: ExportOptions, example: Any) -> list[Any]:
    """The calibration images as the graph's inputs (kind and layout of ``options``), one tensor per image."""
    import torch

    calib = options.extra.get("calibration")
    if calib is None:
        raise ExportError("int8 needs a calibration set: pass --calibration DIR or let export calibrate on the fly")
    spec = {"input": {"kind": options.input_kind, "layout": options.layout, "normalization": options.extra["normalization"]}}
    batch = prepare_input(calib.images, spec)
    return [torch.from_numpy(batch[i : i + 1]).to(example.dtype) for i in range(len(batch))]


def conversion_error(target: str, exc: BaseException) -> ExportError:
    """A one-line ExportError naming the target and, where the message has one, the op."""
    import re

    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    op = re.search(r"(aten\.[\w.]+|aten::\w+|torch\.ops\.[\w.]+)", text)
    where = f" at op {op.group(1)}" if op else ""
    return ExportError(f"{target}: conversion failed{where}: {type(exc).__name__}: {first[:300]}")
