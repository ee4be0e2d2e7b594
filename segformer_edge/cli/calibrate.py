"""``segformer-edge calibrate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    STATE,
    CheckpointArgument,
    SizeOption,
    StrictFlag,
    check_data,
    check_size,
    console,
    err_console,
    progress_bar,
    resolve_checkpoint,
)

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

    from segformer_edge.calibration.sensitivity import GRANULARITIES
    from segformer_edge.calibration.spec import LAYER_GROUPS, QuantSpec
    from segformer_edge.converters.int8 import calibration_for
    from segformer_edge.weights import load_pretrained

    quant = QuantSpec(method=method, outliers=outliers)  # validates the method and outlier mode before any work
    if outliers != "auto" and not sensitivity:
        raise typer.BadParameter("--outliers applies to --sensitivity (export takes its own --outliers)", param_hint="--outliers")
    if granularity not in GRANULARITIES:
        raise typer.BadParameter(f"{granularity}: choose {' or '.join(GRANULARITIES)}", param_hint="--granularity")
    if granularity != "group" and not sensitivity:
        raise typer.BadParameter("--granularity applies to --sensitivity", param_hint="--granularity")
    chosen = None if groups is None else [g.strip() for g in groups.split(",") if g.strip()]
    if chosen is not None:
        if granularity != "layer":
            raise typer.BadParameter("--groups applies to --granularity layer", param_hint="--groups")
        unknown = [g for g in chosen if g not in LAYER_GROUPS]
        if unknown or not chosen:
            raise typer.BadParameter(f"{', '.join(unknown) or '(none)'}: choose from {', '.join(LAYER_GROUPS)}", param_hint="--groups")
    check_data(data, "train", strict)
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

        from segformer_edge.calibration.recipes import reuse_exports
        from segformer_edge.calibration.sensitivity import analyse, quantizable_layers, write_report
        from segformer_edge.calibration.spec import WRAPPER, group_of
        from segformer_edge.converters.base import ExportOptions
        from segformer_edge.converters.build import plan_export
        from segformer_edge.converters.int8 import quantized_predictor
        from segformer_edge.converters.reference import float_labeler, float_logits_of
        from segformer_edge.logs import OutputCapture

        options = ExportOptions(precision="int8", size=(h, w))
        # The quantizers and runtimes talk on stderr (absl, XNNPACK, deprecations): into OUT/sensitivity.log. The
        # bar refreshes only between measurements, with the capture paused.
        with tempfile.TemporaryDirectory() as tmp, progress_bar(f"sensitivity ({target})", auto_refresh=False) as bar, \
                OutputCapture(out / "sensitivity.log", enabled=not STATE["verbose"]) as output:  # fmt: skip
            spec = plan_export(model, target, options, tmp, quant.with_(calibration=calib)).quant or quant
            labeler = float_labeler(model, (h, w))
            layers = quantizable_layers(model) if granularity == "layer" else None
            if layers is not None and chosen is not None:
                layers = [name for name in layers if group_of(WRAPPER + name) in chosen]
            task = bar.add_task("sensitivity", total=len(LAYER_GROUPS) if layers is None else len(layers) + 1)

            def advance(k: int) -> None:
                with output.paused():
                    bar.advance(task, k)
                    bar.refresh()

            advance(0)
            with reuse_exports():
                report = analyse(calib, spec, lambda q: quantized_predictor(model, target, options, q, Path(tmp)),
                                 lambda images: np.stack([labeler(im) for im in images]), model.config.num_classes,
                                 target=target, layers=layers, progress=advance,
                                 float_logits=float_logits_of(model, (h, w)))  # fmt: skip
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
