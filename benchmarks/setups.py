"""What several benchmarks set up alike, so that their figures are of the same models and calibration sets.

- :func:`user_config`: the user's configuration of user_config.py, onnx_int8.py and attention.py: a transformers
  SegformerForSemanticSegmentation b0 with 150 classes saved here with ``save_pretrained`` (seeded random weights:
  nothing can be downloaded), crops of real photos, and the calibration set made from them (the float model's
  predictions as labels).
- :func:`reference_and_stressed`: int8.py's and attention.py's two models: the built-in reference model and its
  outlier-stressed copy, with the calibration set of 32 training images.
- :func:`stressed_variant`: outlier_decision.py's larger models: a seeded random-init variant (b0, b2, ...) with 150
  classes, made outlier-stressed the same way, its checkpoint and a saved calibration folder of photo crops.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FACTORS = (120.0, 60.0, 30.0)  # the stressed copy's outliers, on three channels of every LayerNorm site


def user_config(work: Path, size: tuple[int, int], calibration_images: int = 8) -> tuple[Path, Any, Any]:
    """(checkpoint folder, model, calibration set) of the user's configuration, made in ``work``."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import make_photo_folder, save_hf_model
    from segformer_edge.calibration.calibset import select_calibration_set
    from segformer_edge.converters.reference import checkpoint_digest, float_labeler

    from segformer_edge.weights import load_pretrained

    checkpoint = save_hf_model(work / "b0-150", num_labels=150, tiny=False)
    photos = make_photo_folder(work / "photos", n=calibration_images)
    model = load_pretrained(checkpoint)
    calib = select_calibration_set(str(photos), calibration_images, size, model.config.num_classes,
                                   checkpoint_sha256=checkpoint_digest(checkpoint), labeler=float_labeler(model, size))  # fmt: skip
    return checkpoint, model, calib


def reference_and_stressed(out: Path) -> tuple[dict[str, tuple[Any, Path]], tuple[int, int], Any]:
    """{"reference": (model, checkpoint), "outlier-stressed": (model, checkpoint)}, their input size and the
    calibration set; the stressed copy's checkpoint is saved in ``out``."""
    from segformer_edge.calibration.calibset import select_calibration_set
    from segformer_edge.calibration.outliers import inject_outliers
    from segformer_edge.converters.reference import checkpoint_digest

    from segformer_edge import save_checkpoint
    from segformer_edge.weights import builtin_checkpoint, load_pretrained

    ckpt = builtin_checkpoint()
    reference = load_pretrained(ckpt)
    size = tuple(reference.meta.input_size)
    calib = select_calibration_set("synthetic", 32, size, reference.config.num_classes, checkpoint_sha256=checkpoint_digest(ckpt))
    stressed = inject_outliers(reference, FACTORS)
    out.mkdir(parents=True, exist_ok=True)
    models = {"reference": (reference, ckpt), "outlier-stressed": (stressed, save_checkpoint(stressed, out / "stressed.safetensors"))}
    return models, (int(size[0]), int(size[1])), calib


def add_user_config_options(parser: argparse.ArgumentParser, render_help: str) -> None:
    """The options of every benchmark at the user's configuration: its size, the timing and the work folder."""
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--calibration-images", type=int, default=8)
    parser.add_argument("--work", default="exports/user-config-bench")
    parser.add_argument("--render", action="store_true", help=render_help)


def measure_or_render(args: argparse.Namespace, measure: Callable[[argparse.Namespace], dict[str, Any]],
                      render: Callable[[dict[str, Any]], None], json_path: Path) -> None:  # fmt: skip
    """Measure into ``json_path`` (unless ``--render``), then write the Markdown from that JSON alone."""
    if not args.render:
        json_path.write_text(json.dumps(measure(args), indent=2, default=str) + "\n")
    render(json.loads(json_path.read_text()))


def stressed_variant(work: Path, variant: str, size: tuple[int, int], num_classes: int = 150,
                     calibration_images: int = 16) -> tuple[Path, Path]:  # fmt: skip
    """(checkpoint, calibration folder) of a seeded random-init ``variant`` with ``num_classes`` classes and outliers
    x30..x120 on three channels of every LayerNorm site, calibrated on crops of real photos (the float model's
    predictions as labels). Made once in ``work``; reused where both are there."""
    checkpoint, folder = work / f"{variant}-stressed.safetensors", work / f"calibration-{size[0]}x{size[1]}"
    if checkpoint.is_file() and (folder / "calibration.json").is_file():
        return checkpoint, folder
    import torch

    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import make_photo_folder
    from segformer_edge.calibration.calibset import select_calibration_set
    from segformer_edge.calibration.outliers import inject_outliers
    from segformer_edge.converters.reference import checkpoint_digest, float_labeler

    from segformer_edge import save_checkpoint
    from segformer_edge.model import create_model

    torch.manual_seed(0)
    model = inject_outliers(create_model(variant, num_classes=num_classes).eval(), FACTORS)
    work.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, checkpoint)
    photos = make_photo_folder(work / "photos", n=calibration_images)
    calib = select_calibration_set(str(photos), calibration_images, size, num_classes, checkpoint_sha256=checkpoint_digest(checkpoint),
                                   labeler=float_labeler(model, size))  # fmt: skip
    calib.save(folder)
    return checkpoint, folder
