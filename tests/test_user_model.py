"""The user's model and images: Hub ids, checkpoints without labels, config errors, palettes, photo folders."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_photo_folder, run_cli, save_hf_model
from PIL import Image

from segformer_edge import load_pretrained
from segformer_edge.data import open_source
from segformer_edge.errors import CheckpointError, DataError
from segformer_edge.hub import parse_hub_id, resolve_model_path
from segformer_edge.model import SegFormerConfig
from segformer_edge.palettes import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    known_label_space,
    palette_for,
)

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _hf_logits(folder: Path, x: torch.Tensor) -> torch.Tensor:
    hf = transformers.SegformerForSemanticSegmentation.from_pretrained(folder).eval()
    with torch.no_grad():
        return hf(pixel_values=x).logits


def _assert_parity(folder_or_id: str | Path, folder: Path, size: tuple[int, int] = (64, 96)) -> None:
    ours = load_pretrained(folder_or_id)
    torch.manual_seed(0)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        logits = ours(x)
    reference = _hf_logits(folder, x)
    assert logits.shape == reference.shape
    assert (logits - reference).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------------
# Hub ids


def _fake_hub_cache(cache: Path, repo_id: str, **model: object) -> tuple[Path, str]:
    """The Hugging Face cache layout for one model: refs/main -> commit, snapshots/<commit>/ files."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # 40 hex digits, as a real commit id
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = save_hf_model(repo / "snapshots" / commit, **model)  # type: ignore[arg-type]
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot, commit


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF_HUB_CACHE with HF_HUB_OFFLINE=1, for this process (huggingface_hub read its env at import)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def _cli(args: list[str], cache: Path) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh process whose environment points huggingface_hub at ``cache``, offline."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "segformer_edge", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_hub_id_resolves_from_the_offline_cache(offline_cache: Path) -> None:
    from segformer_edge.cli.common import resolve_checkpoint

    snapshot, commit = _fake_hub_cache(offline_cache, "acme/segformer-tiny", num_labels=7)
    assert resolve_model_path("acme/segformer-tiny") == snapshot
    assert resolve_model_path(f"acme/segformer-tiny@{commit}") == snapshot
    assert resolve_checkpoint("acme/segformer-tiny") == snapshot
    _assert_parity("acme/segformer-tiny", snapshot)
    _assert_parity(f"acme/segformer-tiny@{commit}", snapshot)
    model = load_pretrained("acme/segformer-tiny")
    assert model.config.num_classes == 7 and model.meta.class_names[0] == "LABEL_0"
    # An existing local path always wins over the id reading of the same text.
    assert resolve_model_path(snapshot) == snapshot


def test_uncached_hub_id_is_one_clear_error(offline_cache: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        resolve_model_path("acme/not-downloaded")
    message = str(info.value)
    assert "acme/not-downloaded" in message and "HF_HUB_CACHE" in message and "network" in message
    assert "\n" not in message
    _fake_hub_cache(offline_cache, "acme/segformer-tiny", num_labels=3)
    with pytest.raises(CheckpointError, match="acme/segformer-tiny@v2"):
        resolve_model_path("acme/segformer-tiny@v2")  # a branch that was never cached


def test_cli_takes_hub_ids(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "acme/segformer-tiny", num_labels=4)
    done = _cli(["info", "acme/segformer-tiny", "--json"], cache)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["class_names"] == [f"LABEL_{i}" for i in range(4)]

    done = _cli(["info", "acme/not-downloaded"], cache)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "acme/not-downloaded" in lines[0] and "HF_HUB_CACHE" in lines[0]
    assert "Traceback" not in done.stderr


def test_missing_paths_that_are_not_ids(tmp_path: Path) -> None:
    for spec in (tmp_path / "nope.safetensors", "runs/best.safetensors", "./acme/model", "a/b/c", "~/x"):
        with pytest.raises(CheckpointError, match="no such file or folder"):
            resolve_model_path(spec)
    ade = "nvidia/segformer-b0-finetuned-ade-512-512"
    assert parse_hub_id(ade) == (ade, None)
    assert parse_hub_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    assert parse_hub_id("org/model.pth") is None and parse_hub_id("-org/name") is None


def test_cli_help_does_not_import_huggingface_hub() -> None:
    code = "import sys, segformer_edge.cli.app, segformer_edge.hub; print('huggingface_hub' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


# ---------------------------------------------------------------------------------------------------
# Class count from the weights


def test_two_class_checkpoint_without_labels_loads(tmp_path: Path) -> None:
    folder = save_hf_model(tmp_path / "b0", num_labels=2, tiny=False)
    config = json.loads((folder / "config.json").read_text())
    for key in ("id2label", "label2id", "num_labels"):  # what transformers 5 leaves out for 2 classes
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config))
    model = load_pretrained(folder)
    assert model.config.variant == "b0" and model.config.num_classes == 2
    assert model.meta.class_names == ["class_0", "class_1"]
    _assert_parity(folder, folder, size=(128, 160))
    with pytest.raises(CheckpointError, match="has 2 classes, but num_classes=3"):
        load_pretrained(folder, num_classes=3)


