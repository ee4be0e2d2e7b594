"""``segformer-edge export`` and ``segformer-edge verify``: options parsed, :func:`segformer_edge.api.export` and
:func:`segformer_edge.api.verify` called, their results printed (a table, or the rows as JSON)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import STATE, CheckpointArgument, JsonFlag, SizeOption, StrictFlag, api_options, console, step_progress

# Parity images by default: what the data has, up to this many (converters.parity.VERIFY_IMAGES; the CLI stays torch-free).
VERIFY_IMAGES = 32

EXPORT_HELP = """Convert a checkpoint for edge runtimes, then prove each artifact agrees with the float model.

CHECKPOINT is a segformer-edge .safetensors, a Hugging Face folder or Hub id (org/name\\[@revision]), or an NVlabs/mmseg .pth; with none, the built-in reference model. With no arguments at all it exports the reference model to every target at fp32 and prints a table. Each artifact lands in OUT/<name>/ with a manifest.json (classes, palette, input/output spec, normalization, precision, quantization, tool versions, sha256, parity figures) and export.log (the converters' own output). An artifact that fails parity never replaces an earlier one: it is kept as OUT/<name>.failed/ and the command exits 1.

int8 first rewrites the float model for activation outliers (--outliers; by default what measurably lowers the int8 error on the calibration images: SmoothQuant scale migration out of the LayerNorms, bias correction), then quantizes with each target's own quantizer; the manifest records what was chosen and measured.

--data (a folder of your photos, masks optional; ADE20K, Cityscapes or generic layouts; synthetic[:N]) is what int8 calibrates on and what parity is checked on. Without masks the float model's predictions are the reference. A model with its own classes needs --data for int8.

Targets: {targets}.

int8 options of each runtime (--scheme is shared; -O KEY=VALUE is the target's own; the manifest records what the artifact really holds):

  tflite -O io=float|int8|uint8: the edges of the full-integer model: float in and out (default), or int8 or uint8 tensors (NPUs, microcontrollers; the manifest gives their scale and zero point)

  tflite -O activations=int16: 16-bit activations with int8 weights (16x8, ai-edge-quantizer, min/max ranges) for NPUs and DSPs that run 16x8; XNNPACK has no int16 kernels, so on a CPU it runs in LiteRT's far slower reference kernels

  tflite -O attention=float|int8: the attention's matmuls and softmax float (default; XNNPACK runs them) or int8 too, a fully integer graph for NPUs and microcontrollers (on a CPU they fall back to LiteRT's slower built-in kernels)

  coreml (default --scheme static): W8A8 (int8 weights, uint8 activations, iOS17)

  coreml --scheme weight_only [-O weights=int8|palettize4|palettize6|palettize8]: float activations, weights stored as int8 (default) or k-means palettized to 4, 6 or 8 bits (iOS16); 4-bit is held to looser parity (agreement 95%, drop 3 points)

  executorch --scheme dynamic: XNNPACK dynamically quantized linears (int8 weights, each input quantized with its own min/max per inference, no calibration); convolutions stay fp32

  onnx -O activations=auto|uint8|int8: U8S8 or S8S8 QDQ. auto (default): U8S8 where the exporting CPU has VNNI (AVX512-VNNI, AVX-VNNI) or is Arm64, S8S8 elsewhere: without VNNI, ONNX Runtime's AVX2/AVX-512 U8S8 kernels (VPMADDUBSW) can saturate 16-bit sums and lose accuracy. The manifest records the choice

  onnx -O softmax=float|int8: float (default) keeps the attention softmax's input unquantized, so ONNX Runtime runs q @ k^T as an int8 MatMulIntegerToFloat and the softmax in float (its QLinearSoftmax is several times slower on the CPU); int8 quantizes it too, for execution providers that want a fully quantized graph

Examples:

  segformer-edge export

  segformer-edge export nvidia/segformer-b0-finetuned-ade-512-512 --precision int8 --data photos/

  segformer-edge export runs/ade/best.safetensors --precision int8 --outliers smoothquant --target tflite

  segformer-edge export runs/ade/best.safetensors --target tflite --precision fp16 --size 512 512

  segformer-edge export --target onnx --dynamic --output mask --input uint8

  segformer-edge export --target tflite --precision int8 -O io=uint8 --data photos/

  segformer-edge export --target coreml --precision int8 --scheme weight_only -O weights=palettize6
"""

VERIFY_HELP = """Run an artifact and the float model on the same images and report parity.

Reports max_abs_diff, cosine and psnr_db of the logits, NaN/inf counts, pixel_agreement and agreement mIoU
of the masks against the float model's, and mIoU of both against the labels where --data has them.
Exits 1 when parity fails (NaN or inf in the output always fails), 2 on bad input. The runtimes' own
output goes to REPORT/verify.log with --report (--verbose shows it on the terminal).
With --device ssh://[user@]host[:port] the artifact runs on that board (its 'segformer-edge[runtime]' install,
through your ssh) while the float model runs here: the board's kernels checked against the same reference.

