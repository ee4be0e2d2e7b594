"""``segformer-edge eval``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .common import CheckpointArgument, JsonFlag, SizeOption, check_size, console, progress_bar, resolve_checkpoint

HELP = """mIoU, per-class IoU and pixel accuracy of a checkpoint on a labelled dataset.

--data needs masks: a folder of photos alone cannot score a model (to compare an exported artifact with the
float model on your photos, use segformer-edge verify --data PHOTOS).

Whole-image mode resizes each image to the model's training size (or --size); slide mode keeps the
image size and averages overlapping windows of the training size.

Examples:

  segformer-edge eval runs/reference/best.safetensors --data synthetic

  segformer-edge eval segformer-b0-ade/ --data /data/ADEChallengeData2016 --mode slide --json
"""


def evaluate_cmd(
    checkpoint: CheckpointArgument = None,
    data: Annotated[str, typer.Option(help="synthetic[:N] or a labelled dataset folder (ADE20K, Cityscapes, images/ + masks/).")] = "synthetic",
    split: Annotated[str, typer.Option(help="train or val.")] = "val",
    mode: Annotated[str, typer.Option(help="whole or slide.")] = "whole",
    size: SizeOption = None,
    num_images: Annotated[int | None, typer.Option(min=1, help="Evaluate the first N images only.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    as_json: JsonFlag = False,
) -> None:
    if mode not in ("whole", "slide"):
        raise typer.BadParameter(f"{mode!r}: choose whole or slide", param_hint="--mode")
    from segformer_edge.data import open_source
    from segformer_edge.evaluate import EVAL_HINT, evaluate
    from segformer_edge.train import resolve_device
    from segformer_edge.weights import load_pretrained

    source = open_source(data, split)
    source.require_masks("eval", EVAL_HINT)  # before the model loads: photos alone cannot score it
    path = resolve_checkpoint(checkpoint)
    dev = resolve_device(device)
    model = load_pretrained(path, device=dev)
    target = check_size(size, model.meta.input_size)
    n = len(source) if num_images is None else min(num_images, len(source))
    with progress_bar("eval") as bar:
        task = bar.add_task("eval", total=n)
        metrics = evaluate(model, source, model.meta, mode=mode, size=target, device=dev, limit=n,
                           progress=lambda k: bar.advance(task, k))
    metrics.update({"checkpoint": str(path), "data": data, "split": split})
    if as_json:
        console.print_json(json.dumps(metrics))
        return
    from rich.table import Table

    table = Table(title=f"{path.name} on {data} ({split}, {mode}, {n} images)")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for name, iou in metrics["per_class_iou"].items():
        table.add_row(name, "-" if iou is None else f"{100 * iou:.2f}")
    console.print(table)
    console.print(f"mIoU {100 * metrics['miou']:.2f} · pixel accuracy {100 * metrics['pixel_accuracy']:.2f}")
