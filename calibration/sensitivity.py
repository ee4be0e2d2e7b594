"""Sensitivity analysis and the mixed-precision policy.

Layer groups are the four encoder stages and the two parts of the decoder. Each group is quantized alone
(PT2E with the XNNPACK quantizer, the same observers as the export) and the quantized model is compared
with the float model on a held-out part of the calibration set: change in mIoU against the labels and
pixel agreement. ``budget_policy`` then keeps the most sensitive groups in float until the drop of the
fully quantized model is within the budget; every target applies the resulting list.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .calibset import CalibrationSet

__all__ = ["LAYER_GROUPS", "SensitivityReport", "analyse", "budget_policy", "write_report"]

logger = logging.getLogger(__name__)

# Group name -> module names inside the export wrapper (EdgeModule holds the SegFormer as `model`).
LAYER_GROUPS: dict[str, list[str]] = {
    "stage1": ["model.encoder.stages.0"],
    "stage2": ["model.encoder.stages.1"],
    "stage3": ["model.encoder.stages.2"],
    "stage4": ["model.encoder.stages.3"],
    "decoder.mlp": ["model.decoder.linear_c"],
    "decoder.head": ["model.decoder.fuse", "model.decoder.classifier"],
}


@dataclass
class SensitivityReport:
    """Per-group mIoU drop (points) and pixel agreement, most sensitive first."""

    rows: list[dict[str, Any]]
    miou_float: float
    held_out: int

    def ranked(self) -> list[str]:
        return [r["group"] for r in self.rows]


def _split(calib: CalibrationSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if calib.masks is None:
        raise ValueError("sensitivity analysis needs the calibration set's masks")
    n = len(calib.images)
    held = max(1, n // 4)
    return calib.images[: n - held] if n > held else calib.images, calib.images[n - held :], calib.masks[n - held :]


def _inputs(images: np.ndarray, mean: list[float], std: list[float]) -> list[torch.Tensor]:
    x = (images.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return [torch.from_numpy(np.ascontiguousarray(x[i : i + 1].transpose(0, 3, 1, 2))) for i in range(len(x))]


def _predict(fn: Callable[[torch.Tensor], torch.Tensor], inputs: list[torch.Tensor], size: tuple[int, int]) -> np.ndarray:
    outs = []
    with torch.no_grad():
        for x in inputs:
            logits = torch.nn.functional.interpolate(fn(x), size=size, mode="bilinear", align_corners=False)
            outs.append(logits.argmax(1)[0].numpy())
    return np.stack(outs)


def _miou(pred: np.ndarray, masks: np.ndarray, k: int) -> float:
    from segformer_edge.evaluate import ConfusionMatrix

    cm = ConfusionMatrix(k)
    cm.update(pred, masks)
    return float(cm.metrics()["miou"])


def quantize_groups(model: Any, calib: CalibrationSet, groups: list[str] | None, float_groups: list[str] = ()) -> torch.nn.Module:  # type: ignore[assignment]
    """The torch-side int8 model with only ``groups`` quantized (all when None) and ``float_groups`` kept float."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    from segformer_edge.converters.base import ExportOptions
    from segformer_edge.converters.graph import DecomposedLayerNorm, EdgeModule, decompose_layer_norms, fold_batch_norm

    from .recipes import keep_float, pt2e_quantize, with_activation_observer

    module = decompose_layer_norms(EdgeModule(fold_batch_norm(model), ExportOptions(size=calib.size))).eval()
    config = with_activation_observer(get_symmetric_quantization_config(is_per_channel=True), calib.method)
    quantizer = XNNPACKQuantizer()
    if groups is None:
        quantizer.set_global(config)
    else:
        for group in groups:
            for name in LAYER_GROUPS[group]:
                quantizer.set_module_name(name, config)
    keep_float(quantizer, [name for group in float_groups for name in LAYER_GROUPS[group]])
    quantizer.set_module_type(DecomposedLayerNorm, None)
    calib_images, _, _ = _split(calib)
    inputs = _inputs(calib_images, list(model.meta.mean), list(model.meta.std))
    return pt2e_quantize(module, inputs[0], quantizer, inputs)


def analyse(model: Any, calib: CalibrationSet, progress: Callable[[int], None] | None = None) -> SensitivityReport:
    """Quantize one layer group at a time; rank the groups by the mIoU they cost on held-out images."""
    _, held_images, held_masks = _split(calib)
    inputs = _inputs(held_images, list(model.meta.mean), list(model.meta.std))
    k = model.config.num_classes
    float_pred = _predict(model.eval(), inputs, calib.size)
    miou_float = _miou(float_pred, held_masks, k)
    rows = []
    for group in LAYER_GROUPS:
        quantized = quantize_groups(model, calib, [group])
        pred = _predict(quantized, inputs, calib.size)
        rows.append({
            "group": group,
            "miou_drop_points": 100 * (miou_float - _miou(pred, held_masks, k)),
            "pixel_agreement": float((pred == float_pred).mean()),
        })  # fmt: skip
        if progress is not None:
            progress(1)
    rows.sort(key=lambda r: (-r["miou_drop_points"], r["pixel_agreement"]))
    return SensitivityReport(rows, miou_float, len(held_images))


def budget_policy(model: Any, calib: CalibrationSet, budget_points: float, report: SensitivityReport | None = None) -> dict[str, Any]:
    """Keep the most sensitive groups in float until the full int8 model's mIoU drop is within the budget."""
    report = report or analyse(model, calib)
    _, held_images, held_masks = _split(calib)
    inputs = _inputs(held_images, list(model.meta.mean), list(model.meta.std))
    k = model.config.num_classes
    float_groups: list[str] = []
    steps = []
    for candidate in [None, *report.ranked()]:
        if candidate is not None:
            float_groups.append(candidate)
        if len(float_groups) == len(LAYER_GROUPS):
            break
        quantized = quantize_groups(model, calib, None, float_groups)
        drop = 100 * (report.miou_float - _miou(_predict(quantized, inputs, calib.size), held_masks, k))
        steps.append({"float_groups": list(float_groups), "miou_drop_points": drop})
        if drop <= budget_points:
            break
    return {
        "budget_points": budget_points,
        "float_groups": float_groups,
        "float_modules": [name for g in float_groups for name in LAYER_GROUPS[g]],
        "steps": steps,
        "measured_on": f"{report.held_out} held-out calibration images",
    }


def write_report(report: SensitivityReport, folder: Path) -> None:
    """sensitivity.json, sensitivity.md and sensitivity.png (bar chart) in ``folder``."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segformer_edge.io import atomic_path, atomic_write_text

    atomic_write_text(folder / "sensitivity.json", json.dumps({"miou_float": report.miou_float, "held_out": report.held_out,
                                                                 "groups": report.rows}, indent=2) + "\n")  # fmt: skip
    lines = ["| rank | layer group | mIoU drop (points) | pixel agreement |", "|---|---|---|---|"]
    lines += [f"| {i + 1} | {r['group']} | {r['miou_drop_points']:.3f} | {100 * r['pixel_agreement']:.2f}% |" for i, r in enumerate(report.rows)]
    atomic_write_text(folder / "sensitivity.md", "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([r["group"] for r in report.rows], [r["miou_drop_points"] for r in report.rows])
    ax.set_ylabel("mIoU drop (points), group alone int8")
    ax.set_title(f"INT8 sensitivity ({report.held_out} held-out images)")
    fig.tight_layout()
    with atomic_path(folder / "sensitivity.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
