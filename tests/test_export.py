"""Every target, end to end: conversion, the real runtime, manifests and parity against eager."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import folder_snapshot, run_cli
from segformer_edge.converters.base import ExportOptions, file_sha256, read_manifest
from segformer_edge.converters.parity import verify_artifact
from segformer_edge.converters.pipeline import export_artifact

from segformer_edge import load_pretrained, save_checkpoint
from segformer_edge.errors import ExportError
from segformer_edge.model import SegFormer, SegFormerConfig
from segformer_edge.weights import builtin_checkpoint

TARGETS = ["executorch", "tflite", "coreml", "onnx", "openvino"]


@pytest.fixture(scope="session")
def reference():
    return load_pretrained(builtin_checkpoint())


@pytest.fixture(scope="session")
def exports_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="session")
def main_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The README's main-job command, run once: `segformer-edge export` with no arguments, in a fresh folder,
    in an 80-column terminal. Its fp32 artifacts are also the reference model's fp32 artifacts checked below."""
    cwd = tmp_path_factory.mktemp("main-job")
    result = subprocess.run([sys.executable, "-m", "segformer_edge", "export"], cwd=cwd, capture_output=True,
                            text=True, env={**__import__("os").environ, "COLUMNS": "80"})  # fmt: skip
    return result, cwd / "exports"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("target", TARGETS)
def test_reference_model_parity(reference, exports_dir: Path, main_job, target: str, precision: str) -> None:
    size = reference.meta.input_size
    if precision == "fp32":  # the main job's own artifact (the same export: reference model, every target, fp32)
        result, folder = main_job
        assert result.returncode == 0, result.stderr[-3000:]
        artifact = read_manifest(folder / f"segformer-b0_{target}_fp32")
    else:
        artifact, _ = export_artifact(reference, target, ExportOptions(precision=precision, size=size), exports_dir,
                                      checkpoint=builtin_checkpoint(), verify=False)  # fmt: skip
    report = verify_artifact(artifact.folder, num_images=8)
    if precision == "fp32":
        assert report["max_abs_diff"] <= 1e-3, report
        assert report["pixel_agreement"] >= 0.999, report
    else:
        assert report["pixel_agreement"] >= 0.995, report
    assert report["passed"]
    assert report["miou_artifact"] > 0.5
    manifest = artifact.manifest
    assert manifest["sha256"] == file_sha256(artifact.file)
    assert manifest["variant"] == "b0" and manifest["num_classes"] == 8 and len(manifest["palette"]) == 8
    assert manifest["input"]["normalization"]["mean"] == list(reference.meta.mean)
    assert manifest["precision"] == precision and manifest["tool_versions"]["torch"]
    if target == "coreml":
        assert report["executor"].startswith("mil-reference-executor")
    # fp32 weights: 4 bytes a parameter; an fp16 artifact stores them in about half of that. ExecuTorch's XNNPACK
    # backend serialises convolution weights and biases in fp32 even in an fp16 graph (force_fp32 in its
    # op_conv2d; XNNPACK converts them when it packs them), which leaves b0's .pte at about 70%.
    weight_bytes = 4 * sum(p.numel() for p in reference.parameters())
    if precision == "fp16":
        most = 0.75 if target == "executorch" else 0.6
        _assert_fp16_weights(target, manifest)
        assert 0.4 * weight_bytes < manifest["size_bytes"] < most * weight_bytes, (manifest["size_bytes"], weight_bytes)
    else:
        assert manifest["size_bytes"] > 0.9 * weight_bytes
    if target == "executorch" and precision == "fp32":
        by_op = manifest["delegation"]["by_op"]
        for op in ("convolution", "linear", "bmm", "softmax", "gelu", "upsample_bilinear2d", "mean", "rsqrt"):
            entries = [v for k, v in by_op.items() if op in k]
            assert entries, op
            assert all(v["portable"] == 0 and v["delegated"] > 0 for v in entries), (op, entries)
        assert manifest["delegation"]["portable_ops"] == []
        assert manifest["delegation"]["delegated_subgraphs"] == 1
    if target == "tflite" and precision == "fp32":
        # Stage 1's single-head attention must stay a BATCH_MATMUL that XNNPACK takes (not a FULLY_CONNECTED
        # with activation weights left to the reference kernels): one partition, nothing outside it.
        assert manifest["delegation"]["portable_ops"] == [], manifest["delegation"]
        assert manifest["delegation"]["delegated_subgraphs"] == 1
        assert manifest["delegation"]["by_op"]["BATCH_MATMUL"]["delegated"] >= 4


