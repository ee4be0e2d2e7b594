"""``segformer-edge train``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import console

HELP = """Train a SegFormer with the paper's recipe (AdamW, warmup + poly, head lr x10).

On CUDA it uses bf16 autocast, channels_last and fused AdamW; on the CPU it trains in fp32. The run
folder gets last.pt (resumable), best.safetensors (best val mIoU), final.safetensors, log.jsonl and
curves.png.

Examples:

  segformer-edge train --preset reference

  segformer-edge train --data /data/ADEChallengeData2016 --variant b0 --init mit-b0/ --out runs/ade

  segformer-edge train --resume runs/reference/last.pt

  torchrun --nproc_per_node 8 -m segformer_edge train --data /data/ade --batch-size 16
"""


def train(
    preset: Annotated[str | None, typer.Option(help="Start from a preset: reference or paper.")] = None,
    variant: Annotated[str | None, typer.Option(help="b0..b5.")] = None,
    data: Annotated[str | None, typer.Option(help="synthetic[:N] or a dataset folder.")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Run folder.")] = None,
    iters: Annotated[int | None, typer.Option(min=1, help="Total iterations.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per iteration.")] = None,
    lr: Annotated[float | None, typer.Option(help="Base learning rate (head: x10).")] = None,
    crop: Annotated[tuple[int, int] | None, typer.Option(metavar="H W", help="Training crop.")] = None,
    init: Annotated[str | None, typer.Option(help="Start from this checkpoint (HF, mmseg or ours).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda[:N].")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="Use torch.compile.")] = False,
    workers: Annotated[int | None, typer.Option(min=0, help="DataLoader workers.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    eval_interval: Annotated[int | None, typer.Option(min=1, help="Evaluate every N iterations.")] = None,
    ckpt_interval: Annotated[int | None, typer.Option(min=1, help="Write last.pt every N iterations.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue from a run's last.pt.")] = None,
    sync_bn: Annotated[bool | None, typer.Option("--sync-bn/--no-sync-bn", help="Sync the decoder BatchNorm across processes (default: on under torchrun).")] = None,
) -> None:
    from segformer_edge.train import TrainConfig, Trainer, config_from_preset

    if resume is not None:
        import json

        from segformer_edge.errors import CheckpointError

        config_file = resume.parent / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{resume}: no config.json beside it; resume needs the run folder intact")
        config = TrainConfig.from_dict(json.loads(config_file.read_text()))
    else:
        config = config_from_preset(
            preset, variant=variant, data=data, out=out, iters=iters, batch_size=batch_size, lr=lr,
            crop=crop, init=init, device=device, compile=compile or None, workers=workers, seed=seed,
            eval_interval=eval_interval, ckpt_interval=ckpt_interval, sync_bn=sync_bn,
        )  # fmt: skip
    trainer = Trainer(config, resume=resume)
    main = trainer.dist.main
    if main:
        console.print(f"training {config.variant} on {config.data} ({trainer.device}, {trainer.dist.world} process(es)) -> {config.out}")
    metrics = trainer.train()
    if main:
        console.print(f"done: val mIoU {metrics.get('miou', float('nan')):.4f}, best {trainer.best_miou:.4f}; {config.out}")
    trainer.close()
