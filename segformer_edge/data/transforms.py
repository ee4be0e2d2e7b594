"""The training and evaluation transforms of the paper (mmseg's pipeline), on numpy arrays.

Training: random resize (ratio 0.5-2.0), random crop with at most 75% of the crop from one class,
horizontal flip, photometric distortion, normalisation, padding. Evaluation: resize to a fixed scale (or
keep the size) and normalise. Masks are resized with nearest neighbour and padded with the ignore index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..inputs import InputSpec, resize_pair
from .folders import IGNORE_INDEX

__all__ = ["EvalTransform", "TrainTransform", "normalize", "photometric_distortion", "resize_pair"]


def normalize(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, ``(x / 255 - mean) / std`` (the float model's input)."""
    return InputSpec(image.shape[:2], mean, std)(image)[0]  # type: ignore[arg-type]


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("HSV")).astype(np.int16)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(hsv.clip(0, 255).astype(np.uint8), mode="HSV").convert("RGB"))


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion: brightness, contrast (before or after), saturation, hue; each p=0.5."""
    img = image.astype(np.float32)
    if rng.random() < 0.5:
        img = img + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        img = img * rng.uniform(0.5, 1.5)
    img = img.clip(0, 255).astype(np.uint8)
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    if do_sat or do_hue:
        hsv = _rgb_to_hsv(img)
        if do_sat:
            hsv[..., 1] = (hsv[..., 1] * rng.uniform(0.5, 1.5)).astype(np.int16)
        if do_hue:
            hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-18, 19) * 256 / 360)) % 256  # PIL hue is 0..255
        img = _hsv_to_rgb(hsv)
    if not contrast_first and rng.random() < 0.5:
        img = (img.astype(np.float32) * rng.uniform(0.5, 1.5)).clip(0, 255).astype(np.uint8)
    return img


@dataclass
class TrainTransform:
    """Random resize, cat-max-ratio crop, flip, photometric distortion, normalise, pad.

    Attributes:
        crop: (H, W) of the training crop.
        scale: (long, short) sides the image is fitted into before the random ratio (mmseg's img_scale).
        ratio_range: Random resize ratio range.
        cat_max_ratio: Largest share of the crop one class may take (resampled up to 10 times).
    """

    crop: tuple[int, int]
    scale: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w = mask.shape
        ratio = rng.uniform(*self.ratio_range)
        long_side, short_side = self.scale[0] * ratio, self.scale[1] * ratio
        factor = min(long_side / max(h, w), short_side / min(h, w))
        image, mask = resize_pair(image, mask, (max(1, round(h * factor)), max(1, round(w * factor))))
        image, mask = self._crop(image, mask, rng)
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        image = photometric_distortion(np.ascontiguousarray(image), rng)
        x = normalize(image, self.mean, self.std)  # (3, h, w)
        ch, cw = self.crop
        out_x = np.zeros((3, ch, cw), np.float32)
        out_y = np.full((ch, cw), IGNORE_INDEX, np.uint8)
        out_x[:, : x.shape[1], : x.shape[2]] = x
        out_y[: mask.shape[0], : mask.shape[1]] = mask
        return out_x, out_y

    def _crop(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        ch, cw = self.crop
        h, w = mask.shape
        box = (0, 0)
        for _ in range(10):
            box = (int(rng.integers(0, max(h - ch, 0) + 1)), int(rng.integers(0, max(w - cw, 0) + 1)))
            patch = mask[box[0] : box[0] + ch, box[1] : box[1] + cw]
            counts = np.bincount(patch[patch != IGNORE_INDEX].ravel())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        y, x = box
        return image[y : y + ch, x : x + cw], mask[y : y + ch, x : x + cw]


@dataclass
class EvalTransform:
    """Resize to ``size`` (H, W) when given (the mask keeps its size: predictions are resized back), normalise."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: tuple[int, int] | None = None

    def __call__(self, image: np.ndarray) -> np.ndarray:
        spec = InputSpec(self.size or image.shape[:2], self.mean, self.std)  # type: ignore[arg-type]
        return spec(spec.resize(image)[0])[0]  # (3, H, W)
