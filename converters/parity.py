"""Parity: an artifact against the float model on the same images, and the judge that passes or fails it.

:func:`verify_artifact` runs the artifact in its own runtime and the float model (:mod:`.reference`) on the same
images and measures how far apart they are; :func:`judge` holds the figures to the :class:`Thresholds` of the
precision the artifact computes in. :mod:`.pipeline` calls both before an artifact lands.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segformer_edge.errors import CheckpointError, DataError, SegformerEdgeError

from . import get_target
from .base import read_manifest
from .reference import (
    data_record,
    float_logits,
    load_reference,
    open_verify_data,
    quarter_up,
    reference_form,
    softmax,
    upsampled,
    upsampled_argmax,
)

__all__ = [
    "VERIFY_IMAGES",
    "DEFAULT_THRESHOLDS",
    "ParityFailed",
    "Thresholds",
    "default_thresholds",
    "judge",
    "verify_artifact",
]


# Images a parity check runs on by default: what the data has, up to this many (the estimate's spread shrinks with
# them; each costs one float and one artifact inference).
VERIFY_IMAGES = 32


@dataclass
class Thresholds:
    """Pass criteria of a parity check; ``None`` means not checked.

    ``miou_drop`` (mIoU points) holds the drop against the labels where the data has them, and otherwise the
    drop estimated without labels (:class:`ExpectedDrop`): the verdict asks what the labels would say.
    """

    max_abs_diff: float | None = None
    pixel_agreement: float | None = None
    miou_drop: float | None = None  # in mIoU points (percent)


# fp32 must compute what the float model computes; the reduced precisions are held to what they cost in accuracy.
# benchmarks/NO_LABEL_PARITY.md checks the no-label estimate of that cost against labels.
DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(max_abs_diff=1e-3, pixel_agreement=0.999),
    "fp16": Thresholds(miou_drop=0.5),
    "int8": Thresholds(miou_drop=1.0),
    # 4-bit weights (Core ML palettize4: 16 values per weight tensor) give up more than int8 by design.
    "int4": Thresholds(miou_drop=3.0),
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


def verify_artifact(
    path: str | Path,
    *,
    model: Any | None = None,
    checkpoint: str | Path | None = None,
    data: str | None = None,
    num_images: int = VERIFY_IMAGES,
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
    from segformer_edge.evaluate import ConfusionMatrix, ExpectedDrop

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
    expected = ExpectedDrop(k)
    for i in range(n):
        image, mask = source.load(i)
        image, mask = spec.resize(image, mask)
        images = image[None]  # (1, H, W, 3)
        ref = float_logits(model, spec, images)  # (1, K, H/4, W/4)
        logits = ref
        if kind == "probs":  # the artifact's output is the softmax: so is the reference
            ref = softmax(ref)  # (1, K, H/4, W/4)
        _count_nonfinite(ref, bad_values["float"])
        ref_finite = np.isfinite(ref)
        ref_safe = np.where(ref_finite, ref, 0.0)
        # A quarter-size mask is the float model's argmax at 1/4 resolution, shown at full size (nearest).
        up = upsampled(np.where(np.isfinite(logits), logits, 0.0), (h, w))  # (1, K, H, W) float logits at the input size
        ref_mask = quarter_up(ref_safe.argmax(1), (h, w)) if quarter else up.argmax(1).numpy() if kind != "probs" else upsampled_argmax(ref_safe, (h, w))  # (1, H, W)
        broken = _nonfinite_reach(ref, (h, w))  # pixels that a NaN or inf takes part in never agree
        out = np.asarray(runner(spec(images)))
        if kind == "mask":
            out_mask = out.reshape(ref.shape[:1] + ref.shape[2:] if quarter else ref_mask.shape).astype(np.int64)
            out_mask = quarter_up(out_mask, (h, w)) if quarter else out_mask  # (1, H, W)
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
        expected.update(up, ref_mask, out_mask, broken)
        del up
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
        "data": data_record(data or "synthetic", source, range(n), usage),
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
    # A drop in mIoU is measured against labels only; without them it is estimated (and named so).
    report["miou_drop_points"] = 100 * (report["miou_float"] - report["miou_artifact"]) if has_masks else None
    report.update(expected.figures(list(manifest.get("class_names") or []) or None))
    report["verdict_basis"] = "labels" if has_masks else "estimate"
    report["float_reference"] = reference_form(model)  # how the float logits were computed (decoder projected, checked)
    report = judge(report, thresholds or default_thresholds(manifest))
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


def judge(report: dict[str, Any], limits: Thresholds) -> dict[str, Any]:
    """Apply the thresholds; NaN or inf in either output fails on its own, named as such.

    The mIoU limit holds the drop against the labels where the data has them (check ``miou_drop``), else the drop
    estimated without labels (check ``estimated_miou_drop``): never the agreement mIoU, which is not a drop.
    """
    labels = report.get("miou_drop_points") is not None
    drop_check = "miou_drop" if labels else "estimated_miou_drop"
    drop = report["miou_drop_points"] if labels else report.get("estimated_miou_drop_points")
    checks: dict[str, bool] = {"finite": report["nonfinite"] == 0 and report["nonfinite_float"] == 0}
    if limits.max_abs_diff is not None and report["max_abs_diff"] is not None:
        checks["max_abs_diff"] = report["max_abs_diff"] <= limits.max_abs_diff
    if limits.pixel_agreement is not None:
        checks["pixel_agreement"] = report["pixel_agreement"] >= limits.pixel_agreement
    if limits.miou_drop is not None and drop is not None:
        checks[drop_check] = drop <= limits.miou_drop
    report["thresholds"] = {k: v for k, v in vars(limits).items() if v is not None}
    report["checks"] = checks
    report["passed"] = all(checks.values())
    failures = [name for name, ok in checks.items() if not ok]
    if "finite" in failures:
        report["failure"] = _nonfinite_failure(report)
    elif failures:
        report["failure"] = ", ".join(_failure_text(name, report) for name in failures)
    else:
        report["failure"] = None
    return report


def _failure_text(check: str, report: dict[str, Any]) -> str:
    """One failed check as the user reads it: 'estimated_miou_drop 6.82 points ± 0.41 (limit 1.0; no labels: ...)'."""
    limits = report["thresholds"]
    if check == "miou_drop":
        return f"miou_drop {report['miou_drop_points']:.4g} points against the labels (limit {limits['miou_drop']})"
    if check == "estimated_miou_drop":
        err = report.get("estimated_miou_drop_stderr")
        spread = f" ± {err:.2g}" if err is not None else ""
        return (f"estimated_miou_drop {report['estimated_miou_drop_points']:.4g} points{spread} (limit {limits['miou_drop']}; "
                f"no labels: estimated from the float model's confidence on {report['images']} images)")  # fmt: skip
    return f"{check} {report[check]:.4g} (limit {limits[check]})"