def _assert_fp16_weights(target: str, manifest: dict) -> None:
    """The weights inside an fp16 artifact are fp16, as its own runtime's reader sees them."""
    if target == "tflite":  # the constant inputs of CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED
        assert set(manifest["tflite"]["weights"]) == {"float16"}, manifest["tflite"]
    elif target == "onnx":  # initializers: fp16 weights beside a few fp32 scalars and int64 shapes
        inits = manifest["onnx"]["initializers"]
        assert inits.get("float16", 0) > 4 * inits.get("float32", 0), inits
    elif target == "coreml":  # the program's constants
        constants = manifest["coreml"]["dtypes"]["constants"]
        assert constants.get("float16", 0) > 4 * constants.get("float32", 0), constants
    elif target == "openvino":  # the IR's Constant nodes
        constants = manifest["openvino"]["constants"]
        assert constants.get("f16", 0) > 4 * constants.get("f32", 0), constants
    # executorch: the .pte's size (checked below) is the reader; the delegate payload is opaque


@pytest.fixture(scope="module")
def small_model(tiny_config_module) -> SegFormer:
    torch.manual_seed(0)
    model = SegFormer(tiny_config_module).eval()
    model.decoder.bn.running_mean.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def tiny_config_module():
    from conftest import TINY

    return SegFormerConfig(**TINY, num_classes=8)


EDGES = {
    "executorch": dict(input_kind="rgb01", output="mask"),
    "tflite": dict(input_kind="uint8", layout="nhwc"),
    "coreml": dict(input_kind="uint8", output="mask"),
    "onnx": dict(dynamic=True),
    "openvino": dict(input_kind="uint8", layout="nhwc", output="mask"),
}


@pytest.mark.parametrize("target", TARGETS)
def test_small_model_odd_size_and_graph_edges(small_model: SegFormer, tmp_path: Path, target: str) -> None:
    options = ExportOptions(size=(96, 160), **EDGES[target])
    artifact, report = export_artifact(small_model, target, options, tmp_path, verify_images=4)
    assert report is not None and report["passed"], report
    assert report["pixel_agreement"] >= 0.999
    if options.output == "logits":
        assert report["max_abs_diff"] <= 1e-3
    manifest = read_manifest(artifact.folder).manifest
    assert manifest["input"]["kind"] == options.input_kind
    # Issue 17, point 5: the I/O dtypes in the manifest are what the runtime reads from the artifact itself.
    if target in RUNTIME_IO:
        assert manifest["io"] == RUNTIME_IO[target](artifact.file), manifest["io"]
    expected_in = "uint8" if options.input_kind == "uint8" and target != "coreml" else "float32"
    expected_out = "int32" if options.output == "mask" else "float32"
    io = manifest.get("io") or manifest[target]["io"]
    assert io["inputs"] == [expected_in] and io["outputs"] == [expected_out], io
    if target == "executorch":  # Mix-FFN's fc1/fc2 reach XNNPACK as 1x1 convolutions: only the attention's 4 linears per block
        linears = manifest["delegation"]["by_op"]["aten_linear_default"]
        assert linears == {"delegated": 4 * sum(small_model.config.depths), "portable": 0}, linears


