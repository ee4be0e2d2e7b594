"""The OpenVINO target on tiny configurations: export, parity, graph edges, precision hints, INT8 (NNCF), bench."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, run_cli
from segformer_edge.calibration.spec import LAYER_GROUPS, QuantSpec
from segformer_edge.converters import get_target
from segformer_edge.converters.base import ArtifactError, ExportOptions, file_sha256, read_manifest
from segformer_edge.converters.parity import DEFAULT_THRESHOLDS, default_thresholds
from segformer_edge.converters.pipeline import export_artifact

from segformer_edge import save_checkpoint
from segformer_edge.errors import ExportError
from segformer_edge.model import SegFormer, SegFormerConfig

pytest.importorskip("openvino")

from test_int8 import calib  # noqa: E402,F401  (its calibration set; the trained tiny model comes from conftest)

SIZE = (64, 64)


@pytest.fixture(scope="module")
def model() -> SegFormer:
    torch.manual_seed(0)
    model = SegFormer(SegFormerConfig(**TINY, num_classes=8)).eval()
    model.decoder.bn.running_mean.normal_(0, 0.2)
    model.meta.input_size = SIZE
    return model


@pytest.fixture(scope="module")
def fp32(model: SegFormer, tmp_path_factory: pytest.TempPathFactory):
    """The fp32 artifact, exported and verified once for the module."""
    return export_artifact(model, "openvino", ExportOptions(size=SIZE), tmp_path_factory.mktemp("ov"), verify_images=2)


def test_fp32_export_verify_and_manifest(fp32) -> None:
    artifact, report = fp32
    assert report["passed"] and report["max_abs_diff"] <= 1e-3 and report["pixel_agreement"] >= 0.999, report
    # The model file is a folder holding the IR; the sha256 covers both of its files.
    assert artifact.file.name == "model.openvino"
    assert {p.name for p in artifact.file.iterdir()} == {"model.xml", "model.bin"}
    manifest = artifact.manifest
    assert manifest["sha256"] == file_sha256(artifact.file)
    assert read_manifest(artifact.file).folder == artifact.folder  # the model folder opens its artifact
    ov_block = manifest["openvino"]
    assert ov_block["inputs"] == [{"name": "x", "type": "f32", "shape": "[1,3,64,64]"}]
    assert ov_block["outputs"][0]["name"] == "out"
    assert "f32" in ov_block["constants"] and "f16" not in ov_block["constants"]  # save_model's default would be f16
    # The precision hint: asked f32 (the default for every precision), read back from the compiled model.
    assert manifest["target_options"] == {"hint": "f32", "smooth_quant": "off"}
    assert ov_block["inference_precision"] == {"asked": "f32", "used": "f32", "device": "CPU"}
    assert report["executor"] == "openvino CPU (f32)"
    assert manifest["tool_versions"]["openvino"] != "not installed"


def test_a_changed_weights_file_is_caught(fp32, tmp_path: Path) -> None:
    import shutil

    artifact, _ = fp32
    copy = shutil.copytree(artifact.folder, tmp_path / "copy")
    with open(copy / "model.openvino" / "model.bin", "r+b") as fh:  # model.bin, not the .xml the pipeline names
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        read_manifest(copy)


def test_fp16_stores_half_weights(model: SegFormer, fp32, tmp_path: Path) -> None:
    options = ExportOptions(size=SIZE, precision="fp16")
    artifact, report = export_artifact(model, "openvino", options, tmp_path, verify_images=2)
    assert report["passed"] and report["pixel_agreement"] >= 0.995, report
    constants = artifact.manifest["openvino"]["constants"]
    assert constants.get("f16", 0) > constants.get("f32", 0)
    assert artifact.manifest["size_bytes"] < 0.7 * fp32[0].manifest["size_bytes"]
    assert artifact.manifest["openvino"]["inference_precision"]["asked"] == "f32"


def test_uint8_mask_dynamic_at_two_sizes(model: SegFormer, tmp_path: Path) -> None:
    from segformer_edge.converters.graph import EdgeModule

    options = ExportOptions(size=SIZE, input_kind="uint8", output="mask", dynamic=True)
    artifact, report = export_artifact(model, "openvino", options, tmp_path, verify_images=2)
    assert report["passed"] and report["pixel_agreement"] >= 0.999, report
    block = artifact.manifest["openvino"]
    assert block["inputs"][0]["type"] == "u8" and block["inputs"][0]["shape"] == "[1,3,?,?]"
    assert block["outputs"][0]["type"] == "i32"
    runner = get_target("openvino").load(read_manifest(artifact.folder))
    edge = EdgeModule(model, options.graph_spec(model.meta), "mask").eval()
    rng = np.random.default_rng(0)
    for h, w in ((64, 64), (96, 128)):
        x = rng.integers(0, 256, (1, 3, h, w), dtype=np.uint8)
        with torch.no_grad():
            ref = edge(torch.from_numpy(x)).numpy()
        out = runner(x)
        assert out.shape == (1, h, w) and out.dtype == np.int32
        assert (out == ref).mean() >= 0.999


def test_taps_are_every_output_in_graph_order(model: SegFormer, tmp_path: Path) -> None:
    from segformer_edge.converters.debug import float_taps
    from segformer_edge.converters.graph import TAPS

    artifact, _ = export_artifact(model, "openvino", ExportOptions(size=SIZE, taps=True), tmp_path, verify=False)
    assert [o["name"] for o in artifact.manifest["openvino"]["outputs"]] == ["out", *TAPS]
    runner = get_target("openvino").load(artifact)
    images = np.random.default_rng(1).integers(0, 256, (1, *SIZE, 3), dtype=np.uint8)
    x = artifact.input_spec(images)
    outs = runner.run(x)
    refs = float_taps(model, artifact.input_spec, images)
    assert len(outs) == len(refs) == 1 + len(TAPS)
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and np.abs(out - ref).max() <= 1e-3
    assert np.array_equal(runner(x), outs[0])


def test_precision_hints_are_recorded_and_options_checked(model: SegFormer, tmp_path: Path) -> None:
    options = ExportOptions(size=SIZE, target_options={"hint": "bf16"})
    artifact, _ = export_artifact(model, "openvino", options, tmp_path, verify=False)
    assert artifact.folder.name.endswith("_hint-bf16")
    asked_used = artifact.manifest["openvino"]["inference_precision"]
    cpu = artifact.manifest["openvino"]["cpu"]
    # bf16 where the CPU has it (or emulates it on AVX-512), f32 elsewhere: whichever it is, it is read back and said.
    assert asked_used["asked"] == "bf16" and asked_used["used"] in ("bf16", "f32")
    if "avx512_bf16" in cpu["isa"]:
        assert asked_used["used"] == "bf16"
    runner = get_target("openvino").load(artifact)
    assert runner.precision == {"asked": "bf16", "used": asked_used["used"]}
    assert runner.executor.startswith(f"openvino CPU ({asked_used['used']}")
    # An fp32 IR computed in bf16 is held to fp16's parity thresholds; with the f32 hint, to fp32's.
    assert default_thresholds(artifact.manifest) == DEFAULT_THRESHOLDS["fp16"]
    assert default_thresholds({**artifact.manifest, "target_options": {"hint": "f32"}}) == DEFAULT_THRESHOLDS["fp32"]
    for options, message in (
        (ExportOptions(size=SIZE, target_options={"hint": "fp64"}), "hint=fp64: choose one of f32, auto, bf16, f16"),
        (ExportOptions(size=SIZE, target_options={"smooth_quant": "on"}), "smooth_quant=on applies to --precision int8"),
    ):
        with pytest.raises(ExportError, match=message):
            export_artifact(model, "openvino", options, tmp_path, verify=False)
    for method in ("moving_average",):  # NNCF's MEAN_MINMAX is unstable here
        with pytest.raises(ExportError, match=f"--method {method} is not supported"):
            get_target("openvino").plan(ExportOptions(size=SIZE, precision="int8"), QuantSpec(method=method))


def test_int8_parity_on_a_trained_model(trained, calib, tmp_path: Path, capfd, monkeypatch) -> None:  # noqa: F811
    trained_model, ckpt = trained
    ci = os.environ.get("CI")
    monkeypatch.setattr(sys, "stdout", sys.__stdout__)  # write where the CLI writes: the process's own fd 1 and 2
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    options = ExportOptions(size=SIZE, precision="int8")
    artifact, report = export_artifact(trained_model, "openvino", options, tmp_path, checkpoint=ckpt,
                                       quant=QuantSpec(calibration=calib), verify_images=16)  # fmt: skip
    assert report["passed"] and report["pixel_agreement"] >= 0.98 and report["miou_drop_points"] <= 1.0, report
    q = artifact.manifest["quantization"]
    assert q["method"] == "mse" and q["applied"]["nncf"]["range_estimator"].startswith("HISTOGRAM")
    assert q["applied"]["quantizer"].startswith("nncf.quantize") and q["applied"]["calibration_images_used"] == 16
    assert all(q["applied"]["ops_by_group"][g]["quantized"] > 0 for g in LAYER_GROUPS), q["applied"]["ops_by_group"]
    assert artifact.manifest["openvino"]["fake_quantize"] > 0 and "i8" in artifact.manifest["openvino"]["constants"]
    # NNCF's own stdout handler is routed into logging: its records (and its progress bars) are in export.log, and
    # nothing reaches the terminal.
    log = (artifact.folder / "export.log").read_text()
    assert re.search(r"(INFO|WARNING) nncf", log) and "Statistics collection" in log, log[-2000:]
    out, err = capfd.readouterr()
    assert "nncf" not in out + err and "Statistics collection" not in out + err, out + err
    assert os.environ.get("CI") == ci  # the telemetry opt-out does not outlive the export
    # The depthwise convs stay float: quantized, the CPU plugin gave other results on every inference.
    assert q["applied"]["nncf"]["ignored_scope"]["types"] == ["GroupConvolution"]
    # The same results from one inference to the next, and from one compile (and thread count) to the next.
    target = get_target("openvino")
    one, two = target.load(artifact, threads=1), target.load(artifact, threads=2)
    for image in calib.images[:2]:
        x = artifact.input_spec(image)
        first = one(x)
        assert np.array_equal(first, one(x)) and np.array_equal(first, two(x))


def test_bench_compare_torch_and_profile(model: SegFormer, fp32, tmp_path: Path, capsys) -> None:
    artifact, _ = fp32
    ckpt = save_checkpoint(model, tmp_path / "model.safetensors")
    out = tmp_path / "bench.json"
    code, _, err = run_cli(["bench", artifact.folder, "--runs", "3", "--warmup", "1", "--threads", "1", "--compare-torch",
                            "--checkpoint", ckpt, "--profile", "--json", out], capsys)  # fmt: skip
    assert code == 0, err
    eager, record = json.loads(out.read_text())
    assert eager["target"] == "torch" and record["target"] == "openvino" and record["status"] == "ok"
    assert record["executor"] == "openvino CPU (f32)" and record["speedup_vs_torch"] > 0 and record["size_mb"] > 0
    ops = [p["op"] for p in record["profile"]]
    assert ops and any(op.startswith(("Convolution", "FullyConnected", "MatMul")) for op in ops), ops


def test_runner_imports_neither_torch_nor_nncf(fp32) -> None:
    artifact, _ = fp32
    script = f"""
import sys
sys.modules['torch'] = None  # any import of torch (or of nncf, which imports torch) now fails
sys.modules['nncf'] = None
import numpy as np
from segformer_edge.converters import get_target
from segformer_edge.converters.base import read_manifest
artifact = read_manifest({str(artifact.folder)!r})
runner = get_target(artifact.target).load(artifact, threads=1)
print(runner(np.zeros((1, 3, 64, 64), np.float32)).shape, runner.executor)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(1, 8, 16, 16) openvino CPU (f32)" in result.stdout
