"""Issue 17, "Every claim true": each claim the toolchain makes, checked against what it does.

One test (or a few) per numbered point of the issue; point 4 lives in tests/test_int8.py
(test_float_groups_are_honoured_inside_each_artifact) and points 9 and 10 in the tests they strengthen and in
tests/test_cli_options.py. Tiny models at 64x64 throughout.
"""

from __future__ import annotations

import copy
import ctypes
import json
import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, folder_snapshot, run_cli
from segformer_edge.calibration.calibset import CalibrationSet
from segformer_edge.calibration.spec import QuantSpec
from segformer_edge.converters.base import ArtifactError, ExportOptions, read_manifest
from segformer_edge.converters.int8 import calibration_for
from segformer_edge.converters.parity import verify_artifact
from segformer_edge.converters.pipeline import export_artifact
from segformer_edge.converters.reference import checkpoint_digest

from segformer_edge import save_checkpoint
from segformer_edge.data import synthetic_labels
from segformer_edge.errors import DataError
from segformer_edge.model import SegFormer, SegFormerConfig

SIZE = (64, 64)


def _strict_json(text: str) -> object:
    """Parse JSON as any other tool would: NaN and Infinity are not JSON."""

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in JSON output")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny model and the same model with one NaN in a stage-4 weight, as checkpoints."""
    root = tmp_path_factory.mktemp("claims")
    torch.manual_seed(0)
    good = SegFormer(SegFormerConfig(**TINY, num_classes=8)).eval()
    labels = synthetic_labels()  # the synthetic scenes' classes: verify measures mIoU against their labels
    good.meta.class_names, good.meta.palette, good.meta.input_size = labels.classes, labels.palette, SIZE
    broken = copy.deepcopy(good)
    with torch.no_grad():
        broken.encoder.stages[3].blocks[0].attn.q.weight[0, 0] = float("nan")
    return {
        "root": root,
        "good": good,
        "broken": broken,
        "good_ckpt": save_checkpoint(good, root / "good.safetensors"),
        "nan_ckpt": save_checkpoint(broken, root / "nan.safetensors"),
    }


@pytest.fixture(scope="module")
def onnx_pair(models) -> dict[str, Path]:
    """Unverified onnx artifacts of both models (what verify is then asked to judge)."""
    root = models["root"]
    good, _ = export_artifact(models["good"], "onnx", ExportOptions(size=SIZE), root / "pair_good",
                              checkpoint=models["good_ckpt"], verify=False)  # fmt: skip
    nan, _ = export_artifact(models["broken"], "onnx", ExportOptions(size=SIZE), root / "pair_nan",
                             checkpoint=models["nan_ckpt"], verify=False)  # fmt: skip
    return {"good": good.folder, "nan": nan.folder}


# -------------------------------------------------------------------------------------------------
# 1. A failed artifact never replaces a good one; 2. NaN fails parity, named as such (through the CLI)


def test_failed_parity_keeps_the_good_artifact_and_names_nan(models, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["--target", "onnx", "--size", "64", "64", "--out", out]
    code, stdout, err = run_cli(["export", models["good_ckpt"], *args], capsys)
    assert code == 0, err
    good = out / "segformer-custom_onnx_fp32"
    assert read_manifest(good).manifest["parity"]["status"] == "passed"
    before = folder_snapshot(good)

    code, stdout, err = run_cli(["export", models["nan_ckpt"], *args], capsys)
    assert code == 1, (stdout, err)
    assert folder_snapshot(good) == before  # byte-identical: the failed artifact did not land
    failed = out / "segformer-custom_onnx_fp32.failed"
    assert str(failed) in " ".join((stdout + err).split())  # the message says where the failed artifact is
    manifest = read_manifest(failed).manifest  # a complete artifact: its model file matches its manifest
    assert manifest["checkpoint"]["name"] == "nan.safetensors"
    assert manifest["parity"]["status"] == "failed" and manifest["parity"]["passed"] is False
    assert manifest["parity"]["nonfinite"] > 0 and "NaN" in manifest["parity"]["failure"]
    assert (failed / "export.log").is_file() and (failed / "model.onnx").is_file()
    _strict_json((failed / "manifest.json").read_text())  # no NaN or Infinity written into the manifest
    # The table names NaN, never a difference or a 100% agreement computed from NaN logits.
    row = next(line for line in stdout.splitlines() if line.strip("│ ").startswith("onnx"))
    assert "NaN" in row and "FAILED" in row and "100" not in row, stdout
    assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".old"))]

    # The JSON says the same, and is JSON.
    code, stdout, err = run_cli(["export", models["nan_ckpt"], *args, "--json"], capsys)
    assert code == 1
    (row,) = _strict_json(stdout)
    assert row["status"] == "FAILED" and row["artifact"] == str(failed)
    assert row["nonfinite"] > 0 and row["max_abs_diff"] is None and row["pixel_agreement"] == 0.0
    assert "NaN" in row["error"]
    assert folder_snapshot(good) == before


