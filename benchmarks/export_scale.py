"""What one export costs as the model and the input grow: wall time per phase and peak RSS, each export in a fresh
process, b0/b1/b2/b5 at 512x512 with 150 classes and b0 at 1024x2048 with 19 classes, int8 and fp32, per target.

Each model is a transformers ``SegformerForSemanticSegmentation`` of the variant's shape (seeded random weights, saved
with ``save_pretrained``: nothing can be downloaded) and the data a folder of 16 crops of real photos; the export is
``segformer_edge.export(MODEL, target, precision, data=photos, size=...)`` with its defaults (verify included), as
``segformer-edge export MODEL --target T --precision P --data photos/ --size HxW`` runs it. Each job runs in its own
process with an empty ``$XDG_CACHE_HOME`` (no outlier decision recorded by an earlier job is reused: every export
is measured as a first export), but for ``:warm`` jobs, which share one cache: the first warm job of a model makes the
decision and the others reuse it, as a user's later exports of a model do (each row says which). The phases come from the export's progress steps (the outlier decision is timed
inside capture); the peak RSS of each phase is sampled every 50 ms, the job's peak is the kernel's (``wait4``'s
``ru_maxrss``, helper processes included).

``--tree DIR --label before`` runs the same jobs on another checkout of the project (``git worktree add DIR REF``),
so that before and after are measured by one script on one machine.

    python benchmarks/export_scale.py --only b2:int8:executorch,b2:int8:all     # some jobs (model:precision:target)
    python benchmarks/export_scale.py                                           # every job (hours on 2 cores)
    python benchmarks/export_scale.py --tree /tmp/before --label before --only b2:int8:executorch
    python benchmarks/export_scale.py --render                                  # EXPORT_SCALE.md from the .json

Jobs already in export_scale.json with the same label are measured again only with ``--again``; the .json keeps
every job's machine and date, and the table says them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
JSON_PATH, MD_PATH = HERE / "export_scale.json", HERE / "EXPORT_SCALE.md"
TARGETS = ("executorch", "tflite", "onnx", "openvino")
# Flags after model:precision:target: warm (the outlier decision recorded by an earlier job), jobs1 (--jobs 1: the
# targets of --target all one after the other), as-trained (--decoder as-trained: the fuse conv as trained).
FLAGS = ("warm", "jobs1", "as-trained")
PHOTOS = 16

# name: (transformers SegformerConfig fields, classes, export size)
MODELS: dict[str, tuple[dict[str, Any], int, tuple[int, int]]] = {
    "b0": ({"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256}, 150, (512, 512)),
    "b1": ({"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256}, 150, (512, 512)),
    "b2": ({"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "decoder_hidden_size": 768}, 150, (512, 512)),
    "b5": ({"hidden_sizes": [64, 128, 320, 512], "depths": [3, 6, 40, 3], "decoder_hidden_size": 768}, 150, (512, 512)),
    "b0-1024x2048": ({"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256}, 19, (1024, 2048)),
}  # fmt: skip


def all_jobs() -> list[str]:
    """model:precision:target[:warm], in the order they run: the issue's matrix (every export its own first: cold), b2
    int8 per target with the outlier decision recorded before (warm), and b2's --target all."""
    warm = [f"b2:int8:{t}:warm" for t in TARGETS]
    return [*(f"{m}:{p}:{t}" for m in MODELS for p in ("int8", "fp32") for t in TARGETS), *warm, "b2:int8:all"]


