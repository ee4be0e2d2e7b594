"""``bench`` and ``verify`` with ``--device ssh://``: a real OpenSSH server on 127.0.0.1 and a torch-free "board".

The fixture starts Debian's sshd with its own host key, port and authorized key in a temporary folder (stopped at
the end); the client reads only the fixture's ssh_config (SEGFORMER_EDGE_SSH_COMMAND="ssh -F ..."). The board's
Python is this interpreter behind a wrapper whose PYTHONPATH makes ``import torch`` fail (the shim the bench tests
use), and whose cache is the fixture's own folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli
from segformer_edge.converters.base import ExportOptions, read_manifest
from segformer_edge.converters.parity import verify_artifact
from segformer_edge.converters.pipeline import export_artifact
from segformer_edge.converters.remote import RemoteRunner, SshDevice, _call, _tar_of, bench_over_ssh
from sshd import SSHD, free_port, loopback_sshd, wrapper

from segformer_edge import save_checkpoint
from segformer_edge.errors import DeviceError
from segformer_edge.model import SegFormer, SegFormerConfig

pytestmark = pytest.mark.skipif(SSHD is None or shutil.which("ssh") is None,
                                reason="needs OpenSSH's sshd and ssh (apt-get install openssh-server openssh-client)")  # fmt: skip
REPO = Path(__file__).resolve().parents[1]


class Board:
    """The loopback board: the sshd's port (host ``board`` in its ssh_config) and the board's Pythons."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.cache = root / "cache"
        shims = root / "shims" / "torch"
        shims.mkdir(parents=True)
        (shims / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
        inherited = os.environ.get("PYTHONPATH", "")  # the checkout under test, wherever this process found it
        tail = f"{REPO}{':' + inherited if inherited else ''} SEGFORMER_EDGE_CACHE={self.cache}"
        self.env = f"export PYTHONPATH={shims.parent}:{tail}"
        self.env_with_torch = f"export PYTHONPATH={tail}"  # this interpreter as it is: torch imports
        self.python = wrapper(root / "python", f'{self.env}\nexec {sys.executable} "$@"')

    def device(self, python: str | None = None, **kwargs: object) -> SshDevice:
        return SshDevice.parse(f"ssh://board:{self.port}", python=python or self.python, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Board]:
    root = tmp_path_factory.mktemp("board")
    with loopback_sshd(root / "sshd") as port:
        yield Board(root, port)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("remote_art")
    torch.manual_seed(0)
    model = SegFormer(SegFormerConfig(**TINY, num_classes=8)).eval()
    model.meta.input_size = (64, 64)
    ckpt = save_checkpoint(model, root / "small.safetensors")
    folders = {}
    for target in ("tflite", "onnx"):
        artifact, _ = export_artifact(
            model, target, ExportOptions(size=(64, 64)), root / "art", checkpoint=ckpt, verify=False
        )
        folders[target] = artifact.folder
    return ckpt, folders


def test_the_board_cannot_import_torch(board: Board) -> None:
    result = subprocess.run([board.python, "-c", "import torch"], check=False, capture_output=True, text=True)
    assert result.returncode != 0 and "No module named 'torch'" in result.stderr


def test_bench_over_ssh_copies_once_and_brings_back_records_with_the_board_facts(
    board: Board, artifacts, tmp_path: Path, capsys
) -> None:
    _, folders = artifacts
    shutil.rmtree(board.cache, ignore_errors=True)
    device = board.device()
    records, first = bench_over_ssh(device, [folders["tflite"], folders["onnx"]], [1], warmup=1, runs=3)
    assert sorted(first.copied) == sorted(
        [read_manifest(folders["tflite"]).file.name, read_manifest(folders["onnx"]).file.name]
    )
    for sha in (read_manifest(f).manifest["sha256"] for f in folders.values()):
        assert (board.cache / "artifacts" / sha).is_dir()
    assert not list((board.cache / "artifacts").glob(".incoming-*"))
    assert {r["target"] for r in records} == {"tflite", "onnx"}
    for r in records:
        assert r["status"] == "ok" and r["device"] == f"ssh://board:{board.port}"
        assert r["artifact"] in {str(f) for f in folders.values()}  # the host's path, not the board's cache
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["runs"] == 3 and r["peak_rss_mb"] > 10
        facts = r["board"]
        assert facts["cpus"] == os.cpu_count() and facts["machine"] and facts["memory_mb"] > 0 and facts["os"]
        assert facts["versions"]["numpy"] and facts["versions"]["ai-edge-litert"] and facts["versions"]["onnxruntime"]
    # The second run finds both in the board's cache (re-hashed there) and copies nothing.
    _, second = bench_over_ssh(device, [folders["tflite"], folders["onnx"]], [1], warmup=0, runs=1)
    assert second.copied == []
    # The CLI: the same table and JSON as a local bench, and the board named.
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(["bench", folders["tflite"], "--device", f"ssh://board:{board.port}", "--device-python", board.python,
                                 "--runs", "2", "--warmup", "0", "--threads", "1", "--json", out, "--markdown", tmp_path / "b.md"], capsys)  # fmt: skip
    assert code == 0, err
    assert "| tflite | fp32 | 1 |" in stdout and "board:" in stdout
    (record,) = json.loads(out.read_text())
    assert (
        record["board"]["hostname"] == __import__("platform").node() and record["device"] == f"ssh://board:{board.port}"
    )


def test_verify_over_ssh_gives_the_local_figures(board: Board, artifacts, capsys) -> None:
    ckpt, folders = artifacts
    keys = (
        "max_abs_diff",
        "cosine",
        "psnr_db",
        "pixel_agreement",
        "agreement_miou",
        "per_class_iou",
        "images",
        "passed",
    )
    for target in ("tflite", "onnx"):
        local = verify_artifact(folders[target], checkpoint=ckpt, data="synthetic:3", num_images=3)
        with RemoteRunner(board.device(), folders[target]) as runner:
            remote = verify_artifact(folders[target], checkpoint=ckpt, data="synthetic:3", num_images=3, runner=runner)
        assert runner.facts["cpus"] == os.cpu_count()
        assert f"on ssh://board:{board.port}" in remote["executor"]
        for key in keys:
            assert remote.get(key) == local.get(key), key  # the same runtime on the same inputs: equal to the bit
    code, stdout, err = run_cli(["verify", folders["tflite"], "--checkpoint", ckpt, "--data", "synthetic:2", "--num-images", "2",
                                 "--device", f"ssh://board:{board.port}", "--device-python", board.python], capsys)  # fmt: skip
    assert code == 0, err
    assert f"on ssh://board:{board.port}" in stdout and "passed" in stdout


def test_compare_torch_pairs_with_eager_on_the_board_or_is_refused(
    board: Board, artifacts, tmp_path: Path, capsys
) -> None:
    ckpt, folders = artifacts
    code, _, err = run_cli(["bench", folders["tflite"], "--compare-torch", "--device", f"ssh://board:{board.port}",
                            "--device-python", board.python, "--runs", "1", "--warmup", "0"], capsys)  # fmt: skip
    assert code == 2
    assert "Traceback" not in err and "--compare-torch needs torch on the board" in err.strip().splitlines()[-1]
    # A board whose Python has torch: eager runs there, on the checkpoint copied into its cache.
    with_torch = wrapper(tmp_path / "python-torch", f'{board.env_with_torch}\nexec {sys.executable} "$@"')
    records, copied = bench_over_ssh(board.device(with_torch), [folders["tflite"]], [1], warmup=0, runs=2, compare_torch=True,
                                     checkpoint=ckpt, size=(64, 64))  # fmt: skip
    assert ckpt.name in copied.copied
    eager = next(r for r in records if r["target"] == "torch")
    assert (
        eager["status"] == "ok"
        and eager["board"]["versions"]["torch"]
        and eager["device"] == f"ssh://board:{board.port}"
    )
    assert next(r for r in records if r["target"] == "tflite")["speedup_vs_torch"] > 0


def test_a_board_without_the_runtime_or_the_package_says_what_to_install(
    board: Board, artifacts, tmp_path: Path
) -> None:
    _, folders = artifacts
    shim = tmp_path / "noort" / "onnxruntime"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'onnxruntime'\", name='onnxruntime')\n"
    )
    no_ort = wrapper(
        tmp_path / "python-no-ort",
        f'{board.env}\nexport PYTHONPATH={shim.parent}:$PYTHONPATH\nexec {sys.executable} "$@"',
    )
    with pytest.raises(
        DeviceError,
        match=r"onnx artifacts need onnxruntime, which is not installed .* pip install 'segformer-edge\[runtime\]' there",
    ):
        bench_over_ssh(board.device(no_ort), [folders["onnx"]], [1], warmup=0, runs=1)
    bare = wrapper(
        tmp_path / "python-bare", f'exec {sys.executable} -S "$@"'
    )  # no site-packages, no checkout: no segformer-edge
    with pytest.raises(
        DeviceError,
        match=r"segformer-edge is not installed for .* on the board; pip install 'segformer-edge\[runtime\]' there",
    ):
        bench_over_ssh(board.device(bare), [folders["onnx"]], [1], warmup=0, runs=1)
    old = tmp_path / "old" / "segformer_edge" / "converters"  # an install from before the remote worker
    old.mkdir(parents=True)
    (old.parent / "__init__.py").write_text("")
    (old / "__init__.py").write_text("")
    older = wrapper(tmp_path / "python-old", f'export PYTHONPATH={old.parent.parent}\nexec {sys.executable} -S "$@"')
    with pytest.raises(
        DeviceError,
        match=r"has no remote worker \(older than this one\); pip install -U 'segformer-edge\[runtime\]' there",
    ):
        bench_over_ssh(board.device(older), [folders["onnx"]], [1], warmup=0, runs=1)
    with pytest.raises(DeviceError, match=r"no /nonexistent/python3 on the board"):
        bench_over_ssh(board.device("/nonexistent/python3"), [folders["onnx"]], [1], warmup=0, runs=1)


