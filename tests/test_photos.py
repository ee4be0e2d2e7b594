"""Photo folders as phones and cameras write them, and a quiet terminal while the CLI works on them.

One folder holds a few real photos (crops of scikit-learn's sample photos) beside what a user's folder also holds:
a JPEG stored 400x300 with EXIF orientation 6 (shown 300x400), a truncated JPEG, a 16-bit grey PNG, a CMYK JPEG,
a text file named .jpg, a PNG with transparent pixels, a palette PNG with a transparent entry and a grey+alpha PNG.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_photo_folder, save_hf_model
from PIL import Image

from segformer_edge.data import open_source
from segformer_edge.data.folders import TRANSPARENT_BACKGROUND, open_photo
from segformer_edge.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[1]
UNREADABLE = ("notes.jpg", "truncated.jpg")  # in path order: notes.jpg is the first a --strict run meets
READABLE = 4 + 6  # the good crops, and rotated, deep16, cmyk, cutout, palette, grey_alpha


def make_phone_folder(folder: Path) -> Path:
    """The folder described in the module docstring; returns it."""
    from sklearn.datasets import load_sample_images

    make_photo_folder(folder, n=4)
    photo = load_sample_images().images[0]  # (427, 640, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(photo[:300, :400]).save(folder / "rotated.jpg", exif=exif.tobytes(), quality=92)
    data = (folder / "photo_00.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) * 2 // 3])
    ramp = np.linspace(0, 65535, 60 * 80).round().astype(np.uint16).reshape(60, 80)
    Image.fromarray(ramp).save(folder / "deep16.png")
    Image.fromarray(photo[100:160, 200:280]).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    (folder / "notes.jpg").write_text("a text file with an image's name")
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., :3] = photo[:40, :50]
    rgba[:, :20, 3] = 255  # opaque
    rgba[:, 20:35, 3] = 0  # fully transparent
    rgba[:, 35:, 3] = 64  # a quarter opaque
    Image.fromarray(rgba, "RGBA").save(folder / "cutout.png")
    palette = Image.fromarray(np.tile(np.arange(4, dtype=np.uint8), (30, 10)), "P")  # (30, 40), indices 0..3
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 250, 250, 250])
    palette.save(folder / "palette.png", transparency=3)
    grey = np.stack([np.full((20, 30), 90, np.uint8), np.full((20, 30), 0, np.uint8)], axis=-1)
    grey[:10, :, 1] = 255
    Image.fromarray(grey, "LA").save(folder / "grey_alpha.png")
    return folder


@pytest.fixture(scope="module")
def phone_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phone_folder(tmp_path_factory.mktemp("phone") / "photos")


# ---------------------------------------------------------------------------------------------------
# Reading one photo


def test_exif_orientation_gives_the_photo_as_shown(phone_folder: Path) -> None:
    pixels = open_photo(phone_folder / "rotated.jpg").pixels
    assert pixels.shape == (400, 300, 3)  # stored 400 wide and 300 high; shown 300 wide and 400 high
    with Image.open(phone_folder / "rotated.jpg") as im:
        stored = np.asarray(im.convert("RGB"))  # the same decode, EXIF ignored
    assert stored.shape == (300, 400, 3)
    np.testing.assert_array_equal(pixels, np.rot90(stored, k=-1))  # orientation 6: turned 90 degrees clockwise


def test_sixteen_bit_cmyk_and_grey_are_converted_with_a_note(phone_folder: Path) -> None:
    from sklearn.datasets import load_sample_images

    deep = open_photo(phone_folder / "deep16.png")
    ramp = np.linspace(0, 65535, 60 * 80).round().reshape(60, 80)
    assert deep.pixels.shape == (60, 80, 3) and deep.pixels.dtype == np.uint8
    np.testing.assert_array_equal(deep.pixels[..., 1], (ramp * 255 / 65535).round().astype(np.uint8))
    assert deep.notes == ("16-bit grey scaled to 8 bits",)

    cmyk = open_photo(phone_folder / "cmyk.jpg")
    original = load_sample_images().images[0][100:160, 200:280].astype(np.float64)
    assert cmyk.pixels.shape == (60, 80, 3) and cmyk.notes == ("CMYK converted to RGB",)
    assert np.abs(cmyk.pixels - original).mean() < 6  # the photo's colours, through a lossy CMYK JPEG

    grey = open_photo(phone_folder / "grey_alpha.png")
    assert grey.pixels.shape == (20, 30, 3)
    assert (grey.pixels[:10] == 90).all() and (grey.pixels[10:] == TRANSPARENT_BACKGROUND).all()


def test_transparent_pixels_are_flattened_onto_mid_grey(phone_folder: Path) -> None:
    from sklearn.datasets import load_sample_images

    photo = load_sample_images().images[0][:40, :50].astype(np.float64)
    cutout = open_photo(phone_folder / "cutout.png")
    grey = np.asarray(TRANSPARENT_BACKGROUND, np.float64)
    np.testing.assert_array_equal(cutout.pixels[:, :20], photo[:, :20])  # opaque: untouched
    assert (cutout.pixels[:, 20:35] == TRANSPARENT_BACKGROUND).all()  # transparent: the background
    expected = (photo[:, 35:] * 64 / 255 + grey * (1 - 64 / 255)).round()
    assert np.abs(cutout.pixels[:, 35:] - expected).max() <= 1  # partly transparent: blended
    assert cutout.notes == (f"60% transparent pixels flattened onto grey {TRANSPARENT_BACKGROUND}",)

    palette = open_photo(phone_folder / "palette.png")
    assert palette.pixels.shape == (30, 40, 3)
    assert (palette.pixels[:, 3::4] == TRANSPARENT_BACKGROUND).all() and (palette.pixels[:, 0::4] == (255, 0, 0)).all()
    assert palette.notes and "transparent" in palette.notes[0]


def test_unreadable_files_are_errors_that_name_them(phone_folder: Path) -> None:
    for name, why in (("notes.jpg", "not an image format"), ("truncated.jpg", "image file is truncated")):
        with pytest.raises(DataError, match=rf"{name}: not a readable image \(.*{why}"):
            open_photo(phone_folder / name)


# ---------------------------------------------------------------------------------------------------
# A folder of them


def test_folder_skips_unreadable_files_once_and_records_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = make_phone_folder(tmp_path / "photos")
    with caplog.at_level(logging.WARNING, logger="segformer_edge"):
        calib_source = open_source(folder, "train")
        verify_source = open_source(folder, "val")  # a second pass over the same folder: no second warning
        glob_source = open_source(f"{folder}/*.jpg", "val")
    for source in (calib_source, verify_source):
        assert len(source) == READABLE
        assert [Path(s["file"]).name for s in source.skipped] == list(UNREADABLE)
        assert {Path(s.image).name for s in source.samples}.isdisjoint(UNREADABLE)
        assert source.load(len(source) - 1)[0].dtype == np.uint8  # every index loads
    assert [Path(s["file"]).name for s in glob_source.skipped] == list(UNREADABLE)
    assert "truncated" in calib_source.skipped[1]["reason"]
    notes = {Path(k).name: v for k, v in calib_source.notes.items()}
    assert set(notes) == {"deep16.png", "cmyk.jpg", "cutout.png", "palette.png", "grey_alpha.png"}
    for name in UNREADABLE:
        warned = [r for r in caplog.records if name in r.getMessage()]
        assert len(warned) == 1 and warned[0].levelno == logging.WARNING, caplog.text
        assert "skipped" in warned[0].getMessage()
    rotated = [i for i in range(len(calib_source)) if calib_source.item_name(i) == "rotated"]
    assert calib_source.load(rotated[0])[0].shape == (400, 300, 3)


def test_strict_and_a_folder_without_any_readable_photo_are_errors(tmp_path: Path) -> None:
    folder = make_phone_folder(tmp_path / "photos")
    with pytest.raises(DataError, match=r"photos/notes\.jpg: not a readable image") as info:
        open_source(folder, "val", strict=True)
    assert "\n" not in str(info.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in UNREADABLE:
        (broken / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(DataError, match=r"broken: none of its 2 image files is readable \(first: .*notes\.jpg"):
        open_source(broken, "val")


def test_labelled_layouts_keep_refusing_a_broken_mask_or_image(tmp_path: Path) -> None:
    root = tmp_path / "generic"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.json").write_text(json.dumps({"classes": ["a", "b"]}))
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(root / "masks" / "a.png")
    (root / "masks" / "a.png").write_bytes((root / "masks" / "a.png").read_bytes()[:40])  # truncated
    with pytest.raises(DataError, match=r"masks/a\.png: not a readable mask"):
        open_source(root, "train").load(0)
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(root / "masks" / "a.png")
    (root / "images" / "a.png").write_text("not an image")
    source = open_source(root, "train")
    assert len(source) == 1 and source.skipped == []  # nothing is skipped from a labelled layout
    with pytest.raises(DataError, match=r"images/a\.png: not a readable image"):
        source.load(0)


# ---------------------------------------------------------------------------------------------------
# The CLI on them, in fresh processes (what a user's terminal shows)


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "100"}
    return subprocess.run([sys.executable, "-m", "segformer_edge", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600, check=False)  # fmt: skip


def _named_once(stderr: str) -> None:
    for name in UNREADABLE:
        assert stderr.count(name) == 1, stderr
    for line in stderr.strip().splitlines():
        assert line.startswith("warning: ") or _PROGRESS.match(line), stderr


# One line per task, as the CLI shows the API's steps: "tflite int8: passed 0:00:07", "predict: 4 of 4 images 0:00:00".
_PROGRESS = re.compile(r"^(\S+ (fp32|fp16|int8): [\w ,:()-]+ \d+:\d\d:\d\d|predict: \d+ of \d+ images \d+:\d\d:\d\d)\s*$")


@pytest.fixture(scope="module")
def tiny_hf_150(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers-saved SegFormer (tiny shape, 150 classes)."""
    return save_hf_model(tmp_path_factory.mktemp("hf") / "hf150", num_labels=150)


