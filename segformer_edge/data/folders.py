"""Datasets on disk: ADE20K, Cityscapes, a generic ``images/`` + ``masks/`` layout, and plain images.

A labelled source is a list of :class:`Sample` (image path, mask path) plus a :class:`LabelSpace`. A plain
folder of images (or a glob) is a list of samples without masks and without a label space. Reading a
sample checks it: an unreadable file, an image and mask of different sizes, or a label outside the
class range is a :class:`~segformer_edge.errors.DataError` that names the file.
"""

from __future__ import annotations

import glob
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..palettes import ADE20K_CLASSES, ADE20K_PALETTE, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, palette_for

__all__ = [
    "IGNORE_INDEX",
    "LabelSpace",
    "Sample",
    "detect_layout",
    "find_images",
    "find_samples",
    "glob_images",
    "missing_masks",
    "read_image",
    "read_mask",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")



@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path | None


@dataclass
class LabelSpace:
    """Class names, display palette, and how stored labels map to training labels."""

    classes: list[str]
    palette: list[tuple[int, int, int]]
    reduce_zero_label: bool = False  # ADE20K: stored 0 ("other") -> ignore, k -> k - 1

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def read_image(path: Path) -> np.ndarray:
    """An 8-bit RGB image as (H, W, 3) uint8. Grey, palette and RGBA images are converted (alpha dropped)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F") or (im.mode.startswith("I;16")):
                raise DataError(f"{path}: {im.mode} image with more than 8 bits per channel; convert it to 8-bit RGB")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                alpha = np.asarray(im.convert("RGBA"))[..., 3]
                if (alpha < 255).any():
                    raise DataError(f"{path}: image has transparent pixels; flatten it onto a background and save it as RGB")
            if im.mode != "RGB":
                im = im.convert("RGB")  # grey and palette images are valid RGB after conversion
            return np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from exc


def read_mask(path: Path, labels: LabelSpace, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A label mask as (H, W) uint8 of training labels (ignore = 255), checked against the label space."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P", "I;16", "I"):
                raise DataError(f"{path}: mask has mode {im.mode}; expected one label per pixel (8-bit grey or palette PNG)")
            mask = np.asarray(im).astype(np.int64)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable mask ({exc.__class__.__name__}: {exc})") from exc
    if shape is not None and mask.shape != shape:
        raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {shape[1]}x{shape[0]}")
    if labels.reduce_zero_label:
        # As mmseg: stored 0 ("other") -> ignore, k -> k - 1, and a stored 255 stays ignore.
        mask[mask == 0] = IGNORE_INDEX + 1
        mask -= 1
        mask[mask == IGNORE_INDEX - 1] = IGNORE_INDEX
    bad = (mask >= labels.num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        raise DataError(
            f"{path}: label {int(mask[bad].max())} is out of range for {labels.num_classes} classes "
            f"(valid: 0..{labels.num_classes - 1}, {IGNORE_INDEX} = ignore)"
        )
    return mask.astype(np.uint8)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _pair(images: list[Path], image_root: Path, mask_root: Path, mask_name: callable) -> list[Sample]:  # type: ignore[valid-type]
    samples = []
    for image in images:
        mask = mask_root / image.relative_to(image_root).parent / mask_name(image)
        if not mask.is_file():
            raise DataError(f"{image}: no mask for this image (expected {mask})")
        samples.append(Sample(image, mask))
    return samples


def detect_layout(root: Path) -> str | None:
    """``ade20k``, ``cityscapes`` or ``generic`` when ``root`` holds that labelled layout, else None.

    A layout counts only with its mask folder (``annotations/``, ``gtFine/``, ``masks/``; for generic, a
    ``classes.json`` also declares it): a folder of images whose masks are absent is plain images.
    """
    if ((root / "images" / "training").is_dir() or (root / "images" / "validation").is_dir()) and (
        root / "annotations"
    ).is_dir():
        return "ade20k"
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return "cityscapes"
    if (root / "images").is_dir() and ((root / "masks").is_dir() or (root / "classes.json").is_file()):
        return "generic"
    return None


def missing_masks(root: Path) -> str | None:
    """What is missing when ``root`` looks like a labelled layout without its masks (for a warning), else None."""
    if (root / "images" / "training").is_dir() or (root / "images" / "validation").is_dir():
        return "ADE20K images/ without annotations/"
    if (root / "leftImg8bit").is_dir():
        return "Cityscapes leftImg8bit/ without gtFine/"
    return None


def find_samples(root: Path, split: str) -> tuple[list[Sample], LabelSpace, str]:
    """Find the image/mask pairs of ``split`` (``train`` or ``val``) under ``root``; detect the layout.

    Returns (samples, label space, layout name). A folder without a labelled layout is an error here:
    :func:`find_images` reads it as plain images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such data folder")
    _check_split(split)
    layout = detect_layout(root)
    if layout == "ade20k":
        sub = {"train": "training", "val": "validation"}[split]
        image_root, mask_root = root / "images" / sub, root / "annotations" / sub
        images = _images_in(image_root)
        samples = _pair(images, image_root, mask_root, lambda p: p.stem + ".png")
        labels = _read_classes(root) or LabelSpace(list(ADE20K_CLASSES), list(ADE20K_PALETTE))
        labels.reduce_zero_label = True
    elif layout == "cityscapes":
        image_root, mask_root = root / "leftImg8bit" / split, root / "gtFine" / split
        images = sorted(p for p in image_root.rglob("*_leftImg8bit.png"))
        samples = _pair(images, image_root, mask_root, lambda p: p.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png"))
        labels = LabelSpace(list(CITYSCAPES_CLASSES), list(CITYSCAPES_PALETTE))
    elif layout == "generic":
        image_root = root / "images" / split if (root / "images" / split).is_dir() else root / "images"
        mask_root = root / "masks" / image_root.relative_to(root / "images")
        images = _images_in(image_root)
        samples = _pair(images, image_root, mask_root, lambda p: p.stem + ".png")
        classes = _read_classes(root)
        if classes is None:
            raise DataError(f"{root}: generic layout without classes.json; add one with \"classes\" (and \"palette\")")
        labels = classes
    else:
        raise DataError(
            f"{root}: unknown data layout; expected ADE20K (images/training, annotations/training), "
            "Cityscapes (leftImg8bit, gtFine) or generic (images/, masks/, classes.json)"
        )
    if not samples:
        raise DataError(f"{image_root}: no images found for split {split!r}")
    return samples, labels, layout


def find_images(root: Path) -> list[Sample]:
    """Every image under ``root`` (recursively, sorted; hidden files and folders skipped), without masks.

    Raises:
        DataError: ``root`` is not a folder, or holds no image (``.jpg``, ``.png``, ...).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such data folder")
    images = [p for p in _images_in(root) if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    if not images:
        raise DataError(
            f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} in it and its subfolders) "
            "and no ADE20K, Cityscapes or images/+masks/ layout"
        )
    return [Sample(p, None) for p in images]


def glob_images(pattern: str) -> list[Sample]:
    """The image files a glob pattern matches (``photos/*.jpg``, ``shots/**/*.png``), sorted, without masks.

    Raises:
        DataError: the pattern matches no image file.
    """
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    images = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        found = f"{len(matches)} matches, none an image ({', '.join(IMAGE_SUFFIXES)})" if matches else "no matches"
        raise DataError(f"{pattern}: the pattern matches no image files ({found})")
    if len(images) < len(matches):
        logger.info("%s: skipped %d matches that are not image files", pattern, len(matches) - len(images))
    return [Sample(p, None) for p in images]


def _check_split(split: str) -> None:
    if split not in ("train", "val"):
        raise DataError(f"unknown split {split!r}; choose train or val")


def _read_classes(root: Path) -> LabelSpace | None:
    path = root / "classes.json"
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text())
        classes = [str(c) for c in spec["classes"]]
        palette = [tuple(int(v) for v in c) for c in spec.get("palette") or palette_for(classes)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a valid classes file ({exc}); expected {{\"classes\": [...], \"palette\": [...]}}") from exc
    if len(palette) != len(classes):
        raise DataError(f"{path}: {len(classes)} classes but {len(palette)} palette colours")
    return LabelSpace(classes, palette)  # type: ignore[arg-type]
