"""What a mask output costs next to the logits, and how often it agrees with the exact mask.

For each model (the user's configuration: b0 with 150 classes, from a transformers checkpoint saved here with
random weights, on crops of real photos; and the built-in reference model, b0 with 8 trained classes, on its
synthetic validation scenes) and each target that runs here, exports at fp32: logits, the full-size mask by
candidate argmax (the default), the exact mask (all class maps upsampled, then argmax), the quarter-size
mask and the probabilities. Every artifact is verified against the float model (pixel agreement with
upsample-then-argmax of the float logits, or with the float argmax at 1/4 for the quarter mask), and all
are timed by ``bench`` in one paired run with torch eager (``--rounds`` rounds, interleaved). The candidate
mask is also compared pixel for pixel with the exact mask on the same images.

Writes benchmarks/mask.json, benchmarks/MASK.md (from the JSON alone) and segformer_edge/assets/mask_outputs.json
(the figures ``export --help`` quotes).

    python benchmarks/mask.py [--size 512] [--targets executorch,tflite,onnx,openvino] [--rounds 2] [--runs 10] [--models 1]
    python benchmarks/mask.py --render
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
JSON_PATH = HERE / "mask.json"
MD_PATH = HERE / "MASK.md"
ASSET = ROOT / "segformer_edge" / "assets" / "mask_outputs.json"
KINDS = {  # row name -> ExportOptions fields
    "logits": {"output": "logits"},
    "mask (candidates)": {"output": "mask", "mask_size": "full"},
    "mask full-exact": {"output": "mask", "mask_size": "full-exact"},
    "mask quarter": {"output": "mask", "mask_size": "quarter"},
    "probs": {"output": "probs"},
}


def _models(work: Path, size: int) -> list[dict[str, Any]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_photo_folder, save_hf_model

    from segformer_edge.weights import builtin_checkpoint

    user = save_hf_model(work / "b0-150", num_labels=150, tiny=False)
    photos = make_photo_folder(work / "photos", n=8)
    return [
        {"name": f"b0, 150 classes (random init), {size}x{size}, 8 photo crops", "checkpoint": user, "data": str(photos)},
        {"name": f"reference b0, 8 classes (trained), {size}x{size}, 8 synthetic scenes", "checkpoint": builtin_checkpoint(),
         "data": "synthetic:64"},
    ]  # fmt: skip


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from segformer_edge.converters import get_target
    from segformer_edge.converters.base import ExportOptions, read_manifest
    from segformer_edge.converters.bench import bench_paired, machine_info
    from segformer_edge.converters.pipeline import export_artifact

    from segformer_edge.data import open_source
    from segformer_edge.inputs import InputSpec
    from segformer_edge.weights import load_pretrained

    work = Path(args.work)
    size = (args.size, args.size)
    stored = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else None
    record: dict[str, Any] = {"date": str(datetime.date.today()), "machine": machine_info(), "size": list(size),
                              "threads": args.threads, "rounds": args.rounds, "runs": args.runs,
                              "versions": {"torch": torch.__version__}, "models": []}  # fmt: skip
    for m in _models(work, args.size)[: args.models]:
        model = load_pretrained(m["checkpoint"])
        rows: list[dict[str, Any]] = []
        paths: dict[str, str] = {}
        for target in args.targets.split(","):
            if not get_target(target).times_here():
                continue
            for kind, fields in KINDS.items():
                artifact, report = export_artifact(model, target, ExportOptions(size=size, **fields), work / "exports",
                                                   checkpoint=Path(m["checkpoint"]), verify_data=m["data"],
                                                   verify_images=args.images)  # fmt: skip
                record["versions"].update(artifact.manifest["tool_versions"])
                rows.append({"target": target, "kind": kind, "artifact": str(artifact.folder),
                             "pixel_agreement": report["pixel_agreement"], "passed": report["passed"],
                             "output": artifact.manifest["output"]})  # fmt: skip
                paths[f"{target}/{kind}"] = str(artifact.folder)
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "artifact"}), flush=True)
            # The candidate mask against the exact mask, artifact against artifact, on the same images.
            cand, exact = (read_manifest(paths[f"{target}/{k}"]) for k in ("mask (candidates)", "mask full-exact"))
            spec = InputSpec.from_manifest(cand.manifest["input"])
            run_c, run_e = get_target(target).load(cand), get_target(target).load(exact)
            source = open_source(m["data"], "val")
            same = total = 0
            for i in range(min(args.images, len(source))):
                image, _ = spec.resize(source.load(i)[0])
                a, b = np.asarray(run_c(spec(image[None]))), np.asarray(run_e(spec(image[None])))
                same, total = same + int((a == b).sum()), total + a.size
            next(r for r in rows if r["target"] == target and r["kind"] == "mask (candidates)")["agreement_with_exact"] = same / total
        timed = bench_paired(list(paths.values()), [args.threads], warmup=3, runs=args.runs, rounds=args.rounds,
                             compare_torch=True, checkpoint=m["checkpoint"], size=size)  # fmt: skip
        by_path = {r["artifact"]: r for r in timed if r["target"] != "torch"}
        eager = next((r for r in timed if r["target"] == "torch"), {})
        for row in rows:
            t = by_path.get(row["artifact"], {})
            row["p50_ms"], row["speedup_vs_torch"] = t.get("p50_ms"), t.get("speedup_vs_torch")
        record["models"].append({"name": m["name"], "date": record["date"], "torch_p50_ms": eager.get("p50_ms"), "rows": rows})
        JSON_PATH.write_text(json.dumps(record, indent=2, default=str) + "\n")
    # --models 1 re-measures the first model only: the stored sections of the others stay, each with its own date.
    if args.models < 2 and stored:
        kept = [dict(m, date=m.get("date", stored["date"])) for m in stored["models"][args.models :]]
        record["models"] += kept
        JSON_PATH.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def render(record: dict[str, Any]) -> None:
    """MASK.md and the help's asset, from the JSON alone."""
    lines = ["# Mask outputs: cost and agreement", "",
             f"Measured {record['date']} by `python benchmarks/mask.py` on {record['machine']['machine']} "
             f"({record['machine']['cpus']} CPUs), {record['threads']} threads, {record['rounds']} interleaved rounds of "
             f"{record['runs']} runs, fp32 artifacts at {record['size'][0]}x{record['size'][1]}. Versions: "
             + ", ".join(f"{k} {v}" for k, v in sorted(record["versions"].items())) + ".", "",
             "Agreement: verify's pixel agreement with the float model (the exact mask: upsample then argmax of the "
             "float logits; for the quarter mask, the float argmax at 1/4). *vs exact*: the candidate mask against "
             "the exact mask artifact of the same target, pixel for pixel. *cost*: the artifact's p50 over the "
             "logits artifact's p50, minus one.", ""]  # fmt: skip
    summary = []
    for m in record["models"]:
        when = f" Measured {m['date']}." if m.get("date", record["date"]) != record["date"] else ""
        lines += [f"## {m['name']}", "", (f"torch eager fp32 (logits): {m['torch_p50_ms']:.1f} ms p50." if m["torch_p50_ms"] else "") + when, "",
                  "| target | output | p50 ms | vs torch | cost over logits | agreement | vs exact | passed |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in m["rows"]:
            logits = next(r for r in m["rows"] if r["target"] == row["target"] and r["kind"] == "logits")
            cost = f"{100 * (row['p50_ms'] / logits['p50_ms'] - 1):+.0f}%" if row.get("p50_ms") and logits.get("p50_ms") else "-"
            vs = f"{100 * row['agreement_with_exact']:.4f}%" if "agreement_with_exact" in row else "-"
            p50 = f"{row['p50_ms']:.1f}" if row.get("p50_ms") else "-"
            speed = f"{row['speedup_vs_torch']:.2f}x" if row.get("speedup_vs_torch") else "-"
            lines.append(f"| {row['target']} | {row['kind']} | {p50} | {speed} | {cost} | {100 * row['pixel_agreement']:.4f}% | {vs} | {row['passed']} |")
        lines.append("")
        cand = [r for r in m["rows"] if r["kind"] == "mask (candidates)"]
        exact = [r for r in m["rows"] if r["kind"] == "mask full-exact"]
        quarter = [r for r in m["rows"] if r["kind"] == "mask quarter"]
        if cand and exact and "150" in m["name"]:
            summary.append(f"Measured at b0 {record['size'][0]}x{record['size'][1]} with 150 classes (benchmarks/MASK.md): "
                           f"the full mask is the exact one on {100 * min(r['agreement_with_exact'] for r in cand):.4f}% of pixels (lowest target), "
                           f"and costs {_range(cand, m)} over the logits where full-exact costs {_range(exact, m)}; "
                           f"quarter costs {_range(quarter, m)}.")  # fmt: skip
    MD_PATH.write_text("\n".join(lines) + "\n")
    ASSET.write_text(json.dumps({"source": "benchmarks/mask.py", "date": record["date"], "summary": " ".join(summary)}, indent=2) + "\n")


def _range(rows: list[dict[str, Any]], m: dict[str, Any]) -> str:
    costs = []
    for row in rows:
        logits = next(r for r in m["rows"] if r["target"] == row["target"] and r["kind"] == "logits")
        if row.get("p50_ms") and logits.get("p50_ms"):
            costs.append(100 * (row["p50_ms"] / logits["p50_ms"] - 1))
    return f"{min(costs):+.0f}% to {max(costs):+.0f}%" if costs else "(not timed)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--targets", default="executorch,tflite,onnx,openvino")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--models", type=int, default=2, help="1: the 150-class model only")
    parser.add_argument("--work", default="exports/mask-bench")
    parser.add_argument("--render", action="store_true", help="rewrite MASK.md from mask.json")
    args = parser.parse_args()
    render(json.loads(JSON_PATH.read_text()) if args.render else measure(args))


if __name__ == "__main__":
    main()
