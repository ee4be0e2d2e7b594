"""Synthetic street-and-landscape scenes: the built-in dataset, generated procedurally and deterministically.

Each scene has a horizon, sky, grass, and by chance water, a road, buildings, trees, cars and a fence,
painted back to front so that objects occlude one another. Colour alone does not separate the classes:
water reflects the sky's colour, trees and grass share greens, buildings and cars take any hue, and the
road and the fence share greys. Texture (ripples, windows, foliage, blades, rails) and context (sky above
the horizon, cars on the road) decide. Lighting gain, a shadow gradient and sensor noise vary per image.

Image ``i`` of a split is a pure function of ``(seed, split, i)``; train and val draw from different
random streams, so the splits never share a scene.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["CLASSES", "PALETTE", "SyntheticScenes", "render_scene"]

CLASSES: tuple[str, ...] = ("sky", "building", "tree", "grass", "road", "water", "car", "fence")
# Display colours for masks and overlays (not the colours the scenes are painted with).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (70, 130, 180),
    (180, 60, 60),
    (34, 139, 34),
    (152, 251, 152),
    (128, 64, 128),
    (0, 80, 200),
    (250, 170, 30),
    (190, 153, 153),
)
SKY, BUILDING, TREE, GRASS, ROAD, WATER, CAR, FENCE = range(len(CLASSES))
_SPLITS = {"train": 0, "val": 1}


def _noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth value noise in [0, 1] with features about ``cell`` pixels wide: (H, W) float32."""
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    grid = Image.fromarray((rng.random((gh, gw)) * 255).astype(np.uint8))
    return np.asarray(grid.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), dtype=np.float32)


