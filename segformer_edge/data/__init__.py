"""Datasets: the built-in synthetic scenes, folder layouts (ADE20K, Cityscapes, generic) and plain images.

``open_source(spec, split)`` gives a :class:`Source`: indexable ``(image uint8 HWC, mask uint8 HW | None)``
pairs with their :class:`LabelSpace` (or None). ``spec`` is one of:

- ``synthetic`` or ``synthetic:N``: the built-in scenes;
- a folder with a labelled layout: ADE20K (``images/training`` + ``annotations/``), Cityscapes
  (``leftImg8bit/`` + ``gtFine/``) or generic (``images/`` + ``masks/`` + ``classes.json``);
- a folder of images without masks (directly or in subfolders), a glob pattern such as ``photos/*.jpg``, or
  either of them prefixed with ``images:`` (which also reads a labelled layout's images without their masks).
  This is what users have most often: see :class:`Source` for what such a source does and does not carry.
  Such a source is checked as it opens: a file that does not read is skipped with one warning naming it
  (``Source.skipped`` lists them), and is an error only with ``strict=True`` or when no file reads.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from .folders import (
    IGNORE_INDEX,
    IMAGE_SUFFIXES,
    LabelSpace,
    Sample,
    check_photos,
    detect_layout,
    find_images,
    find_samples,
    glob_images,
    missing_masks,
    read_image,
    read_mask,
)
from .synthetic import CLASSES, PALETTE, SyntheticScenes

__all__ = ["IGNORE_INDEX", "SYNTHETIC_SIZE", "LabelSpace", "Source", "list_photos", "open_source", "synthetic_labels"]

logger = logging.getLogger(__name__)

SYNTHETIC_SIZE: tuple[int, int] = (128, 128)
SYNTHETIC_COUNTS = {"train": 3000, "val": 300}
IMAGES_PREFIX = "images:"
_GLOB_CHARS = re.compile(r"[*?\[]")


def synthetic_labels() -> LabelSpace:
    return LabelSpace(list(CLASSES), [tuple(c) for c in PALETTE])


@dataclass
class Source:
    """The images (and masks) of one split. ``load`` checks every pair it reads.

    Two kinds of source exist; ``has_masks`` tells them apart:

    - **Labelled** (synthetic, ADE20K, Cityscapes, generic): ``has_masks`` is True, ``labels`` is the
      dataset's :class:`LabelSpace`, and ``load(i)`` returns ``(image, mask)``: ``image`` (H, W, 3) uint8
      RGB, ``mask`` (H, W) uint8 training labels with ``IGNORE_INDEX`` (255) for ignored pixels.
    - **Plain images** (a folder without masks, or a glob; ``name`` is ``images:<spec>``): ``has_masks`` is
      False, ``labels`` is None (the images carry no label space: the model's own classes apply), and
      ``load(i)`` returns ``(image, None)``. Both splits hold every image, sorted by path. Callers that
      need a reference take the float model's predictions (DESIGN.md, "The user's data"); code that reads
      ``source.labels.num_classes`` must check ``has_masks`` first. Only photos that read are in it:
      ``skipped`` lists the files left out (``{"file", "reason"}``) and ``notes`` what was converted in the
      others (path -> phrases: 16-bit scaled, transparency flattened, ...).
    """

    name: str
    split: str
    labels: LabelSpace | None
    samples: list[Sample] = field(default_factory=list)
    synthetic: SyntheticScenes | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    _cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict, repr=False)

    @property
    def has_masks(self) -> bool:
        """Whether ``load`` returns masks (and ``labels`` is a label space); False for plain images."""
        return self.labels is not None

    def require_masks(self, purpose: str, hint: str = "") -> LabelSpace:
        """This source's label space, or a DataError saying that ``purpose`` needs masks (``hint``: what to do
        instead, appended to the message)."""
        if self.labels is None:
            shown = self.name.removeprefix(IMAGES_PREFIX)
            raise DataError(
                f"{shown}: {purpose} needs masks, and these are images without masks; give a labelled dataset "
                f"(ADE20K, Cityscapes, images/ + masks/ + classes.json, or synthetic){hint}"
            )
        return self.labels

    def __len__(self) -> int:
        return len(self.synthetic) if self.synthetic is not None else len(self.samples)

    def item_name(self, index: int) -> str:
        if self.synthetic is not None:
            return self.synthetic.name(index)
        return self.samples[index].image.stem

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``(image (H, W, 3) uint8, mask (H, W) uint8)``, or ``(image, None)`` for a source without masks."""
        if index in self._cache:
            return self._cache[index]
        if self.synthetic is not None:
            return self.synthetic[index]
        sample = self.samples[index]
        image = read_image(sample.image)
        if self.labels is None:
            return image, None
        if sample.mask is None:
            raise DataError(f"{sample.image}: no mask")
        return image, read_mask(sample.mask, self.labels, image.shape[:2])

    def cache(self) -> Source:
        """Keep every pair in memory (synthetic scenes are cheaper to keep than to redraw each epoch)."""
        for i in range(len(self)):
            self._cache[i] = self.load(i)
        return self


