"""The model's structure, shapes and exportability."""

from __future__ import annotations

import math

import pytest
import torch
from torch.export import Dim, export

from segformer_edge import create_model
from segformer_edge.model import VARIANTS, SegFormer, SegFormerConfig, match_variant, variant_config


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (97, 131), (33, 250)])
def test_output_is_quarter_resolution(tiny_config: SegFormerConfig, size: tuple[int, int]) -> None:
    model = SegFormer(tiny_config).eval()
    h, w = size
    with torch.no_grad():
        logits = model(torch.randn(2, 3, h, w))
        features = model.encoder(torch.randn(2, 3, h, w))
    # The reference's overlapped patch embedding: conv(7, 4, 3) then three conv(3, 2, 1).
    fh, fw = math.ceil(h / 4), math.ceil(w / 4)
    assert logits.shape == (2, tiny_config.num_classes, fh, fw)
    for i, feature in enumerate(features):
        assert feature.shape == (2, tiny_config.embed_dims[i], fh, fw)
        fh, fw = math.ceil(fh / 2), math.ceil(fw / 2)


def test_feature_info_and_variants() -> None:
    model = create_model("b0", num_classes=19)
    assert [f["num_chs"] for f in model.encoder.feature_info] == [32, 64, 160, 256]
    assert [f["reduction"] for f in model.encoder.feature_info] == [4, 8, 16, 32]
    assert model.decoder.classifier.out_channels == 19
    for name in VARIANTS:
        assert match_variant(variant_config(name, num_classes=3)) == name
    assert match_variant(SegFormerConfig(embed_dims=(8, 16, 40, 64))) == "custom"


def test_no_positional_encoding_and_reference_norm_eps() -> None:
    model = create_model("b0")
    names = [n for n, _ in model.named_parameters()]
    assert not any("pos" in n for n in names)
    block = model.encoder.stages[0].blocks[0]
    assert block.norm1.eps == 1e-6 and block.norm2.eps == 1e-6 and model.encoder.stages[0].norm.eps == 1e-6
    assert block.attn.sr.kernel_size == (8, 8) and block.attn.sr.stride == (8, 8)
    assert model.encoder.stages[3].blocks[0].attn.sr_ratio == 1
    assert block.mlp.dwconv.groups == block.mlp.dwconv.in_channels == 4 * 32


def test_bad_config_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="divisible"):
        SegFormerConfig(embed_dims=(32, 64, 160, 250))
    with pytest.raises(ValueError, match="unknown SegFormer variant"):
        create_model("b9")


def test_param_groups_cover_every_parameter() -> None:
    model = create_model("b0", num_classes=4)
    groups = model.param_groups()
    grouped = sum(len(g) for g in groups.values())
    assert grouped == len(list(model.parameters()))
    assert all(p.ndim == 1 for p in groups["encoder_no_decay"] + groups["head_no_decay"])
    assert any(p is model.decoder.classifier.weight for p in groups["head_decay"])


def test_export_b0_static_and_dynamic() -> None:
    torch.manual_seed(0)
    model = create_model("b0", num_classes=150).eval()
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        static = export(model, (x,))
        torch.testing.assert_close(static.module()(x), model(x), rtol=0, atol=1e-5)
        h, w = Dim("H", min=64, max=4096), Dim("W", min=64, max=4096)
        dynamic = export(model, (torch.randn(1, 3, 128, 160),), dynamic_shapes={"x": {2: h, 3: w}})
        for size in [(64, 96), (97, 131), (512, 512)]:
            y = torch.randn(1, 3, *size)
            torch.testing.assert_close(dynamic.module()(y), model(y), rtol=0, atol=1e-5)
