"""``segformer-edge bench``: records, torch-free benching, and bad artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, run_cli
from segformer_edge.converters.base import ExportOptions, read_manifest
from segformer_edge.converters.pipeline import export_artifact

from segformer_edge import save_checkpoint
from segformer_edge.model import SegFormer, SegFormerConfig

KEYS = ("target", "precision", "threads", "load_ms", "first_ms", "p50_ms", "p90_ms", "p99_ms", "peak_rss_mb", "size_mb")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    model = SegFormer(SegFormerConfig(**TINY, num_classes=8)).eval()
    model.meta.input_size = (64, 64)
    ckpt = save_checkpoint(model, root / "small.safetensors")
    folders = {}
    for target in ("onnx", "tflite", "executorch", "coreml"):
        artifact, _ = export_artifact(model, target, ExportOptions(size=(64, 64)), root / "art", checkpoint=ckpt, verify=False)
        folders[target] = artifact.folder
    return ckpt, folders


def test_bench_json_records_and_speedup(small, tmp_path: Path, capsys) -> None:
    ckpt, folders = small
    out = tmp_path / "bench.json"
    args = ["bench", folders["onnx"], folders["tflite"], folders["executorch"], folders["coreml"], "--runs", "5",
            "--warmup", "1", "--threads", "1,2", "--compare-torch", "--checkpoint", ckpt, "--json", out,
            "--markdown", tmp_path / "bench.md", "--plot", tmp_path / "bench.png"]  # fmt: skip
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    records = json.loads(out.read_text())
    artifacts = [r for r in records if r["target"] != "torch"]
    assert len(artifacts) == 8 and len([r for r in records if r["target"] == "torch"]) == 2
    for r in artifacts:
        if r["target"] == "coreml":
            assert r["status"] == "needs macOS"
            continue
        for key in KEYS:
            assert key in r, key
        assert r["speedup_vs_torch"] > 0 and r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["peak_rss_mb"] > 10 and r["size_mb"] > 0
    assert {r["threads"] for r in artifacts} == {1, 2}
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "| onnx | fp32 | 2 |" in (tmp_path / "bench.md").read_text()


def _blocking_path(tmp_path: Path, module: str) -> Path:
    shim = tmp_path / "shims" / module
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{module}'\", name='{module}')\n")
    return shim.parent


def _cli(args: list[str], blocked: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=f"{blocked}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, "-m", "segformer_edge", *map(str, args)], capture_output=True, text=True, env=env)


def test_bench_tflite_and_onnx_without_torch(small, tmp_path: Path) -> None:
    _, folders = small
    blocked = _blocking_path(tmp_path, "torch")
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(blocked)))  # fmt: skip
    assert probe.returncode != 0, "the shim must make importing torch fail"
    result = _cli(["bench", folders["tflite"], folders["onnx"], "--runs", "3", "--warmup", "0", "--threads", "1",
                   "--json", tmp_path / "b.json"], blocked)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((tmp_path / "b.json").read_text())
    assert [r["target"] for r in records] == ["tflite", "onnx"] and all(r["status"] == "ok" for r in records)


def test_bad_artifacts(small, tmp_path: Path, capsys) -> None:
    _, folders = small
    code, _, err = run_cli(["bench", tmp_path / "missing"], capsys)
    assert code == 2 and "missing: no such artifact" in err
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folders["onnx"], copy)
    data = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(["bench", copy], capsys)
    assert code == 2 and "sha256" in err and "model.onnx" in err
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "model.onnx").write_bytes(data)
    manifest["file"] = "../../etc/passwd"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(["bench", copy], capsys)
    assert code == 2 and "not a plain name inside the artifact folder" in err
    blocked = _blocking_path(tmp_path, "onnxruntime")
    result = _cli(["bench", folders["onnx"], "--runs", "1"], blocked)
    assert result.returncode == 2 and "segformer-edge[runtime]" in result.stderr and "Traceback" not in result.stderr


def test_rounds_pool_runs_and_pair_torch(small, tmp_path: Path, capsys) -> None:
    ckpt, folders = small
    out = tmp_path / "bench.json"
    code, _, err = run_cli(["bench", folders["onnx"], "--runs", "4", "--warmup", "0", "--threads", "1", "--rounds", "2",
                            "--compare-torch", "--checkpoint", ckpt, "--json", out], capsys)  # fmt: skip
    assert code == 0, err
    eager, onnx = json.loads(out.read_text())
    assert eager["target"] == "torch" and onnx["target"] == "onnx"
    for record in (eager, onnx):
        assert record["rounds"] == 2 and record["runs"] == 8 and len(record["times_ms"]) == 8
        assert record["p50_ms"] == pytest.approx(float(np.percentile(record["times_ms"], 50)))
    ratios = onnx["speedup_vs_torch_rounds"]
    assert len(ratios) == 2 and onnx["speedup_vs_torch"] == pytest.approx(float(np.median(ratios)))


def test_peak_rss_is_the_workers_own(small) -> None:
    """A parent that once held a large buffer must not inflate the worker's peak RSS (ru_maxrss survives exec)."""
    from segformer_edge.converters.bench import bench_artifact

    _, folders = small
    ballast = np.ones(1_500_000_000 // 8)  # 1.5 GB, resident: np.ones writes every page
    try:
        record = bench_artifact(folders["onnx"], 1, warmup=0, runs=2)
    finally:
        del ballast
    assert 20 < record["peak_rss_mb"] < 1000, record["peak_rss_mb"]


def test_profile_lists_top_ops(small, tmp_path: Path, capsys) -> None:
    _, folders = small
    out = tmp_path / "p.json"
    before = set(Path.cwd().iterdir())
    code, stdout, err = run_cli(["bench", folders["executorch"], folders["onnx"], "--runs", "3", "--warmup", "0",
                                 "--threads", "1", "--profile", "--json", out], capsys)  # fmt: skip
    assert code == 0, err
    assert set(Path.cwd().iterdir()) == before  # profilers leave no trace files behind
    records = json.loads(out.read_text())
    for record in records:
        ops = [p["op"] for p in record["profile"]]
        assert ops and all(p["ms"] >= 0 for p in record["profile"])
        shares = [p["share"] for p in record["profile"]]
        # Shares of the whole run: the top ops take at most all of it, the first one some of it, in order.
        assert sum(shares) <= 1 + 1e-9 and shares[0] > 0 and shares == sorted(shares, reverse=True), shares
    assert any("Convolution" in op or "GEMM" in op for op in [p["op"] for p in records[0]["profile"]])
    assert "Conv" in [p["op"] for p in records[1]["profile"]]
    assert "top ops: executorch" in stdout


def test_executorch_profile_of_a_large_output(tmp_path: Path, capsys) -> None:
    """ETDump once kept every output tensor in a 1 MiB debug buffer, so profiling b0 at 512 aborted."""
    torch.manual_seed(0)
    model = SegFormer(SegFormerConfig(**TINY, num_classes=8)).eval()
    artifact, _ = export_artifact(model, "executorch", ExportOptions(size=(256, 256)), tmp_path, verify=False)
    # logits are 8 x 64 x 64 fp32 = 128 KiB a run: ten runs are more than such a buffer holds
    code, _, err = run_cli(["bench", str(artifact.folder), "--runs", "10", "--warmup", "0", "--threads", "1", "--profile",
                            "--json", str(tmp_path / "p.json")], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "p.json").read_text())[0]["profile"]


