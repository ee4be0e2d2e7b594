"""The per-target int8 options (issue 14, point 3) beside each target's default INT8, measured in one run.

The built-in reference model (SegFormer-B0, 8 classes) at its training size, calibrated on one class-covering set
of 32 training images; each artifact is exported once, verified against the float model on the synthetic val split
(with masks: the mIoU drop is against the labels), and timed in a fresh process where its runtime runs here (Core ML
runs only through the numpy reference executor off macOS: no latency). Writes benchmarks/target_options.json, then
benchmarks/TARGET_OPTIONS.md from that JSON.

    python benchmarks/target_options.py [--images 32] [--threads 2] [--runs 20]
    python benchmarks/target_options.py --markdown-only
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent

# (row label, target, --scheme, -O options); the first row of each target is its default INT8 (the baseline).
ROWS: list[tuple[str, str, str, dict[str, str]]] = [
    ("default (static, io=float)", "tflite", "static", {}),
    ("-O io=int8", "tflite", "static", {"io": "int8"}),
    ("-O io=uint8", "tflite", "static", {"io": "uint8"}),
    ("-O activations=int16 (16x8)", "tflite", "static", {"activations": "int16"}),
    ("-O attention=int8", "tflite", "static", {"attention": "int8"}),
    ("default (W8A8)", "coreml", "static", {}),
    ("--scheme weight_only (int8)", "coreml", "weight_only", {}),
    ("--scheme weight_only -O weights=palettize8", "coreml", "weight_only", {"weights": "palettize8"}),
    ("--scheme weight_only -O weights=palettize6", "coreml", "weight_only", {"weights": "palettize6"}),
    ("--scheme weight_only -O weights=palettize4", "coreml", "weight_only", {"weights": "palettize4"}),
    ("default (static)", "executorch", "static", {}),
    ("--scheme dynamic", "executorch", "dynamic", {}),
    ("default (activations=auto, softmax=float)", "onnx", "static", {}),
    ("-O activations=int8 (S8S8)", "onnx", "static", {"activations": "int8"}),
    ("-O activations=uint8 (U8S8)", "onnx", "static", {"activations": "uint8"}),
    ("-O softmax=int8", "onnx", "static", {"softmax": "int8"}),
]

logger = logging.getLogger("benchmarks.target_options")


def _applied(manifest: dict[str, Any]) -> str:
    """What the artifact holds, from its manifest's read-back (never the request)."""
    q = manifest["quantization"]["applied"]
    target = manifest["target"]
    if target == "tflite":
        io = q["io"]["inputs"][0]["dtype"] + " I/O"
        attention = "/".join(sorted({k for part in q.get("attention_ops", {}).values() for k in part})) or "-"
        return f"{', '.join(f'{n} {k}' for k, n in q['activations'].items())} conv/FC inputs; {io}; attention {attention}"
    if target == "coreml":
        storage = manifest["coreml"]["weight_storage"]
        return "weights: " + ", ".join(f"{n} {k}" for k, n in storage.items())
    if target == "executorch":
        s = q["scheme"]
        return f"{s['kind']}: {s['runtime_quantized_activations']} runtime-quantized inputs, {s['calibrated_quantize_ops']} calibrated quantize ops"
    if target == "onnx":
        t = q["qdq_types"]
        softmax = "/".join(k for k, n in q.get("attention", {}).get("softmax", {}).items() if n) or "-"
        return f"{t['format']} (activation zero points {', '.join(t['activations'])}; weights {', '.join(t['weights'])}); softmax {softmax}"
    return "-"


