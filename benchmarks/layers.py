"""Per-tap SQNR of fp16 and INT8 artifacts of the reference model, for every target that runs here.

Exports the built-in reference model (b0, 8 classes) to each target at fp16 and int8, and runs
``verify --layers`` on each: the same recipe rebuilt as a debug graph whose extra outputs are the four
encoder stages and the fused decoder feature, compared with the float model on the synthetic validation
scenes. Writes benchmarks/layers.json and benchmarks/LAYERS.md (tables from the JSON).

    python benchmarks/layers.py [--images 4] [--calibration-images 32] [--out exports/layers]
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Any

from segformer_edge.calibration.spec import QuantSpec
from segformer_edge.converters import get_target, target_names
from segformer_edge.converters.base import ExportOptions
from segformer_edge.converters.bench import machine_info
from segformer_edge.converters.int8 import calibration_for
from segformer_edge.converters.parity import verify_artifact
from segformer_edge.converters.pipeline import export_artifact

from segformer_edge.weights import builtin_checkpoint, load_pretrained

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("exports/layers"))
    parser.add_argument("--render", action="store_true", help="rewrite LAYERS.md from layers.json")
    args = parser.parse_args()
    if args.render:
        write_markdown(json.loads((HERE / "layers.json").read_text()))
        return
    ckpt = builtin_checkpoint()
    model = load_pretrained(ckpt)
    size = tuple(model.meta.input_size)
    calib = calibration_for(model, ckpt, size, num_images=args.calibration_images)
    rows: list[dict[str, Any]] = []
    for precision in ("fp16", "int8"):
        for name in target_names(in_all=True):
            target = get_target(name)
            if precision not in target.precisions or "taps" not in target.features or not target.runs_here():
                continue
            quant = QuantSpec(calibration=calib) if precision == "int8" else None
            artifact, _ = export_artifact(model, name, ExportOptions(precision=precision, size=size), args.out,
                                          checkpoint=ckpt, quant=quant, verify=False)  # fmt: skip
            report = verify_artifact(artifact.folder, model=model, checkpoint=ckpt, num_images=args.images, layers=True)
            rows.append({"target": name, "precision": precision, "pixel_agreement": report["pixel_agreement"],
                         "executor": report["executor"], "layers": report["layers"]})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
            record = {"date": str(datetime.date.today()), "machine": machine_info(), "size": list(size),
                      "images": args.images, "calibration_images": args.calibration_images, "rows": rows}  # fmt: skip
            # Saved after every row: a long run that is stopped keeps what it measured.
            (HERE / "layers.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
            write_markdown(record)


def _sqnr(row: dict[str, Any], tap: str) -> float:
    return next(t["sqnr_db"] for t in row["layers"]["taps"] if t["tap"] == tap)


def write_markdown(record: dict[str, Any]) -> None:
    """LAYERS.md from layers.json: one table per precision, a row per target, a column per tap; then what the
    figures show, computed from them."""
    taps = [t["tap"] for t in record["rows"][0]["layers"]["taps"] if "sqnr_db" in t]
    lines = ["# Where each artifact leaves the float model: SQNR per tap", "",
             f"Measured {record['date']} by `python benchmarks/layers.py --images {record['images']}`: the reference model",
             f"(b0, 8 classes) at {record['size'][0]}x{record['size'][1]}, `verify --layers` on {record['images']} synthetic",
             f"validation scenes; int8 calibrated on {record['calibration_images']} training scenes. SQNR of each tap",
             "against the float model in dB (higher is closer); the last column is the artifact's pixel agreement.", ""]  # fmt: skip
    for precision in ("fp16", "int8"):
        rows = [r for r in record["rows"] if r["precision"] == precision]
        if not rows:
            continue
        lines += [f"## {precision}", "", "| target | " + " | ".join(taps) + " | first divergent | pixel agreement |",
                  "|---" * (len(taps) + 3) + "|"]  # fmt: skip
        for r in rows:
            sqnr = {t["tap"]: t["sqnr_db"] for t in r["layers"]["taps"] if "sqnr_db" in t}
            lines.append(f"| {r['target']} | " + " | ".join(f"{sqnr[t]:.1f}" for t in taps)
                         + f" | {r['layers']['first_divergent'] or '-'} | {100 * r['pixel_agreement']:.2f}% |")  # fmt: skip
        lines.append("")
    int8 = [r for r in record["rows"] if r["precision"] == "int8"]
    if int8:
        lines += ["## What it shows", ""]
        lowest = [min(((t["tap"], t["sqnr_db"]) for t in r["layers"]["taps"] if "sqnr_db" in t), key=lambda s: s[1])[0]
                  for r in int8]  # fmt: skip
        common = max(set(lowest), key=lowest.count)
        fp16 = {r["target"]: r for r in record["rows"] if r["precision"] == "fp16"}
        gaps = [_sqnr(fp16[r["target"]], "logits") - _sqnr(r, "logits") for r in int8 if r["target"] in fp16]
        rises = [_sqnr(r, "logits") - _sqnr(r, common) for r in int8]
        lines += [f"INT8 loses most in {common}: it is the lowest tap of {lowest.count(common)} of {len(int8)} targets. "
                  f"From there the SQNR climbs again by {min(rises):.1f} to {max(rises):.1f} dB up to the logits (later "
                  f"stages and the decoder's fusion average the quantization noise of many channels), so the first "
                  f"tap to look at, when an INT8 artifact of a fine-tuned model disagrees, is {common} (`export --budget` "
                  f"or `--outliers` act there). fp16 stays {min(_sqnr(r, t) for r in fp16.values() for t in taps):.0f} dB "
                  f"or more at every tap of every target, {min(gaps):.0f} to {max(gaps):.0f} dB above INT8 at the logits; "
                  + ("no artifact has a divergent tap at the default thresholds." if not any(
                      r["layers"]["first_divergent"] for r in record["rows"]) else "divergent taps: " + ", ".join(
                      f"{r['target']} {r['precision']} {r['layers']['first_divergent']}" for r in record["rows"]
                      if r["layers"]["first_divergent"]) + "."), ""]  # fmt: skip
        for r in int8:
            sqnr = [(t["tap"], t["sqnr_db"]) for t in r["layers"]["taps"] if "sqnr_db" in t]
            drops = [(b[0], a[1] - b[1]) for a, b in zip(sqnr, sqnr[1:])]
            worst = max(drops, key=lambda d: d[1])
            lines.append(f"- {r['target']} int8: the largest loss between consecutive taps is {worst[1]:.1f} dB, into "
                         f"{worst[0]}; the lowest tap is {min(sqnr, key=lambda s: s[1])[0]} "
                         f"({min(s[1] for s in sqnr):.1f} dB).")  # fmt: skip
        lines.append("")
    (HERE / "LAYERS.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