def _tflite_io(path: Path) -> dict[str, list[str]]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    return {"inputs": [np.dtype(d["dtype"]).name for d in interpreter.get_input_details()],
            "outputs": [np.dtype(d["dtype"]).name for d in interpreter.get_output_details()]}  # fmt: skip


def _pte_io(path: Path) -> dict[str, list[str]]:
    from executorch.runtime import Runtime

    meta = Runtime.get().load_program(path).metadata("forward")
    names = {0: "uint8", 3: "int32", 4: "int64", 6: "float32"}  # c10::ScalarType codes
    return {"inputs": [names[int(meta.input_tensor_meta(i).dtype())] for i in range(meta.num_inputs())],
            "outputs": [names[int(meta.output_tensor_meta(i).dtype())] for i in range(meta.num_outputs())]}  # fmt: skip


RUNTIME_IO = {"tflite": _tflite_io, "executorch": _pte_io}


@pytest.mark.parametrize("size", [(64, 96), (36, 44)])
def test_row_split_attention_is_the_same_attention(small_model: SegFormer, size: tuple[int, int]) -> None:
    from segformer_edge.converters.graph import RowSplitAttention, split_single_head_attention

    split = split_single_head_attention(small_model).eval()
    wrapped = [m for m in split.modules() if isinstance(m, RowSplitAttention)]
    assert len(wrapped) == len(small_model.encoder.stages[0].blocks)  # only stage 1 has a single head
    x = torch.randn(1, 3, *size)  # 36x44: stage 1 has 9 x 11 = 99 query rows, which cannot split in two
    with torch.no_grad():
        torch.testing.assert_close(split(x), small_model(x), rtol=0, atol=1e-5)


def test_channels_first_mix_ffn_is_the_same_mix_ffn_without_its_wide_transposes(small_model: SegFormer) -> None:
    """ExecuTorch's Mix-FFN swap: the same outputs and module paths, and no transpose of the 4x-wide hidden tensor
    left in the exported graph (the ones XNNPACK runs around every depth-wise conv)."""
    from segformer_edge.converters.graph import ChannelsFirstMixFFN, channels_first_mix_ffn

    swapped = channels_first_mix_ffn(small_model).eval()
    assert {n for n, _ in swapped.named_modules()} == {n for n, _ in small_model.named_modules()}
    assert sum(isinstance(m, ChannelsFirstMixFFN) for m in swapped.modules()) == sum(small_model.config.depths)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a conv and a linear sum in different orders: equal to fp32 rounding, not bit for bit
        torch.testing.assert_close(swapped(x), small_model(x), rtol=1e-5, atol=1e-5)
    config = small_model.config
    # Elements of each stage's hidden tensor (B, 4C, H/2^(i+2), W/2^(i+2)): no C-wide tensor has as many.
    hidden = {dim * config.mlp_ratio * (64 >> (i + 2)) * (96 >> (i + 2)) for i, dim in enumerate(config.embed_dims)}

    def wide_transposes(module: torch.nn.Module) -> int:
        graph = torch.export.export(module, (x,)).graph
        return sum(1 for n in graph.nodes if ("transpose" in str(n.target) or "permute" in str(n.target))
                   and n.meta["val"].numel() in hidden)  # fmt: skip

    assert wide_transposes(small_model) == 2 * sum(config.depths)  # into and out of every depth-wise conv
    assert wide_transposes(swapped) == 0


def test_onnx_runs_one_artifact_at_two_sizes(small_model: SegFormer, tmp_path: Path) -> None:
    from segformer_edge.converters.onnx import OnnxRunner

    artifact, _ = export_artifact(small_model, "onnx", ExportOptions(size=(96, 160), dynamic=True), tmp_path, verify=False)
    runner = OnnxRunner(read_manifest(artifact.folder))
    for h, w in [(64, 64), (97, 131), (160, 96)]:
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            expected = small_model(x).numpy()
        out = runner(x.numpy())
        assert out.shape == expected.shape
        assert np.abs(out - expected).max() <= 1e-3


