"""The numerics debugger: where an artifact leaves the float model, and pictures of where it disagrees.

``layer_report`` rebuilds the artifact with the same recipe (target, precision, graph edges, the target's
own options, the quantization spec and the same calibration set) as a debug graph whose extra outputs are
the four encoder stage maps and the fused decoder feature (the taps), runs it in the target's own runtime,
and compares every tap with the float model's: SQNR in dB, cosine, max |diff| and the fraction of NaN/inf.
The first tap whose SQNR falls below the threshold is where the artifact leaves the float model.

``write_visual_report`` writes, per image, the input, the float mask, the artifact mask and the
disagreement map as PNGs, worst images first, with ``report.md`` and ``report.json``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from segformer_edge.errors import ExportError

from . import get_target
from .base import TAPS, ExportOptions, read_manifest

__all__ = ["SQNR_THRESHOLDS_DB", "layer_report", "tap_metrics", "write_visual_report"]

logger = logging.getLogger(__name__)

# Below this SQNR a tap "leaves" the float model. fp32 runtimes agree to ~100 dB; fp16 to ~40-60 dB;
# per-tensor int8 to ~15-30 dB on this model.
SQNR_THRESHOLDS_DB = {"fp32": 40.0, "fp16": 20.0, "int8": 8.0}


def tap_metrics(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """SQNR (dB), cosine, max |diff| and NaN/inf fraction of ``out`` against the float ``ref`` (same shape)."""
    ref64 = ref.astype(np.float64).ravel()
    out64 = out.astype(np.float64).ravel()
    finite = np.isfinite(out64)
    bad = float(1.0 - finite.mean())
    if not finite.all():
        return {"sqnr_db": float("-inf"), "cosine": float("nan"), "max_abs_diff": float("inf"), "nonfinite_fraction": bad}
    noise = float(((ref64 - out64) ** 2).sum())
    signal = float((ref64**2).sum())
    sqnr = float("inf") if noise == 0 else 10.0 * float(np.log10(max(signal, 1e-30) / noise))
    cosine = float(ref64 @ out64 / max(np.linalg.norm(ref64) * np.linalg.norm(out64), 1e-30))
    return {"sqnr_db": sqnr, "cosine": cosine, "max_abs_diff": float(np.abs(ref64 - out64).max()), "nonfinite_fraction": bad}


def _options_of(manifest: dict[str, Any]) -> ExportOptions:
    """The export options an artifact was made with, read back from its manifest."""
    spec = manifest["input"]
    return ExportOptions(
        precision=manifest["precision"], size=tuple(spec["size"]), input_kind="uint8" if spec.get("image") else spec["kind"],
        output=manifest["output"]["kind"], mask_size=manifest["output"].get("size", "full"), layout=spec["layout"], dynamic=bool(spec.get("dynamic_hw")),
        image_input=bool(spec.get("image")), target_options=dict(manifest.get("target_options") or {}), taps=True,
        decoder=(manifest.get("decoder") or {}).get("form", "as-trained"),  # manifests before the record: as trained
    )  # fmt: skip


def _quant_of(manifest: dict[str, Any], model: Any, calibration: Path | None) -> Any:
    """The artifact's QuantSpec with its calibration set: the folder given, or the same set picked again
    (its sha256 must match the manifest's, or the debug graph would not be the artifact's recipe)."""
    q = manifest.get("quantization")
    if not q:
        return None
    from segformer_edge.calibration.calibset import CalibrationSet, select_calibration_set
    from segformer_edge.calibration.spec import QuantSpec

    from .reference import float_labeler

    ref = q["calibration"] or {}
    size = tuple(manifest["input"]["size"])
    if calibration is not None:
        calib = CalibrationSet.load(calibration)
    elif "seed" in ref:
        calib = select_calibration_set(ref["data"], int(ref["images"]), size, model.config.num_classes, seed=int(ref["seed"]),  # type: ignore[arg-type]
                                       method=ref["method"], checkpoint_sha256=ref.get("checkpoint_sha256"),
                                       class_names=list(model.meta.class_names), labeler=float_labeler(model, size))  # type: ignore[arg-type]  # fmt: skip
    else:
        raise ExportError("this artifact's manifest does not say how its calibration set was picked; pass --calibration DIR")
    if ref.get("sha256") and calib.sha256 != ref["sha256"]:
        raise ExportError(
            f"the calibration set picked again from {ref.get('data')} differs from the one the artifact was made with; "
            "pass --calibration DIR (the folder from segformer-edge calibrate)"
        )
    return QuantSpec(scheme=q["scheme"], method=q["method"], weights=q["weights"], float_groups=tuple(q["float_groups"]),
                     outliers=q.get("outliers", "none"), calibration=calib)  # fmt: skip


def float_taps(model: Any, spec: Any, images: np.ndarray) -> list[np.ndarray]:
    """The float model's main output (logits) and taps for uint8 images, in :data:`TAPS` order after it."""
    import torch

    from .graph import EdgeModule

    module = EdgeModule(model, spec.float_spec, "logits", taps=True).eval()
    with torch.no_grad():
        return [t.numpy() for t in module(torch.from_numpy(spec.float_spec(images)))]