# -------------------------------------------------------------------------------------------------
# 2. NaN or inf in either output fails parity, named as such (verify_artifact and verify)


def test_nan_in_the_artifact_fails_parity_by_name(models, onnx_pair) -> None:
    report = verify_artifact(onnx_pair["nan"], model=models["good"], num_images=2)
    assert report["passed"] is False and report["checks"]["finite"] is False
    assert report["nonfinite"] == report["nonfinite_counts"]["artifact"]["nan"] > 0
    assert report["nonfinite_float"] == 0
    assert report["failure"].startswith("the artifact's output holds") and "NaN values" in report["failure"]
    assert "float model" not in report["failure"]
    # Nothing computed from NaN logits looks like agreement.
    assert report["pixel_agreement"] == 0.0 and report["agreement_miou"] == 0.0
    assert report["max_abs_diff"] is None and report["cosine"] is None and report["psnr_db"] is None
    assert report["data"]["usage"] == "labels" and report["miou_artifact"] == 0.0 and report["miou_float"] > 0
    _strict_json(json.dumps(report))


def test_nan_in_the_float_model_fails_parity_by_name(models, onnx_pair) -> None:
    report = verify_artifact(onnx_pair["good"], model=models["broken"], num_images=2)
    assert report["passed"] is False and report["checks"]["finite"] is False
    assert report["nonfinite"] == 0 and report["nonfinite_float"] > 0
    assert report["failure"].startswith("the float model's output holds") and "checkpoint itself is broken" in report["failure"]
    assert report["pixel_agreement"] == 0.0 and report["max_abs_diff"] is None


def test_verify_cli_names_nan(models, onnx_pair, capsys) -> None:
    args = ["verify", onnx_pair["nan"], "--checkpoint", models["nan_ckpt"], "--num-images", "1"]
    code, stdout, err = run_cli([*args, "--json"], capsys)
    assert code == 1, err
    report = _strict_json(stdout)
    assert report["passed"] is False and "NaN" in report["failure"] and report["nonfinite"] > 0
    code, stdout, _ = run_cli(args, capsys)
    assert code == 1 and "FAILED: the artifact's output holds" in stdout and "NaN values" in stdout
    # The verdict of a good artifact is unchanged: finite outputs pass.
    code, stdout, err = run_cli(["verify", onnx_pair["good"], "--checkpoint", models["good_ckpt"], "--num-images", "1",
                                 "--json"], capsys)  # fmt: skip
    assert code == 0, err
    report = _strict_json(stdout)
    assert report["nonfinite"] == report["nonfinite_float"] == 0 and report["max_abs_diff"] < 1e-3


# -------------------------------------------------------------------------------------------------
# 3. --no-verify says "not verified" everywhere


def test_no_verify_says_not_verified(models, tmp_path: Path, capsys) -> None:
    args = ["export", models["good_ckpt"], "--target", "onnx", "--size", "64", "64", "--no-verify"]
    code, stdout, err = run_cli([*args, "--out", tmp_path / "j", "--json"], capsys)
    assert code == 0, err
    (row,) = _strict_json(stdout)
    assert row["status"] == "not verified" and "pixel_agreement" not in row
    manifest = read_manifest(row["artifact"]).manifest
    assert manifest["parity"] == {"status": "not verified", "passed": None}
    code, stdout, err = run_cli([*args, "--out", tmp_path / "t"], capsys)
    assert code == 0, err
    row = next(line for line in stdout.splitlines() if line.strip("│ ").startswith("onnx"))
    assert "not verified" in row and "passed" not in stdout and "%" not in row


# -------------------------------------------------------------------------------------------------
# 5. Manifest facts read from the artifact