def test_floor_probes_the_gemm_rates_and_places_each_artifact(small, tmp_path: Path, capsys) -> None:
    """bench --floor: fp32 and int8 GEMM rates measured in the run (XNNPACK), and each artifact's p50 over its
    network's MACs (from the manifest, counted from the model) at the rate of its precision."""
    from segformer_edge.profile import model_stats

    _, folders = small
    out = tmp_path / "floor.json"
    code, stdout, err = run_cli(["bench", folders["executorch"], "--runs", "3", "--warmup", "1", "--threads", "1", "--floor",
                                 "--json", out], capsys)  # fmt: skip
    assert code == 0, err
    (record,) = json.loads(out.read_text())
    macs = read_manifest(folders["executorch"]).manifest["network_macs"]
    config = SegFormer(SegFormerConfig(**TINY, num_classes=8)).config  # the graph's MACs: its decoder projected
    assert macs == model_stats(config, (64, 64), projected=True)["macs"] < model_stats(config, (64, 64))["macs"]
    probe = record["floor_gemm"]
    assert probe["precision"] == "fp32" and probe["shape"] == [4096, 1024, 1024] and probe["depth"] == 4 and probe["gmac_per_s"] > 1
    assert record["floor_ms"] == pytest.approx(1000 * macs / 1e9 / probe["gmac_per_s"])
    assert record["x_floor"] == pytest.approx(record["p50_ms"] / record["floor_ms"]) and record["x_floor"] > 1
    assert "x floor" in stdout and f"{record['x_floor']:.2f}x" in stdout
    assert "floor: int8 GEMM" not in stdout and "floor: fp32 GEMM" in stdout  # the rate the artifact is placed at


def test_floor_refuses_an_artifact_without_network_macs(small, tmp_path: Path, capsys) -> None:
    """An artifact exported before --floor existed has no MACs to place: a clear error, not a row without a floor."""
    import shutil

    _, folders = small
    old = tmp_path / "old"
    shutil.copytree(folders["onnx"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["network_macs"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(["bench", old, "--floor", "--runs", "1"], capsys)
    assert code == 2 and f"{old}: its manifest has no network_macs" in " ".join(err.split()), err
