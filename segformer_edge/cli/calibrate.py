"""``segformer-edge calibrate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import CheckpointArgument, SizeOption, check_size, console, progress_bar, resolve_checkpoint

HELP = """Pick and record a calibration set for INT8, optionally with a per-layer-group sensitivity analysis.

Chooses N training images spread across the classes (coverage recorded), resizes them to the export size
and writes OUT/images.npy, masks.npy and calibration.json (data, seed, method, the checkpoint's sha256 and the
set's sha256). export --precision int8 --calibration OUT uses it for every target. With --sensitivity it
quantizes one layer group at a time and ranks the groups by the mIoU they cost on held-out calibration
images (sensitivity.md, sensitivity.json, sensitivity.png).

Examples:

  segformer-edge calibrate --num-images 64 --method percentile --out calib/

  segformer-edge calibrate runs/ade/best.safetensors --data /data/ade --sensitivity --out calib-ade/
"""


def calibrate(
    checkpoint: CheckpointArgument = None,
    data: Annotated[str, typer.Option(help="synthetic[:N] or a dataset folder (train split).")] = "synthetic",
    num_images: Annotated[int, typer.Option(min=1, help="Calibration images.")] = 32,
    method: Annotated[str, typer.Option(help="minmax, moving_average, percentile or mse.")] = "mse",
    size: SizeOption = None,
    seed: Annotated[int, typer.Option(help="Seed of the candidate pool.")] = 0,
    sensitivity: Annotated[bool, typer.Option("--sensitivity", help="Rank layer groups by INT8 sensitivity.")] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="Calibration folder.")] = Path("calibration"),
) -> None:
    from segformer_edge.calibration.calibset import METHODS, select_calibration_set
    from segformer_edge.converters.pipeline import checkpoint_digest
    from segformer_edge.weights import load_pretrained

    if method not in METHODS:
        raise typer.BadParameter(f"{method!r}: choose one of {', '.join(METHODS)}", param_hint="--method")
    path = resolve_checkpoint(checkpoint)
    model = load_pretrained(path)
    h, w = check_size(size, model.meta.input_size)
    calib = select_calibration_set(data, num_images, (h, w), model.config.num_classes, seed=seed, method=method,
                                   checkpoint_sha256=checkpoint_digest(path), class_names=model.meta.class_names)  # fmt: skip
    calib.save(out)
    console.print(f"{len(calib.images)} images ({h}x{w}), sha256 {calib.sha256[:16]}..., coverage {calib.coverage} -> {out}")
    if sensitivity:
        from segformer_edge.calibration.sensitivity import LAYER_GROUPS, analyse, write_report

        with progress_bar("sensitivity") as bar:
            task = bar.add_task("sensitivity", total=len(LAYER_GROUPS))
            report = analyse(model, calib, progress=lambda k: bar.advance(task, k))
        write_report(report, out)
        console.print((out / "sensitivity.md").read_text(), markup=False)
