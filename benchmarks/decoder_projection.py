"""What the projected decoder costs and gains, beside the decoder as trained, measured in one run.

``--decoder projected`` (the default) folds the all-MLP decoder's fuse conv and BatchNorm into the four stage
projections, which then run before the upsampling (segformer_edge.model.ProjectedHead): the same function in float,
without the 4C -> C conv at 1/4 resolution. Per model (the transformers-saved b0 and b2 with 150 classes of
benchmarks/export_scale.py, at 512x512, the 16 photo crops), for each decoder form, in this one process:

- network MACs of the graph (segformer_edge.profile.model_stats);
- torch eager fp32 latency of the float graph (median of 7 runs after 2 warm-ups, one photo, this machine's threads)
  and the largest logit difference between the two forms;
- an int8 ONNX export with verify (one outlier decision per form, made in the export): its phases, its parity on
  the photos (pixel agreement, PSNR of the logits, estimated mIoU drop, no labels), and its ONNX Runtime latency
  (``segformer_edge.bench``, both forms' artifacts in one call, each in a fresh process, 2 threads).

    python benchmarks/decoder_projection.py --work /tmp/es          # DECODER_PROJECTION.md and .json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

FORMS = ("as-trained", "projected")


def _eager(model: Any, x: Any) -> tuple[float, Any]:
    import torch

    with torch.no_grad():
        for _ in range(2):
            out = model(x)
        times = []
        for _ in range(7):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, out


def measure(name: str, work: Path, out: Path) -> dict[str, Any]:
    import numpy as np
    import torch
    from export_scale import MODELS, PHOTOS, _hf_model
    from PIL import Image

    import segformer_edge
    from conftest import make_photo_folder
    from segformer_edge.api import resolve_model
    from segformer_edge.converters.graph import fold_batch_norm, project_decoder
    from segformer_edge.profile import model_stats

    photos = work / "photos"
    if not photos.is_dir():
        make_photo_folder(photos, n=PHOTOS)
    size = MODELS[name][2]
    model, _ = resolve_model(str(_hf_model(work, name)))
    model.eval()
    first = sorted(photos.iterdir())[0]
    rgb = np.asarray(Image.open(first).convert("RGB").resize(size[::-1]), dtype=np.float32) / 255.0  # (H, W, 3)
    mean, std = np.array(model.meta.mean, np.float32), np.array(model.meta.std, np.float32)
    x = torch.from_numpy(((rgb - mean) / std).transpose(2, 0, 1)[None].copy())  # (1, 3, H, W)
    graphs = {"as-trained": fold_batch_norm(model), "projected": project_decoder(model)}
    row: dict[str, Any] = {"model": name, "size": list(size), "classes": model.config.num_classes, "forms": {}}
    logits = {}
    for form in FORMS:
        ms, logits[form] = _eager(graphs[form], x)
        macs = model_stats(model.config, size, projected=form == "projected")["macs"]
        row["forms"][form] = {"macs_g": round(macs / 1e9, 2), "eager_fp32_ms": round(ms, 1)}
    row["max_abs_logit_diff_fp32"] = float((logits["projected"] - logits["as-trained"]).abs().max())
    row["max_abs_logit"] = float(logits["as-trained"].abs().max())
    artifacts = {}
    for form in FORMS:
        started = time.perf_counter()
        art = segformer_edge.export(model, "onnx", "int8", data=str(photos), out=str(out / form), size=size, decoder=form)
        wall = time.perf_counter() - started
        p = art.manifest["parity"]
        decision = art.manifest["quantization"]["applied"].get("outliers", {})
        row["forms"][form].update({
            "export_s": round(wall, 1), "pixel_agreement": p["pixel_agreement"], "psnr_db": round(p["psnr_db"], 2),
            "estimated_miou_drop_points": round(p["estimated_miou_drop_points"], 3),
            "estimated_miou_drop_stderr": round(p["estimated_miou_drop_stderr"], 3),
            "outliers_applied": decision.get("applied"),
            "manifest_decoder": art.manifest["decoder"]["form"], "network_macs": art.manifest["network_macs"],
        })  # fmt: skip
        artifacts[form] = art
    records = segformer_edge.bench([artifacts[f].folder for f in FORMS], threads=2, warmup=3, runs=15)
    for form, rec in zip(FORMS, records[-len(FORMS):]):
        row["forms"][form]["onnx_int8_p50_ms"] = rec.p50_ms
        row["forms"][form]["onnx_int8_peak_rss_mb"] = rec.peak_rss_mb
    return row


def render(record: dict[str, Any]) -> str:
    lines = [
        "# The projected decoder beside the decoder as trained",
        "",
        "Written by `benchmarks/decoder_projection.py` (one run: both forms of each model measured side by side).",
        f"Machine: {record['machine']}; torch {record['torch']}, onnxruntime {record['onnxruntime']}; {record['date']}; "
        f"commit {record['commit']}.",
        "",
        "`projected` folds the fuse conv and BatchNorm into the stage projections before upsampling (the default,",
        "`--decoder auto`); `as-trained` concatenates the upsampled projections and runs the 4C -> C fuse conv at 1/4",
        "resolution. Parity: the int8 ONNX artifact against the float model on the 16 photo crops (no labels: the mIoU",
        "drop is the label-free estimate of `verify`). Latencies: eager on one photo, median of 7; ONNX Runtime p50",
        "of 15 runs, 2 threads, each artifact in a fresh process, both in one `bench` call.",
        "",
        "| model | decoder | network MACs | torch eager fp32 | int8 ONNX export (with verify) | int8 ONNX p50 | pixel agreement | PSNR (logits) | estimated mIoU drop |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        for form in FORMS:
            f = row["forms"][form]
            lines.append(
                f"| {row['model']} {row['size'][0]}x{row['size'][1]}, {row['classes']} classes | {form} | {f['macs_g']:.2f} G | "
                f"{f['eager_fp32_ms']:.0f} ms | {f['export_s']:.0f} s | {f['onnx_int8_p50_ms']:.0f} ms | "
                f"{100 * f['pixel_agreement']:.2f}% | {f['psnr_db']:.2f} dB | "
                f"{f['estimated_miou_drop_points']:.3f} ± {f['estimated_miou_drop_stderr']:.3f} |"
            )
    lines += ["", "Ratios (projected / as trained, same run):", ""]
    for row in record["rows"]:
        a, p = row["forms"]["as-trained"], row["forms"]["projected"]
        lines.append(
            f"- {row['model']}: MACs {p['macs_g'] / a['macs_g']:.2f}x, eager fp32 {p['eager_fp32_ms'] / a['eager_fp32_ms']:.2f}x, "
            f"int8 ONNX export {p['export_s'] / a['export_s']:.2f}x, int8 ONNX latency {p['onnx_int8_p50_ms'] / a['onnx_int8_p50_ms']:.2f}x; "
            f"largest fp32 logit difference {row['max_abs_logit_diff_fp32']:.2e} (logits up to {row['max_abs_logit']:.1f})."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    import subprocess

    import onnxruntime
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "export-scale")
    parser.add_argument("--models", default="b0,b2")
    parser.add_argument("--render", action="store_true", help="DECODER_PROJECTION.md from the .json only")
    args = parser.parse_args()
    cache = tempfile.mkdtemp()
    os.environ["XDG_CACHE_HOME"] = cache  # each form's outlier decision made in its export, none reused from earlier runs
    json_path, md_path = HERE / "decoder_projection.json", HERE / "DECODER_PROJECTION.md"
    if not args.render:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [measure(name, args.work, Path(tmp) / name) for name in args.models.split(",")]
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())  # fmt: skip
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
        record = {"machine": f"{cpu}, {torch.get_num_threads()} threads", "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                  "date": datetime.date.today().isoformat(), "commit": commit, "rows": rows}  # fmt: skip
        json_path.write_text(json.dumps(record, indent=2) + "\n")
    md_path.write_text(render(json.loads(json_path.read_text())))
    print(md_path.read_text())


if __name__ == "__main__":
    main()
