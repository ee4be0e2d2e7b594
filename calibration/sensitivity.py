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
Logits = Callable[[np.ndarray], np.ndarray]  # uint8 images (N, H, W, 3) -> the float model's logits (N, K, H/4, W/4)
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
    # "miou_drop_points" against the calibration set's labels, or "estimated_miou_drop_points" where its masks are the
    # float model's own predictions (photos without labels: see segformer_edge.evaluate.ExpectedDrop)
    drop_key: str = "miou_drop_points"

    @property
    def recovered_key(self) -> str:
        return self.drop_key.replace("_drop_", "_recovered_")

    @property
    def drop_name(self) -> str:
        return "mIoU drop" if self.drop_key == "miou_drop_points" else "estimated mIoU drop (no labels)"

    def ranked(self) -> list[str]:
        return [r["unit"] for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        """What sensitivity.json holds."""
        return {"target": self.target, "method": self.method, "granularity": self.granularity, "miou_float": self.miou_float,
                "held_out": self.held_out, "all_int8": self.all_int8, "drop": self.drop_key, "units": self.rows}  # fmt: skip


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


class _Scorer:
    """How much a quantized model's masks lose on the held-out images: the mIoU drop against the set's labels, or,
    where its masks are the float model's own predictions, the drop estimated without labels (the float model's
    softmax as the posterior; a drop against its own masks would count every near-tie flip as an error)."""

    def __init__(self, calib: CalibrationSet, images: np.ndarray, masks: np.ndarray, float_pred: np.ndarray, k: int,
                 float_logits: Logits | None, miou_float: float | None = None) -> None:  # fmt: skip
        self.labels = calib.masks_from == "labels"
        if not self.labels and float_logits is None:
            raise ValueError("these calibration masks are the float model's predictions: measuring without labels needs its logits")
        self.key = "miou_drop_points" if self.labels else "estimated_miou_drop_points"
        self.masks, self.k, self.float_pred = masks, k, float_pred
        self.miou_float = _miou(float_pred, masks, k) if miou_float is None else miou_float
        self.logits = None if self.labels else float_logits(images)  # type: ignore[misc]  # (N, K, H/4, W/4)

    def drop(self, pred: np.ndarray) -> float:
        if self.labels:
            return 100 * (self.miou_float - _miou(pred, self.masks, self.k))
        import torch

        from segformer_edge.evaluate import ExpectedDrop

        estimate = ExpectedDrop(self.k)
        size = tuple(pred.shape[1:])
        for i in range(len(pred)):
            logits = torch.nn.functional.interpolate(torch.from_numpy(self.logits[i : i + 1]), size=size, mode="bilinear",
                                                     align_corners=False)  # (1, K, H, W)  # fmt: skip
            estimate.update(logits, self.float_pred[i : i + 1], pred[i : i + 1], np.zeros((1, *size), bool))
        return float(estimate.figures()["estimated_miou_drop_points"])


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
    float_logits: Logits | None = None,
) -> SensitivityReport:
    """Rank with ``target``'s quantizer. Without ``layers``: one layer group at a time quantized, the rest
    float, ranked by the mIoU each costs. With ``layers`` (see :func:`quantizable_layers`): everything
    quantized but one layer at a time, ranked by the mIoU that keeping it float gives back."""
    part, images, masks = held_out(calib)
    quant = quant.with_(calibration=part)
    scorer = _Scorer(calib, images, masks, float_predict(images), num_classes, float_logits)
    key = scorer.key

    def row(name: str, spec: QuantSpec) -> dict[str, Any]:
        pred = make_predictor(spec)(images)
        if progress is not None:
            progress(1)
        return {"unit": name, key: scorer.drop(pred), "pixel_agreement": float((pred == scorer.float_pred).mean())}

    if layers is None:
        rows = [row(group, quant.only([group])) for group in LAYER_GROUPS]
        rows.sort(key=lambda r: (-r[key], r["pixel_agreement"]))
        return SensitivityReport(rows, scorer.miou_float, len(images), target, quant.method, drop_key=key)
    everything = row("(none: all int8)", quant.with_(float_groups=()))
    rows = [row(layer, quant.with_(float_groups=(layer,))) for layer in layers]
    recovered = key.replace("_drop_", "_recovered_")
    for r in rows:
        r[recovered] = everything[key] - r[key]
    rows.sort(key=lambda r: (-r[recovered], -r["pixel_agreement"]))
    return SensitivityReport(rows, scorer.miou_float, len(images), target, quant.method, granularity="layer", all_int8=everything,
                             drop_key=key)  # fmt: skip


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
    float_logits: Logits | None = None,
) -> dict[str, Any]:
    """Keep the most sensitive groups (``report`` ranks them) in float until the whole int8 model's mIoU drop
    is within the budget. With ``split`` (``lambda entry: children(model, entry)``), then go down: split each
    float entry into its parts where the budget still holds without the entry's own ops in float, and
    quantize back every part whose return keeps the drop within the budget (in model order), down to single
    layers. Every measurement is a step in the record."""
    part, images, masks = held_out(calib)
    quant = quant.with_(calibration=part)
    # Without labels the set's masks are the float model's predictions: the reference and the float masks at once.
    scorer = _Scorer(calib, images, masks, masks, num_classes, float_logits, miou_float=report.miou_float)
    key = scorer.key
    steps: list[dict[str, Any]] = []
    seen: dict[tuple[str, ...], float] = {}

    def drop(entries: list[str], why: str) -> float:
        key = tuple(entries)
        if key not in seen:
            pred = make_predictor(quant.with_(float_groups=key))(images)
            seen[key] = scorer.drop(pred)
            steps.append({"float_groups": list(entries), scorer.key: seen[key], "step": why})
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
        key: final,
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
        drop = report.all_int8[report.drop_key]
        recovered = report.drop_name.replace("drop", "recovered")
        lines += [f"Every layer int8: {report.drop_name} {drop:.3f} points. Each row keeps one layer in float, the rest int8.", "",
                  f"| rank | layer | {recovered} (points) | {report.drop_name} (points) | pixel agreement |", "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {i + 1} | {r['unit']} | {r[report.recovered_key]:.3f} | {r[report.drop_key]:.3f} | "
                  f"{100 * r['pixel_agreement']:.2f}% |" for i, r in enumerate(report.rows)]  # fmt: skip
    else:
        lines += ["Each row quantizes one layer group, the rest float.", "",
                  f"| rank | layer group | {report.drop_name} (points) | pixel agreement |", "|---|---|---|---|"]
        lines += [f"| {i + 1} | {r['unit']} | {r[report.drop_key]:.3f} | {100 * r['pixel_agreement']:.2f}% |"
                  for i, r in enumerate(report.rows)]  # fmt: skip
    atomic_write_text(folder / "sensitivity.md", "\n".join(lines) + "\n")
    shown = report.rows[:20]
    fig, ax = plt.subplots(figsize=(max(7, 0.45 * len(shown)), 3.8 if layer else 3.5))
    key = report.recovered_key if layer else report.drop_key
    ax.bar(range(len(shown)), [r[key] for r in shown])
    ax.set_xticks(range(len(shown)), [r["unit"].removeprefix("encoder.") for r in shown], rotation=60 if layer else 0,
                  ha="right" if layer else "center", fontsize=7 if layer else 9)  # fmt: skip
    name = report.drop_name.split(" (")[0]
    ax.set_ylabel(f"{name.replace('drop', 'recovered')}, layer alone float" if layer else f"{name} (points), group alone int8")
    top = f"top {len(shown)} layers, " if layer else ""
    ax.set_title(f"INT8 sensitivity, {report.target} quantizer ({top}{report.held_out} held-out images)")
    fig.tight_layout()
    with atomic_path(folder / "sensitivity.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