def layer_report(
    artifact_path: str | Path,
    model: Any,
    *,
    checkpoint: Path | None = None,
    data: str | None = None,
    num_images: int = 4,
    calibration: Path | None = None,
    threshold_db: float | None = None,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Per-tap SQNR, cosine, max |diff| and NaN/inf of the artifact's recipe against the float model.

    Returns ``taps`` (network order: stage1..stage4, fused, then the output), ``first_divergent`` (the first
    tap below ``threshold_db``, or None) and ``conclusion`` (one sentence on what follows from it).
    """
    from .build import build_artifact, plan_export, shared_provenance
    from .reference import open_verify_data

    artifact = read_manifest(artifact_path)
    manifest = artifact.manifest
    target = get_target(manifest["target"])
    if "taps" not in target.features:
        raise ExportError(f"{target.name}: this target cannot export a debug graph with extra outputs (verify --layers)")
    if not target.runs_here():
        raise ExportError(f"{target.name}: the debug graph cannot run here ({target.not_here})")
    options = _options_of(manifest)
    quant = _quant_of(manifest, model, calibration)
    threshold = SQNR_THRESHOLDS_DB[options.precision] if threshold_db is None else threshold_db
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = Path(tmp) / "debug"
        folder.mkdir()
        with shared_provenance():
            debug = build_artifact(model.eval(), plan_export(model, target.name, options, tmp, quant), folder, checkpoint)
        debug.write_manifest()
        runner = target.load(debug)
        source, _, _ = open_verify_data(data, model)
        spec = debug.input_spec
        n = min(num_images, len(source))
        names = [*TAPS, options.output]
        sums: dict[str, dict[str, float]] = {name: {"signal": 0.0, "noise": 0.0, "dot": 0.0, "na": 0.0, "nb": 0.0,
                                                    "max": 0.0, "bad": 0.0, "count": 0.0} for name in names}  # fmt: skip
        agree = total = 0
        for i in range(n):
            image, _ = spec.resize(source.load(i)[0])
            ref_main, *ref_taps = float_taps(model, spec, image[None])
            out_main, *out_taps = runner.run(spec(image[None]))
            pairs = list(zip(TAPS, ref_taps, out_taps))
            if options.output != "mask":
                from .reference import softmax

                ref_out = softmax(ref_main) if options.output == "probs" else ref_main
                pairs.append((options.output, ref_out, np.asarray(out_main, np.float32).reshape(ref_main.shape)))
            else:
                from .reference import upsampled_argmax

                quarter = options.mask_size == "quarter"
                ref_mask = ref_main.argmax(1) if quarter else upsampled_argmax(ref_main, spec.size)
                agree += int((np.asarray(out_main).reshape(ref_mask.shape) == ref_mask).sum())
                total += ref_mask.size
            for name, ref, out in pairs:
                _accumulate(sums[name], ref.astype(np.float64), np.asarray(out, np.float64).reshape(ref.shape))
    taps = []
    for name in names:
        s = sums[name]
        if name == "mask":
            taps.append({"tap": name, "pixel_agreement": agree / max(total, 1)})
            continue
        taps.append({"tap": name, **_finish(s)})
    first = next((t["tap"] for t in taps if "sqnr_db" in t and t["sqnr_db"] < threshold), None)
    return {"target": target.name, "precision": options.precision, "images": n, "threshold_db": threshold,
            "taps": taps, "first_divergent": first, "conclusion": _conclusion(first, taps, options.precision)}  # fmt: skip


def _accumulate(s: dict[str, float], ref: np.ndarray, out: np.ndarray) -> None:
    finite = np.isfinite(out)
    s["bad"] += float((~finite).sum())
    s["count"] += float(out.size)
    out = np.where(finite, out, 0.0)
    s["signal"] += float((ref**2).sum())
    s["noise"] += float(((ref - out) ** 2).sum())
    s["dot"] += float((ref * out).sum())
    s["na"] += float((ref**2).sum())
    s["nb"] += float((out**2).sum())
    s["max"] = max(s["max"], float(np.abs(ref - out).max()))


def _finish(s: dict[str, float]) -> dict[str, float]:
    bad = s["bad"] / max(s["count"], 1.0)
    if bad > 0:
        return {"sqnr_db": float("-inf"), "cosine": float("nan"), "max_abs_diff": float("inf"), "nonfinite_fraction": bad}
    sqnr = float("inf") if s["noise"] == 0 else 10.0 * float(np.log10(max(s["signal"], 1e-30) / s["noise"]))
    cosine = s["dot"] / max(float(np.sqrt(s["na"] * s["nb"])), 1e-30)
    return {"sqnr_db": sqnr, "cosine": cosine, "max_abs_diff": s["max"], "nonfinite_fraction": 0.0}


def _conclusion(first: str | None, taps: list[dict[str, Any]], precision: str) -> str:
    if first is None:
        return "every tap stays above the threshold: the artifact follows the float model through the network"
    tap = next(t for t in taps if t["tap"] == first)
    where = {"fused": "the decoder's fuse (the stage projections, their upsampling and fuse, ReLU)",
             "logits": "the classifier"}.get(first, f"encoder {first.replace('stage', 'stage ')}")  # fmt: skip
    if tap["nonfinite_fraction"] > 0:
        cause = "NaN or inf appear there" + (" (fp16 overflow is the usual cause: keep that part in fp32)" if precision == "fp16" else "")
    elif precision == "int8":
        cause = "its quantization error is the largest: keep it in float (--budget) or try another --method"
    else:
        cause = "the runtime computes something else there: compare that part's ops in the manifest's delegation block"
    return f"the artifact leaves the float model in {where}: {cause}; the taps after it inherit the error"


def write_visual_report(folder: Path, items: list[dict[str, Any]], report: dict[str, Any], palette: list[list[int]],
                        layers: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """Per image PNGs (input, float mask, artifact mask, disagreement), worst first; report.md and report.json.

    ``items``: dicts with ``name``, ``image`` (H, W, 3) uint8, ``float_mask`` and ``artifact_mask`` (H, W),
    ``agreement`` and ``per_class_iou`` (against the float mask).
    """
    from PIL import Image

    from segformer_edge.io import atomic_path, atomic_write_text
    from segformer_edge.predict import colorize, disagreement_image

    folder.mkdir(parents=True, exist_ok=True)
    colours = [tuple(c) for c in palette]
    rows = []
    ordered = sorted(items, key=lambda it: it["agreement"])
    for rank, item in enumerate(ordered, 1):
        stem = f"{rank:03d}_{Path(item['name']).stem}"
        disagreement = disagreement_image(item["image"], item["float_mask"], item["artifact_mask"])
        pictures = {"input": item["image"], "float": colorize(item["float_mask"].astype(np.uint8), colours),
                    "artifact": colorize(item["artifact_mask"].astype(np.uint8), colours), "diff": disagreement}  # fmt: skip
        for kind, array in pictures.items():
            with atomic_path(folder / f"{stem}_{kind}.png") as tmp:
                Image.fromarray(array).save(tmp, format="PNG")
        worst = sorted((iou, name) for name, iou in item["per_class_iou"].items() if iou is not None)[:3]
        rows.append({"rank": rank, "name": item["name"], "stem": stem, "agreement": item["agreement"],
                     "worst_classes": [{"class": n, "iou": v} for v, n in worst]})  # fmt: skip
    summary = {key: report.get(key) for key in ("target", "precision", "executor", "images", "pixel_agreement", "agreement_miou",
                                                "max_abs_diff", "nonfinite", "miou_drop_points", "estimated_miou_drop_points",
                                                "estimated_miou_drop_stderr", "passed", "failure", "data")}  # fmt: skip
    if summary["miou_drop_points"] is not None:
        drop_line = f"| mIoU drop against the labels (points) | {summary['miou_drop_points']:.3f} |"
    else:
        err = summary["estimated_miou_drop_stderr"]
        drop_line = (f"| estimated mIoU drop, no labels (points) | {_fmt(summary['estimated_miou_drop_points'])}"
                     + ("" if err is None else f" ± {err:.2g}") + " |")  # fmt: skip
    payload = {"summary": summary, "images": rows, **({"layers": layers} if layers else {})}
    atomic_write_text(folder / "report.json", json.dumps(payload, indent=2, default=float) + "\n")
    lines = [f"# {summary['target']} {summary['precision']} against the float model", "",
             f"{summary['images']} images of {summary['data']['spec']} ({summary['data']['usage']}); executor {summary['executor']}.", "",
             "| figure | value |", "|---|---|",
             f"| pixel agreement | {100 * summary['pixel_agreement']:.3f}% |",
             f"| agreement mIoU | {100 * summary['agreement_miou']:.2f} |",
             f"| max abs diff | {_fmt(summary['max_abs_diff'])} |",
             f"| NaN/inf values | {summary['nonfinite']} |",
             drop_line,
             f"| passed | {summary['passed']} |", ""]  # fmt: skip
    if layers:
        lines += ["## Where it leaves the float model", "", f"Threshold {layers['threshold_db']} dB SQNR. "
                  f"First divergent tap: **{layers['first_divergent'] or 'none'}**: {layers['conclusion']}.", "",
                  "| tap | SQNR dB | cosine | max abs diff | NaN/inf |", "|---|---|---|---|---|"]  # fmt: skip
        for t in layers["taps"]:
            if "sqnr_db" in t:
                lines.append(f"| {t['tap']} | {_fmt(t['sqnr_db'])} | {_fmt(t['cosine'])} | {_fmt(t['max_abs_diff'])} | "
                             f"{100 * t['nonfinite_fraction']:.2f}% |")  # fmt: skip
        lines.append("")
    lines += ["## Images, worst first", "", "| rank | image | agreement | worst classes (IoU vs float) |", "|---|---|---|---|"]
    for r in rows:
        worst = ", ".join(f"{w['class']} {100 * w['iou']:.1f}" for w in r["worst_classes"])
        lines.append(f"| {r['rank']} | {r['name']} | {100 * r['agreement']:.2f}% | {worst} |")
    lines.append("")
    for r in rows:
        lines += [f"### {r['rank']}. {r['name']} ({100 * r['agreement']:.2f}%)", "",
                  "| input | float | artifact | disagreement |", "|---|---|---|---|",
                  "| " + " | ".join(f"![{k}]({r['stem']}_{k}.png)" for k in ("input", "float", "artifact", "diff")) + " |", ""]  # fmt: skip
    atomic_write_text(folder / "report.md", "\n".join(lines))
    return folder


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    if value != value:
        return "nan"
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"

