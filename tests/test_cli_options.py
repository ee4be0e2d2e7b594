"""A successful CLI run of every option the audit of issue 17 (point 10) found untested, on a tiny model at 64x64.

Each test checks that the option did what it says, in the files it wrote (manifests, masks, reports) or
against the library call it stands for. ONNX is the target wherever the option is not another target's.
int8 exports run with --no-verify: a random-init model has no margins for int8 parity (tests/test_int8.py
checks int8 parity on a trained model); what is checked here is the option itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, flat, is_heat_map, make_photo_folder, run_cli
from PIL import Image
from segformer_edge.calibration.spec import LAYER_GROUPS
from segformer_edge.converters.base import ExportOptions, read_manifest
from segformer_edge.converters.pipeline import export_artifact
from segformer_edge.converters.reference import checkpoint_digest

from segformer_edge import save_checkpoint
from segformer_edge.data import open_source, synthetic_labels
from segformer_edge.model import SegFormer, SegFormerConfig

SIZE = ["--size", "64", "64"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny model of the synthetic scenes' label space (so int8 may calibrate on them), as a checkpoint."""
    root = tmp_path_factory.mktemp("options")
    torch.manual_seed(0)
    model = SegFormer(SegFormerConfig(**TINY, num_classes=8)).eval()
    labels = synthetic_labels()
    model.meta.class_names, model.meta.palette, model.meta.input_size = labels.classes, labels.palette, (64, 64)
    model.decoder.bn.running_mean.normal_(0, 0.2)
    image = root / "scene.png"
    Image.fromarray(open_source("synthetic:10", "val").load(0)[0]).resize((90, 70)).save(image)
    return {"root": root, "model": model, "ckpt": save_checkpoint(model, root / "tiny.safetensors"), "image": image}


@pytest.fixture(scope="module")
def onnx_fp32(tiny) -> Path:
    artifact, _ = export_artifact(tiny["model"], "onnx", ExportOptions(size=(64, 64)), tiny["root"] / "exports",
                                  checkpoint=tiny["ckpt"], verify=False)  # fmt: skip
    return artifact.folder


# -------------------------------------------------------------------------------------------------
# calibrate, and export --calibration DIR


def test_calibrate_then_export_with_that_set(tiny, tmp_path: Path, capsys) -> None:
    calib = tmp_path / "calib"
    code, stdout, err = run_cli(["calibrate", tiny["ckpt"], "--data", "synthetic:24", "--num-images", "4", "--method",
                                 "minmax", *SIZE, "--out", calib], capsys)  # fmt: skip
    assert code == 0, err
    info = json.loads((calib / "calibration.json").read_text())
    assert info["data"] == "synthetic:24" and info["images"] == 4 and info["method"] == "minmax"
    assert info["checkpoint_sha256"] == checkpoint_digest(tiny["ckpt"]) and info["size"] == [64, 64]
    assert np.load(calib / "images.npy").shape == (4, 64, 64, 3) and np.load(calib / "masks.npy").shape == (4, 64, 64)
    assert info["sha256"][:16] in stdout and "4 images (64x64) of synthetic:24" in " ".join(stdout.split())

    code, stdout, err = run_cli(["export", tiny["ckpt"], "--target", "onnx", "--precision", "int8", "--calibration", calib,
                                 *SIZE, "--out", tmp_path / "out", "--no-verify", "--json"], capsys)  # fmt: skip
    assert code == 0, err
    (row,) = json.loads(stdout)
    quant = read_manifest(row["artifact"]).manifest["quantization"]
    assert quant["calibration"]["sha256"] == info["sha256"] and quant["calibration"]["images"] == 4
    # --method auto takes the method the set was made for; four images are all used (a multiple of 4: the
    # chunked onnxruntime MinMax calibration once failed here with "No data is collected").
    assert quant["method"] == "minmax" and quant["applied"]["calibrate_method"] == "MinMax"
    assert quant["applied"]["calibration_images_used"] == 4