def test_onnx_int8_dynamic_is_dynamic_and_calibrates_on_every_image(models, tmp_path: Path) -> None:
    """--precision int8 --dynamic: symbolic H and W in the saved model, runs at two sizes; minmax ranges
    cover every calibration image (onnxruntime's chunked MinMax once kept only the last N mod 4)."""
    from segformer_edge.converters.onnx import OnnxRunner

    rng = np.random.default_rng(0)
    images = rng.integers(100, 150, (5, *SIZE, 3), dtype=np.uint8)  # four narrow-range images ...
    images[0, :32] = 0  # ... and one that spans the whole range: it must set the input's scale
    images[0, 32:] = 255
    calib = CalibrationSet(images, "test", 0, "minmax", checkpoint_sha256=checkpoint_digest(models["good_ckpt"]))
    model = models["good"]
    artifact, _ = export_artifact(model, "onnx", ExportOptions(size=SIZE, precision="int8", dynamic=True), tmp_path,
                                  checkpoint=models["good_ckpt"], quant=QuantSpec(method="minmax", calibration=calib), verify=False)  # fmt: skip
    manifest = read_manifest(artifact.folder).manifest
    assert manifest["onnx"]["input_shape"][:2] == [1, 3]
    assert all(isinstance(d, str) for d in manifest["onnx"]["input_shape"][2:]), manifest["onnx"]  # symbolic H, W
    assert manifest["input"]["dynamic_hw"] is True and manifest["onnx"]["format"] == "QDQ"
    applied = manifest["quantization"]["applied"]
    assert manifest["quantization"]["method"] == "minmax" and applied["calibrate_method"] == "MinMax"
    assert applied["calibration_images_used"] == 5
    runner = OnnxRunner(read_manifest(artifact.folder))
    spec = artifact.input_spec
    for h, w in [(64, 64), (96, 128)]:
        x = spec.with_(size=(h, w))(rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8))
        out = runner(x)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        assert out.shape == ref.shape == (1, 8, h // 4, w // 4)
        assert (out.argmax(1) == ref.argmax(1)).mean() > 0.8
    # The input's quantization scale comes from the whole set: the full 0..255 image, not only the last one.
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(artifact.file)).graph
    scales = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    (quant_x,) = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x"]
    normalized = spec(images)
    lo, hi = min(float(normalized.min()), 0.0), max(float(normalized.max()), 0.0)
    assert float(scales[quant_x.input[1]]) == pytest.approx((hi - lo) / 255, rel=0.02)


# -------------------------------------------------------------------------------------------------
# 6. The swap restores the old folder on failure


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "model.bin").write_text(text)
    return path


def test_swap_exchanges_atomically(tmp_path: Path) -> None:
    from segformer_edge.io import atomic_path

    _folder(tmp_path / "art", "old")
    with atomic_path(tmp_path / "art", directory=True) as tmp:
        (tmp / "model.bin").write_text("new")
    assert (tmp_path / "art" / "model.bin").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_swap_fallback_restores_the_old_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where there is no atomic exchange: the old folder goes aside, and comes back if the second rename fails."""
    import segformer_edge.io as sio

    monkeypatch.setattr(sio, "_exchange", lambda a, b: False)
    target = _folder(tmp_path / "art", "old")
    real_replace = os.replace

    def failing_replace(src, dst):  # type: ignore[no-untyped-def]
        if Path(src).name.endswith(".tmp") and Path(dst) == target:
            raise OSError(28, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(sio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        with sio.atomic_path(target, directory=True) as tmp:
            (tmp / "model.bin").write_text("new")
    assert (target / "model.bin").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no .tmp, no .art.old

    monkeypatch.setattr(sio.os, "replace", real_replace)
    with sio.atomic_path(target, directory=True) as tmp:
        (tmp / "model.bin").write_text("new")
    assert (target / "model.bin").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_swap_restores_a_stale_old_folder_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed between the fallback's two renames leaves .NAME.old and no NAME: the next swap puts it back
    before anything else, so that it is there even if that swap fails too."""
    import segformer_edge.io as sio

    monkeypatch.setattr(sio, "_exchange", lambda a, b: False)
    _folder(tmp_path / ".art.old", "old")
    target = tmp_path / "art"
    real_replace = os.replace

    def failing_replace(src, dst):  # type: ignore[no-untyped-def]
        if Path(src).name.endswith(".tmp"):
            raise OSError(5, "Input/output error", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(sio.os, "replace", failing_replace)
    with pytest.raises(OSError):
        with sio.atomic_path(target, directory=True) as tmp:
            (tmp / "model.bin").write_text("new")
    assert (target / "model.bin").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]

    _folder(tmp_path / ".other.old", "older")
    monkeypatch.setattr(sio.os, "replace", real_replace)
    with sio.atomic_path(tmp_path / "other", directory=True) as tmp:
        (tmp / "model.bin").write_text("new")
    assert (tmp_path / "other" / "model.bin").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "other"]


# -------------------------------------------------------------------------------------------------
# 7. bench's cold load


