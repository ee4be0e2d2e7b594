"""Sensitivity analysis and the mixed-precision policy, measured with the quantizer of one target.

Layer groups are the four encoder stages and the two parts of the decoder (:data:`.spec.LAYER_GROUPS`).
Each group is quantized alone and the result is compared with the float model on a held-out part of the
calibration set: the mIoU change against its masks (the dataset's, or the float model's own predictions
for photos without masks) and pixel agreement with the float model. ``budget_policy`` then keeps the most
sensitive groups in float until the drop of the whole quantized model is within the budget.

The quantizer is the caller's: ``make_predictor(spec)`` returns a function from uint8 images to labels for
the model quantized by one target with ``spec``. The report records which target that was, so a ranking
measured with one runtime's quantizer is never silently applied to another. This module imports no
converter (the dependency runs the other way).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .calibset import CalibrationSet
from .spec import LAYER_GROUPS, QuantSpec

__all__ = ["Predictor", "SensitivityReport", "analyse", "budget_policy", "write_report"]

logger = logging.getLogger(__name__)

Predictor = Callable[[np.ndarray], np.ndarray]  # uint8 images (N, H, W, 3) -> labels (N, H, W)


@dataclass
class SensitivityReport:
    """Per-group mIoU drop (points) and pixel agreement, most sensitive first."""

    rows: list[dict[str, Any]]
    miou_float: float
    held_out: int
    target: str
    method: str

    def ranked(self) -> list[str]:
        return [r["group"] for r in self.rows]


def held_out(calib: CalibrationSet) -> tuple[CalibrationSet, np.ndarray, np.ndarray]:
    """(the set the quantizer calibrates on, held-out images, their masks): the last quarter of the set (at
    least one image) is held out for measuring; the rest calibrates (all of it when the set has one image)."""
    from dataclasses import replace

    if calib.masks is None:
        raise ValueError("sensitivity analysis needs the calibration set's masks (recalibrate with segformer-edge calibrate)")
    n = len(calib.images)
    held = max(1, n // 4)
    part = replace(calib, images=calib.images[: n - held], masks=calib.masks[: n - held]) if n > held else calib
    return part, calib.images[n - held :], calib.masks[n - held :]


def _miou(pred: np.ndarray, masks: np.ndarray, k: int) -> float:
    from segformer_edge.evaluate import ConfusionMatrix

    cm = ConfusionMatrix(k)
    cm.update(pred, masks)
    return float(cm.metrics()["miou"])


def analyse(
    calib: CalibrationSet,
    quant: QuantSpec,
    make_predictor: Callable[[QuantSpec], Predictor],
    float_predict: Predictor,
    num_classes: int,
    *,
    target: str,
    progress: Callable[[int], None] | None = None,
) -> SensitivityReport:
    """Quantize one layer group at a time with ``target``'s quantizer; rank the groups by the mIoU they cost."""
    part, images, masks = held_out(calib)
    quant = quant.with_(calibration=part)
    float_pred = float_predict(images)
    miou_float = _miou(float_pred, masks, num_classes)
    rows = []
    for group in LAYER_GROUPS:
        pred = make_predictor(quant.only([group]))(images)
        rows.append({
            "group": group,
            "miou_drop_points": 100 * (miou_float - _miou(pred, masks, num_classes)),
            "pixel_agreement": float((pred == float_pred).mean()),
        })  # fmt: skip
        if progress is not None:
            progress(1)
    rows.sort(key=lambda r: (-r["miou_drop_points"], r["pixel_agreement"]))
    return SensitivityReport(rows, miou_float, len(images), target, quant.method)


def budget_policy(
    calib: CalibrationSet,
    quant: QuantSpec,
    make_predictor: Callable[[QuantSpec], Predictor],
    budget_points: float,
    report: SensitivityReport,
    num_classes: int,
) -> dict[str, Any]:
    """Keep the most sensitive groups in float until the whole int8 model's mIoU drop is within the budget."""
    part, images, masks = held_out(calib)
    quant = quant.with_(calibration=part)
    float_groups: list[str] = []
    steps = []
    for candidate in [None, *report.ranked()]:
        if candidate is not None:
            float_groups.append(candidate)
        if len(float_groups) == len(LAYER_GROUPS):
            break
        pred = make_predictor(quant.with_(float_groups=tuple(float_groups)))(images)
        drop = 100 * (report.miou_float - _miou(pred, masks, num_classes))
        steps.append({"float_groups": list(float_groups), "miou_drop_points": drop})
        if drop <= budget_points:
            break
    return {
        "budget_points": budget_points,
        "float_groups": float_groups,
        "steps": steps,
        "measured_with": f"{report.target} quantizer ({report.method}) on {report.held_out} held-out calibration images "
        f"(masks: {calib.masks_from})",
    }


def write_report(report: SensitivityReport, folder: Path) -> None:
    """sensitivity.json, sensitivity.md and sensitivity.png (bar chart) in ``folder``."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segformer_edge.io import atomic_path, atomic_write_text

    atomic_write_text(folder / "sensitivity.json", json.dumps({
        "target": report.target, "method": report.method, "miou_float": report.miou_float,
        "held_out": report.held_out, "groups": report.rows}, indent=2) + "\n")  # fmt: skip
    lines = [f"Measured with the {report.target} quantizer ({report.method}) on {report.held_out} held-out images.", "",
             "| rank | layer group | mIoU drop (points) | pixel agreement |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {i + 1} | {r['group']} | {r['miou_drop_points']:.3f} | {100 * r['pixel_agreement']:.2f}% |" for i, r in enumerate(report.rows)]
    atomic_write_text(folder / "sensitivity.md", "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([r["group"] for r in report.rows], [r["miou_drop_points"] for r in report.rows])
    ax.set_ylabel("mIoU drop (points), group alone int8")
    ax.set_title(f"INT8 sensitivity, {report.target} quantizer ({report.held_out} held-out images)")
    fig.tight_layout()
    with atomic_path(folder / "sensitivity.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
