"""Trained many-class models whose labels are known: the proving ground of the no-label parity verdict.

The labels are a function of the photo: each pixel's class is its (lightly blurred) colour's bin in HSV space,
``hue x saturation x value`` bins (10 x 3 x 5 = 150 classes, ADE20K's count). Real photographs (scikit-learn's two
sample photos, cropped at random scales) labelled so give regions of many sizes, rare classes, and boundaries where
a trained model is unsure: the regime where agreement mIoU and accuracy part ways. A transformers
``SegformerForSemanticSegmentation`` trained on them for a few hundred steps is saved with ``save_pretrained``, as a
user's fine-tuned model would be. Tests and benchmarks/no_label_parity.py both build on this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

BINS_150 = (10, 3, 5)  # hue, saturation, value bins: 150 classes
TINY_HF = {"hidden_sizes": [16, 32, 40, 64], "depths": [1, 1, 1, 1], "decoder_hidden_size": 32}  # conftest's tiny shape
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def label_photo(rgb: np.ndarray, bins: tuple[int, int, int] = BINS_150) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint8 class ids: the HSV bin of each pixel's colour after a box blur of 1/32 of the
    image's short side (so a photo labelled at 64 or at 512 pixels has the same regions)."""
    from PIL import Image, ImageFilter

    blur = max(1, round(min(rgb.shape[:2]) / 32))
    hsv = np.asarray(Image.fromarray(rgb).filter(ImageFilter.BoxBlur(blur)).convert("HSV"), np.int32)  # (H, W, 3) 0..255
    nh, ns, nv = bins
    h, s, v = (np.minimum(hsv[..., i] * n // 256, n - 1) for i, n in enumerate((nh, ns, nv)))
    return ((h * ns + s) * nv + v).astype(np.uint8)  # (H, W)


def class_names(bins: tuple[int, int, int] = BINS_150) -> list[str]:
    nh, ns, nv = bins
    return [f"h{h}s{s}v{v}" for h in range(nh) for s in range(ns) for v in range(nv)]


def photo_crops(n: int, size: tuple[int, int], *, seed: int) -> list[np.ndarray]:
    """``n`` crops (H, W, 3) uint8 of the two sample photos, each taken at a random scale (0.3 to 1.0 of the photo's
    short side) and resized to ``size``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two (427, 640, 3) uint8
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        photo = photos[i % 2]
        side = int(rng.uniform(0.3, 1.0) * min(photo.shape[:2]))
        ch, cw = side, min(photo.shape[1], int(side * size[1] / size[0]))
        top, left = rng.integers(0, photo.shape[0] - ch + 1), rng.integers(0, photo.shape[1] - cw + 1)
        crop = Image.fromarray(photo[top : top + ch, left : left + cw]).resize((size[1], size[0]), Image.BILINEAR)
        crops.append(np.asarray(crop))
    return crops


def write_folders(root: Path, crops: list[np.ndarray], bins: tuple[int, int, int] = BINS_150) -> tuple[Path, Path]:
    """The same photos twice: ``root/photos`` (JPEG-free PNGs, no masks: what a user has) and ``root/labelled`` (the
    generic layout, images/ + masks/ + classes.json: what the labels say). Returns (photos, labelled)."""
    from PIL import Image

    photos, labelled = root / "photos", root / "labelled"
    for folder in (photos, labelled / "images", labelled / "masks"):
        folder.mkdir(parents=True, exist_ok=True)
    for i, crop in enumerate(crops):
        Image.fromarray(crop).save(photos / f"photo_{i:03d}.png")
        Image.fromarray(crop).save(labelled / "images" / f"photo_{i:03d}.png")
        Image.fromarray(label_photo(crop, bins)).save(labelled / "masks" / f"photo_{i:03d}.png")
    (labelled / "classes.json").write_text(json.dumps({"classes": class_names(bins)}))
    return photos, labelled


def train_transformers_model(out: Path, *, bins: tuple[int, int, int] = BINS_150, hf_config: dict | None = None,
                             size: tuple[int, int] = (64, 64), iters: int = 300, batch: int = 8, lr: float = 2e-3,
                             seed: int = 0) -> Path:  # fmt: skip
    """Train a transformers SegFormer on labelled photo crops for ``iters`` steps and ``save_pretrained`` it to ``out``.

    ``hf_config``: SegformerConfig fields (default: the tests' tiny shape; ``{}`` is transformers' default, b0). Crops are drawn fresh each step (seeded),
    so the model sees the photos at many scales; AdamW with a linear decay.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    names = class_names(bins)
    config = transformers.SegformerConfig(num_labels=len(names), id2label=dict(enumerate(names)),
                                          label2id={n: i for i, n in enumerate(names)},
                                          **(TINY_HF if hf_config is None else hf_config))  # fmt: skip
    model = transformers.SegformerForSemanticSegmentation(config).train()
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1.0 - step / iters)
    pool = photo_crops(batch * 16, size, seed=seed + 1000)  # a fixed pool, flipped at random: enough to fit colour bins
    pool_labels = [label_photo(crop, bins) for crop in pool]
    rng = np.random.default_rng(seed)
    for _ in range(iters):
        pick, flip = rng.integers(0, len(pool), batch), rng.random(batch) < 0.5
        images = np.stack([pool[i][:, ::-1] if f else pool[i] for i, f in zip(pick, flip)])  # (B, H, W, 3)
        labels = torch.from_numpy(np.stack([pool_labels[i][:, ::-1] if f else pool_labels[i] for i, f in zip(pick, flip)]).astype(np.int64))
        x = torch.from_numpy(((images.astype(np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2).copy())
        loss = model(pixel_values=x, labels=labels).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        sched.step()
    model.eval().save_pretrained(out)
    return Path(out)


def perturbed(model: Any, where: str, sigma: float, seed: int = 3) -> Any:
    """A copy of ``model`` whose weight matrices under ``where`` (a name part: ``decoder``, ``encoder.stages.3``) get
    Gaussian noise of ``sigma`` times their own standard deviation: a deliberately damaged model of known size."""
    import copy

    import torch

    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in out.named_parameters():
            if where in name and param.ndim > 1:
                param.add_(torch.randn(param.shape, generator=generator) * sigma * param.std())
    return out
