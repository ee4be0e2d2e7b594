"""Datasets on disk: ADE20K, Cityscapes, a generic ``images/`` + ``masks/`` layout, and plain images.

A labelled source is a list of :class:`Sample` (image path, mask path) plus a :class:`LabelSpace`. A plain
folder of images (or a glob) is a list of samples without masks and without a label space.

Images are read as a viewer shows them (:func:`open_photo`: EXIF orientation applied; 16-bit, CMYK, palette
and grey converted to RGB; transparency flattened onto mid-grey, with a note). A labelled sample is checked
as it is read: an unreadable image or mask, an image and mask of different sizes, or a label outside the
class range is a :class:`~segformer_edge.errors.DataError` that names the file (a lost mask is lost data).
A plain photo folder is checked once as it is opened (:func:`check_photos`): a file that does not read is
skipped with one warning naming it, and is an error only under ``strict`` or when no file reads.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError
from ..palettes import ADE20K_CLASSES, ADE20K_PALETTE, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, palette_for

__all__ = [
    "IGNORE_INDEX",
    "TRANSPARENT_BACKGROUND",
    "LabelSpace",
    "Photo",
    "PhotoCheck",
    "Sample",
    "check_image",
    "check_photos",
    "detect_layout",
    "find_images",
    "find_samples",
    "glob_images",
    "missing_masks",
    "open_photo",
    "read_image",
    "read_mask",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
TRANSPARENT_BACKGROUND = (128, 128, 128)  # what transparent pixels are flattened onto: mid-grey
CHECK_THREADS = min(8, os.cpu_count() or 1)  # threads that check a photo folder as it opens


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
    """The photo at ``path`` as shown: (H, W, 3) uint8 RGB; see :func:`open_photo` for what is converted."""
    return open_photo(path).pixels


@dataclass(frozen=True)
class Photo:
    """An image as a viewer shows it, and what was converted to get there.

    Attributes:
        pixels: (H, W, 3) uint8 RGB, turned as its EXIF orientation says.
        notes: What changed the pixels beyond rotation, one phrase each ("16-bit grey scaled to 8 bits",
            "12.5% transparent pixels flattened onto grey (128, 128, 128)"); empty for a plain 8-bit RGB photo.
    """

    pixels: np.ndarray
    notes: tuple[str, ...] = ()


def open_photo(path: Path) -> Photo:
    """Read an image file the way a photo viewer shows it.

    - EXIF orientation is applied (a phone's portrait JPEG stored 4000x3000 with orientation 6 comes back
      3000 wide and 4000 high), so masks and overlays line up with the photo the user sees.
    - 16-bit grey (``I;16``, ``I``) is scaled to 8 bits (value * 255 / 65535), 32-bit float (``F``) taken as
      0..1 where its maximum is at most 1, else as 0..255; CMYK, palette, grey, YCbCr and LAB become RGB.
    - Transparent pixels (an alpha channel, or a palette / grey / RGB PNG's transparency entry) are flattened
      onto :data:`TRANSPARENT_BACKGROUND`, mid-grey, which the ImageNet normalisation maps close to zero: the
      network sees as little as possible there. A note says how many pixels that touched.

    Raises:
        DataError: the file is not a readable image (not an image, truncated, damaged); the message names it.
    """
    notes: list[str] = []
    try:
        with Image.open(path) as im:
            im.load()  # the whole file is decoded here: a truncated JPEG fails now, not half-way into a batch
            ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of a photo that needs no turn
            mode = im.mode
            if mode in _DEEP_GREY:
                values = np.asarray(im).astype(np.float64)
                if mode == "F":
                    scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0
                    notes.append(f"32-bit float grey taken as 0..{'1' if scale > 1 else '255'}")
                else:
                    scale = 255.0 / 65535.0
                    notes.append("16-bit grey scaled to 8 bits" if mode.startswith("I;16")
                                 else "32-bit integer grey read as 16-bit and scaled to 8 bits")  # fmt: skip
                grey = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)  # (H, W)
                return Photo(np.repeat(grey[..., None], 3, axis=2), tuple(notes))
            if mode in _ALPHA_MODES or "transparency" in im.info:
                rgba = np.asarray(im.convert("RGBA"))  # (H, W, 4)
                alpha = rgba[..., 3:].astype(np.float32) / 255.0  # (H, W, 1)
                clear = int((rgba[..., 3] < 255).sum())
                if clear:
                    background = np.asarray(TRANSPARENT_BACKGROUND, np.float32)
                    flat = rgba[..., :3].astype(np.float32) * alpha + background * (1.0 - alpha)
                    share = 100.0 * clear / rgba[..., 3].size
                    notes.append(f"{share:.3g}% transparent pixels flattened onto grey {TRANSPARENT_BACKGROUND}")
                    return Photo(flat.round().astype(np.uint8), tuple(notes))
                return Photo(np.ascontiguousarray(rgba[..., :3]), tuple(notes))
            if mode == "CMYK":
                notes.append("CMYK converted to RGB")
            if mode != "RGB":
                im = im.convert("RGB")
            return Photo(np.asarray(im, dtype=np.uint8).copy(), tuple(notes))
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: BaseException) -> DataError:
    """The one-line error for an image file that does not read; it names the file once."""
    if isinstance(exc, UnidentifiedImageError):
        return DataError(f"{path}: not a readable image (not an image format Pillow reads)")
    detail = str(exc).replace(f"'{path}'", "").replace(str(path), "").strip(" :") or "damaged"
    return DataError(f"{path}: not a readable image ({exc.__class__.__name__}: {detail})")


def check_image(path: Path) -> tuple[str, ...]:
    """Decode ``path`` once to prove it readable, as cheaply as that can be done; return :func:`open_photo`'s notes.

    A JPEG is decoded at 1/8 scale (libjpeg's DCT scaling still reads every byte of the entropy-coded data, so a
    truncated file fails just as a full decode fails); other formats are decoded whole.

    Raises:
        DataError: as :func:`open_photo`.
    """
    try:
        with Image.open(path) as im:
            if im.format in ("JPEG", "MPO"):  # MPO: the multi-picture JPEG of many phones
                mode = im.mode
                im.draft(mode if mode in ("RGB", "L") else None, (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
                return ("CMYK converted to RGB",) if mode == "CMYK" else ()
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from exc
    return open_photo(path).notes


@dataclass(frozen=True)
class PhotoCheck:
    """What checking a list of photos found: the readable ones, the skipped ones and the conversions."""

    samples: list[Sample]
    skipped: list[dict[str, str]]  # {"file": path, "reason": why}, in path order
    notes: dict[str, list[str]]  # path -> what was converted (only photos with a note)


def check_photos(samples: list[Sample], spec: str, *, strict: bool = False) -> PhotoCheck:
    """Keep the samples whose image file reads; skip the rest with one warning each.

    Every file is decoded once (:func:`check_image`, on :data:`CHECK_THREADS` threads), so that ``len()`` of the
    source counts only photos that load, and the result is kept for the life of the process (keyed by path, size and modification time): the
    calibration pass and the verify pass of one export read the folder's verdicts without decoding it again,
    and a skipped file is named once, not once per pass.

    Raises:
        DataError: ``strict`` and a file does not read (the first, in path order); or no file reads.
    """
    from concurrent.futures import ThreadPoolExecutor

    good: list[Sample] = []
    skipped: list[dict[str, str]] = []
    notes: dict[str, list[str]] = {}
    with ThreadPoolExecutor(max_workers=CHECK_THREADS) as pool:  # Pillow decodes without the GIL
        verdicts = list(pool.map(_checked, [sample.image for sample in samples]))
    for sample, (error, found) in zip(samples, verdicts, strict=True):
        if error is not None:
            if strict:
                raise DataError(error)
            key = str(sample.image)
            skipped.append({"file": key, "reason": error.removeprefix(f"{key}: ")})
            continue
        good.append(sample)
        if found:
            notes[str(sample.image)] = list(found)
    if not good:  # the error says it all: no warnings before it
        first = skipped[0]["file"] + ": " + skipped[0]["reason"] if skipped else "no files"
        raise DataError(f"{spec}: none of its {len(samples)} image files is readable (first: {first})")
    for item in skipped:
        if item["file"] not in _WARNED:
            _WARNED.add(item["file"])
            logger.warning("%s: %s; skipped it (--strict stops instead)", item["file"], item["reason"])
    return PhotoCheck(good, skipped, notes)


def _checked(path: Path) -> tuple[str | None, tuple[str, ...]]:
    """(error message or None, notes) for ``path``, decoded once per version of the file."""
    try:
        stat = path.stat()
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror})", ()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKED:
        try:
            _CHECKED[key] = (None, check_image(path))
        except DataError as exc:
            _CHECKED[key] = (str(exc), ())
    return _CHECKED[key]


_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_CHECKED: dict[tuple[str, int, int], tuple[str | None, tuple[str, ...]]] = {}
_WARNED: set[str] = set()
_DEEP_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


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
