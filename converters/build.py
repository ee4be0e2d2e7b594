"""The steps of the export line that build an artifact: plan -> capture -> quantize -> lower -> manifest.

plan (validate the options against the target) -> capture (float model, rewritten for INT8 activation outliers where
the QuantSpec says so, + graph edges + the target's module swaps) -> quantize (the target's quantizer, honouring the
QuantSpec) -> lower (the target writes its file) -> the manifest, complete but for parity. :func:`build_artifact`
runs them into a folder; :mod:`.pipeline` adds verify, record and the atomic landing, and :mod:`.debug` builds its
debug graphs (the same recipe with extra outputs) with them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import logging
import os
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segformer_edge.errors import DataError, ExportError, SegformerEdgeError
from segformer_edge.inputs import InputSpec

from . import get_target
from .base import MANIFEST_FORMAT, TAPS, Artifact, ExportOptions, ExportPlan, conversion_error, file_sha256
from .reference import checkpoint_digest, state_digest

if TYPE_CHECKING:
    import torch
    from segformer_edge.calibration.spec import QuantSpec

__all__ = [
    "ExportPlan",
    "artifact_name",
    "build_artifact",
    "build_manifest",
    "calibration_inputs",
    "capture",
    "decoder_form",
    "float_model",
    "lower",
    "plan_export",
    "quantize",
    "rewrite_outliers",
    "shared_provenance",
]

logger = logging.getLogger(__name__)

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
    decoder_form(options, quant)  # --decoder projected with a float-kept decoder layer: refused here
    target_options = target.plan(options, quant)
    folder = Path(out_dir) / artifact_name(model.config.variant, target_name, options, quant.scheme if quant else "static")
    return ExportPlan(target, options, quant, target_options, folder, options.input_spec(model.meta, target.integer_input),
                      options.graph_spec(model.meta), model.meta, model.config.variant)  # fmt: skip


def decoder_form(options: ExportOptions, quant: QuantSpec | None) -> dict[str, str]:
    """The decoder's formulation in the exported graph, and why (recorded in the manifest as ``decoder``).

    ``projected`` (:class:`segformer_edge.model.ProjectedHead`) is the same function with the fuse conv folded into
    the stage projections. It has no fuse conv, so a QuantSpec that keeps a decoder layer float (``decoder.head``,
    ``decoder.fuse``, ``decoder.linear_c.N``) gets the decoder as trained under ``auto``, and an error under
    ``projected``: the float-kept layer must exist as the user named it."""
    kept = [m for m in quant.float_modules if m == "model.decoder" or m.startswith("model.decoder.")] if quant is not None else []
    if options.decoder == "as-trained":
        return {"form": "as-trained", "why": "--decoder as-trained"}
    if kept:
        names = ", ".join(m.removeprefix("model.") for m in kept)
        if options.decoder == "projected":
            raise ExportError(f"--decoder projected folds the decoder's fuse conv into its stage projections, but {names} "
                              "is kept float: use --decoder auto or as-trained, or keep no decoder layer float")  # fmt: skip
        return {"form": "as-trained", "why": f"{names} kept float: the projected decoder has no such layer"}
    return {"form": "projected", "why": "fuse conv and BatchNorm folded into the stage projections, before upsampling"}


def capture(model: Any, plan: ExportPlan) -> tuple[torch.nn.Module, torch.Tensor, dict[str, Any]]:
    """The module the target converts (float model + graph edges + its swaps), an example input, and what the
    outlier handling did (empty for float exports).

    The float model is :func:`float_model`'s rewritten copy; ``model`` itself, the reference of verify, is never
    changed.
    """
    import torch

    from .graph import EdgeModule

    model, outliers = float_model(model, plan)
    edge = EdgeModule(model, plan.graph_input, plan.options.output, plan.options.taps, plan.options.mask_size,
                      runner_up=plan.target.mask_runner_up)  # fmt: skip
    takes_plan = "plan" in inspect.signature(plan.target.prepare).parameters  # a plugin's older override may not
    module = (plan.target.prepare(edge.eval(), plan=plan) if takes_plan else plan.target.prepare(edge.eval())).eval()
    shape = plan.graph_input.shape
    example = torch.randint(0, 256, shape, dtype=torch.uint8) if plan.graph_input.kind == "uint8" else torch.rand(shape)
    return module, example, outliers


def float_model(model: Any, plan: ExportPlan) -> tuple[Any, dict[str, Any]]:
    """The float model a target converts, as a rewritten copy, and what the outlier handling did (empty for float
    exports): the decoder in its form (:func:`decoder_form`), BatchNorm folded for int8 either way (the quantizers
    see conv + bias), then the QuantSpec's outlier handling, measured on the graph that is quantized."""
    from .graph import fold_batch_norm, project_decoder

    if decoder_form(plan.options, plan.quant)["form"] == "projected":
        model = project_decoder(model)  # a copy; its BatchNorm folded with the fuse conv
    elif plan.quant is not None:
        model = fold_batch_norm(model)
    return rewrite_outliers(model, plan) if plan.quant is not None else (model, {})


