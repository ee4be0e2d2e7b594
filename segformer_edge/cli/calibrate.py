"""``segformer-edge calibrate``: options parsed, :func:`segformer_edge.api.calibrate` called, its summary printed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import STATE, CheckpointArgument, SizeOption, StrictFlag, api_options, console, step_progress

HELP = """Pick and record a calibration set for INT8, optionally with a per-layer-group sensitivity analysis.

Chooses N images spread across the classes (coverage recorded), resizes them to the export size and writes
OUT/images.npy, masks.npy and calibration.json (data, seed, method, the checkpoint's sha256 and the set's
sha256, which covers all of it). --data is a folder (or glob) of your photos, masks optional, a dataset
folder (train split) or synthetic[:N]; without masks the float model's predictions stand in for them.
export --precision int8 --calibration OUT uses the set for every target, and refuses it for another
checkpoint. With --sensitivity it quantizes one layer group at a time with the quantizer of --target and
ranks the groups by the mIoU they cost on held-out calibration images (sensitivity.md, .json, .png), with
the activation-outlier handling of --outliers applied first, as export applies it; --granularity layer
keeps each Linear and Conv2d in float alone instead and ranks the layers by the mIoU that gives back.

Examples:

  segformer-edge calibrate --num-images 64 --method percentile --out calib/

  segformer-edge calibrate nvidia/segformer-b0-finetuned-ade-512-512 --data photos/ --sensitivity --out calib-ade/

  segformer-edge calibrate --sensitivity --granularity layer --target tflite --out calib-layers/
"""


def calibrate(
    checkpoint: CheckpointArgument = None,
    data: Annotated[str | None, typer.Option(help="A photo folder or glob, a dataset folder, or synthetic[:N] (default: synthetic, for the built-in model only).")] = None,
    num_images: Annotated[int, typer.Option(min=1, help="Calibration images.")] = 32,
    method: Annotated[str, typer.Option(help="Recorded activation method: auto, minmax, moving_average, percentile or mse.")] = "auto",
    size: SizeOption = None,
    seed: Annotated[int, typer.Option(help="Seed of the candidate pool.")] = 0,
    sensitivity: Annotated[bool, typer.Option("--sensitivity", help="Rank layer groups by INT8 sensitivity.")] = False,
    target: Annotated[str | None, typer.Option("--target", "-t", help="Whose quantizer --sensitivity measures with (default: the first registered target with int8).")] = None,
    outliers: Annotated[str, typer.Option(help="--sensitivity: the activation-outlier handling to measure with (as export --outliers): auto, none, smoothquant, bias_correction or smoothquant+bias_correction.")] = "auto",
    granularity: Annotated[str, typer.Option(help="--sensitivity: group (each layer group quantized alone, 6 measurements) or layer (each Linear and Conv2d kept float alone with the rest int8: one measurement per layer (72 for b0) and one with every layer int8).")] = "group",
    groups: Annotated[str | None, typer.Option(help="--granularity layer: only the layers of these layer groups, comma-separated (stage1..stage4, decoder.mlp, decoder.head): drill into the groups a group-level run showed sensitive.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Calibration folder.")] = Path("calibration"),
    strict: StrictFlag = False,
) -> None:
    import numpy as np

    from segformer_edge import api

    with api_options(), step_progress() as progress:
        calib = api.calibrate(checkpoint, data, num_images=num_images, method=method, size=size, seed=seed, out=out,
                              sensitivity=sensitivity, target=target, outliers=outliers, granularity=granularity, groups=groups,
                              strict=strict, capture_output=not STATE["verbose"], on_step=progress.step)  # fmt: skip
    h, w = calib.size
    counts = np.array(list(calib.coverage.values()))
    covered = int((counts > 0).sum())
    top = sorted(calib.coverage.items(), key=lambda kv: -kv[1])[:5]
    console.print(
        f"{len(calib.images)} images ({h}x{w}) of {calib.data}, masks from {calib.masks_from}; "
        f"{covered} of {len(counts)} classes covered (most: {', '.join(f'{n} {k}' for n, k in top)}); "
        f"sha256 {calib.sha256[:16]}... -> {out}",
        markup=False, soft_wrap=True,
    )  # fmt: skip
    if sensitivity:
        console.print((out / "sensitivity.md").read_text(), markup=False)