def open_source(spec: str | Path, split: str, *, seed: int = 0, size: tuple[int, int] | None = None,
                strict: bool = False) -> Source:  # fmt: skip
    """Open ``split`` (``train`` or ``val``) of a data source; see the module docstring for ``spec``.

    ``strict``: a photo folder or glob with a file that does not read is an error naming that file, instead of
    the file being skipped with a warning.

    Raises:
        DataError: an unknown split; a missing path; a labelled layout with a missing mask or classes file;
            a folder or glob without any image, or without any readable image (the message names it).
    """
    text = str(spec)
    m = re.fullmatch(r"synthetic(?::(\d+))?", text)
    if m:
        if split not in SYNTHETIC_COUNTS:
            raise DataError(f"unknown split {split!r}; choose train or val")
        num = int(m.group(1)) if m.group(1) else SYNTHETIC_COUNTS[split]
        if split == "val" and m.group(1):
            num = max(1, num // 10)
        scenes = SyntheticScenes(split, num, size or SYNTHETIC_SIZE, seed)
        return Source("synthetic", split, synthetic_labels(), synthetic=scenes)
    if text.startswith(IMAGES_PREFIX):
        return _image_source(text[len(IMAGES_PREFIX) :], split, strict)
    path = Path(text)
    if path.is_dir() and detect_layout(path) is None:
        return _image_source(text, split, strict)
    if not path.exists() and _GLOB_CHARS.search(text):
        return _image_source(text, split, strict)
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return _image_source(text, split, strict)
    samples, labels, layout = find_samples(path, split)
    logger.info("%s: %s layout, %d %s pairs", text, layout, len(samples), split)
    return Source(f"{layout}:{text}", split, labels, samples=samples)


def list_photos(spec: str) -> list[Sample]:
    """The image files of a folder (recursively), a glob pattern or one image file, by name only (nothing read).

    Raises:
        DataError: no such path; a folder or pattern without image files; a file that is not an image file.
    """
    path = Path(spec)
    if path.is_dir():
        samples = find_images(path)
        if (missing := missing_masks(path)) is not None:
            logger.warning("%s: %s; reading every image under it without masks", spec, missing)
        return samples
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{path}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
        return [Sample(path, None)]
    if _GLOB_CHARS.search(spec):
        return glob_images(spec)
    raise DataError(f"{spec}: no such folder, image or glob pattern")


def _image_source(spec: str, split: str, strict: bool = False) -> Source:
    """Images without masks from a folder (recursively), a glob pattern or one image file: those that read."""
    if split not in SYNTHETIC_COUNTS:
        raise DataError(f"unknown split {split!r}; choose train or val")
    checked = check_photos(list_photos(spec), spec, strict=strict)
    logger.info("%s: %d images without masks (both splits use all of them), %d skipped", spec, len(checked.samples),
                len(checked.skipped))  # fmt: skip
    return Source(f"{IMAGES_PREFIX}{spec}", split, None, samples=checked.samples, skipped=checked.skipped,
                  notes=checked.notes)  # fmt: skip
