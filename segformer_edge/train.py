"""Training with the paper's recipe, on CUDA where there is a GPU and on the CPU otherwise.

AdamW (lr 6e-5, weight decay 0.01, x10 on the head, no decay on norms and biases), a linear warmup then
poly decay (power 1.0), cross-entropy with ignore index 255 on logits upsampled to the crop. bf16 autocast
and channels_last on CUDA, optional ``torch.compile``, fused AdamW where available.

The run is exactly resumable: the data order and every augmentation are functions of
``(seed, epoch, position)``, and the checkpoint keeps the model, optimizer, iteration and RNG states.
Nothing here imports an edge runtime, so the trainer runs from the source tree on any torch.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .data import IGNORE_INDEX, Source, open_source
from .data.transforms import TrainTransform
from .errors import CheckpointError, DataError
from .evaluate import evaluate
from .io import atomic_path, atomic_write_text
from .model import IMAGENET_MEAN, IMAGENET_STD, SegFormer, create_model, variant_config
from .weights import load_pretrained, save_checkpoint

__all__ = ["PRESETS", "TrainConfig", "Trainer", "lr_factor"]

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """One training run. Defaults are the paper's ADE20K recipe; presets change what they must.

    Attributes:
        variant: b0..b5.
        data: ``synthetic[:N]`` or a dataset folder (ADE20K, Cityscapes or generic layout).
        out: Run folder: checkpoints, ``log.jsonl`` and ``curves.png``.
        crop: Training crop (H, W); also the model's recorded input size.
        scale: (long, short) image scale before the random 0.5-2.0 resize (mmseg's img_scale).
        batch_size: Images per iteration.
        iters: Total iterations.
        lr: Base learning rate of the encoder; the head gets ``lr * head_lr_mult``.
        warmup_iters: Linear warmup from ``lr * warmup_ratio``.
        eval_interval / ckpt_interval / log_interval: In iterations.
        eval_images: Validation images per evaluation (None: all).
        init: Checkpoint to start from (ours, Hugging Face or mmseg; an encoder-only mit-bX works).
        device: ``auto`` takes CUDA when there is a GPU.
        compile: Wrap the model in ``torch.compile``.
        channels_last: Use NHWC memory format (default: on CUDA).
        workers: DataLoader worker processes.
        sync_bn: Synchronise the decoder's BatchNorm across processes (default: on with more than one).
    """

    variant: str = "b0"
    data: str = "synthetic"
    out: str = "runs/train"
    crop: tuple[int, int] = (512, 512)
    scale: tuple[int, int] = (2048, 512)
    batch_size: int = 16
    iters: int = 160_000
    lr: float = 6e-5
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0
    drop_path_rate: float = 0.1
    eval_interval: int = 16_000
    ckpt_interval: int = 4_000
    log_interval: int = 50
    eval_images: int | None = None
    seed: int = 0
    init: str | None = None
    device: str = "auto"
    compile: bool = False
    channels_last: bool | None = None
    workers: int = 4
    synthetic_seed: int = 0
    sync_bn: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names})


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's ADE20K schedule (8 GPUs x 2 images = batch 16, 160k iterations, 512x512 crops).
    "paper": {},
    # The shipped reference model: b0 on the synthetic scenes. There are no ImageNet weights offline, so the
    # encoder trains from scratch: a 10x higher lr and a short warmup replace the fine-tuning values.
    # Sized for a 2-core CPU (about 30 minutes): 128x128 scenes and crops.
    "reference": {
        "data": "synthetic",
        "out": "runs/reference",
        "crop": (128, 128),
        "scale": (512, 128),
        "batch_size": 8,
        "iters": 5000,
        "lr": 6e-4,
        "warmup_iters": 300,
        "eval_interval": 1000,
        "ckpt_interval": 500,
        "log_interval": 20,
        "eval_images": None,
        "workers": 1,
    },
}


def lr_factor(iteration: int, config: TrainConfig) -> float:
    """mmseg's poly schedule with linear warmup: the multiplier of the base lr at ``iteration`` (0-based)."""
    poly = (1 - iteration / config.iters) ** config.power
    if iteration < config.warmup_iters:
        k = (1 - iteration / config.warmup_iters) * (1 - config.warmup_ratio)
        return poly * (1 - k)
    return poly


class _PositionSampler(Sampler[int]):
    """Global sample positions of this rank's share of each iteration's batch.

    Iteration ``i`` of the global batch ``B`` covers positions ``i*B .. i*B + B - 1``; rank ``r`` of ``W`` takes
    the ``B / W`` positions from ``i*B + r*B/W``. A position alone fixes the image (a per-epoch permutation
    seeded by ``(seed, epoch)``) and its augmentation, so every rank sees different images, the union of the
    ranks' batches is exactly the single-process batch, and a resume at another world size continues the
    same stream.
    """

    def __init__(self, start_iter: int, iters: int, batch: int, rank: int = 0, world: int = 1) -> None:
        self.start_iter, self.iters, self.batch = start_iter, iters, batch
        self.local = batch // world
        self.offset = rank * self.local

    def __iter__(self) -> Iterator[int]:
        for iteration in range(self.start_iter, self.iters):
            base = iteration * self.batch + self.offset
            yield from range(base, base + self.local)

    def __len__(self) -> int:
        return (self.iters - self.start_iter) * self.local


class _TrainSet(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, source: Source, transform: TrainTransform, seed: int) -> None:
        self.source, self.transform, self.seed = source, transform, seed
        self._perm_epoch, self._perm = -1, np.arange(0)

    def __len__(self) -> int:  # the sampler drives the length
        return len(self.source)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.source)
        epoch, offset = divmod(position, n)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        image, mask = self.source.load(int(self._perm[offset]))
        rng = np.random.default_rng([self.seed, epoch, offset, 1])
        x, y = self.transform(image, mask, rng)
        return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


