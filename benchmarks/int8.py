"""INT8 of every target x activation method x outlier handling, with latency, on two models.

The reference model (the built-in SegFormer-B0 at its training size), and an outlier-stressed copy that
this script builds itself: the same float function, but three LayerNorm output channels of every
LayerNorm site carry activations 30, 60 and 120 times larger than before (the following layers' weights
compensate), as pretrained transformers do. Every target is exported at INT8 with every activation method it
offers (``Target.quant_methods``) with the outlier handling off (``none``) and at its default (``auto``), and
at its default method with each rewrite forced; calibrated on one class-covering set of 32 training images,
verified on the synthetic val split and timed (p50 of ``--runs`` runs in a fresh process, ``--threads``
threads) beside torch eager fp32 of the same model. Writes benchmarks/int8.json after every row, then
benchmarks/INT8.md from that JSON.

Where ``auto`` applied exactly what another mode forces (nothing, for ``none``), the same spec reaches the
quantizer: that artifact is exported once and both rows say so.

    python benchmarks/int8.py [--images 100]        # measure, then write the JSON and the Markdown
    python benchmarks/int8.py --resume              # after an interruption: measure only the missing rows
    python benchmarks/int8.py --retime              # time every artifact again in one pass (a quiet machine)
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

from setups import FACTORS  # the stressed copy's outliers (benchmarks/setups.py)

HERE = Path(__file__).parent
TARGETS = ("executorch", "tflite", "coreml", "onnx", "openvino")
MODELS = ("outlier-stressed", "reference")
FORCED = ("smoothquant", "bias_correction", "smoothquant+bias_correction")  # at each target's default method

logger = logging.getLogger("benchmarks.int8")


def plan_rows(targets: tuple[str, ...]) -> list[tuple[str, str, str, str]]:
    """(model, target, method, outliers) of every row, in the order they are measured and shown."""
    from segformer_edge.converters import get_target

    rows = []
    for model in MODELS:
        for target in targets:
            t = get_target(target)
            for method in t.quant_methods:
                rows += [(model, target, method, "auto"), (model, target, method, "none")]
                if method == t.default_method:
                    rows += [(model, target, method, mode) for mode in FORCED]
    return rows


def measure(images: int, out: Path, targets: tuple[str, ...], done: list[dict[str, Any]],
            save: Callable[[dict[str, Any]], None], threads: int, runs: int) -> dict[str, Any]:  # fmt: skip
    """Export, verify and time every row of :func:`plan_rows`; the rows and what they were measured on.

    Rows in ``done`` (from an interrupted run at the same settings) are kept, not measured again; ``save``
    gets the data after every row."""
    import torch
    from segformer_edge.calibration.spec import QuantSpec
    from segformer_edge.converters.base import ExportOptions, tool_versions
    from segformer_edge.converters.bench import bench_artifact, bench_torch, machine_info
    from segformer_edge.converters.parity import verify_artifact
    from segformer_edge.converters.pipeline import export_artifact
    from setups import reference_and_stressed

    pairs, size, calib = reference_and_stressed(out)
    models = {label: model for label, (model, _) in pairs.items()}
    checkpoints = {label: path for label, (_, path) in pairs.items()}
    reference, stressed = models["reference"], models["outlier-stressed"]
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))  # (2, 3, H, W)
    with torch.no_grad():
        preserved = float((stressed(x) - reference(x)).abs().max())
    logger.info("outlier-stressed copy: max |logit difference| from the reference model %.2e", preserved)
    torch_ms = {label: bench_torch(path, size, threads, runs=runs)["p50_ms"] for label, path in checkpoints.items()}
    data: dict[str, Any] = {
        "date": str(datetime.date.today()), "images": images, "size": list(size), "factors": list(FACTORS),
        "threads": threads, "runs": runs, "torch_eager_p50_ms": torch_ms, "machine": machine_info(),
        "calibration": calib.reference(), "stressed_max_logit_difference": preserved, "rows": list(done),
        "versions": tool_versions("executorch", "litert-torch", "coremltools", "onnxruntime", "openvino", "nncf"),
    }  # fmt: skip
    rows = data["rows"]
    measured = {(r["model"], r["target"], r["method"], r["outliers"]) for r in done}
    for key in plan_rows(targets):
        if key in measured:
            continue
        label, target, method, mode = key
        model = models[label]
        # Where auto applied exactly what this mode forces (nothing, for none), the same spec reaches the quantizer:
        # the artifact is auto's, measured once.
        auto = next((r for r in rows if (r["model"], r["target"], r["method"], r["outliers"]) == (label, target, method, "auto")), None)
        if auto is not None and auto["applied"] == ([] if mode == "none" else mode.split("+")):
            rows.append({**auto, "outliers": mode, "same_artifact_as": "auto"})
            save(data)
            continue
        folder = out / label / f"{method}-{mode}"
        art, _ = export_artifact(model, target, ExportOptions(size=size, precision="int8"), folder,
                                 checkpoint=checkpoints[label], quant=QuantSpec(calibration=calib, method=method, outliers=mode),
                                 verify=False)  # fmt: skip
        r = verify_artifact(art.folder, model=model, num_images=images)
        timing = bench_artifact(art.folder, threads, runs=runs)
        record = art.manifest["quantization"]["applied"].get("outliers", {})
        rows.append({
            "model": label, "target": target, "method": method, "outliers": mode, "applied": record.get("applied", []),
            "alpha": (record.get("smoothquant") or {}).get("alpha") if "smoothquant" in record.get("applied", []) else None,
            "simulated_error_before": record.get("error_before"), "simulated_error_after": record.get("error_after"),
            "manifest_method": art.manifest["quantization"]["method"], "executor": r["executor"],
            "miou_float": r["miou_float"], "miou_artifact": r["miou_artifact"], "miou_drop_points": r["miou_drop_points"],
            "pixel_agreement": r["pixel_agreement"], "size_mb": art.manifest["size_bytes"] / 1e6, "passed": r["passed"],
            "p50_ms": timing.get("p50_ms"), "timing_status": timing["status"], "artifact": str(art.folder),
        })  # fmt: skip
        logger.info("%s", json.dumps(rows[-1]))
        save(data)
    order = {k: i for i, k in enumerate(plan_rows(targets))}
    rows.sort(key=lambda r: order.get((r["model"], r["target"], r["method"], r["outliers"]), len(order)))
    return data


def _applied(r: dict[str, Any]) -> str:
    parts = [f"smoothquant a={r['alpha']:g}" if name == "smoothquant" else name.replace("_", " ") for name in r["applied"]]
    return " + ".join(parts) or "nothing"


def _error(r: dict[str, Any]) -> str:
    before, after = r.get("simulated_error_before"), r.get("simulated_error_after")
    return "-" if before is None or r["outliers"] == "none" else f"{before:.2e} -> {after:.2e}"


def retime(data: dict[str, Any], out: Path, threads: int, runs: int) -> None:
    """Time every row's artifact again, and torch eager of each model, in one pass on a quiet machine: the rows'
    latency then comes from one run (export and verify of the rows, hours long, shared the machine)."""
    from segformer_edge.converters.bench import bench_artifact, bench_torch

    from segformer_edge.weights import builtin_checkpoint

    checkpoints = {"reference": builtin_checkpoint(), "outlier-stressed": out / "stressed.safetensors"}
    size = tuple(data["size"])
    data["torch_eager_p50_ms"] = {label: bench_torch(path, size, threads, runs=runs)["p50_ms"] for label, path in checkpoints.items()}
    timed: dict[str, dict[str, Any]] = {}
    for r in data["rows"]:
        folder = r.get("artifact") or _artifact_folder(out, r)
        if folder not in timed:
            timed[folder] = bench_artifact(folder, threads, runs=runs)
            logger.info("%s %s %s %s: %s", r["model"], r["target"], r["method"], r["outliers"], timed[folder].get("p50_ms"))
        r["artifact"], r["p50_ms"], r["timing_status"] = folder, timed[folder].get("p50_ms"), timed[folder]["status"]
    data.update(threads=threads, runs=runs, retimed=str(datetime.date.today()))


def _artifact_folder(out: Path, r: dict[str, Any]) -> str:
    """The folder of a row's artifact under ``out`` (rows measured before the JSON recorded it)."""
    mode = "auto" if r.get("same_artifact_as") else r["outliers"]
    (folder,) = (out / r["model"] / f"{r['method']}-{mode}").glob(f"*_{r['target']}_int8")
    return str(folder)


