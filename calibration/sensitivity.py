"""Sensitivity analysis and the mixed-precision policy, measured with the quantizer of one target.

Two granularities. ``group``: the four encoder stages and the two parts of the decoder
(:data:`.spec.LAYER_GROUPS`), each quantized alone. ``layer``: every Linear and Conv2d of the SegFormer
(``encoder.stages.1.blocks.0.attn.q``), each kept in float alone with the rest quantized, ranked by the
mIoU that keeping it float gives back. Both compare with the float model on a held-out part of the
calibration set: the mIoU change against its masks (the dataset's, or the float model's own predictions
for photos without masks) and pixel agreement with the float model.

``budget_policy`` keeps the most sensitive groups in float until the drop of the whole quantized model is
within the budget; at ``layer`` granularity it then splits each float group into its blocks and layers and
quantizes back every part the budget allows, so that the fewest layers stay float.

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
from .spec import LAYER_GROUPS, WRAPPER, QuantSpec, group_of

__all__ = ["GRANULARITIES", "Predictor", "SensitivityReport", "analyse", "budget_policy", "children", "quantizable_layers", "write_report"]

logger = logging.getLogger(__name__)

Predictor = Callable[[np.ndarray], np.ndarray]  # uint8 images (N, H, W, 3) -> labels (N, H, W)
GRANULARITIES = ("group", "layer")


def _is_layer(module: Any) -> bool:
    from torch import nn

    return isinstance(module, (nn.Linear, nn.Conv2d))


def quantizable_layers(model: Any) -> list[str]:
    """Every Linear and Conv2d of a SegFormer inside a layer group, by its path in the SegFormer, in order."""
    return [name for name, m in model.named_modules() if _is_layer(m) and group_of(WRAPPER + name) is not None]


def children(model: Any, entry: str) -> list[str]:
    """The parts a float-kept entry splits into: a group into its modules' parts, a stage into its patch
    embedding and blocks, a block into its attention and Mix-FFN, those into their layers; a single layer
    into nothing. A part that holds one layer is named by that layer; parts without a Linear or Conv2d (the
    LayerNorms) are left out: splitting an entry quantizes them, and :func:`budget_policy` measures that."""
    roots = [n.removeprefix(WRAPPER) for n in LAYER_GROUPS[entry]] if entry in LAYER_GROUPS else [entry]
    if entry in LAYER_GROUPS and len(roots) > 1:
        return [_single(model, r) for r in roots]
    out: list[str] = []

    def visit(prefix: str, module: Any) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}"
            if not any(_is_layer(m) for m in child.modules()):
                continue
            if type(child).__name__ in ("ModuleList", "Sequential"):
                visit(path, child)
            else:
                out.append(_single(model, path))

    visit(roots[0], model.get_submodule(roots[0]))
    return out


def _single(model: Any, path: str) -> str:
    """``path``, or the path of its only layer when it holds exactly one (``patch_embed`` -> ``patch_embed.proj``)."""
    layers = [n for n, m in model.get_submodule(path).named_modules() if _is_layer(m)]
    return f"{path}.{layers[0]}".rstrip(".") if len(layers) == 1 else path


@dataclass
class SensitivityReport:
    """Per group (or layer) mIoU drop (points) and pixel agreement, most sensitive first."""

    rows: list[dict[str, Any]]
    miou_float: float
    held_out: int
    target: str
    method: str
    granularity: str = "group"
    all_int8: dict[str, Any] | None = None  # layer granularity: the drop with nothing kept float

    def ranked(self) -> list[str]:
        return [r["unit"] for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        """What sensitivity.json holds."""
        return {"target": self.target, "method": self.method, "granularity": self.granularity, "miou_float": self.miou_float,
                "held_out": self.held_out, "all_int8": self.all_int8, "units": self.rows}  # fmt: skip


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
    layers: list[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> SensitivityReport:
    """Rank with ``target``'s quantizer. Without ``layers``: one layer group at a time quantized, the rest
    float, ranked by the mIoU each costs. With ``layers`` (see :func:`quantizable_layers`): everything
    quantized but one layer at a time, ranked by the mIoU that keeping it float gives back."""
    part, images, masks = held_out(calib)
    quant = quant.with_(calibration=part)
    float_pred = float_predict(images)
    miou_float = _miou(float_pred, masks, num_classes)

    def row(name: str, spec: QuantSpec) -> dict[str, Any]:
        pred = make_predictor(spec)(images)
        if progress is not None:
            progress(1)
        return {"unit": name, "miou_drop_points": 100 * (miou_float - _miou(pred, masks, num_classes)),
                "pixel_agreement": float((pred == float_pred).mean())}  # fmt: skip

    if layers is None:
        rows = [row(group, quant.only([group])) for group in LAYER_GROUPS]
        rows.sort(key=lambda r: (-r["miou_drop_points"], r["pixel_agreement"]))
        return SensitivityReport(rows, miou_float, len(images), target, quant.method)
    everything = row("(none: all int8)", quant.with_(float_groups=()))
    rows = [row(layer, quant.with_(float_groups=(layer,))) for layer in layers]
    for r in rows:
        r["miou_recovered_points"] = everything["miou_drop_points"] - r["miou_drop_points"]
    rows.sort(key=lambda r: (-r["miou_recovered_points"], -r["pixel_agreement"]))
    return SensitivityReport(rows, miou_float, len(images), target, quant.method, granularity="layer", all_int8=everything)


def budget_policy(
    calib: CalibrationSet,
    quant: QuantSpec,
    make_predictor: Callable[[QuantSpec], Predictor],
    budget_points: float,
    report: SensitivityReport,
    num_classes: int,
    *,
    split: Callable[[str], list[str]] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Keep the most sensitive groups (``report`` ranks them) in float until the whole int8 model's mIoU drop
    is within the budget. With ``split`` (``lambda entry: children(model, entry)``), then go down: split each
    float entry into its parts where the budget still holds without the entry's own ops in float, and
    quantize back every part whose return keeps the drop within the budget (in model order), down to single
    layers. Every measurement is a step in the record."""
    part, images, masks = held_out(calib)
    quant = quant.with_(calibration=part)
    steps: list[dict[str, Any]] = []
    seen: dict[tuple[str, ...], float] = {}

    def drop(entries: list[str], why: str) -> float:
        key = tuple(entries)
        if key not in seen:
            pred = make_predictor(quant.with_(float_groups=key))(images)
            seen[key] = 100 * (report.miou_float - _miou(pred, masks, num_classes))
            steps.append({"float_groups": list(entries), "miou_drop_points": seen[key], "step": why})
            if progress is not None:
                progress(1)
        return seen[key]

    float_groups: list[str] = []
    met = False
    for candidate in [None, *report.ranked()]:
        if candidate is not None:
            float_groups.append(candidate)
        if len(float_groups) == len(LAYER_GROUPS):
            break
        if drop(float_groups, "group" if candidate else "all int8") <= budget_points:
            met = True
            break
    if split is not None and met:
        queue = list(float_groups)
        while queue:
            entry = queue.pop(0)
            parts = split(entry)
            if not parts:
                continue
            trial = [e for e in float_groups if e != entry] + parts
            if drop(trial, f"split {entry}") > budget_points:
                continue  # the entry's own ops (attention matmuls, norms, residual adds) need float
            float_groups = trial
            for p in parts:
                fewer = [e for e in float_groups if e != p]
                if drop(fewer, f"quantize {p}") <= budget_points:
                    float_groups = fewer
                else:
                    queue.append(p)
    final = seen.get(tuple(float_groups))
    return {
        "budget_points": budget_points,
        "granularity": "layer" if split is not None else "group",
        "float_groups": float_groups,
        "miou_drop_points": final,
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

    layer = report.all_int8 is not None  # a layer-granularity report carries the all-int8 measurement
    atomic_write_text(folder / "sensitivity.json", json.dumps(report.to_dict(), indent=2) + "\n")
    lines = [f"Measured with the {report.target} quantizer ({report.method}) on {report.held_out} held-out images."]
    if report.all_int8 is not None:
        drop = report.all_int8["miou_drop_points"]
        lines += [f"Every layer int8: mIoU drop {drop:.3f} points. Each row keeps one layer in float, the rest int8.", "",
                  "| rank | layer | mIoU recovered (points) | mIoU drop (points) | pixel agreement |", "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {i + 1} | {r['unit']} | {r['miou_recovered_points']:.3f} | {r['miou_drop_points']:.3f} | "
                  f"{100 * r['pixel_agreement']:.2f}% |" for i, r in enumerate(report.rows)]  # fmt: skip
    else:
        lines += ["Each row quantizes one layer group, the rest float.", "",
                  "| rank | layer group | mIoU drop (points) | pixel agreement |", "|---|---|---|---|"]
        lines += [f"| {i + 1} | {r['unit']} | {r['miou_drop_points']:.3f} | {100 * r['pixel_agreement']:.2f}% |"
                  for i, r in enumerate(report.rows)]  # fmt: skip
    atomic_write_text(folder / "sensitivity.md", "\n".join(lines) + "\n")
    shown = report.rows[:20]
    fig, ax = plt.subplots(figsize=(max(7, 0.45 * len(shown)), 3.8 if layer else 3.5))
    key = "miou_recovered_points" if layer else "miou_drop_points"
    ax.bar(range(len(shown)), [r[key] for r in shown])
    ax.set_xticks(range(len(shown)), [r["unit"].removeprefix("encoder.") for r in shown], rotation=60 if layer else 0,
                  ha="right" if layer else "center", fontsize=7 if layer else 9)  # fmt: skip
    ax.set_ylabel("mIoU recovered, layer alone float" if layer else "mIoU drop (points), group alone int8")
    top = f"top {len(shown)} layers, " if layer else ""
    ax.set_title(f"INT8 sensitivity, {report.target} quantizer ({top}{report.held_out} held-out images)")
    fig.tight_layout()
    with atomic_path(folder / "sensitivity.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