def resolve_device(name: str, dist_info: DistInfo | None = None) -> torch.device:
    """``auto`` takes CUDA when there is a GPU; under torchrun each process takes its LOCAL_RANK's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name}: no CUDA GPU is visible; use --device cpu or auto")
    if device.type == "cuda" and dist_info is not None and dist_info.world > 1:
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    return device


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the torchrun job described by the environment: NCCL on CUDA, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device != "cpu"
        dist.init_process_group("nccl" if use_cuda else "gloo")
    logger.info("rank %d of %d (local %d)", rank, world, local)
    return DistInfo(rank, world, local)


class SyncedBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm whose training statistics cover the global batch, on any backend (gloo included).

    ``torch.nn.SyncBatchNorm`` needs a GPU; this one all-reduces per-channel sums with the autograd-aware
    ``torch.distributed.nn.all_reduce``, so that N processes normalise exactly as one process would.
    Parameters and buffers are those of ``BatchNorm2d``: checkpoints keep their layout.
    """

    @classmethod
    def from_batch_norm(cls, bn: torch.nn.BatchNorm2d) -> SyncedBatchNorm:
        synced = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum)
        synced.load_state_dict(bn.state_dict())
        return synced.to(bn.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        from torch.distributed.nn import all_reduce

        c = x.shape[1]
        count = torch.full((1,), x.numel() / c, dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), count])  # (2C + 1,)
        stats = all_reduce(stats)
        n = stats[-1]
        mean = stats[:c] / n  # (C,)
        var = stats[c : 2 * c] / n - mean * mean  # biased, as BatchNorm normalises with
        with torch.no_grad():
            momentum = self.momentum if self.momentum is not None else 0.1
            self.running_mean.mul_(1 - momentum).add_(momentum * mean)
            self.running_var.mul_(1 - momentum).add_(momentum * var * n / (n - 1))
            self.num_batches_tracked.add_(1)
        scale = self.weight / torch.sqrt(var + self.eps)  # (C,)
        return x * scale.reshape(1, c, 1, 1) + (self.bias - mean * scale).reshape(1, c, 1, 1)