def test_default_labels_of_transformers_load(tmp_path: Path) -> None:
    folder = save_hf_model(tmp_path / "m", num_labels=150)
    model = load_pretrained(folder)
    assert model.config.num_classes == 150 and model.meta.class_names[149] == "LABEL_149"
    assert model.meta.palette == palette_for(["x"] * 150)  # not ADE20K's names: the default palette
    _assert_parity(folder, folder)


# ---------------------------------------------------------------------------------------------------
# Config problems: CheckpointError naming the file and the field


CONFIG_CASES = [
    ({"hidden_sizes": [16, 32, 40, 63]}, "hidden_sizes[3] = 63 is not divisible by num_attention_heads[3] = 8"),
    ({"num_attention_heads": [1, 2, 3, 8]}, "hidden_sizes[2] = 40 is not divisible by num_attention_heads[2] = 3"),
    ({"depths": [1, 1, 1]}, "depths must list 4 integers"),
    ({"sr_ratios": [8, 4, 2, 1, 1]}, "sr_ratios must list 4 integers"),
    ({"num_attention_heads": [1, 2, 5]}, "num_attention_heads must list 4 integers"),
    ({"hidden_sizes": "16,32,40,64"}, "hidden_sizes must list 4 integers"),
    ({"depths": [1, 1.5, 1, 1]}, "depths must hold integers >= 0, got [1, 1.5, 1, 1]"),
    ({"sr_ratios": [8, 4, 0, 1]}, "sr_ratios must hold integers >= 1"),
    ({"decoder_hidden_size": 2.5}, "decoder_hidden_size must be an integer"),
    ({"decoder_hidden_size": 64}, "decoder_hidden_size is 64 but the weights have 32 (decode_head.linear_fuse.weight)"),
    ({"hidden_sizes": [16, 32, 40, 72]}, "hidden_sizes[3] is 72 but the weights have 64"),
    ({"depths": [1, 2, 1, 1]}, "depths[1] is 2 but the weights have 1 (segformer.encoder.block.1.*)"),
    ({"sr_ratios": [8, 4, 4, 1]}, "sr_ratios[2] is 4 but the weights have 2"),
    ({"mlp_ratios": [2, 2, 2, 2]}, "mlp_ratios (x hidden_sizes[0]) is 32 but the weights have 64"),
    ({"num_channels": 1}, "num_channels is 1 but the weights have 3"),
    ({"id2label": {"0": "a", "1": "b", "2": "c"}}, "id2label has 3 classes but the weights have 5"),
    ({"id2label": {"0": "a", "2": "c"}}, "id2label keys must be the class ids 0..1"),
    ({"num_encoder_blocks": 3}, "num_encoder_blocks is 3"),
    ({"drop_path_rate": 1.5}, "drop_path_rate must be a number in [0, 1)"),
    ({"model_type": "vit"}, "not a SegFormer config"),
]


@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(tmp_path_factory.mktemp("hf") / "tiny", num_labels=5)