def test_a_full_board_disk_leaves_nothing_in_the_cache(board: Board, artifacts, tmp_path: Path) -> None:
    _, folders = artifacts
    cache = tmp_path / "small-disk"
    # The kernel refuses the write past 64 KiB (RLIMIT_FSIZE: EFBIG; a full disk is ENOSPC): the same failed write.
    small = wrapper(
        tmp_path / "python-small",
        f'{board.env} SEGFORMER_EDGE_CACHE={cache}\nulimit -f 128\nexec {sys.executable} "$@"',
    )
    with pytest.raises(DeviceError, match=r"no room for .*\.tflite .* on the board \(File too large\)"):
        bench_over_ssh(board.device(small), [folders["tflite"]], [1], warmup=0, runs=1)
    assert list((cache / "artifacts").iterdir()) == []  # no entry, no .incoming folder


def test_a_connection_dropped_mid_copy_leaves_nothing_a_later_run_trusts(
    board: Board, artifacts, tmp_path: Path
) -> None:
    _, folders = artifacts
    artifact = read_manifest(folders["tflite"])
    sha = artifact.manifest["sha256"]
    cache = tmp_path / "drop-cache"
    # The board's shell passes the first 16 KiB on, then kills its sshd session: the connection drops mid-copy.
    drop = wrapper(tmp_path / "python-drop", f"{board.env} SEGFORMER_EDGE_CACHE={cache}\n"
                    f'{{ head -c 16384; kill -9 $PPID; }} | {sys.executable} "$@"')  # fmt: skip
    request = {"kind": "receive", "sha256": sha, "file": artifact.file.name, "bytes": artifact.file.stat().st_size}
    with pytest.raises(DeviceError, match=r"(connection dropped|copy broke off|ended before)"):
        _call(board.device(drop), request, payload=_tar_of(artifact.file))
    deadline = time.monotonic() + 10
    while list((cache / "artifacts").glob(".incoming-*")) and time.monotonic() < deadline:
        time.sleep(0.1)  # the orphaned worker unwinds after the session is gone
    assert not (cache / "artifacts" / sha).exists() and not list((cache / "artifacts").glob(".incoming-*"))
    # The next run copies it whole.
    fine = wrapper(tmp_path / "python-fine", f'{board.env} SEGFORMER_EDGE_CACHE={cache}\nexec {sys.executable} "$@"')
    _, copied = bench_over_ssh(board.device(fine), [folders["tflite"]], [1], warmup=0, runs=1)
    assert copied.copied == [artifact.file.name] and (cache / "artifacts" / sha / artifact.file.name).is_file()


