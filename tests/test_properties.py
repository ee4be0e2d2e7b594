"""Property tests: random sizes and aspect ratios through the model and the dynamic-shape artifacts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from segformer_edge.converters.base import ExportOptions, read_manifest
from segformer_edge.converters.onnx import OnnxRunner
from segformer_edge.converters.pipeline import export_artifact

from segformer_edge import load_pretrained
from segformer_edge.model import SegFormer

transformers = pytest.importorskip("transformers")
sizes = st.tuples(st.integers(32, 1024), st.integers(32, 1024))
BUDGET = settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[SegFormer, torch.nn.Module]:
    """Our tiny model and the same weights in transformers' implementation (the reference)."""
    config = transformers.SegformerConfig(
        hidden_sizes=list(TINY["embed_dims"]), depths=list(TINY["depths"]), num_attention_heads=list(TINY["num_heads"]),
        decoder_hidden_size=TINY["decoder_dim"], num_labels=6,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.SegformerForSemanticSegmentation(config).eval()
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    return load_pretrained(folder), hf


@BUDGET
@given(size=sizes)
def test_model_matches_reference_at_any_size(pair, size: tuple[int, int]) -> None:
    ours, hf = pair
    h, w = size
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h * 4096 + w))
    with torch.no_grad():
        a, b = ours(x), hf(pixel_values=x).logits
    assert a.shape == b.shape == (1, 6, math.ceil(h / 4), math.ceil(w / 4))
    assert (a - b).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def onnx_dynamic(pair, tmp_path_factory: pytest.TempPathFactory) -> OnnxRunner:
    ours, _ = pair
    artifact, _ = export_artifact(ours, "onnx", ExportOptions(size=(96, 128), dynamic=True), tmp_path_factory.mktemp("onnx"), verify=False)
    return OnnxRunner(read_manifest(artifact.folder))


@BUDGET
@given(size=st.tuples(st.integers(64, 1024), st.integers(64, 1024)))
def test_dynamic_onnx_artifact_at_any_size(pair, onnx_dynamic: OnnxRunner, size: tuple[int, int]) -> None:
    ours, _ = pair
    h, w = size
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h * 4096 + w))
    with torch.no_grad():
        expected = ours(x).numpy()
    out = onnx_dynamic(x.numpy())
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() <= 1e-3


