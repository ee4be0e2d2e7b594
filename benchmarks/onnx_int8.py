"""ONNX Runtime INT8 against ONNX fp32 at the user's configuration: which QDQ layout makes INT8 pay.

Issue 16, item 3. b0 at 512x512 with 150 classes (the checkpoint and photo crops of benchmarks/user_config.py),
logits output. One fp32 artifact and four INT8 ones, the two ``-O`` options crossed: activations S8S8 (int8) or
U8S8 (uint8), the attention softmax int8 (the full QDQ graph, which ONNX Runtime fuses to QLinearSoftmax) or
float (q @ k^T as MatMulIntegerToFloat into a float Softmax). All five are timed in one ``bench_paired`` run of
interleaved rounds, with ONNX Runtime's profiler run once per artifact (its per-op times add the profiler's own
overhead; the p50 column is without it). What each artifact is (QDQ types, attention precision) is read from its
manifest, which the export read from the model file.

Writes benchmarks/onnx_int8.json and benchmarks/ONNX_INT8.md (from the JSON alone).

    python benchmarks/onnx_int8.py [--rounds 2] [--runs 10] [--threads 2]
    python benchmarks/onnx_int8.py --render
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
JSON_PATH = HERE / "onnx_int8.json"
MD_PATH = HERE / "ONNX_INT8.md"
VARIANTS: list[dict[str, str]] = [
    {"activations": "int8", "softmax": "int8"},  # ONNX Runtime's default QDQ layout
    {"activations": "int8", "softmax": "float"},
    {"activations": "uint8", "softmax": "int8"},
    {"activations": "uint8", "softmax": "float"},
]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from segformer_edge.calibration.spec import QuantSpec
    from segformer_edge.converters.base import ExportOptions
    from segformer_edge.converters.bench import bench_paired, machine_info
    from segformer_edge.converters.onnx import u8s8_is_fast
    from segformer_edge.converters.pipeline import export_artifact
    from setups import user_config

    work = Path(args.work)
    size = (args.size, args.size)
    checkpoint, model, calib = user_config(work, size, args.calibration_images)
    rows: list[dict[str, Any]] = []
    for options in [None, *VARIANTS]:
        precision = "fp32" if options is None else "int8"
        artifact, _ = export_artifact(model, "onnx", ExportOptions(size=size, precision=precision, target_options=options or {}),
                                      work / "exports", checkpoint=checkpoint, quant=QuantSpec(calibration=calib) if options else None,
                                      verify=False)  # fmt: skip
        applied = (artifact.manifest.get("quantization") or {}).get("applied", {})
        rows.append({"precision": precision, "options": options or {}, "artifact": str(artifact.folder),
                     "qdq_format": applied.get("qdq_types", {}).get("format"), "attention": applied.get("attention")})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    timed = bench_paired([r["artifact"] for r in rows], [args.threads], warmup=3, runs=args.runs, rounds=args.rounds, profile=True)
    by_path = {r["artifact"]: r for r in timed}
    for row in rows:
        t = by_path[row["artifact"]]
        row.update({"p50_ms": t["p50_ms"], "top_ops": t.get("profile") or t.get("top_ops")})
    fp32 = rows[0]["p50_ms"]
    for row in rows:
        row["speedup_vs_fp32"] = fp32 / row["p50_ms"]
    versions = json.loads((Path(rows[0]["artifact"]) / "manifest.json").read_text())["tool_versions"]
    return {"date": str(datetime.date.today()), "machine": machine_info(), "size": list(size), "threads": args.threads,
            "rounds": args.rounds, "runs": args.runs, "calibration_images": args.calibration_images,
            "u8s8_is_fast_here": u8s8_is_fast(), "versions": versions, "rows": rows}  # fmt: skip


def _attention(attention: dict[str, dict[str, int]] | None) -> str:
    if not attention:
        return "float"
    return ", ".join(f"{part} {'/'.join(f'{n} {kind}' for kind, n in counts.items() if n)}" for part, counts in attention.items())


def render(record: dict[str, Any]) -> None:
    rows = record["rows"]
    lines = ["# ONNX Runtime INT8 against fp32: b0, 150 classes, 512x512", "",
             f"Measured {record['date']} by `python benchmarks/onnx_int8.py` on {record['machine']['machine']} "
             f"({record['machine'].get('cpu', '?')}, {record['machine']['cpus']} CPUs), {record['threads']} threads, one "
             f"`bench_paired` run of {record['rounds']} interleaved rounds x {record['runs']} runs. Versions: "
             + ", ".join(f"{k} {v}" for k, v in sorted(record["versions"].items())) + ".", "",
             f"Model: transformers SegformerForSemanticSegmentation, b0, 150 classes, random init (saved here), logits; INT8 "
             f"calibrated on {record['calibration_images']} photo crops (MinMax). `-O activations=auto` resolves to "
             f"{'uint8 (U8S8)' if record['u8s8_is_fast_here'] else 'int8 (S8S8)'} on this machine; `-O softmax` defaults "
             "to float.", "",
             "| precision | -O options | QDQ | attention (read from the artifact) | p50 ms | vs ONNX fp32 | top ops (ORT profiler, ms) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        options = " ".join(f"{k}={v}" for k, v in row["options"].items()) or "-"
        ops = ", ".join(f"{o['op']} {o['ms']:.1f}" for o in (row.get("top_ops") or [])[:4])
        lines.append(f"| {row['precision']} | {options} | {row['qdq_format'] or '-'} | {_attention(row['attention'])} | "
                     f"{row['p50_ms']:.1f} | {row['speedup_vs_fp32']:.2f}x | {ops} |")  # fmt: skip
    lines.append("")
    MD_PATH.write_text("\n".join(lines) + "\n")


def main() -> None:
    from setups import add_user_config_options, measure_or_render

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_user_config_options(parser, "only rewrite ONNX_INT8.md from the JSON")
    measure_or_render(parser.parse_args(), measure, render, JSON_PATH)


if __name__ == "__main__":
    main()
