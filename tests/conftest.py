"""Shared fixtures: tiny configurations keep the suite fast."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("PYTHONHASHSEED", "0")

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


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: to assert that a failed command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


sys.path.insert(0, str(Path(__file__).parent))
