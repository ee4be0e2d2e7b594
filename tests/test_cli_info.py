"""``segformer-edge info`` and the CLI's contract: fast help, clean errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli


def test_info_b0_matches_the_paper(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["info", "b0", "--num-classes", "150", "--size", "512", "512", "--json"], capsys)
    assert code == 0
    stats = json.loads(out)
    assert abs(stats["params"] - 3.75e6) / 3.75e6 <= 0.02
    assert abs(stats["macs"] - 8.4e9) / 8.4e9 <= 0.05
    assert stats["params"] == stats["params_encoder"] + stats["params_decoder"]
    assert [s["shape"] for s in stats["stages"]] == [[1, 32, 128, 128], [1, 64, 64, 64], [1, 160, 32, 32], [1, 256, 16, 16]]
    assert stats["output_shape"] == [1, 150, 128, 128]


def test_info_b5_params(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["info", "b5", "--json"], capsys)
    assert code == 0
    assert abs(json.loads(out)["params"] - 84.7e6) / 84.7e6 <= 0.01


def test_info_table_and_checkpoint(tmp_path: Path, tiny_config, capsys: pytest.CaptureFixture[str]) -> None:
    from segformer_edge import save_checkpoint
    from segformer_edge.model import SegFormer

    code, out, _ = run_cli(["info", "b1", "--size", "256", "320"], capsys)
    assert code == 0 and "SegFormer-B1" in out and "(1, 512, 8, 10)" in out
    save_checkpoint(SegFormer(tiny_config), tmp_path / "tiny.safetensors")
    code, out, _ = run_cli(["info", tmp_path / "tiny.safetensors", "--size", "64", "64", "--json"], capsys)
    assert code == 0 and json.loads(out)["num_classes"] == 5


def test_help_imports_no_torch() -> None:
    script = (
        "import sys\n"
        "from segformer_edge.cli.app import main\n"
        "for argv in (['--help'], ['info', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, exc.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("NO-TORCH")
    assert "MACs" in result.stdout  # the info help says what is counted


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("corrupt.pth", b"\x80\x02garbage" * 50, "corrupt"),
        ("truncated.pth", None, "corrupt or truncated"),
        ("foreign.pth", "foreign", "not a SegFormer checkpoint"),
        ("corrupt.safetensors", b"{}" * 40, "not a readable safetensors"),
    ],
)
def test_bad_checkpoint_is_one_line_exit_2(
    tmp_path: Path, name: str, content: bytes | str | None, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / name
    if content is None:
        torch.save({"w": torch.zeros(4096)}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif content == "foreign":
        torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, path)
    else:
        path.write_bytes(content)
    code, out, err = run_cli(["info", path], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and name in lines[0] and message in lines[0]
    assert "Traceback" not in err + out


def test_cli_subprocess_error_has_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"nope")
    result = subprocess.run(
        [sys.executable, "-m", "segformer_edge", "info", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: ") and "bad.pth" in result.stderr
    debug = subprocess.run(
        [sys.executable, "-m", "segformer_edge", "--debug", "info", str(bad)], capture_output=True, text=True
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr
