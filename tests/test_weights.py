"""Checkpoint import: Hugging Face and NVlabs/mmseg layouts, our own format, and strictness."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from segformer_edge import create_model, load_pretrained, save_checkpoint
from segformer_edge.errors import CheckpointError
from segformer_edge.model import VARIANTS

transformers = pytest.importorskip("transformers")


def _hf_model(variant: str, num_labels: int, seed: int = 0) -> torch.nn.Module:
    spec = VARIANTS[variant]
    config = transformers.SegformerConfig(
        hidden_sizes=list(spec["embed_dims"]),
        depths=list(spec["depths"]),
        decoder_hidden_size=spec["decoder_dim"],
        num_labels=num_labels,
        id2label={i: f"thing{i}" for i in range(num_labels)},
        label2id={f"thing{i}": i for i in range(num_labels)},
    )
    torch.manual_seed(seed)
    model = transformers.SegformerForSemanticSegmentation(config).eval()
    # Non-trivial BatchNorm statistics, so that the decoder's BN is really checked.
    bn = model.decode_head.batch_norm
    bn.running_mean.normal_(0, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return model


def _hf_to_mmseg(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rewrite Hugging Face keys in the original NVlabs/mmseg layout (written independently of the loader)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.match(r"segformer\.encoder\.block\.(\d)\.(\d+)\.(.*)", key)
        if m:
            s, j, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
            rest = (
                rest.replace("layer_norm_1", "norm1")
                .replace("layer_norm_2", "norm2")
                .replace("attention.self.query", "attn.q")
                .replace("attention.self.sr", "attn.sr")
                .replace("attention.self.layer_norm", "attn.norm")
                .replace("attention.output.dense", "attn.proj")
                .replace("mlp.dense1", "mlp.fc1")
                .replace("mlp.dense2", "mlp.fc2")
            )
            if "attention.self.key" in rest:
                value_key = key.replace(".key.", ".value.")
                out[f"backbone.block{s}.{j}." + rest.replace("attention.self.key", "attn.kv")] = torch.cat(
                    [value, state[value_key]]
                )
                continue
            if "attention.self.value" in rest:
                continue
            out[f"backbone.block{s}.{j}.{rest}"] = value
            continue
        m = re.match(r"segformer\.encoder\.patch_embeddings\.(\d)\.(proj|layer_norm)\.(.*)", key)
        if m:
            part = "norm" if m.group(2) == "layer_norm" else "proj"
            out[f"backbone.patch_embed{int(m.group(1)) + 1}.{part}.{m.group(3)}"] = value
            continue
        m = re.match(r"segformer\.encoder\.layer_norm\.(\d)\.(.*)", key)
        if m:
            out[f"backbone.norm{int(m.group(1)) + 1}.{m.group(2)}"] = value
            continue
        m = re.match(r"decode_head\.linear_c\.(\d)\.proj\.(.*)", key)
        if m:
            out[f"decode_head.linear_c{int(m.group(1)) + 1}.proj.{m.group(2)}"] = value
            continue
        key = key.replace("decode_head.linear_fuse.", "decode_head.linear_fuse.conv.")
        key = key.replace("decode_head.batch_norm.", "decode_head.linear_fuse.bn.")
        key = key.replace("decode_head.classifier.", "decode_head.linear_pred.")
        out[key] = value
    # mmseg's unused BaseDecodeHead classifier, present in the released checkpoints.
    classes = state["decode_head.classifier.weight"].shape[0]
    out["decode_head.conv_seg.weight"] = torch.zeros(classes, 256, 1, 1)
    out["decode_head.conv_seg.bias"] = torch.zeros(classes)
    return out


def _saved_state(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors as save_pretrained wrote them (the hub layout; transformers 5 renames modules in memory)."""
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


CASES = [("b0", 150), ("b1", 19), ("b2", 7), ("b3", 2), ("b4", 11), ("b5", 3)]