# The child: one export, its phases and the RSS of each. argv: job json.
_CHILD = r"""
import json, os, resource, sys, threading, time
started = time.perf_counter()
job = json.loads(sys.argv[1])
if job.get("tree"):  # another checkout: its package, and its converters/calibration before an installed copy's
    sys.path.insert(0, job["tree"])
    import segformer_edge
    sys.meta_path.sort(key=lambda f: type(f).__name__ != "_SourceTreeFinder")
    assert segformer_edge.__file__.startswith(job["tree"]), segformer_edge.__file__
import segformer_edge
import segformer_edge.converters.build as build
from segformer_edge.errors import SegformerEdgeError

marks, phase, peaks = [("import", started)], ["import"], {}
target_peaks, current = {}, [""]  # per target of the run: its peak RSS
page = os.sysconf("SC_PAGE_SIZE")

def tree_rss():
    # RSS of this process and every descendant (targets exported side by side run in worker processes), summed:
    # pages two processes share count twice, so it errs high.
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, ValueError):
            pass
    return total

def sample():
    tick = 0
    while True:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * page
        if tick % 5 == 0:  # the tree every 0.25 s: a walk of /proc
            rss = max(rss, tree_rss())
        tick += 1
        peaks[phase[0]] = max(peaks.get(phase[0], 0), rss)
        peaks["tree"] = max(peaks.get("tree", 0), rss)
        if current[0]:
            target_peaks[current[0]] = max(target_peaks.get(current[0], 0), rss)
        time.sleep(0.05)

threading.Thread(target=sample, daemon=True).start()

def enter(name):
    marks.append((name, time.perf_counter()))
    phase[0] = name

def on_step(task, step, done):
    if task == "calibration":
        enter("calibration" if not done else "load")
    elif not done and step != "plan":
        enter(step)
    if task != "calibration":
        current[0] = task.split()[0]

decide = build.rewrite_outliers
def rewrite_outliers(model, plan):
    back = phase[0]  # capture (or the whole CLI export)
    enter("outlier decision")
    try:
        return decide(model, plan)
    finally:
        enter(back)
build.rewrite_outliers = rewrite_outliers

enter("load")
status, figures, decisions = "landed", {}, {}
if hasattr(segformer_edge, "export"):  # the Python API: every step heard
    try:
        extra = {k: job[k] for k in ("jobs", "decoder") if job.get(k) is not None}  # options of this stop's code
        result = segformer_edge.export(job["model"], target=job["target"], precision=job["precision"], data=job["photos"],
                                       out=job["out"], size=job["size"], on_step=on_step, **extra)
        artifacts = result if isinstance(result, dict) else {job["target"]: result}
        figures = {name: a.parity.to_dict() if a.parity else None for name, a in artifacts.items()}
        decisions = {name: ((a.manifest.get("quantization") or {}).get("applied", {}).get("outliers") or {}).get("decision")
                     for name, a in artifacts.items()}
    except SegformerEdgeError as exc:
        status = f"error: {exc}"[:300]
        report = getattr(exc, "report", None)
        if report is not None:
            status, figures = "parity failed", {job["target"]: report}
else:  # a checkout from before the API: its CLI, in this process (phases: the outlier decision only)
    from pathlib import Path
    from segformer_edge.cli.app import main
    enter("whole export (CLI)")
    try:
        main(["export", job["model"], "--target", job["target"], "--precision", job["precision"], "--data", job["photos"],
              "--out", job["out"], "--size", *map(str, job["size"])])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    status = "landed" if code == 0 else "parity failed" if code == 1 else f"error: exit {code}"
    for manifest in Path(job["out"]).glob("*/manifest.json"):
        figures[json.loads(manifest.read_text())["target"]] = json.loads(manifest.read_text()).get("parity")
enter("done")
times = {}
for (name, t0), (_, t1) in zip(marks, marks[1:]):
    times[name] = times.get(name, 0.0) + t1 - t0
usage = resource.getrusage(resource.RUSAGE_SELF)
keep = ("pixel_agreement", "estimated_miou_drop_points", "max_abs_diff", "images", "passed")
print("RESULT " + json.dumps({"status": status, "phases": times, "phase_peak_rss": peaks, "target_peak_rss": target_peaks, "cpu_s": sum(u.ru_utime + u.ru_stime for u in (usage, resource.getrusage(resource.RUSAGE_CHILDREN))),
                               "parity": {n: {k: r.get(k) for k in keep} if r else None for n, r in figures.items()},
                               "decision": {n: ("reused" if d.get("reused") else "made") if d else None for n, d in decisions.items()}}))
"""


