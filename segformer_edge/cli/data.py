"""``segformer-edge data``: dataset tools."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import SizeOption, check_size, console, progress_bar

app = typer.Typer(help="Dataset tools.", no_args_is_help=True)

SYNTH_HELP = """Write the synthetic scenes as PNG files in the generic folder layout.

Creates images/{train,val}/NAME.png, masks/{train,val}/NAME.png and classes.json (names and palette).
Scenes are deterministic by seed; train and val never share a scene.

Example:

  segformer-edge data synth --out data/synth --num 3000
"""


@app.command("synth", help=SYNTH_HELP)
def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    num: Annotated[int, typer.Option("--num", "-n", min=1, help="Training scenes.")] = 3000,
    val_num: Annotated[int | None, typer.Option("--val-num", min=1, help="Validation scenes (default: num / 10).")] = None,
    size: SizeOption = None,
    seed: Annotated[int, typer.Option(help="Base seed.")] = 0,
) -> None:
    import numpy as np
    from PIL import Image

    from segformer_edge.data import SYNTHETIC_SIZE, synthetic_labels
    from segformer_edge.data.synthetic import SyntheticScenes
    from segformer_edge.io import atomic_path, atomic_write_json

    h, w = check_size(size, SYNTHETIC_SIZE)
    counts = {"train": num, "val": val_num or max(1, num // 10)}
    with progress_bar("synth") as bar:
        task = bar.add_task("synth", total=sum(counts.values()))
        for split, n in counts.items():
            scenes = SyntheticScenes(split, n, (h, w), seed)
            for i in range(n):
                image, mask = scenes[i]
                for folder, array in (("images", image), ("masks", mask)):
                    with atomic_path(out / folder / split / f"{scenes.name(i)}.png") as tmp:
                        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
                bar.advance(task)
    labels = synthetic_labels()
    atomic_write_json(out / "classes.json", {"classes": labels.classes, "palette": [list(c) for c in labels.palette]})
    console.print(f"wrote {counts['train']} train and {counts['val']} val scenes ({h}x{w}) to {out}")
