"""`export --budget`: whole layer groups against single layers, measured in one run.

The outlier-stressed copy of the built-in reference model (SegFormer-B0 at its training size; x30, x60, x120 on
three LayerNorm output channels of every site, float function unchanged) exported at INT8 with the outlier
handling off (`--outliers none`), so that full INT8 loses several mIoU points and the budget has to keep layers
in float. For each target and budget, the search runs at `--budget-granularity group` and `layer` with that
target's own quantizer on held-out calibration images; then the artifact is exported with the chosen float set,
verified on the synthetic val split and timed in a fresh process (p50, `--threads` threads) beside the
all-int8 export. What it costs: the quantized models the search measured and its wall time; what it gains: how
many of the model's Linear/Conv2d layers stay float, the drop, and the speed. Writes benchmarks/budget.json,
then benchmarks/BUDGET.md from that JSON.

    python benchmarks/budget.py [--targets executorch onnx] [--budgets 1.0] [--images 100]
    python benchmarks/budget.py --markdown-only
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
FACTORS = (120.0, 60.0, 30.0)

logger = logging.getLogger("benchmarks.budget")


def measure(targets: list[str], budgets: list[float], images: int, threads: int, runs: int, out: Path,
            save: Any = lambda data: None) -> dict[str, Any]:  # fmt: skip
    import tempfile

    from segformer_edge.calibration.calibset import select_calibration_set
    from segformer_edge.calibration.outliers import inject_outliers
    from segformer_edge.calibration.sensitivity import quantizable_layers
    from segformer_edge.calibration.spec import WRAPPER, QuantSpec
    from segformer_edge.converters.base import ExportOptions, tool_versions
    from segformer_edge.converters.bench import bench_artifact, machine_info
    from segformer_edge.converters.int8 import budget_spec
    from segformer_edge.converters.parity import verify_artifact
    from segformer_edge.converters.pipeline import export_artifact
    from segformer_edge.converters.reference import checkpoint_digest

    from segformer_edge import save_checkpoint
    from segformer_edge.weights import builtin_checkpoint, load_pretrained

    reference = load_pretrained(builtin_checkpoint())
    size = tuple(reference.meta.input_size)
    model = inject_outliers(reference, FACTORS)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = save_checkpoint(model, out / "stressed.safetensors")
    calib = select_calibration_set("synthetic", 32, size, reference.config.num_classes, checkpoint_sha256=checkpoint_digest(ckpt))
    layers = quantizable_layers(model)
    options = ExportOptions(size=size, precision="int8")
    base = QuantSpec(calibration=calib, outliers="none")
    rows: list[dict[str, Any]] = []
    data = {"date": str(datetime.date.today()), "size": list(size), "factors": list(FACTORS), "images": images,
            "threads": threads, "runs": runs, "layers": len(layers), "calibration": calib.reference(),
            "machine": machine_info(), "rows": rows,
            "versions": tool_versions("executorch", "litert-torch", "onnxruntime", "openvino", "nncf")}  # fmt: skip

    def export_and_time(target: str, quant: QuantSpec, folder: Path) -> dict[str, Any]:
        art, _ = export_artifact(model, target, options, folder, checkpoint=ckpt, quant=quant, verify=False)
        r = verify_artifact(art.folder, model=model, num_images=images)
        timing = bench_artifact(art.folder, threads, runs=runs)
        float_layers = sum(quant.keeps_float(WRAPPER + name) for name in layers)
        return {"float_layers": float_layers, "miou_drop_points": r["miou_drop_points"], "pixel_agreement": r["pixel_agreement"],
                "p50_ms": timing.get("p50_ms"), "size_mb": art.manifest["size_bytes"] / 1e6}  # fmt: skip

    for target in targets:
        rows.append({"target": target, "budget": None, "granularity": "all int8", "float_groups": [], "measurements": 0,
                     "search_s": 0.0, **export_and_time(target, base, out / target / "all-int8")})  # fmt: skip
        logger.info("%s", json.dumps(rows[-1]))
        save(data)
        for budget in budgets:
            for granularity in ("group", "layer"):
                count = [0]
                start = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    spec = budget_spec(model, target, options, base, budget, Path(tmp), granularity=granularity,
                                       progress=lambda k: count.__setitem__(0, count[0] + k))  # fmt: skip
                search_s = time.perf_counter() - start
                rows.append({"target": target, "budget": budget, "granularity": granularity,
                             "float_groups": list(spec.float_groups), "measurements": count[0], "search_s": search_s,
                             "held_out_drop_points": spec.policy["miou_drop_points"],
                             **export_and_time(target, spec, out / target / f"{granularity}-{budget:g}")})  # fmt: skip
                logger.info("%s", json.dumps(rows[-1]))
                save(data)
    return data


def markdown(data: dict[str, Any]) -> str:
    h, w = data["size"]
    lines = [
        "# `--budget`: layer groups against single layers",
        "",
        f"Measured {data['date']} by `python benchmarks/budget.py`: the outlier-stressed copy of the reference SegFormer-B0",
        f"at {h}x{w} (outliers x{', x'.join(f'{f:g}' for f in sorted(data['factors']))} on three LayerNorm channels of every site),",
        "exported at INT8 with `--outliers none` so that full INT8 loses several points. The search runs with each",
        f"target's own quantizer on the held-out quarter of {data['calibration']['images']} calibration images; the artifact is then",
        f"verified on {data['images']} synthetic val images and timed in a fresh process (p50 of {data['runs']} runs, {data['threads']} threads,",
        f"{data['machine'].get('cpu', '?')}). Float layers count the model's {data['layers']} Linear and Conv2d layers left float.",
        "",
        "| target | budget (points) | granularity | float layers | kept float | search: models measured | search s | held-out drop | val drop | pixel agreement | p50 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        budget = "-" if r["budget"] is None else f"{r['budget']:g}"
        held = "-" if r.get("held_out_drop_points") is None else f"{r['held_out_drop_points']:.2f}"
        kept = ", ".join(r["float_groups"]) or "nothing"
        p50 = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.1f}"
        lines.append(f"| {r['target']} | {budget} | {r['granularity']} | {r['float_layers']} of {data['layers']} | {kept} | "
                     f"{r['measurements']} | {r['search_s']:.0f} | {held} | {r['miou_drop_points']:.2f} | "
                     f"{100 * r['pixel_agreement']:.2f}% | {p50} |")  # fmt: skip
    lines.append("")
    for target in dict.fromkeys(r["target"] for r in data["rows"]):
        by = {(r["budget"], r["granularity"]): r for r in data["rows"] if r["target"] == target}
        for (budget, granularity), r in by.items():
            group = by.get((budget, "group"))
            if granularity == "layer" and group is not None:
                lines.append(f"- {target}, budget {budget:g}: layer granularity keeps {r['float_layers']} layers float against "
                             f"{group['float_layers']} for whole groups, for {r['measurements'] - group['measurements']} more "
                             f"quantized models measured ({r['search_s'] - group['search_s']:.0f} s more).")  # fmt: skip
            if budget is not None and r["miou_drop_points"] > budget:
                held = data["calibration"]["images"] // 4
                lines.append(f"- {target}, {granularity}: within the budget on the {held} held-out calibration images it was "
                             f"searched on ({r['held_out_drop_points']:.2f}), {r['miou_drop_points']:.2f} points on the "
                             f"{data['images']} val images: the search sees only the held-out images.")  # fmt: skip
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=["executorch", "onnx"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[1.0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("exports/budget-bench"))
    parser.add_argument("--markdown-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    path = HERE / "budget.json"
    if not args.markdown_only:
        save = lambda data: path.write_text(json.dumps(data, indent=2) + "\n")  # noqa: E731
        save(measure(args.targets, args.budgets, args.images, args.threads, args.runs, args.out, save))
    (HERE / "BUDGET.md").write_text(markdown(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