def test_calibrate_sensitivity_with_the_executorch_quantizer(tiny, tmp_path: Path, capsys) -> None:
    """--sensitivity --granularity layer --groups: each decoder Linear/Conv2d kept float alone, measured with
    executorch's quantizer, ranked by the mIoU it gives back."""
    from segformer_edge.calibration.sensitivity import quantizable_layers

    from segformer_edge.weights import load_pretrained

    out = tmp_path / "calib"
    code, stdout, err = run_cli(["calibrate", tiny["ckpt"], "--data", "synthetic:24", "--num-images", "4", *SIZE,
                                 "--sensitivity", "--granularity", "layer", "--groups", "decoder.mlp,decoder.head",
                                 "--target", "executorch", "--out", out], capsys)  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "sensitivity.json").read_text())
    assert report["target"] == "executorch" and report["method"] == "mse" and report["held_out"] == 1
    assert report["granularity"] == "layer"
    layers = [n for n in quantizable_layers(load_pretrained(tiny["ckpt"])) if n.startswith("decoder.")]
    assert sorted(r["unit"] for r in report["units"]) == sorted(layers) and len(layers) == 6
    recovered = [r["miou_recovered_points"] for r in report["units"]]
    assert recovered == sorted(recovered, reverse=True)
    for r in report["units"]:  # recovered = (drop with every layer int8) - (drop with this one float)
        assert abs(r["miou_recovered_points"] - (report["all_int8"]["miou_drop_points"] - r["miou_drop_points"])) < 1e-9
    assert "executorch quantizer" in (out / "sensitivity.md").read_text() and "mIoU recovered" in stdout
    assert (out / "sensitivity.png").stat().st_size > 1000 and (out / "calibration.json").is_file()
    for args, message in ((["--granularity", "layer"], "--granularity applies to --sensitivity"),
                          (["--sensitivity", "--groups", "stage9", "--granularity", "layer"], "stage9: choose from stage1"),
                          (["--sensitivity", "--groups", "stage1"], "--groups applies to --granularity layer")):  # fmt: skip
        code, _, err = run_cli(["calibrate", tiny["ckpt"], *args, "--out", tmp_path / "c2"], capsys)
        assert code == 2 and message in flat(err) and not (tmp_path / "c2").exists(), err


# -------------------------------------------------------------------------------------------------
# export: graph edges and target options


def test_export_mask_nhwc_dynamic_onnx(tiny, tmp_path: Path, capsys) -> None:
    from segformer_edge.converters.onnx import OnnxRunner
    from segformer_edge.converters.reference import upsampled_argmax

    from segformer_edge.inputs import InputSpec

    code, stdout, err = run_cli(["export", tiny["ckpt"], "--target", "onnx", "--output", "mask", "--layout", "nhwc",
                                 "--dynamic", *SIZE, "--verify-images", "2", "--out", tmp_path, "--json"], capsys)  # fmt: skip
    assert code == 0, err
    (row,) = json.loads(stdout)
    assert row["status"] == "passed" and row["pixel_agreement"] >= 0.999
    folder = Path(row["artifact"])
    assert folder.name == "segformer-custom_onnx_fp32_mask_nhwc_dynamic"
    manifest = read_manifest(folder).manifest
    assert manifest["input"]["layout"] == "nhwc" and manifest["output"]["kind"] == "mask"
    assert manifest["onnx"]["input_shape"][0] == 1 and manifest["onnx"]["input_shape"][3] == 3
    assert all(isinstance(d, str) for d in manifest["onnx"]["input_shape"][1:3])  # symbolic H and W
    assert manifest["onnx"]["io"]["outputs"] == ["int32"]
    runner, model = OnnxRunner(read_manifest(folder)), tiny["model"]
    spec = InputSpec.from_manifest(manifest["input"])
    rng = np.random.default_rng(0)
    for h, w in [(64, 64), (80, 112)]:
        images = rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)
        x = spec.with_(size=(h, w))(images)
        assert x.shape == (1, h, w, 3)
        mask = runner(x)
        with torch.no_grad():
            logits = model(torch.from_numpy(InputSpec.for_model(model.meta, (h, w))(images))).numpy()
        assert mask.shape == (1, h, w) and (mask == upsampled_argmax(logits, (h, w))).mean() > 0.99


