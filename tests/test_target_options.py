"""The int8 options each runtime's users expect (issue 14, point 3), on a small trained model at 64x64.

Every option is exported once (module-scoped), loaded in its real runtime (Core ML through the MIL reference
executor), held to the parity thresholds written here, and its manifest's record of what was applied is checked
against the artifact itself, read with the runtime's or the format's own tools. Options a target cannot honour
are one clear error before any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY, folder_snapshot, run_cli
from segformer_edge.calibration.calibset import CalibrationSet, select_calibration_set
from segformer_edge.calibration.spec import QuantSpec
from segformer_edge.converters import get_target
from segformer_edge.converters.base import Artifact, ExportOptions
from segformer_edge.converters.build import plan_export
from segformer_edge.converters.onnx import u8s8_is_fast
from segformer_edge.converters.parity import verify_artifact
from segformer_edge.converters.pipeline import export_artifact
from segformer_edge.converters.reference import checkpoint_digest

from segformer_edge import save_checkpoint
from segformer_edge.errors import ExportError
from segformer_edge.model import SegFormer, SegFormerConfig

SIZE = (64, 64)
IMAGES = 8  # parity images (synthetic scenes the model was not calibrated on)

# option id -> (target, scheme, -O options, min pixel agreement, max mIoU drop in points). The thresholds: int8
# weights with float activations (dynamic, weight-only, 8-bit palettes) stay close to the float model; full-integer
# options are held to the project's int8 bar; 4-bit palettes (16 values per weight tensor) to a looser one.
OPTIONS: dict[str, tuple[str, str, dict[str, str], float, float]] = {
    "tflite-io-int8": ("tflite", "static", {"io": "int8"}, 0.98, 1.0),
    "tflite-io-uint8": ("tflite", "static", {"io": "uint8"}, 0.98, 1.0),
    "tflite-int16x8": ("tflite", "static", {"activations": "int16"}, 0.98, 1.0),
    "tflite-attention-int8": ("tflite", "static", {"attention": "int8"}, 0.98, 1.0),
    "coreml-weight-int8": ("coreml", "weight_only", {}, 0.995, 0.5),
    "coreml-palettize8": ("coreml", "weight_only", {"weights": "palettize8"}, 0.995, 0.5),
    "coreml-palettize6": ("coreml", "weight_only", {"weights": "palettize6"}, 0.99, 1.0),
    "coreml-palettize4": ("coreml", "weight_only", {"weights": "palettize4"}, 0.95, 3.0),
    "executorch-dynamic": ("executorch", "dynamic", {}, 0.995, 0.5),
    "onnx-u8s8": ("onnx", "static", {"activations": "uint8"}, 0.98, 1.0),
    "onnx-s8s8": ("onnx", "static", {"activations": "int8"}, 0.98, 1.0),
    "onnx-softmax-int8": ("onnx", "static", {"activations": "uint8", "softmax": "int8"}, 0.98, 1.0),
}


# The target's own options an int8 export of that scheme records (defaults filled in).
DEFAULTS = {"tflite": {"io": "float", "activations": "int8", "attention": "float"}, "coreml": {"weights": "int8"}, "executorch": {},
            "onnx": {"activations": "uint8" if u8s8_is_fast() else "int8", "softmax": "float"}}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py: one torch thread per module


@pytest.fixture(scope="module")
def calib(trained: tuple[SegFormer, Path]) -> CalibrationSet:
    _, ckpt = trained
    return select_calibration_set("synthetic:96", 8, SIZE, 8, checkpoint_sha256=checkpoint_digest(ckpt))


@pytest.fixture(scope="module")
def exported(trained, calib: CalibrationSet, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Artifact, dict[str, Any]]]:
    """Each option exported once (parity checked by the export itself with the default thresholds), lazily."""
    model, ckpt = trained
    out = tmp_path_factory.mktemp("option_exports")

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, key: str) -> tuple[Artifact, dict[str, Any]]:
            target, scheme, options, _, _ = OPTIONS[key]
            quant = QuantSpec(scheme=scheme, outliers="none", calibration=calib)
            artifact, report = export_artifact(model, target, ExportOptions(size=SIZE, precision="int8", target_options=options),
                                               out, checkpoint=ckpt, quant=quant, verify_images=IMAGES)  # fmt: skip
            self[key] = (artifact, report)
            return self[key]

    return Lazy()


@pytest.mark.parametrize("option", list(OPTIONS))
def test_option_exports_runs_and_keeps_parity(option: str, exported, trained) -> None:
    target, scheme, options, min_agreement, max_drop = OPTIONS[option]
    artifact, report = exported[option]
    manifest = artifact.manifest
    # The export ran the real runtime on the artifact it wrote; run it again from disk, as a user would.
    model, ckpt = trained
    again = verify_artifact(artifact.folder, model=model, checkpoint=ckpt, num_images=IMAGES)
    for rep in (report, again):
        assert rep["pixel_agreement"] >= min_agreement, (option, rep["pixel_agreement"])
        assert rep["miou_drop_points"] <= max_drop, (option, rep["miou_drop_points"])
        assert rep["nonfinite"] == 0
    assert again["pixel_agreement"] == pytest.approx(report["pixel_agreement"])
    assert report["executor"] == {"tflite": "ai_edge_litert", "coreml": "mil-reference-executor (numpy)",
                                  "executorch": "executorch.runtime", "onnx": "onnxruntime"}[target]  # fmt: skip
    assert manifest["parity"]["status"] == "passed"
    q = manifest["quantization"]
    assert q["scheme"] == scheme and manifest["target_options"] == {**DEFAULTS[target], **options}
    CHECKS[target](option, artifact, q["applied"])


# -------------------------------------------------------------------------------------------------
# What the manifest says was applied, against the artifact read with the runtime's or the format's own tools


def _check_tflite(option: str, artifact: Artifact, applied: dict[str, Any]) -> None:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(artifact.file))
    interpreter.allocate_tensors()
    edges = [*interpreter.get_input_details(), *interpreter.get_output_details()]
    recorded = [*applied["io"]["inputs"], *applied["io"]["outputs"]]
    for detail, record in zip(edges, recorded, strict=True):
        assert record["dtype"] == np.dtype(detail["dtype"]).name
        if record["dtype"] != "float32":
            scale, zero = detail["quantization"]
            assert record["scale"] == pytest.approx(scale) and record["zero_point"] == zero
    io = artifact.manifest["target_options"]["io"]
    assert {d["dtype"] for d in recorded} == {{"float": "float32", "int8": "int8", "uint8": "uint8"}[io]}
    # The dtypes the conv and fully connected ops read, from the interpreter's op list: int16 for 16x8, int8 otherwise.
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    compute = [op for op in interpreter._get_ops_details() if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    inputs = {np.dtype(tensors[int(op["inputs"][0])]["dtype"]).name for op in compute if int(op["inputs"][0]) in tensors}
    expected = "int16" if option == "tflite-int16x8" else "int8"
    assert inputs == {expected} and applied["activations"] == {expected: len(compute)}, (inputs, applied["activations"])
    # The attention's BATCH_MATMULs and SOFTMAX, found in the interpreter's op list beside each other: int8 with
    # attention=int8 (where XNNPACK delegates none of them), float otherwise; the manifest says the same.
    ops = interpreter._get_ops_details()
    dtype = lambda op: np.dtype(tensors[int(op["inputs"][0])]["dtype"]).name  # noqa: E731
    found = {name: sorted({dtype(op) for op in ops if op["op_name"] == name}) for name in ("BATCH_MATMUL", "SOFTMAX")}
    blocks = sum(TINY["depths"])
    if option == "tflite-attention-int8":
        assert found == {"BATCH_MATMUL": ["int8"], "SOFTMAX": ["int8"]}, found
        assert applied["attention_ops"] == {"q_kT": {"int8": blocks}, "softmax": {"int8": blocks}, "attn_v": {"int8": blocks}}
        assert applied["attention"] == {part: {"int8": blocks, "float": 0} for part in ("q_kT", "softmax", "attn_v")}
        assert applied["quantizer"] == "PT2EQuantizer + IntegerAttention"
        assert {"BATCH_MATMUL", "SOFTMAX"} <= set(artifact.manifest["delegation"]["portable_ops"])
    elif option != "tflite-int16x8":
        assert found == {"BATCH_MATMUL": ["float32"], "SOFTMAX": ["float32"]}, found
        assert applied["attention_ops"] == {"q_kT": {"float32": blocks}, "softmax": {"float32": blocks}, "attn_v": {"float32": blocks}}
    if option == "tflite-int16x8":
        assert applied["quantizer"].startswith("ai-edge-quantizer static_wi8_ai16")
        assert artifact.manifest["quantization"]["method"] == "minmax"  # --method auto: the min/max ranges it has


def _check_coreml(option: str, artifact: Artifact, applied: dict[str, Any]) -> None:
    import coremltools as ct

    # coremltools' own reading of the saved program: where each conv/linear weight comes from.
    spec = ct.utils.load_spec(str(artifact.file))
    function = spec.mlProgram.functions["main"]
    ops = list(function.block_specializations[function.opset].operations)
    producer = {out.name: op for op in ops for out in op.outputs}
    storage: dict[str, int] = {}
    for op in ops:
        if op.type in ("conv", "linear"):
            source = producer[op.inputs["weight"].arguments[0].name]
            if source.type == "constexpr_lut_to_dense":
                lut = source.attributes["lut"]
                size = int(np.prod([d.constant.size for d in lut.type.tensorType.dimensions]))
                kind = f"palettized_{int(np.log2(size))}bit"
            elif source.type == "constexpr_affine_dequantize":
                kind = "int8"
            else:
                kind = "float32"
            storage[kind] = storage.get(kind, 0) + 1
    nbits = {"coreml-weight-int8": None, "coreml-palettize8": 8, "coreml-palettize6": 6, "coreml-palettize4": 4}[option]
    compressed = "int8" if nbits is None else f"palettized_{nbits}bit"
    assert set(storage) == {compressed, "float32"} and storage[compressed] >= 10, storage  # small weights (<= 2048) stay fp32
    assert {k: v for k, v in applied["weight_storage"].items()} == storage
    assert applied["compression"] == ("linear_quantize_weights" if nbits is None else "palettize_weights")
    assert artifact.manifest["coreml"]["deployment_target"] == "iOS16"
    assert "quantize" not in artifact.manifest["coreml"]["ops"]  # activations stay float
    assert applied["outliers"]["applied"] == []  # nothing to migrate for float activations


def _check_executorch(option: str, artifact: Artifact, applied: dict[str, Any]) -> None:
    by_op = artifact.manifest["delegation"]["by_op"]
    chooses = sum(v["delegated"] for op, v in by_op.items() if op.startswith("quantized_decomposed_choose_qparams"))
    assert applied["scheme"] == {"kind": "dynamic", "runtime_quantized_activations": chooses, "calibrated_quantize_ops": 0}
    assert chooses == applied["activation_observers"]["PlaceholderObserver"] > 0  # one runtime range per quantized input
    groups = applied["ops_by_group"]
    assert all(groups[f"stage{i}"]["quantized"] > 0 for i in range(1, 5))
    assert groups["decoder.head"]["quantized"] == 0  # convolutions stay fp32
    assert artifact.manifest["io"] == {"inputs": ["float32"], "outputs": ["float32"]}
    blocks = sum(TINY["depths"])
    assert by_op["aten_linear_default"]["delegated"] == 6 * blocks  # dynamic keeps Mix-FFN's linears (its quantized ops)
    # XNNPACK's batch matmul is fp32-only: every attention stays float, and says so.
    assert applied["attention"] == {part: {"int8": 0, "float": blocks} for part in ("q_kT", "softmax", "attn_v")}


def _check_onnx(option: str, artifact: Artifact, applied: dict[str, Any]) -> None:
    import onnx
    import onnxruntime as ort

    activations = OPTIONS[option][2]["activations"]
    model = onnx.load(str(artifact.file))
    inits = {t.name: t for t in model.graph.initializer}
    zero_points = {onnx.helper.tensor_dtype_to_np_dtype(inits[n.input[2]].data_type).name
                   for n in model.graph.node if n.op_type == "QuantizeLinear"}  # fmt: skip
    assert zero_points == {activations} and set(applied["qdq_types"]["activations"]) == {activations}
    assert applied["qdq_types"]["weights"].keys() == {"int8"}
    assert applied["qdq_types"]["format"] == {"uint8": "U8S8", "int8": "S8S8"}[activations]
    # Every attention: both matmuls int8 and the softmax float (no Q/DQ pair into it) or int8, as the manifest
    # says and as ONNX Runtime's own optimised graph runs it (softmax=float: q @ k^T as MatMulIntegerToFloat and a
    # float Softmax; softmax=int8: QLinearMatMul into QLinearSoftmax).
    blocks = sum(TINY["depths"])
    softmax = OPTIONS[option][2].get("softmax", "float")
    assert applied["attention"] == {"q_kT": {"int8": blocks, "float": 0}, "attn_v": {"int8": blocks, "float": 0},
                                    "softmax": {"int8": blocks * (softmax == "int8"), "float": blocks * (softmax == "float")}}  # fmt: skip
    read = {name for n in model.graph.node for name in n.input} | {o.name for o in model.graph.output}
    assert all(any(o in read for o in n.output) for n in model.graph.node)  # the rewired pairs are gone, not left dangling
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(artifact.folder.parent / f"{option}.ort-optimized.onnx")
    ort.InferenceSession(str(artifact.file), options, providers=["CPUExecutionProvider"])
    ran = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    fused = {"float": ("MatMulIntegerToFloat", "Softmax"), "int8": ("QLinearSoftmax", "QLinearSoftmax")}[softmax]
    assert ran.count(fused[0]) == blocks and ran.count(fused[1]) == blocks, sorted(set(ran))
    assert ("QLinearSoftmax" in ran) == (softmax == "int8")


CHECKS = {"tflite": _check_tflite, "coreml": _check_coreml, "executorch": _check_executorch, "onnx": _check_onnx}


# -------------------------------------------------------------------------------------------------
# What a target cannot honour: one clear error before any work


REFUSALS = [
    ("tflite", "fp32", "static", {"io": "int8"}, {}, "io=int8 applies to --precision int8 only"),
    ("tflite", "int8", "static", {"io": "uint8", "activations": "int16"}, {}, "io=uint8 needs activations=int8"),
    ("tflite", "int8", "static", {"io": "int8"}, {"input_kind": "uint8"}, "io=int8 quantizes the float input"),
    ("tflite", "int8", "static", {"io": "int8"}, {"output": "mask"}, "--output logits"),
    ("tflite", "int8", "static", {"io": "int16"}, {}, "io=int16: choose one of float, int8, uint8"),
    ("tflite", "int8", "dynamic", {}, {}, "int8 scheme dynamic is not supported (choose static)"),
    ("coreml", "int8", "static", {"weights": "palettize4"}, {}, "weights=palettize4 applies to --precision int8 --scheme weight_only"),
    ("coreml", "int8", "weight_only", {"weights": "palettize3"}, {}, "choose one of int8, palettize4, palettize6, palettize8"),
    ("coreml", "int8", "dynamic", {}, {}, "scheme dynamic is not supported (choose static, weight_only)"),
    ("executorch", "int8", "weight_only", {}, {}, "scheme weight_only is not supported (choose static, dynamic)"),
    ("executorch", "int8", "static", {"attention": "int8"}, {}, "attention is not supported: XNNPACK runs batch matmul in fp32 only"),
    ("tflite", "fp32", "static", {"attention": "int8"}, {}, "attention=int8 applies to --precision int8 only"),
    ("tflite", "int8", "static", {"attention": "int8", "activations": "int16"}, {}, "attention=int8 needs activations=int8"),
    ("onnx", "fp32", "static", {"activations": "uint8"}, {}, "activations=... applies to --precision int8 only"),
    ("onnx", "fp16", "static", {"softmax": "int8"}, {}, "softmax=... applies to --precision int8 only"),
    ("onnx", "int8", "static", {"activations": "int16"}, {}, "activations=int16: choose one of auto, uint8, int8"),
]


@pytest.mark.parametrize(("target", "precision", "scheme", "options", "edges", "message"), REFUSALS)
def test_options_a_target_cannot_honour_are_refused(target, precision, scheme, options, edges, message, tmp_path: Path) -> None:
    model = SegFormer(SegFormerConfig(**TINY, num_classes=8)).eval()
    quant = QuantSpec(scheme=scheme)
    with pytest.raises(ExportError, match=message.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")) as info:
        plan_export(model, target, ExportOptions(size=SIZE, precision=precision, target_options=options, **edges), tmp_path, quant,
                    check_calibration=False)  # fmt: skip
    assert "\n" not in str(info.value) and str(info.value).startswith(target)


def test_scheme_checks_in_the_spec_and_the_cli(trained, tmp_path: Path, capsys) -> None:
    with pytest.raises(ExportError, match="--method mse applies to --scheme static"):
        QuantSpec(scheme="dynamic", method="mse")
    with pytest.raises(ExportError, match="--target-option weights=int8 applies to --precision int8 --scheme weight_only"):
        get_target("coreml").plan(ExportOptions(size=SIZE, target_options={"weights": "int8"}), None)
    _, ckpt = trained
    out = tmp_path / "out"
    out.mkdir()
    before = folder_snapshot(out)
    for args, message in (
        (["--target", "executorch", "--scheme", "dynamic"], "--scheme apply to --precision int8"),
        (["--target", "tflite", "--precision", "int8", "-O", "activations=int16", "--method", "mse"], "activations=int16 calibrates"),
        (["--target", "all", "--precision", "int8", "--scheme", "weight_only"], "scheme weight_only is not supported"),
    ):
        code, _, err = run_cli(["export", ckpt, "--size", "64", "64", "--out", out, *args], capsys)
        assert code == 2 and message in " ".join(err.split()), err
    assert folder_snapshot(out) == before  # refused before any work


def test_static_and_dynamic_artifacts_do_not_share_a_folder(trained, tmp_path: Path) -> None:
    model, _ = trained
    options = ExportOptions(size=SIZE, precision="int8")
    static = plan_export(model, "executorch", options, tmp_path, QuantSpec(), check_calibration=False)
    dynamic = plan_export(model, "executorch", options, tmp_path, QuantSpec(scheme="dynamic"), check_calibration=False)
    assert static.folder.name == "segformer-custom_executorch_int8"
    assert dynamic.folder.name == "segformer-custom_executorch_int8_dynamic" and dynamic.quant.method == "minmax"
    palettized = plan_export(model, "coreml", ExportOptions(size=SIZE, precision="int8", target_options={"weights": "palettize4"}),
                             tmp_path, QuantSpec(scheme="weight_only"), check_calibration=False)  # fmt: skip
    assert palettized.folder.name == "segformer-custom_coreml_int8_weight-only_weights-palettize4"
    # A manifest lists only the options that shaped its artifact (verify --layers re-plans from them).
    for target in ("tflite", "onnx", "coreml"):
        assert plan_export(model, target, ExportOptions(size=SIZE), tmp_path, None).target_options == {}, target
    assert plan_export(model, "coreml", options, tmp_path, QuantSpec(), check_calibration=False).target_options == {}


def test_tflite_float_edges_leave_a_byte_input_and_a_mask_output_alone(trained, calib: CalibrationSet, tmp_path: Path) -> None:
    """io=float (the default) wraps only quantized edges: a --input uint8 image and --output mask labels stay as they are."""
    from ai_edge_litert.interpreter import Interpreter

    model, ckpt = trained
    options = ExportOptions(size=SIZE, precision="int8", input_kind="uint8", output="mask")
    artifact, report = export_artifact(model, "tflite", options, tmp_path, checkpoint=ckpt,
                                       quant=QuantSpec(outliers="none", calibration=calib), verify_images=4)  # fmt: skip
    interpreter = Interpreter(model_path=str(artifact.file))
    assert [np.dtype(d["dtype"]).name for d in interpreter.get_input_details()] == ["uint8"]
    assert interpreter.get_input_details()[0]["quantization"] == (0.0, 0)  # raw bytes, not a quantized tensor
    assert artifact.manifest["io"] == {"inputs": ["uint8"], "outputs": ["int32"]}
    assert report["passed"] and report["pixel_agreement"] >= 0.98


def test_cli_weight_only_export_needs_no_calibration_images(tmp_path: Path, capsys) -> None:
    """A model with classes of its own: static int8 needs --data, weight-only int8 does not (nothing to calibrate)."""
    import json

    torch.manual_seed(0)
    ckpt = save_checkpoint(SegFormer(SegFormerConfig(**TINY, num_classes=5)).eval(), tmp_path / "own.safetensors")
    common = ["export", ckpt, "--target", "coreml", "--precision", "int8", "--size", "64", "64", "--out", tmp_path / "out"]
    code, _, err = run_cli(common, capsys)
    assert code == 2 and "needs calibration images" in " ".join(err.split())
    code, stdout, err = run_cli([*common, "--scheme", "weight_only", "-O", "weights=palettize6", "--no-verify", "--json"], capsys)
    assert code == 0, err
    (row,) = json.loads(stdout)
    assert row["artifact"].endswith("segformer-custom_coreml_int8_weight-only_weights-palettize6")
    manifest = json.loads((Path(row["artifact"]) / "manifest.json").read_text())
    q = manifest["quantization"]
    assert q["scheme"] == "weight_only" and q["calibration"] is None and q["applied"]["nbits"] == 6
    assert set(manifest["coreml"]["weight_storage"]) == {"palettized_6bit", "float32"}
