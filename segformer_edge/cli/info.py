"""``segformer-edge info``: parameters, MACs and stage shapes of a variant or a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .common import JsonFlag, NumClassesOption, SizeOption, check_size, console

HELP = """Parameters, multiply-accumulates and stage shapes of a SegFormer variant or checkpoint; or what an
artifact's manifest says; or (--targets) every registered target and what it supports.

MODEL is a variant (b0..b5), a checkpoint path or Hub id, or an artifact folder. MACs count the multiply-accumulates of convolutions,
linear layers and attention matmuls at batch 1: what the paper's "GFLOPs" column counts.
Normalisation, softmax, GELU, upsampling and additions are not counted.

Examples:

  segformer-edge info b0 --num-classes 150 --size 512 512

  segformer-edge info b5 --json

  segformer-edge info runs/reference/best.safetensors

  segformer-edge info exports/segformer-b0_tflite_int8

  segformer-edge info --targets
"""


def info(
    model: Annotated[str, typer.Argument(help="A variant (b0..b5) or a checkpoint path.")] = "b0",
    num_classes: NumClassesOption = None,
    size: SizeOption = None,
    targets: Annotated[bool, typer.Option("--targets", help="List the registered targets and what each supports.")] = False,
    as_json: JsonFlag = False,
) -> None:
    if targets:
        _targets_info(as_json)
        return
    if (Path(model) / "manifest.json").is_file():
        _artifact_info(Path(model), as_json)
        return
    from segformer_edge.model import VARIANTS, variant_config
    from segformer_edge.profile import model_stats

    if model.lower() in VARIANTS:
        config = variant_config(model, **({"num_classes": num_classes} if num_classes else {}))
        default_size = (512, 512)
        names = None
    else:
        from dataclasses import replace

        from segformer_edge.weights import load_pretrained

        from .common import resolve_checkpoint

        loaded = load_pretrained(resolve_checkpoint(model), num_classes=num_classes)
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


def _targets_info(as_json: bool) -> None:
    """Every registered target (built-in and plugins), from the registry."""
    from segformer_edge.converters import get_target, target_names

    rows = []
    for name in target_names():
        t = get_target(name)
        rows.append({"name": name, "summary": t.summary, "suffix": t.suffix, "precisions": list(t.precisions),
                     "features": sorted(t.features), "int8_methods": list(t.quant_methods) if "int8" in t.precisions else [],
                     "int8_schemes": list(t.quant_schemes) if "int8" in t.precisions else [],
                     "options": {k: list(v) for k, v in t.options.items()}, "in_all": t.in_all,
                     "runs_here": t.runs_here(), "extra": t.extra})  # fmt: skip
    if as_json:
        console.print_json(json.dumps(rows))
        return
    for r in rows:
        here = "runs here" if r["runs_here"] else "compile only here"
        console.print(f"[bold]{r['name']}[/] ({r['suffix']}, {', '.join(r['precisions'])}; {here}): {r['summary']}")
        extras = [f"edges: {', '.join(r['features']) or 'none (normalized NCHW in, logits out)'}"]
        if r["int8_methods"]:
            extras.append(f"int8 methods: {', '.join(r['int8_methods'])}")
        if len(r["int8_schemes"]) > 1:
            extras.append(f"int8 schemes: {', '.join(r['int8_schemes'])}")
        extras += [f"-O {k}={'|'.join(v)}" for k, v in r["options"].items()]
        console.print("  " + "; ".join(extras), markup=False, highlight=False)


def _artifact_info(folder: Path, as_json: bool) -> None:
    """What an artifact's manifest says, checked against its file."""
    from segformer_edge.converters.base import read_manifest

    manifest = read_manifest(folder).manifest
    if as_json:
        console.print_json(json.dumps(manifest))
        return
    spec = manifest["input"]
    parity = manifest.get("parity") or {}
    quant = manifest.get("quantization") or {}
    lines = [
        f"{folder.name}: {manifest['target']} {manifest['precision']}, {manifest['variant']}, {manifest['num_classes']} classes",
        f"  input   {spec['shape']} {spec['dtype']} ({spec['kind']}, {spec['layout']})",
        f"  output  {manifest['output']['shape']} {manifest['output']['dtype']} ({manifest['output']['kind']})",
        f"  file    {manifest['file']} {manifest['size_bytes'] / 1e6:.2f} MB, sha256 {manifest['sha256'][:16]}...",
        f"  parity  {parity.get('status', '-')}"
        + (f", pixel agreement {100 * parity['pixel_agreement']:.3f}%" if parity.get("pixel_agreement") is not None else ""),
    ]
    if quant:
        lines.append(f"  int8    {quant['method']}, {quant['weights']}, float groups: {', '.join(quant['float_groups']) or 'none'}")
    console.print("\n".join(lines), markup=False, highlight=False)
