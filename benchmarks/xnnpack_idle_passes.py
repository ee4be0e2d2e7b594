"""ExecuTorch's XNNPACK passes skipped where the graph has none of their ops, beside every pass run, in one process.

The b2 int8 graph (the transformers-saved b2 of benchmarks/export_scale.py, 150 classes, 512x512, calibrated on its 16
photo crops, outlier decision from its cache) is captured and quantized once, then lowered by the executorch target's
``convert`` (torch.export, to_edge_transform_and_lower with XNNPACK, to_executorch, the read-back) alternately with the
skip (the default) and with every pass, ``--pairs`` times. Each lowering's wall time and the .pte's sha256 are
recorded: the programs must be the same byte for byte.

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


def measure(work: Path, pairs: int) -> dict[str, Any]:
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
        for i in range(2 * pairs):
            mode = "skip" if i % 2 == 0 else "every pass"
            if mode == "every pass":
                executorch_target.IDLE_UNLESS.clear()
            file = Path(tmp) / f"{i}.pte"
            try:
                started = time.perf_counter()
                lowered = plan.target.convert(module, example, file, plan)
                seconds = time.perf_counter() - started
            finally:
                executorch_target.IDLE_UNLESS.update(every)
            runs.append({"mode": mode, "seconds": round(seconds, 1), "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
                         "skipped": lowered["delegation"]["xnnpack_passes_skipped"]})  # fmt: skip
            print(runs[-1], flush=True)
    from importlib.metadata import version

    return {"date": datetime.date.today().isoformat(), "machine": machine_info(), "executorch": version("executorch"),
            "torch": version("torch"), "model": "b2", "size": list(size), "runs": runs}  # fmt: skip


def render(record: dict[str, Any]) -> str:
    runs = record["runs"]
    skip = [r["seconds"] for r in runs if r["mode"] == "skip"]
    every = [r["seconds"] for r in runs if r["mode"] == "every pass"]
    same = len({r["sha256"] for r in runs}) == 1
    machine = record["machine"]
    lines = [
        "# XNNPACK's idle passes skipped",
        "",
        "Written by `benchmarks/xnnpack_idle_passes.py`: one b2 int8 graph (512x512, 150 classes) captured and quantized "
        "once, then lowered by the executorch target alternately with the skip (`converters/executorch.py`, "
        "`IDLE_UNLESS`) and with every pass, in one process.",
        f"Machine: {machine.get('cpu', machine.get('machine'))}, {machine.get('cpus')} CPUs; executorch {record['executorch']}, "
        f"torch {record['torch']}; {record['date']}.",
        "",
        "| run | passes | lowering (torch.export -> .pte, read back) | .pte sha256 |",
        "|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        passes = f"skipped: {', '.join(r['skipped'])}" if r["skipped"] else "every pass"
        lines.append(f"| {i} | {passes} | {r['seconds']:.1f} s | `{r['sha256'][:16]}` |")
    lines += [
        "",
        f"Median {statistics.median(skip):.1f} s with the skip, {statistics.median(every):.1f} s with every pass "
        f"({statistics.median(skip) / statistics.median(every):.2f}x); the programs are "
        f"{'the same byte for byte' if same else 'NOT the same'}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "export-scale")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args()
    json_path, md_path = HERE / "xnnpack_idle_passes.json", HERE / "XNNPACK_IDLE_PASSES.md"
    if not args.render:
        os.environ.setdefault("XDG_CACHE_HOME", str(args.work / "warm-cache"))  # the decision export_scale recorded
        json_path.write_text(json.dumps(measure(args.work, args.pairs), indent=1) + "\n")
    md_path.write_text(render(json.loads(json_path.read_text())))
    print(md_path.read_text())


if __name__ == "__main__":
    main()
