"""``segformer-edge export`` and ``segformer-edge verify``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .common import CheckpointArgument, JsonFlag, SizeOption, check_size, console, err_console, resolve_checkpoint

TARGET_NAMES = ("executorch", "tflite", "coreml", "onnx")  # what --target all exports
EXTRA_TARGETS = ("executorch-coreml",)

EXPORT_HELP = """Convert a checkpoint for edge runtimes, then prove each artifact agrees with the float model.

With no checkpoint it uses the built-in reference model; with no arguments at all it exports it to every
target at fp32 and prints a table. Each artifact lands in OUT/<name>/ with a manifest.json (variant, classes,
palette, input/output spec, normalization, precision, tool versions, sha256, parity figures).

Examples:

  segformer-edge export

  segformer-edge export runs/ade/best.safetensors --target tflite --precision fp16 --size 512 512

  segformer-edge export --target coreml --output mask --input uint8

  segformer-edge export --target onnx --dynamic
"""

VERIFY_HELP = """Run an artifact and the float model on the same images and report parity.

Reports max_abs_diff, cosine and psnr_db of the logits, pixel_agreement of the argmax, and mIoU of both
against the ground truth. Exits 1 when parity fails, 2 on bad input.

Examples:

  segformer-edge verify exports/segformer-b0_tflite_fp32

  segformer-edge verify exports/segformer-b0_coreml_fp16 --checkpoint runs/x/best.safetensors --json
