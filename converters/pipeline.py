"""The flow of one export, and parity verification.

checkpoint -> float model (eval) -> graph edges -> target conversion -> artifact + manifest.json ->
the target's runner -> parity against the float model on the same images.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segformer_edge.errors import CheckpointError, ExportError

from . import get_target
from .base import (
    MANIFEST_FORMAT,
    Artifact,
    ExportOptions,
    conversion_error,
    file_sha256,
    model_manifest,
    prepare_input,
    read_manifest,
    tool_versions,
)

__all__ = ["DEFAULT_THRESHOLDS", "Thresholds", "artifact_name", "export_artifact", "verify_artifact"]

logger = logging.getLogger(__name__)


@dataclass
class Thresholds:
    """Pass criteria of a parity check; ``None`` means not checked."""

    max_abs_diff: float | None = None
    pixel_agreement: float | None = None
    miou_drop: float | None = None  # in mIoU points (percent)


DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(max_abs_diff=1e-3, pixel_agreement=0.999),
    "fp16": Thresholds(pixel_agreement=0.995),
    "int8": Thresholds(pixel_agreement=0.98, miou_drop=1.0),
}

_TOOLS = {
    "executorch": ("executorch",),
    "tflite": ("litert-torch", "ai-edge-litert", "ai-edge-quantizer"),
    "coreml": ("coremltools",),
    "onnx": ("onnx", "onnxruntime", "onnxscript"),
}


def artifact_name(variant: str, target: str, options: ExportOptions) -> str:
    parts = [f"segformer-{variant}", target, options.precision]
    if options.output == "mask":
        parts.append("mask")
    if options.input_kind != "normalized":
        parts.append(options.input_kind)
    if options.layout == "nhwc":
        parts.append("nhwc")
    if options.image_input:
        parts.append("image")
    return "_".join(parts)


def checkpoint_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else file_sha256(path)


def export_artifact(
    model: Any,
    target_name: str,
    options: ExportOptions,
    out_dir: str | Path,
    *,
    checkpoint: Path | None = None,
    verify: bool = True,
    verify_data: str = "synthetic",
    verify_images: int = 4,
    calibration: Any | None = None,
    calibration_images: int = 32,
    calibration_method: str = "mse",
    calibration_data: str = "synthetic",
) -> tuple[Artifact, dict[str, Any] | None]:
    """Convert ``model`` for one target into ``out_dir/<name>/``; optionally verify parity before it lands.

    The folder is built under a temporary name and swapped in only when conversion (and the parity run)
    finished, so a failure leaves any earlier artifact as it was.
    """
    import torch

    from segformer_edge.io import atomic_path

    from .graph import EdgeModule

    target = get_target(target_name)
    if options.precision not in target.precisions:
        raise ExportError(f"{target_name}: precision {options.precision} is not supported (choose {', '.join(target.precisions)})")
    if options.dynamic and not target.dynamic_shapes:
        raise ExportError(f"{target_name}: dynamic H and W are not supported by this target; export at a fixed --size")
    if options.image_input and target_name != "coreml":
        raise ExportError(f"{target_name}: --image-input is a Core ML option")
    model = model.eval()
    float_model = model
    checkpoint_sha = checkpoint_digest(checkpoint) if checkpoint else None
    if options.precision == "int8":
        from segformer_edge.calibration.calibset import select_calibration_set

        from .graph import fold_batch_norm

        if calibration is None:
            calibration = select_calibration_set(
                calibration_data, calibration_images, options.size,
                model.config.num_classes, method=calibration_method, checkpoint_sha256=checkpoint_sha,
            )  # fmt: skip
        calibration.check_for(checkpoint_sha, options.size, "--calibration")
        options.extra["calibration"] = calibration
        options.extra["normalization"] = {"mean": list(model.meta.mean), "std": list(model.meta.std)}
        model = fold_batch_norm(model)  # the quantizers see conv + bias, not conv + BatchNorm
    edge_options = options
    if options.image_input:  # Core ML scales the camera frame by 1/255; the graph normalises 0..1 RGB
        from dataclasses import replace

        edge_options = replace(options, input_kind="rgb01")
    module = EdgeModule(model, edge_options).eval()
    module = target.prepare(module).eval()
    h, w = options.size
    shape = (1, h, w, 3) if options.layout == "nhwc" else (1, 3, h, w)
    example = torch.randint(0, 256, shape, dtype=torch.uint8) if options.input_kind == "uint8" else torch.rand(shape)
    name = artifact_name(model.config.variant, target_name, options)
    folder = Path(out_dir) / name
    manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "target": target_name, "precision": options.precision}
    manifest.update(model_manifest(model, options))
    if options.image_input:
        manifest["input"].update({"kind": "uint8", "dtype": "float32", "image": True})
    elif not target.integer_input:
        manifest["input"]["dtype"] = "float32"
    manifest.update({
        "quantization": None,
        "checkpoint": {"name": checkpoint.name if checkpoint else None, "sha256": checkpoint_sha},
        "tool_versions": tool_versions(*_TOOLS.get(target_name, ())),
    })  # fmt: skip
    started = time.perf_counter()
    with atomic_path(folder, directory=True) as tmp:
        file = tmp / f"model{target.suffix}"
        try:
            with torch.no_grad():
                extra = target.convert(module, example, options, file)
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - every converter failure becomes one clear error
            raise conversion_error(target_name, exc) from exc
        quant = extra.pop("quantization", None)
        manifest.update(extra)
        if options.precision == "int8":
            calib = options.extra["calibration"]
            manifest["quantization"] = {
                **(quant or {}), "method": calib.method, "calibration_sha256": calib.sha256,
                "calibration_images": len(calib.images), "calibration_data": calib.data,
                "class_coverage": calib.coverage, "float_modules": list(options.extra.get("float_modules", [])),
                "batch_norm": "folded into the decoder's fuse conv",
            }  # fmt: skip
        manifest["file"] = file.name
        manifest["sha256"] = file_sha256(file)
        manifest["size_bytes"] = sum(p.stat().st_size for p in file.rglob("*") if p.is_file()) if file.is_dir() else file.stat().st_size
        manifest["export_seconds"] = round(time.perf_counter() - started, 2)
        artifact = Artifact(tmp, file, manifest)
        artifact.write_manifest()
        report = None
        if verify and not target.runs_here():
            manifest["parity"] = {"status": "not run: needs macOS"}
            artifact.write_manifest()
        elif verify:
            report = verify_artifact(tmp, model=float_model, data=verify_data, num_images=verify_images)
            manifest["parity"] = report
            artifact.write_manifest()
    artifact = Artifact(folder, folder / file.name, manifest)
    logger.info("%s: wrote %s", target_name, folder)
    return artifact, report


def _float_logits(model: Any, images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    import torch

    x = (images.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()


def _upsampled_argmax(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch

    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False).argmax(1).numpy()


def verify_artifact(
    path: str | Path,
    *,
    model: Any | None = None,
    checkpoint: str | Path | None = None,
    data: str = "synthetic",
    num_images: int = 8,
    thresholds: Thresholds | None = None,
    runner: Any | None = None,
) -> dict[str, Any]:
    """Run an artifact and the float model on the same images and compare them.

    Returns ``max_abs_diff``, ``cosine``, ``psnr_db`` (logits artifacts), ``pixel_agreement``, ``miou_float``,
    ``miou_artifact``, ``passed`` and what was checked.
    """
    from segformer_edge.data import open_source
    from segformer_edge.data.transforms import resize_pair
    from segformer_edge.evaluate import ConfusionMatrix

    artifact = read_manifest(path)
    manifest = artifact.manifest
    if model is None:
        from segformer_edge.weights import builtin_checkpoint, load_pretrained

        ckpt = Path(checkpoint) if checkpoint is not None else builtin_checkpoint()
        expected = (manifest.get("checkpoint") or {}).get("sha256")
        if expected and checkpoint_digest(ckpt) != expected:
            raise CheckpointError(
                f"{ckpt}: this is not the checkpoint {artifact.folder.name} was exported from "
                f"({manifest['checkpoint'].get('name')}); pass the right --checkpoint"
            )
        model = load_pretrained(ckpt)
    if model.config.num_classes != manifest["num_classes"]:
        raise CheckpointError(f"the model has {model.config.num_classes} classes but {artifact.file.name} has {manifest['num_classes']}")
    source = open_source(data, "val")
    n = min(num_images, len(source))
    if n < 1:
        raise CheckpointError(f"{data}: no validation images to verify on")
    spec = manifest["input"]
    layout = spec["layout"]
    shape = spec["shape"]
    h, w = (shape[1], shape[2]) if layout == "nhwc" else (shape[2], shape[3])
    if not isinstance(h, int):
        h, w = model.meta.input_size
    if runner is None:
        runner = get_target(manifest["target"]).load(artifact)
    k = manifest["num_classes"]
    cm_float, cm_art = ConfusionMatrix(k), ConfusionMatrix(k)
    diffs, dots, norms_a, norms_b, sq_err, peak = [], 0.0, 0.0, 0.0, 0.0, 0.0
    agree, total, elements = 0, 0, 0
    for i in range(n):
        image, mask = source.load(i)
        image, mask = resize_pair(image, mask, (h, w))
        images = image[None]
        ref = _float_logits(model, images, spec["normalization"]["mean"], spec["normalization"]["std"])  # (1, K, h/4, w/4)
        ref_mask = _upsampled_argmax(ref, (h, w))
        out = np.asarray(runner(prepare_input(images, manifest)))
        if manifest["output"]["kind"] == "mask":
            out_mask = out.reshape(ref_mask.shape).astype(np.int64)
        else:
            out = out.astype(np.float32).reshape(ref.shape)
            out_mask = _upsampled_argmax(out, (h, w))
            diffs.append(float(np.abs(out - ref).max()))
            dots += float((out.astype(np.float64) * ref).sum())
            norms_a += float((out.astype(np.float64) ** 2).sum())
            norms_b += float((ref.astype(np.float64) ** 2).sum())
            sq_err += float(((out.astype(np.float64) - ref) ** 2).sum())
            peak = max(peak, float(np.abs(ref).max()))
            elements += ref.size
        agree += int((out_mask == ref_mask).sum())
        total += out_mask.size
        cm_float.update(ref_mask, mask)
        cm_art.update(out_mask, mask)
    report: dict[str, Any] = {
        "target": manifest["target"],
        "precision": manifest["precision"],
        "executor": getattr(runner, "executor", manifest["target"]),
        "images": n,
        "data": data,
        "size": [h, w],
        "max_abs_diff": max(diffs) if diffs else None,
        "cosine": dots / max(np.sqrt(norms_a * norms_b), 1e-30) if diffs else None,
        "psnr_db": 10 * float(np.log10(peak**2 / max(sq_err / elements, 1e-30))) if diffs else None,
        "pixel_agreement": agree / total,
        "miou_float": cm_float.metrics()["miou"],
        "miou_artifact": cm_art.metrics()["miou"],
    }
    report["miou_drop_points"] = 100 * (report["miou_float"] - report["miou_artifact"])
    limits = thresholds or DEFAULT_THRESHOLDS[manifest["precision"]]
    checks = {}
    if limits.max_abs_diff is not None and report["max_abs_diff"] is not None:
        checks["max_abs_diff"] = report["max_abs_diff"] <= limits.max_abs_diff
    if limits.pixel_agreement is not None:
        checks["pixel_agreement"] = report["pixel_agreement"] >= limits.pixel_agreement
    if limits.miou_drop is not None:
        checks["miou_drop"] = report["miou_drop_points"] <= limits.miou_drop
    report["thresholds"] = {k2: v for k2, v in vars(limits).items() if v is not None}
    report["checks"] = checks
    report["passed"] = all(checks.values())
    return report