def _hf_model(work: Path, name: str) -> Path:
    """The transformers checkpoint of ``name`` (made once in ``work``)."""
    folder = work / "models" / name
    if (folder / "config.json").is_file():
        return folder
    import torch
    import transformers

    fields, classes, _ = MODELS[name]
    torch.manual_seed(0)
    names = {i: f"class_{i}" for i in range(classes)}
    config = transformers.SegformerConfig(num_labels=classes, id2label=names, label2id={v: k for k, v in names.items()},
                                          num_attention_heads=[1, 2, 5, 8], sr_ratios=[8, 4, 2, 1], **fields)  # fmt: skip
    transformers.SegformerForSemanticSegmentation(config).eval().save_pretrained(folder)
    return folder


def run_job(job: str, work: Path, tree: Path | None) -> dict[str, Any]:
    """One export in a fresh process: its phases, peaks and status."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import make_photo_folder

    model, precision, target, *flags = job.split(":")
    unknown = set(flags) - set(FLAGS)
    if unknown:
        raise SystemExit(f"{job}: unknown flag {', '.join(sorted(unknown))}; choose from {', '.join(FLAGS)}")
    photos = work / "photos"
    if not photos.is_dir():
        make_photo_folder(photos, n=PHOTOS)
    size = list(MODELS[model][2])
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"model": str(_hf_model(work, model)), "precision": precision, "target": target, "photos": str(photos),
                "out": str(Path(tmp) / "out"), "size": size, "tree": str(tree) if tree else None,
                "jobs": 1 if "jobs1" in flags else None, "decoder": "as-trained" if "as-trained" in flags else None}  # fmt: skip
        # A ":warm" job shares one cache with the other warm jobs of the work folder: its outlier decision was recorded
        # by an earlier export of the same model and photos (the first warm job of a model makes it: its row says so).
        xdg = work / "warm-cache" if "warm" in flags else Path(tmp) / "cache"
        env = {**os.environ, "XDG_CACHE_HOME": str(xdg)}
        if tree is not None:  # every process of the export, the spawned workers too, imports the tree's package
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [_tree_site(Path(tmp)), env.get("PYTHONPATH")]))
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(spec)], cwd=tmp, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        output = proc.stdout.read() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
    line = next((x for x in reversed(output.splitlines()) if x.startswith("RESULT ")), None)
    if line is None:
        return {"job": job, "status": f"crashed (exit {proc.returncode}): {output[-300:]}", "wall_s": wall,
                "peak_rss_mb": usage.ru_maxrss / 1024}  # fmt: skip
    result = json.loads(line[len("RESULT ") :])
    # The kernel's peak is the largest single process's; with workers side by side their sampled sum is higher.
    peak = max(usage.ru_maxrss * 1024, result["phase_peak_rss"].get("tree", 0))
    return {"job": job, "model": model, "precision": precision, "target": target, "size": size, "classes": MODELS[model][1],
            "wall_s": round(wall, 1), "peak_rss_mb": round(peak / 2**20), "cpu_s": round(result["cpu_s"], 1),
            "status": result["status"], "phases_s": {k: round(v, 1) for k, v in result["phases"].items()},
            "phase_peak_rss_mb": {k: round(v / 2**20) for k, v in result["phase_peak_rss"].items()},
            "target_peak_rss_mb": {k: round(v / 2**20) for k, v in result.get("target_peak_rss", {}).items()},
            "parity": result["parity"], "outlier_decision": result.get("decision"), "cache": "warm" if "warm" in flags else "cold", "flags": flags}  # fmt: skip


_TREE_SITE = """import sys
# An editable install maps segformer_edge.converters and .calibration to its own checkout ahead of the finder another
# checkout's package installs: a --tree run's workers (spawned, they start afresh) imported this checkout's converters.
sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "__name__", type(f).__name__) != "_EditableFinder"]
"""


def _tree_site(folder: Path) -> str:
    """A folder holding a ``sitecustomize`` that drops the editable install's finder in every process that starts."""
    site = folder / "tree-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_TREE_SITE)
    return str(site)


