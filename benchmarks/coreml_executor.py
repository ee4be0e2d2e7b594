"""The Core ML reference executor (converters/mil_executor.py, Core ML parity off macOS) against an older version of it,
each verifying the same b2 int8 Core ML program in a fresh process, one after the other.

Off macOS, an int8 Core ML export's verify runs its ML program in this numpy executor; with the targets side by side
(``--target all``) that verify was the longest step of the run. The program is the transformers-saved b2 of
benchmarks/export_scale.py (150 classes, 512x512) exported once for Core ML int8, calibrated on that script's 16 photo
crops; each run is ``verify_artifact`` on those 16 photos with one thread (as a worker of ``--target all`` has), in a
process of its own: its wall time, the executor's share of it, the process's peak RSS, and the artifact's logits on the
first photo (the versions must agree on them). The older version is ``converters/mil_executor.py`` as it was at
``--baseline`` (a commit), loaded in place of the current one.

    python benchmarks/coreml_executor.py --work /tmp/es --baseline 515801e     # COREML_EXECUTOR.md and .json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_CHILD = r"""
import importlib.util, json, resource, sys, time
spec = json.loads(sys.argv[1])
import numpy as np
import torch
torch.set_num_threads(1)
if spec["source"]:  # the older executor, loaded under the current one's name before anything imports it
    loaded = importlib.util.spec_from_file_location("segformer_edge.converters.mil_executor", spec["source"])
    module = importlib.util.module_from_spec(loaded)
    sys.modules[loaded.name] = module
    loaded.loader.exec_module(module)
from segformer_edge.converters import mil_executor
from segformer_edge.converters.parity import verify_artifact

spent, first = [0.0], []
call = mil_executor.MilProgram.__call__
def timed(self, **inputs):
    started = time.perf_counter()
    out = call(self, **inputs)
    spent[0] += time.perf_counter() - started
    if not first:
        first.append(next(iter(out.values())))
    return out
mil_executor.MilProgram.__call__ = timed
started = time.perf_counter()
report = verify_artifact(spec["artifact"], checkpoint=spec["model"], data=spec["photos"], num_images=spec["images"])
wall = time.perf_counter() - started
np.save(spec["logits"], first[0])
print("RESULT " + json.dumps({"verify_s": wall, "executor_s": spent[0], "images": spec["images"],
                              "pixel_agreement": report["pixel_agreement"],
                              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _artifact(work: Path) -> tuple[Path, Path, Path]:
    """The b2 int8 Core ML artifact (exported once into ``work``), its model and the photos."""
    from export_scale import _hf_model

    from segformer_edge.api import export

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_photo_folder
    from export_scale import PHOTOS

    model, photos, out = _hf_model(work, "b2"), work / "photos", work / "coreml-executor"
    if not photos.is_dir():
        make_photo_folder(photos, n=PHOTOS)
    folder = next(out.glob("*_coreml_int8"), None) if out.is_dir() else None
    if folder is None or not (folder / "manifest.json").is_file():
        os.environ.setdefault("XDG_CACHE_HOME", str(work / "warm-cache"))  # the decision export_scale recorded
        export(str(model), "coreml", "int8", data=str(photos), out=str(out), size=(512, 512), verify=False)
        folder = next(out.glob("*_coreml_int8"))
    return folder, model, photos


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"the {spec['version']} run failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")
    return json.loads(line[len("RESULT ") :])


def measure(work: Path, baseline: str, images: int, rounds: int) -> dict[str, Any]:
    import numpy as np
    from segformer_edge.converters.bench import machine_info

    artifact, model, photos = _artifact(work)
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "mil_executor_baseline.py"
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{baseline}:converters/mil_executor.py"], capture_output=True, text=True, check=True)
        old.write_text(source.stdout)
        runs = []
        for i in range(2 * rounds):
            version = ("baseline", "this code")[i % 2]
            logits = Path(tmp) / f"{i}.npy"
            spec = {"version": version, "source": str(old) if version == "baseline" else None, "artifact": str(artifact),
                    "model": str(model), "photos": str(photos), "images": images, "logits": str(logits)}  # fmt: skip
            result = _run(spec)
            result["version"] = version
            result["logits"] = np.load(logits)
            runs.append(result)
            print({k: v for k, v in result.items() if k != "logits"}, flush=True)
        reference = runs[0]["logits"]
        for r in runs:
            r["max_logit_difference_vs_baseline"] = float(np.abs(r.pop("logits").astype(np.float64) - reference).max())
    from importlib.metadata import version as package_version

    return {"date": datetime.date.today().isoformat(), "machine": machine_info(), "baseline": baseline,
            "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip(),
            "numpy": package_version("numpy"), "scipy": package_version("scipy"), "coremltools": package_version("coremltools"),
            "images": images, "runs": runs}  # fmt: skip


def render(record: dict[str, Any]) -> str:
    machine = record["machine"]
    lines = [
        "# The Core ML reference executor: verify of a b2 int8 program",
        "",
        "Written by `benchmarks/coreml_executor.py`: the b2 int8 Core ML program (transformers-saved b2, 150 classes, 512x512, "
        f"calibrated on 16 photo crops) verified on {record['images']} photos by `verify_artifact`, one thread, each run in a fresh "
        f"process, with the reference executor as it was at `{record['baseline']}` (baseline) and as it is at `{record['commit']}` "
        "(this code), one after the other. `executor`: the time spent in the ML program (the rest of verify is the float model "
        "and the comparison, the same code in both); `peak RSS`: the process's.",
        f"Machine: {machine.get('cpu', machine.get('machine'))}, {machine.get('cpus')} CPUs; numpy {record['numpy']}, scipy "
        f"{record['scipy']}, coremltools {record['coremltools']}; {record['date']}.",
        "",
        "| run | version | verify | executor | per image | peak RSS | pixel agreement | max logit difference vs baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(record["runs"], 1):
        lines.append(f"| {i} | {r['version']} | {r['verify_s']:.1f} s | {r['executor_s']:.1f} s | {r['executor_s'] / record['images']:.2f} s | "
                     f"{r['peak_rss_mb'] / 1024:.2f} GiB | {100 * r['pixel_agreement']:.2f}% | {r['max_logit_difference_vs_baseline']:.2g} |")  # fmt: skip
    mean = lambda version, key: sum(r[key] for r in record["runs"] if r["version"] == version) / sum(r["version"] == version for r in record["runs"])
    base, now = mean("baseline", "executor_s"), mean("this code", "executor_s")
    lines += ["", f"This code's executor time is {now / base:.2f}x the baseline's ({base:.1f} -> {now:.1f} s for {record['images']} images); "
              f"verify {mean('baseline', 'verify_s'):.1f} -> {mean('this code', 'verify_s'):.1f} s; peak RSS "
              f"{mean('baseline', 'peak_rss_mb') / 1024:.2f} -> {mean('this code', 'peak_rss_mb') / 1024:.2f} GiB.", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "export-scale")
    parser.add_argument("--baseline", default="515801e", help="the commit whose executor is the baseline")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each version")
    parser.add_argument("--render", action="store_true")
    from setups import measure_or_render

    md_path = HERE / "COREML_EXECUTOR.md"
    measure_or_render(parser.parse_args(), lambda a: measure(a.work, a.baseline, a.images, a.rounds), lambda record: md_path.write_text(render(record)),
                      HERE / "coreml_executor.json")  # fmt: skip
    print(md_path.read_text())

if __name__ == "__main__":
    main()
