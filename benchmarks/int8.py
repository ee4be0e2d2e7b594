"""INT8 accuracy of every target, with and without activation-outlier handling, on two models.

The reference model (the built-in SegFormer-B0 at its training size), and an outlier-stressed copy that
this script builds itself: the same float function, but three LayerNorm output channels of every
LayerNorm site carry activations 30, 60 and 120 times larger than before (the following layers' weights
compensate), as pretrained transformers do. Every target is exported at INT8 with each outlier mode
(default QuantSpec otherwise: `auto` activation method, per-channel weights), calibrated on one
class-covering set of 32 training images, then verified on the synthetic val split. Writes
benchmarks/int8.json, then benchmarks/INT8.md from that JSON.

    python benchmarks/int8.py [--images 300]        # measure, then write the JSON and the Markdown
    python benchmarks/int8.py --resume              # after an interruption: measure only the missing rows
    python benchmarks/int8.py --markdown-only       # rewrite INT8.md from int8.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
TARGETS = ("executorch", "tflite", "coreml", "onnx")
FACTORS = (120.0, 60.0, 30.0)  # the stressed copy's outliers, on three channels of every LayerNorm site
# Outlier modes per model: none and auto for both; the reference model also with each rewrite forced, to show
# what auto measured and left out.
MODES = {"reference": ("none", "auto", "smoothquant", "bias_correction"), "outlier-stressed": ("none", "auto")}

logger = logging.getLogger("benchmarks.int8")


def measure(images: int, out: Path, targets: tuple[str, ...], done: list[dict[str, Any]],
            save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:  # fmt: skip
    """Export and verify every target x outlier mode on both models; the rows and what they were measured on.

    Rows in ``done`` (from an interrupted run at the same settings) are kept, not measured again; ``save``
    gets the data after every row."""
    import torch
    from segformer_edge.calibration.calibset import select_calibration_set
    from segformer_edge.calibration.outliers import inject_outliers
    from segformer_edge.calibration.spec import QuantSpec
    from segformer_edge.converters.base import ExportOptions, tool_versions
    from segformer_edge.converters.pipeline import checkpoint_digest, export_artifact, verify_artifact

    from segformer_edge.weights import builtin_checkpoint, load_pretrained

    ckpt = builtin_checkpoint()
    reference = load_pretrained(ckpt)
    size = tuple(reference.meta.input_size)
    calib = select_calibration_set("synthetic", 32, size, reference.config.num_classes, checkpoint_sha256=checkpoint_digest(ckpt))
    stressed = inject_outliers(reference, FACTORS)
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))  # (2, 3, H, W)
    with torch.no_grad():
        preserved = float((stressed(x) - reference(x)).abs().max())
    logger.info("outlier-stressed copy: max |logit difference| from the reference model %.2e", preserved)
    data: dict[str, Any] = {
        "date": str(datetime.date.today()), "images": images, "size": list(size), "factors": list(FACTORS),
        "calibration": calib.reference(), "stressed_max_logit_difference": preserved, "rows": list(done),
        "versions": tool_versions("executorch", "litert-torch", "coremltools", "onnxruntime"),
    }  # fmt: skip
    rows = data["rows"]
    measured = {(r["model"], r["target"], r["outliers"]) for r in done}
    for label, model in (("reference", reference), ("outlier-stressed", stressed)):
        for target in targets:
            for mode in MODES[label]:
                if (label, target, mode) in measured:
                    continue
                folder = out / label / mode
                art, _ = export_artifact(model, target, ExportOptions(size=size, precision="int8"), folder,
                                         checkpoint=ckpt if model is reference else None,
                                         quant=QuantSpec(calibration=calib, outliers=mode), verify=False)  # fmt: skip
                r = verify_artifact(art.folder, model=model, num_images=images)
                record = art.manifest["quantization"]["applied"].get("outliers", {})
                rows.append({
                    "model": label, "target": target, "outliers": mode, "applied": record.get("applied", []),
                    "alpha": (record.get("smoothquant") or {}).get("alpha") if "smoothquant" in record.get("applied", []) else None,
                    "simulated_error_before": record.get("error_before"), "simulated_error_after": record.get("error_after"),
                    "method": art.manifest["quantization"]["method"], "executor": r["executor"],
                    "miou_float": r["miou_float"], "miou_artifact": r["miou_artifact"], "miou_drop_points": r["miou_drop_points"],
                    "pixel_agreement": r["pixel_agreement"], "size_mb": art.manifest["size_bytes"] / 1e6, "passed": r["passed"],
                })  # fmt: skip
                logger.info("%s", json.dumps(rows[-1]))
                save(data)
    order = {(m, t, o): i for i, (m, t, o) in enumerate((m, t, o) for m in MODES for t in targets for o in MODES[m])}
    rows.sort(key=lambda r: order.get((r["model"], r["target"], r["outliers"]), len(order)))
    return data


def _applied(r: dict[str, Any]) -> str:
    parts = [f"smoothquant a={r['alpha']:g}" if name == "smoothquant" else name.replace("_", " ") for name in r["applied"]]
    return " + ".join(parts) or "nothing"


def _error(r: dict[str, Any]) -> str:
    before, after = r.get("simulated_error_before"), r.get("simulated_error_after")
    return "-" if before is None else f"{before:.2e} -> {after:.2e}"


def markdown(data: dict[str, Any]) -> str:
    """INT8.md from the JSON that :func:`measure` wrote."""
    h, w = data["size"]
    factors = ", ".join(f"x{f:g}" for f in sorted(data["factors"]))
    lines = [
        "# INT8: every target, with and without activation-outlier handling",
        "",
        f"Measured {data['date']} by `python benchmarks/int8.py --images {data['images']}`: the SegFormer-B0 reference model",
        f"at its training size {h}x{w}, and an outlier-stressed copy the script builds from it (same float function,",
        f"max logit difference {data['stressed_max_logit_difference']:.1e}; {factors} on three LayerNorm output channels of every",
        "LayerNorm site, the following layers' weights compensating). Each artifact is the default INT8 export",
        "(`mse` activation observers, ONNX Runtime's entropy calibration; per-channel int8 weights) with the outlier",
        f"mode of its row, calibrated on {data['calibration']['images']} class-covering training images and verified on",
        f"the synthetic val split ({data['images']} images) against its float model. Core ML figures come from the",
        "numpy reference executor of the saved ML program (no macOS here).",
        "",
        "`outliers` is the QuantSpec mode (`export --outliers`); `applied` is what the export did, and the simulated",
        "error is what the choice was measured by (noise-to-signal ratio of the logits in simulated W8A8 on 8",
        "calibration images, before and after). `auto` applies a rewrite only where it lowers that error by 20% or more.",
        "",
    ]
    for model in ("reference", "outlier-stressed"):
        rows = [r for r in data["rows"] if r["model"] == model]
        if not rows:
            continue
        lines += [
            f"## {'Reference model' if model == 'reference' else 'Outlier-stressed copy'}",
            "",
            "| target | outliers | applied | simulated error | mIoU float | mIoU int8 | drop (points) | pixel agreement | size MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['target']} | {r['outliers']} | {_applied(r)} | {_error(r)} | {100 * r['miou_float']:.2f} | "
                f"{100 * r['miou_artifact']:.2f} | {r['miou_drop_points']:.2f} | {100 * r['pixel_agreement']:.2f}% | {r['size_mb']:.2f} |"
            )
        lines.append("")
    lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="val images to verify on")
    parser.add_argument("--out", type=Path, default=Path("exports/int8-bench"))
    parser.add_argument("--targets", nargs="+", default=list(TARGETS))
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the Markdown from the JSON")
    parser.add_argument("--json", type=Path, default=HERE / "int8.json")
    parser.add_argument("--markdown", type=Path, default=HERE / "INT8.md")
    parser.add_argument("--resume", action="store_true", help="keep the rows the JSON already has (same --images)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not args.markdown_only:
        done: list[dict[str, Any]] = []
        if args.resume and args.json.is_file():
            previous = json.loads(args.json.read_text())
            done = previous["rows"] if previous.get("images") == args.images else []
        save = lambda data: args.json.write_text(json.dumps(data, indent=2) + "\n")  # noqa: E731
        save(measure(args.images, args.out, tuple(args.targets), done, save))
    data = json.loads(args.json.read_text())
    args.markdown.write_text(markdown(data))


if __name__ == "__main__":
    main()
