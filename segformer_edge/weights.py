"""Checkpoints: our own format, Hugging Face SegFormer directories and the original NVlabs/mmseg ``.pth``.

Every format loads strictly: keys that are missing or left over, and shapes that disagree, are an error
that names them. Pickled files load with ``weights_only=True``; nothing here ever runs remote code.

Our own checkpoint is one ``.safetensors`` file whose metadata holds the architecture and the
preprocessing (:class:`~segformer_edge.model.ModelMeta`), so that the file alone rebuilds the model.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import CheckpointError
from .hub import resolve_model_path
from .io import atomic_path
from .model import ModelMeta, SegFormer, SegFormerConfig, match_variant, variant_config
from .palettes import palette_for

__all__ = ["load_pretrained", "load_state_dict_strict", "read_checkpoint_meta", "save_checkpoint"]

logger = logging.getLogger(__name__)

FORMAT_TAG = "segformer-edge/1"

# Foreign key -> our key. Each rule is (regex on the foreign key, replacement).
_HF_RULES: list[tuple[str, str]] = [
    (r"^segformer\.encoder\.patch_embeddings\.(\d)\.proj\.", r"encoder.stages.\1.patch_embed.proj."),
    (r"^segformer\.encoder\.patch_embeddings\.(\d)\.layer_norm\.", r"encoder.stages.\1.patch_embed.norm."),
    (r"^segformer\.encoder\.block\.(\d)\.(\d+)\.layer_norm_1\.", r"encoder.stages.\1.blocks.\2.norm1."),
    (r"^segformer\.encoder\.block\.(\d)\.(\d+)\.layer_norm_2\.", r"encoder.stages.\1.blocks.\2.norm2."),
    (r"^segformer\.encoder\.block\.(\d)\.(\d+)\.attention\.self\.query\.", r"encoder.stages.\1.blocks.\2.attn.q."),
    (r"^segformer\.encoder\.block\.(\d)\.(\d+)\.attention\.self\.key\.", r"encoder.stages.\1.blocks.\2.attn.k."),
    (r"^segformer\.encoder\.block\.(\d)\.(\d+)\.attention\.self\.value\.", r"encoder.stages.\1.blocks.\2.attn.v."),
    (r"^segformer\.encoder\.block\.(\d)\.(\d+)\.attention\.self\.sr\.", r"encoder.stages.\1.blocks.\2.attn.sr."),
    (
        r"^segformer\.encoder\.block\.(\d)\.(\d+)\.attention\.self\.layer_norm\.",
        r"encoder.stages.\1.blocks.\2.attn.sr_norm.",
    ),
    (r"^segformer\.encoder\.block\.(\d)\.(\d+)\.attention\.output\.dense\.", r"encoder.stages.\1.blocks.\2.attn.proj."),
    (r"^segformer\.encoder\.block\.(\d)\.(\d+)\.mlp\.dense1\.", r"encoder.stages.\1.blocks.\2.mlp.fc1."),
    (r"^segformer\.encoder\.block\.(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.", r"encoder.stages.\1.blocks.\2.mlp.dwconv."),
    (r"^segformer\.encoder\.block\.(\d)\.(\d+)\.mlp\.dense2\.", r"encoder.stages.\1.blocks.\2.mlp.fc2."),
    (r"^segformer\.encoder\.layer_norm\.(\d)\.", r"encoder.stages.\1.norm."),
    (r"^decode_head\.linear_c\.(\d)\.proj\.", r"decoder.linear_c.\1."),
    (r"^decode_head\.linear_fuse\.", r"decoder.fuse."),
    (r"^decode_head\.batch_norm\.", r"decoder.bn."),
    (r"^decode_head\.classifier\.", r"decoder.classifier."),
]
# The ImageNet classifier of encoder-only (mit-bX) checkpoints: recognised and dropped.
_HF_DROPPED = re.compile(r"^classifier\.")


def _stage(m: re.Match[str], group: int = 1) -> str:
    return str(int(m.group(group)) - 1)


_MMSEG_RULES: list[tuple[str, Callable[[re.Match[str]], str]]] = [
    (r"^(?:backbone\.)?patch_embed(\d)\.(proj|norm)\.", lambda m: f"encoder.stages.{_stage(m)}.patch_embed.{m.group(2)}."),
    (
        r"^(?:backbone\.)?block(\d)\.(\d+)\.(norm1|norm2|attn\.q|attn\.sr|attn\.proj|mlp\.fc1|mlp\.fc2)\.",
        lambda m: f"encoder.stages.{_stage(m)}.blocks.{m.group(2)}.{m.group(3)}.",
    ),
    (r"^(?:backbone\.)?block(\d)\.(\d+)\.attn\.norm\.", lambda m: f"encoder.stages.{_stage(m)}.blocks.{m.group(2)}.attn.sr_norm."),
    (r"^(?:backbone\.)?block(\d)\.(\d+)\.attn\.kv\.", lambda m: f"encoder.stages.{_stage(m)}.blocks.{m.group(2)}.attn.kv."),
    (
        r"^(?:backbone\.)?block(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.",
        lambda m: f"encoder.stages.{_stage(m)}.blocks.{m.group(2)}.mlp.dwconv.",
    ),
    (r"^(?:backbone\.)?norm(\d)\.", lambda m: f"encoder.stages.{_stage(m)}.norm."),
    (r"^decode_head\.linear_c(\d)\.proj\.", lambda m: f"decoder.linear_c.{_stage(m)}."),
    (r"^decode_head\.linear_fuse\.conv\.", lambda m: "decoder.fuse."),
    (r"^decode_head\.linear_fuse\.bn\.", lambda m: "decoder.bn."),
    (r"^decode_head\.linear_pred\.", lambda m: "decoder.classifier."),
]
# mmseg's BaseDecodeHead creates `conv_seg`, which SegFormerHead never uses; NVlabs' ImageNet
# checkpoints carry a classification `head`. Both are recognised and dropped.
_MMSEG_DROPPED = re.compile(r"^(decode_head\.conv_seg\.|head\.)")


# ---------------------------------------------------------------------------------------------------
# Reading raw files


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from exc
    return tensors, metadata


def _read_pickle(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):
            raise CheckpointError(f"{path}: corrupt checkpoint: not a PyTorch file or a damaged one") from exc
        raise CheckpointError(
            f"{path}: refused to unpickle: the file holds objects other than tensors and plain containers "
            "(loading uses weights_only=True, so untrusted code never runs); re-save it as a state dict"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """The tensor mapping inside a pickled checkpoint (mmcv wraps it in ``state_dict``, others in ``model``)."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        if tensors and len(tensors) == len(obj):
            return dict(tensors)
    raise CheckpointError(f"{path}: not a SegFormer checkpoint: expected a mapping of parameter names to tensors")


