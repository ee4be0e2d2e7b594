"""What the ``mse`` observers' sampled histogram saves and what it changes: the PT2E quantize step (prepare,
calibration pass, convert) of an int8 ExecuTorch export at 512x512 with torchao's HistogramObserver (every value
histogrammed) and with :class:`~segformer_edge.calibration.recipes.SampledHistogramObserver` (an even sample of about
1 M values of each larger activation; and a quarter of that, tried), on the same model, calibration images and graph,
in one process.

What it changes is read from the two converted graphs: every activation quantize op's scale (the same op in each),
and the converted model's logits on the calibration images against the float graph's (noise-to-signal ratio and
pixel agreement of the argmax), as verify would see them before lowering.

The models are export_scale.py's (transformers-saved, seeded random weights, 150 classes) and its 16 photo crops.

    python benchmarks/histogram_sample.py                  # b0 and b2
    python benchmarks/histogram_sample.py --models b2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
JSON_PATH, MD_PATH = HERE / "histogram_sample.json", HERE / "HISTOGRAM_SAMPLE.md"


def _scales(graph_module: Any) -> list[float]:
    """Every activation quantize op's scale, in graph order (weights are folded or per channel: not these ops)."""
    return [float(n.args[1]) for n in graph_module.graph.nodes
            if n.op == "call_function" and "quantize_per_tensor" in str(n.target) and "dequantize" not in str(n.target)]  # fmt: skip


def measure_model(name: str, work: Path) -> dict[str, Any]:
    import torch
    from export_scale import MODELS, PHOTOS, _hf_model
    from segformer_edge.calibration import recipes
    from segformer_edge.calibration.spec import QuantSpec
    from segformer_edge.converters import build
    from segformer_edge.converters.base import ExportOptions
    from segformer_edge.converters.int8 import calibration_for

    from segformer_edge.weights import load_pretrained

    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import make_photo_folder

    photos = work / "photos"
    if not photos.is_dir():
        make_photo_folder(photos, n=PHOTOS)
    size = MODELS[name][2]
    model = load_pretrained(_hf_model(work, name)).eval()
    calib = calibration_for(model, None, size, data=str(photos), num_images=PHOTOS)
    options = ExportOptions(precision="int8", size=size)
    plan = build.plan_export(model, "executorch", options, work / "histogram-out", QuantSpec(calibration=calib, outliers="none"))
    module, example, _ = build.capture(model, plan)
    inputs = build.calibration_inputs(plan.quant, plan.graph_input, example)  # one (1, 3, H, W) tensor per image
    with torch.no_grad():
        reference = [module(x) for x in inputs]  # (1, K, H/4, W/4) float logits each
    rows, graphs = [], {}
    default = recipes.SampledHistogramObserver.sample
    # mode -> the observer's sample size: one above any tensor's size histograms every value (torchao's own path); a
    # quarter of the default's sample was tried (b2: 0.75x the quantize step, pixel agreement 0.44 points lower): not taken
    modes = {"full histogram (torchao HistogramObserver)": 1 << 62,
             f"sampled histogram (~{default / 2**20:g} M values, the default)": default,
             f"sampled histogram (~{default / 2**22:g} M values, tried, not taken)": default // 4}  # fmt: skip
    for mode, sample in modes.items():
        recipes.SampledHistogramObserver.sample = sample
        try:
            with build.shared_provenance():
                started = time.perf_counter()
                quantized, applied = build.quantize(module, example, plan)
                seconds = time.perf_counter() - started
        finally:
            recipes.SampledHistogramObserver.sample = default
        with torch.no_grad():
            outputs = [quantized(x) for x in inputs]  # (1, K, H/4, W/4) each
        noise = sum(float((o - r).double().pow(2).sum()) for o, r in zip(outputs, reference))
        signal = sum(float(r.double().pow(2).sum()) for r in reference)
        agree = statistics.fmean(float((o.argmax(1) == r.argmax(1)).float().mean()) for o, r in zip(outputs, reference))
        graphs[mode] = _scales(quantized)
        rows.append({"mode": mode, "quantize_s": round(seconds, 1), "logits_nsr": noise / signal, "pixel_agreement": agree,
                     "observers": applied.get("activation_observers")})  # fmt: skip
    full = graphs[next(iter(modes))]
    for row in rows[1:]:
        sampled = graphs[row["mode"]]
        if len(full) != len(sampled):
            raise SystemExit(f"{name}: the converted graphs differ in their quantize ops ({len(full)} vs {len(sampled)})")
        relative = sorted(abs(b - a) / a for a, b in zip(full, sampled))
        row["scales"] = {"ops": len(full), "median_relative_difference": relative[len(relative) // 2],
                         "p95_relative_difference": relative[int(0.95 * (len(relative) - 1))], "max_relative_difference": relative[-1]}  # fmt: skip
    return {"model": name, "size": list(size), "classes": MODELS[name][1], "images": len(inputs), "modes": rows}


def render(record: dict[str, Any]) -> str:
    lines = ["# The `mse` observers' sampled histogram: what it saves, what it changes", "",
             f"Written by `python benchmarks/histogram_sample.py` from benchmarks/histogram_sample.json ({record['date']}; "
             f"{record['machine'].get('cpu', '?')}, {record['machine'].get('cpus', '?')} CPUs). The PT2E quantize step "
             "(prepare, calibration pass over the images, convert) of an int8 ExecuTorch export with each observer, one "
             "process, the same graph and calibration images (export_scale.py's models and 16 photo crops). `logits NSR` "
             "and `pixel agreement`: the converted graph run in torch on the calibration images against the float graph. "
             "`scales`: every activation quantize op's scale, sampled against full.", "",
             "| model | size | observer | quantize step | vs full | logits NSR | pixel agreement | scales: median / p95 / max relative difference |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for m in record["models"]:
        base = m["modes"][0]["quantize_s"]
        for row in m["modes"]:
            s = row.get("scales")
            diff = f"{s['median_relative_difference']:.2%} / {s['p95_relative_difference']:.2%} / {s['max_relative_difference']:.2%} ({s['ops']} ops)" if s else ""
            lines.append(f"| {m['model']} | {m['size'][0]}x{m['size'][1]} | {row['mode']} | {row['quantize_s']:.1f} s | "
                         f"{row['quantize_s'] / base:.2f}x | {row['logits_nsr']:.3g} | {row['pixel_agreement']:.2%} | {diff} |")  # fmt: skip
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    return "\n".join([*lines, "", f"Versions: {versions}.", ""])


def main() -> None:
    import datetime
    from importlib.metadata import version

    from segformer_edge.converters.bench import machine_info

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="b0,b2")
    parser.add_argument("--work", type=Path, default=Path("/tmp/export-scale"), help="export_scale.py's work folder (models, photos)")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args()
    if not args.render:
        record = {"date": datetime.date.today().isoformat(), "machine": machine_info(),
                  "versions": {n: version(n) for n in ("torch", "torchao", "executorch")},
                  "models": [measure_model(name, args.work) for name in args.models.split(",")]}  # fmt: skip
        JSON_PATH.write_text(json.dumps(record, indent=1) + "\n")
    MD_PATH.write_text(render(json.loads(JSON_PATH.read_text())))
    print(MD_PATH.read_text())


if __name__ == "__main__":
    main()
