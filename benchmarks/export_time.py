"""What Core ML's int8 export costs with its quantizer's pattern graphs traced strict (torchao's way) and non-strict
(converters/coreml.py ``_trace_pattern``, the default): the same quantized graph, op for op.

Each export runs in a fresh process (the pattern graphs are traced once per process, so a process that exported
before would hide the cost), strict and non-strict interleaved for ``--rounds`` rounds: the built-in reference
model (b0, 8 classes), int8, calibrated on 8 synthetic scenes, no verify; the wall time of ``export_artifact``.

Writes benchmarks/export_time.json and benchmarks/EXPORT_TIME.md (from the JSON alone).

    python benchmarks/export_time.py [--size 128] [--rounds 2]
    python benchmarks/export_time.py --render
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
JSON_PATH = HERE / "export_time.json"
MD_PATH = HERE / "EXPORT_TIME.md"
MODES = ("strict", "non-strict")

_ONE_EXPORT = """
import json, sys, tempfile, time
from pathlib import Path
import segformer_edge.converters.coreml as coreml
if sys.argv[1] == "strict":  # torchao's own tracer, as the Core ML quantizer ships
    from torchao.quantization.pt2e.utils import _get_aten_graph_module_for_pattern
    coreml._trace_pattern = _get_aten_graph_module_for_pattern
traced, calls = coreml._trace_pattern, []
coreml._trace_pattern = lambda *args, **kwargs: calls.append(1) or traced(*args, **kwargs)
from segformer_edge.calibration.calibset import select_calibration_set
from segformer_edge.calibration.spec import QuantSpec
from segformer_edge.converters.base import ExportOptions
from segformer_edge.converters.pipeline import export_artifact
from segformer_edge.weights import builtin_checkpoint, load_pretrained
size = (int(sys.argv[2]), int(sys.argv[2]))
model = load_pretrained(builtin_checkpoint())
calib = select_calibration_set("synthetic:32", 8, size, model.config.num_classes)
start = time.perf_counter()
artifact, _ = export_artifact(model, "coreml", ExportOptions(size=size, precision="int8"), Path(tempfile.mkdtemp()),
                              quant=QuantSpec(calibration=calib), verify=False)
manifest = artifact.manifest
print(json.dumps({"seconds": time.perf_counter() - start, "patterns": len(calls), "versions": manifest["tool_versions"],
                  "model": f"{manifest['variant']}, {manifest['num_classes']} classes",
                  "calibration": f"{manifest['quantization']['calibration']['images']} images of {manifest['quantization']['calibration']['data']}",
                  "ops_by_group": manifest["quantization"]["applied"]["ops_by_group"]}))
"""


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from segformer_edge.converters.bench import machine_info

    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            with tempfile.TemporaryDirectory() as cwd:
                done = subprocess.run([sys.executable, "-c", _ONE_EXPORT, mode.split("-")[0], str(args.size)], cwd=cwd,
                                      capture_output=True, text=True, check=True)  # fmt: skip
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    same = all(r["ops_by_group"] == runs[MODES[0]][0]["ops_by_group"] for m in MODES for r in runs[m])
    return {"date": str(datetime.date.today()), "machine": machine_info(), "size": args.size, "rounds": args.rounds,
            "versions": runs[MODES[0]][0]["versions"], "same_quantized_ops": same,
            "patterns_traced": sorted({r["patterns"] for m in MODES for r in runs[m]}),
            "model": runs[MODES[0]][0]["model"], "calibration": runs[MODES[0]][0]["calibration"],
            "seconds": {m: [round(r["seconds"], 2) for r in runs[m]] for m in MODES}}  # fmt: skip


def render(record: dict[str, Any]) -> None:
    med = {m: statistics.median(record["seconds"][m]) for m in MODES}
    lines = ["# Core ML int8 export time: the quantizer's pattern graphs traced strict or non-strict", "",
             f"Measured {record['date']} by `python benchmarks/export_time.py` on {record['machine']['machine']} "
             f"({record['machine'].get('cpu', '?')}, {record['machine']['cpus']} CPUs), {record['rounds']} interleaved "
             "rounds, each export in a fresh process. Versions: "
             + ", ".join(f"{k} {v}" for k, v in sorted(record["versions"].items())) + ".", "",
             (f"The built-in reference model ({record['model']}, from the manifest) at {record['size']}x{record['size']}, "
             f"int8, calibrated on {record['calibration']}, no verify: the wall time of `export_artifact`. Core ML's PT2E quantizer traced "
             f"{' or '.join(map(str, record['patterns_traced']))} pattern graphs in each process (its first quantization); "
             "the export traces them non-strict (same graphs: "
             "tests/test_int8.py). Quantized and float ops per layer group, read from each artifact's manifest, "
             f"{'the same' if record['same_quantized_ops'] else 'DIFFERENT'} in every run."), "",
             "| pattern tracing | export seconds (each run) | median | vs strict |", "|---|---|---|---|"]  # fmt: skip
    for m in MODES:
        runs = ", ".join(f"{s:.1f}" for s in record["seconds"][m])
        lines.append(f"| {m} | {runs} | {med[m]:.1f} | {med['strict'] / med[m]:.2f}x |")
    lines.append("")
    MD_PATH.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--render", action="store_true", help="only rewrite EXPORT_TIME.md from the JSON")
    args = parser.parse_args()
    if not args.render:
        JSON_PATH.write_text(json.dumps(measure(args), indent=2) + "\n")
    render(json.loads(JSON_PATH.read_text()))


if __name__ == "__main__":
    main()
