"""Which function-preserving rewrites are worth adding against INT8 activation outliers: measured, not assumed.

On the reference model (the built-in B0 at its training size) and the outlier-stressed copy that
benchmarks/int8.py builds (x30, x60, x120 on three LayerNorm output channels of every site), each candidate
is scored by the measure that `--outliers auto` uses: the noise-to-signal ratio of the logits in simulated
W8A8 on 8 calibration images (segformer_edge.calibration.outliers.SimulatedInt8). Candidates:

- SmoothQuant migration at each strength (a = 1 is RepQ-ViT's scale reparameterization);
- RepQ-ViT's zero-point part: each LayerNorm channel centred, the shift moved into the consumers' biases
  (only where no consumer is a zero-padded conv, where it would not be exact);
- cross-layer equalization of mlp.fc1 into the depth-wise conv (the one exact pair before a non-linearity);
- bias correction of the int8 weight error;

the last three alone and on top of the best SmoothQuant strength. Writes benchmarks/OUTLIER_REWRITES.md.

    python benchmarks/outlier_rewrites.py
"""

from __future__ import annotations

import copy
import datetime
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from segformer_edge.calibration import outliers as O
from segformer_edge.calibration.calibset import select_calibration_set
from segformer_edge.converters.graph import fold_batch_norm
from torch import Tensor, nn

from segformer_edge.inputs import InputSpec
from segformer_edge.weights import builtin_checkpoint, load_pretrained

HERE = Path(__file__).parent
FACTORS = (120.0, 60.0, 30.0)  # as benchmarks/int8.py
logger = logging.getLogger("benchmarks.outlier_rewrites")


@torch.no_grad()
def centre_channels(model: nn.Module, x: Tensor) -> int:
    """In place: each exact site's LayerNorm channels centred on their calibration range; returns the sites done."""
    sites, _ = O.norm_sites(model)
    modules = dict(model.named_modules())
    ranges: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: object, out: Tensor) -> None:
            tokens = out.flatten(0, -2)  # (B, N, C) -> (B * N, C)
            lo, hi = tokens.amin(0), tokens.amax(0)  # (C,)
            if name in ranges:
                lo, hi = torch.minimum(ranges[name][0], lo), torch.maximum(ranges[name][1], hi)
            ranges[name] = (lo, hi)

        return record

    handles = [modules[s.norm].register_forward_hook(hook(s.norm)) for s in sites]
    model(x)
    for handle in handles:
        handle.remove()
    done = 0
    for site in sites:
        consumers = [modules[c] for c in site.consumers]
        if any(isinstance(c, nn.Conv2d) and c.padding != (0, 0) for c in consumers):
            continue
        lo, hi = ranges[site.norm]
        shift = (lo + hi) / 2  # (C,)
        modules[site.norm].bias.sub_(shift)
        for c in consumers:
            weight = c.weight if isinstance(c, nn.Linear) else c.weight.sum((2, 3))  # (out, C); unpadded conv: exact
            c.bias.add_(weight @ shift)
        done += 1
    return done


@torch.no_grad()
def equalize_fc1_dwconv(model: nn.Module, x: Tensor) -> int:
    """In place: fc1's output channels scaled to one range, the depth-wise conv's weights compensating."""
    modules = dict(model.named_modules())
    ranges: dict[str, Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            amax = args[0].abs().transpose(0, 1).flatten(1).amax(1)  # (B, C, H, W) -> (C,)
            ranges[name] = amax if name not in ranges else torch.maximum(ranges[name], amax)

        return record

    names = [n for n in modules if n.endswith("mlp.dwconv")]
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    model(x)
    for handle in handles:
        handle.remove()
    for name in names:
        fc1, dw = modules[name.replace("dwconv", "fc1")], modules[name]
        s = (ranges[name] / ranges[name].median()).clamp(min=1e-3)  # (C,)
        fc1.weight.div_(s[:, None])
        fc1.bias.div_(s)
        dw.weight.mul_(s[:, None, None, None])
    return len(names)


def score(model: nn.Module, x: Tensor) -> dict[str, float]:
    """Every candidate's simulated W8A8 error on this (BatchNorm-folded) model."""
    sites, _ = O.norm_sites(model)
    with torch.no_grad():
        reference = model(x[: O.SEARCH_IMAGES])  # (8, K, H/4, W/4)
    measure = O.SimulatedInt8(x[: O.SEARCH_IMAGES], reference)
    absmax = O.channel_absmax(model, x, sites)
    results = {"none": measure(model)}
    for alpha in O.ALPHAS:
        candidate = copy.deepcopy(model)
        O.smooth(candidate, sites, absmax, alpha)
        results[f"smoothquant a={alpha:g}"] = measure(candidate)
    best = min(O.ALPHAS, key=lambda a: results[f"smoothquant a={a:g}"])
    results["best smoothquant"] = results[f"smoothquant a={best:g}"]
    logger.info("best SmoothQuant strength %g", best)
    extras: dict[str, Callable[[nn.Module], object]] = {
        "centring (RepQ-ViT zero points)": lambda m: centre_channels(m, x),
        "CLE fc1 -> dwconv": lambda m: equalize_fc1_dwconv(m, x),
        "bias correction": lambda m: O.correct_bias(m, x),
    }
    for name, rewrite in extras.items():
        for base in ("none", best):
            candidate = copy.deepcopy(model)
            if base != "none":
                O.smooth(candidate, sites, absmax, base)
            rewrite(candidate)
            label = name if base == "none" else f"best smoothquant + {name}"
            results[label] = measure(candidate)
    return results


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(0)
    ckpt = builtin_checkpoint()
    reference = load_pretrained(ckpt)
    size = tuple(reference.meta.input_size)
    calib = select_calibration_set("synthetic", 32, size, reference.config.num_classes)
    x = torch.from_numpy(InputSpec.for_model(reference.meta, size)(calib.images))  # (32, 3, H, W)
    scores = {label: score(fold_batch_norm(model), x)
              for label, model in (("reference", reference), ("stressed", O.inject_outliers(reference, FACTORS)))}  # fmt: skip

    def cell(label: str, row: str) -> str:
        value = scores[label][row]
        base = "best smoothquant" if row.startswith("best smoothquant +") else "none"
        change = 100 * (value / scores[label][base] - 1)
        return f"{value:.3e}" if row == "none" else f"{value:.3e} ({change:+.0f}% vs {base})"

    lines = [
        "# Rewrites against INT8 activation outliers: which are worth adding",
        "",
        f"Measured {datetime.date.today()} by `python benchmarks/outlier_rewrites.py`: the noise-to-signal ratio of the logits",
        f"in simulated W8A8 (the measure `--outliers auto` chooses by; 8 of 32 calibration images, {size[0]}x{size[1]}) for",
        "the reference model and its outlier-stressed copy (x30, x60, x120 on three LayerNorm output channels of",
        "every site). Lower is better; `auto` keeps a rewrite only for a 20% reduction or more.",
        "",
        "| candidate | reference model | outlier-stressed copy |",
        "|---|---|---|",
    ]
    lines += [f"| {row} | {cell('reference', row)} | {cell('stressed', row)} |" for row in scores["reference"]]
    lines.append("")
    (HERE / "OUTLIER_REWRITES.md").write_text("\n".join(lines))
    logger.info("wrote %s", HERE / "OUTLIER_REWRITES.md")


if __name__ == "__main__":
    main()
