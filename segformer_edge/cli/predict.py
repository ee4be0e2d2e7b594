"""``segformer-edge predict``: a checkpoint or an exported artifact on photos (options parsed,
:func:`segformer_edge.api.predict` called, what it wrote reported).

For LiteRT and ONNX artifacts this command imports no torch (unless --compare asks for the float model):
the artifact path goes through the manifest, the target's torch-free runner and numpy post-processing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import STATE, JsonFlag, SizeOption, StrictFlag, api_options, console, step_progress

HELP = """Segment photos with a checkpoint or an exported artifact: writes NAME_mask.png (palette colours) and NAME_overlay.png for each image.

MODEL is an artifact folder from segformer-edge export (or its model file), a checkpoint (.safetensors, Hugging Face folder, NVlabs/mmseg .pth), a Hub id (org/name\\[@revision]) or "reference" for the built-in model. IMAGES are image files, folders (searched recursively; subfolders stay in the output names) or quoted glob patterns such as "photos/*.jpg".

An artifact runs in its own runtime with the preprocessing its manifest records (size, normalization, layout, dtype); its logits are upsampled to each photo's own size before the argmax (a mask output is resized with nearest neighbour), and the colours are the manifest's palette. With --compare CHECKPOINT the float model runs on the same inputs: NAME_diff.png shows the pixels where the two disagree in magenta, and the pixel agreement is printed for each image. LiteRT and ONNX artifacts predict without torch (pip install 'segformer-edge\\[runtime]') unless --compare is given.

Examples:

  segformer-edge predict reference street.jpg park.png --out predictions/

  segformer-edge predict exports/segformer-b0_tflite_int8 photos/ --compare runs/ade/best.safetensors

  segformer-edge predict nvidia/segformer-b0-finetuned-ade-512-512 "photos/*.jpg" --size 512 512
"""


def predict(
    model: Annotated[str, typer.Argument(help="An artifact folder, a checkpoint, a Hub id, or 'reference'.")],
    images: Annotated[list[str], typer.Argument(help="Image files, folders of images, or quoted glob patterns.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("predictions"),
    size: SizeOption = None,
    mode: Annotated[str, typer.Option(help="Checkpoints: whole (resize to --size) or slide.")] = "whole",
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Overlay opacity.")] = 0.5,
    compare: Annotated[str | None, typer.Option("--compare", help="Artifacts: the float checkpoint (or Hub id) it was exported from; writes NAME_diff.png and prints the pixel agreement.")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="Artifacts: the runtime's thread count (default: its own).")] = None,
    strict: StrictFlag = False,
    as_json: JsonFlag = False,
) -> None:
    from segformer_edge import api

    with api_options(), step_progress() as progress:
        done = api.predict(model, images, size=size, mode=mode, threads=threads, compare=compare, out=out, alpha=alpha, strict=strict,
                           keep_masks=False, quiet=not STATE["verbose"], on_step=progress.step)  # fmt: skip
    _report(done, out, compare is not None, as_json)


def _report(done: Any, out: Path, compared: bool, as_json: bool) -> None:
    records, mean = done.records, done.mean_pixel_agreement
    files = sum(3 if compared else 2 for _ in records)
    if as_json:
        console.print_json(json.dumps(done.to_dict()))
        return
    if compared:
        for r in records:
            console.print(f"{r['name']}: {100 * r['pixel_agreement']:.2f}% of pixels agree with the float model",
                          markup=False)  # fmt: skip
        console.print(f"mean pixel agreement {100 * mean:.2f}% over {len(records)} images", markup=False)  # type: ignore[operator]
    console.print(f"wrote {files} files to {out}", markup=False)