def rewrite_outliers(model: Any, plan: ExportPlan) -> tuple[Any, dict[str, Any]]:
    """The float model rewritten for activation outliers as ``plan.quant.outliers`` says, measured on the
    calibration images, and the record of what was chosen (see :mod:`segformer_edge.calibration.outliers`).

    The decision (not the model) is made once per model state, calibration set, mode, weights, scheme and input,
    recorded beside a saved calibration set (or in ``$XDG_CACHE_HOME/segformer-edge``) and reapplied from there by
    every target and every later run; the record says whether it was reused, and from where."""
    import torch
    from segformer_edge.calibration.outliers import DECISION_FORMAT, decide_outliers

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
    key = {"format": DECISION_FORMAT, "model_state": state_digest(model), "calibration": quant.calibration.sha256,
           "outliers": quant.outliers, "weights": quant.weights, "scheme": quant.scheme, "input": repr(spec)}  # fmt: skip
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    if digest not in _OUTLIER_CACHE:  # every target of one run, and later runs, share the decision: measured once
        decision, origin = _read_decision(quant.calibration, digest, key)
        if decision is None:
            inputs = torch.from_numpy(spec(quant.calibration.images))  # (N, 3, H, W) normalised
            decision = decide_outliers(model, inputs, quant.outliers, weights=quant.weights)
            origin = {"reused": False, "saved": _write_decision(quant.calibration, digest, key, decision)}
        _OUTLIER_CACHE.clear()
        _OUTLIER_CACHE[digest] = (decision, origin)
    else:
        decision, made = _OUTLIER_CACHE[digest]
        origin = {"reused": True, "from": made.get("from") or made.get("saved") or "this process"}
    record = {**copy.deepcopy(decision.record), "decision": {**origin, "key_sha256": digest, "shared": SHARED}}
    return decision.apply(model), record


SHARED = ("one decision for every target with this model state, calibration set, weights, scheme and input: its "
          "measure (simulated W8A8) is target-independent")  # fmt: skip
_OUTLIER_CACHE: dict[str, tuple[Any, dict[str, Any]]] = {}  # the last decision, by the sha256 of what defines it


def _decision_files(calibration: Any, digest: str) -> list[Path]:
    """Where a decision is kept: beside a saved calibration set, then in the user's cache ($XDG_CACHE_HOME)."""
    name = f"outliers-{digest[:24]}.json"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segformer-edge" / "outlier-decisions"
    beside = [calibration.folder / "outlier-decisions" / name] if calibration.folder is not None else []
    return [*beside, cache / name]


def _read_decision(calibration: Any, digest: str, key: dict[str, str]) -> tuple[Any, dict[str, Any]]:
    """A recorded decision made for ``key`` and where it was read from, or (None, {})."""
    from segformer_edge.calibration.outliers import OutlierDecision

    for path in _decision_files(calibration, digest):
        try:
            decision = OutlierDecision.from_json(json.loads(path.read_text()), key)
        except (OSError, ValueError):
            continue
        if decision is not None:
            logger.info("outliers: reusing the decision recorded in %s", path)
            return decision, {"reused": True, "from": str(path)}
    return None, {}


def _write_decision(calibration: Any, digest: str, key: dict[str, str], decision: Any) -> str | None:
    """Record the decision (atomically) in the first place that takes it; returns that path, or None."""
    from segformer_edge.io import atomic_write_json

    for path in _decision_files(calibration, digest):
        try:
            atomic_write_json(path, decision.to_json(key))
        except OSError as exc:
            logger.warning("outliers: could not record the decision in %s (%s)", path, exc)
            continue
        return str(path)
    return None


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
        "decoder": (decoder := decoder_form(options, plan.quant)),
        "network_macs": _network_macs(model, options.size, decoder["form"] == "projected"),
        "quantization": None,
        # A model trained in memory has no file: its name and sha256 are None, its parameters' digest identifies it.
        "checkpoint": {"name": checkpoint.name if checkpoint else None,
                       "sha256": checkpoint_digest(checkpoint) if checkpoint else None,
                       "state_sha256": state_digest(model)},  # fmt: skip
        "tool_versions": plan.target.tool_versions(),
    }
    if plan.quant is not None:
        folded_into = "the decoder's stage projections" if manifest["decoder"]["form"] == "projected" else "the decoder's fuse conv"
        manifest["quantization"] = {**plan.quant.to_manifest(), "batch_norm": f"folded into {folded_into}",
                                    "applied": {**quantized, **actual_quant}}  # fmt: skip
    manifest.update(lowered)
    manifest["file"] = file.name
    manifest["sha256"] = file_sha256(file)
    manifest["size_bytes"] = sum(p.stat().st_size for p in file.rglob("*") if p.is_file()) if file.is_dir() else file.stat().st_size
    manifest["export_seconds"] = round(seconds, 2)
    return manifest


def _network_macs(model: Any, size: tuple[int, int], projected: bool) -> int | None:
    """The exported network's multiply-accumulates (convs, linears, attention matmuls) for one image at ``size``,
    with the decoder in the graph's formulation: bench's floor (``--floor``) is these at this machine's GEMM rate.
    Counted on the meta device."""
    from segformer_edge.profile import model_stats

    try:
        return int(model_stats(model.config, size, projected=projected)["macs"])
    except ValueError:  # smaller than SegFormer's 32x32 minimum: not a size an artifact is made at
        return None



def build_artifact(model: Any, plan: ExportPlan, folder: Path, checkpoint: Path | None = None,
                   step: Callable[[str], None] | None = None, started: float | None = None) -> Artifact:  # fmt: skip
    """capture -> quantize -> lower -> manifest into ``folder`` (which exists): the artifact, not yet verified.

    ``step`` hears each step's name; ``started`` is when the export began (``export_seconds`` counts from it).
    """
    step = step or (lambda name: None)
    started = time.perf_counter() if started is None else started
    step("capture")
    module, example, outliers = capture(model, plan)
    if plan.quant is not None:
        step("quantize")
    module, quantized = quantize(module, example, plan)
    if outliers:
        quantized = {"outliers": outliers, **quantized}
    file = folder / f"model{plan.target.suffix}"
    step("lower")
    lowered = lower(module, example, plan, file)
    manifest = build_manifest(model, plan, checkpoint, lowered, quantized, file, time.perf_counter() - started)
    return Artifact(folder, file, manifest)
