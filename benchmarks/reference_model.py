"""Package the reference model and record how it was made.

Takes a finished `segformer-edge train --preset reference` run, writes its best checkpoint in fp16 to
segformer_edge/assets/reference_b0.safetensors (the built-in default), evaluates the shipped file on the
whole synthetic val split, and writes benchmarks/REFERENCE_MODEL.md with the run's figures.

    python benchmarks/reference_model.py runs/reference
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

from segformer_edge.data import open_source
from segformer_edge.evaluate import evaluate
from segformer_edge.weights import load_pretrained, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def main(run: Path) -> None:
    best = load_pretrained(run / "best.safetensors")
    asset = ROOT / "segformer_edge" / "assets" / "reference_b0.safetensors"
    save_checkpoint(best, asset, dtype=torch.float16)
    shipped = load_pretrained(asset)
    val = open_source("synthetic", "val")
    metrics = evaluate(shipped, val, shipped.meta, size=shipped.meta.input_size)
    config = json.loads((run / "config.json").read_text())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line]
    train = [r for r in log if "loss" in r]
    evals = [r for r in log if "val_miou" in r]
    ips = sorted(r["img_per_s"] for r in train)
    median_ips = ips[len(ips) // 2]
    seconds = sum(config["batch_size"] * config["log_interval"] / r["img_per_s"] for r in train)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())  # fmt: skip
    lines = [
        "# The reference model",
        "",
        "SegFormer-B0 trained on the built-in synthetic scenes by `segformer-edge train --preset reference`,",
        "shipped as `segformer_edge/assets/reference_b0.safetensors` (fp16 weights,"
        f" {asset.stat().st_size / 1e6:.2f} MB).",
        "",
        "**Trained on the CPU**: this task had no GPU, so the run used the CPU preset: 128x128 scenes and crops,",
        f"batch {config['batch_size']}, {config['iters']} iterations, lr {config['lr']} (encoder trained from scratch:",
        "no ImageNet weights offline), warmup 300, poly decay, head lr x10.",
        "",
        f"- machine: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        f"- training time: {seconds / 60:.1f} min of training steps (median {median_ips:.1f} img/s, fp32)",
        f"- val mIoU of the shipped fp16 file, whole synthetic val split ({metrics['images']} images, 128x128): "
        f"**{100 * metrics['miou']:.2f}%**, pixel accuracy {100 * metrics['pixel_accuracy']:.2f}%",
        "",
        "| class | IoU |",
        "|---|---|",
        *[f"| {k} | {100 * v:.2f} |" for k, v in metrics["per_class_iou"].items()],
        "",
        "Validation mIoU during training: " + ", ".join(f"{r['iter']}: {100 * r['val_miou']:.1f}%" for r in evals) + ".",
        "",
        "Not measured here: GPU training throughput against transformers' SegformerForSemanticSegmentation-B0",
        "(`benchmarks/train_throughput.py` measures it in one run when a GPU is present; the CPU figures are in",
        "`benchmarks/TRAIN_THROUGHPUT.md`).",
        "",
        "![curves](reference_curves.png)",
        "",
    ]
    (ROOT / "benchmarks" / "REFERENCE_MODEL.md").write_text("\n".join(lines))
    (ROOT / "benchmarks" / "reference_curves.png").write_bytes((run / "curves.png").read_bytes())
    print(json.dumps({"miou": metrics["miou"], "asset_mb": asset.stat().st_size / 1e6}))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/reference"))