def test_mil_reference_executor_matches_torch_and_refuses_unknown_ops(small_model: SegFormer, tmp_path: Path) -> None:
    from segformer_edge.converters.mil_executor import MilProgram, UnsupportedOpError

    artifact, _ = export_artifact(small_model, "coreml", ExportOptions(size=(64, 96)), tmp_path, verify=False)
    program = MilProgram(artifact.file)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = small_model(x).numpy()
    first = program(x=x.numpy())["out"]
    assert np.abs(first - expected).max() <= 1e-4
    assert np.array_equal(program(x=x.numpy())["out"], first)  # the constants kept from the first call are unchanged

    # Each intermediate value is freed once, after its last reader; outputs and constants are kept.
    steps, constants = program._compiled()
    freed = [name for step in steps for name in step.last_use]
    produced = {name for step in steps for name, _ in step.outputs} | {name for name, _ in program.inputs}
    assert len(freed) == len(set(freed)) and set(freed) == produced - set(program.outputs) - set(constants)
    for i, step in enumerate(steps):
        later = {name for s in steps[i + 1 :] for _, _, values in s.args for name, _ in values}
        assert not set(step.last_use) & later

    # Rename one op in the saved program to something no executor knows.
    spec_path = artifact.file / "Data" / "com.apple.CoreML" / "model.mlmodel"
    from segformer_edge.converters.mil_executor import _proto_modules

    model_pb2, _ = _proto_modules()
    spec = model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    function = spec.mlProgram.functions["main"]
    block = function.block_specializations[function.opset]
    victim = next(op for op in block.operations if op.type == "gelu")
    victim.type = "frobnicate"
    spec_path.write_bytes(spec.SerializeToString())
    with pytest.raises(UnsupportedOpError, match="'frobnicate'"):
        MilProgram(artifact.file)(x=x.numpy())


def test_mil_erf_matches_math_erf() -> None:
    """Both of the reference executor's erf (scipy's, and the series a runtime-only install falls back to) against the
    float64 ``math.erf``, over the range GELU sees and its tails."""
    import math

    from segformer_edge.converters import mil_executor

    x = np.concatenate([np.linspace(-6, 6, 2001), [-np.inf, np.inf, 0.0, 1e-8, -30.0]]).astype(np.float32)
    exact = np.array([math.erf(v) for v in x.astype(np.float64)])
    assert mil_executor._scipy_erf is not None  # the export stack brings scipy: the fast path is the one tested here
    for erf in (mil_executor._erf, mil_executor._erf_series):
        got = erf(x)
        assert got.dtype == np.float32 and np.abs(got - exact).max() <= 3e-7


@pytest.mark.parametrize(("multiplier", "stride", "pad_type"), [(1, 1, "custom"), (2, 2, "same"), (3, 2, "valid")])
def test_mil_depthwise_conv_matches_torch(multiplier: int, stride: int, pad_type: str) -> None:
    """The reference executor's depthwise path (a multiply-add per tap) against torch's grouped convolution, with a
    channel multiplier, strides and each padding mode."""
    from segformer_edge.converters.mil_executor import _conv

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 11, 9)).astype(np.float32)
    w = rng.standard_normal((5 * multiplier, 1, 3, 3)).astype(np.float32)
    b = rng.standard_normal(5 * multiplier).astype(np.float32)
    pads = {"custom": (1, 0, 2, 1), "same": (1, 1, 1, 1), "valid": (0, 0, 0, 0)}[pad_type]  # "same" on 11x9: 1 each side
    got = _conv(x, w, b, strides=(stride, stride), pad_type=pad_type, pad=pads, groups=5)
    top, bottom, left, right = pads
    padded = torch.nn.functional.pad(torch.from_numpy(x), (left, right, top, bottom))
    expected = torch.nn.functional.conv2d(padded, torch.from_numpy(w), torch.from_numpy(b), stride=stride, groups=5).numpy()
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-5


