"""``segformer-edge calibrate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import CheckpointArgument, SizeOption, check_size, console, err_console, progress_bar, resolve_checkpoint

HELP = """Pick and record a calibration set for INT8, optionally with a per-layer-group sensitivity analysis.

Chooses N images spread across the classes (coverage recorded), resizes them to the export size and writes
OUT/images.npy, masks.npy and calibration.json (data, seed, method, the checkpoint's sha256 and the set's
sha256, which covers all of it). --data is a folder (or glob) of your photos, masks optional, a dataset
folder (train split) or synthetic[:N]; without masks the float model's predictions stand in for them.
export --precision int8 --calibration OUT uses the set for every target, and refuses it for another
checkpoint. With --sensitivity it quantizes one layer group at a time with the quantizer of --target and
ranks the groups by the mIoU they cost on held-out calibration images (sensitivity.md, .json, .png), with
the activation-outlier handling of --outliers applied first, as export applies it.

Examples:

  segformer-edge calibrate --num-images 64 --method percentile --out calib/

  segformer-edge calibrate nvidia/segformer-b0-finetuned-ade-512-512 --data photos/ --sensitivity --out calib-ade/
"""


def calibrate(
    checkpoint: CheckpointArgument = None,
    data: Annotated[str | None, typer.Option(help="A photo folder or glob, a dataset folder, or synthetic[:N] (default: synthetic, for the built-in model only).")] = None,
    num_images: Annotated[int, typer.Option(min=1, help="Calibration images.")] = 32,
    method: Annotated[str, typer.Option(help="Recorded activation method: auto, minmax, moving_average, percentile, mse or entropy.")] = "auto",
    size: SizeOption = None,
    seed: Annotated[int, typer.Option(help="Seed of the candidate pool.")] = 0,
    sensitivity: Annotated[bool, typer.Option("--sensitivity", help="Rank layer groups by INT8 sensitivity.")] = False,
    target: Annotated[str | None, typer.Option("--target", "-t", help="Whose quantizer --sensitivity measures with (default: the first registered target with int8).")] = None,
    outliers: Annotated[str, typer.Option(help="--sensitivity: the activation-outlier handling to measure with (as export --outliers): auto, none, smoothquant, bias_correction or smoothquant+bias_correction.")] = "auto",
    out: Annotated[Path, typer.Option("--out", "-o", help="Calibration folder.")] = Path("calibration"),
) -> None:
    import numpy as np

    from segformer_edge.calibration.spec import QuantSpec
    from segformer_edge.converters.pipeline import calibration_for
    from segformer_edge.weights import load_pretrained

    quant = QuantSpec(method=method, outliers=outliers)  # validates the method and outlier mode before any work
    if outliers != "auto" and not sensitivity:
        raise typer.BadParameter("--outliers applies to --sensitivity (export takes its own --outliers)", param_hint="--outliers")
    path = resolve_checkpoint(checkpoint)
    model = load_pretrained(path)
    h, w = check_size(size, model.meta.input_size)
    if sensitivity:
        target = _int8_target(target)
    with err_console.status("picking calibration images ..."):
        calib = calibration_for(model, path, (h, w), data=data, num_images=num_images, method=method, seed=seed)
    calib.save(out)
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
        import tempfile

        from segformer_edge.calibration.sensitivity import analyse, write_report
        from segformer_edge.calibration.spec import LAYER_GROUPS
        from segformer_edge.converters.base import ExportOptions
        from segformer_edge.converters.pipeline import float_labeler, plan_export, quantized_predictor

        options = ExportOptions(precision="int8", size=(h, w))
        with tempfile.TemporaryDirectory() as tmp, progress_bar(f"sensitivity ({target})") as bar:
            spec = plan_export(model, target, options, tmp, quant.with_(calibration=calib)).quant or quant
            labeler = float_labeler(model, (h, w))
            task = bar.add_task("sensitivity", total=len(LAYER_GROUPS))
            report = analyse(calib, spec, lambda q: quantized_predictor(model, target, options, q, Path(tmp)),
                             lambda images: np.stack([labeler(im) for im in images]), model.config.num_classes,
                             target=target, progress=lambda k: bar.advance(task, k))  # fmt: skip
        write_report(report, out)
        console.print((out / "sensitivity.md").read_text(), markup=False)


def _int8_target(name: str | None) -> str:
    from segformer_edge.converters import get_target, target_names
    from segformer_edge.errors import ExportError

    if name is None:
        return next(n for n in target_names() if "int8" in get_target(n).precisions)
    if "int8" not in get_target(name).precisions:
        raise ExportError(f"{name}: this target has no int8; --sensitivity needs a target that quantizes")
    return name
