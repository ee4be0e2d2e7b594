"""Latency at the user's configuration, beside this machine's floor.

Issue 16, item 4: b0 at 512x512 with 150 classes (a transformers checkpoint saved here with random weights: no
download is possible), logits and the full-size mask, fp32 and INT8 (calibrated on crops of real photos), every
target that runs here. All artifacts are timed in one ``bench --compare-torch --floor`` run (``bench_paired``:
each artifact followed by torch eager at the same thread count, ``--rounds`` interleaved rounds, and the fp32
and int8 GEMM rates probed in the same run), so every ratio in the table is measured side by side.

*x floor*: the artifact's p50 over its network's MACs at the GEMM rate of its precision (XNNPACK, four chained
4096x1024x1024 linears: a peak rate; b0's layers are at most 256 wide, so even a perfect runtime stays above
it): what the narrow GEMMs, the non-GEMM ops, the graph edges and the runtime add on top.
*mask cost*: the mask artifact's p50 over the logits artifact's of the same target and precision, minus one.
The artifacts are exported without parity checks (a random-init 150-class model barely separates its classes,
so INT8 flips many pixels: see USER_SCENARIO.md); this benchmark measures time only.

Writes benchmarks/user_config.json and benchmarks/USER_CONFIG.md (from the JSON alone).

    python benchmarks/user_config.py [--size 512] [--targets executorch,tflite,onnx,openvino] [--rounds 2] [--runs 10]
    python benchmarks/user_config.py --targets executorch   # re-export one target; time it with the stored others
    python benchmarks/user_config.py --retime   # the bench run again on the artifacts user_config.json names
    python benchmarks/user_config.py --render
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
JSON_PATH = HERE / "user_config.json"
MD_PATH = HERE / "USER_CONFIG.md"
OUTPUTS = ("logits", "mask")
PRECISIONS = ("fp32", "int8")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from segformer_edge.calibration.spec import QuantSpec
    from segformer_edge.converters import get_target
    from segformer_edge.converters.base import ExportOptions
    from segformer_edge.converters.pipeline import export_artifact
    from setups import user_config

    work = Path(args.work)
    size = (args.size, args.size)
    if args.retime:
        stored = json.loads(JSON_PATH.read_text())
        rows = [{k: r[k] for k in ("target", "precision", "output", "artifact")} for r in stored["rows"]]
        return _timed(args, rows, work / "b0-150", tuple(stored["size"]), stored["versions"], stored["calibration_images"])
    checkpoint, model, calib = user_config(work, size, args.calibration_images)
    rows: list[dict[str, Any]] = []
    versions: dict[str, str] = {"torch": torch.__version__}
    for target in args.targets.split(","):
        if not get_target(target).times_here():
            continue
        for precision in PRECISIONS:
            for output in OUTPUTS:
                quant = QuantSpec(calibration=calib) if precision == "int8" else None
                artifact, _ = export_artifact(model, target, ExportOptions(size=size, precision=precision, output=output),
                                              work / "exports", checkpoint=checkpoint, quant=quant, verify=False)  # fmt: skip
                versions.update(artifact.manifest["tool_versions"])
                rows.append({"target": target, "precision": precision, "output": output, "artifact": str(artifact.folder)})
                print(json.dumps(rows[-1]), flush=True)
    # Targets not exported this time keep the artifacts user_config.json names (made from the same seeded checkpoint):
    # every artifact is still timed in the one run below.
    if JSON_PATH.exists():
        stored = json.loads(JSON_PATH.read_text())
        done = {r["target"] for r in rows}
        kept = [{k: r[k] for k in ("target", "precision", "output", "artifact")} for r in stored["rows"]
                if r["target"] not in done and Path(r["artifact"]).exists()]  # fmt: skip
        order = list(dict.fromkeys([r["target"] for r in stored["rows"]] + [r["target"] for r in rows]))
        rows = sorted(rows + kept, key=lambda r: order.index(r["target"]))  # stable: each target's rows keep their order
        versions = {**stored["versions"], **versions}
    return _timed(args, rows, checkpoint, size, versions, args.calibration_images)


def _timed(args: argparse.Namespace, rows: list[dict[str, Any]], checkpoint: Path, size: tuple[int, int],
           versions: dict[str, str], calibration_images: int) -> dict[str, Any]:  # fmt: skip
    """One bench_paired run of every artifact (torch eager beside each, the GEMM floor probed in the run)."""
    from segformer_edge.converters.bench import bench_paired, machine_info

    timed = bench_paired([r["artifact"] for r in rows], [args.threads], warmup=3, runs=args.runs, rounds=args.rounds,
                         compare_torch=True, checkpoint=checkpoint, size=size, floor=True)  # fmt: skip
    by_path = {r["artifact"]: r for r in timed if r["target"] != "torch"}
    eager = next(r for r in timed if r["target"] == "torch")
    for row in rows:
        t = by_path[row["artifact"]]
        row.update({k: t.get(k) for k in ("p50_ms", "speedup_vs_torch", "floor_ms", "x_floor", "network_gmacs", "floor_gemm")})
    record = {"date": str(datetime.date.today()), "machine": machine_info(), "size": list(size), "threads": args.threads,
              "rounds": args.rounds, "runs": args.runs, "calibration_images": calibration_images,
              "versions": versions, "torch_p50_ms": eager["p50_ms"], "rows": rows}  # fmt: skip
    JSON_PATH.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def render(record: dict[str, Any]) -> None:
    rows = record["rows"]
    rates = {r["floor_gemm"]["precision"]: r["floor_gemm"]["gmac_per_s"] for r in rows if r.get("floor_gemm")}
    gmacs = next((r["network_gmacs"] for r in rows if r.get("network_gmacs")), None)
    h, w = record["size"]
    lines = ["# Latency at the user's configuration: b0, 150 classes, 512x512, beside the floor", "",
             f"Measured {record['date']} by `python benchmarks/user_config.py` on {record['machine']['machine']} "
             f"({record['machine'].get('cpu', '?')}, {record['machine']['cpus']} CPUs), {record['threads']} threads, one "
             f"`bench --compare-torch --floor` run of {record['rounds']} interleaved rounds x {record['runs']} runs. Versions: "
             + ", ".join(f"{k} {v}" for k, v in sorted(record["versions"].items())) + ".", "",
             f"Model: transformers SegformerForSemanticSegmentation, b0, 150 classes, random init (saved here); INT8 calibrated "
             f"on {record['calibration_images']} photo crops. The network: {gmacs:.2f} GMAC at {h}x{w}. "
             "GEMM rates probed in the run (XNNPACK, four chained 4096x1024x1024 linears): "
             + ", ".join(f"{p} {v:.0f} GMAC/s" for p, v in sorted(rates.items())) + "; the floor of the network: "
             + ", ".join(f"{p} {1000 * gmacs / v:.1f} ms" for p, v in sorted(rates.items())) + ".", "",
             f"torch eager fp32 (logits): {record['torch_p50_ms']:.1f} ms p50.", "",
             "| target | precision | output | p50 ms | vs torch eager | x floor | mask cost |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        logits = next(r for r in rows if r["target"] == row["target"] and r["precision"] == row["precision"] and r["output"] == "logits")
        cost = f"{100 * (row['p50_ms'] / logits['p50_ms'] - 1):+.0f}%" if row["output"] == "mask" else "-"
        lines.append(f"| {row['target']} | {row['precision']} | {row['output']} | {row['p50_ms']:.1f} | "
                     f"{row['speedup_vs_torch']:.2f}x | {row['x_floor']:.2f}x | {cost} |")  # fmt: skip
    lines.append("")
    MD_PATH.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from setups import add_user_config_options

    add_user_config_options(parser, "rewrite USER_CONFIG.md from user_config.json")
    parser.add_argument("--targets", default="executorch,tflite,onnx,openvino")
    parser.add_argument("--retime", action="store_true", help="bench again the artifacts user_config.json names")
    args = parser.parse_args()
    record = json.loads(JSON_PATH.read_text()) if args.render else measure(args)
    render(record)


if __name__ == "__main__":
    main()
