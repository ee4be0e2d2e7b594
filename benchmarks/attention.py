"""INT8 attention: what quantizing the attention's matmuls and softmax costs and gains, per target.

Issue 16, item 2. The PT2E quantizers of ExecuTorch (XNNPACK) and LiteRT leave the attention's ``q @ k^T``, its
softmax and ``attn @ v`` float; ONNX Runtime's quantizes all three. What each artifact does is read from it
(``quantization.applied.attention``, and for LiteRT ``attention_ops`` from the flatbuffer).

- Parity: LiteRT ``-O attention=float|int8`` and ONNX ``-O softmax=float|int8`` (its matmuls are int8 either
  way) on the reference model and on int8.py's outlier-stressed copy (same calibration set of 32 training
  images, verified on ``--images`` synthetic val images against the float model).
- Latency: LiteRT ``attention=float`` and ``int8`` at the user's configuration (b0, 150 classes, 512x512; the
  checkpoint and photo crops of user_config.py), in one ``bench_paired`` run of interleaved rounds. ONNX's pair
  is timed in ONNX_INT8.md.
- ExecuTorch refuses ``-O attention``: XNNPACK's batch matmul is fp32-only in ExecuTorch 1.5.1.

Writes benchmarks/attention.json and benchmarks/ATTENTION.md (from the JSON alone).

    python benchmarks/attention.py [--images 100] [--rounds 2] [--runs 10]
    python benchmarks/attention.py --render
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
JSON_PATH = HERE / "attention.json"
MD_PATH = HERE / "ATTENTION.md"
PARITY = [("tflite", {"attention": "float"}), ("tflite", {"attention": "int8"}),
          ("onnx", {"softmax": "float"}), ("onnx", {"softmax": "int8"})]  # fmt: skip


def _parity(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    from segformer_edge.calibration.spec import QuantSpec
    from segformer_edge.converters.base import ExportOptions
    from segformer_edge.converters.parity import verify_artifact
    from segformer_edge.converters.pipeline import export_artifact
    from setups import reference_and_stressed

    models, size, calib = reference_and_stressed(out)
    rows = []
    for label, (model, checkpoint) in models.items():
        for target, options in PARITY:
            artifact, _ = export_artifact(model, target, ExportOptions(size=size, precision="int8", target_options=options),
                                          out / label, checkpoint=checkpoint, quant=QuantSpec(calibration=calib), verify=False)  # fmt: skip
            report = verify_artifact(artifact.folder, model=model, num_images=args.images)
            applied = artifact.manifest["quantization"]["applied"]
            rows.append({"model": label, "target": target, "options": options, "size": list(size),
                         "attention": applied.get("attention"), "attention_ops": applied.get("attention_ops"),
                         "pixel_agreement": report["pixel_agreement"], "miou_drop_points": report["miou_drop_points"],
                         "passed": report["passed"]})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _latency(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    from segformer_edge.calibration.spec import QuantSpec
    from segformer_edge.converters.base import ExportOptions
    from segformer_edge.converters.bench import bench_paired
    from segformer_edge.converters.pipeline import export_artifact
    from setups import user_config

    size = (args.size, args.size)
    checkpoint, model, calib = user_config(Path(args.work), size, args.calibration_images)
    rows = []
    for attention in ("float", "int8"):
        artifact, _ = export_artifact(model, "tflite", ExportOptions(size=size, precision="int8", target_options={"attention": attention}),
                                      out / "b0-150", checkpoint=checkpoint, quant=QuantSpec(calibration=calib), verify=False)  # fmt: skip
        delegation = artifact.manifest["delegation"]
        rows.append({"target": "tflite", "options": {"attention": attention}, "artifact": str(artifact.folder), "size": list(size),
                     "attention_ops": artifact.manifest["quantization"]["applied"].get("attention_ops"),
                     "portable_ops": delegation["portable_ops"], "delegated_subgraphs": delegation["delegated_subgraphs"]})  # fmt: skip
    timed = {r["artifact"]: r for r in bench_paired([r["artifact"] for r in rows], [args.threads], warmup=3, runs=args.runs, rounds=args.rounds)}
    for row in rows:
        row["p50_ms"] = timed[row["artifact"]]["p50_ms"]
    return rows


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from segformer_edge.converters.base import tool_versions
    from segformer_edge.converters.bench import machine_info

    out = Path(args.out)
    parity = _parity(args, out)
    latency = _latency(args, out)
    return {"date": str(datetime.date.today()), "machine": machine_info(), "threads": args.threads, "rounds": args.rounds,
            "runs": args.runs, "images": args.images, "versions": tool_versions("litert-torch", "ai-edge-litert", "onnxruntime"),
            "parity": parity, "latency": latency}  # fmt: skip


def _precision(attention: dict[str, dict[str, int]] | None) -> str:
    if not attention:
        return "-"
    return ", ".join(f"{part} " + "/".join(f"{n} {kind}" for kind, n in counts.items() if n) for part, counts in attention.items())


def render(record: dict[str, Any]) -> None:
    m = record["machine"]
    lines = ["# INT8 attention: parity and latency per target", "",
             f"Measured {record['date']} by `python benchmarks/attention.py` on {m['machine']} ({m.get('cpu', '?')}, "
             f"{m['cpus']} CPUs). Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(record["versions"].items())) + ".", "",
             "ExecuTorch: `-O attention` is refused. XNNPACK's batch matmul is fp32-only in ExecuTorch 1.5.1, so the "
             "attention's matmuls and softmax stay float, as each manifest's `quantization.applied.attention` says.", "",
             f"## Parity (INT8, default method, {record['images']} synthetic val images against the float model)", "",
             "Attention precision as the artifact records it: for LiteRT the dtypes its BATCH_MATMUL and SOFTMAX ops "
             "compute in, read from the flatbuffer; for ONNX from the QDQ graph (q @ k^T with a float softmax after it "
             "runs as ONNX Runtime's MatMulIntegerToFloat).", "",
             "| model | target | -O | attention | pixel agreement | mIoU drop (points) | parity |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in record["parity"]:
        options = " ".join(f"{k}={v}" for k, v in r["options"].items())
        lines.append(f"| {r['model']} | {r['target']} | {options} | {_precision(r['attention_ops'] or r['attention'])} | "
                     f"{100 * r['pixel_agreement']:.2f}% | {r['miou_drop_points']:.2f} | {'passed' if r['passed'] else 'FAILED'} |")  # fmt: skip
    rows = record["latency"]
    h, w = rows[0]["size"]
    base = next(r for r in rows if r["options"]["attention"] == "float")
    lines += ["", f"## Latency (LiteRT, b0, 150 classes, {h}x{w}, {record['threads']} threads, one run of {record['rounds']} "
              f"interleaved rounds x {record['runs']} runs)", "",
              "| -O | attention | ops outside XNNPACK | XNNPACK partitions | p50 ms | p50 over attention=float's |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| attention={r['options']['attention']} | {_precision(r['attention_ops'])} | {', '.join(r['portable_ops']) or '-'} | "
                     f"{r['delegated_subgraphs']} | {r['p50_ms']:.1f} | {r['p50_ms'] / base['p50_ms']:.2f}x |")  # fmt: skip
    lines.append("")
    MD_PATH.write_text("\n".join(lines) + "\n")


def main() -> None:
    from setups import add_user_config_options, measure_or_render

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_user_config_options(parser, "only rewrite ATTENTION.md from the JSON")
    parser.add_argument("--images", type=int, default=100, help="val images each parity row is verified on")
    parser.add_argument("--out", default="exports/attention-bench")
    measure_or_render(parser.parse_args(), measure, render, JSON_PATH)


if __name__ == "__main__":
    main()