def test_unreachable_boards_and_a_silent_worker_give_one_line(board: Board, artifacts, tmp_path: Path) -> None:
    _, folders = artifacts
    closed = free_port()  # nothing listens there
    with pytest.raises(DeviceError, match=f"connection refused: no ssh server answers on 127.0.0.1:{closed}"):
        bench_over_ssh(SshDevice.parse(f"ssh://127.0.0.1:{closed}"), [folders["tflite"]], [1])
    silent = socket.socket()  # accepts, never speaks SSH: the banner exchange times out
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    try:
        with pytest.raises(DeviceError, match=r"timed out connecting \(ConnectTimeout 1 s\)"):
            bench_over_ssh(
                SshDevice.parse(f"ssh://127.0.0.1:{silent.getsockname()[1]}", connect_timeout=1),
                [folders["tflite"]],
                [1],
            )
    finally:
        for s in [*accepted, silent]:
            s.close()
    stuck = wrapper(tmp_path / "python-stuck", "sleep 60")
    start = time.monotonic()
    with pytest.raises(DeviceError, match=r"no answer from the board within 2 s \(--device-timeout\)"):
        bench_over_ssh(board.device(stuck, timeout=2.0), [folders["tflite"]], [1])
    assert time.monotonic() - start < 20
    with pytest.raises(DeviceError, match="not an ssh device"):
        SshDevice.parse("ssh:/board")
