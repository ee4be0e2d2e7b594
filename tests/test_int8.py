"""INT8: calibration sets, every target's quantizer on a small trained model, determinism and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, folder_snapshot, run_cli

from segformer_edge import save_checkpoint
from segformer_edge.calibration.calibset import CalibrationSet, select_calibration_set
from segformer_edge.converters.base import ExportOptions
from segformer_edge.converters.pipeline import checkpoint_digest, export_artifact
from segformer_edge.errors import DataError
from segformer_edge.model import SegFormer, SegFormerConfig
from segformer_edge.train import TrainConfig, Trainer

SIZE = (64, 64)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[SegFormer, Path]:
    """A tiny SegFormer trained on the synthetic scenes for a few seconds: real, structured predictions."""
    root = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)
    init = save_checkpoint(SegFormer(SegFormerConfig(**TINY, num_classes=8)), root / "init.safetensors")
    config = TrainConfig(data="synthetic:96", out=str(root / "run"), crop=SIZE, scale=(256, 64), batch_size=8, iters=150,
                         lr=3e-3, warmup_iters=10, eval_interval=150, ckpt_interval=150, log_interval=50, workers=0,
                         init=str(init), eval_images=8)  # fmt: skip
    trainer = Trainer(config)
    metrics = trainer.train(progress=False)
    assert metrics["miou"] > 0.3, metrics  # a model that has learned something, not random init
    return trainer.model.eval(), root / "run" / "final.safetensors"


@pytest.fixture(scope="session")
def calib(trained) -> CalibrationSet:
    model, ckpt = trained
    return select_calibration_set("synthetic:96", 16, SIZE, 8, checkpoint_sha256=checkpoint_digest(ckpt))


@pytest.mark.parametrize("target", ["executorch", "tflite", "coreml", "onnx"])
def test_int8_parity_per_target(trained, calib: CalibrationSet, tmp_path: Path, target: str) -> None:
    model, ckpt = trained
    fp32, _ = export_artifact(model, target, ExportOptions(size=SIZE), tmp_path, checkpoint=ckpt, verify=False)
    artifact, report = export_artifact(model, target, ExportOptions(size=SIZE, precision="int8"), tmp_path,
                                       checkpoint=ckpt, calibration=calib, verify_images=16)  # fmt: skip
    assert report["pixel_agreement"] >= 0.98, report
    assert report["miou_drop_points"] <= 1.0, report
    assert report["passed"]
    q = artifact.manifest["quantization"]
    assert q["calibration_sha256"] == calib.sha256 and q["calibration_images"] == 16 and q["method"] == "mse"
    assert set(q["class_coverage"]) == set(model.meta.class_names)
    assert artifact.manifest["size_bytes"] < fp32.manifest["size_bytes"]
    if target == "tflite":
        # Everything but GELU (XNNPACK has no int8 GELU) runs in the XNNPACK delegate: no float attention
        # matmul left to the reference kernels.
        delegation = artifact.manifest["delegation"]
        assert set(delegation["portable_ops"]) <= {"GELU"}, delegation
        assert delegation["by_op"]["FULLY_CONNECTED"]["portable"] == 0


def test_calibration_covers_classes_and_round_trips(calib: CalibrationSet, tmp_path: Path) -> None:
    assert calib.images.shape == (16, 64, 64, 3) and calib.masks is not None
    assert sum(1 for v in calib.coverage.values() if v > 0) >= 7  # spread across classes, not one scene type
    folder = calib.save(tmp_path / "calib")
    loaded = CalibrationSet.load(folder)
    assert loaded.sha256 == calib.sha256 and loaded.indices == calib.indices and loaded.coverage == calib.coverage


def test_calibration_is_deterministic(trained, calib: CalibrationSet) -> None:
    model, ckpt = trained
    again = select_calibration_set("synthetic:96", 16, SIZE, 8, checkpoint_sha256=checkpoint_digest(ckpt))
    assert again.sha256 == calib.sha256 and again.indices == calib.indices
    from segformer_edge.calibration.sensitivity import quantize_groups

    code = [quantize_groups(model, calib, None).code for _ in range(2)]
    scales = [sorted(float(x) for x in __import__("re").findall(r"quantize_per_tensor\.default\([^,]+, ([0-9.e-]+)", c)) for c in code]
    assert scales[0] and scales[0] == scales[1]
    assert code[0] == code[1]


def test_sensitivity_and_budget(trained, calib: CalibrationSet, tmp_path: Path) -> None:
    from segformer_edge.calibration.sensitivity import LAYER_GROUPS, analyse, budget_policy, write_report

    model, _ = trained
    report = analyse(model, calib)
    assert sorted(report.ranked()) == sorted(LAYER_GROUPS)
    drops = [r["miou_drop_points"] for r in report.rows]
    assert drops == sorted(drops, reverse=True)
    write_report(report, tmp_path)
    assert (tmp_path / "sensitivity.png").stat().st_size > 1000 and "stage1" in (tmp_path / "sensitivity.md").read_text()
    # A negative budget can never be met by quantizing: every group ends in float, most sensitive first.
    strict = budget_policy(model, calib, -100.0, report)
    assert strict["float_groups"][: len(strict["float_groups"])] == report.ranked()[: len(strict["float_groups"])]
    assert len(strict["steps"]) >= 2
    loose = budget_policy(model, calib, 100.0, report)
    assert loose["float_groups"] == []


def test_budget_keeps_groups_float_in_the_artifact(trained, calib: CalibrationSet, tmp_path: Path) -> None:
    model, ckpt = trained
    options = ExportOptions(size=SIZE, precision="int8")
    options.extra["float_modules"] = ["model.encoder.stages.0"]
    artifact, report = export_artifact(model, "executorch", options, tmp_path, checkpoint=ckpt, calibration=calib)
    assert artifact.manifest["quantization"]["float_modules"] == ["model.encoder.stages.0"]
    assert report["passed"]


def test_int8_errors(trained, calib: CalibrationSet, tmp_path: Path, capsys) -> None:
    model, ckpt = trained
    with pytest.raises(DataError, match="zero calibration images"):
        select_calibration_set("synthetic:96", 0, SIZE, 8)
    with pytest.raises(DataError, match=r"\(N, H, W, 3\) uint8"):
        CalibrationSet(np.zeros((2, 64, 64, 4), np.uint8), "x", 0)
    with pytest.raises(DataError, match="calibration images are 64x64 but the export is 96x96"):
        calib.check_for(calib.checkpoint_sha256, (96, 96), "calib")
    folder = calib.save(tmp_path / "calib")
    other = save_checkpoint(SegFormer(SegFormerConfig(**TINY, num_classes=8)), tmp_path / "other.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    before = folder_snapshot(out)
    code, _, err = run_cli(["export", other, "--precision", "int8", "--calibration", folder, "--target", "onnx",
                            "--size", "64", "64", "--out", out], capsys)  # fmt: skip
    assert code == 2 and "made for another checkpoint" in err and folder_snapshot(out) == before
    code, _, err = run_cli(["export", ckpt, "--precision", "int8", "--calibration", folder, "--target", "onnx",
                            "--size", "96", "96", "--out", out], capsys)  # fmt: skip
    assert code == 2 and "calibration images are 64x64" in err and folder_snapshot(out) == before
    code, _, err = run_cli(["calibrate", ckpt, "--num-images", "0", "--out", tmp_path / "c0"], capsys)
    assert code == 2 and "--num-images" in " ".join(err.split()) and not (tmp_path / "c0").exists()
