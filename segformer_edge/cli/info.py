"""``segformer-edge info``: parameters, MACs and stage shapes of a variant or a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .common import JsonFlag, NumClassesOption, SizeOption, check_size, console

HELP = """Parameters, multiply-accumulates and stage shapes of a SegFormer variant or checkpoint.

MODEL is a variant (b0..b5) or a checkpoint path. MACs count the multiply-accumulates of convolutions,
linear layers and attention matmuls at batch 1: what the paper's "GFLOPs" column counts.
Normalisation, softmax, GELU, upsampling and additions are not counted.

Examples:

  segformer-edge info b0 --num-classes 150 --size 512 512

  segformer-edge info b5 --json

  segformer-edge info runs/reference/best.safetensors
"""


def info(
    model: Annotated[str, typer.Argument(help="A variant (b0..b5) or a checkpoint path.")] = "b0",
    num_classes: NumClassesOption = None,
    size: SizeOption = None,
    as_json: JsonFlag = False,
) -> None:
    from segformer_edge.model import VARIANTS, variant_config
    from segformer_edge.profile import model_stats

    if model.lower() in VARIANTS:
        config = variant_config(model, **({"num_classes": num_classes} if num_classes else {}))
        default_size = (512, 512)
        names = None
    else:
        from dataclasses import replace

        from segformer_edge.weights import load_pretrained

        loaded = load_pretrained(Path(model), num_classes=num_classes)
        config, default_size, names = loaded.config, loaded.meta.input_size, loaded.meta.class_names
        if num_classes:
            config = replace(config, num_classes=num_classes)
    h, w = check_size(size, default_size)
    stats = model_stats(config, (h, w))
    if names is not None:
        stats["class_names"] = names
    if as_json:
        console.print_json(json.dumps(stats))
        return

    from rich.table import Table

    table = Table(title=f"SegFormer-{config.variant.upper()} · {config.num_classes} classes · {h}x{w}")
    table.add_column("stage")
    table.add_column("output (B, C, H, W)")
    table.add_column("stride", justify="right")
    table.add_column("depth", justify="right")
    table.add_column("heads", justify="right")
    table.add_column("sr", justify="right")
    for stage in stats["stages"]:
        table.add_row(
            str(stage["stage"]),
            str(tuple(stage["shape"])),
            str(stage["stride"]),
            str(stage["depth"]),
            str(stage["heads"]),
            str(stage["sr_ratio"]),
        )
    table.add_row("logits", str(tuple(stats["output_shape"])), "4", "", "", "")
    console.print(table)
    console.print(
        f"params: {stats['params'] / 1e6:.3f} M (encoder {stats['params_encoder'] / 1e6:.3f} M, "
        f"decoder {stats['params_decoder'] / 1e6:.3f} M)"
    )
    console.print(f"MACs:   {stats['macs'] / 1e9:.3f} G at {h}x{w} (conv, linear and attention matmuls)")
