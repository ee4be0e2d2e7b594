"""Bad input, interrupted runs and untrusted files, through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, folder_snapshot, run_cli
from PIL import Image

from segformer_edge import save_checkpoint
from segformer_edge.model import SegFormer, SegFormerConfig


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small bad (and good) files that the cases below point at."""
    root = tmp_path_factory.mktemp("corpus")
    torch.manual_seed(0)
    model = SegFormer(SegFormerConfig(**TINY, num_classes=5))
    model.meta.input_size = (64, 64)
    save_checkpoint(model, root / "five.safetensors")
    eight = SegFormer(SegFormerConfig(**TINY, num_classes=8))
    eight.meta.input_size = (64, 64)
    save_checkpoint(eight, root / "eight.safetensors")
    save_checkpoint(SegFormer(SegFormerConfig(**TINY, num_classes=8)), root / "other.safetensors")
    data = (root / "five.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    torch.save({"w": torch.zeros(1000)}, root / "good.pth")
    raw = (root / "good.pth").read_bytes()
    (root / "truncated.pth").write_bytes(raw[: len(raw) // 2])
    (root / "hf_no_weights").mkdir()
    (root / "hf_no_weights" / "config.json").write_text(json.dumps({"model_type": "segformer", "id2label": {"0": "a", "1": "b"}}))
    (root / "hf_bad_json").mkdir()
    (root / "hf_bad_json" / "config.json").write_text("{not json")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {root / 'pwned'}",))

    torch.save({"state_dict": {"w": Payload()}}, root / "evil.pth")
    (root / "notimage.png").write_text("this is text")
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(root / "ok.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(root / "whole.jpg")
    whole = (root / "whole.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(whole[: len(whole) * 2 // 3])

    def generic(name: str, mask: np.ndarray, image_shape=(20, 30, 3)) -> None:
        folder = root / name
        (folder / "images").mkdir(parents=True)
        (folder / "masks").mkdir()
        Image.fromarray(np.zeros(image_shape, np.uint8)).save(folder / "images" / "a.png")
        Image.fromarray(mask).save(folder / "masks" / "a.png")
        (folder / "classes.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(5)]}))

    generic("labels_out_of_range", np.full((20, 30), 9, np.uint8))
    generic("mask_wrong_size", np.zeros((10, 30), np.uint8))
    (root / "empty" / "images").mkdir(parents=True)
    (root / "empty" / "masks").mkdir()
    (root / "empty" / "classes.json").write_text(json.dumps({"classes": ["a", "b"]}))
    (root / "a_file").write_text("not a folder")
    (root / "not_a_run.pt").write_bytes(raw)
    return root


def _exported(corpus: Path, name: str) -> Path:
    """An onnx artifact of five.safetensors, copied so each case may damage its own."""
    source = corpus / "exports" / "segformer-custom_onnx_fp32"
    if not source.exists():
        code = subprocess.run(
            [sys.executable, "-m", "segformer_edge", "export", corpus / "eight.safetensors", "--target", "onnx",
             "--out", corpus / "exports", "--no-verify"], capture_output=True, text=True,
        )  # fmt: skip
        assert code.returncode == 0, code.stderr
    target = corpus / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    return target


def _tamper_sha(folder: Path) -> Path:
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes() + b"\0")
    return folder


def _escape(folder: Path) -> Path:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["file"] = "../five.safetensors"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _bad_manifest(folder: Path) -> Path:
    (folder / "manifest.json").write_text("{")
    return folder


# (case id, argv builder, expected message fragment). {c} is the corpus folder, {o} a fresh output folder.
CASES = [
    ("truncated-safetensors", ["info", "{c}/truncated.safetensors"], "truncated.safetensors: not a readable safetensors"),
    ("truncated-pth", ["info", "{c}/truncated.pth"], "truncated.pth: corrupt or truncated"),
    ("hf-missing-weights", ["info", "{c}/hf_no_weights"], "hf_no_weights: no weights found"),
    ("hf-bad-config", ["info", "{c}/hf_bad_json"], "config.json: not a readable JSON config"),
    ("malicious-pickle", ["info", "{c}/evil.pth"], "evil.pth: refused to unpickle"),
    ("missing-checkpoint", ["export", "{c}/nope.safetensors", "--out", "{o}"], "nope.safetensors: no such file"),
    ("classes-differ-from-data", ["eval", "{c}/five.safetensors", "--data", "synthetic:20"], "the data has 8 classes but the model has 5"),
    ("not-an-image", ["predict", "{c}/five.safetensors", "{c}/notimage.png", "--out", "{o}"], "notimage.png: not a readable image"),
    ("no-readable-image", ["predict", "{c}/five.safetensors", "{c}/notimage.png", "{c}/truncated.jpg", "--out", "{o}"], "none of its 2 image files is readable"),
    ("unreadable-image-strict", ["predict", "{c}/five.safetensors", "{c}/ok.png", "{c}/truncated.jpg", "--strict", "--out", "{o}"], "truncated.jpg: not a readable image (OSError: image file is truncated"),
    ("labels-out-of-range", ["eval", "{c}/five.safetensors", "--data", "{c}/labels_out_of_range", "--split", "train"], "a.png: label 9 is out of range for 5 classes"),
    ("mask-size-differs", ["eval", "{c}/five.safetensors", "--data", "{c}/mask_wrong_size", "--split", "train"], "a.png: mask is 30x10 but its image is 30x20"),
    ("empty-data-folder", ["eval", "{c}/five.safetensors", "--data", "{c}/empty", "--split", "train"], "no images found"),
    ("missing-data-folder", ["eval", "{c}/five.safetensors", "--data", "{c}/nowhere"], "nowhere: no such data folder"),
    ("unknown-target", ["export", "{c}/five.safetensors", "--target", "tensorrt", "--out", "{o}"], "unknown target 'tensorrt'"),
    ("unknown-precision", ["export", "{c}/five.safetensors", "--target", "onnx", "--precision", "int4", "--out", "{o}"], "--precision int4"),
    ("unknown-input-kind", ["export", "{c}/five.safetensors", "--target", "onnx", "--input", "bgr", "--out", "{o}"], "--input bgr"),
    ("size-too-small", ["export", "{c}/five.safetensors", "--size", "16", "16", "--out", "{o}"], "16x16 is out of range"),
    ("size-absurd", ["export", "{c}/five.safetensors", "--size", "100000", "100000", "--out", "{o}"], "100000x100000 is out of range"),
    ("unwritable-output", ["predict", "{c}/five.safetensors", "{c}/ok.png", "--out", "{c}/a_file/sub"], "a_file/sub"),
    ("artifact-from-other-checkpoint", ["verify", "@copy", "--checkpoint", "{c}/other.safetensors"], "not the checkpoint"),
    ("artifact-sha-mismatch", ["verify", "@tamper"], "does not match the manifest"),
    ("manifest-path-escapes", ["verify", "@escape"], "not a plain name inside the artifact folder"),
    ("manifest-not-json", ["bench", "@badjson"], "manifest.json: not a readable manifest"),
    ("missing-artifact", ["bench", "{c}/no_artifact"], "no_artifact: no such artifact"),
    ("resume-not-a-run", ["train", "--resume", "{c}/not_a_run.pt"], "no config.json beside it"),
    ("unknown-preset", ["train", "--preset", "imagenet", "--out", "{o}"], "unknown preset 'imagenet'"),
    ("bad-eval-mode", ["eval", "{c}/five.safetensors", "--mode", "tiles"], "'tiles': choose whole or slide"),
    ("bad-threads", ["bench", "{c}/no_artifact", "--threads", "two"], "'two': give positive integers"),
    ("zero-scenes", ["data", "synth", "--out", "{o}", "--num", "0"], "--num"),
]

ARTIFACT_PREP = {"@copy": lambda f: f, "@tamper": _tamper_sha, "@escape": _escape, "@badjson": _bad_manifest}


@pytest.mark.parametrize(("case", "argv", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(
    corpus: Path, tmp_path: Path, case: str, argv: list[str], message: str, capsys
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("yesterday's good artifact")
    args = []
    for a in argv:
        if a in ARTIFACT_PREP:
            a = str(ARTIFACT_PREP[a](_exported(corpus, f"art_{case}")))
        args.append(a.format(c=corpus, o=out))
    before_out, before_corpus = folder_snapshot(out), folder_snapshot(corpus)
    code, stdout, err = run_cli(args, capsys)
    assert code == 2, (code, stdout, err)
    text = " ".join(err.split())  # Typer boxes usage errors; compare without the line breaks
    assert message in text, err
    assert "Traceback" not in err + stdout
    if err.startswith("error: "):
        assert len(err.strip().splitlines()) == 1, err
    assert folder_snapshot(out) == before_out
    after = folder_snapshot(corpus)
    assert {k: v for k, v in after.items() if not k.startswith("art_")} == {
        k: v for k, v in before_corpus.items() if not k.startswith("art_")
    }
    assert not (corpus / "pwned").exists()


def test_corpus_has_at_least_25_cases() -> None:
    assert len({c[0] for c in CASES}) >= 25


def _wait_for(predicate, timeout: float = 240.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_sigterm_during_export_keeps_the_previous_artifact(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "exports"
    cmd = [sys.executable, "-m", "segformer_edge", "export", str(corpus / "eight.safetensors"), "--target", "tflite",
           "--out", str(out), "--verify-images", "1"]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    before = folder_snapshot(out)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    temp_seen = _wait_for(lambda: any(p.name.endswith(".tmp") for p in out.iterdir()))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert temp_seen, "the export never reached its temporary folder"
    assert proc.returncode == 130, err
    assert folder_snapshot(out) == before
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))]


def _manifest_complete(folder: Path) -> bool:
    manifest = json.loads((folder / "manifest.json").read_text())
    keys = {"format", "target", "precision", "input", "output", "checkpoint", "tool_versions", "file", "sha256", "size_bytes"}
    return keys <= set(manifest) and manifest["parity"]["status"] == "passed" and "pixel_agreement" in manifest["parity"]


@pytest.mark.parametrize("moment", ["capture", "lower", "verify"])
def test_sigkill_at_any_step_leaves_the_old_or_a_complete_new_artifact(corpus: Path, tmp_path: Path, moment: str) -> None:
    """SIGKILL (no cleanup possible) while the export captures, lowers or verifies: the artifact folder is
    the previous one byte for byte, or a complete new one whose manifest holds the parity figures."""
    out = tmp_path / "exports"
    cmd = [sys.executable, "-m", "segformer_edge", "export", str(corpus / "eight.safetensors"), "--target", "onnx",
           "--out", str(out), "--verify-images", "2"]  # fmt: skip
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    folder = out / "segformer-custom_onnx_fp32"
    before = folder_snapshot(folder)

    def tmp_holds(*names: str) -> bool:
        return any(all((t / n).exists() for n in names) for t in out.glob(".*.tmp"))

    reached = {"capture": lambda: tmp_holds("export.log"), "lower": lambda: tmp_holds("model.onnx"),
               "verify": lambda: tmp_holds("model.onnx", "manifest.json")}[moment]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = _wait_for(reached)
    proc.kill()
    proc.wait(timeout=60)
    after = folder_snapshot(folder)
    assert after == before or _manifest_complete(folder), moment
    assert seen or after != before, f"the export never reached {moment}"


def test_killed_training_resumes_from_its_last_checkpoint(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = [sys.executable, "-m", "segformer_edge", "train", "--preset", "reference", "--init", str(corpus / "eight.safetensors"),
            "--data", "synthetic:24", "--crop", "64", "64", "--batch-size", "2", "--iters", "160", "--ckpt-interval", "5",
            "--eval-interval", "1000", "--workers", "0", "--out", str(run)]  # fmt: skip
    proc = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: (run / "last.pt").exists())
    time.sleep(1.0)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait(timeout=60)
    state = torch.load(run / "last.pt", weights_only=True)
    saved = int(state["iteration"])
    log = run / "log.jsonl"
    logged = [json.loads(line)["iter"] for line in log.read_text().splitlines() if line] if log.exists() else []
    assert 5 <= saved < 160, saved  # killed mid-run (about 20 iterations in, here)
    assert max(logged, default=saved) - saved < 5 + 20  # at most one checkpoint interval lost
    resumed = subprocess.run(
        [sys.executable, "-m", "segformer_edge", "train", "--resume", str(run / "last.pt")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert int(torch.load(run / "last.pt", weights_only=True)["iteration"]) == 160
    assert (run / "final.safetensors").is_file()
    iters = [json.loads(line)["iter"] for line in (run / "log.jsonl").read_text().splitlines() if "loss" in line]
    assert iters == sorted(iters) and iters[-1] == 160