class _Unconvertible(SegFormer):
    """A SegFormer with an op no converter lowers (a Bessel function)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + torch.special.bessel_j0(x).mean()


def test_failed_conversion_leaves_no_file_and_names_target(small_model: SegFormer, tmp_path: Path) -> None:
    good, _ = export_artifact(small_model, "coreml", ExportOptions(size=(64, 64)), tmp_path, verify=False)
    before = folder_snapshot(tmp_path)
    bad = _Unconvertible(small_model.config)
    bad.load_state_dict(small_model.state_dict())
    with pytest.raises(ExportError) as info:
        export_artifact(bad, "coreml", ExportOptions(size=(64, 64)), tmp_path, verify=False)
    message = str(info.value)
    assert message.startswith("coreml: conversion failed") and "bessel_j0" in message
    # The good artifact is untouched; what the failed run wrote is kept aside with its log, and named.
    failed = good.folder.with_name(good.folder.name + ".failed")
    assert str(failed / "export.log") in message and (failed / "export.log").is_file()
    assert {k: v for k, v in folder_snapshot(tmp_path).items() if ".failed" not in k} == before
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]
    assert read_manifest(good.folder).manifest["sha256"] == file_sha256(good.file)


def test_runners_do_not_import_torch(small_model: SegFormer, tmp_path: Path) -> None:
    folders = []
    for target in ("tflite", "onnx", "coreml"):
        artifact, _ = export_artifact(small_model, target, ExportOptions(size=(64, 64)), tmp_path, verify=False)
        folders.append(str(artifact.folder))
    script = f"""
import sys
sys.modules['torch'] = None  # any import of torch now fails
import numpy as np
from segformer_edge.converters import get_target
from segformer_edge.converters.base import read_manifest
for folder in {folders!r}:
    artifact = read_manifest(folder)
    runner = get_target(artifact.target).load(artifact)
    out = runner(np.zeros((1, 3, 64, 64), np.float32))
    print(artifact.target, out.shape, runner.executor)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("(1, 8, 16, 16)") == 3