# ---------------------------------------------------------------------------------------------------
# Strict loading


def load_state_dict_strict(
    model: SegFormer, tensors: Mapping[str, Tensor], source: str | Path, *, encoder_only: bool = False
) -> None:
    """Copy ``tensors`` (already in our key layout) into ``model``; any mismatch is a :class:`CheckpointError`.

    With ``encoder_only`` the decoder keys are allowed to be absent (they keep their initialisation).
    A ``(C, Cin)`` tensor fills a ``(C, Cin, 1, 1)`` 1x1 conv, the reference's Linear on tokens.
    """
    own = model.state_dict()
    expected = {k for k in own if not (encoder_only and k.startswith("decoder."))}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    problems = []
    if missing:
        problems.append(f"missing keys: {_name_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_name_some(unexpected)}")
    converted: dict[str, Tensor] = {}
    for key in sorted(set(tensors) & set(own)):
        src, dst = tensors[key], own[key]
        if src.shape != dst.shape and tuple(src.shape) + (1, 1) == tuple(dst.shape):
            src = src.reshape(dst.shape)
        if src.shape != dst.shape:
            problems.append(f"shape mismatch for {key}: checkpoint {tuple(src.shape)}, model {tuple(dst.shape)}")
            continue
        converted[key] = src.to(dst.dtype)
    if problems:
        raise CheckpointError(f"{source}: does not match the model: " + "; ".join(problems))
    model.load_state_dict(converted, strict=not encoder_only)


