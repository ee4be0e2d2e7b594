"""INT8 inputs of an export: the calibration set it quantizes with, and the mixed-precision budget search.

:func:`calibration_for` picks (or loads and checks) the calibration set; :func:`quantized_predictor` runs a model
through one target's quantizer; :func:`budget_spec` finds the fewest layers to keep in float for a drop budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segformer_edge.errors import DataError, ExportError

from .base import ExportOptions
from .build import capture, plan_export, quantize
from .pipeline import export_artifact
from .reference import checkpoint_digest, float_labeler, float_logits_of, upsampled_argmax, uses_builtin_labels

if TYPE_CHECKING:
    from segformer_edge.calibration.spec import QuantSpec

__all__ = ["budget_spec", "calibration_for", "quantized_predictor"]


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


def budget_spec(model: Any, target_name: str, options: ExportOptions, quant: QuantSpec, budget: float,
                workdir: Path, progress: Callable[[int], None] | None = None, granularity: str = "layer") -> QuantSpec:  # fmt: skip
    """``quant`` with the fewest layers in float that bring ``target_name``'s int8 mIoU drop (against the calibration
    set's labels, or estimated without them for photos) within ``budget`` points, measured with that target's own quantizer on held-out calibration images: whole layer groups
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
    logits = float_logits_of(model, calib.size)
    split = (lambda entry: children(model, entry)) if granularity == "layer" else None
    with reuse_exports():
        report = analyse(calib, resolved, make, float_predict, k, target=target_name, progress=progress, float_logits=logits)
        policy = budget_policy(calib, resolved, make, budget, report, k, split=split, progress=progress, float_logits=logits)
    return resolved.with_(float_groups=tuple(policy["float_groups"]), policy={**policy, "sensitivity": report.rows})