def _with_config(source: Path, folder: Path, change: dict) -> Path:
    """A copy of the checkpoint at ``source`` (weights linked) whose config.json has ``change`` applied."""
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(source / "model.safetensors")
    config = {**json.loads((source / "config.json").read_text()), **change}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(("change", "message"), CONFIG_CASES)
def test_config_problems_name_the_file_and_field(
    tiny_hf_folder: Path, tmp_path: Path, change: dict, message: str
) -> None:
    folder = _with_config(tiny_hf_folder, tmp_path / "m", change)
    with pytest.raises(CheckpointError, match=re.escape(message)) as info:
        load_pretrained(folder)
    assert str(folder / "config.json") in str(info.value) and "\n" not in str(info.value)


def test_config_problem_through_the_cli(
    tiny_hf_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _with_config(tiny_hf_folder, tmp_path / "m", {"depths": [1, 1, 1]})
    code, _, err = run_cli(["info", folder], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "depths must list 4 integers" in err


def test_model_config_refuses_fractions_and_non_positive_values() -> None:
    with pytest.raises(ValueError, match=r"depths\[1\] must be an integer"):
        SegFormerConfig(depths=(1, 2.5, 1, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"sr_ratios\[0\] must be at least 1"):
        SegFormerConfig(sr_ratios=(0, 4, 2, 1))
    with pytest.raises(ValueError, match="decoder_dim must be an integer"):
        SegFormerConfig(decoder_dim="256")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs 4 values"):
        SegFormerConfig(embed_dims=(32, 64, 160))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# Class names and palettes


def _ade_synonym_labels() -> list[str]:
    """ADE20K's names as some Hugging Face configs write them: mixed case, trailing space, ';' synonyms."""
    names = list(ADE20K_CLASSES)
    names[0] = "Wall"
    names[1] = "building;edifice"
    names[7] = "bed "
    names[names.index("chest of drawers")] = "chest;of;drawers;chest;bureau;dresser"
    names[names.index("television receiver")] = "television;television;receiver;television;set;tv"
    names[names.index("person")] = "person;individual;someone;somebody;mortal;soul"
    return names


def test_known_label_spaces() -> None:
    assert len(ADE20K_CLASSES) == len(ADE20K_PALETTE) == 150
    assert len(CITYSCAPES_CLASSES) == len(CITYSCAPES_PALETTE) == 19
    assert known_label_space(list(ADE20K_CLASSES)) == "ade20k"
    assert known_label_space(_ade_synonym_labels()) == "ade20k"
    assert known_label_space([n.upper() for n in CITYSCAPES_CLASSES]) == "cityscapes"
    swapped = list(ADE20K_CLASSES)
    swapped[3], swapped[4] = swapped[4], swapped[3]
    assert known_label_space(swapped) is None
    assert known_label_space(["traffic light pole"] + list(CITYSCAPES_CLASSES[1:])) is None
    assert palette_for(swapped) != list(ADE20K_PALETTE) and len(palette_for(swapped)) == 150


def test_checkpoint_class_names_pick_the_palette(tmp_path: Path) -> None:
    ade = save_hf_model(tmp_path / "ade", 150, id2label=dict(enumerate(_ade_synonym_labels())))
    model = load_pretrained(ade)
    assert model.meta.class_names[1] == "building;edifice"
    assert model.meta.palette == list(ADE20K_PALETTE)
    city = save_hf_model(tmp_path / "city", 19, id2label=dict(enumerate(CITYSCAPES_CLASSES)))
    assert load_pretrained(city).meta.palette == list(CITYSCAPES_PALETTE)
    other = save_hf_model(tmp_path / "other", 3, id2label={0: "road", 1: "lane", 2: "car"})
    assert load_pretrained(other).meta.palette == palette_for(["a", "b", "c"])


def test_ade20k_folder_uses_ade20k_names_and_palette(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        image = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(image).save(_mkdir(tmp_path / "images" / split) / "a.jpg")
        Image.fromarray(np.ones((24, 32), np.uint8)).save(_mkdir(tmp_path / "annotations" / split) / "a.png")
    source = open_source(tmp_path, "val")
    assert source.has_masks and source.labels is not None
    assert source.labels.classes == list(ADE20K_CLASSES) and source.labels.palette == list(ADE20K_PALETTE)
    assert source.labels.classes[:3] == ["wall", "building", "sky"]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------
# Plain folders of photos


def test_photo_folder_is_an_image_source(tmp_path: Path) -> None:
    photos = make_photo_folder(tmp_path / "photos", n=6)
    make_photo_folder(photos / "trip", n=2)
    (photos / "notes.txt").write_text("not an image")
    (photos / "._photo_00.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata: skipped
    _mkdir(photos / ".thumbnails")
    (photos / ".thumbnails" / "t.jpg").write_bytes(b"broken")

    train, val = open_source(photos, "train"), open_source(photos, "val")
    assert train.name == f"images:{photos}" and not train.has_masks and train.labels is None
    expected = sorted([*(photos / f"photo_{i:02d}{'.jpg' if i % 2 == 0 else '.png'}" for i in range(6)),
                       photos / "trip" / "photo_00.jpg", photos / "trip" / "photo_01.png"])  # fmt: skip
    assert [s.image for s in train.samples] == [s.image for s in val.samples] == expected
    for i in range(len(train)):
        image, mask = train.load(i)
        assert mask is None and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert np.array_equal(image, np.asarray(Image.open(expected[i]).convert("RGB")))
    assert train.load(1)[0].shape == (217, 329, 3)
    assert train.item_name(0) == "photo_00"


def test_glob_and_explicit_images_specs(tmp_path: Path) -> None:
    photos = make_photo_folder(tmp_path / "photos", n=6)
    make_photo_folder(photos / "trip", n=2)
    jpgs = open_source(f"{photos}/*.jpg", "val")
    assert jpgs.name == f"images:{photos}/*.jpg" and not jpgs.has_masks
    assert [s.image.name for s in jpgs.samples] == ["photo_00.jpg", "photo_02.jpg", "photo_04.jpg"]
    pngs = open_source(f"{photos}/**/*.png", "train")
    assert len(pngs) == 4 and pngs.samples[-1].image == photos / "trip" / "photo_01.png"
    one = open_source(photos / "photo_03.png", "train")
    assert len(one) == 1 and one.load(0)[1] is None
    # images: reads a labelled layout's images without their masks.
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(_mkdir(tmp_path / "ade" / "images" / "training") / "a.jpg")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(_mkdir(tmp_path / "ade" / "annotations" / "training") / "a.png")
    assert open_source(tmp_path / "ade", "train").has_masks
    plain = open_source(f"images:{tmp_path / 'ade'}", "train")
    assert not plain.has_masks and len(plain) == 2  # the image and, read as an image, its annotation


def test_image_source_errors_name_the_path(tmp_path: Path) -> None:
    _mkdir(tmp_path / "empty")
    with pytest.raises(DataError, match=r"empty: no images found"):
        open_source(tmp_path / "empty", "train")
    with pytest.raises(DataError, match=r"photos/\*\.jpg: the pattern matches no image files \(no matches\)"):
        open_source(f"{tmp_path}/photos/*.jpg", "train")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"\*\.txt: the pattern matches no image files \(1 matches, none an image"):
        open_source(f"{tmp_path}/*.txt", "train")
    photos = make_photo_folder(tmp_path / "photos", n=2)
    (photos / "photo_01.png").write_bytes(b"truncated")
    source = open_source(photos, "train")  # a file that does not read is skipped (tests/test_photos.py)
    assert len(source) == 1 and source.skipped[0]["file"].endswith("photo_01.png")
    with pytest.raises(DataError, match=r"photo_01\.png: not a readable image"):
        open_source(photos, "train", strict=True)
    with pytest.raises(DataError, match="unknown split"):
        open_source(photos, "test")
    with pytest.raises(DataError, match="no such data folder"):
        open_source(tmp_path / "missing", "train")
    # A folder with images but only part of a labelled layout stays a clear labelled error, not images.
    generic = tmp_path / "generic"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(_mkdir(generic / "images") / "a.png")
    (generic / "classes.json").write_text(json.dumps({"classes": ["x", "y"]}))
    with pytest.raises(DataError, match=r"a\.png: no mask for this image"):
        open_source(generic, "train")
