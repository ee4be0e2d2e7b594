"""Shared fixtures: tiny configurations keep the suite fast."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("PYTHONHASHSEED", "0")

# The test files, heaviest first (seconds of one file on one xdist worker by `--durations=0` on 2026-11-26: Ethos-U
# 229, int8 227, export 206, user flow 160, target options 156, ...). `-n 2 --dist loadfile` hands whole files to the
# two workers in collection order; xdist's own order (most tests first) sent heavy files last, and one worker ran
# on for minutes after the other had finished. Files not named keep their order, after these.
HEAVY_FIRST = ("test_no_label_parity.py", "test_ethos_u.py", "test_export.py", "test_int8.py", "test_user_flow.py", "test_target_options.py",
               "test_outliers.py", "test_bench.py", "test_reliability.py", "test_debugger.py", "test_cli_options.py",
               "test_mask_outputs.py", "test_openvino.py", "test_claims.py", "test_remote.py", "test_weights.py")  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: schedule files in the order collected below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))  # stable: each file's own order kept

TINY = {
    "variant": "custom",
    "embed_dims": (16, 32, 40, 64),
    "depths": (1, 1, 1, 1),
    "num_heads": (1, 2, 5, 8),
    "sr_ratios": (8, 4, 2, 1),
    "decoder_dim": 32,
}


@pytest.fixture
def tiny_config():
    from segformer_edge.model import SegFormerConfig

    return SegFormerConfig(**TINY, num_classes=5)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    from segformer_edge.cli.app import main

    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def flat(text: str) -> str:
    """CLI output as one line of words (rich wraps long messages in a box)."""
    return " ".join(text.replace("│", " ").split())


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: to assert that a failed command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


sys.path.insert(0, str(Path(__file__).parent))


# ---------------------------------------------------------------------------------------------------
# Plain helpers shared by several test modules (import them: `from conftest import save_hf_model`).

TINY_HF = {"hidden_sizes": [16, 32, 40, 64], "depths": [1, 1, 1, 1], "decoder_hidden_size": 32}


def save_hf_model(path: Path, num_labels: int = 150, tiny: bool = True, id2label: dict[int, str] | None = None) -> Path:
    """Save a random-init transformers SegformerForSemanticSegmentation with ``save_pretrained``; return ``path``.

    ``tiny`` gives the TINY shape (hidden sizes 16, 32, 40, 64, one block per stage, decoder 32; heads 1, 2, 5, 8
    and sr 8, 4, 2, 1 as b0), else b0. Without ``id2label`` transformers writes its defaults (``LABEL_i``; for 2
    classes, transformers 5 writes no labels at all). Seeded: the same call writes the same weights. The
    decoder's BatchNorm statistics are randomised so that parity checks exercise them.
    """
    import torch
    import transformers

    kwargs: dict = {"num_labels": num_labels, **(TINY_HF if tiny else {})}
    if id2label is not None:
        kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
        kwargs["label2id"] = {v: int(k) for k, v in id2label.items()}
    torch.manual_seed(0)
    model = transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(**kwargs)).eval()
    generator = torch.Generator().manual_seed(1)
    bn = model.decode_head.batch_norm
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=generator) * 0.5)
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=generator) * 1.5 + 0.5)
    model.save_pretrained(path)
    return Path(path)


def make_photo_folder(path: Path, n: int = 6) -> Path:
    """Write ``n`` crops of scikit-learn's two sample photos (china.jpg, flower.jpg; 427x640) into ``path``.

    Real photographs, no network: ``photo_00.jpg``, ``photo_01.png``, ... alternating JPEG and PNG, of
    different sizes (from 200x300 upward), alternating between the two photos. Returns ``path``.
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two (427, 640, 3) uint8 arrays
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo = photos[i % 2]
        h, w = 200 + (17 * i) % 200, 300 + (29 * i) % 300
        top, left = (31 * i) % (photo.shape[0] - h + 1), (47 * i) % (photo.shape[1] - w + 1)
        crop = photo[top : top + h, left : left + w]  # (h, w, 3)
        suffix, options = (".jpg", {"quality": 92}) if i % 2 == 0 else (".png", {})
        Image.fromarray(crop).save(path / f"photo_{i:02d}{suffix}", **options)
    return path


def is_heat_map(pixels: np.ndarray) -> bool:
    """An inferno heat map normalised to its peak: a hot (yellow) centre and cold (near-black) surroundings, not a
    blank panel (a panel of zeros renders as one black square under its title)."""
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    hot = ((r > 200) & (g > 180) & (b < 200)).sum()
    cold = ((r < 60) & (g < 60) & (b < 90)).sum()
    return bool(hot > 0 and cold > 0)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A tiny SegFormer trained on the synthetic scenes for a few seconds: real, structured predictions, and its
    checkpoint. One per test process (the INT8, outlier, target-option and Ethos-U tests share it)."""
    import torch

    from segformer_edge import save_checkpoint
    from segformer_edge.model import SegFormer, SegFormerConfig
    from segformer_edge.train import TrainConfig, Trainer

    root = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    init = save_checkpoint(SegFormer(SegFormerConfig(**TINY, num_classes=8)), root / "init.safetensors")
    config = TrainConfig(data="synthetic:96", out=str(root / "run"), crop=(64, 64), scale=(256, 64), batch_size=8,
                         iters=150, lr=3e-3, warmup_iters=10, eval_interval=150, ckpt_interval=150, log_interval=50,
                         workers=0, init=str(init), eval_images=8)  # fmt: skip
    trainer = Trainer(config)
    metrics = trainer.train(progress=False)
    assert metrics["miou"] > 0.3, metrics  # a model that has learned something, not random init
    return trainer.model.eval(), root / "run" / "final.safetensors"


@pytest.fixture(autouse=True)
def outlier_decisions_in_session_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """--outliers records its decisions in $XDG_CACHE_HOME: this session's folder, never the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


@pytest.fixture(scope="module")
def one_torch_thread():  # type: ignore[no-untyped-def]
    """One torch intra-op thread for a module of tiny models (64x64): they gain nothing from more, and on the
    suite's two busy cores the threads' spin-waits cost several times the work. Restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