def test_export_image_input_coreml(tiny, tmp_path: Path, capsys) -> None:
    code, stdout, err = run_cli(["export", tiny["ckpt"], "--target", "coreml", "--image-input", *SIZE, "--verify-images",
                                 "1", "--out", tmp_path, "--json"], capsys)  # fmt: skip
    assert code == 0, err
    (row,) = json.loads(stdout)
    assert row["status"] == "passed" and row["pixel_agreement"] >= 0.999, row
    manifest = read_manifest(row["artifact"]).manifest
    assert Path(row["artifact"]).name.endswith("_image")
    assert manifest["coreml"]["image_input"] is True and manifest["input"]["image"] is True
    assert manifest["input"]["kind"] == "uint8" and manifest["input"]["normalization"]["fused"] is True


# -------------------------------------------------------------------------------------------------
# export: int8 options


def test_export_int8_method_budget_calibration_images(tiny, tmp_path: Path, capsys) -> None:
    """--method percentile, --budget and --calibration-images in one onnx int8 export: the calibrator that ran,
    the images it used and the budget's search are in the manifest. 8 images hold 2 out for the search, which
    runs them through the batch-1 ONNX artifact one at a time (a batch of 2 once failed there)."""
    code, stdout, err = run_cli(["export", tiny["ckpt"], "--target", "onnx", "--precision", "int8", "--method",
                                 "percentile", "--calibration-images", "8", "--budget", "100", *SIZE, "--no-verify",
                                 "--out", tmp_path, "--json"], capsys)  # fmt: skip
    assert code == 0, err
    (row,) = json.loads(stdout)
    assert row["status"] == "not verified" and row["float_groups"] == []
    quant = read_manifest(row["artifact"]).manifest["quantization"]
    assert quant["method"] == "percentile" and quant["applied"]["calibrate_method"] == "Percentile"
    assert quant["calibration"]["images"] == 8 and quant["calibration"]["data"] == "synthetic"
    assert quant["applied"]["calibration_images_used"] == 8
    policy = quant["policy"]
    assert policy["budget_points"] == 100 and policy["float_groups"] == [] == quant["float_groups"]
    assert sorted(r["unit"] for r in policy["sensitivity"]) == sorted(LAYER_GROUPS)
    assert policy["steps"][0]["float_groups"] == [] and "onnx quantizer (percentile)" in policy["measured_with"]
    assert policy["granularity"] == "layer"  # the default; nothing to split when no group stays float
    assert all(quant["applied"]["ops_by_group"][g]["quantized"] > 0 for g in LAYER_GROUPS)
    code, _, err = run_cli(["export", tiny["ckpt"], "--target", "onnx", "--budget-granularity", "group", "--out", tmp_path / "e2"], capsys)
    assert code == 2 and "--budget-granularity applies to --budget" in flat(err) and not (tmp_path / "e2").exists()


# -------------------------------------------------------------------------------------------------
# verify --data, --min-pixel-agreement, --max-miou-drop