Examples:

  segformer-edge verify exports/segformer-b0_tflite_fp32

  segformer-edge verify exports/segformer-b0_tflite_int8 --device ssh://pi@raspberrypi

  segformer-edge verify exports/segformer-b0_coreml_fp16 --checkpoint runs/x/best.safetensors --data photos/ --json
"""


def _target_options(values: list[str] | None) -> dict[str, str]:
    options = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r}: give KEY=VALUE", param_hint="--target-option")
        options[key.strip()] = value.strip()
    return options


def _mask_figures() -> str:
    """What the mask outputs cost and how often they agree with the exact mask: benchmarks/mask.py's figures,
    shipped as an asset (never typed here)."""
    import json

    import segformer_edge

    try:
        figures = json.loads((Path(segformer_edge.__file__).parent / "assets" / "mask_outputs.json").read_text())
    except (OSError, ValueError):
        return ""
    return " " + figures["summary"]


_OUTPUT_HELP = ("logits (1/4 resolution), probs (their softmax, 1/4 resolution) or mask (int32 labels; full size by "
                "argmax over the top classes of each pixel's 4 low-resolution neighbours: cheap at any class count)."
                + _mask_figures())  # fmt: skip


def export(
    checkpoint: CheckpointArgument = None,
    target: Annotated[str, typer.Option("--target", "-t", help="A registered target (see the list above) or all.")] = "all",
    precision: Annotated[str, typer.Option("--precision", "-p", help="fp32, fp16 or int8.")] = "fp32",
    size: SizeOption = None,
    output: Annotated[str, typer.Option(help=_OUTPUT_HELP)] = "logits",
    mask_size: Annotated[str, typer.Option(help="--output mask: full (the input's size, candidate argmax), full-exact (upsample all class maps, then argmax: bit-exact, slow with many classes) or quarter (argmax at 1/4 resolution; the app upsamples).")] = "full",
    input_kind: Annotated[str, typer.Option("--input", help="normalized, rgb01 or uint8 (the last two fuse normalization).")] = "normalized",
    layout: Annotated[str, typer.Option(help="nchw or nhwc input layout.")] = "nchw",
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Dynamic H and W (where the target takes it).")] = False,
    image_input: Annotated[bool, typer.Option("--image-input", help="A camera-frame image input (where the target has one).")] = False,
    decoder: Annotated[str, typer.Option(help="The decoder in the graph: projected (its fuse conv folded into the stage projections before upsampling: the same function, 2-2.6x fewer MACs at b0-b2), as-trained (concatenation + fuse conv), or auto (projected unless an int8 export keeps a decoder layer float).")] = "auto",
    jobs: Annotated[int | None, typer.Option(min=1, help="Targets exported at once, each in a worker process with its share of the cores (default: 2 where there are two targets and two cores, else 1).")] = None,
    target_option: Annotated[list[str] | None, typer.Option("--target-option", "-O", help="KEY=VALUE option of the target itself (info --targets lists them).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("exports"),
    data: Annotated[str | None, typer.Option(help="Images to calibrate and verify on: a photo folder or glob, a dataset folder, or synthetic[:N].")] = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check parity before the artifact lands.")] = True,
    verify_images: Annotated[int, typer.Option(min=1, help="Images for the parity check: what the data has, up to this many.")] = VERIFY_IMAGES,
    calibration: Annotated[Path | None, typer.Option(help="int8: a folder from segformer-edge calibrate (default: calibrate now on --data).")] = None,
    calibration_images: Annotated[int, typer.Option(min=1, help="int8 without --calibration: images to calibrate on.")] = 32,
    method: Annotated[str, typer.Option(help="int8 activation ranges: auto (each target's default), minmax, moving_average, percentile or mse (PT2E targets, OpenVINO).")] = "auto",
    scheme: Annotated[str, typer.Option(help="int8: static (weights and activations, calibrated ranges), dynamic (activation ranges per inference: executorch) or weight_only (float activations: coreml).")] = "static",
    budget: Annotated[float | None, typer.Option(help="int8: keep the fewest layers in float that bring the mIoU drop (against labels, or estimated for photos without them), measured with each target's own quantizer on held-out calibration images, within POINTS.")] = None,
    budget_granularity: Annotated[str, typer.Option(help="--budget: layer (whole layer groups first, then split into blocks and single layers, quantizing back every part the budget allows: more measurements, see benchmarks/BUDGET.md) or group (the 4 stages and 2 decoder parts only: at most 12 quantized models measured).")] = "layer",
    layers: Annotated[bool, typer.Option("--layers", help="Parity per stage too (verify --layers), recorded in the manifest.")] = False,
    outliers: Annotated[str, typer.Option(help="int8: activation-outlier handling before every target's quantizer: auto (what measurably lowers the int8 error on the calibration images), none, smoothquant, bias_correction or smoothquant+bias_correction.")] = "auto",
    strict: StrictFlag = False,
    as_json: JsonFlag = False,
) -> None:
    from segformer_edge import api
    from segformer_edge.converters.parity import ParityFailed
    from segformer_edge.errors import ExportFailed

    targets: list[str] | None = None  # in order, where some failed
    errors: dict[str, Any] = {}
    with api_options(), step_progress() as progress:
        try:
            done = api.export(checkpoint, target, precision, data, out, size=size, output=output, mask_size=mask_size,
                              input_kind=input_kind, layout=layout, dynamic=dynamic, image_input=image_input, decoder=decoder, jobs=jobs, verify=verify,
                              verify_images=verify_images, calibration=calibration, calibration_images=calibration_images,
                              method=method, scheme=scheme, budget=budget, budget_granularity=budget_granularity, layers=layers,
                              outliers=outliers, strict=strict, capture_output=not STATE["verbose"], on_step=progress.step,
                              **_target_options(target_option))  # fmt: skip
            artifacts = done if isinstance(done, dict) else {target: done}
        except ExportFailed as exc:  # some of several targets failed: a row each
            targets, artifacts, errors = exc.targets, exc.artifacts, exc.errors
        except ParityFailed as exc:  # one target: its artifact was kept aside; the row says why
            targets, artifacts, errors = [exc.report["target"]], {}, {exc.report["target"]: exc}
    rows = [artifacts[n].to_dict() if n in artifacts else api.failure_record(n, precision, errors[n]) for n in targets or artifacts]
    if as_json:
        console.print_json(json.dumps(rows))
    else:
        source = checkpoint if checkpoint is not None else _builtin_name()
        _print_table(rows, f"{Path(str(source)).name} -> {out}/")
    codes = [r.get("exit_code", 0) for r in rows]
    if any(codes):
        sys.exit(max(codes))


def _builtin_name() -> str:
    from segformer_edge.weights import builtin_checkpoint

    return builtin_checkpoint().name


def _drop_cell(row: dict[str, Any]) -> str:
    """The table's mIoU drop: against the labels, or estimated without them (then with its spread over images)."""
    if row.get("miou_drop_points") is not None:
        return f"{row['miou_drop_points']:.2f}"
    estimate = row.get("estimated_miou_drop_points")
    if estimate is None:
        return "-"
    spread = row.get("estimated_miou_drop_stderr")
    return f"{estimate:.2f}" + ("" if spread is None else f"±{spread:.2f}")