@pytest.mark.parametrize(("variant", "num_labels"), CASES)
def test_hugging_face_and_mmseg_parity(variant: str, num_labels: int, tmp_path: Path) -> None:
    hf = _hf_model(variant, num_labels)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    assert ours.config.variant == variant and ours.config.num_classes == num_labels
    assert ours.meta.class_names == [f"thing{i}" for i in range(num_labels)]
    assert not ours.training

    pth = tmp_path / "segformer.pth"
    state = _hf_to_mmseg(_saved_state(tmp_path / "hf"))
    torch.save({"meta": {"CLASSES": tuple(f"c{i}" for i in range(num_labels))}, "state_dict": state}, pth)
    from_mmseg = load_pretrained(pth)
    assert from_mmseg.config == ours.config
    assert from_mmseg.meta.class_names[0] == "c0"

    sizes = [(64, 64), (97, 131)] + ([(512, 512)] if variant == "b0" else [])
    torch.manual_seed(1)
    for h, w in sizes:
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            reference = hf(pixel_values=x).logits
            a, b = ours(x), from_mmseg(x)
        assert a.shape == reference.shape
        assert (a - reference).abs().max().item() <= 1e-4
        assert (b - reference).abs().max().item() <= 1e-4


def test_encoder_only_hf_checkpoint_needs_class_count(tmp_path: Path) -> None:
    config = transformers.SegformerConfig(num_labels=1000)
    torch.manual_seed(0)
    transformers.SegformerForImageClassification(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="pass num_classes"):
        load_pretrained(tmp_path)
    model = load_pretrained(tmp_path, num_classes=6)
    assert model.config.num_classes == 6 and model.config.variant == "b0"
    hf = transformers.SegformerModel.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model.encoder(x)[-1]
        theirs = hf(pixel_values=x).last_hidden_state
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_own_checkpoint_round_trip(tmp_path: Path, tiny_config) -> None:
    from segformer_edge.model import SegFormer
    from segformer_edge.weights import read_checkpoint_meta

    torch.manual_seed(0)
    model = SegFormer(tiny_config).eval()
    model.meta.class_names = ["sky", "road", "car", "tree", "person"]
    model.meta.input_size = (96, 160)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load_pretrained(path)
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    config, meta = read_checkpoint_meta(path)
    assert config == tiny_config and meta.class_names[0] == "sky" and meta.input_size == (96, 160)

    half = save_checkpoint(model, tmp_path / "half.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.6 * path.stat().st_size
    with torch.no_grad():
        assert (load_pretrained(half)(x) - model(x)).abs().max().item() < 5e-2
    with pytest.raises(CheckpointError, match="has 5 classes, but num_classes=4"):
        load_pretrained(path, num_classes=4)


def test_strict_loading_names_the_keys(tmp_path: Path) -> None:
    hf = _hf_model("b0", 4)
    hf.save_pretrained(tmp_path / "hf")
    state = _hf_to_mmseg(_saved_state(tmp_path / "hf"))
    del state["backbone.block1.0.attn.q.weight"]
    state["backbone.block1.0.attn.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as info:
        load_pretrained(tmp_path / "broken.pth")
    message = str(info.value)
    assert "broken.pth" in message
    assert "missing keys: encoder.stages.0.blocks.0.attn.q.weight" in message
    assert "unexpected keys: backbone.block1.0.attn.extra.weight" in message

    state = _hf_to_mmseg(_saved_state(tmp_path / "hf"))
    state["decode_head.linear_c1.proj.weight"] = torch.zeros(256, 16)
    torch.save(state, tmp_path / "narrow.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatch for decoder\.linear_c\.0\.weight"):
        load_pretrained(tmp_path / "narrow.pth")

    config = (tmp_path / "hf" / "config.json").read_text().replace('"decoder_hidden_size": 256', '"decoder_hidden_size": 128')
    (tmp_path / "hf" / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match="decoder_hidden_size is 128 but the weights have 256"):
        load_pretrained(tmp_path / "hf")


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"w": Payload()}}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_pretrained(tmp_path / "evil.pth")
    assert not marker.exists()


def test_bad_files(tmp_path: Path) -> None:
    torch.save(create_model("b0", num_classes=3).state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a checkpoint\xff" * 10)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00not a checkpoint\xff" * 10)
    torch.save({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, tmp_path / "resnet.pth")
    (tmp_path / "empty_dir").mkdir()
    cases = {
        "truncated.pth": "corrupt or truncated",
        "garbage.pth": "corrupt",
        "garbage.safetensors": "not a readable safetensors",
        "resnet.pth": "not a SegFormer checkpoint",
        "empty_dir": "config.json is missing",
        "missing.pth": "no such file",
    }
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as info:
            load_pretrained(tmp_path / name)
        assert name in str(info.value)
