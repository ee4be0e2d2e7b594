"""Synthetic scenes, folder layouts and transforms."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from segformer_edge.data import IGNORE_INDEX, open_source
from segformer_edge.data.synthetic import CLASSES, SyntheticScenes
from segformer_edge.data.transforms import TrainTransform
from segformer_edge.errors import DataError


def test_synthetic_is_deterministic_and_splits_never_overlap() -> None:
    train, val = SyntheticScenes("train", 40, (96, 96), seed=3), SyntheticScenes("val", 40, (96, 96), seed=3)
    a, b = train[7], SyntheticScenes("train", 40, (96, 96), seed=3)[7]
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(train[7][0], SyntheticScenes("train", 40, (96, 96), seed=4)[7][0])
    digest = lambda pair: hashlib.sha256(pair[0].tobytes()).hexdigest()  # noqa: E731
    assert not {digest(train[i]) for i in range(40)} & {digest(val[i]) for i in range(40)}
    assert len(CLASSES) >= 8
    seen = np.zeros(len(CLASSES), bool)
    for i in range(40):
        image, mask = train[i]
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8 and mask.shape == (96, 96)
        seen[np.unique(mask)] = True
    assert seen.all(), "every class appears in 40 scenes"


def test_colour_alone_does_not_separate_classes() -> None:
    """The mean colours of sky and water, and of tree and grass, overlap across scenes."""
    scenes = SyntheticScenes("train", 60, (96, 96))
    means: dict[int, list[np.ndarray]] = {k: [] for k in range(len(CLASSES))}
    for i in range(60):
        image, mask = scenes[i]
        for k in np.unique(mask):
            means[int(k)].append(image[mask == k].mean(0))
    for a, b in [(0, 5), (2, 3)]:  # sky/water, tree/grass
        da = np.array(means[a]).mean(0)
        spread = np.array(means[a]).std(0).mean() + np.array(means[b]).std(0).mean()
        assert np.abs(da - np.array(means[b]).mean(0)).mean() < 2 * spread


def test_data_synth_writes_generic_layout_that_loads_back(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["data", "synth", "--out", tmp_path / "ds", "--num", "6", "--size", "64", "80"], capsys)
    assert code == 0, err
    spec = json.loads((tmp_path / "ds" / "classes.json").read_text())
    assert spec["classes"] == list(CLASSES)
    source = open_source(tmp_path / "ds", "train")
    assert len(source) == 6 and source.labels.classes == list(CLASSES)
    image, mask = source.load(2)
    ref_image, ref_mask = SyntheticScenes("train", 6, (64, 80))[2]
    assert np.array_equal(image, ref_image) and np.array_equal(mask, ref_mask)
    assert len(open_source(tmp_path / "ds", "val")) == 1
    assert not list((tmp_path / "ds").rglob("*.tmp"))


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_ade20k_layout_reduces_zero_label(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        for name in ("ADE_a_0001", "ADE_a_0002"):
            _write(tmp_path / "images" / split / f"{name}.jpg", rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
            mask = np.zeros((40, 50), np.uint8)
            mask[:, 10:] = 1
            mask[:, 30:] = 150
            _write(tmp_path / "annotations" / split / f"{name}.png", mask)
    source = open_source(tmp_path, "train")
    assert source.name.startswith("ade20k") and len(source) == 2 and source.labels.num_classes == 150
    _, mask = source.load(0)
    assert (mask[:, :10] == IGNORE_INDEX).all() and (mask[:, 10:30] == 0).all() and (mask[:, 30:] == 149).all()


def test_cityscapes_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        stem = f"{split}city_000000_000019"
        _write(tmp_path / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png", rng.integers(0, 255, (32, 64, 3), dtype=np.uint8))
        mask = np.full((32, 64), 255, np.uint8)
        mask[:16] = 13
        _write(tmp_path / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelTrainIds.png", mask)
    source = open_source(tmp_path, "val")
    assert source.name.startswith("cityscapes") and source.labels.num_classes == 19
    _, mask = source.load(0)
    assert (mask[:16] == 13).all() and (mask[16:] == IGNORE_INDEX).all()


def _generic(tmp_path: Path) -> Path:
    root = tmp_path / "generic"
    _write(root / "images" / "a.png", np.zeros((20, 30, 3), np.uint8))
    _write(root / "masks" / "a.png", np.ones((20, 30), np.uint8))
    (root / "classes.json").write_text(json.dumps({"classes": ["x", "y", "z"]}))
    return root


def test_folder_errors_name_the_file(tmp_path: Path) -> None:
    root = _generic(tmp_path)
    assert len(open_source(root, "train")) == 1
    _write(root / "images" / "b.png", np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(DataError, match=r"b\.png: no mask"):
        open_source(root, "train")
    _write(root / "masks" / "b.png", np.full((20, 30), 7, np.uint8))
    with pytest.raises(DataError, match=r"b\.png: label 7 is out of range for 3 classes"):
        open_source(root, "train").load(1)
    _write(root / "masks" / "b.png", np.zeros((10, 30), np.uint8))
    with pytest.raises(DataError, match=r"b\.png: mask is 30x10 but its image is 30x20"):
        open_source(root, "train").load(1)
    (root / "images" / "b.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"b\.png: not a readable image"):
        open_source(root, "train").load(1)
    _write(root / "images" / "b.png", np.full((20, 30), 65535, np.uint16))  # 16-bit grey: read as 8-bit RGB
    _write(root / "masks" / "b.png", np.zeros((20, 30), np.uint8))
    assert (open_source(root, "train").load(1)[0] == 255).all()
    # A folder of images without a labelled layout is plain images; one without any image stays an error.
    assert not open_source(tmp_path / "generic" / "masks", "train").has_masks
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no pictures here")
    with pytest.raises(DataError, match=r"notes: no images found"):
        open_source(tmp_path / "notes", "train")
    (root / "classes.json").unlink()
    with pytest.raises(DataError, match="classes.json"):
        open_source(root, "train")


def test_train_transform_crop_flip_pad() -> None:
    image, mask = SyntheticScenes("train", 1, (64, 64))[0]
    transform = TrainTransform(crop=(48, 40), scale=(256, 64), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    for seed in range(10):
        x, y = transform(image, mask, np.random.default_rng(seed))
        assert x.shape == (3, 48, 40) and x.dtype == np.float32 and y.shape == (48, 40)
        assert set(np.unique(y)) <= set(range(len(CLASSES))) | {IGNORE_INDEX}
        padded = y == IGNORE_INDEX
        assert np.all(x[:, padded] == 0)  # padding is zero in the normalised image
    # Same seed, same sample: augmentation is a function of the rng alone.
    a = transform(image, mask, np.random.default_rng(5))
    b = transform(image, mask, np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