def _commit(tree: Path | None) -> str:
    """The measured checkout's commit, ``+`` where its package code (not the benchmarks or docs) had changes."""
    where = str(tree or HERE.parent)
    head = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    code = ["segformer_edge", "converters", "calibration", "pyproject.toml"]
    dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no", "--", *code],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return head + ("+" if dirty else "") if head else "unknown"


def _record_head(tree: Path | None = None) -> dict[str, Any]:
    from importlib.metadata import version

    from segformer_edge.converters.bench import machine_info

    return {"date": datetime.date.today().isoformat(), "machine": machine_info(), "commit": _commit(tree),
            "versions": {n: version(n) for n in ("torch", "executorch", "ai-edge-litert", "onnxruntime", "openvino", "transformers")}}  # fmt: skip


def measure(args: argparse.Namespace) -> None:
    record = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {"rows": []}
    jobs = args.only.split(",") if args.only else all_jobs()
    for job in jobs:
        if job.split(":")[0] not in MODELS:
            raise SystemExit(f"{job}: unknown model; choose one of {', '.join(MODELS)}")
        if not args.again and any(r["job"] == job and r.get("label") == args.label for r in record["rows"]):
            print(f"{job} ({args.label}): measured already (--again measures it again)")
            continue
        print(f"{job} ({args.label}) ...", flush=True)
        row = {**run_job(job, args.work, args.tree), "label": args.label, **_record_head(args.tree)}
        print(f"  {row['status']}: {row['wall_s']:.0f} s, peak {row['peak_rss_mb']} MB, {row.get('phases_s')}", flush=True)
        record["rows"] = [r for r in record["rows"] if not (r["job"] == job and r.get("label") == args.label)] + [row]
        tmp = JSON_PATH.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(JSON_PATH)


LIMITS = {"wall_s": 180.0, "peak_gib": 4.0, "all_ratio": 2.5, "big_gib": 24.0}  # issue 27's acceptance


def _parity(r: dict[str, Any]) -> str:
    """'(parity on 16 images: pixel agreement 92.4%, estimated mIoU drop 0.001)' from a row's parity block."""
    report = next(iter((r.get("parity") or {}).values()), None) or {}
    if not report:
        return ""
    drop = report.get("estimated_miou_drop_points")
    return (f"(parity on {report['images']} images: pixel agreement {100 * report['pixel_agreement']:.1f}%"
            + (f", estimated mIoU drop {drop:.3f}" if drop is not None else "") + ")")


# (label, label): the same job on one stop's code and then on the next's, one after the other in one hour (this
# machine's pace moves by a third between hours: only such pairs compare).
SAME_HOUR = (("stop 32, same hour", "stop 33"), ("stop 33, same hour", "stop 34, beside stop 33"),
             ("stop 34, same hour", "after, beside stop 34"))


