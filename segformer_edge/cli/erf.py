"""``segformer-edge erf``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import CheckpointArgument, SizeOption, check_size, console, progress_bar, resolve_checkpoint

HELP = """Effective receptive field of each stage, as in the SegFormer paper (Figure 3).

For each stage and the decoder output: the gradient of the centre activation with respect to the input,
averaged over images. Writes erf_stage1.png .. erf_stage4.png, erf_head.png and erf.png (all panels).

Example:

  segformer-edge erf runs/reference/best.safetensors --out erf/ --num-images 16
"""


def erf(
    checkpoint: CheckpointArgument = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("erf"),
    data: Annotated[str, typer.Option(help="synthetic[:N], a dataset folder (val split), or a folder or glob of photos (no masks needed).")] = "synthetic",
    num_images: Annotated[int, typer.Option(min=1, help="Images to average over.")] = 16,
    size: SizeOption = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from segformer_edge.data import open_source
    from segformer_edge.data.transforms import EvalTransform
    from segformer_edge.erf import effective_receptive_fields
    from segformer_edge.io import atomic_path
    from segformer_edge.weights import load_pretrained

    model = load_pretrained(resolve_checkpoint(checkpoint))
    h, w = check_size(size, model.meta.input_size)
    source = open_source(data, "val")
    n = min(num_images, len(source))
    transform = EvalTransform(model.meta.mean, model.meta.std, (h, w))
    images = torch.stack([torch.from_numpy(transform(source.load(i)[0])) for i in range(n)])  # (N, 3, H, W)
    with progress_bar("erf") as bar:
        task = bar.add_task("erf", total=n)
        maps = effective_receptive_fields(model, images, progress=lambda k: bar.advance(task, k))
    fig_all, axes = plt.subplots(1, len(maps), figsize=(3.2 * len(maps), 3.4))
    for ax, (name, heat) in zip(axes, maps.items()):
        fig, single = plt.subplots(figsize=(4, 4))
        for a in (ax, single):
            a.imshow(heat, cmap="inferno", vmin=0, vmax=1)
            a.set_title(name)
            a.axis("off")
        fig.tight_layout()
        with atomic_path(out / f"erf_{name}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
    fig_all.suptitle(f"effective receptive fields ({n} images, {h}x{w})")
    fig_all.tight_layout()
    with atomic_path(out / "erf.png") as tmp:
        fig_all.savefig(tmp, format="png", dpi=100)
    plt.close(fig_all)
    console.print(f"wrote {len(maps) + 1} heatmaps to {out}")
