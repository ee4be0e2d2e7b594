"""``segformer-edge predict``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import SizeOption, check_size, console, progress_bar

HELP = """Segment images: writes NAME_mask.png (palette colours) and NAME_overlay.png for each image.

MODEL is a checkpoint, or "reference" for the built-in model.

Example:

  segformer-edge predict reference street.jpg park.png --out predictions/
"""


def predict(
    model: Annotated[str, typer.Argument(help="A checkpoint path, or 'reference'.")],
    images: Annotated[list[Path], typer.Argument(help="RGB images.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("predictions"),
    size: SizeOption = None,
    mode: Annotated[str, typer.Option(help="whole (resize to --size) or slide.")] = "whole",
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Overlay opacity.")] = 0.5,
) -> None:
    from PIL import Image

    from segformer_edge.data.folders import read_image
    from segformer_edge.io import atomic_path
    from segformer_edge.predict import colorize, overlay, predict_mask
    from segformer_edge.weights import builtin_checkpoint, load_pretrained

    net = load_pretrained(builtin_checkpoint() if model == "reference" else Path(model))
    target = check_size(size, net.meta.input_size)
    pictures = [read_image(p) for p in images]  # read all first: a bad file fails before anything is written
    with progress_bar("predict") as bar:
        task = bar.add_task("predict", total=len(images))
        for path, image in zip(images, pictures):
            mask = predict_mask(net, image, size=target, mode=mode)
            colours = colorize(mask, net.meta.palette)
            for suffix, array in (("mask", colours), ("overlay", overlay(image, colours, alpha))):
                with atomic_path(out / f"{path.stem}_{suffix}.png") as tmp:
                    Image.fromarray(array).save(tmp, format="PNG")
            bar.advance(task)
    console.print(f"wrote {2 * len(images)} files to {out}")
