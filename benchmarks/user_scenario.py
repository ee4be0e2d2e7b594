"""The user's path, end to end: their SegFormer-B0 with 150 classes and a folder of their photos.

What a new user does with a transformers-saved model and a folder of JPEGs and PNGs without masks, each
step run as that user runs it (the ``segformer-edge`` CLI in a fresh process, in an 80-column terminal):

1. ``calibrate MODEL --data PHOTOS``: pick the INT8 calibration images from the photos (the float model's
   predictions stand in for the masks they do not have);
2. ``export MODEL --precision int8 --calibration CALIB --data PHOTOS --target all``: INT8 to every target,
   parity checked on the photos before each artifact lands;
3. ``verify ARTIFACT --checkpoint MODEL --data PHOTOS``: parity again, on every photo;
4. ``predict ARTIFACT PHOTOS --compare MODEL``: masks, overlays and disagreement images;
5. ``bench ARTIFACTS --threads 2 --compare-torch``: latency, paired with torch eager.

The model is a transformers ``SegformerForSemanticSegmentation`` with the B0 configuration and 150 classes,
randomly initialised with a fixed seed and saved with ``save_pretrained``: this machine cannot download the
released ADE20K weights. The photos are crops of scikit-learn's two sample photographs. Each step's wall
time, exit code and terminal line count, and the parity and latency figures, go to
benchmarks/user_scenario.json; benchmarks/USER_SCENARIO.md is written from that JSON alone.

    python benchmarks/user_scenario.py [--photos 16] [--runs 10] [--work DIR]
    python benchmarks/user_scenario.py --render   # USER_SCENARIO.md again from user_scenario.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
JSON_PATH = HERE / "user_scenario.json"
MD_PATH = HERE / "USER_SCENARIO.md"
SIZE = (512, 512)
NUM_CLASSES = 150
SEED = 0
BENCH_TARGETS = ("executorch", "tflite", "onnx")  # Core ML's latency needs macOS (here a numpy executor checks it)
PACKAGES = ("torch", "transformers", "executorch", "litert-torch", "ai-edge-litert", "coremltools", "onnx", "onnxruntime",
            "numpy", "scikit-learn")  # fmt: skip


# -------------------------------------------------------------------------------------------------
# The user's files


def save_model(folder: Path) -> dict[str, Any]:
    """A random-init (seeded) SegformerForSemanticSegmentation, B0 configuration, 150 classes, save_pretrained."""
    import torch
    import transformers

    config = transformers.SegformerConfig(num_labels=NUM_CLASSES)  # the defaults are B0's (hidden sizes 32..256)
    torch.manual_seed(SEED)
    model = transformers.SegformerForSemanticSegmentation(config).eval()
    model.save_pretrained(folder)
    return {"class": "transformers.SegformerForSemanticSegmentation", "hidden_sizes": config.hidden_sizes,
            "depths": config.depths, "decoder_hidden_size": config.decoder_hidden_size, "num_labels": NUM_CLASSES,
            "init": f"random, torch.manual_seed({SEED})", "parameters": sum(p.numel() for p in model.parameters())}  # fmt: skip


def make_photos(folder: Path, n: int) -> dict[str, Any]:
    """``n`` crops of scikit-learn's sample photos (china.jpg, flower.jpg; 427x640), JPEG and PNG alternately."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    folder.mkdir(parents=True, exist_ok=True)
    sizes = []
    for i in range(n):
        photo = photos[i % 2]
        h, w = 240 + (37 * i) % 188, 320 + (53 * i) % 321  # 240..427 x 320..640
        top, left = (29 * i) % (photo.shape[0] - h + 1), (41 * i) % (photo.shape[1] - w + 1)
        crop = photo[top : top + h, left : left + w]
        suffix, options = (".jpg", {"quality": 90}) if i % 2 == 0 else (".png", {})
        Image.fromarray(crop).save(folder / f"IMG_{i:04d}{suffix}", **options)
        sizes.append([h, w])
    return {"count": n, "source": "crops of sklearn.datasets.load_sample_images() (china.jpg, flower.jpg)",
            "formats": "JPEG (quality 90) and PNG, alternately", "sizes": sizes, "masks": None}  # fmt: skip


