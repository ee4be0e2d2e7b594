"""What keeps an export's cost down as the model grows (issue 27): the projected decoder, the same function with its
fuse conv folded into the stage projections, and several targets exported side by side in worker processes that
share one outlier decision and one float pass per image."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, make_photo_folder, save_hf_model
from segformer_edge.calibration.spec import QuantSpec
from segformer_edge.converters import reference
from segformer_edge.converters.base import ExportOptions
from segformer_edge.converters.build import decoder_form, plan_export
from segformer_edge.converters.graph import fold_batch_norm, project_decoder
from segformer_edge.converters.parity import ParityFailed
from segformer_edge.converters.pipeline import export_artifact

import segformer_edge as se
from segformer_edge.errors import ExportError, OptionError
from segformer_edge.inputs import InputSpec
from segformer_edge.model import ProjectedHead, SegFormer, SegFormerConfig
from segformer_edge.profile import model_stats

SIZE = (64, 64)


@pytest.fixture
def model() -> SegFormer:
    torch.manual_seed(0)
    model = SegFormer(SegFormerConfig(**TINY, num_classes=8)).eval()
    bn = model.decoder.bn
    with torch.no_grad():  # statistics and an affine that are not the identity, so that folding them is exercised
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_(1.0, 0.3)
        bn.bias.normal_(0, 0.3)
    return model


def test_the_projected_decoder_is_the_decoder_as_trained(model: SegFormer) -> None:
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        features = model.encoder(x)
        reference_logits = model.decoder(features)  # (2, K, 24, 40)
        for head in (ProjectedHead(model.decoder), ProjectedHead(fold_batch_norm(model).decoder)):  # BatchNorm, or folded
            out = head.eval()(features)
            assert out.shape == reference_logits.shape
            assert (out - reference_logits).abs().max() <= 1e-4 * reference_logits.abs().max()
        assert torch.allclose(project_decoder(model)(x), reference_logits, atol=1e-4 * float(reference_logits.abs().max()))
    assert isinstance(model.decoder.bn, torch.nn.BatchNorm2d)  # the model itself is untouched
    # Its MACs: the 4C -> C fuse conv at 1/4 resolution is gone, nothing else changed.
    c, (h, w) = model.config.decoder_dim, (96, 160)
    trained, projected = model_stats(model.config, (h, w))["macs"], model_stats(model.config, (h, w), projected=True)["macs"]
    assert trained - projected == (h // 4) * (w // 4) * 4 * c * c


def test_the_decoder_form_is_recorded_and_an_option_it_cannot_honour_refused(model: SegFormer, tmp_path: Path) -> None:
    artifact, _ = export_artifact(model, "onnx", ExportOptions(size=SIZE), tmp_path, verify_data="synthetic:4", verify_images=4)
    manifest = json.loads((artifact.folder / "manifest.json").read_text())
    assert manifest["decoder"]["form"] == "projected" and manifest["parity"]["passed"]
    assert manifest["network_macs"] == model_stats(model.config, SIZE, projected=True)["macs"]
    import onnx

    ops = [node.op_type for node in onnx.load(artifact.file).graph.node]
    assert "Concat" not in ops and ops.count("Resize") == 3  # no concatenation: three upsampled projections, summed

    head = QuantSpec(float_groups=("decoder.head",))
    int8 = ExportOptions(size=SIZE, precision="int8")
    assert decoder_form(int8, head) == {"form": "as-trained", "why": "decoder.fuse, decoder.classifier kept float: the projected decoder has no such layer"}
    with pytest.raises(ExportError, match="--decoder projected folds the decoder's fuse conv .* decoder.fuse, decoder.classifier is kept float"):
        plan_export(model, "onnx", ExportOptions(size=SIZE, precision="int8", decoder="projected"), tmp_path, head, check_calibration=False)
    with pytest.raises(ExportError, match="--decoder sideways: choose one of auto, projected, as-trained"):
        ExportOptions(decoder="sideways")


def test_errors_cross_process_boundaries_with_their_attributes(tmp_path: Path) -> None:
    failed = ParityFailed("onnx: parity failed: agreement 0.5", {"target": "onnx", "pixel_agreement": 0.5}, tmp_path / "x.failed")
    back = pickle.loads(pickle.dumps(failed))
    assert type(back) is ParityFailed and str(back) == str(failed) and back.report == failed.report and back.failed == failed.failed
    assert back.exit_code == 1
    option = pickle.loads(pickle.dumps(OptionError("--jobs 0: at least 1", "--jobs")))
    assert option.option == "--jobs" and str(option) == "--jobs 0: at least 1"


def test_float_logits_are_shared_between_the_processes_of_a_run(model: SegFormer, tmp_path: Path, monkeypatch) -> None:
    spec = InputSpec.for_model(model.meta, SIZE)
    images = np.random.default_rng(0).integers(0, 256, (1, *SIZE, 3), dtype=np.uint8)  # (1, H, W, 3)
    monkeypatch.setenv(reference.SHARED_LOGITS_ENV, str(tmp_path))
    first = reference.float_logits(model, spec, images)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    reference._FLOAT_MEMO.clear()  # what another process starts with
    calls: list[int] = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    np.testing.assert_array_equal(reference.float_logits(model, spec, images), first)
    assert calls == []  # read back, not run again
    assert reference.reference_form(model)["decoder"] == "projected"  # and how it was computed, read beside it
    with torch.no_grad():
        model.decoder.classifier.bias.add_(1.0)  # another model state: its own file
    reference.float_logits(model, spec, images)
    assert calls and len(list(tmp_path.glob("*.npy"))) == 2  # run (its decoder checked, then projected)


def test_the_float_reference_runs_its_decoder_projected_checked_against_the_trained_one(model: SegFormer, monkeypatch) -> None:
    spec = InputSpec.for_model(model.meta, SIZE)
    images = np.random.default_rng(1).integers(0, 256, (2, *SIZE, 3), dtype=np.uint8)  # (2, H, W, 3)
    with torch.no_grad():
        trained = model(torch.from_numpy(spec.float_spec(images))).numpy()  # (2, K, H/4, W/4) the decoder as trained
    reference._FLOAT_MEMO.clear()
    logits = reference.float_logits(model, spec, images)
    assert np.abs(logits - trained).max() <= 1e-4 * np.abs(trained).max()
    form = reference.reference_form(model)
    assert form["decoder"] == "projected" and 0 <= form["checked"]["max_relative_logit_difference"] <= 1e-4, form
    assert isinstance(model.decoder, torch.nn.Module) and not isinstance(model.decoder, ProjectedHead)  # untouched
    monkeypatch.setattr(reference, "PROJECTION_TOLERANCE", -1.0)  # a projection that disagrees: the decoder as trained
    reference._FLOAT_MEMO.clear()
    np.testing.assert_allclose(reference.float_logits(model, spec, images), trained, rtol=0, atol=1e-6)
    assert reference.reference_form(model)["decoder"] == "as trained"
    reference._FLOAT_MEMO.clear()


def test_targets_side_by_side_share_one_outlier_decision(tmp_path: Path) -> None:
    """int8 to two targets in two worker processes: both land, verified, and reuse the one decision made before
    they started; each target's steps reached the caller."""
    folder = save_hf_model(tmp_path / "hf", num_labels=150)
    photos = make_photo_folder(tmp_path / "photos", n=6)
    steps: list[tuple[str, str, bool]] = []
    artifacts = se.export(str(folder), ["onnx", "openvino"], "int8", data=photos, out=tmp_path / "out", size=SIZE, jobs=2,
                          calibration_images=6, verify_images=4, on_step=lambda task, what, done=False: steps.append((task, what, done)))  # fmt: skip
    assert list(artifacts) == ["onnx", "openvino"] and all(a.parity.passed for a in artifacts.values())
    assert all(a.manifest["parity"]["float_reference"]["decoder"] == "projected" for a in artifacts.values())
    decisions = [a.manifest["quantization"]["applied"]["outliers"]["decision"] for a in artifacts.values()]
    assert all(d["reused"] for d in decisions) and len({d["key_sha256"] for d in decisions}) == 1, decisions
    assert {d["from"] for d in decisions} == {str(Path(decisions[0]["from"]))} and Path(decisions[0]["from"]).is_file()
    tasks = {task for task, _, _ in steps}
    assert {"onnx int8", "openvino int8", "outliers"} <= tasks, tasks
    assert ("onnx int8", "verify", False) in steps and ("openvino int8", "verify", False) in steps
    for artifact in artifacts.values():  # the float logits picking the calibration set computed: no worker ran them again
        log = (artifact.folder / "export.log").read_text()
        assert log.count("float logits of 1 image(s) read from the run's shared folder") == 4, artifact.folder.name
    for targets in (["onnx", "openvino"], "onnx"):  # one target too: never accepted and then ignored
        with pytest.raises(OptionError, match="--jobs 0: at least 1"):
            se.export(str(folder), targets, "int8", data=photos, out=tmp_path / "out", size=SIZE, jobs=0)