class Trainer:
    """Runs one :class:`TrainConfig`; ``resume`` continues from a ``last.pt`` of the same run."""

    def __init__(self, config: TrainConfig, *, resume: str | Path | None = None) -> None:
        self.config = config
        self.out = Path(config.out)
        self.dist = init_distributed(config.device)
        self.device = resolve_device(config.device, self.dist)
        if config.batch_size % self.dist.world:
            raise DataError(
                f"--batch-size {config.batch_size} does not split over {self.dist.world} processes; "
                "the batch size is global: use a multiple of the process count"
            )
        self.start_iter = 0
        self.best_miou = -1.0
        torch.manual_seed(config.seed)

        self.train_source = open_source(config.data, "train", seed=config.synthetic_seed)
        self.val_source = open_source(config.data, "val", seed=config.synthetic_seed)
        if self.train_source.synthetic is not None:
            self.train_source.cache()
            self.val_source.cache()
        labels = self.train_source.require_masks("train")
        self.model = self._build_model(labels.num_classes)
        self.model.meta.class_names = list(labels.classes)
        self.model.meta.palette = [tuple(c) for c in labels.palette]
        self.model.meta.mean, self.model.meta.std = IMAGENET_MEAN, IMAGENET_STD
        self.model.meta.input_size = tuple(config.crop)  # type: ignore[assignment]
        self.model.to(self.device)
        self.channels_last = config.channels_last if config.channels_last is not None else self.device.type == "cuda"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = self._build_optimizer()
        self.step_model = self._wrap_distributed()
        if config.compile:
            self.step_model = torch.compile(self.step_model)
        if resume is not None:
            self._load_state(Path(resume))
        self.transform = TrainTransform(tuple(config.crop), tuple(config.scale), IMAGENET_MEAN, IMAGENET_STD)  # type: ignore[arg-type]

    # -- construction ---------------------------------------------------------------------------------
    def _build_model(self, num_classes: int) -> SegFormer:
        c = self.config
        if c.init:
            model = load_pretrained(c.init, num_classes=num_classes)
        else:
            model = create_model(variant_config(c.variant, num_classes=num_classes, drop_path_rate=c.drop_path_rate))
        sync = c.sync_bn if c.sync_bn is not None else self.dist.world > 1
        if sync and self.dist.world > 1:
            # Same parameters and buffers, so checkpoints keep their layout.
            model.decoder.bn = SyncedBatchNorm.from_batch_norm(model.decoder.bn)
        return model.train()

    def _wrap_distributed(self) -> torch.nn.Module:
        if self.dist.world == 1:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        groups = self.model.param_groups()
        params = [
            {"params": groups["encoder_decay"], "lr": c.lr, "weight_decay": c.weight_decay, "lr_mult": 1.0},
            {"params": groups["encoder_no_decay"], "lr": c.lr, "weight_decay": 0.0, "lr_mult": 1.0},
            {"params": groups["head_decay"], "lr": c.lr * c.head_lr_mult, "weight_decay": c.weight_decay, "lr_mult": c.head_lr_mult},
            {"params": groups["head_no_decay"], "lr": c.lr * c.head_lr_mult, "weight_decay": 0.0, "lr_mult": c.head_lr_mult},
        ]
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.999), fused=fused or None)

    # -- state ----------------------------------------------------------------------------------------
    def _state(self, iteration: int) -> dict[str, Any]:
        return {
            "format": "segformer-edge-train/1",
            "iteration": iteration,
            "train_config": self.config.to_dict(),
            "model_config": self.model.config.to_dict(),
            "model_meta": self.model.meta.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "best_miou": self.best_miou,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def _load_state(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure to read is a bad resume file
            raise CheckpointError(f"{path}: cannot resume from this file ({str(exc).splitlines()[0]})") from exc
        if not isinstance(state, dict) or state.get("format") != "segformer-edge-train/1":
            raise CheckpointError(f"{path}: not a segformer-edge training state (expected a last.pt from a run folder)")
        if state["model_config"] != self.model.config.to_dict():
            raise CheckpointError(f"{path}: the training state is for another architecture or class count")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_iter = int(state["iteration"])
        self.best_miou = float(state["best_miou"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        logger.info("resumed %s at iteration %d", path, self.start_iter)

    def save_state(self, iteration: int) -> Path:
        path = self.out / "last.pt"
        if not self.dist.main:
            return path
        with atomic_path(path) as tmp:
            torch.save(self._state(iteration), tmp)
        return path

    # -- the loop -------------------------------------------------------------------------------------
    def _set_lr(self, iteration: int) -> float:
        factor = lr_factor(iteration, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * group["lr_mult"] * factor
        return self.config.lr * factor

    def _loader(self) -> DataLoader:
        c = self.config
        dataset = _TrainSet(self.train_source, self.transform, c.seed)
        return DataLoader(
            dataset,
            batch_size=c.batch_size // self.dist.world,
            sampler=_PositionSampler(self.start_iter, c.iters, c.batch_size, self.dist.rank, self.dist.world),
            num_workers=c.workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=c.workers > 0,
            # Its own generator: creating the loader must not draw from the global RNG (exact resume).
            generator=torch.Generator().manual_seed(c.seed),
        )

    def train(self, progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
        """Run to ``iters`` (or pause after iteration ``stop_after``, saving ``last.pt``); returns the last metrics.

        Writes ``last.pt``, ``best.safetensors``, ``final.safetensors``, ``log.jsonl`` and ``curves.png``
        in the run folder.
        """
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        c = self.config
        main = self.dist.main
        log_path = self.out / "log.jsonl"
        if main:  # only rank 0 writes
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.json", json.dumps(self.config.to_dict(), indent=2) + "\n")
            if self.start_iter == 0 and log_path.exists():
                log_path.unlink()
            elif self.start_iter > 0:
                self._truncate_log(log_path, self.start_iter)
        progress = progress and main
        amp = self.device.type == "cuda"
        self.model.train()
        columns = [
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
        ]  # fmt: skip
        last_metrics: dict[str, Any] = {}
        window_loss, window_images, window_start = 0.0, 0, time.perf_counter()
        with Progress(*columns, disable=not progress, transient=False) as bar:
            task = bar.add_task("train", total=c.iters, completed=self.start_iter, status="")
            iteration = self.start_iter
            for x, y in self._loader():
                lr = self._set_lr(iteration)
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = self.step_model(x)  # (b, K, h/4, w/4)
                    logits = F.interpolate(logits, size=y.shape[1:], mode="bilinear", align_corners=False)
                    loss = self._loss(logits.float(), y)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"loss became {loss.item()} at iteration {iteration}; lower --lr")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                iteration += 1
                window_loss += float(loss.detach()) / self.dist.world  # this rank's share of the global mean
                window_images += x.shape[0] * self.dist.world
                if iteration % c.log_interval == 0 or iteration == c.iters:
                    if amp:
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - window_start
                    steps = max(1, window_images // c.batch_size)
                    window_loss = self._all_sum(window_loss)
                    record = {"iter": iteration, "loss": window_loss / steps, "lr": lr, "img_per_s": window_images / elapsed}
                    if main:
                        self._log(log_path, record)
                    bar.update(task, status=f"loss {record['loss']:.4f} · lr {lr:.2e} · {record['img_per_s']:.1f} img/s")
                    window_loss, window_images, window_start = 0.0, 0, time.perf_counter()
                if iteration % c.eval_interval == 0 or iteration == c.iters:
                    last_metrics = self._evaluate(iteration, log_path)
                    window_start = time.perf_counter()
                if iteration % c.ckpt_interval == 0 or iteration == c.iters or iteration == stop_after:
                    self.save_state(iteration)
                bar.update(task, completed=iteration)
                if iteration == stop_after:
                    return last_metrics
        if main:
            save_checkpoint(self.model, self.out / "final.safetensors")
            self.plot()
        return last_metrics

    def close(self) -> None:
        """Leave the process group (torchrun jobs)."""
        if self.dist.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy averaged over the labelled pixels of the *global* batch.

        Each rank divides its sum by the global count (times the world size, which DDP's gradient mean
        divides out again), so that 1 and N processes compute the same gradient.
        """
        total = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
        count = (y != IGNORE_INDEX).sum().float()
        if self.dist.world > 1:
            import torch.distributed as dist

            dist.all_reduce(count)
            return total * self.dist.world / count.clamp(min=1)
        return total / count.clamp(min=1)

    def _all_sum(self, value: float) -> float:
        if self.dist.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def _evaluate(self, iteration: int, log_path: Path) -> dict[str, Any]:
        metrics = evaluate(
            self.model, self.val_source, self.model.meta, size=tuple(self.config.crop), device=self.device,
            limit=self.config.eval_images, shard=(self.dist.rank, self.dist.world), reduce=self._reduce_matrix,
        )  # fmt: skip
        record = {"iter": iteration, "val_miou": metrics["miou"], "val_pixel_accuracy": metrics["pixel_accuracy"]}
        if metrics["miou"] > self.best_miou:
            self.best_miou = metrics["miou"]
            if self.dist.main:
                save_checkpoint(self.model, self.out / "best.safetensors")
        if self.dist.main:
            self._log(log_path, record)
            logger.info("iteration %d: val mIoU %.4f", iteration, metrics["miou"])
        self.model.train()
        return metrics

    def _reduce_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """Sum the ranks' confusion matrices: distributed evaluation gives the exact single-process mIoU."""
        if self.dist.world == 1:
            return matrix
        import torch.distributed as dist

        t = torch.from_numpy(matrix).to(self.device)
        dist.all_reduce(t)
        return t.cpu().numpy()

    @staticmethod
    def _log(path: Path, record: dict[str, Any]) -> None:
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    @staticmethod
    def _truncate_log(path: Path, iteration: int) -> None:
        """Drop the records written after the checkpoint we resume from (they will be written again)."""
        if not path.exists():
            return
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["iter"] <= iteration]
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    def plot(self) -> Path | None:
        return plot_curves(self.out / "log.jsonl", self.out / "curves.png")


def plot_curves(log_path: Path, png: Path) -> Path | None:
    """The loss and validation mIoU curves of a run as one PNG."""
    if not log_path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    losses = [(r["iter"], r["loss"]) for r in records if "loss" in r]
    mious = [(r["iter"], r["val_miou"]) for r in records if "val_miou" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    if losses:
        ax1.plot(*zip(*losses))
    ax1.set(title="training loss", xlabel="iteration", yscale="log")
    if mious:
        ax2.plot(*zip(*mious), marker="o")
    ax2.set(title="val mIoU", xlabel="iteration", ylim=(0, 1))
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return png


def config_from_preset(preset: str | None, **overrides: Any) -> TrainConfig:
    if preset is not None and preset not in PRESETS:
        raise DataError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base = TrainConfig(**PRESETS.get(preset or "paper", {}))
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})

