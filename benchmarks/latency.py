"""Latency of b0 at 512x512, batch 1, on this machine: torch eager fp32 and every runnable target.

Exports the built-in reference model (b0) at 512x512 to each target and precision, benches each artifact
in a fresh process next to torch eager fp32 on the same input, and writes benchmarks/RESULTS.md (machine,
versions, table, speedups) and benchmarks/latency.png.

    python benchmarks/latency.py [--threads 2] [--runs 20] [--rounds 3] [--precisions fp32,fp16]
    python benchmarks/latency.py --targets openvino --section OpenVINO

Each artifact is measured in each of --rounds rounds, every time right before a torch eager measurement
at the same thread count; the speedup is the median over rounds of those adjacent ratios.

--variant TARGET:PRECISION:KEY=VALUE[,KEY=VALUE] adds an artifact made with target options (by default the
OpenVINO fp32 IR run with the bf16 precision hint). --targets picks some targets; with --section NAME the run
goes into its own section of RESULTS.md (and latency-NAME.json / .png), and the main table stays as it was.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
from pathlib import Path

from segformer_edge.calibration.spec import QuantSpec
from segformer_edge.converters import get_target, target_names
from segformer_edge.converters.base import ExportOptions, tool_versions
from segformer_edge.converters.bench import bench_paired, machine_info
from segformer_edge.converters.int8 import calibration_for
from segformer_edge.converters.pipeline import export_artifact

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
    parser.add_argument("--targets", default=None, help="comma-separated (default: every target of --target all)")
    parser.add_argument("--variant", action="append", default=None,
                        help="TARGET:PRECISION:KEY=VALUE[,...]: an extra artifact with target options (repeatable)")
    parser.add_argument("--section", default=None, help="write this run as its own section of RESULTS.md")
    parser.add_argument("--out", type=Path, default=Path("exports/bench-512"))
    args = parser.parse_args()

    targets = args.targets.split(",") if args.targets else target_names(in_all=True)
    variants = [_variant(v) for v in (args.variant if args.variant is not None else DEFAULT_VARIANTS)]
    jobs = [(t, p, {}) for p in args.precisions.split(",") for t in targets if p in get_target(t).precisions]
    jobs += [v for v in variants if v[0] in targets]
    ckpt = builtin_checkpoint()
    model = load_pretrained(ckpt)
    size = (512, 512)
    quant = QuantSpec(calibration=calibration_for(model, ckpt, size, num_images=32))
    load_before = os.getloadavg()
    folders, agreement, labels = [], {}, {}
    for target, precision, options in jobs:
        # A hint that computes lower than the artifact's precision is held to that precision's thresholds.
        artifact, report = export_artifact(model, target, ExportOptions(precision=precision, size=size, target_options=options),
                                           args.out, checkpoint=ckpt, verify_images=2, quant=quant)  # fmt: skip
        folders.append(artifact.folder)
        agreement[str(artifact.folder)] = report["pixel_agreement"] if report else None
        labels[str(artifact.folder)] = precision + "".join(f", {k}={v}" for k, v in sorted(options.items()))
    records = bench_paired(folders, [args.threads], warmup=args.warmup, runs=args.runs, rounds=args.rounds,
                           compare_torch=True, checkpoint=ckpt, size=size)  # fmt: skip
    load_after = os.getloadavg()
    for record in records:
        record.pop("times_ms", None)
        if record["target"] != "torch":
            record["pixel_agreement"] = agreement[record["artifact"]]
            record["precision"] = labels[record["artifact"]]
        print(json.dumps(record))
    stem = f"latency-{re.sub(r'[^a-z0-9]+', '-', args.section.lower()).strip('-')}" if args.section else "latency"
    (HERE / f"{stem}.json").write_text(json.dumps(records, indent=2) + "\n")
    _plot(records, HERE / f"{stem}.png")
    versions = tool_versions(*dict.fromkeys(p for name in targets for p in get_target(name).tools))
    machine = machine_info()
    command = " ".join(["python benchmarks/latency.py", f"--threads {args.threads}", f"--runs {args.runs}", f"--rounds {args.rounds}",
                        *([f"--targets {args.targets}"] if args.targets else []),
                        *([f"--section {args.section}"] if args.section else [])])  # fmt: skip
    executors = "; ".join(f"{r['target']} {r['precision']}: {r['executor']}" for r in records
                          if r["target"] != "torch" and r.get("executor"))  # fmt: skip
    table = [
        _markdown(records),
        "",
        "Speedup over torch eager in each round: " + "; ".join(
            f"{r['target']} {r['precision']} " + ", ".join(f"{v:.2f}x" for v in r["speedup_vs_torch_rounds"])
            for r in records if r.get("speedup_vs_torch_rounds")
        ) + ".",
        "",
        f"Executors (what each runtime really computed in): {executors}.",
        "",
        f"Load average (1 min) of this shared machine: {load_before[0]:.1f} when the timing began, {load_after[0]:.1f} "
        "when it ended.",
        "",
    ]  # fmt: skip
    header = [
        f"Measured {datetime.date.today()} by `{command}`: each measurement in a fresh process, {args.rounds} rounds of "
        f"{args.runs} timed runs",
        "(the table pools them), and each artifact measurement followed at once by torch eager fp32 on the same input;",
        "\"vs torch\" is the median over rounds of those adjacent ratios. The weights are",
        "the reference model's (b0, 8 classes), run at 512x512; int8 is calibrated on 32 synthetic training images.",
        "",
        (f"Machine: {machine.get('cpu', machine['machine'])}, {machine['cpus']} CPUs visible, {machine['system']} "
         f"{machine['release']}, Python {machine['python']}."),
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
    ]  # fmt: skip
    if args.section:
        _write_section(args.section, [*header, *table, f"![p50 latency]({stem}.png)", ""])
        return
    lines = ["# Latency: SegFormer-B0, 512x512, batch 1", "", *header, *table, "![p50 latency](latency.png)", ""]
    previous = RESULTS.read_text() if RESULTS.exists() else ""
    analysis = previous[previous.index(ANALYSIS) :] if ANALYSIS in previous else ""
    RESULTS.write_text("\n".join(lines) + analysis)


RESULTS = HERE / "RESULTS.md"
ANALYSIS = "\n## Reading the table"  # the hand-written analysis below the table survives a rerun
DEFAULT_VARIANTS = ["openvino:fp32:hint=bf16"]  # OpenVINO's CPU default on bf16 CPUs, asked for and recorded


def _variant(text: str) -> tuple[str, str, dict[str, str]]:
    target, precision, options = (text.split(":", 2) + [""])[:3]
    pairs = [item.partition("=") for item in options.split(",") if item]
    return target, precision, {key: value for key, _, value in pairs}


def _write_section(name: str, lines: list[str]) -> None:
    """This run as ``## NAME (measured separately)`` in RESULTS.md, above the analysis: replaced by a rerun of the same
    section, dropped by a full rerun (whose table has every target)."""
    title = f"\n## {name} (measured separately)\n"
    body = "\n".join([title, "Measured apart from the table above, with its own torch eager row.", "", *lines])
    text = RESULTS.read_text()
    start = text.find(title)
    if start >= 0:  # replace the earlier run of this section
        following = text.find("\n## ", start + len(title))
        text = text[:start] + (text[following:] if following >= 0 else "")
    at = text.find(ANALYSIS) if ANALYSIS in text else len(text)
    RESULTS.write_text(text[:at].rstrip("\n") + "\n" + body + text[at:])


if __name__ == "__main__":
    main()