def measure(images: int, threads: int, runs: int, out: Path) -> dict[str, Any]:
    from segformer_edge.calibration.calibset import select_calibration_set
    from segformer_edge.calibration.spec import QuantSpec
    from segformer_edge.converters import get_target
    from segformer_edge.converters.base import ExportOptions, tool_versions
    from segformer_edge.converters.bench import bench_artifact, machine_info
    from segformer_edge.converters.parity import verify_artifact
    from segformer_edge.converters.pipeline import export_artifact
    from segformer_edge.converters.reference import checkpoint_digest

    from segformer_edge.weights import builtin_checkpoint, load_pretrained

    ckpt = builtin_checkpoint()
    model = load_pretrained(ckpt)
    size = tuple(model.meta.input_size)
    calib = select_calibration_set("synthetic", 32, size, model.config.num_classes, checkpoint_sha256=checkpoint_digest(ckpt))
    rows = []
    for label, target, scheme, options in ROWS:
        quant = QuantSpec(scheme=scheme, calibration=calib)
        art, _ = export_artifact(model, target, ExportOptions(size=size, precision="int8", target_options=options), out,
                                 checkpoint=ckpt, quant=quant, verify=False)  # fmt: skip
        report = verify_artifact(art.folder, model=model, checkpoint=ckpt, num_images=images)
        timing = bench_artifact(art.folder, threads, warmup=3, runs=runs) if get_target(target).times_here() else None
        rows.append({
            "label": label, "target": target, "scheme": scheme, "options": options, "applied": _applied(art.manifest),
            "method": art.manifest["quantization"]["method"], "executor": report["executor"],
            "size_mb": art.manifest["size_bytes"] / 1e6, "pixel_agreement": report["pixel_agreement"],
            "miou_float": report["miou_float"], "miou_artifact": report["miou_artifact"],
            "miou_drop_points": report["miou_drop_points"], "passed": report["passed"], "thresholds": report["thresholds"],
            "p50_ms": timing["p50_ms"] if timing and timing.get("status") == "ok" else None,
            "latency_status": "not timed: only the numpy reference executor runs here" if timing is None else timing.get("status"),
        })  # fmt: skip
        logger.info("%s", json.dumps(rows[-1]))
    return {
        "date": str(datetime.date.today()), "images": images, "size": list(size), "threads": threads, "runs": runs,
        "calibration": calib.reference(), "machine": machine_info(), "rows": rows,
        "versions": tool_versions("executorch", "litert-torch", "ai-edge-litert", "ai-edge-quantizer", "coremltools", "onnxruntime"),
    }  # fmt: skip


def markdown(data: dict[str, Any]) -> str:
    """TARGET_OPTIONS.md from the JSON that :func:`measure` wrote."""
    h, w = data["size"]
    cpu = data["machine"].get("cpu") or data["machine"].get("processor") or "this machine's CPU"
    lines = [
        "# Per-target INT8 options beside each target's default",
        "",
        f"Measured {data['date']} by `python benchmarks/target_options.py --images {data['images']} --threads {data['threads']} "
        + f"--runs {data['runs']}`: the built-in reference model (SegFormer-B0, 8 classes) at its training size {h}x{w},",
        f"calibrated on {data['calibration']['images']} class-covering training images (outlier handling `auto`), verified on",
        f"{data['images']} images of the synthetic val split against the float model and the labels, all in one run. The",
        "first row of each target is its default INT8 export (the baseline). `applied` is read back from the artifact",
        f"(its manifest's record). Latency: median of the timed runs, batch 1, {data['threads']} threads, in a fresh process",
        f"({cpu}; {data['machine'].get('cpus')} cores shared with other jobs, so latencies are indicative); Core ML runs only through the numpy",
        "reference executor off macOS, so it is not timed. The 16x8 LiteRT model runs in LiteRT's reference kernels (XNNPACK",
        "has no int16 kernels).",
        "",
        "| target | option | applied (read back) | size MB | mIoU float | mIoU int8 | drop (points) | pixel agreement | parity | p50 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        latency = f"{r['p50_ms']:.1f}" if r["p50_ms"] is not None else "-"
        lines.append(
            f"| {r['target']} | {r['label']} | {r['applied']} | {r['size_mb']:.2f} | {100 * r['miou_float']:.2f} | "
            f"{100 * r['miou_artifact']:.2f} | {r['miou_drop_points']:.2f} | {100 * r['pixel_agreement']:.2f}% | "
            f"{'passed' if r['passed'] else 'FAILED'} | {latency} |"
        )
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="val images to verify on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per artifact")
    parser.add_argument("--out", type=Path, default=Path("exports/target-options-bench"))
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the Markdown from the JSON")
    parser.add_argument("--json", type=Path, default=HERE / "target_options.json")
    parser.add_argument("--markdown", type=Path, default=HERE / "TARGET_OPTIONS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not args.markdown_only:
        args.json.write_text(json.dumps(measure(args.images, args.threads, args.runs, args.out), indent=2) + "\n")
    args.markdown.write_text(markdown(json.loads(args.json.read_text())))


if __name__ == "__main__":
    main()