def test_calibrate_export_and_predict_use_the_readable_photos(tiny_hf_150: Path, tmp_path: Path) -> None:
    photos = make_phone_folder(tmp_path / "photos")
    done = _cli("calibrate", tiny_hf_150, "--data", photos, "--size", 64, 64, "--num-images", 4, "--out",
                tmp_path / "calib")  # fmt: skip
    assert done.returncode == 0, done.stderr
    _named_once(done.stderr)
    record = json.loads((tmp_path / "calib" / "calibration.json").read_text())
    assert [Path(s["file"]).name for s in record["skipped"]] == list(UNREADABLE)
    chosen = [sorted(p.name for p in photos.iterdir() if p.name not in UNREADABLE)[i] for i in record["indices"]]
    assert {Path(f).name for f in record["converted"]} == set(chosen) & {"deep16.png", "cmyk.jpg", "cutout.png",
                                                                       "palette.png", "grey_alpha.png"}  # fmt: skip

    done = _cli("export", tiny_hf_150, "--target", "onnx", "--precision", "int8", "--data", photos, "--size", 64, 64,
                "--calibration-images", 4, "--out", tmp_path / "exports")  # fmt: skip
    assert done.returncode == 0, done.stderr
    _named_once(done.stderr)
    manifest = json.loads(next((tmp_path / "exports").glob("*/manifest.json")).read_text())
    assert [Path(s["file"]).name for s in manifest["parity"]["data"]["skipped"]] == list(UNREADABLE)
    assert [Path(s["file"]).name for s in manifest["quantization"]["calibration"]["skipped"]] == list(UNREADABLE)

    done = _cli("predict", tiny_hf_150, photos, "--size", 64, 64, "--out", tmp_path / "pred")
    assert done.returncode == 0, done.stderr
    _named_once(done.stderr)
    masks = sorted(p.name.removesuffix("_mask.png") for p in (tmp_path / "pred").glob("*_mask.png"))
    assert len(masks) == READABLE and not {"notes", "truncated"} & set(masks)
    with Image.open(tmp_path / "pred" / "rotated_mask.png") as mask, Image.open(tmp_path / "pred" / "rotated_overlay.png") as over:  # fmt: skip
        assert mask.size == over.size == (300, 400)  # (W, H) of the photo as shown, not as stored

    for command in (["calibrate", tiny_hf_150, "--data", photos, "--size", 64, 64, "--out", tmp_path / "c2"],
                    ["export", tiny_hf_150, "--target", "onnx", "--precision", "int8", "--data", photos, "--out", tmp_path / "e2"],
                    ["verify", next((tmp_path / "exports").iterdir()), "--checkpoint", tiny_hf_150, "--data", photos],
                    ["predict", tiny_hf_150, photos, "--out", tmp_path / "p2"]):  # fmt: skip
        done = _cli(*command, "--strict")
        assert done.returncode == 2, (command, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and re.match(r"error: .*photos/notes\.jpg: not a readable image", lines[0]), done.stderr
        assert not (tmp_path / "c2").exists() and not (tmp_path / "e2").exists() and not (tmp_path / "p2").exists()


def test_int8_export_of_a_transformers_checkpoint_prints_only_its_progress_line(tiny_hf_150: Path, tmp_path: Path) -> None:  # fmt: skip
    """torchao's import-time "Failed to load ..._C_mxfp8...so" lines, torch's pytree deprecations (W1207 ...),
    the quantizers' warnings: in export.log, never on the terminal."""
    photos = make_photo_folder(tmp_path / "photos", n=4)
    done = _cli("export", tiny_hf_150, "--target", "tflite", "--precision", "int8", "--data", photos, "--size", 64, 64,
                "--calibration-images", 4, "--out", tmp_path / "exports")  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines and all(_PROGRESS.match(line) for line in lines), done.stderr
    assert "tflite int8: passed" in done.stderr
    artifact = next((tmp_path / "exports").iterdir())
    assert (artifact / "export.log").read_text().strip()  # the converters did talk: to the log
    # verify loads LiteRT, which greets on stderr ("INFO: Created TensorFlow Lite XNNPACK delegate"): the log's
    done = _cli("verify", artifact, "--checkpoint", tiny_hf_150, "--data", photos, "--report", tmp_path / "report")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "XNNPACK" in (tmp_path / "report" / "verify.log").read_text()
    for command in (["calibrate", tiny_hf_150, "--data", photos, "--size", 64, 64, "--num-images", 2, "--out", tmp_path / "c"],
                    ["predict", artifact, photos, "--out", tmp_path / "p"]):  # fmt: skip
        done = _cli(*command)
        assert done.returncode == 0, done.stderr
        assert all(_PROGRESS.match(line) for line in done.stderr.strip().splitlines()), done.stderr