def _latency(r: dict[str, Any], torch_ms: float) -> tuple[str, str]:
    if r.get("p50_ms") is None:
        return r.get("timing_status", "-"), "-"
    return f"{r['p50_ms']:.1f}", f"{torch_ms / r['p50_ms']:.2f}x"


def markdown(data: dict[str, Any]) -> str:
    """INT8.md from the JSON that :func:`measure` wrote."""
    h, w = data["size"]
    factors = ", ".join(f"x{f:g}" for f in sorted(data["factors"]))
    machine = data["machine"]
    lines = [
        "# INT8: every target x activation method x outlier handling, with latency",
        "",
        f"Measured {data['date']} by `python benchmarks/int8.py --images {data['images']}`: the SegFormer-B0 reference model",
        f"at its training size {h}x{w}, and an outlier-stressed copy the script builds from it (same float function,",
        f"max logit difference {data['stressed_max_logit_difference']:.1e}; {factors} on three LayerNorm output channels of every",
        "LayerNorm site, the following layers' weights compensating). Each artifact is an INT8 export (per-channel",
        f"int8 weights) with the activation method and outlier mode of its row, calibrated on {data['calibration']['images']}",
        f"class-covering training images, verified on the synthetic val split ({data['images']} images) against its float",
        f"model, and timed in a fresh process: p50 of {data['runs']} runs on {data['threads']} threads, beside torch eager fp32 of the",
        f"same model on the same input ({', '.join(f'{k} {v:.1f} ms' for k, v in data['torch_eager_p50_ms'].items())})"
        + (f", every artifact and torch timed together in one pass (`--retime`, {data['retimed']})." if data.get("retimed") else "."),
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cpus', '?')} CPUs. Core ML figures come from the numpy reference",
        "executor of the saved ML program (no macOS here: no latency).",
        "",
        "`method` is the activation range estimator (`export --method`; each target's default is marked *), `outliers`",
        "the QuantSpec mode (`export --outliers`), `applied` what the export did, and the simulated error what `auto`",
        "decided by (noise-to-signal ratio of the logits in simulated W8A8 on 8 calibration images, before and after; a",
        "rewrite is applied only where it lowers that error by 20% or more). Where `auto` applied what another row",
        "forces (nothing, for `none`), that row is the same artifact, exported once (marked =).",
        "",
    ]
    from segformer_edge.converters import get_target

    for model in MODELS:
        rows = [r for r in data["rows"] if r["model"] == model]
        if not rows:
            continue
        torch_ms = data["torch_eager_p50_ms"][model]
        lines += [
            f"## {'Reference model' if model == 'reference' else 'Outlier-stressed copy'}",
            "",
            "| target | method | outliers | applied | simulated error | mIoU drop (points) | pixel agreement | p50 ms | vs torch | size MB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            star = "*" if r["method"] == get_target(r["target"]).default_method else ""
            same = " (=)" if r.get("same_artifact_as") else ""
            ms, ratio = _latency(r, torch_ms)
            lines.append(
                f"| {r['target']} | {r['method']}{star} | {r['outliers']}{same} | {_applied(r)} | {_error(r)} | "
                f"{r['miou_drop_points']:.2f} | {100 * r['pixel_agreement']:.2f}% | {ms} | {ratio} | {r['size_mb']:.2f} |"
            )
        lines.append("")
        lines += _summary(rows)
    lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".", ""]
    return "\n".join(lines)


