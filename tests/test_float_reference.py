"""The float model, the reference of every parity check, runs once per image of a run (issue 27: verify's float pass
was the slowest part of a verify, and it ran again for every target on the same photos)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY, make_photo_folder
from segformer_edge.converters.reference import float_logits

import segformer_edge as se
from segformer_edge.inputs import InputSpec
from segformer_edge.model import SegFormer, SegFormerConfig

SIZE = (64, 64)


def _counted(model: Any) -> list[int]:
    """How many real (not traced) forwards ``model`` runs from now on: one entry per image."""
    calls: list[int] = []

    def hook(module: Any, args: tuple[Any, ...]) -> None:
        x = args[0]
        if type(x) is torch.Tensor:  # an export's tracing sees fake or functional tensors, never this type
            calls.append(int(x.shape[0]))

    model.register_forward_pre_hook(hook)
    return calls


@pytest.fixture
def model() -> Any:
    torch.manual_seed(0)
    return SegFormer(SegFormerConfig(**TINY, num_classes=5)).eval()


def test_float_logits_are_remembered_until_the_model_changes(model: Any) -> None:
    spec = InputSpec.for_model(model.meta, SIZE)
    images = np.random.default_rng(0).integers(0, 256, (2, *SIZE, 3), dtype=np.uint8)  # (2, H, W, 3)
    calls = _counted(model)  # the decoder's projected copy counts too: it is a copy of the model, hook included
    first = float_logits(model, spec, images[:1])
    first[:] = 0  # the caller's copy: the remembered logits are not changed by it
    again = float_logits(model, spec, images[:1])
    assert calls == [1, 1] and np.abs(again).max() > 0  # the first image of a model state: both decoder forms (the check)
    float_logits(model, spec, images[1:])  # another image runs
    assert calls == [1, 1, 1]
    with torch.no_grad():
        model.decoder.classifier.bias.add_(1.0)  # an in-place change of one parameter: what was remembered is stale
    changed = float_logits(model, spec, images[:1])
    assert calls == [1] * 5  # checked again: a new state
    np.testing.assert_allclose(changed, again + 1.0, atol=1e-5)
    model.train()  # dropout: never remembered
    float_logits(model, spec, images[:1])
    float_logits(model, spec, images[:1])
    assert calls == [1] * 7


def test_every_target_of_a_run_verifies_against_one_float_pass(model: Any, tmp_path: Path) -> None:
    photos = make_photo_folder(tmp_path / "photos", n=4)
    calls = _counted(model)
    artifacts = se.export(model, target=["onnx", "tflite"], precision="fp32", data=photos, out=tmp_path / "out", size=SIZE)
    assert [a.parity.images for a in artifacts.values()] == [4, 4]
    assert all(a.parity.passed for a in artifacts.values())
    # Once per image, and the first image also with the decoder as trained (the projected reference's check).
    assert calls == [1] * 5, "the float model ran more than once on an image of the run"
