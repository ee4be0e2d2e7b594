"""The numerics debugger: verify --layers names the first stage where an artifact leaves the float model,
and verify --report writes pictures and a report whose figures are the JSON's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, run_cli
from PIL import Image
from segformer_edge.converters import get_target, register, unregister
from segformer_edge.converters.base import ExportOptions
from segformer_edge.converters.parity import verify_artifact
from segformer_edge.converters.pipeline import export_artifact

from segformer_edge import save_checkpoint
from segformer_edge.model import SegFormer, SegFormerConfig

SIZE = (64, 64)


@pytest.fixture(scope="module")
def model() -> SegFormer:
    torch.manual_seed(0)
    return SegFormer(SegFormerConfig(**TINY, num_classes=5)).eval()


def _overflowing(model: SegFormer) -> SegFormer:
    """The same function in fp32 (the LayerNorm after the conv undoes the scale), but stage 3's patch-embedding
    conv outputs exceed fp16's range (65504): an fp16 artifact overflows there and nowhere before."""
    import copy

    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.encoder.stages[2].patch_embed.proj.weight.mul_(1e5)
        scaled.encoder.stages[2].patch_embed.proj.bias.mul_(1e5)
    return scaled


@pytest.mark.parametrize("target", ["onnx", "coreml"])  # fp16 compute (ExecuTorch's XNNPACK saturates, TFLite's fp16 is weights only)
def test_fp16_overflow_is_found_in_its_stage(model: SegFormer, tmp_path: Path, target: str) -> None:
    scaled = _overflowing(model)
    artifact, _ = export_artifact(scaled, target, ExportOptions(size=SIZE, precision="fp16"), tmp_path, verify=False)
    report = verify_artifact(artifact.folder, model=scaled, num_images=2, layers=True)
    layers = report["layers"]
    assert not report["passed"] and re.search(r"\d+ (NaN|inf)", report["failure"]), report["failure"]
    assert layers["first_divergent"] == "stage3", layers
    taps = {t["tap"]: t for t in layers["taps"]}
    assert taps["stage1"]["sqnr_db"] > 40 and taps["stage2"]["sqnr_db"] > 40  # fp16 is fine before the overflow
    assert taps["stage3"]["nonfinite_fraction"] > 0 and "fp16 overflow" in layers["conclusion"]


class _BrokenStage2:
    """A target mixin whose export computes stage 2's closing LayerNorm with another eps: a runtime that
    computes something else in one place, as a faulty delegate would."""

    def prepare(self, module):  # type: ignore[no-untyped-def]
        import copy

        module = copy.deepcopy(super().prepare(module))  # type: ignore[misc]
        for name, sub in module.named_modules():
            if name.endswith("encoder.stages.1.norm"):
                sub.eps = 10.0
        return module


@pytest.mark.parametrize("base", ["executorch", "tflite", "onnx", "coreml", "openvino"])
def test_a_broken_layer_is_named_on_every_target(model: SegFormer, tmp_path: Path, base: str) -> None:
    cls = type(get_target(base))
    broken = type(f"Broken{cls.__name__}", (_BrokenStage2, cls), {"name": f"broken-{base}"})
    register(broken)
    try:
        artifact, _ = export_artifact(model, broken.name, ExportOptions(size=SIZE), tmp_path, verify=False)
        layers = verify_artifact(artifact.folder, model=model, num_images=2, layers=True)["layers"]
    finally:
        unregister(broken.name)
    assert layers["first_divergent"] == "stage2", layers
    taps = {t["tap"]: t for t in layers["taps"]}
    assert taps["stage1"]["sqnr_db"] > 60, taps  # fp32 everywhere before the fault
    assert taps["stage2"]["sqnr_db"] < 40 and layers["threshold_db"] == 40.0


def test_a_faithful_artifact_has_no_divergent_tap(model: SegFormer, tmp_path: Path) -> None:
    artifact, _ = export_artifact(model, "onnx", ExportOptions(size=SIZE), tmp_path, verify=False)
    layers = verify_artifact(artifact.folder, model=model, num_images=2, layers=True)["layers"]
    assert layers["first_divergent"] is None
    assert [t["tap"] for t in layers["taps"]] == ["stage1", "stage2", "stage3", "stage4", "fused", "logits"]
    assert all(t["sqnr_db"] > 60 and t["cosine"] > 0.99999 for t in layers["taps"]), layers


def test_verify_report_pictures_and_figures_match_the_json(model: SegFormer, tmp_path: Path, capsys) -> None:
    model.meta.input_size = SIZE
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors")
    code, out, err = run_cli(["export", ckpt, "--target", "onnx", "--precision", "fp16", "--out", tmp_path / "x", "--json"], capsys)
    assert code == 0, err
    folder = Path(json.loads(out)[0]["artifact"])
    report_dir = tmp_path / "report"
    code, out, err = run_cli(["verify", folder, "--checkpoint", ckpt, "--num-images", "3", "--layers", "--report", report_dir,
                              "--json"], capsys)  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    saved = json.loads((report_dir / "report.json").read_text())
    assert saved["summary"]["pixel_agreement"] == report["pixel_agreement"]
    markdown = (report_dir / "report.md").read_text()
    assert f"| pixel agreement | {100 * report['pixel_agreement']:.3f}% |" in markdown
    for tap in report["layers"]["taps"]:
        assert re.search(rf"\| {tap['tap']} \| {tap['sqnr_db']:.4g} \|", markdown), tap
    agreements = [r["agreement"] for r in saved["images"]]
    assert len(agreements) == 3 and agreements == sorted(agreements)  # worst first
    first = saved["images"][0]["stem"]
    pictures = {kind: np.asarray(Image.open(report_dir / f"{first}_{kind}.png")) for kind in ("input", "float", "artifact", "diff")}
    assert all(p.shape == (*SIZE, 3) for p in pictures.values())
    palette = {tuple(c) for c in model.meta.palette}
    assert {tuple(c) for c in pictures["float"].reshape(-1, 3)} <= palette  # a mask in the model's colours
    assert f"![input]({first}_input.png)" in markdown
