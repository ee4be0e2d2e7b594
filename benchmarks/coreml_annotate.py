"""Core ML's PT2E annotation with the model's code generated only when its graph changed, beside it generated before
every pattern (as Core ML's quantizer does), in one process.

Core ML's quantizer runs ``eliminate_dead_code()`` and ``recompile()`` on the whole model before matching each of its
~400 patterns; converters/coreml.py runs its ``annotate`` inside ``recompiled_only_when_changed``. The b2 int8 graph
(the transformers-saved b2 of benchmarks/export_scale.py, 150 classes, 512x512) is captured once; its pattern graphs are
traced once (a first prepare, not timed: each process traces them once either way); then ``prepare_pt2e`` (where
``annotate`` runs) is timed on a fresh copy of the graph with each quantizer in turn, ``--rounds`` times, one thread
(as a worker of ``--target all`` has). Each run's prepared code must be the same, annotations included.

    python benchmarks/coreml_annotate.py --work /tmp/es          # COREML_ANNOTATE.md and .json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

MODES = ("code generated before every pattern", "code generated when the graph changed")


def measure(work: Path, rounds: int) -> dict[str, Any]:
    import torch
    from export_scale import MODELS, _hf_model
    from segformer_edge.calibration.recipes import SpecQuantizer
    from segformer_edge.converters import get_target
    from segformer_edge.converters.base import ExportOptions
    from segformer_edge.converters.bench import machine_info
    from segformer_edge.converters.build import capture, plan_export
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from segformer_edge.api import _quant_spec, resolve_model

    torch.set_num_threads(1)
    size = MODELS["b2"][2]
    net, path = resolve_model(str(_hf_model(work, "b2")))
    options = ExportOptions(precision="int8", size=size)
    quant = _quant_spec(net, path, options, str(work / "photos"), None, 32, "auto", None, "auto", "static", lambda *a, **k: None)
    with tempfile.TemporaryDirectory() as tmp:
        plan = plan_export(net, "coreml", options, tmp, quant)
        module, example, _ = capture(net, plan)  # what the export quantizes
    graph = torch.export.export(module, (example,)).module(check_guards=False)
    spec = plan.quant or quant
    wrapped = get_target("coreml").pt2e_quantizer(spec)
    quantizers = {MODES[0]: wrapped._inner, MODES[1]: wrapped}
    prepare_pt2e(copy.deepcopy(graph), SpecQuantizer(wrapped, spec))  # traces the pattern graphs, once per process
    generated: list[int] = []
    real = torch.fx.GraphModule.recompile

    def counted(self: torch.fx.GraphModule) -> Any:  # the model's code generations (the patterns have a few nodes)
        generated.extend([1] if len(self.graph.nodes) > 100 else [])
        return real(self)

    torch.fx.GraphModule.recompile = counted  # type: ignore[method-assign]
    runs = []
    try:
        for i in range(len(MODES) * rounds):
            mode = MODES[i % len(MODES)]
            model = copy.deepcopy(graph)
            generated.clear()
            started = time.perf_counter()
            prepared = prepare_pt2e(model, SpecQuantizer(quantizers[mode], spec))
            seconds = time.perf_counter() - started
            notes = "\n".join(f"{n.name} {n.meta.get('quantization_annotation')!r}" for n in model.graph.nodes)
            runs.append({"mode": mode, "seconds": round(seconds, 1), "code_generations": len(generated),
                         "code_sha256": hashlib.sha256(prepared.code.encode()).hexdigest(),
                         "annotations_sha256": hashlib.sha256(notes.encode()).hexdigest()})  # fmt: skip
            print(runs[-1], flush=True)
    finally:
        torch.fx.GraphModule.recompile = real  # type: ignore[method-assign]
    from importlib.metadata import version

    return {"date": datetime.date.today().isoformat(), "machine": machine_info(), "executorch": version("executorch"),
            "torch": version("torch"), "torchao": version("torchao"), "model": "b2", "size": list(size),
            "nodes": len(graph.graph.nodes), "runs": runs}  # fmt: skip


def render(record: dict[str, Any]) -> str:
    runs, machine = record["runs"], record["machine"]
    same = len({(r["code_sha256"], r["annotations_sha256"]) for r in runs}) == 1
    lines = [
        "# Core ML's PT2E annotation: the model's code generated only when its graph changed",
        "",
        "Written by `benchmarks/coreml_annotate.py`: the b2 graph (512x512, 150 classes, "
        f"{record['nodes']} nodes) prepared for int8 by Core ML's PT2E quantizer (`prepare_pt2e`, where `annotate` runs) on a "
        "fresh copy each run, one thread, with the quantizer as it comes (dead code removed and the model's code generated "
        "before each pattern) and inside `recompiled_only_when_changed` (converters/coreml.py), in one process; the pattern "
        "graphs were traced once before the first run. `code generations`: the model's `recompile()` calls that did the work.",
        f"Machine: {machine.get('cpu', machine.get('machine'))}, {machine.get('cpus')} CPUs; executorch {record['executorch']}, "
        f"torch {record['torch']}, torchao {record['torchao']}; {record['date']}.",
        "",
        "| run | mode | prepare_pt2e | code generations | prepared code sha256 | annotations sha256 |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        lines.append(f"| {i} | {r['mode']} | {r['seconds']:.1f} s | {r['code_generations']} | `{r['code_sha256'][:16]}` | "
                     f"`{r['annotations_sha256'][:16]}` |")  # fmt: skip
    medians = {mode: statistics.median(r["seconds"] for r in runs if r["mode"] == mode) for mode in MODES}
    base = medians[MODES[0]]
    lines += ["", "Median: " + "; ".join(f"{mode} {s:.1f} s ({s / base:.2f}x)" for mode, s in medians.items())
              + f". The prepared graphs are {'the same, code and annotations' if same else 'NOT the same'}.", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "export-scale")
    parser.add_argument("--rounds", type=int, default=2, help="prepares per mode")
    parser.add_argument("--render", action="store_true")
    from setups import measure_or_render

    md_path = HERE / "COREML_ANNOTATE.md"
    measure_or_render(parser.parse_args(), lambda a: measure(a.work, a.rounds), lambda record: md_path.write_text(render(record)),
                      HERE / "coreml_annotate.json")  # fmt: skip
    print(md_path.read_text())

if __name__ == "__main__":
    main()