def _resident_fraction(path: Path) -> float:
    """The share of a file's pages in the page cache (mincore on a read-only mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        vec = (ctypes.c_ubyte * pages)()
        try:
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) / pages


@pytest.mark.skipif(sys.platform != "linux", reason="mincore and posix_fadvise as on Linux")
def test_bench_loads_cold_and_reports_import_apart(onnx_pair, tmp_path: Path) -> None:
    from segformer_edge.converters.bench import _evict, bench_artifact

    model_file = onnx_pair["good"] / "model.onnx"
    model_file.read_bytes()
    assert _resident_fraction(model_file) == 1.0
    assert _evict(model_file) is True
    assert _resident_fraction(model_file) < 0.05
    # What the worker reads before the timed load leaves the model file out of the page cache ...
    read_manifest(onnx_pair["good"], check_hash=False)
    assert _resident_fraction(model_file) < 0.05
    # ... while hashing it (what the worker once did just before timing the load) pulls all of it in.
    read_manifest(onnx_pair["good"])
    assert _resident_fraction(model_file) == 1.0

    record = bench_artifact(onnx_pair["good"], 1, warmup=0, runs=2)
    assert record["status"] == "ok" and record["cold"] is True
    assert record["import_ms"] > 0 and record["load_ms"] > 0

    tampered = tmp_path / "tampered"
    import shutil

    shutil.copytree(onnx_pair["good"], tampered)
    (tampered / "model.onnx").write_bytes((tampered / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="sha256"):
        bench_artifact(tampered, 1, warmup=0, runs=1)


# -------------------------------------------------------------------------------------------------
# 8. The calibration set's hash covers what defines it; a set for another checkpoint is refused


@pytest.fixture
def calib_folder(models, tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    calib = CalibrationSet(rng.integers(0, 256, (3, *SIZE, 3), dtype=np.uint8), "synthetic:9", 0, "mse", [4, 1, 7],
                           {"sky": 2}, checkpoint_digest(models["good_ckpt"]), rng.integers(0, 8, (3, *SIZE), dtype=np.uint8))  # fmt: skip
    return calib.save(tmp_path / "calib")


def test_calibration_hash_covers_masks_and_recorded_fields(calib_folder: Path) -> None:
    original = CalibrationSet.load(calib_folder)
    masks = np.load(calib_folder / "masks.npy")
    masks[0, 0, 0] = (masks[0, 0, 0] + 1) % 8  # one mask pixel
    np.save(calib_folder / "masks.npy", masks)
    with pytest.raises(DataError, match="do not match the recorded sha256"):
        CalibrationSet.load(calib_folder)
    masks[0, 0, 0] = original.masks[0, 0, 0]
    np.save(calib_folder / "masks.npy", masks)
    assert CalibrationSet.load(calib_folder).sha256 == original.sha256
    info = json.loads((calib_folder / "calibration.json").read_text())
    for field, value in (("checkpoint_sha256", "0" * 64), ("checkpoint_sha256", None), ("seed", 1), ("method", "minmax"),
                         ("indices", [4, 1, 8]), ("data", "synthetic:10")):  # fmt: skip
        (calib_folder / "calibration.json").write_text(json.dumps({**info, field: value}))
        with pytest.raises(DataError, match="do not match the recorded sha256") as caught:
            CalibrationSet.load(calib_folder)
        assert str(calib_folder) in str(caught.value) and "\n" not in str(caught.value)


def test_calibration_set_is_refused_for_another_checkpoint(models, calib_folder: Path, tmp_path: Path) -> None:
    model, ckpt = models["good"], models["good_ckpt"]
    assert calibration_for(model, ckpt, SIZE, calibration=calib_folder).checkpoint_sha256 == checkpoint_digest(ckpt)
    with pytest.raises(DataError, match="made for another checkpoint"):
        calibration_for(model, models["nan_ckpt"], SIZE, calibration=calib_folder)
    anonymous = CalibrationSet.load(calib_folder)
    anonymous.checkpoint_sha256 = None  # a set made without a checkpoint (its hash recomputed: a valid folder)
    anonymous.save(tmp_path / "anonymous")
    with pytest.raises(DataError, match="records no checkpoint"):
        calibration_for(model, ckpt, SIZE, calibration=tmp_path / "anonymous")


# -------------------------------------------------------------------------------------------------
# Found along the way: --json output stays one JSON document while a converter prints from Python


def test_output_capture_takes_python_prints_when_sys_stdout_is_not_fd_1(tmp_path: Path, capsys) -> None:
    """A host that replaced sys.stdout (a notebook, rich's live display, pytest, an in-process caller) once saw
    the converters' Python prints (onnxruntime's calibration lines) in the middle of --json output."""
    from segformer_edge.logs import OutputCapture

    log = tmp_path / "export.log"
    with OutputCapture(log) as capture:
        print("Collecting tensor data and making histogram ...")
        sys.stderr.write("a converter warning\n")
        with capture.paused():
            print("progress line")
    print("after")
    out, err = capsys.readouterr()
    assert out == "progress line\nafter\n" and err == ""
    assert log.read_text().splitlines() == ["Collecting tensor data and making histogram ...", "a converter warning"]