def _summary(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 27's acceptance, read from the rows: what holds and what does not."""

    def find(job: str, label: str | None = None) -> dict[str, Any] | None:
        """The landed row of ``job`` with ``label``; without one, this code's (``after``, else ``after, beside ...``)."""
        labels = [label] if label else ["after", *sorted({r["label"] for r in rows if r["label"].startswith("after, beside")})]
        return next((r for lab in labels for r in rows if r["job"] == job and r["label"] == lab and r["status"] == "landed"), None)

    def fits(r: dict[str, Any]) -> str:
        ok = r["wall_s"] <= LIMITS["wall_s"] and r["peak_rss_mb"] / 1024 <= LIMITS["peak_gib"]
        return f"{r['wall_s'] / 60:.1f} min, {r['peak_rss_mb'] / 1024:.2f} GiB ({'within' if ok else 'NOT within'})"

    out = ["What the rows say of the goals (b2 at 512x512 int8 within 3 min and 4 GiB per target with verify; "
           "`--target all` within 2.5x one target; b5 int8 and b0 at 1024x2048 fp32 within 24 GiB):", ""]  # fmt: skip
    for target in TARGETS:
        parts = []
        for job in (f"b2:int8:{target}", f"b2:int8:{target}:warm"):
            r = find(job) or find(job, "stop 34") or find(job, "stop 32")  # this code's row, else the last stop's measured
            if r is not None:  # a warm job made the decision where it ran first: the row says which
                made = "made" in (r.get("outlier_decision") or {}).values()
                code = "" if r["label"].startswith("after") else f" ({r['label']} code)"
                parts.append(f"{'decision made in the export' if made else 'decision recorded by an earlier export'}{code}: {fits(r)}")
        if any(parts):
            out.append(f"- b2 int8 {target}: " + "; ".join(p for p in parts if p) + ".")
    for earlier, later in SAME_HOUR:  # a stop's code and the next one's, measured one after the other
        same_hour, then = find("b2:int8:executorch", earlier), find("b2:int8:executorch", later)
        if same_hour and then:
            phases = ", ".join(f"{k} {same_hour['phases_s'].get(k, 0):.0f} -> {then['phases_s'].get(k, 0):.0f} s"
                               for k in ("calibration", "outlier decision", "quantize", "lower", "verify"))  # fmt: skip
            code = "this code" if later.startswith("after") else f"{later.split(',')[0]}'s code"
            out.append(f"- b2 int8 executorch, {earlier.removesuffix(', same hour')}'s code and {code} one after the other: "
                       f"{same_hour['wall_s'] / 60:.1f} -> {then['wall_s'] / 60:.1f} min ({then['wall_s'] / same_hour['wall_s']:.2f}x; "
                       f"{phases}): {fits(then)}.")  # fmt: skip
        same_hour, then = find("b2:int8:all", earlier), find("b2:int8:all", later)
        if same_hour and then:
            out.append(f"- b2 int8 --target all, {earlier.removesuffix(', same hour')}'s code and {code} one after the other: "
                       f"{same_hour['wall_s'] / 60:.1f} -> {then['wall_s'] / 60:.1f} min ({then['wall_s'] / same_hour['wall_s']:.2f}x; "
                       f"CPU time {same_hour['cpu_s']:.0f} -> {then['cpu_s']:.0f} s).")  # fmt: skip
    after = find("b2:int8:executorch")
    before = next((r for r in rows if r["job"] == "b2:int8:executorch" and r["label"] == "before"), None)
    if before and after:
        out.append(f"- b2 int8 executorch, the code before issue 27 (its CLI): {before['wall_s'] / 60:.1f} min, "
                   f"{before['peak_rss_mb'] / 1024:.2f} GiB, {before['status']} {_parity(before)}; after: "
                   f"{after['wall_s'] / 60:.1f} min, {after['peak_rss_mb'] / 1024:.2f} GiB, {after['status']} {_parity(after)}.")  # fmt: skip
    every = [r for r in rows if r["job"] in ("b2:int8:all", "b2:int8:all:jobs1") and r["status"] == "landed"]
    for r in every:  # against the single export of the same code (its commit)
        one = find("b2:int8:executorch", r["label"]) or next(  # the same label's single export, else the same code's
            (o for o in rows if o["job"] == "b2:int8:executorch" and o["status"] == "landed"
             and o.get("commit", "").rstrip("+") == r.get("commit", "").rstrip("+")), None)  # fmt: skip
        if one:
            ratio = r["wall_s"] / one["wall_s"]
            sequential = "jobs1" in r["job"] or r["label"] in ("stop 30", "stop 31") or r["label"].startswith("after + heap")
            how = "one target at a time" if sequential else "two targets at a time"  # side by side since stop 32
            out.append(f"- b2 int8 --target all ({r['label']}, {how}; {len(r['outlier_decision'])} targets: "
                       f"{', '.join(r['outlier_decision'])}): {r['wall_s'] / 60:.1f} min, {ratio:.2f}x the executorch export "
                       f"alone ({'within' if ratio <= LIMITS['all_ratio'] else 'NOT within'} 2.5x), peak "
                       f"{r['peak_rss_mb'] / 1024:.2f} GiB.")  # fmt: skip
    for r in rows:  # the decoder as trained beside the projected one, the same job otherwise, in the same stop
        if r["job"].endswith(":as-trained") and r["status"] == "landed":
            other = find(r["job"].removesuffix(":as-trained"), r["label"])
            if other:
                out.append(f"- {r['model']} {r['precision']} {r['target']}{' (warm)' if 'warm' in r['job'] else ''}: projected "
                           f"decoder {other['wall_s'] / 60:.1f} min, {other['peak_rss_mb'] / 1024:.2f} GiB {_parity(other)}; "
                           f"as trained {r['wall_s'] / 60:.1f} min, {r['peak_rss_mb'] / 1024:.2f} GiB {_parity(r)}: "
                           f"{other['wall_s'] / r['wall_s']:.2f}x the time.")  # fmt: skip
    for r in rows:
        if r["model"] in ("b5", "b0-1024x2048") and r.get("status"):
            ok = r["status"] == "landed" and r["peak_rss_mb"] / 1024 <= LIMITS["big_gib"]
            out.append(f"- {r['model']} {r['precision']} {r['target']} ({r['label']}): {r['status']}, {r['wall_s'] / 60:.1f} min, peak "
                       f"{r['peak_rss_mb'] / 1024:.2f} GiB ({'within' if ok else 'NOT within'} 24 GiB).")  # fmt: skip
    return out


PHASES = ("import", "load", "calibration", "capture", "outlier decision", "quantize", "lower", "verify", "record",
          "whole export (CLI)")


def render(record: dict[str, Any]) -> str:
    rows = sorted(record["rows"], key=lambda r: (all_jobs().index(r["job"]) if r["job"] in all_jobs() else 99, r["label"] != "before"))
    machines = sorted({f"{r['machine'].get('cpu', r['machine']['machine'])}, {r['machine']['cpus']} CPUs" for r in rows})
    lines = ["# Export at scale: wall time per phase and peak RSS", "",
             f"Written by `python benchmarks/export_scale.py` from benchmarks/export_scale.json ({len(rows)} exports, "
             f"{', '.join(sorted({r['date'] for r in rows}))}; {'; '.join(machines)}). Each export ran in a fresh process: "
             f"transformers-saved models of each variant's shape (seeded random weights), "
             f"{PHOTOS} crops of real photos as `--data`, the export's defaults (int8: calibration on the {PHOTOS} photos, "
             "`--outliers auto`; verify on them), seconds of wall time per phase; peak RSS is the process's (helpers included). "
             "`code`: what was measured and its commit (`+`: with uncommitted changes to the package code); `before` rows ran the same script on an "
             "older checkout (`--tree`), `stop 30` rows the code that landed before the sampled histogram and the decision's "
             "pixel budget, `stop 31` rows the code that landed before the projected decoder and the targets side by side, "
             "`stop 32` rows the code that landed before the decompositions skipped and the bias statistics from summed "
             "inputs (`stop 32, same hour`: that code again, right beside stop 33's rows), `stop 33` rows the code that landed "
             "before the edge dialect's and eight more XNNPACK passes were skipped where idle (`stop 33, same hour`: that code "
             "again, right beside stop 34's `stop 34, beside stop 33` row), `stop 34` rows the code that landed before the Core ML "
             "reference executor freed its values, Core ML's annotation stopped regenerating code and the workers read the "
             "float logits picking computed (`stop 34`: its executorch export and `--target all` one after the other; "
             "`stop 34, another run`: the same `--target all` in another hour; `stop 34, targets in the order given`: "
             "`--target all` before a target only a reference executor runs here was started first; `stop 34, coreml started "
             "first`: and before the Core ML reference executor's depthwise convolutions and in-place quantize; `stop 34, same "
             "hour`: that code again, right beside this code's `after, beside stop 34` rows). `after` rows: this code. Flags after a job's target: `warm` (decision recorded by an earlier job), `jobs1` "
             "(`--jobs 1`: the targets of `--target all` one after the other), `as-trained` (`--decoder as-trained`). "
             "With targets side by side, the peak is the sampled sum of the processes' RSS (shared pages counted twice).", "",
             "`decision`: whether the export made its outlier decision (`made`: a first export of the model and photos) or "
             "reused the one an earlier export recorded (`reused`: the `:warm` jobs after the first of a model, every target "
             "but the first in `--target all`); `-` for fp32.", "",
             *_summary(rows), "",
             "| model | size | classes | precision | target | code | decision | status | wall | peak RSS | "
             + " | ".join(PHASES) + " |", "|---" * (10 + len(PHASES)) + "|"]  # fmt: skip
    for r in rows:
        if "phases_s" not in r:
            lines.append(f"| {r['job']} | | | | | {r['label']} | | {r['status']} | {r['wall_s']:.0f} s | {r['peak_rss_mb']} MB |" + " |" * len(PHASES))
            continue
        phases = " | ".join(f"{r['phases_s'][p]:.0f}" if p in r["phases_s"] else "" for p in PHASES)
        decision = ", ".join(sorted({d for d in (r.get("outlier_decision") or {}).values() if d})) or "-"
        lines.append(f"| {r['model']} | {r['size'][0]}x{r['size'][1]} | {r['classes']} | {r['precision']} | {r['target']} | {r['label']} ({r.get('commit', '?')}) "
                     f"| {decision} | {r['status']} | {r['wall_s'] / 60:.1f} min | {r['peak_rss_mb'] / 1024:.2f} GiB | {phases} |")  # fmt: skip
    peaks = [r for r in rows if r.get("phase_peak_rss_mb")]
    if peaks:
        lines += ["", "Peak RSS of each phase (MiB, sampled every 50 ms):", "",
                  "| model | precision | target | code | " + " | ".join(PHASES) + " |", "|---" * (4 + len(PHASES)) + "|"]  # fmt: skip
        for r in peaks:
            cells = " | ".join(str(r["phase_peak_rss_mb"].get(p, "")) for p in PHASES)
            lines.append(f"| {r['model']} | {r['precision']} | {r['target']} | {r['label']} | {cells} |")
    for r in rows:
        if len(r.get("target_peak_rss_mb") or {}) > 1:
            lines += ["", f"{r['model']} {r['precision']} --target {r['target']} ({r['label']}): the process's RSS at its "
                      "highest while each target ran, in order: "
                      + ", ".join(f"{t} {mb / 1024:.2f} GiB" for t, mb in r["target_peak_rss_mb"].items()) + "."]  # fmt: skip
    versions = sorted({", ".join(f"{k} {v}" for k, v in r["versions"].items()) for r in rows})
    lines += ["", "Versions: " + "; ".join(versions) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated jobs, model:precision:target (target 'all': every target in one run)")
    parser.add_argument("--label", default="after", help="what the code measured is (after, before)")
    parser.add_argument("--tree", type=Path, help="run the jobs on this checkout of the project instead")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "export-scale")
    parser.add_argument("--again", action="store_true", help="measure jobs already in the .json again")
    parser.add_argument("--render", action="store_true", help="only rewrite EXPORT_SCALE.md from the .json")
    args = parser.parse_args()
    if not args.render:
        measure(args)
    MD_PATH.write_text(render(json.loads(JSON_PATH.read_text())))
    print(MD_PATH.read_text())


if __name__ == "__main__":
    main()