def _diff_cell(row: dict[str, Any]) -> str:
    """The table's max |diff|: NaN or inf where either output holds them (the difference then means nothing)."""
    if row.get("nonfinite") or row.get("nonfinite_float"):
        return "NaN/inf"
    diff = row.get("max_abs_diff")
    return "-" if diff is None else f"{diff:.1e}"


def _print_table(rows: list[dict[str, Any]], title: str) -> None:
    """The result: one row per target, within 80 columns; errors and kept-aside artifacts below it."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    labels = any(r.get("miou_drop_points") is not None for r in rows)
    drop = "mIoU drop" if labels else "est. drop"  # never "mIoU drop" for a figure not measured against labels
    numeric = ("MB", "max |diff|", "agree", drop)
    for col in ("target", "prec", "MB", "max |diff|", "agree", drop, "status"):
        table.add_column(col, justify="right" if col in numeric else "left", no_wrap=True)
    for r in rows:
        agree = r.get("pixel_agreement")
        table.add_row(
            r["target"], r["precision"], f"{r['size_mb']:.2f}" if "size_mb" in r else "-",
            _diff_cell(r), "-" if agree is None else f"{100 * agree:.2f}%", _drop_cell(r), r["status"],
        )  # fmt: skip
    console.print(table)
    data = next((r["data"] for r in rows if r.get("data")), None)
    if data is not None:
        console.print(f"parity on {data['images']} images of {data['spec']} ({data['usage']})", markup=False, soft_wrap=True)
        if not labels:
            console.print("est. drop: the mIoU drop estimated without labels (the float model's confidence as the "
                          "posterior), ± its standard error over the images", markup=False, soft_wrap=True)  # fmt: skip
    handled = [f"{r['target']} {r['outliers']}" for r in rows if r.get("outliers")]
    if handled:
        console.print(f"int8 outlier handling: {', '.join(handled)}", markup=False, soft_wrap=True)
    for r in rows:
        if r.get("error"):
            named = r["error"].startswith((f"{r['target']}:", f"{r['target']} "))  # errors that already name their target
            error = r["error"] if named else f"{r['target']}: {r['error']}"
            console.print(error, markup=False, soft_wrap=True)


def verify(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder (or its model file).")],
    checkpoint: Annotated[str | None, typer.Option(help="The float checkpoint or Hub id (default: the built-in model).")] = None,
    data: Annotated[str | None, typer.Option(help="A photo folder or glob, a dataset folder (val split), or synthetic[:N].")] = None,
    num_images: Annotated[int, typer.Option(min=1, help="Images to compare on: what the data has, up to this many.")] = VERIFY_IMAGES,
    max_abs_diff: Annotated[float | None, typer.Option(help="Override the max |diff| threshold.")] = None,
    min_pixel_agreement: Annotated[float | None, typer.Option(help="Override the pixel-agreement threshold (0..1).")] = None,
    max_miou_drop: Annotated[float | None, typer.Option(help="Override the allowed mIoU drop (points): against the labels where the data has them, else the drop estimated without labels.")] = None,
    layers: Annotated[bool, typer.Option("--layers", help="Compare the stage outputs too, in a debug graph of the same recipe, and name the first that diverges.")] = False,
    report: Annotated[Path | None, typer.Option("--report", help="Write per-image PNGs (input, float, artifact, disagreement), report.md and report.json here.")] = None,
    calibration: Annotated[Path | None, typer.Option(help="--layers on int8: the calibration folder the artifact was made with (default: pick it again).")] = None,
    strict: StrictFlag = False,
    as_json: JsonFlag = False,
    device: Annotated[str | None, typer.Option(help="Run the artifact on a board: ssh://[user@]host[:port] (the float model runs here).")] = None,
    device_python: Annotated[str, typer.Option(help="--device: the board's Python that has segformer-edge[runtime].")] = "python3",
    device_timeout: Annotated[float, typer.Option(min=1, help="--device: seconds the board may take to answer.")] = 1800,
) -> None:
    from segformer_edge import api

    # No spinner: the runtimes' output is captured meanwhile (REPORT/verify.log), so it could not reach the terminal.
    with api_options():
        report = api.verify(artifact, checkpoint, data, num_images=num_images, max_abs_diff=max_abs_diff,
                            min_pixel_agreement=min_pixel_agreement, max_miou_drop=max_miou_drop, layers=layers,
                            report_dir=report, calibration=calibration, strict=strict, device=device,
                            device_python=device_python, device_timeout=device_timeout,
                            capture_output=not STATE["verbose"]).to_dict()  # fmt: skip
    if as_json:
        console.print_json(json.dumps(report, default=_json_float))
    else:
        d = report["data"]
        lines = [f"{report['target']} {report['precision']} ({report['executor']}, {report['images']} images of {d['spec']}, "
                 f"{report['size'][0]}x{report['size'][1]}; {d['usage']})"]  # fmt: skip
        for key in ("max_abs_diff", "cosine", "psnr_db", "nonfinite", "nonfinite_float", "pixel_agreement", "agreement_miou",
                    "miou_float", "miou_artifact", "miou_drop_points", "estimated_miou_drop_points",
                    "estimated_pixel_accuracy_drop_points"):  # fmt: skip
            value = report.get(key)
            spread = report.get(key.replace("_points", "_stderr")) if key.startswith("estimated_") else None
            text = "-" if value is None else f"{value:.6g}" + ("" if spread is None else f" ± {spread:.2g}")
            lines.append(f"  {key:36s} {text}")
        verdict = "passed" if report["passed"] else f"FAILED: {report['failure']}"
        lines.append(f"  {verdict}  (thresholds {report['thresholds']})")
        if report.get("layers"):
            lines += _layer_lines(report["layers"])
        if report.get("report_dir"):
            lines.append(f"  report: {report['report_dir']}/report.md")
        console.print("\n".join(lines), markup=False)
    if not report["passed"]:
        sys.exit(1)


def _json_float(value: Any) -> Any:
    return str(value)


def _layer_lines(layers: dict[str, Any]) -> list[str]:
    lines = [f"  layers ({layers['images']} images, threshold {layers['threshold_db']} dB):"]
    for t in layers["taps"]:
        if "sqnr_db" in t:
            lines.append(f"    {t['tap']:8s} SQNR {t['sqnr_db']:7.2f} dB  cosine {t['cosine']:.6f}  max|diff| {t['max_abs_diff']:.3g}"
                         f"  NaN/inf {100 * t['nonfinite_fraction']:.2f}%")  # fmt: skip
        else:
            lines.append(f"    {t['tap']:8s} pixel agreement {100 * t['pixel_agreement']:.3f}%")
    lines.append(f"  first divergent: {layers['first_divergent'] or 'none'}: {layers['conclusion']}")
    return lines