# -------------------------------------------------------------------------------------------------
# Running the CLI as the user does


def run_step(name: str, args: list[str], work: Path) -> dict[str, Any]:
    """One CLI command in a fresh process; its wall time, exit code, its output's line counts and stdout."""
    env = {**os.environ, "COLUMNS": "80"}
    command = [sys.executable, "-m", "segformer_edge", *args]
    print(f"[{datetime.datetime.now():%H:%M:%S}] {name}: segformer-edge {' '.join(args)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=work, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    print(f"    exit {done.returncode} after {seconds:.1f} s", flush=True)
    if done.returncode not in (0, 1):
        print(done.stderr[-3000:], flush=True)
    return {"step": name, "command": "segformer-edge " + " ".join(args), "exit_code": done.returncode,
            "seconds": round(seconds, 1), "stdout_lines": len(done.stdout.splitlines()), "stderr_lines": len(done.stderr.splitlines()),
            "stdout": done.stdout, "stderr_tail": done.stderr[-2000:]}  # fmt: skip


def _json_tail(text: str) -> Any:
    """The JSON object or list a command printed (after any line that is not JSON)."""
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    return json.loads(text[min(starts) :]) if starts else None


def machine() -> dict[str, Any]:
    from importlib import metadata

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()  # fmt: skip
    versions = {"python": platform.python_version()}
    for name in ("segformer-edge", *PACKAGES):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    memory = None
    if Path("/proc/meminfo").exists():
        memory = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    return {"platform": platform.platform(), "cpu": cpu, "logical_cpus": os.cpu_count(), "memory_gib": memory,
            "versions": versions}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=16, help="Photos in the folder (at least 12).")
    parser.add_argument("--runs", type=int, default=10, help="Timed bench runs per artifact.")
    parser.add_argument("--work", type=Path, default=Path("exports/user-scenario"), help="Scratch folder (replaced).")
    parser.add_argument("--render", action="store_true", help="Only write USER_SCENARIO.md from user_scenario.json.")
    args = parser.parse_args()
    if args.render:
        MD_PATH.write_text(render(json.loads(JSON_PATH.read_text())))
        return
    if args.photos < 12:
        parser.error("--photos: at least 12")
    work = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    record: dict[str, Any] = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(), "load_before": os.getloadavg()}
    record["model"] = save_model(work / "my-segformer-b0")
    record["photos"] = make_photos(work / "photos", args.photos)
    model, photos, size = "my-segformer-b0", "photos", [str(v) for v in SIZE]
    steps = []
    steps.append(run_step("calibrate", ["calibrate", model, "--data", photos, "--num-images", "12", "--size", *size, "--out", "calib"], work))
    steps.append(run_step("export", ["export", model, "--precision", "int8", "--calibration", "calib", "--data", photos, "--target", "all",
                                     "--size", *size, "--verify-images", "8", "--out", "exports", "--json"], work))  # fmt: skip
    rows = _json_tail(steps[-1]["stdout"]) or []
    artifacts = {r["target"]: r["artifact"] for r in rows if r.get("artifact")}
    record["export"] = rows
    record["manifests"] = {t: _manifest_summary(work / a) for t, a in artifacts.items()}
    record["verify"] = {}
    for target, folder in artifacts.items():
        step = run_step(f"verify {target}", ["verify", folder, "--checkpoint", model, "--data", photos,
                                             "--num-images", str(args.photos), "--json"], work)  # fmt: skip
        steps.append(step)
        record["verify"][target] = _json_tail(step["stdout"])
    if "tflite" in artifacts:
        step = run_step("predict tflite", ["predict", artifacts["tflite"], photos, "--compare", model, "--out", "predictions", "--json"], work)
        steps.append(step)
        result = _json_tail(step["stdout"]) or {}
        record["predict"] = {"target": "tflite", "images": len(result.get("images", [])),
                             "mean_pixel_agreement": result.get("mean_pixel_agreement")}  # fmt: skip
    bench_folders = [artifacts[t] for t in BENCH_TARGETS if t in artifacts]
    step = run_step("bench", ["bench", *bench_folders, "--threads", "2", "--runs", str(args.runs), "--warmup", "3",
                              "--compare-torch", "--checkpoint", model, "--json", "bench.json"], work)  # fmt: skip
    steps.append(step)
    record["bench"] = json.loads((work / "bench.json").read_text()) if (work / "bench.json").exists() else []
    record["load_after"] = os.getloadavg()
    record["steps"] = [{k: v for k, v in s.items() if k != "stdout"} for s in steps]
    JSON_PATH.write_text(json.dumps(record, indent=2) + "\n")
    MD_PATH.write_text(render(record))
    print(f"wrote {JSON_PATH} and {MD_PATH}")


