"""Latency of b0 at 512x512, batch 1, on this machine: torch eager fp32 and every runnable target.

Exports the built-in reference model (b0) at 512x512 to each target and precision, benches each artifact
in a fresh process next to torch eager fp32 on the same input, and writes benchmarks/RESULTS.md (machine,
versions, table, speedups) and benchmarks/latency.png.

    python benchmarks/latency.py [--threads 2] [--runs 20] [--rounds 3] [--precisions fp32,fp16]

Each artifact is measured in each of --rounds rounds, every time right before a torch eager measurement
at the same thread count; the speedup is the median over rounds of those adjacent ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from segformer_edge.calibration.spec import QuantSpec
from segformer_edge.converters import get_target, target_names
from segformer_edge.converters.base import ExportOptions, tool_versions
from segformer_edge.converters.bench import bench_paired, machine_info
from segformer_edge.converters.pipeline import calibration_for, export_artifact

from segformer_edge.cli.bench import _markdown, _plot
from segformer_edge.weights import builtin_checkpoint, load_pretrained

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--out", type=Path, default=Path("exports/bench-512"))
    args = parser.parse_args()

    ckpt = builtin_checkpoint()
    model = load_pretrained(ckpt)
    size = (512, 512)
    quant = QuantSpec(calibration=calibration_for(model, ckpt, size, num_images=32))
    folders, agreement = [], {}
    for precision in args.precisions.split(","):
        for target in target_names(in_all=True):
            if precision not in get_target(target).precisions:
                continue
            artifact, report = export_artifact(model, target, ExportOptions(precision=precision, size=size), args.out,
                                               checkpoint=ckpt, verify_images=2, quant=quant)  # fmt: skip
            folders.append(artifact.folder)
            agreement[str(artifact.folder)] = report["pixel_agreement"] if report else None
    records = bench_paired(folders, [args.threads], warmup=args.warmup, runs=args.runs, rounds=args.rounds,
                           compare_torch=True, checkpoint=ckpt, size=size)  # fmt: skip
    for record in records:
        record.pop("times_ms", None)
        if record["target"] != "torch":
            record["pixel_agreement"] = agreement[record["artifact"]]
        print(json.dumps(record))
    (HERE / "latency.json").write_text(json.dumps(records, indent=2) + "\n")
    _plot(records, HERE / "latency.png")
    versions = tool_versions(*dict.fromkeys(p for name in target_names(in_all=True) for p in get_target(name).tools))
    machine = machine_info()
    lines = [
        "# Latency: SegFormer-B0, 512x512, batch 1",
        "",
        f"Measured {datetime.date.today()} by `python benchmarks/latency.py --threads {args.threads} --runs {args.runs} "
        f"--rounds {args.rounds}`: each measurement in a fresh process, {args.rounds} rounds of {args.runs} timed runs",
        "(the table pools them), and each artifact measurement followed at once by torch eager fp32 on the same input;",
        "\"vs torch\" is the median over rounds of those adjacent ratios. The weights are",
        "the reference model's (b0, 8 classes), run at 512x512; int8 is calibrated on 32 synthetic training images.",
        "",
        f"Machine: {machine.get('cpu', machine['machine'])}, {machine['cpus']} CPUs visible, {machine['system']} "
        f"{machine['release']}, Python {machine['python']}.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        _markdown(records),
        "",
        "Speedup over torch eager in each round: " + "; ".join(
            f"{r['target']} {r['precision']} " + ", ".join(f"{v:.2f}x" for v in r["speedup_vs_torch_rounds"])
            for r in records if r.get("speedup_vs_torch_rounds")
        ) + ".",
        "",
        "![p50 latency](latency.png)",
        "",
    ]
    results = HERE / "RESULTS.md"
    previous = results.read_text() if results.exists() else ""
    marker = "\n## Reading the table"  # the hand-written analysis below the table survives a rerun
    analysis = previous[previous.index(marker) :] if marker in previous else ""
    results.write_text("\n".join(lines) + analysis)


if __name__ == "__main__":
    main()
