"""Datasets: the built-in synthetic scenes and folder layouts (ADE20K, Cityscapes, generic).

``open_source(spec, split)`` gives a :class:`Source`: indexable ``(image uint8 HWC, mask uint8 HW)`` pairs
with their :class:`LabelSpace`. ``spec`` is ``synthetic`` (optionally ``synthetic:N``) or a folder.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from .folders import IGNORE_INDEX, LabelSpace, Sample, find_samples, read_image, read_mask
from .synthetic import CLASSES, PALETTE, SyntheticScenes

__all__ = ["IGNORE_INDEX", "SYNTHETIC_SIZE", "LabelSpace", "Source", "open_source", "synthetic_labels"]

logger = logging.getLogger(__name__)

SYNTHETIC_SIZE: tuple[int, int] = (128, 128)
SYNTHETIC_COUNTS = {"train": 3000, "val": 300}


def synthetic_labels() -> LabelSpace:
    return LabelSpace(list(CLASSES), [tuple(c) for c in PALETTE])


@dataclass
class Source:
    """Image/mask pairs of one split. ``load`` checks every pair it reads."""

    name: str
    split: str
    labels: LabelSpace
    samples: list[Sample] = field(default_factory=list)
    synthetic: SyntheticScenes | None = None
    _cache: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.synthetic) if self.synthetic is not None else len(self.samples)

    def item_name(self, index: int) -> str:
        if self.synthetic is not None:
            return self.synthetic.name(index)
        return self.samples[index].image.stem

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index in self._cache:
            return self._cache[index]
        if self.synthetic is not None:
            return self.synthetic[index]
        sample = self.samples[index]
        image = read_image(sample.image)
        if sample.mask is None:
            raise DataError(f"{sample.image}: no mask")
        return image, read_mask(sample.mask, self.labels, image.shape[:2])

    def cache(self) -> Source:
        """Keep every pair in memory (synthetic scenes are cheaper to keep than to redraw each epoch)."""
        for i in range(len(self)):
            self._cache[i] = self.load(i)
        return self


def open_source(spec: str | Path, split: str, *, seed: int = 0, size: tuple[int, int] | None = None) -> Source:
    """Open ``split`` of a dataset: ``synthetic[:N]`` or a folder (layout detected)."""
    text = str(spec)
    m = re.fullmatch(r"synthetic(?::(\d+))?", text)
    if m:
        num = int(m.group(1)) if m.group(1) else SYNTHETIC_COUNTS[split]
        if split == "val" and m.group(1):
            num = max(1, num // 10)
        scenes = SyntheticScenes(split, num, size or SYNTHETIC_SIZE, seed)
        return Source("synthetic", split, synthetic_labels(), synthetic=scenes)
    samples, labels, layout = find_samples(Path(text), split)
    logger.info("%s: %s layout, %d %s pairs", text, layout, len(samples), split)
    return Source(f"{layout}:{text}", split, labels, samples=samples)
