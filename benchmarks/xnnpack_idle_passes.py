"""ExecuTorch's idle lowering work skipped, beside all of it run, in one process: XNNPACK's delegate passes and the edge
dialect's where the graph has none of their ops (``IDLE_UNLESS``), and the decompositions before partitioning that find nothing to do
(``idle_decompositions_skipped``: one retrace where ExecuTorch 1.5 makes three).

The b2 int8 graph (the transformers-saved b2 of benchmarks/export_scale.py, 150 classes, 512x512, calibrated on its 16
photo crops, outlier decision from its cache) is captured and quantized once, then lowered by the executorch target's
``convert`` (torch.export, to_edge_transform_and_lower with XNNPACK, to_executorch, the read-back) in turn with both
skips (the default), with only the five passes stop 33 skipped (the eight added after it run), with the passes
skipped and every decomposition, and with neither, ``--rounds`` times. Each
lowering's wall time and the .pte's sha256 are recorded: the programs must be the same byte for byte.

    python benchmarks/xnnpack_idle_passes.py --work /tmp/es          # XNNPACK_IDLE_PASSES.md and .json
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


MODES = ("both skipped", "stop 33's five passes skipped, decompositions skipped", "passes skipped, every decomposition",
         "every pass and decomposition")
# The passes stop 33 skipped (its IDLE_UNLESS): the baseline of the eight added after it.
STOP_33_PASSES = ("PReLUReshapePass", "Conv1dUnsqueezePass", "FuseBatchNormPass", "DecomposeBatchNorm", "DecomposeConcatenate")


def measure(work: Path, rounds: int) -> dict[str, Any]:
    from export_scale import MODELS, _hf_model

    import segformer_edge.converters.executorch as executorch_target
    from segformer_edge.api import _quant_spec, resolve_model
    from segformer_edge.converters.base import ExportOptions
    from segformer_edge.converters.bench import machine_info
    from segformer_edge.converters.build import capture, plan_export, quantize

    size = MODELS["b2"][2]
    net, path = resolve_model(str(_hf_model(work, "b2")))
    options = ExportOptions(precision="int8", size=size)
    quant = _quant_spec(net, path, options, str(work / "photos"), None, 32, "auto", None, "auto", "static", lambda *a, **k: None)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        plan = plan_export(net, "executorch", options, tmp, quant)
        module, example, _ = capture(net, plan)
        module, _ = quantize(module, example, plan)
        every = dict(executorch_target.IDLE_UNLESS)
        for i in range(len(MODES) * rounds):
            mode = MODES[i % len(MODES)]
            if mode == MODES[3]:
                executorch_target.IDLE_UNLESS.clear()
            elif mode == MODES[1]:
                for name in set(every) - set(STOP_33_PASSES):
                    del executorch_target.IDLE_UNLESS[name]
            executorch_target.SKIP_IDLE_DECOMPOSITIONS = mode in MODES[:2]
            file = Path(tmp) / f"{i}.pte"
            try:
                started = time.perf_counter()
                lowered = plan.target.convert(module, example, file, plan)
                seconds = time.perf_counter() - started
            finally:
                executorch_target.IDLE_UNLESS.update(every)
                executorch_target.SKIP_IDLE_DECOMPOSITIONS = True
            runs.append({"mode": mode, "seconds": round(seconds, 1), "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
                         "skipped": lowered["delegation"]["passes_skipped"],
                         "decompositions_skipped": lowered["delegation"]["decompositions_skipped"]})  # fmt: skip
            print(runs[-1], flush=True)
    from importlib.metadata import version

    return {"date": datetime.date.today().isoformat(), "machine": machine_info(), "executorch": version("executorch"),
            "torch": version("torch"), "model": "b2", "size": list(size), "runs": runs}  # fmt: skip


def render(record: dict[str, Any]) -> str:
    runs = record["runs"]
    same = len({r["sha256"] for r in runs}) == 1
    machine = record["machine"]
    lines = [
        "# ExecuTorch's idle lowering work skipped",
        "",
        "Written by `benchmarks/xnnpack_idle_passes.py`: one b2 int8 graph (512x512, 150 classes) captured and quantized "
        "once, then lowered by the executorch target in turn with ExecuTorch's idle passes skipped (XNNPACK's delegate passes "
        "and the edge dialect's that find none of their ops: `converters/executorch.py`, "
        "`IDLE_UNLESS`) and the program decomposed once before partitioning (`idle_decompositions_skipped`; ExecuTorch 1.5 "
        "retraces it three times); with only the five passes stop 33 skipped; with the passes skipped and every decomposition; "
        "and with neither, in one process.",
        f"Machine: {machine.get('cpu', machine.get('machine'))}, {machine.get('cpus')} CPUs; executorch {record['executorch']}, "
        f"torch {record['torch']}; {record['date']}.",
        "",
        "| run | mode | passes skipped | decompositions skipped | lowering (torch.export -> .pte, read back) | .pte sha256 |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        passes = ", ".join(r["skipped"]) or "none"
        lines.append(f"| {i} | {r.get('mode')} | {passes} | {r.get('decompositions_skipped', 0)} | {r['seconds']:.1f} s | `{r['sha256'][:16]}` |")
    medians = {mode: statistics.median(r["seconds"] for r in runs if r.get("mode") == mode) for mode in MODES if any(r.get("mode") == mode for r in runs)}
    base = medians.get(MODES[3])
    lines += ["", "Median per mode: " + "; ".join(f"{mode} {s:.1f} s" + (f" ({s / base:.2f}x)" if base else "") for mode, s in medians.items())
              + f". The programs are {'the same byte for byte' if same else 'NOT the same'}.", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "export-scale")
    parser.add_argument("--rounds", type=int, default=1, help="lowerings per mode")
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args()
    json_path, md_path = HERE / "xnnpack_idle_passes.json", HERE / "XNNPACK_IDLE_PASSES.md"
    if not args.render:
        os.environ.setdefault("XDG_CACHE_HOME", str(args.work / "warm-cache"))  # the decision export_scale recorded
        json_path.write_text(json.dumps(measure(args.work, args.rounds), indent=1) + "\n")
    md_path.write_text(render(json.loads(json_path.read_text())))
    print(md_path.read_text())


if __name__ == "__main__":
    main()