def _shade(base: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Colour ``base`` (3,) modulated by a brightness ``field`` (H, W) -> (H, W, 3)."""
    return base[None, None, :] * field[..., None]


@dataclass
class _Canvas:
    image: np.ndarray  # (H, W, 3) float32 in [0, 1]
    mask: np.ndarray  # (H, W) uint8 labels

    def paint(self, region: np.ndarray, texture: np.ndarray, label: int) -> None:
        self.image[region] = texture[region]
        self.mask[region] = label


def render_scene(rng: np.random.Generator, height: int = 256, width: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One scene: ``(image (H, W, 3) uint8, mask (H, W) uint8)``."""
    h, w = height, width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    canvas = _Canvas(np.zeros((h, w, 3), np.float32), np.zeros((h, w), np.uint8))
    horizon = int(h * rng.uniform(0.28, 0.55))

    # Sky: a vertical gradient with soft clouds. Its colour is reused by the water.
    sky_hue = rng.choice([rng.uniform(0.52, 0.66), rng.uniform(0.0, 1.0)], p=[0.75, 0.25])
    sky_color = _hsv(sky_hue, rng.uniform(0.15, 0.7), rng.uniform(0.6, 0.95))
    gradient = 0.8 + 0.35 * (yy / max(horizon, 1)).clip(0, 1)
    clouds = np.clip(_noise(rng, h, w, rng.uniform(24, 64)) * 1.6 - 0.6, 0, 1) * rng.uniform(0.0, 0.8)
    sky = _shade(sky_color, gradient) * (1 - clouds[..., None]) + clouds[..., None] * 0.95
    canvas.paint(np.ones((h, w), bool), sky, SKY)

    # Grass: every pixel below the horizon, greens to straw, with fine vertical blades.
    grass_color = _hsv(rng.uniform(0.17, 0.36), rng.uniform(0.35, 0.8), rng.uniform(0.35, 0.7))
    blades = _noise(rng, h, w * 4, 2.0)[:, ::4] * 0.5 + _noise(rng, h, w, 3.0) * 0.5
    grass = _shade(grass_color, 0.6 + 0.7 * blades)
    canvas.paint(yy >= horizon, grass, GRASS)

    # Water: a lake in the lower half; sky-coloured, with horizontal ripples.
    if rng.random() < 0.5:
        cy, cx = rng.uniform(horizon + 0.2 * (h - horizon), h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.15, 0.45) * (h - horizon), rng.uniform(0.2, 0.6) * w
        edge = _noise(rng, h, w, 16) * 0.5
        lake = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1 + edge) & (yy > horizon + 2)
        ripples = 0.85 + 0.2 * np.sin(yy * rng.uniform(0.8, 1.6) + 6 * _noise(rng, h, w, 12))
        water_color = sky_color * rng.uniform(0.6, 0.95)
        canvas.paint(lake, _shade(water_color, ripples), WATER)

    # Road: a trapezoid narrowing towards a vanishing point on the horizon, with a dashed centre line.
    road = np.zeros((h, w), bool)
    if rng.random() < 0.7:
        vx = rng.uniform(0.3, 0.7) * w
        half_bottom = rng.uniform(0.25, 0.6) * w
        t = ((yy - horizon) / max(h - horizon, 1)).clip(0, 1)
        centre = vx + (rng.uniform(0.3, 0.7) * w - vx) * t
        half = 2 + half_bottom * t
        road = (yy > horizon) & (np.abs(xx - centre) < half)
        grey = rng.uniform(0.25, 0.6)
        texture = _shade(_hsv(rng.uniform(0, 1), rng.uniform(0, 0.12), grey), 0.85 + 0.3 * _noise(rng, h, w, 1.5))
        dashes = (np.abs(xx - centre) < 0.5 + 0.04 * half) & (np.sin(yy * 40 / (4 + 30 * t) ** 0.5) > 0.2)
        texture[dashes & road] = _hsv(0.14, rng.uniform(0, 0.7), 0.9)
        canvas.paint(road, texture, ROAD)

    # Buildings: boxes standing on the horizon, any colour, with a grid of windows.
    for _ in range(rng.integers(0, 5)):
        bw, bh = rng.uniform(0.08, 0.3) * w, rng.uniform(0.2, 0.9) * horizon
        x0 = rng.uniform(-0.1, 1.0) * w
        base = horizon + rng.uniform(0, 0.08) * h
        box = (xx >= x0) & (xx < x0 + bw) & (yy >= base - bh) & (yy < base)
        wall = _shade(_hsv(rng.uniform(0, 1), rng.uniform(0.05, 0.6), rng.uniform(0.3, 0.85)), 0.9 + 0.2 * _noise(rng, h, w, 2))
        pitch_x, pitch_y = rng.uniform(5, 12), rng.uniform(6, 14)
        windows = ((xx - x0) % pitch_x < pitch_x * 0.5) & ((yy - base) % pitch_y < pitch_y * 0.55)
        wall[windows] = wall[windows] * rng.uniform(0.25, 0.6) + rng.uniform(0, 0.3)
        canvas.paint(box, wall, BUILDING)

    # Trees: a trunk and a lumpy canopy, in greens like the grass but with leafy texture.
    for _ in range(rng.integers(0, 5)):
        tx, ty = rng.uniform(0, w), horizon + rng.uniform(-0.02, 0.25) * h
        r = rng.uniform(0.05, 0.14) * h
        trunk = (np.abs(xx - tx) < r * 0.18) & (yy <= ty) & (yy > ty - 1.6 * r)
        lump = _noise(rng, h, w, max(r / 2.5, 2.0))
        canopy = ((yy - (ty - 1.9 * r)) ** 2 + (xx - tx) ** 2) < (r * (0.75 + 0.6 * lump)) ** 2
        leaves = _shade(_hsv(rng.uniform(0.2, 0.4), rng.uniform(0.4, 0.9), rng.uniform(0.2, 0.55)),
                        0.5 + 0.9 * _noise(rng, h, w, 1.2) * (0.6 + 0.4 * lump))
        bark = _shade(_hsv(rng.uniform(0.05, 0.1), 0.5, rng.uniform(0.2, 0.4)), 0.8 + 0.3 * _noise(rng, h, w, 1.5))
        canvas.paint(trunk, bark, TREE)
        canvas.paint(canopy, leaves, TREE)

    # Cars: on the road where there is one; a body of any colour, a darker cabin and dark wheels.
    for _ in range(rng.integers(0, 4) if road.any() else 0):
        ys, xs = np.nonzero(road)
        k = rng.integers(0, len(ys))
        cy, cx = float(ys[k]), float(xs[k])
        scale = 0.04 + 0.18 * (cy - horizon) / max(h - horizon, 1)
        cw, ch = scale * w * rng.uniform(1.2, 1.8), scale * h * rng.uniform(0.55, 0.8)
        body = (np.abs(xx - cx) < cw / 2) & (yy > cy - ch * 0.55) & (yy < cy)
        cabin = (np.abs(xx - cx) < cw * 0.3) & (yy > cy - ch) & (yy <= cy - ch * 0.55)
        wheels = (((xx - (cx - cw * 0.3)) ** 2 + (yy - cy) ** 2) < (ch * 0.22) ** 2) | (
            ((xx - (cx + cw * 0.3)) ** 2 + (yy - cy) ** 2) < (ch * 0.22) ** 2
        )
        paint = _shade(_hsv(rng.uniform(0, 1), rng.uniform(0.2, 0.9), rng.uniform(0.3, 0.9)), 0.95 + 0.1 * _noise(rng, h, w, 4))
        paint[cabin] *= 0.45
        paint[wheels] = 0.08
        canvas.paint(body | cabin | wheels, paint, CAR)

    # A fence in front of everything: posts and two rails, grey to brown.
    if rng.random() < 0.35:
        top = rng.uniform(0.55, 0.85) * h
        height_f = rng.uniform(0.08, 0.2) * h
        pitch = rng.uniform(8, 20)
        posts = ((xx % pitch) < pitch * 0.22) & (yy > top) & (yy < top + height_f)
        rails = ((np.abs(yy - (top + 0.25 * height_f)) < 1.2) | (np.abs(yy - (top + 0.7 * height_f)) < 1.2))
        colour = _hsv(rng.uniform(0.05, 0.12), rng.uniform(0.0, 0.4), rng.uniform(0.3, 0.75))
        canvas.paint(posts | rails, _shade(colour, 0.9 + 0.2 * _noise(rng, h, w, 1.5)), FENCE)

    # Lighting: a global gain, a shadow gradient in a random direction, then sensor noise.
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)
    light = rng.uniform(0.6, 1.25) * (1 + rng.uniform(0, 0.45) * (ramp - ramp.mean()))
    image = canvas.image * light[..., None] + rng.normal(0, rng.uniform(0.005, 0.04), (h, w, 3))
    return (image.clip(0, 1) * 255 + 0.5).astype(np.uint8), canvas.mask


class SyntheticScenes:
    """The synthetic dataset as an indexable collection of ``(image uint8 HWC, mask uint8 HW)`` pairs.

    Args:
        split: ``train`` or ``val``.
        num: Number of scenes.
        size: (H, W) of each scene.
        seed: Base seed; each scene gets its own stream from ``(seed, split, index)``.
    """

    classes = CLASSES
    palette = PALETTE
    ignore_index = 255

    def __init__(self, split: str = "train", num: int = 2000, size: tuple[int, int] = (256, 256), seed: int = 0) -> None:
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; choose train or val")
        if num < 1:
            raise ValueError(f"num must be at least 1, got {num}")
        self.split, self.num, self.size, self.seed = split, num, size, seed

    def __len__(self) -> int:
        return self.num

    def name(self, index: int) -> str:
        return f"{self.split}_{index:06d}"

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.num:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
        return render_scene(rng, *self.size)