def test_export_and_verify_cli(small_model: SegFormer, tmp_path: Path, capsys) -> None:
    small_model.meta.input_size = (64, 64)
    ckpt = save_checkpoint(small_model, tmp_path / "small.safetensors")
    code, out, err = run_cli(["export", ckpt, "--target", "onnx", "--out", tmp_path / "x", "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert rows[0]["status"] == "passed" and rows[0]["pixel_agreement"] >= 0.999
    folder = Path(rows[0]["artifact"])
    code, out, err = run_cli(["verify", folder, "--checkpoint", ckpt, "--num-images", "2", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    for key in ("max_abs_diff", "cosine", "psnr_db", "pixel_agreement", "miou_float", "miou_artifact", "passed",
                "target", "precision"):  # fmt: skip
        assert key in report
    assert report["target"] == "onnx" and report["precision"] == "fp32" and report["cosine"] > 0.9999
    # A threshold it cannot meet: exit 1.
    code, _, _ = run_cli(["verify", folder, "--checkpoint", ckpt, "--num-images", "1", "--max-abs-diff", "0"], capsys)
    assert code == 1
    # Another checkpoint than the one exported: exit 2, named.
    other = save_checkpoint(SegFormer(small_model.config), tmp_path / "other.safetensors")
    code, _, err = run_cli(["verify", folder, "--checkpoint", other], capsys)
    assert code == 2 and "other.safetensors" in err and "not the checkpoint" in err
    # A tampered artifact: sha256 mismatch, exit 2.
    model_file = folder / "model.onnx"
    model_file.write_bytes(model_file.read_bytes()[:-10])
    code, _, err = run_cli(["verify", folder, "--checkpoint", ckpt], capsys)
    assert code == 2 and "sha256" in err and len(err.strip().splitlines()) == 1
    # Unknown target: exit 2, nothing written.
    code, _, err = run_cli(["export", ckpt, "--target", "tensorrt", "--out", tmp_path / "y"], capsys)
    assert code == 2 and "tensorrt" in err and not (tmp_path / "y").exists()


def test_main_job_no_arguments_exports_every_target(main_job) -> None:
    """The README's main-job command: `segformer-edge export` with no arguments, in a fresh folder, in an
    80-column terminal: a short clean result, the converters' chatter in each artifact's export.log."""
    result, exports = main_job
    tmp_path = exports.parent
    assert result.returncode == 0, result.stderr[-3000:]
    for target in TARGETS:
        assert target in result.stdout
    assert result.stdout.count("passed") >= 4, result.stdout
    terminal = (result.stdout + result.stderr).splitlines()
    assert len(terminal) <= 25, "\n".join(terminal)
    assert max(len(line) for line in terminal) <= 80, "\n".join(terminal)
    for noise in ("Warning", "WARNING", "[START]", "I0000", "cpuinfo", "Running MIL", "%|"):
        assert noise not in result.stdout + result.stderr, noise
    assert "LiteRT-Torch" in (tmp_path / "exports" / "segformer-b0_tflite_fp32" / "export.log").read_text()
    folders = sorted(p.name for p in (tmp_path / "exports").iterdir())
    assert folders == sorted(f"segformer-b0_{t}_fp32" for t in TARGETS)
    for folder in folders:
        manifest = read_manifest(tmp_path / "exports" / folder).manifest
        assert manifest["parity"]["passed"] and manifest["parity"]["pixel_agreement"] >= 0.999


def test_executorch_coreml_compiles_off_macos_and_says_so(small_model: SegFormer, tmp_path: Path) -> None:
    import platform

    from segformer_edge.converters import get_target
    from segformer_edge.converters.base import ArtifactError

    artifact, report = export_artifact(small_model, "executorch-coreml", ExportOptions(size=(64, 64)), tmp_path)
    delegation = artifact.manifest["delegation"]
    assert delegation["backend"] == "CoreMLBackend" and delegation["delegated_subgraphs"] == 1
    assert delegation["portable_ops"] == []
    if platform.system() != "Darwin":
        assert report is None and artifact.manifest["parity"] == {"status": "not run: needs macOS", "passed": None}
        with pytest.raises(ArtifactError, match="only on macOS"):
            get_target("executorch-coreml").load(read_manifest(artifact.folder))
        from segformer_edge.converters.bench import bench_artifact

        record = bench_artifact(artifact.folder, 1, warmup=0, runs=1)  # the same row Core ML gets off macOS
        assert record["status"] == "needs macOS" and record["target"] == "executorch-coreml"


def test_shared_provenance_shares_the_chain_and_is_restored() -> None:
    """export's lowering shares torch.fx's provenance chain instead of deep-copying it into every new node (20-25%
    of an ExecuTorch/Ethos-U lowering): the same records, the same objects; outside it torch's own behaviour."""
    import copy as copy_module

    from segformer_edge.converters.build import shared_provenance
    from torch.fx import symbolic_trace
    from torch.fx import traceback as fx_traceback

    graph = symbolic_trace(torch.nn.ReLU()).graph
    first, second = list(graph.nodes)[:2]
    second.meta["from_node"] = [fx_traceback.NodeSource(first, "pass-a", fx_traceback.NodeSourceAction.CREATE)]
    copied = fx_traceback.NodeSource(second, "pass-b")
    with shared_provenance():
        shared = fx_traceback.NodeSource(second, "pass-b")
    assert fx_traceback.copy is copy_module  # restored
    assert shared.from_node[0] is second.meta["from_node"][0] and shared.from_node is not second.meta["from_node"]
    assert copied.from_node[0] is not second.meta["from_node"][0]  # torch's deep copy outside
    assert shared.to_dict() == copied.to_dict()  # the same provenance either way