def _manifest_summary(folder: Path) -> dict[str, Any]:
    manifest = json.loads((folder / "manifest.json").read_text())
    quant = manifest.get("quantization") or {}
    return {"folder": folder.name, "size_bytes": manifest["size_bytes"], "export_seconds": manifest["export_seconds"],
            "method": quant.get("method"), "calibration": quant.get("calibration"),
            "parity_status": manifest["parity"]["status"], "parity_data": (manifest["parity"].get("data") or {})}  # fmt: skip


# -------------------------------------------------------------------------------------------------
# The report, from the JSON alone


def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _num(value: float | None, fmt: str = ".3g") -> str:
    return "-" if value is None else format(value, fmt)


def render(r: dict[str, Any]) -> str:
    m, model, photos = r["machine"], r["model"], r["photos"]
    v = m["versions"]
    lines = [
        "# The user's path: their SegFormer-B0 (150 classes) and a folder of their photos",
        "",
        f"Measured {r['date']} by `python benchmarks/user_scenario.py` (this file is written from",
        "`benchmarks/user_scenario.json` by the script; nothing here is typed by hand).",
        "",
        f"- **Model**: `{model['class']}`, B0 configuration (hidden sizes {model['hidden_sizes']}, depths {model['depths']},",
        f"  decoder {model['decoder_hidden_size']}), {model['num_labels']} classes, {model['parameters'] / 1e6:.2f} M parameters,",
        f"  {model['init']}, saved with `save_pretrained`. No download is possible on this machine, so these are not",
        "  the released ADE20K weights: a random-init model has near-uniform logits (tiny top-2 margins), the worst",
        "  case for INT8 agreement; a trained model's margins are far larger.",
        f"- **Photos**: {photos['count']} {photos['source']}, {photos['formats']}, from "
        f"{min(s[0] for s in photos['sizes'])}x{min(s[1] for s in photos['sizes'])} to "
        f"{max(s[0] for s in photos['sizes'])}x{max(s[1] for s in photos['sizes'])} pixels, no masks: the float model's",
        "  predictions are the reference everywhere.",
        f"- **Size** {SIZE[0]}x{SIZE[1]}. Every step is the CLI in a fresh process, in an 80-column terminal.",
        "",
        "## Steps",
        "",
        "| step | command | exit | wall time | stderr lines |",
        "|---|---|---|---|---|",
    ]
    for s in r["steps"]:
        command = s["command"].replace("|", "\\|")
        lines.append(f"| {s['step']} | `{command}` | {s['exit_code']} | {s['seconds']:.0f} s | {s['stderr_lines']} |")
    total = sum(s["seconds"] for s in r["steps"])
    note = (" Exit 1 means parity failed: the export kept those artifacts as NAME.failed/ (an earlier good artifact is never "
            "replaced), and the later steps ran on them." if any(s["exit_code"] == 1 for s in r["steps"]) else "")
    lines += ["", f"Total: {total / 60:.1f} min.{note} stderr lines: what reached the terminal besides the result (progress "
              "lines, errors); the result itself is on stdout (JSON).", ""]

    calib = next((mf["calibration"] for mf in r["manifests"].values() if mf.get("calibration")), None)
    if calib:
        lines += [f"Calibration: {calib['images']} of the photos, masks from the {calib['masks_from']}, "
                  f"{calib['classes_covered']} of {calib['classes']} classes covered; set sha256 `{calib['sha256'][:16]}`.", ""]  # fmt: skip

    lines += ["## INT8 export to every target (parity on the photos, checked before each artifact lands)", "",
              "| target | status | method | export s | size MB | pixel agreement | agreement mIoU | max abs diff | executor |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in r["export"]:
        mf = r["manifests"].get(row["target"], {})
        lines.append(
            f"| {row['target']} | {row['status']} | {mf.get('method', '-')} | {_num(mf.get('export_seconds'), '.0f')} | "
            f"{_num(mf['size_bytes'] / 1e6 if mf.get('size_bytes') else None, '.2f')} | {_pct(row.get('pixel_agreement'))} | "
            f"{_pct(row.get('agreement_miou'))} | "
            f"{_num(row.get('max_abs_diff'))} | {row.get('executor', '-')} |"
        )
    failures = [row for row in r["export"] if row.get("error")]
    if failures:
        lines += ["", "What the export said where a target did not pass:", ""]
        lines += [f"- {row['target']}: {row['error']}" for row in failures]
    lines += ["", "Thresholds (the project's defaults for INT8): pixel agreement at least 98%, mIoU drop at most 1 point",
              "(without masks: agreement mIoU at least 99%).", ""]  # fmt: skip

    lines += [f"## verify on all {photos['count']} photos", "",
              "| target | passed | pixel agreement | agreement mIoU | cosine | PSNR dB | max abs diff | failure |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for target, rep in r["verify"].items():
        if not rep:
            lines.append(f"| {target} | - | - | - | - | - | - | no report |")
            continue
        lines.append(f"| {target} | {rep['passed']} | {_pct(rep['pixel_agreement'])} | {_pct(rep['agreement_miou'])} | "
                     f"{_num(rep['cosine'], '.5f')} | {_num(rep['psnr_db'], '.1f')} | {_num(rep['max_abs_diff'])} | "
                     f"{rep.get('failure') or ''} |")  # fmt: skip
    if r.get("predict"):
        p = r["predict"]
        lines += ["", f"`predict` with the {p['target']} artifact on the {p['images']} photos, `--compare` with the float model: "
                      f"mean pixel agreement {_pct(p['mean_pixel_agreement'])} at each photo's own size.", ""]  # fmt: skip

    lines += ["## bench (2 threads, torch eager fp32 timed right after each artifact)", "",
              "| target | precision | executor | load ms | p50 ms | p90 ms | peak RSS MB | vs torch eager |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for b in r["bench"]:
        if b.get("status") != "ok":
            lines.append(f"| {b['target']} | {b['precision']} | {b.get('status')} | | | | | |")
            continue
        speed = f"{b['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in b else "-"
        lines.append(f"| {b['target']} | {b['precision']} | {b.get('executor', '-')} | {b['load_ms']:.0f} | {b['p50_ms']:.1f} | "
                     f"{b['p90_ms']:.1f} | {b['peak_rss_mb']:.0f} | {speed} |")  # fmt: skip
    lines += ["", "Core ML is not benched here: off macOS its artifact is checked by a numpy MIL executor, whose speed says",
              "nothing about Core ML's.", ""]  # fmt: skip

    lines += ["## Machine", "",
              f"{m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB; {m['platform']}. The machine is shared with "
              f"other engineers: load average {r['load_before'][0]:.1f} before and {r['load_after'][0]:.1f} after the run, "
              "so wall times are upper bounds and latencies are noisy (bench pairs each artifact with torch for that reason).",
              "",
              "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", ""]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
