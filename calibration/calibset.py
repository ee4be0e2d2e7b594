"""Calibration sets: N training images chosen to cover the classes, hashed, saved as a folder.

The images are picked greedily from a seeded candidate pool so that every class appears in as many images
as the set allows (class coverage is recorded), never the single example input. Where the data has no
masks (a folder of photos), the float model's own predictions stand in for them: coverage is then over the
classes the model predicts, and sensitivity measures the drop against those predictions. The folder holds
``images.npy`` (N, H, W, 3) uint8 at the export size, ``masks.npy`` and ``calibration.json`` (data, seed,
method, the checkpoint's sha256, the set's sha256, indices, coverage, the photos of the folder skipped
because they do not read, and what was converted in the chosen ones). The sha256 covers everything that
defines the set (images, masks, checkpoint, data, seed, indices, method, skipped photos); ``export
--precision int8 --calibration DIR`` checks all of them and refuses a set made for another checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segformer_edge.errors import DataError

# How activation ranges are calibrated; "auto" is each target's own choice (QuantSpec validates against these).
METHODS = ("auto", "minmax", "moving_average", "percentile", "mse")

__all__ = ["CALIBRATION_FORMAT", "METHODS", "CalibrationSet", "select_calibration_set"]

logger = logging.getLogger(__name__)

CALIBRATION_FORMAT = "segformer-edge-calibration/1"


@dataclass
class CalibrationSet:
    """Calibration images at the export size, with where they came from."""

    images: np.ndarray  # (N, H, W, 3) uint8
    data: str
    seed: int
    method: str = "mse"
    indices: list[int] = field(default_factory=list)
    coverage: dict[str, int] = field(default_factory=dict)
    checkpoint_sha256: str | None = None
    masks: np.ndarray | None = None  # (N, H, W) uint8 labels (the float model's, where the data has none)
    masks_from: str = "labels"  # "labels" (the dataset's masks) or "float model" (its predictions)
    skipped: list[dict[str, str]] = field(default_factory=list)  # photos of ``data`` that do not read: file, reason
    converted: dict[str, list[str]] = field(default_factory=dict)  # chosen photos that were converted: file -> notes
    folder: Path | None = field(default=None, compare=False, repr=False)  # where it was saved or loaded from, if anywhere
    # What `calibrate --sensitivity` measured on the set (a SensitivityReport): not part of the set's identity (not
    # hashed), saved apart as sensitivity.json/.md/.png.
    sensitivity: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DataError(f"--method {self.method}: choose one of {', '.join(METHODS)}")
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise DataError(f"calibration images must be (N, H, W, 3) uint8, got {self.images.shape} {self.images.dtype}")
        if len(self.images) == 0:
            raise DataError(f"{self.data}: zero calibration images; calibrate on at least one image")

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def sha256(self) -> str:
        """Hash of everything that defines the set: images, masks, checkpoint, data, seed, indices, method."""
        defining = {"data": self.data, "seed": self.seed, "method": self.method, "indices": self.indices,
                    "checkpoint_sha256": self.checkpoint_sha256, "masks_from": self.masks_from}  # fmt: skip
        if self.skipped:  # which photos were candidates (absent when none was skipped: older sets keep their hash)
            defining["skipped"] = [item["file"] for item in self.skipped]
        digest = hashlib.sha256(json.dumps(defining, sort_keys=True).encode())
        for array in (self.images, self.masks):
            if array is not None:
                digest.update(f"{array.shape}{array.dtype}".encode())
                digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def info(self) -> dict[str, Any]:
        return {
            "format": CALIBRATION_FORMAT, "data": self.data, "seed": self.seed, "method": self.method,
            "images": len(self.images), "size": list(self.size), "indices": self.indices, "coverage": self.coverage,
            "masks_from": self.masks_from, "sha256": self.sha256, "checkpoint_sha256": self.checkpoint_sha256,
            "skipped": self.skipped, "converted": self.converted,
        }  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """What calibration.json records, with the sensitivity ranking where one was measured."""
        return {**self.info(), **({"sensitivity": self.sensitivity.to_dict()} if self.sensitivity is not None else {})}

    def reference(self) -> dict[str, Any]:
        """What a manifest records of the set: where it came from and its hash, not its images."""
        covered = sum(1 for v in self.coverage.values() if v > 0)
        return {"sha256": self.sha256, "data": self.data, "images": len(self.images), "size": list(self.size),
                "seed": self.seed, "method": self.method,
                "masks_from": self.masks_from, "classes_covered": covered, "classes": len(self.coverage),
                "checkpoint_sha256": self.checkpoint_sha256, "skipped": self.skipped, "converted": self.converted}  # fmt: skip

    def save(self, folder: str | Path) -> Path:
        from segformer_edge.io import atomic_path, atomic_write_bytes

        folder = Path(folder)
        with atomic_path(folder, directory=True) as tmp:
            buffer = io.BytesIO()
            np.save(buffer, self.images, allow_pickle=False)
            atomic_write_bytes(tmp / "images.npy", buffer.getvalue())
            if self.masks is not None:
                buffer = io.BytesIO()
                np.save(buffer, self.masks, allow_pickle=False)
                atomic_write_bytes(tmp / "masks.npy", buffer.getvalue())
            atomic_write_bytes(tmp / "calibration.json", (json.dumps(self.info(), indent=2) + "\n").encode())
        self.folder = folder
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> CalibrationSet:
        folder = Path(folder)
        meta_path, images_path = folder / "calibration.json", folder / "images.npy"
        if not meta_path.is_file() or not images_path.is_file():
            raise DataError(f"{folder}: not a calibration folder (calibration.json and images.npy); run segformer-edge calibrate")
        try:
            meta = json.loads(meta_path.read_text())
            images = np.load(images_path, allow_pickle=False)
            masks = np.load(folder / "masks.npy", allow_pickle=False) if (folder / "masks.npy").is_file() else None
        except (OSError, ValueError) as exc:
            raise DataError(f"{folder}: damaged calibration folder ({exc})") from exc
        if meta.get("format") != CALIBRATION_FORMAT:
            raise DataError(f"{meta_path}: not a segformer-edge calibration file")
        try:
            calib = cls(images, meta["data"], int(meta["seed"]), meta["method"], list(meta["indices"]), dict(meta["coverage"]),
                        meta.get("checkpoint_sha256"), masks, meta.get("masks_from", "labels"),
                        [dict(item) for item in meta.get("skipped", [])], dict(meta.get("converted", {})), folder)  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{meta_path}: damaged calibration file ({exc}); recalibrate") from exc
        if calib.sha256 != meta["sha256"]:
            raise DataError(f"{folder}: the images, masks or recorded fields do not match the recorded sha256; recalibrate")
        return calib

    def check_for(self, checkpoint_sha256: str | None, size: tuple[int, int], source: str | Path) -> None:
        """Refuse a set made for another checkpoint (or for no recorded checkpoint) or another input size."""
        if checkpoint_sha256 and not self.checkpoint_sha256:
            raise DataError(f"{source}: this calibration set records no checkpoint; recalibrate with segformer-edge calibrate")
        if self.checkpoint_sha256 and checkpoint_sha256 and self.checkpoint_sha256 != checkpoint_sha256:
            raise DataError(
                f"{source}: this calibration set was made for another checkpoint (sha256 "
                f"{self.checkpoint_sha256[:12]}...); recalibrate with segformer-edge calibrate for this one"
            )
        if tuple(size) != self.size:
            raise DataError(f"{source}: calibration images are {self.size[0]}x{self.size[1]} but the export is {size[0]}x{size[1]}")


def select_calibration_set(
    data: str,
    num_images: int,
    size: tuple[int, int],
    num_classes: int,
    *,
    seed: int = 0,
    method: str = "mse",
    checkpoint_sha256: str | None = None,
    class_names: list[str] | None = None,
    labeler: Callable[[np.ndarray], np.ndarray] | None = None,
) -> CalibrationSet:
    """Pick ``num_images`` training images spread across the classes, resized to ``size``.

    ``labeler`` maps (H, W, 3) uint8 images to (H, W) labels: the float model, for data without masks (a
    folder of photos). Data with masks must have the model's class count.
    """
    from segformer_edge.data import open_source
    from segformer_edge.inputs import resize_pair

    if num_images < 1:
        raise DataError(f"--num-images {num_images}: zero calibration images; use at least 1")
    source = open_source(data, "train")
    has_masks = source.has_masks
    if has_masks and source.labels.num_classes != num_classes:
        raise DataError(f"{data}: the data has {source.labels.num_classes} classes but the model has {num_classes}")
    if not has_masks and labeler is None:
        raise DataError(f"{data}: these images have no masks; calibrating on them needs the float model's predictions")
    rng = np.random.default_rng(seed)
    pool = rng.permutation(len(source))[: max(num_images, min(len(source), 4 * num_images))]
    images, masks, present = {}, {}, {}
    for index in pool:
        image, mask = source.load(int(index))
        image, mask = resize_pair(image, mask, size)
        if mask is None:
            mask = labeler(image).astype(np.uint8)  # type: ignore[misc]
        images[int(index)] = image
        masks[int(index)] = mask
        labels = np.unique(mask)
        present[int(index)] = {int(v) for v in labels if v < num_classes}
    counts = np.zeros(num_classes)
    chosen: list[int] = []
    for _ in range(min(num_images, len(pool))):
        # Score: how much each candidate adds to the classes seen least so far (ties: pool order).
        best = max((i for i in present if i not in chosen), key=lambda i: sum(1.0 / (1.0 + counts[c]) for c in present[i]))
        chosen.append(best)
        for c in present[best]:
            counts[c] += 1
    names = class_names or (source.labels.classes if source.labels is not None else [f"class_{c}" for c in range(num_classes)])
    coverage = {names[c]: int(counts[c]) for c in range(num_classes)}
    covered = sum(1 for k in coverage.values() if k)
    if covered < num_classes:
        logger.info("calibration set covers %d of %d classes", covered, num_classes)
    stack = np.stack([images[i] for i in chosen])  # (N, H, W, 3)
    labels = np.stack([masks[i] for i in chosen])  # (N, H, W)
    files = {str(source.samples[i].image) for i in chosen} if source.samples else set()
    converted = {file: notes for file, notes in source.notes.items() if file in files}
    return CalibrationSet(stack, data, seed, method, chosen, coverage, checkpoint_sha256, labels,
                          "labels" if has_masks else "float model", list(source.skipped), converted)  # fmt: skip
