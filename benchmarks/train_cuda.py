"""The CUDA training path, run as a user runs it: `train --device cuda` in one process and under torchrun (NCCL).

Both runs train the reference preset (b0 on the synthetic scenes, 128x128 crops, batch 8) for the same number of
iterations from the same seed, through the CLI in a subprocess, and each run's log.jsonl gives the figures: the
last logged loss, the last validation mIoU, and the median training rate over the logged windows (the first
window, which holds cuDNN's autotuning and the workers' start, is left out). Writes benchmarks/train_cuda.json and
benchmarks/TRAIN_CUDA.md from it.

    python benchmarks/train_cuda.py [--iters 1000] [--device cuda]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
ROOT = HERE.parent


def _run(name: str, launcher: list[str], args: list[str], out: Path) -> dict[str, Any]:
    """One training run through the CLI; its figures from the log it wrote."""
    command = [*launcher, "-m", "segformer_edge", "train", *args, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if "loss" in r]
    val = [r for r in log if "val_miou" in r]
    return {
        "run": name, "command": " ".join(["python" if c == sys.executable else c for c in command[:-2]]),
        "wall_s": wall, "iters": train[-1]["iter"], "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
        "img_per_s_median": statistics.median(r["img_per_s"] for r in train[1:]) if len(train) > 1 else train[0]["img_per_s"],
        "val_miou": [[r["iter"], r["val_miou"]] for r in val],
        "files": sorted(p.name for p in out.iterdir()),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--device", default="cuda", help="cuda (the point of this script) or cpu (to try it)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--tables", action="store_true", help="only rewrite TRAIN_CUDA.md from the stored JSON")
    args = parser.parse_args()
    if args.tables:
        write_markdown(json.loads((HERE / "train_cuda.json").read_text()))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here: this benchmark measures the CUDA training path")
    half = max(1, args.iters // 2)
    common = ["--preset", "reference", "--device", args.device, "--iters", str(args.iters), "--eval-interval", str(half),
              "--ckpt-interval", str(half), "--workers", str(args.workers), "--seed", "0"]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    with tempfile.TemporaryDirectory() as tmp:
        runs = [
            _run("one process", [sys.executable], common, Path(tmp) / "single"),
            _run("torchrun, 1 process (NCCL)" if args.device.startswith("cuda") else "torchrun, 1 process (gloo)",
                 torchrun, common, Path(tmp) / "torchrun"),
        ]  # fmt: skip
    record = {
        "date": str(datetime.date.today()),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU",
        "torch": torch.__version__, "iters": args.iters, "workers": args.workers, "runs": runs,
    }  # fmt: skip
    print(json.dumps(record))
    (HERE / "train_cuda.json").write_text(json.dumps(record, indent=2) + "\n")
    write_markdown(record)


def write_markdown(record: dict[str, Any]) -> None:
    lines = [
        "# The CUDA training path", "",
        f"Measured {record['date']} with `python benchmarks/train_cuda.py --iters {record['iters']}` on {record['device']}, "
        f"torch {record['torch']}: the reference preset (b0, synthetic scenes, 128x128 crops, batch 8, bf16 autocast, "
        f"channels_last, fused AdamW) for {record['iters']} iterations from seed 0, {record['workers']} data workers, "
        "through the CLI, from a checkout (`PYTHONPATH` set to it) with the GPU machine's own torch and none of the "
        "edge stack installed. img/s is the median of the logged windows after the first (at 128x128 the synthetic "
        "scenes' generation on the data workers, not the GPU, sets the rate).", "",
        "| run | wall s | img/s | loss first -> last | val mIoU | files written |", "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for run in record["runs"]:
        miou = ", ".join(f"{v:.3f} @ {i}" for i, v in run["val_miou"])
        lines.append(f"| {run['run']} | {run['wall_s']:.0f} | {run['img_per_s_median']:.0f} | "
                     f"{run['first_loss']:.3f} -> {run['last_loss']:.3f} | {miou} | {', '.join(run['files'])} |")  # fmt: skip
    lines += ["", "Commands (RUN: the run folder; `python -m torch.distributed.run` is `torchrun`):", ""]
    lines += [f"    {run['command']} --out RUN" for run in record["runs"]] + [""]
    (HERE / "TRAIN_CUDA.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