def _name_some(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


# ---------------------------------------------------------------------------------------------------
# Key layouts


def _remap(
    tensors: Mapping[str, Tensor], rules: list[tuple[str, Any]], dropped: re.Pattern[str]
) -> dict[str, Tensor]:
    """Rename foreign keys to ours. Keys that no rule matches are kept as they are (strict loading names them)."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if dropped.match(key):
            logger.info("dropping %s: not part of a SegFormer for segmentation", key)
            continue
        for pattern, repl in compiled:
            m = pattern.match(key)
            if m:
                prefix = m.expand(repl) if isinstance(repl, str) else repl(m)
                key = prefix + key[m.end() :]
                break
        out[key] = value
    return out


def _split_kv(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """NVlabs fuses K and V into one ``kv`` Linear of 2C outputs; ours keeps them apart (K first)."""
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if ".attn.kv." in key:
            k, v = value.chunk(2, dim=0)
            out[key.replace(".attn.kv.", ".attn.k.")] = k
            out[key.replace(".attn.kv.", ".attn.v.")] = v
        else:
            out[key] = value
    return out


def _detect_layout(keys: list[str]) -> str:
    if any(k.startswith("encoder.stages.") for k in keys):
        return "ours"
    if any(k.startswith("segformer.encoder.") for k in keys):
        return "hf"
    stripped = [k.removeprefix("backbone.") for k in keys]
    if any(re.match(r"^(block\d|patch_embed\d)\.", k) for k in stripped):
        return "mmseg"
    return "unknown"


def _config_from_mmseg(tensors: Mapping[str, Tensor], path: Path, num_classes: int | None) -> tuple[SegFormerConfig, bool]:
    """Infer the architecture from tensor shapes. Heads cannot be read from weights: MiT always uses 1, 2, 5, 8."""
    dims, depths, srs = [], [], []
    for s in range(4):
        w = tensors.get(f"encoder.stages.{s}.patch_embed.proj.weight")
        if w is None:
            raise CheckpointError(f"{path}: missing keys: patch_embed{s + 1}.proj.weight")
        dims.append(int(w.shape[0]))
        blocks = {int(m.group(1)) for k in tensors if (m := re.match(rf"^encoder\.stages\.{s}\.blocks\.(\d+)\.", k))}
        depths.append(len(blocks))
        sr = tensors.get(f"encoder.stages.{s}.blocks.0.attn.sr.weight")
        srs.append(int(sr.shape[-1]) if sr is not None else 1)
    fc1 = tensors["encoder.stages.0.blocks.0.mlp.fc1.weight"] if depths[0] else None
    mlp_ratio = int(fc1.shape[0]) // dims[0] if fc1 is not None else 4
    fuse = tensors.get("decoder.fuse.weight")
    classifier = tensors.get("decoder.classifier.weight")
    encoder_only = fuse is None
    if encoder_only:
        if num_classes is None:
            raise CheckpointError(
                f"{path}: an encoder-only checkpoint has no decoder, so the class count is unknown; pass num_classes"
            )
        decoder_dim = 256 if dims[0] == 32 else 768
    else:
        decoder_dim = int(fuse.shape[0])
        found = int(classifier.shape[0]) if classifier is not None else None
        if num_classes is not None and found is not None and num_classes != found:
            raise CheckpointError(f"{path}: the checkpoint has {found} classes, but num_classes={num_classes} was asked for")
        num_classes = found if found is not None else num_classes
    try:
        config = SegFormerConfig(
            variant="custom",
            embed_dims=tuple(dims),  # type: ignore[arg-type]
            depths=tuple(depths),  # type: ignore[arg-type]
            num_heads=(1, 2, 5, 8),
            sr_ratios=tuple(srs),  # type: ignore[arg-type]
            mlp_ratio=mlp_ratio,
            decoder_dim=decoder_dim,
            num_classes=num_classes or 1,
        )
    except ValueError as exc:
        raise CheckpointError(
            f"{path}: the architecture read from the weight shapes is not a valid SegFormer ({_first_line(exc)}; "
            "heads cannot be read from weights, so MiT's 1, 2, 5, 8 are assumed)"
        ) from exc
    return replace(config, variant=match_variant(config)), encoder_only


# transformers' SegformerConfig defaults (the b0 architecture), for fields a config.json leaves out.
_HF_DEFAULTS: dict[str, Any] = {
    "hidden_sizes": [32, 64, 160, 256],
    "depths": [2, 2, 2, 2],
    "num_attention_heads": [1, 2, 5, 8],
    "sr_ratios": [8, 4, 2, 1],
    "mlp_ratios": [4, 4, 4, 4],
    "patch_sizes": [7, 3, 3, 3],
    "strides": [4, 2, 2, 2],
    "decoder_hidden_size": 256,
    "num_channels": 3,
    "drop_path_rate": 0.1,
    "classifier_dropout_prob": 0.1,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hf_int(hf: Mapping[str, Any], field: str, config_path: Path, minimum: int = 1) -> int:
    value = hf.get(field, _HF_DEFAULTS.get(field))
    if not _is_int(value) or value < minimum:
        raise CheckpointError(f"{config_path}: {field} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _hf_stage_ints(
    hf: Mapping[str, Any], field: str, config_path: Path, minimum: int = 1
) -> tuple[int, int, int, int]:
    """A per-stage field of a Hugging Face config: exactly 4 integers, each at least ``minimum``."""
    value = hf.get(field, _HF_DEFAULTS[field])
    if not isinstance(value, list) or len(value) != 4:
        raise CheckpointError(f"{config_path}: {field} must list 4 integers (one per encoder stage), got {value!r}")
    if not all(_is_int(v) and v >= minimum for v in value):
        raise CheckpointError(f"{config_path}: {field} must hold integers >= {minimum}, got {value!r}")
    return tuple(int(v) for v in value)  # type: ignore[return-value]


def _hf_rate(hf: Mapping[str, Any], field: str, config_path: Path) -> float:
    value = hf.get(field, _HF_DEFAULTS[field])
    if value is None:  # transformers writes null for "no dropout"
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise CheckpointError(f"{config_path}: {field} must be a number in [0, 1), got {value!r}")
    return float(value)


def _hf_class_names(hf: Mapping[str, Any], config_path: Path) -> list[str] | None:
    """``id2label`` as a list in id order; its keys must be exactly 0..N-1."""
    id2label = hf.get("id2label")
    if id2label is None or id2label == {}:
        return None
    if not isinstance(id2label, dict):
        raise CheckpointError(f"{config_path}: id2label must map class ids to names, got {type(id2label).__name__}")
    try:
        ids = sorted(int(k) for k in id2label)
    except ValueError as exc:
        raise CheckpointError(f"{config_path}: id2label keys must be class ids 0..N-1 ({_first_line(exc)})") from exc
    if ids != list(range(len(ids))):
        raise CheckpointError(f"{config_path}: id2label keys must be the class ids 0..{len(ids) - 1} without gaps")
    by_id = {int(k): v for k, v in id2label.items()}
    return [str(by_id[i]) for i in ids]


def _hf_class_count(
    hf: Mapping[str, Any], names: list[str] | None, weights: Mapping[str, Tensor], config_path: Path
) -> int | None:
    """Classes declared by ``id2label`` (or ``num_labels``), checked against the classifier; else the classifier's.

    transformers 5 writes neither ``id2label`` nor ``num_labels`` for a 2-class model with default labels,
    so the weights are the only record of the class count there.
    """
    declared, field = (len(names), "id2label") if names is not None else (None, "num_labels")
    if declared is None and "num_labels" in hf:
        declared = _hf_int(hf, "num_labels", config_path)
    classifier = weights.get("decode_head.classifier.weight")
    found = int(classifier.shape[0]) if classifier is not None else None
    if declared is not None and found is not None and declared != found:
        raise CheckpointError(
            f"{config_path}: {field} has {declared} classes but the weights have {found} "
            "(decode_head.classifier.weight)"
        )
    return declared if declared is not None else found


def _hf_weight_facts(
    config: SegFormerConfig, weights: Mapping[str, Tensor], encoder_only: bool
) -> list[tuple[str, int, int, str]]:
    """(config.json field, its value, what the weights record, the tensor that records it) per checkable field.

    Fields whose tensors are absent are left out (strict loading names missing keys). Heads leave no trace.
    """
    enc = "segformer.encoder"
    facts: list[tuple[str, int, int, str]] = []

    def add(field: str, declared: int, key: str, dim: int) -> None:
        if key in weights:
            facts.append((field, declared, int(weights[key].shape[dim]), key))

    add("num_channels", config.in_chans, f"{enc}.patch_embeddings.0.proj.weight", 1)
    for s in range(4):
        add(f"hidden_sizes[{s}]", config.embed_dims[s], f"{enc}.patch_embeddings.{s}.proj.weight", 0)
        blocks = {int(m.group(1)) for k in weights if (m := re.match(rf"^{enc}\.block\.{s}\.(\d+)\.", k))}
        if blocks:
            facts.append((f"depths[{s}]", config.depths[s], len(blocks), f"{enc}.block.{s}.*"))
        sr_key = f"{enc}.block.{s}.0.attention.self.sr.weight"
        if 0 in blocks:  # no reduction conv means sr_ratio 1
            found = int(weights[sr_key].shape[-1]) if sr_key in weights else 1
            facts.append((f"sr_ratios[{s}]", config.sr_ratios[s], found, sr_key))
    hidden = config.mlp_ratio * config.embed_dims[0]
    add("mlp_ratios (x hidden_sizes[0])", hidden, f"{enc}.block.0.0.mlp.dense1.weight", 0)
    if not encoder_only:
        add("decoder_hidden_size", config.decoder_dim, "decode_head.linear_fuse.weight", 0)
    return facts


def _check_hf_shapes(
    config: SegFormerConfig, weights: Mapping[str, Tensor], config_path: Path, encoder_only: bool
) -> None:
    """Each config.json field the weights also record must agree with them; a mismatch names field and tensor."""
    for field, declared, found, key in _hf_weight_facts(config, weights, encoder_only):
        if declared != found:
            raise CheckpointError(
                f"{config_path}: {field} is {declared} but the weights have {found} ({key}); "
                "the config does not belong to these weights"
            )


def _read_hf_config(config_path: Path) -> dict[str, Any]:
    """A Hugging Face config.json that is readable JSON of a SegFormer, or a CheckpointError naming it."""
    try:
        hf = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not a readable JSON config ({_first_line(exc)})") from exc
    if not isinstance(hf, dict) or hf.get("model_type") != "segformer":
        found = hf.get("model_type") if isinstance(hf, dict) else None
        raise CheckpointError(f"{config_path}: not a SegFormer config (model_type is {found!r})")
    return hf


def _config_from_hf(
    config_path: Path, num_classes: int | None, weights: Mapping[str, Tensor]
) -> tuple[SegFormerConfig, bool, list[str] | None]:
    """The architecture of a Hugging Face checkpoint: every field checked, and against ``weights`` where they record it.

    Returns (config, whether the checkpoint is encoder-only, class names from ``id2label`` or None).
    """
    hf = _read_hf_config(config_path)
    if hf.get("num_encoder_blocks", 4) != 4:
        found = hf["num_encoder_blocks"]
        raise CheckpointError(f"{config_path}: num_encoder_blocks is {found!r}; SegFormer has 4 stages")
    patches, strides = _hf_stage_ints(hf, "patch_sizes", config_path), _hf_stage_ints(hf, "strides", config_path)
    if patches != (7, 3, 3, 3) or strides != (4, 2, 2, 2):
        raise CheckpointError(f"{config_path}: patch_sizes/strides other than 7,3,3,3 / 4,2,2,2 are not SegFormer")
    ratios = set(_hf_stage_ints(hf, "mlp_ratios", config_path))
    if len(ratios) != 1:
        raise CheckpointError(f"{config_path}: per-stage mlp_ratios {hf['mlp_ratios']} are not supported (one ratio)")
    embed_dims = _hf_stage_ints(hf, "hidden_sizes", config_path)
    heads = _hf_stage_ints(hf, "num_attention_heads", config_path)
    for s, (dim, n) in enumerate(zip(embed_dims, heads)):
        if dim % n:
            raise CheckpointError(
                f"{config_path}: hidden_sizes[{s}] = {dim} is not divisible by num_attention_heads[{s}] = {n}"
            )
    architectures = hf.get("architectures") or ["SegformerForSemanticSegmentation"]
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise CheckpointError(f"{config_path}: architectures must be a list of class names, got {architectures!r}")
    encoder_only = "SegformerForSemanticSegmentation" not in architectures
    names: list[str] | None = None
    if encoder_only:
        if num_classes is None:
            raise CheckpointError(
                f"{config_path.parent}: an encoder-only checkpoint ({architectures[0]}) has no decoder, "
                "so the class count is unknown; pass num_classes"
            )
    else:
        names = _hf_class_names(hf, config_path)
        found = _hf_class_count(hf, names, weights, config_path)
        if num_classes is not None and found is not None and num_classes != found:
            raise CheckpointError(f"{config_path}: the checkpoint has {found} classes, but num_classes={num_classes} was asked for")
        num_classes = found or num_classes
    if num_classes is None:
        raise CheckpointError(
            f"{config_path}: no id2label, num_labels or decode_head.classifier weights; pass num_classes"
        )
    try:
        config = SegFormerConfig(
            variant="custom",
            embed_dims=embed_dims,
            depths=_hf_stage_ints(hf, "depths", config_path, minimum=0),
            num_heads=heads,
            sr_ratios=_hf_stage_ints(hf, "sr_ratios", config_path),
            mlp_ratio=ratios.pop(),
            decoder_dim=_hf_int(hf, "decoder_hidden_size", config_path),
            num_classes=num_classes,
            in_chans=_hf_int(hf, "num_channels", config_path),
            drop_path_rate=_hf_rate(hf, "drop_path_rate", config_path),
            decoder_dropout=_hf_rate(hf, "classifier_dropout_prob", config_path),
        )
    except ValueError as exc:  # a combination the fields above do not cover
        raise CheckpointError(f"{config_path}: {_first_line(exc)}") from exc
    _check_hf_shapes(config, weights, config_path, encoder_only)
    return replace(config, variant=match_variant(config)), encoder_only, names


def _read_hf_weights(directory: Path) -> dict[str, Tensor]:
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    pickled = directory / "pytorch_model.bin"
    if single.is_file():
        return _read_safetensors(single)[0]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a readable shard index ({_first_line(exc)})") from exc
        tensors: dict[str, Tensor] = {}
        for shard in shards:
            shard_path = directory / shard
            if shard_path.parent != directory:
                raise CheckpointError(f"{index}: shard {shard!r} lies outside the checkpoint folder")
            if not shard_path.is_file():
                raise CheckpointError(f"{shard_path}: shard listed in {index.name} is missing")
            tensors.update(_read_safetensors(shard_path)[0])
        return tensors
    if pickled.is_file():
        return _unwrap_state_dict(_read_pickle(pickled), pickled)
    raise CheckpointError(
        f"{directory}: no weights found: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


# ---------------------------------------------------------------------------------------------------
# Public API


def save_checkpoint(model: SegFormer, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as one ``.safetensors`` file with its config and :class:`ModelMeta` in the metadata.

    ``dtype=torch.float16`` halves the file (BatchNorm statistics included); loading casts back to fp32.
    The write is atomic.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    metadata = {
        "format": FORMAT_TAG,
        "config": json.dumps(model.config.to_dict()),
        "meta": json.dumps(model.meta.to_dict()),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_checkpoint_meta(path: str | Path) -> tuple[SegFormerConfig, ModelMeta]:
    """The architecture and preprocessing stored in one of our checkpoints, without loading the weights."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from exc
    return _parse_our_metadata(metadata, path)


def _parse_our_metadata(metadata: Mapping[str, str], path: Path) -> tuple[SegFormerConfig, ModelMeta]:
    if metadata.get("format") != FORMAT_TAG:
        raise CheckpointError(f"{path}: safetensors file without segformer-edge metadata (format tag {FORMAT_TAG!r})")
    try:
        config = SegFormerConfig.from_dict(json.loads(metadata["config"]))
        meta = ModelMeta.from_dict(json.loads(metadata["meta"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: damaged segformer-edge metadata ({_first_line(exc)})") from exc
    if len(meta.class_names) != config.num_classes:
        raise CheckpointError(f"{path}: {len(meta.class_names)} class names for {config.num_classes} classes")
    return config, meta


def load_pretrained(
    path: str | Path,
    *,
    num_classes: int | None = None,
    variant: str | None = None,
    device: str | torch.device = "cpu",
) -> SegFormer:
    """Load a SegFormer in eval mode from any supported checkpoint.

    Args:
        path: One of our ``.safetensors`` checkpoints; a Hugging Face SegFormer folder (``config.json`` with
            ``model.safetensors``, a sharded index or ``pytorch_model.bin``); a Hugging Face Hub id
            (``org/name`` or ``org/name@revision``, resolved through the local cache by
            :func:`~segformer_edge.hub.resolve_model_path`); or an NVlabs/mmseg ``.pth``. Class names come
            from ``id2label`` (or mmseg's ``meta.CLASSES``); names that are ADE20K's or Cityscapes' get
            that dataset's palette.
        num_classes: Needed for encoder-only checkpoints (mit-bX), whose decoder starts from scratch.
            For full checkpoints it is checked against the file.
        variant: For ``.pth`` files, the variant to assume (heads cannot be inferred from weights).
        device: Where to put the model.

    Raises:
        CheckpointError: the file is missing, corrupt, of an unknown layout, has an invalid config field, or
            does not match strictly; an id that is not cached and cannot be downloaded. The message names
            the file and, for config problems, the field.
    """
    path = resolve_model_path(path)
    names: list[str] | None = None
    palette: list[tuple[int, int, int]] | None = None
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path}: not a Hugging Face model folder: config.json is missing")
        _read_hf_config(config_path)  # a broken config.json is named before the weights are looked for
        raw = _read_hf_weights(path)
        layout = _detect_layout(list(raw))
        if layout != "hf":
            raise CheckpointError(f"{path}: the weights are not in the Hugging Face SegFormer layout")
        config, encoder_only, names = _config_from_hf(config_path, num_classes, raw)
        tensors = _remap(raw, _HF_RULES, _HF_DROPPED)
        meta = None
    elif path.suffix == ".safetensors":
        raw, metadata = _read_safetensors(path)
        config, meta = _parse_our_metadata(metadata, path)
        if num_classes is not None and num_classes != config.num_classes:
            raise CheckpointError(
                f"{path}: the checkpoint has {config.num_classes} classes, but num_classes={num_classes} was asked for"
            )
        tensors, encoder_only = raw, False
    else:
        obj = _read_pickle(path)
        raw = _unwrap_state_dict(obj, path)
        layout = _detect_layout(list(raw))
        if layout != "mmseg":
            raise CheckpointError(
                f"{path}: not a SegFormer checkpoint: its keys match neither the NVlabs/mmseg nor the segformer-edge "
                f"layout (first keys: {_name_some(sorted(raw), 3)})"
            )
        tensors = _split_kv(_remap(raw, _MMSEG_RULES, _MMSEG_DROPPED))
        config, encoder_only = _config_from_mmseg(tensors, path, num_classes)
        if variant is not None:
            ref = variant_config(variant)
            try:
                config = replace(config, variant=ref.variant, num_heads=ref.num_heads)
            except ValueError as exc:
                message = f"{path}: the weights do not fit variant {variant!r} ({_first_line(exc)})"
                raise CheckpointError(message) from exc
        meta_obj = obj.get("meta") if isinstance(obj, Mapping) else None
        if isinstance(meta_obj, Mapping):
            classes, colours = meta_obj.get("CLASSES"), meta_obj.get("PALETTE")
            if classes is not None and len(classes) == config.num_classes:
                names = [str(c) for c in classes]
                if colours is not None and len(colours) == len(names):
                    palette = [tuple(int(v) for v in c) for c in colours]  # type: ignore[misc]
        meta = None
    model = _build(config, path)
    load_state_dict_strict(model, tensors, path, encoder_only=encoder_only)
    if encoder_only:
        logger.warning("%s: encoder-only checkpoint; the decoder is freshly initialised and needs training", path)
    if meta is None:
        meta = ModelMeta.default(config.num_classes)
        if names is not None:
            meta.class_names = names
            meta.palette = palette or palette_for(names)
    model.meta = meta
    logger.info("loaded %s (%s, %d classes)", path, config.variant, config.num_classes)
    return model.to(device).eval()



def _build(config: SegFormerConfig, path: Path) -> SegFormer:
    """The module for ``config``; a config that cannot be built is the checkpoint's fault, not a bug."""
    try:
        return SegFormer(config)
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot build a SegFormer from its config ({_first_line(exc)})") from exc


def builtin_checkpoint() -> Path:
    """The shipped reference model: SegFormer-B0 trained on the synthetic scenes (fp16 weights)."""
    path = Path(__file__).parent / "assets" / "reference_b0.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: the built-in reference model is missing from this install; pass a checkpoint")
    return path