def _summary(rows: list[dict[str, Any]]) -> list[str]:
    """One computed sentence per model: the worst row with outliers handled (auto) and without (none)."""
    out = []
    for mode in ("auto", "none"):
        chosen = [r for r in rows if r["outliers"] == mode]
        if chosen:
            worst = max(chosen, key=lambda r: r["miou_drop_points"])
            low = min(chosen, key=lambda r: r["pixel_agreement"])
            out.append(f"- `--outliers {mode}`: the largest mIoU drop is {worst['miou_drop_points']:.2f} points ({worst['target']}, "
                       f"{worst['method']}); the lowest pixel agreement {100 * low['pixel_agreement']:.2f}% ({low['target']}, {low['method']}).")  # fmt: skip
    return [*out, ""] if out else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100, help="val images to verify on")
    parser.add_argument("--threads", type=int, default=2, help="threads for every timed run")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per artifact (after 5 warm-up runs)")
    parser.add_argument("--out", type=Path, default=Path("exports/int8-bench"))
    parser.add_argument("--targets", nargs="+", default=list(TARGETS))
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the Markdown from the JSON")
    parser.add_argument("--retime", action="store_true", help="time every artifact of the JSON again in one quiet pass")
    parser.add_argument("--json", type=Path, default=HERE / "int8.json")
    parser.add_argument("--markdown", type=Path, default=HERE / "INT8.md")
    parser.add_argument("--resume", action="store_true", help="keep the rows the JSON already has (same --images)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not (args.markdown_only or args.retime):
        done: list[dict[str, Any]] = []
        if args.resume and args.json.is_file():
            previous = json.loads(args.json.read_text())
            same = previous.get("images") == args.images and previous.get("threads") == args.threads and "runs" in previous
            done = previous["rows"] if same else []
        save = lambda data: args.json.write_text(json.dumps(data, indent=2) + "\n")  # noqa: E731
        save(measure(args.images, args.out, tuple(args.targets), done, save, args.threads, args.runs))
    data = json.loads(args.json.read_text())
    if args.retime:
        retime(data, args.out, args.threads, args.runs)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    args.markdown.write_text(markdown(data))


if __name__ == "__main__":
    main()