"""


def _targets(target: str) -> list[str]:
    if target == "all":
        return list(TARGET_NAMES)
    from segformer_edge.errors import ExportError

    if target not in TARGET_NAMES + EXTRA_TARGETS:
        raise ExportError(f"--target {target}: unknown target; choose one of {', '.join(TARGET_NAMES + EXTRA_TARGETS)} or all")
    return [target]


def export(
    checkpoint: CheckpointArgument = None,
    target: Annotated[str, typer.Option("--target", "-t", help="executorch, tflite, coreml, onnx, all, or executorch-coreml.")] = "all",
    precision: Annotated[str, typer.Option("--precision", "-p", help="fp32, fp16 or int8.")] = "fp32",
    size: SizeOption = None,
    output: Annotated[str, typer.Option(help="logits (1/4 resolution) or mask (upsample + argmax in the graph).")] = "logits",
    input_kind: Annotated[str, typer.Option("--input", help="normalized, rgb01 or uint8 (the last two fuse normalization).")] = "normalized",
    layout: Annotated[str, typer.Option(help="nchw or nhwc input layout.")] = "nchw",
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Dynamic H and W (onnx).")] = False,
    image_input: Annotated[bool, typer.Option("--image-input", help="Core ML: camera-frame image input.")] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("exports"),
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check parity before the artifact lands.")] = True,
    verify_images: Annotated[int, typer.Option(min=1, help="Synthetic val images for the parity check.")] = 4,
    calibration: Annotated[Path | None, typer.Option(help="int8: a folder from segformer-edge calibrate (default: calibrate now).")] = None,
    calibration_images: Annotated[int, typer.Option(min=1, help="int8 without --calibration: images to calibrate on.")] = 32,
    method: Annotated[str, typer.Option(help="int8 without --calibration: minmax, moving_average, percentile or mse.")] = "mse",
    budget: Annotated[float | None, typer.Option(help="int8: keep the most sensitive layer groups in float until the mIoU drop is within POINTS.")] = None,
    as_json: JsonFlag = False,
) -> None:
    from segformer_edge.converters.base import ExportOptions
    from segformer_edge.converters.pipeline import export_artifact
    from segformer_edge.errors import SegformerEdgeError
    from segformer_edge.weights import load_pretrained

    names = _targets(target)
    path = resolve_checkpoint(checkpoint)
    model = load_pretrained(path)
    h, w = check_size(size, model.meta.input_size)
    options = ExportOptions(precision=precision, size=(h, w), input_kind=input_kind, output=output, layout=layout,
                            dynamic=dynamic, image_input=image_input)  # fmt: skip
    calib, policy = _int8_setup(model, path, options, calibration, calibration_images, method, budget)
    rows = []
    for name in names:
        err_console.print(f"[bold]{name}[/] {precision} {h}x{w} ...")
        try:
            from dataclasses import replace

            per_target = replace(options, extra=dict(options.extra))
            artifact, report = export_artifact(model, name, per_target, out, checkpoint=path, verify=verify,
                                               verify_images=verify_images, calibration=calib)  # fmt: skip
            if policy is not None:
                artifact.manifest["quantization"]["mixed_precision"] = policy
                artifact.write_manifest()
        except SegformerEdgeError as exc:
            if len(names) == 1:
                raise
            rows.append({"target": name, "precision": precision, "status": f"failed: {exc}"})
            continue
        rows.append({
            "target": name, "precision": precision, "artifact": str(artifact.folder),
            "size_mb": artifact.manifest["size_bytes"] / 1e6,
            "max_abs_diff": report and report["max_abs_diff"], "pixel_agreement": report and report["pixel_agreement"],
            "executor": report and report["executor"],
            "status": artifact.manifest.get("parity", {}).get("status", "ok") if report is None
            else "ok" if report["passed"] else "parity FAILED",
        })  # fmt: skip
    if as_json:
        console.print_json(json.dumps(rows))
    else:
        from rich.table import Table

        table = Table(title=f"{path.name} -> {out}/")
        for col in ("target", "precision", "size", "max |diff|", "pixel agreement", "executor", "status"):
            table.add_column(col, justify="right" if col in ("size", "max |diff|", "pixel agreement") else "left")
        for r in rows:
            diff = r.get("max_abs_diff")
            agree = r.get("pixel_agreement")
            table.add_row(
                r["target"], r["precision"], f"{r['size_mb']:.2f} MB" if "size_mb" in r else "-",
                "-" if diff is None else f"{diff:.2e}", "-" if agree is None else f"{100 * agree:.3f}%",
                r.get("executor") or "-", r["status"],
            )  # fmt: skip
        console.print(table)
    failed = [r for r in rows if r["status"] != "ok" and not r["status"].startswith("not run")]
    if any(r["status"].startswith("failed") for r in failed):
        sys.exit(2)
    if failed:
        sys.exit(1)


def _int8_setup(model, checkpoint: Path, options, calibration: Path | None, images: int, method: str, budget: float | None):  # type: ignore[no-untyped-def]
    """The calibration set (loaded and checked, or made now) and the mixed-precision policy for int8."""
    if options.precision != "int8":
        if calibration is not None or budget is not None:
            raise typer.BadParameter("--calibration and --budget apply to --precision int8", param_hint="--precision")
        return None, None
    from segformer_edge.calibration.calibset import METHODS, CalibrationSet, select_calibration_set
    from segformer_edge.converters.pipeline import checkpoint_digest

    if method not in METHODS:
        raise typer.BadParameter(f"{method!r}: choose one of {', '.join(METHODS)}", param_hint="--method")
    sha = checkpoint_digest(checkpoint)
    if calibration is not None:
        calib = CalibrationSet.load(calibration)
        calib.check_for(sha, options.size, calibration)
    else:
        err_console.print(f"calibrating on {images} synthetic training images ({method}) ...")
        calib = select_calibration_set("synthetic", images, options.size, model.config.num_classes, method=method,
                                       checkpoint_sha256=sha)  # fmt: skip
    policy = None
    if budget is not None:
        from segformer_edge.calibration.sensitivity import budget_policy

        err_console.print(f"finding the layer groups to keep in float for a {budget}-point budget ...")
        policy = budget_policy(model, calib, budget)
        options.extra["float_modules"] = policy["float_modules"]
        err_console.print(f"float layer groups: {', '.join(policy['float_groups']) or 'none'}")
    return calib, policy


def verify(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder (or its model file).")],
    checkpoint: Annotated[Path | None, typer.Option(help="The float checkpoint (default: the built-in model).")] = None,
    data: Annotated[str, typer.Option(help="synthetic[:N] or a dataset folder (val split).")] = "synthetic",
    num_images: Annotated[int, typer.Option(min=1, help="Images to compare on.")] = 8,
    max_abs_diff: Annotated[float | None, typer.Option(help="Override the max |diff| threshold.")] = None,
    min_pixel_agreement: Annotated[float | None, typer.Option(help="Override the pixel-agreement threshold (0..1).")] = None,
    max_miou_drop: Annotated[float | None, typer.Option(help="Override the allowed mIoU drop (points).")] = None,
    as_json: JsonFlag = False,
) -> None:
    from dataclasses import replace

    from segformer_edge.converters.base import read_manifest
    from segformer_edge.converters.pipeline import DEFAULT_THRESHOLDS, verify_artifact

    manifest = read_manifest(artifact).manifest
    limits = DEFAULT_THRESHOLDS[manifest["precision"]]
    overrides = {"max_abs_diff": max_abs_diff, "pixel_agreement": min_pixel_agreement, "miou_drop": max_miou_drop}
    limits = replace(limits, **{k: v for k, v in overrides.items() if v is not None})
    report = verify_artifact(artifact, checkpoint=checkpoint, data=data, num_images=num_images, thresholds=limits)
    if as_json:
        console.print_json(json.dumps(report))
    else:
        lines = [f"{report['target']} {report['precision']} ({report['executor']}, {report['images']} images, "
                 f"{report['size'][0]}x{report['size'][1]})"]  # fmt: skip
        for key in ("max_abs_diff", "cosine", "psnr_db", "pixel_agreement", "miou_float", "miou_artifact"):
            value = report[key]
            lines.append(f"  {key:16s} {'-' if value is None else f'{value:.6g}'}")
        lines.append(f"  {'passed':16s} {report['passed']}  (thresholds {report['thresholds']})")
        console.print("\n".join(lines), markup=False)
    if not report["passed"]:
        sys.exit(1)