def test_verify_data_and_thresholds(tiny, onnx_fp32: Path, capsys) -> None:
    base = ["verify", onnx_fp32, "--checkpoint", tiny["ckpt"], "--num-images", "2", "--json"]
    code, stdout, err = run_cli([*base, "--data", "synthetic:40", "--min-pixel-agreement", "0.5", "--max-miou-drop", "50"],
                                capsys)  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    assert report["data"]["spec"] == "synthetic:40" and report["images"] == 2 and report["data"]["usage"] == "labels"
    assert report["thresholds"] == {"max_abs_diff": 1e-3, "pixel_agreement": 0.5, "miou_drop": 50}
    assert report["passed"] and set(report["checks"]) == {"finite", "max_abs_diff", "pixel_agreement", "miou_drop"}

    code, stdout, _ = run_cli([*base, "--min-pixel-agreement", "1.01"], capsys)
    report = json.loads(stdout)
    assert code == 1 and report["checks"]["pixel_agreement"] is False and report["failure"].startswith("pixel_agreement 1")
    code, stdout, _ = run_cli([*base, "--max-miou-drop", "-1"], capsys)
    report = json.loads(stdout)
    assert code == 1 and report["checks"] == {"finite": True, "max_abs_diff": True, "pixel_agreement": True, "miou_drop": False}
    assert "(limit -1.0)" in report["failure"]
    code, _, err = run_cli([*base, "--data", str(onnx_fp32 / "nowhere")], capsys)
    assert code == 2 and "no such data folder" in err


# -------------------------------------------------------------------------------------------------
# predict --mode slide, --size; eval --mode slide; erf --data


def _mask_png(folder: Path) -> np.ndarray:
    return np.asarray(Image.open(folder / "scene_mask.png").convert("RGB"))


def test_predict_slide_and_size(tiny, tmp_path: Path, capsys) -> None:
    from segformer_edge.predict import colorize, predict_mask

    model, image = tiny["model"], tiny["image"]
    pixels = np.asarray(Image.open(image).convert("RGB"))
    expected = {
        "slide": colorize(predict_mask(model, pixels, mode="slide"), model.meta.palette),
        "size": colorize(predict_mask(model, pixels, size=(96, 128)), model.meta.palette),
        "whole": colorize(predict_mask(model, pixels, size=(64, 64)), model.meta.palette),
    }
    assert not np.array_equal(expected["slide"], expected["whole"]) and not np.array_equal(expected["size"], expected["whole"])
    for name, extra in (("slide", ["--mode", "slide"]), ("size", ["--size", "96", "128"])):
        code, _, err = run_cli(["predict", tiny["ckpt"], image, "--out", tmp_path / name, *extra], capsys)
        assert code == 0, err
        assert np.array_equal(_mask_png(tmp_path / name), expected[name]), name


def test_eval_slide(tiny, tmp_path: Path, capsys) -> None:
    from segformer_edge.evaluate import evaluate

    data = tmp_path / "scenes"  # small labelled scenes (96x128): a few windows of the 64x64 training size each
    code, _, err = run_cli(["data", "synth", "--out", data, "--num", "4", "--val-num", "2", "--size", "96", "128"], capsys)
    assert code == 0, err
    model = tiny["model"]
    code, stdout, err = run_cli(["eval", tiny["ckpt"], "--data", data, "--mode", "slide", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    source = open_source(data, "val")
    slide = evaluate(model, source, model.meta, mode="slide", size=(64, 64))
    whole = evaluate(model, source, model.meta, mode="whole", size=(64, 64))
    assert result["miou"] == pytest.approx(slide["miou"], abs=1e-9) and result["miou"] != pytest.approx(whole["miou"], abs=1e-9)


def test_erf_on_a_photo_folder(tiny, tmp_path: Path, capsys) -> None:
    photos = make_photo_folder(tmp_path / "photos", n=2)
    code, stdout, err = run_cli(["erf", tiny["ckpt"], "--data", photos, "--num-images", "1", "--out", tmp_path / "erf"], capsys)
    assert code == 0, err
    assert "wrote 6 heatmaps" in stdout
    for name in ("stage1", "stage4", "head"):
        assert is_heat_map(np.asarray(Image.open(tmp_path / "erf" / f"erf_{name}.png").convert("RGB")).astype(int)), name
    code, _, err = run_cli(["erf", tiny["ckpt"], "--data", tmp_path / "missing", "--out", tmp_path / "erf2"], capsys)
    assert code == 2 and "no such data folder" in err and not (tmp_path / "erf2").exists()
