"""The output kinds an app takes: a full-size mask by candidate argmax, a quarter-size mask, probabilities.

The full-size mask no longer upsamples K class maps: each output pixel picks among the top classes of its
four low-resolution neighbours (converters/graph.py, candidate_argmax). Its bilinear arithmetic is checked
exactly (with every class a candidate it must equal upsample-then-argmax bit for bit, borders included), and
the artifacts of a 150-class model made from a transformers checkpoint are checked by verify on real photos.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_photo_folder, run_cli, save_hf_model
from segformer_edge.converters.base import ExportError, ExportOptions, read_manifest
from segformer_edge.converters.graph import MASK_CANDIDATES, candidate_argmax, candidate_base, candidate_mix


def _exact(logits: torch.Tensor) -> torch.Tensor:
    return F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False).argmax(1).to(torch.int32)


@pytest.mark.parametrize(("k", "h", "w"), [(8, 8, 8), (150, 13, 17), (3, 1, 5)])
def test_every_class_a_candidate_is_the_exact_argmax(k: int, h: int, w: int) -> None:
    """With all K classes as candidates the blend is upsample-then-argmax itself: weights and borders exact."""
    logits = torch.randn(2, k, h, w, generator=torch.Generator().manual_seed(k))
    assert torch.equal(candidate_argmax(logits, candidate_mix(), candidate_base(k, h, w, batch=2), topk=k), _exact(logits))


def test_two_candidates_per_neighbour_on_smooth_logits() -> None:
    """Smooth logits of 150 equally likely random classes (many near-ties: harder than a trained head's): the
    default two candidates per neighbour agree with the exact mask on at least 99.9% of pixels, one (each
    neighbour's top class) measurably less (97.8%); either gives the exact label wherever the four neighbours
    share their top class."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(4, 150, 8, 8, generator=g) * 4
    logits = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    logits = logits + 0.05 * torch.randn(logits.shape, generator=g)  # (4, 150, 32, 32)
    exact = _exact(logits)
    base = candidate_base(150, 32, 32, batch=4)
    default = candidate_argmax(logits, candidate_mix(), base)
    top1 = candidate_argmax(logits, candidate_mix(), base, topk=1)
    two, one = ((m == exact).float().mean().item() for m in (default, top1))
    assert MASK_CANDIDATES == 2 and two >= 0.999 and one < two, (one, two)
    # ExecuTorch's runner-up by a second argmax (its portable topk sorts) gives the same labels.
    assert torch.equal(candidate_argmax(logits, candidate_mix(), base, runner_up="rescan"), default)
    # Where the four neighbours of an output pixel share their top class, that class is the exact label.
    top = F.pad(logits.argmax(1, keepdim=True).float(), (1, 1, 1, 1), mode="replicate")  # (4, 1, 34, 34)
    spread = F.max_pool2d(top, 2, 1) + F.max_pool2d(-top, 2, 1)  # (4, 1, 33, 33): max - min over each cell
    agreed = F.interpolate(spread, scale_factor=4, mode="nearest")[:, 0, 2:130, 2:130] == 0  # (4, 128, 128)
    assert agreed.float().mean() > 0.25 and torch.equal(top1[agreed], exact[agreed])


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mask")
    return {"root": root, "model": save_hf_model(root / "ade-tiny"), "photos": make_photo_folder(root / "photos", n=3)}


@pytest.mark.parametrize(("target", "args", "shape", "dtype"), [
    ("tflite", ["--output", "mask"], [1, 64, 64], "int32"),
    ("onnx", ["--output", "mask", "--mask-size", "quarter"], [1, 16, 16], "int32"),
    ("executorch", ["--output", "probs"], [1, 150, 16, 16], "float32"),
])  # fmt: skip
def test_output_kinds_of_a_150_class_model_on_photos(user, tmp_path: Path, capsys, target: str, args: list[str],
                                                     shape: list[int], dtype: str) -> None:  # fmt: skip
    code, stdout, err = run_cli(["export", user["model"], "--target", target, *args, "--size", "64", "64", "--data",
                                 user["photos"], "--verify-images", "3", "--out", tmp_path, "--json"], capsys)  # fmt: skip
    assert code == 0, err
    (row,) = json.loads(stdout)
    assert row["status"] == "passed" and row["pixel_agreement"] >= 0.999, row
    artifact = read_manifest(Path(row["artifact"]))
    output = artifact.manifest["output"]
    assert output["shape"] == shape and output["dtype"] == dtype, output
    if "mask" in args:
        method = "quarter" if "quarter" in args else "candidates"
        assert output["method"] == method and Path(row["artifact"]).name.endswith("mask-quarter" if method == "quarter" else "mask")
    # The artifact's own output, read by its runtime, has the manifest's shape and dtype.
    from segformer_edge.converters import get_target

    from segformer_edge.inputs import InputSpec

    spec = InputSpec.from_manifest(artifact.manifest["input"])
    out = np.asarray(get_target(target).load(artifact)(spec(np.zeros((1, 64, 64, 3), np.uint8))))
    assert list(out.shape) == shape and out.dtype == np.dtype(dtype)
    if "probs" in args:
        assert np.allclose(out.sum(axis=1), 1.0, atol=1e-4) and (out >= 0).all()
    # predict reads every kind back to a photo-size mask.
    code, _, err = run_cli(["predict", row["artifact"], user["photos"], "--out", tmp_path / "pred"], capsys)
    assert code == 0, err
    assert len(list((tmp_path / "pred").glob("*_mask.png"))) == 3


def test_mask_size_without_a_mask_is_refused() -> None:
    with pytest.raises(ExportError, match="--mask-size quarter needs --output mask"):
        ExportOptions(output="logits", mask_size="quarter")
    with pytest.raises(ExportError, match="--mask-size half: choose one of full, quarter, full-exact"):
        ExportOptions(output="mask", mask_size="half")