def test_the_idle_xnnpack_passes_are_executorchs_and_their_patterns_need_what_they_are_skipped_without() -> None:
    """Each pass :data:`IDLE_UNLESS` names is one XNNPACK runs (a renamed pass would be run, never skipped wrongly, but
    its entry would be dead), and the two passes that match pattern graphs need what they are skipped without: every
    SDPA pattern tests its mask with any.dim, and the bilinear patterns are upsample_bilinear2d.vec alone, which
    ConvertToUpsampleBilinear2d leaves as it is."""
    from executorch.backends.xnnpack._passes import XNNPACKPassManager
    from executorch.backends.xnnpack.partition.graphs import bilinear_2d, sdpa

    import segformer_edge.converters.executorch as executorch_target

    assert set(executorch_target.IDLE_UNLESS) - set(executorch_target.EDGE_PASSES) <= {p.__name__ for p in XNNPACKPassManager(None).passes}

    def ops(pattern: torch.fx.GraphModule) -> set[str]:
        return {str(getattr(n.target, "__name__", n.target)) for n in pattern.graph.nodes if n.op == "call_function"}

    assert all("aten.any.dim" in ops(p) for p in sdpa.get_graphs()), [ops(p) for p in sdpa.get_graphs()]
    assert {frozenset(ops(p)) for p in bilinear_2d.get_graphs_dict()} == {frozenset({"aten.upsample_bilinear2d.vec"})}

    class Scaled(torch.nn.Module):  # the batch size, a SymInt where the batch is dynamic, given to a tensor op
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * x.shape[0]

    x = torch.ones(2, 3)
    dynamic = torch.export.export(Scaled(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    static = torch.export.export(Scaled(), (x,))
    symbolic = executorch_target.IDLE_UNLESS["SymToTensorPass"]
    assert any(symbolic(n) for n in dynamic.graph.nodes) and not any(symbolic(n) for n in static.graph.nodes)


def test_targets_that_only_a_reference_executor_runs_here_start_first() -> None:
    """Side by side, Core ML (off macOS) starts first: the longest export of the five, its verify in a numpy executor."""
    import platform

    from segformer_edge.api import side_by_side_order

    names = ["executorch", "tflite", "coreml", "onnx", "openvino"]
    expected = names if platform.system() == "Darwin" else ["coreml", "executorch", "tflite", "onnx", "openvino"]
    assert side_by_side_order(names) == expected
    assert side_by_side_order(["onnx", "openvino"]) == ["onnx", "openvino"]


def test_idle_xnnpack_passes_are_skipped_and_the_program_is_the_same(tmp_path: Path) -> None:
    """ExecuTorch's XNNPACK passes that find none of their ops, and its decompositions whose table finds none, are
    skipped: the .pte is the same byte for byte (fp32 here, for the suite's time; benchmarks/XNNPACK_IDLE_PASSES.md
    checks the b2 int8 graph)."""
    import segformer_edge.converters.executorch as executorch_target
    from segformer_edge.converters.build import capture

    torch.manual_seed(0)
    model = SegFormer(SegFormerConfig(**TINY, num_classes=8)).eval()
    plan = plan_export(model, "executorch", ExportOptions(size=SIZE), tmp_path, None)
    module, example, _ = capture(model, plan)
    skipping = plan.target.convert(module, example, tmp_path / "skip.pte", plan)
    every = dict(executorch_target.IDLE_UNLESS)
    executorch_target.IDLE_UNLESS.clear()
    executorch_target.SKIP_IDLE_DECOMPOSITIONS = False
    try:
        running = plan.target.convert(module, example, tmp_path / "all.pte", plan)
    finally:
        executorch_target.IDLE_UNLESS.update(every)
        executorch_target.SKIP_IDLE_DECOMPOSITIONS = True
    # This fp32 graph holds none of the other passes' ops; its linears read view copies, it keeps _to_copy nodes and
    # gives a number for a tensor (the int8 graphs of benchmarks/XNNPACK_IDLE_PASSES.md skip all but RemoveRedundantCopyPass).
    assert skipping["delegation"]["passes_skipped"] == sorted(set(every) - {"ConvertToLinearPass", "RemoveRedundantCopyPass", "ScalarToTensorPass"})
    assert skipping["delegation"]["decompositions_skipped"] >= 1  # the third decomposition before partitioning
    assert running["delegation"]["passes_skipped"] == [] and running["delegation"]["decompositions_skipped"] == 0
    assert (tmp_path / "skip.pte").read_bytes() == (tmp_path / "all.pte").read_bytes()
    # The edge passes' call is given back as it was: inherited where it was inherited, their own where they had one.
    from executorch.exir.pass_base import ExportPass
    from executorch.exir.passes.normalize_transpose_pass import NormalizeTransposePass
    from executorch.exir.passes.scalar_to_tensor_pass import ScalarToTensorPass

    assert "call" not in vars(NormalizeTransposePass) and NormalizeTransposePass.call is ExportPass.call
    assert vars(ScalarToTensorPass)["call"].__qualname__ == "ScalarToTensorPass.call"
