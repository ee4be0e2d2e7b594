"""The flow of one export, as a straight line of small steps, and parity verification.

plan (validate the options against the target) -> capture (float model, rewritten for INT8 activation
outliers where the QuantSpec says so, + graph edges + the target's module swaps) -> quantize (the target's quantizer, honouring the QuantSpec) -> lower (the target writes
its file) -> write (the manifest, complete) -> verify (the target's runner against the float model) ->
record (parity into the manifest, then the atomic swap). Nothing edits the manifest after the swap. An
artifact that fails parity never replaces what was there: it is kept beside it as ``NAME.failed/``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import logging
import os
import shutil
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segformer_edge.errors import CheckpointError, DataError, ExportError, SegformerEdgeError
from segformer_edge.inputs import InputSpec

from . import get_target
from .base import (
    MANIFEST_FORMAT,
    TAPS,
    Artifact,
    ExportOptions,
    ExportPlan,
    conversion_error,
    file_sha256,
    read_manifest,
)

if TYPE_CHECKING:
    import torch
    from segformer_edge.calibration.spec import QuantSpec

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ExportPlan",
    "ParityFailed",
    "Thresholds",
    "artifact_name",
    "checkpoint_digest",
    "default_thresholds",
    "export_artifact",
    "load_reference",
    "verify_artifact",
]

logger = logging.getLogger(__name__)

EXPORT_LOG = "export.log"


@dataclass
class Thresholds:
    """Pass criteria of a parity check; ``None`` means not checked."""

    max_abs_diff: float | None = None
    pixel_agreement: float | None = None
    miou_drop: float | None = None  # in mIoU points (percent)


DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(max_abs_diff=1e-3, pixel_agreement=0.999),
    "fp16": Thresholds(pixel_agreement=0.995),
    "int8": Thresholds(pixel_agreement=0.98, miou_drop=1.0),
    # 4-bit weights (Core ML palettize4: 16 values per weight tensor) give up more than int8 by design.
    "int4": Thresholds(pixel_agreement=0.95, miou_drop=3.0),
}


def default_thresholds(manifest: dict[str, Any]) -> Thresholds:
    """The thresholds an artifact is held to by default: those of the precision it computes in."""
    return DEFAULT_THRESHOLDS[get_target(manifest["target"]).parity_precision(manifest)]


class ParityFailed(SegformerEdgeError):
    """The artifact was written but does not agree with the float model; it was kept aside, not swapped in."""

    exit_code = 1

    def __init__(self, message: str, report: dict[str, Any], failed: Path) -> None:
        super().__init__(message)
        self.report = report
        self.failed = failed


# What each asked-for graph-edge feature adds to an artifact's name, in name order.
_NAME_PARTS = {"output:mask": "mask", "output:probs": "probs", "input:rgb01": "rgb01", "input:uint8": "uint8", "nhwc": "nhwc", "dynamic": "dynamic",
               "image_input": "image", "taps": "taps"}  # fmt: skip


def artifact_name(variant: str, target: str, options: ExportOptions, scheme: str = "static") -> str:
    features = options.features
    parts = [f"segformer-{variant}", target, options.precision]
    if options.precision == "int8" and scheme != "static":  # dynamic, weight-only: never the static artifact's folder
        parts.append(scheme.replace("_", "-"))
    parts += [part for feature, part in _NAME_PARTS.items() if feature in features]
    if options.mask_size != "full":
        parts[parts.index("mask")] = f"mask-{options.mask_size}"
    parts += [f"{k}-{v}" for k, v in sorted(options.target_options.items())]
    return "_".join(parts)


def checkpoint_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else file_sha256(path)


# -------------------------------------------------------------------------------------------------
# The steps


def plan_export(model: Any, target_name: str, options: ExportOptions, out_dir: str | Path, quant: QuantSpec | None,
                *, check_calibration: bool = True) -> ExportPlan:  # fmt: skip
    """Validate the options against the target (a clear error for what it cannot honour)."""
    target = get_target(target_name)
    if options.precision != "int8":
        quant = None
    elif quant is not None and quant.method == "auto":
        # Only static int8 calibrates activation ranges; dynamic ranges are each inference's min/max, and weight-only
        # int8 has min/max weight ranges and float activations.
        quant = quant.with_(method=target.method_for(options) if quant.scheme == "static" else "minmax")
    if options.precision == "int8" and quant is None:
        raise ExportError(f"{target_name}: int8 needs a quantization spec with a calibration set")
    if quant is not None and quant.scheme == "static" and check_calibration:
        calib = quant.require_calibration(target_name)
        if calib.size != tuple(options.size):
            raise DataError(f"calibration images are {calib.size[0]}x{calib.size[1]} but the export is {options.size[0]}x{options.size[1]}")
    target_options = target.plan(options, quant)
    folder = Path(out_dir) / artifact_name(model.config.variant, target_name, options, quant.scheme if quant else "static")
    return ExportPlan(target, options, quant, target_options, folder, options.input_spec(model.meta, target.integer_input),
                      options.graph_spec(model.meta), model.meta, model.config.variant)  # fmt: skip


def capture(model: Any, plan: ExportPlan) -> tuple[torch.nn.Module, torch.Tensor, dict[str, Any]]:
    """The module the target converts (float model + graph edges + its swaps), an example input, and what the
    outlier handling did (empty for float exports).

    For int8 the float model is a rewritten copy (BatchNorm folded, then the QuantSpec's outlier handling);
    ``model`` itself, the reference of verify, is never changed.
    """
    import torch

    from .graph import EdgeModule, fold_batch_norm

    outliers: dict[str, Any] = {}
    if plan.quant is not None:
        model = fold_batch_norm(model)  # the quantizers see conv + bias, not conv + BatchNorm
        model, outliers = rewrite_outliers(model, plan)
    edge = EdgeModule(model, plan.graph_input, plan.options.output, plan.options.taps, plan.options.mask_size,
                      runner_up=plan.target.mask_runner_up)  # fmt: skip
    takes_plan = "plan" in inspect.signature(plan.target.prepare).parameters  # a plugin's older override may not
    module = (plan.target.prepare(edge.eval(), plan=plan) if takes_plan else plan.target.prepare(edge.eval())).eval()
    shape = plan.graph_input.shape
    example = torch.randint(0, 256, shape, dtype=torch.uint8) if plan.graph_input.kind == "uint8" else torch.rand(shape)
    return module, example, outliers


def rewrite_outliers(model: Any, plan: ExportPlan) -> tuple[Any, dict[str, Any]]:
    """The float model rewritten for activation outliers as ``plan.quant.outliers`` says, measured on the
    calibration images, and the record of what was chosen (see :mod:`segformer_edge.calibration.outliers`)."""
    import torch
    from segformer_edge.calibration.outliers import handle_outliers

    quant = plan.quant
    if quant is None:
        return model, {}
    if quant.outliers == "none":
        return model, {"mode": "none", "applied": []}
    if quant.scheme == "weight_only" and quant.outliers == "auto":  # what auto measures is the W8A8 activation error
        return model, {"mode": "auto", "applied": [], "note": "weight-only: activations stay float, nothing to migrate"}
    if quant.calibration is None:
        if quant.outliers != "auto":
            raise ExportError(f"{plan.target.name}: --outliers {quant.outliers} needs calibration images (--data or --calibration)")
        return model, {"mode": "auto", "applied": [], "note": "no calibration images to measure on"}
    spec = plan.graph_input.float_spec
    key = (_state_digest(model), quant.calibration.sha256, quant.outliers, quant.weights, repr(spec))
    if key not in _OUTLIER_CACHE:  # every target of one export gets the same rewrite: measure it once
        inputs = torch.from_numpy(spec(quant.calibration.images))  # (N, 3, H, W) normalised
        _OUTLIER_CACHE.clear()
        _OUTLIER_CACHE[key] = handle_outliers(model, inputs, quant.outliers, weights=quant.weights)
    rewritten, record = _OUTLIER_CACHE[key]
    return copy.deepcopy(rewritten), copy.deepcopy(record)


_OUTLIER_CACHE: dict[tuple[str, ...], tuple[Any, dict[str, Any]]] = {}  # the last rewrite, by what defines it


def _state_digest(model: Any) -> str:
    """sha256 of a model's parameters and buffers (names, shapes, values)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def quantize(module: torch.nn.Module, example: torch.Tensor, plan: ExportPlan) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The target's quantizer on the calibration images (static int8); the module as is otherwise."""
    if plan.quant is None:
        return module, {}
    inputs = calibration_inputs(plan.quant, plan.graph_input, example)
    try:
        if "target_options" not in inspect.signature(plan.target.quantize).parameters:  # a plugin's older override
            return plan.target.quantize(module, example, plan.quant, inputs)
        return plan.target.quantize(module, example, plan.quant, inputs, target_options=plan.target_options)
    except SegformerEdgeError:
        raise
    except Exception as exc:
        raise conversion_error(f"{plan.target.name} int8 quantization", exc) from exc


def calibration_inputs(quant: QuantSpec, spec: InputSpec, example: Any) -> list[Any]:
    """The calibration images as the graph's inputs, one tensor per image."""
    import torch

    if quant.calibration is None:
        return []
    batch = spec(quant.calibration.images)  # (N, ...) in the graph's kind and layout
    return [torch.from_numpy(batch[i : i + 1]).to(example.dtype) for i in range(len(batch))]


@contextlib.contextmanager
def shared_provenance() -> Iterator[None]:
    """Inside: torch.fx's node provenance (``meta["from_node"]``) is shared between a node and the nodes made from
    it instead of deep-copied. torch 2.13 deep-copies a node's whole provenance chain into every node a pass makes
    from it, so each of a lowering's ~70 passes copies chains that grow with every pass: 20-25% of an ExecuTorch
    or Ethos-U lowering (measured: tiny model, cProfile). The chain's NodeSource objects are never changed after
    they are made (torch.fx.traceback builds them whole; passes append to a node's own list, which stays a copy),
    so sharing them records the same provenance."""
    from torch.fx import traceback as fx_traceback

    if not hasattr(fx_traceback, "copy") or not hasattr(fx_traceback, "NodeSource"):  # another torch: leave it alone
        yield
        return
    original = fx_traceback.copy
    fx_traceback.copy = types.SimpleNamespace(deepcopy=list, copy=copy.copy)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        fx_traceback.copy = original  # type: ignore[attr-defined]


def lower(module: torch.nn.Module, example: torch.Tensor, plan: ExportPlan, path: Path) -> dict[str, Any]:
    """The target writes its model file; returns what it read back from it."""
    import torch

    try:
        with torch.no_grad():
            return plan.target.convert(module, example, path, plan)
    except SegformerEdgeError:
        raise
    except Exception as exc:
        raise conversion_error(plan.target.name, exc) from exc


def build_manifest(model: Any, plan: ExportPlan, checkpoint: Path | None, lowered: dict[str, Any],
                   quantized: dict[str, Any], file: Path, seconds: float) -> dict[str, Any]:  # fmt: skip
    """Every manifest field but parity, from the model, the plan and what the target read back."""
    meta, options = model.meta, plan.options
    h, w = options.size
    k = model.config.num_classes
    from .graph import MASK_CANDIDATES, mask_method

    quarter = [-(-h // 4), -(-w // 4)]
    method = mask_method(options.output, options.mask_size, options.size, options.dynamic)
    out_shape = ([1, *quarter] if method == "quarter" else [1, h, w]) if method else [1, k, *quarter]
    mask_record = {"size": options.mask_size, "method": method,
                   **({"candidates_per_neighbour": MASK_CANDIDATES} if method == "candidates" else {})} if method else {}  # fmt: skip
    lowered = dict(lowered)
    actual_quant = lowered.pop("quantization", {})
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "target": plan.target.name,
        "precision": options.precision,
        "variant": model.config.variant,
        "num_classes": k,
        "class_names": list(meta.class_names),
        "palette": [list(c) for c in meta.palette],
        "input": plan.input.to_manifest(),
        "output": {"kind": options.output, "shape": out_shape, "dtype": "int32" if options.output == "mask" else "float32",
                   **mask_record, **({"taps": list(TAPS)} if options.taps else {})},
        "target_options": plan.target_options,
        "network_macs": _network_macs(model, options.size),
        "quantization": None,
        "checkpoint": {"name": checkpoint.name if checkpoint else None,
                       "sha256": checkpoint_digest(checkpoint) if checkpoint else None},  # fmt: skip
        "tool_versions": plan.target.tool_versions(),
    }
    if plan.quant is not None:
        manifest["quantization"] = {**plan.quant.to_manifest(), "batch_norm": "folded into the decoder's fuse conv",
                                    "applied": {**quantized, **actual_quant}}  # fmt: skip
    manifest.update(lowered)
    manifest["file"] = file.name
    manifest["sha256"] = file_sha256(file)
    manifest["size_bytes"] = sum(p.stat().st_size for p in file.rglob("*") if p.is_file()) if file.is_dir() else file.stat().st_size
    manifest["export_seconds"] = round(seconds, 2)
    return manifest


def _network_macs(model: Any, size: tuple[int, int]) -> int | None:
    """The float network's multiply-accumulates (convs, linears, attention matmuls) for one image at ``size``:
    bench's floor (``--floor``) is these at this machine's GEMM rate. Counted on the meta device."""
    from segformer_edge.profile import model_stats

    try:
        return int(model_stats(model.config, size)["macs"])
    except ValueError:  # smaller than SegFormer's 32x32 minimum: not a size an artifact is made at
        return None


def _keep_failed(tmp: Path, folder: Path) -> Path:
    """Move a built artifact that failed parity to ``NAME.failed/`` beside the real one (replacing an older one)."""
    failed = folder.with_name(folder.name + ".failed")
    if failed.exists():
        shutil.rmtree(failed)
    os.chmod(tmp, 0o755)
    os.replace(tmp, failed)
    return failed


def export_artifact(
    model: Any,
    target_name: str,
    options: ExportOptions,
    out_dir: str | Path,
    *,
    checkpoint: Path | None = None,
    quant: QuantSpec | None = None,
    verify: bool = True,
    verify_data: str | None = None,
    verify_images: int = 4,
    thresholds: Thresholds | None = None,
    on_step: Callable[[str], None] | None = None,
    capture_output: bool = True,
    layers: bool = False,
) -> tuple[Artifact, dict[str, Any] | None]:
    """Convert ``model`` for one target into ``out_dir/<name>/`` and verify parity before it lands.

    The folder is built under a temporary name with its complete manifest (parity included) and swapped in
    only when every step succeeded; a failed step or parity check leaves any earlier artifact as it was and
    keeps what was built as ``<name>.failed/`` (with its ``export.log``). ``on_step`` hears each step's
    name. With ``capture_output`` the converters' and runtimes' output goes to ``export.log`` in the
    artifact folder, not to the terminal. ``layers`` adds the per-tap comparison (verify --layers) to the
    manifest's parity block.
    """
    from segformer_edge.io import atomic_path
    from segformer_edge.logs import OutputCapture

    (on_step or _no_step)("plan")
    model = model.eval()
    plan = plan_export(model, target_name, options, out_dir, quant)
    started = time.perf_counter()
    with atomic_path(plan.folder, directory=True) as tmp:
        output = OutputCapture(tmp / EXPORT_LOG, enabled=capture_output)

        def step(name: str) -> None:
            with output.paused():
                (on_step or _no_step)(name)

        try:
            with output, shared_provenance():
                step("capture")
                module, example, outliers = capture(model, plan)
                if plan.quant is not None:
                    step("quantize")
                module, quantized = quantize(module, example, plan)
                if outliers:
                    quantized = {"outliers": outliers, **quantized}
                file = tmp / f"model{plan.target.suffix}"
                step("lower")
                lowered = lower(module, example, plan, file)
                manifest = build_manifest(model, plan, checkpoint, lowered, quantized, file, time.perf_counter() - started)
                artifact = Artifact(tmp, file, manifest)
                report = None
                if not verify:
                    manifest["parity"] = {"status": "not verified", "passed": None}
                elif not plan.target.runs_here():
                    manifest["parity"] = {"status": f"not run: {plan.target.not_here}", "passed": None}
                else:
                    step("verify")
                    artifact.write_manifest()  # verify reads the artifact back from disk, as a user would
                    report = verify_artifact(tmp, model=model, checkpoint=checkpoint, data=verify_data, num_images=verify_images,
                                             thresholds=thresholds, layers=layers)  # fmt: skip
                    manifest["parity"] = {"status": "passed" if report["passed"] else "failed", **report}
                step("record")
                artifact.write_manifest()
        except SegformerEdgeError as exc:
            failed = _keep_failed(tmp, plan.folder)
            raise type(exc)(f"{exc} (log: {failed / EXPORT_LOG})") from exc
        if report is not None and not report["passed"]:
            failed = _keep_failed(tmp, plan.folder)
            raise ParityFailed(f"{target_name}: parity failed: {report['failure']}; the artifact was kept at {failed}, "
                               f"and {plan.folder} was left as it was", report, failed)  # fmt: skip
    logger.info("%s: wrote %s", target_name, plan.folder)
    return Artifact(plan.folder, plan.folder / file.name, manifest), report


def _no_step(name: str) -> None:
    return None


# -------------------------------------------------------------------------------------------------
# Parity


def float_logits(model: Any, spec: InputSpec, images: np.ndarray) -> np.ndarray:
    """The float model's logits (N, K, H/4, W/4) for uint8 RGB images (N, H, W, 3)."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(spec.float_spec(images))).numpy()


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the class axis (1) of (N, K, h, w) logits."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _quarter_up(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) labels at 1/4 resolution -> (N, H, W) by nearest neighbour."""
    from segformer_edge.predict import resize_labels

    return np.stack([resize_labels(one, size) for one in labels])


def upsampled_argmax(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, K, h, w) logits -> (N, H, W) labels: bilinear upsampling to the input size, then argmax."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False).argmax(1).numpy()


def open_verify_data(data: str | None, model: Any) -> tuple[Any, str, bool]:
    """The images to verify on: (source, how they are used, whether their masks are usable).

    Without ``data``, the built-in synthetic scenes: with their labels where the model has their label
    space, as plain images (the float model's predictions as the reference) otherwise, and the report says so.
    """
    from segformer_edge.data import open_source

    spec = data or "synthetic"
    source = open_source(spec, "val")
    has_masks = source.has_masks
    if has_masks and source.labels.num_classes != model.config.num_classes:
        if data is not None:
            raise DataError(f"{data}: the data has {source.labels.num_classes} classes but the model has {model.config.num_classes}")
        has_masks = False
    if data is None and not uses_builtin_labels(model):
        has_masks = False  # the scenes' labels mean nothing to a model of other classes: its own predictions do
    usage = "labels" if has_masks else "images only; the float model's predictions are the reference"
    return source, usage, has_masks


def _data_record(spec: str, source: Any, indices: range, usage: str) -> dict[str, Any]:
    names = "\n".join(source.item_name(i) for i in indices)
    return {"spec": spec, "kind": source.name.split(":")[0], "images": len(indices), "usage": usage,
            "sha256": hashlib.sha256(names.encode()).hexdigest()}  # fmt: skip


def verify_artifact(
    path: str | Path,
    *,
    model: Any | None = None,
    checkpoint: str | Path | None = None,
    data: str | None = None,
    num_images: int = 8,
    thresholds: Thresholds | None = None,
    runner: Any | None = None,
    layers: bool = False,
    report_dir: Path | None = None,
    calibration: Path | None = None,
) -> dict[str, Any]:
    """Run an artifact and the float model on the same images and compare them.

    Returns ``max_abs_diff``, ``cosine``, ``psnr_db`` (logits artifacts; None where either output holds NaN or
    inf), ``nonfinite`` and ``nonfinite_float`` (NaN/inf values in the artifact's and the float model's output;
    ``nonfinite_counts`` splits them into NaN and inf), ``pixel_agreement``, agreement mIoU and per-class IoU
    of the artifact's masks against the float model's (a pixel that NaN or inf reaches never agrees), mIoU of
    both against the labels where the data has them, ``passed``, ``failure`` and what was checked.

    ``layers``: also compare the stage outputs of a debug graph of the same recipe (``report["layers"]``,
    see :func:`.debug.layer_report`; ``calibration`` is the set an int8 artifact was made with, when it
    cannot be picked again). ``report_dir``: write the per-image PNGs and report.md / report.json there.
    """
    from segformer_edge.evaluate import ConfusionMatrix

    artifact = read_manifest(path)
    manifest = artifact.manifest
    if model is None:
        model = load_reference(artifact, checkpoint)
    if model.config.num_classes != manifest["num_classes"]:
        raise CheckpointError(f"the model has {model.config.num_classes} classes but {artifact.file.name} has {manifest['num_classes']}")
    source, usage, has_masks = open_verify_data(data, model)
    n = min(num_images, len(source))
    if n < 1:
        raise DataError(f"{data}: no images to verify on")
    spec = artifact.input_spec
    h, w = spec.size
    if runner is None:
        runner = get_target(manifest["target"]).load(artifact)
    k = manifest["num_classes"]
    kind, quarter = manifest["output"]["kind"], manifest["output"].get("size") == "quarter"
    cm_agree, cm_float, cm_art = ConfusionMatrix(k), ConfusionMatrix(k), ConfusionMatrix(k)
    diffs, dots, norms_a, norms_b, sq_err, peak = [], 0.0, 0.0, 0.0, 0.0, 0.0
    agree, total, elements = 0, 0, 0
    bad_values = {"artifact": {"nan": 0, "inf": 0}, "float": {"nan": 0, "inf": 0}}
    items: list[dict[str, Any]] = []
    for i in range(n):
        image, mask = source.load(i)
        image, mask = spec.resize(image, mask)
        images = image[None]  # (1, H, W, 3)
        ref = float_logits(model, spec, images)  # (1, K, H/4, W/4)
        if kind == "probs":  # the artifact's output is the softmax: so is the reference
            ref = _softmax(ref)  # (1, K, H/4, W/4)
        _count_nonfinite(ref, bad_values["float"])
        ref_finite = np.isfinite(ref)
        ref_safe = np.where(ref_finite, ref, 0.0)
        # A quarter-size mask is the float model's argmax at 1/4 resolution, shown at full size (nearest).
        ref_mask = _quarter_up(ref_safe.argmax(1), (h, w)) if quarter else upsampled_argmax(ref_safe, (h, w))  # (1, H, W)
        broken = _nonfinite_reach(ref, (h, w))  # pixels that a NaN or inf takes part in never agree
        out = np.asarray(runner(spec(images)))
        if kind == "mask":
            out_mask = out.reshape(ref.shape[:1] + ref.shape[2:] if quarter else ref_mask.shape).astype(np.int64)
            out_mask = _quarter_up(out_mask, (h, w)) if quarter else out_mask  # (1, H, W)
        else:
            out = out.astype(np.float32).reshape(ref.shape)
            _count_nonfinite(out, bad_values["artifact"])
            finite = np.isfinite(out)
            safe = np.where(finite, out, 0.0)
            out_mask = upsampled_argmax(safe, (h, w))
            broken |= _nonfinite_reach(out, (h, w))
            if finite.all() and ref_finite.all():
                diffs.append(float(np.abs(out - ref).max()))
                dots += float((out.astype(np.float64) * ref).sum())
                norms_a += float((out.astype(np.float64) ** 2).sum())
                norms_b += float((ref.astype(np.float64) ** 2).sum())
                sq_err += float(((out.astype(np.float64) - ref) ** 2).sum())
                peak = max(peak, float(np.abs(ref).max()))
                elements += ref.size
        agree += int(((out_mask == ref_mask) & ~broken).sum())
        total += out_mask.size
        if report_dir is not None:
            one = ConfusionMatrix(k)
            one.update(np.where(out_mask < 0, 0, out_mask), ref_mask)
            items.append({"name": source.item_name(i), "image": image, "float_mask": ref_mask[0], "artifact_mask": out_mask[0],
                          "agreement": float(((out_mask == ref_mask) & ~broken).mean()),
                          "per_class_iou": one.metrics(list(manifest["class_names"]))["per_class_iou"]})  # fmt: skip
        cm_agree.update(_miss(out_mask, ref_mask, broken, k), ref_mask)
        if has_masks:
            cm_float.update(_miss(ref_mask, mask, _nonfinite_reach(ref, (h, w)), k), mask)
            cm_art.update(_miss(out_mask, mask, broken, k), mask)
    nonfinite = sum(bad_values["artifact"].values())
    nonfinite_float = sum(bad_values["float"].values())
    measured = bool(diffs) and nonfinite == nonfinite_float == 0  # |diff|, cosine and PSNR mean nothing beside NaN
    agreement = cm_agree.metrics(list(manifest.get("class_names") or []) or None)
    report: dict[str, Any] = {
        "target": manifest["target"],
        "precision": manifest["precision"],
        "executor": getattr(runner, "executor", manifest["target"]),
        "images": n,
        "data": _data_record(data or "synthetic", source, range(n), usage),
        "size": [h, w],
        "nonfinite": nonfinite,
        "nonfinite_float": nonfinite_float,
        "nonfinite_counts": bad_values,
        "max_abs_diff": max(diffs) if measured else None,
        "cosine": dots / max(np.sqrt(norms_a * norms_b), 1e-30) if measured else None,
        "psnr_db": 10 * float(np.log10(max(peak, 1e-30) ** 2 / max(sq_err / elements, 1e-30))) if measured else None,
        "pixel_agreement": agree / total,
        "agreement_miou": agreement["miou"],
        "agreement_per_class_iou": {name: iou for name, iou in agreement["per_class_iou"].items() if iou is not None},
        "miou_float": cm_float.metrics()["miou"] if has_masks else None,
        "miou_artifact": cm_art.metrics()["miou"] if has_masks else None,
    }
    if has_masks:
        report["miou_drop_points"] = 100 * (report["miou_float"] - report["miou_artifact"])
    else:  # no labels: the drop is measured against the float model's own masks (its mIoU there is 100%)
        report["miou_drop_points"] = 100 * (1.0 - report["agreement_miou"])
    report = _judge(report, thresholds or default_thresholds(manifest))
    if layers:
        from .debug import layer_report

        ckpt = Path(checkpoint) if checkpoint is not None else None
        report["layers"] = layer_report(path, model, checkpoint=ckpt, data=data, num_images=min(n, 4), calibration=calibration)
    if report_dir is not None:
        from .debug import write_visual_report

        report["report_dir"] = str(write_visual_report(Path(report_dir), items, report, manifest["palette"], report.get("layers")))
    return report


def _count_nonfinite(values: np.ndarray, counts: dict[str, int]) -> None:
    counts["nan"] += int(np.isnan(values).sum())
    counts["inf"] += int(np.isinf(values).sum())


def _nonfinite_reach(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, H, W) bool: the output pixels whose upsampled logits a NaN or inf takes part in."""
    import torch

    bad = torch.from_numpy((~np.isfinite(logits)).any(1, keepdims=True).astype(np.float32))  # (N, 1, h, w)
    return (torch.nn.functional.interpolate(bad, size=size, mode="bilinear", align_corners=False)[:, 0] > 0).numpy()


def _miss(pred: np.ndarray, truth: np.ndarray, broken: np.ndarray, k: int) -> np.ndarray:
    """``pred`` with the ``broken`` pixels (reached by NaN or inf) set to a class other than ``truth``'s: they
    count as errors in every confusion matrix, never as agreement."""
    truth = np.asarray(truth, np.int64).reshape(pred.shape)
    return np.where(broken, (truth + 1) % max(k, 2), pred)


def _nonfinite_failure(report: dict[str, Any]) -> str:
    """Which output holds NaN or inf, named as such: 'the artifact's output holds 12 NaN values'."""
    parts = []
    for who, name in (("artifact", "the artifact's output"), ("float", "the float model's output")):
        counts = report["nonfinite_counts"][who]
        kinds = [f"{counts[kind]} {label}" for kind, label in (("nan", "NaN"), ("inf", "inf")) if counts[kind]]
        if kinds:
            parts.append(f"{name} holds {' and '.join(kinds)} values")
    broken = " (the checkpoint itself is broken)" if report["nonfinite_float"] else ""
    return " and ".join(parts) + broken


def _judge(report: dict[str, Any], limits: Thresholds) -> dict[str, Any]:
    """Apply the thresholds; NaN or inf in either output fails on its own, named as such."""
    checks: dict[str, bool] = {"finite": report["nonfinite"] == 0 and report["nonfinite_float"] == 0}
    if limits.max_abs_diff is not None and report["max_abs_diff"] is not None:
        checks["max_abs_diff"] = report["max_abs_diff"] <= limits.max_abs_diff
    if limits.pixel_agreement is not None:
        checks["pixel_agreement"] = report["pixel_agreement"] >= limits.pixel_agreement
    if limits.miou_drop is not None:
        checks["miou_drop"] = report["miou_drop_points"] <= limits.miou_drop
    report["thresholds"] = {k: v for k, v in vars(limits).items() if v is not None}
    report["checks"] = checks
    report["passed"] = all(checks.values())
    failures = [name for name, ok in checks.items() if not ok]
    if "finite" in failures:
        report["failure"] = _nonfinite_failure(report)
    elif failures:
        values = {"max_abs_diff": report["max_abs_diff"], "pixel_agreement": report["pixel_agreement"],
                  "miou_drop": report["miou_drop_points"]}  # fmt: skip
        report["failure"] = ", ".join(f"{name} {values[name]:.4g} (limit {report['thresholds'][name]})" for name in failures)
    else:
        report["failure"] = None
    return report


def load_reference(artifact: Artifact, checkpoint: str | Path | None, option: str = "--checkpoint") -> Any:
    """The float model an artifact was exported from: ``checkpoint`` (default: the built-in model), refused
    with a CheckpointError naming ``option`` when its sha256 is not the one the manifest records."""
    from segformer_edge.weights import builtin_checkpoint, load_pretrained

    ckpt = Path(checkpoint) if checkpoint is not None else builtin_checkpoint()
    expected = (artifact.manifest.get("checkpoint") or {}).get("sha256")
    if expected and checkpoint_digest(ckpt) != expected:
        raise CheckpointError(
            f"{ckpt}: this is not the checkpoint {artifact.folder.name} was exported from "
            f"({artifact.manifest['checkpoint'].get('name')}); pass the right {option}"
        )
    return load_pretrained(ckpt)


def quantized_predictor(model: Any, target_name: str, options: ExportOptions, quant: QuantSpec,
                        workdir: Path) -> Callable[[np.ndarray], np.ndarray]:  # fmt: skip
    """uint8 images (N, H, W, 3) -> (N, H, W) labels of ``model`` quantized by ``target_name``'s quantizer.

    Where the target has a PT2E quantizer, the quantized graph runs in torch (the numbers the target
    lowers); elsewhere a real artifact is built in ``workdir`` and run by the target's runner.
    """
    import torch

    options = replace(options, precision="int8", input_kind="normalized", output="logits", layout="nchw",
                      dynamic=False, image_input=False)  # fmt: skip
    plan = plan_export(model, target_name, options, workdir, quant)
    h, w = options.size
    if plan.target.quantizer_for(quant, plan.target_options) is not None:
        module, example, _ = capture(model, plan)
        quantized, _ = quantize(module, example, plan)

        def predict(images: np.ndarray) -> np.ndarray:
            batch = plan.graph_input(images)  # (N, 3, H, W); the exported graph takes one image at a time
            with torch.no_grad():
                logits = np.concatenate([quantized(torch.from_numpy(batch[i : i + 1])).numpy() for i in range(len(batch))])
            return upsampled_argmax(logits, (h, w))

        return predict
    artifact, _ = export_artifact(model, target_name, options, workdir, quant=quant, verify=False)
    runner = plan.target.load(artifact)

    def run(images: np.ndarray) -> np.ndarray:  # the artifact takes one image at a time (static batch 1)
        logits = [np.asarray(runner(plan.input(images[i : i + 1])), np.float32) for i in range(len(images))]
        return upsampled_argmax(np.concatenate(logits), (h, w))

    return run


# -------------------------------------------------------------------------------------------------
# INT8 inputs: the calibration set and the per-target mixed-precision policy


def uses_builtin_labels(model: Any) -> bool:
    """Whether the model predicts the built-in synthetic scenes' classes (the reference model does)."""
    from segformer_edge.data import synthetic_labels

    return list(model.meta.class_names) == list(synthetic_labels().classes)


def float_labeler(model: Any, size: tuple[int, int]) -> Callable[[np.ndarray], np.ndarray]:
    """(H, W, 3) uint8 image at ``size`` -> (H, W) labels of the float model: the reference where data has no masks."""
    spec = InputSpec.for_model(model.meta, size)
    return lambda image: upsampled_argmax(float_logits(model, spec, image[None]), size)[0]


def calibration_for(
    model: Any,
    checkpoint: Path | None,
    size: tuple[int, int],
    *,
    data: str | None = None,
    calibration: Path | None = None,
    num_images: int = 32,
    method: str = "auto",
    seed: int = 0,
) -> Any:
    """The calibration set of an int8 export: a folder from ``calibrate`` (checked), or one picked now.

    Without ``data``, only a model of the built-in label space calibrates on the built-in synthetic scenes;
    any other model needs the user's images: nothing silently falls back to synthetic scenes.
    """
    from segformer_edge.calibration.calibset import CalibrationSet, select_calibration_set

    sha = checkpoint_digest(checkpoint) if checkpoint is not None else None
    if calibration is not None:
        calib = CalibrationSet.load(calibration)
        calib.check_for(sha, size, calibration)
        return calib
    if data is None:
        if not uses_builtin_labels(model):
            raise DataError(
                f"this model has {model.config.num_classes} classes of its own: int8 needs calibration images; "
                "pass --data PHOTOS (a folder of images, masks optional) or --calibration DIR"
            )
        data = "synthetic"
    return select_calibration_set(data, num_images, size, model.config.num_classes, seed=seed, method=method, checkpoint_sha256=sha,
                                  class_names=list(model.meta.class_names), labeler=float_labeler(model, size))  # fmt: skip


def budget_spec(model: Any, target_name: str, options: ExportOptions, quant: QuantSpec, budget: float,
                workdir: Path, progress: Callable[[int], None] | None = None, granularity: str = "layer") -> QuantSpec:  # fmt: skip
    """``quant`` with the fewest layers in float that bring ``target_name``'s int8 mIoU drop within ``budget``
    points, measured with that target's own quantizer on held-out calibration images: whole layer groups
    first, then (``granularity="layer"``) their blocks and single layers (see :func:`budget_policy`)."""
    from segformer_edge.calibration.recipes import reuse_exports
    from segformer_edge.calibration.sensitivity import GRANULARITIES, analyse, budget_policy, children

    if granularity not in GRANULARITIES:
        raise ExportError(f"--budget-granularity {granularity}: choose {' or '.join(GRANULARITIES)}")
    calib = quant.require_calibration(target_name)
    k = model.config.num_classes
    resolved = plan_export(model, target_name, replace(options, precision="int8"), workdir, quant).quant or quant
    make = lambda spec: quantized_predictor(model, target_name, options, spec, workdir)
    labeler = float_labeler(model, calib.size)
    float_predict = lambda images: np.stack([labeler(im) for im in images])
    split = (lambda entry: children(model, entry)) if granularity == "layer" else None
    with reuse_exports():
        report = analyse(calib, resolved, make, float_predict, k, target=target_name, progress=progress)
        policy = budget_policy(calib, resolved, make, budget, report, k, split=split, progress=progress)
    return resolved.with_(float_groups=tuple(policy["float_groups"]), policy={**policy, "sensitivity": report.rows})
