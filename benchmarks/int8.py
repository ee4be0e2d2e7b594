"""INT8 accuracy and size of the reference model for every target, at its training size.

For each target: the fp32 artifact, the INT8 artifact (default: every layer group quantized) and the INT8
artifact under a 0.3-point budget, all calibrated on one class-covering set of 32 training images, then
`verify` on the whole synthetic val split. Writes benchmarks/INT8.md and benchmarks/int8.json.

    python benchmarks/int8.py [--images 300]
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from segformer_edge.calibration.calibset import select_calibration_set
from segformer_edge.calibration.sensitivity import analyse, budget_policy
from segformer_edge.converters.base import ExportOptions, tool_versions
from segformer_edge.converters.pipeline import checkpoint_digest, export_artifact, verify_artifact

from segformer_edge.weights import builtin_checkpoint, load_pretrained

HERE = Path(__file__).parent
TARGETS = ("executorch", "tflite", "coreml", "onnx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("exports/int8-bench"))
    args = parser.parse_args()
    ckpt = builtin_checkpoint()
    model = load_pretrained(ckpt)
    size = model.meta.input_size
    calib = select_calibration_set("synthetic", 32, size, model.config.num_classes, checkpoint_sha256=checkpoint_digest(ckpt))
    report = analyse(model, calib)
    policy = budget_policy(model, calib, 0.3, report)
    rows = []
    for target in TARGETS:
        fp32, _ = export_artifact(model, target, ExportOptions(size=size), args.out, checkpoint=ckpt, verify=False)
        fp32_report = verify_artifact(fp32.folder, num_images=args.images)
        for label, floats in (("int8", []), ("int8 --budget 0.3", policy["float_modules"])):
            options = ExportOptions(size=size, precision="int8")
            options.extra["float_modules"] = list(floats)
            art, _ = export_artifact(model, target, options, args.out / label.replace(" ", "_").replace("-", ""),
                                     checkpoint=ckpt, calibration=calib, verify=False)  # fmt: skip
            r = verify_artifact(art.folder, num_images=args.images)
            rows.append({
                "target": target, "variant": label, "executor": r["executor"], "miou_float": r["miou_float"],
                "miou_artifact": r["miou_artifact"], "miou_drop_points": r["miou_drop_points"],
                "pixel_agreement": r["pixel_agreement"], "size_mb": art.manifest["size_bytes"] / 1e6,
                "fp32_size_mb": fp32.manifest["size_bytes"] / 1e6,
                "size_ratio": art.manifest["size_bytes"] / fp32.manifest["size_bytes"],
                "fp32_pixel_agreement": fp32_report["pixel_agreement"], "passed": r["passed"],
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    (HERE / "int8.json").write_text(json.dumps({"rows": rows, "sensitivity": report.rows, "policy": policy}, indent=2) + "\n")
    lines = [
        "# INT8: the reference model on every target",
        "",
        f"Measured {datetime.date.today()} by `python benchmarks/int8.py --images {args.images}`: SegFormer-B0 reference",
        f"model at its training size {size[0]}x{size[1]}, calibrated on 32 class-covering training images (`mse`",
        "activation observers; ONNX Runtime uses its entropy calibration), verified on the synthetic val split",
        f"({args.images} images) against the float model. Core ML figures come from the numpy reference executor",
        "of the saved ML program (no macOS here).",
        "",
        "| target | precision | executor | mIoU float | mIoU artifact | drop (points) | pixel agreement | size MB | of fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['variant']} | {r['executor']} | {100 * r['miou_float']:.2f} | {100 * r['miou_artifact']:.2f} | "
            f"{r['miou_drop_points']:.2f} | {100 * r['pixel_agreement']:.2f}% | {r['size_mb']:.2f} | {100 * r['size_ratio']:.1f}% |"
        )
    lines += [
        "",
        f"Sensitivity (each layer group alone in int8, {report.held_out} held-out calibration images):",
        "",
        "| layer group | mIoU drop (points) | pixel agreement |",
        "|---|---|---|",
        *[f"| {r['group']} | {r['miou_drop_points']:.3f} | {100 * r['pixel_agreement']:.2f}% |" for r in report.rows],
        "",
        f"Budget 0.3 points: float layer groups = {policy['float_groups'] or 'none'} "
        f"(steps: {[(s['float_groups'], round(s['miou_drop_points'], 3)) for s in policy['steps']]}).",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in tool_versions("executorch", "litert-torch", "coremltools", "onnxruntime").items()) + ".",
        "",
    ]
    (HERE / "INT8.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
