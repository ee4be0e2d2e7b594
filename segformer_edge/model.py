"""SegFormer: a Mix Transformer (MiT) encoder and an all-MLP decoder (arXiv 2105.15203).

The definition follows the paper and the original NVlabs code:

- overlapped patch merging: conv (7, 4, 3) for stage 1 and (3, 2, 1) for stages 2-4, then LayerNorm;
- efficient self-attention: K and V come from a sequence spatially reduced by a strided conv
  (kernel = stride = sr_ratio) followed by LayerNorm;
- Mix-FFN: ``fc2(GELU(DWConv3x3(fc1(x))))`` inside a pre-norm residual block, no positional encoding;
- all-MLP decoder: per-stage linear projection, upsampling to 1/4, concatenation in the order
  stage 4, 3, 2, 1, a 1x1 fuse conv + BatchNorm + ReLU, dropout and a 1x1 classifier.

The module is written to export cleanly: no Python value is ever computed from tensor data, attention is
plain 3-D ``bmm`` with separate K and V projections (what XNNPACK delegates best), and the per-stage
projections of the decoder are 1x1 convolutions on NCHW maps (the same arithmetic as the reference
``Linear`` on tokens, without the transposes).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VARIANTS",
    "ModelMeta",
    "MixTransformer",
    "SegFormer",
    "SegFormerConfig",
    "ProjectedHead",
    "SegFormerHead",
    "create_model",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SegFormerConfig:
    """Architecture of one SegFormer. Every field is read by the model.

    Attributes:
        variant: Name of the preset this config came from (``b0``..``b5``) or ``custom``.
        embed_dims: Channels of the four encoder stages.
        depths: Number of transformer blocks in each stage.
        num_heads: Attention heads in each stage.
        sr_ratios: Spatial-reduction ratio of K/V in each stage (kernel = stride of the reduction conv).
        mlp_ratio: Hidden expansion of Mix-FFN (4 in the released weights, for every stage).
        decoder_dim: Channels C of the all-MLP decoder (256 for B0/B1, 768 for B2-B5).
        num_classes: Number of output classes.
        in_chans: Input image channels.
        drop_path_rate: Stochastic-depth rate of the last block; earlier blocks scale linearly from 0.
        decoder_dropout: Dropout before the classifier.
    """

    variant: str = "b0"
    embed_dims: tuple[int, int, int, int] = (32, 64, 160, 256)
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4
    decoder_dim: int = 256
    num_classes: int = 150
    in_chans: int = 3
    drop_path_rate: float = 0.1
    decoder_dropout: float = 0.1

    def __post_init__(self) -> None:
        for name, minimum in (("embed_dims", 1), ("depths", 0), ("num_heads", 1), ("sr_ratios", 1)):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) != 4:
                raise ValueError(f"SegFormerConfig.{name} needs 4 values (one per stage), got {value!r}")
            object.__setattr__(self, name, tuple(_checked_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(value)))
        for name, minimum in (("mlp_ratio", 1), ("decoder_dim", 1), ("num_classes", 1), ("in_chans", 1)):
            object.__setattr__(self, name, _checked_int(name, getattr(self, name), minimum))
        for dim, heads in zip(self.embed_dims, self.num_heads):
            if dim % heads:
                raise ValueError(f"embed dim {dim} is not divisible by {heads} attention heads")
        for name in ("drop_path_rate", "decoder_dropout"):
            rate = getattr(self, name)
            if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
                raise ValueError(f"SegFormerConfig.{name} must be a number in [0, 1), got {rate!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegFormerConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SegFormer config fields: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _checked_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int, refusing fractions, strings and booleans (``int(2.5)`` would silently give 2)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"SegFormerConfig.{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"SegFormerConfig.{name} must be at least {minimum}, got {value!r}")
    return int(value)


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map: distinct, deterministic colours for any number of classes."""
    palette = []
    for label in range(num_classes):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.append((r, g, b))
    return palette


@dataclass
class ModelMeta:
    """What a checkpoint needs besides weights to preprocess inputs and present outputs.

    Attributes:
        class_names: One name per output class.
        palette: One RGB colour per class, for masks and overlays.
        mean: Per-channel mean subtracted from RGB images scaled to [0, 1].
        std: Per-channel standard deviation the centred image is divided by.
        input_size: (H, W) the model was trained at; the default export size.
    """

    class_names: list[str]
    palette: list[tuple[int, int, int]]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: tuple[int, int] = (512, 512)

    def __post_init__(self) -> None:
        if len(self.class_names) != len(self.palette):
            raise ValueError(f"{len(self.class_names)} class names but {len(self.palette)} palette colours")
        self.palette = [tuple(int(v) for v in colour) for colour in self.palette]  # type: ignore[misc]
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        self.input_size = tuple(int(v) for v in self.input_size)  # type: ignore[assignment]

    @classmethod
    def default(cls, num_classes: int) -> ModelMeta:
        return cls([f"class_{i}" for i in range(num_classes)], default_palette(num_classes))

    def to_dict(self) -> dict[str, Any]:
        return {k: [list(c) for c in v] if k == "palette" else (list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMeta:
        return cls(**data)


_B2_B5_DIMS = (64, 128, 320, 512)
VARIANTS: dict[str, dict[str, Any]] = {
    "b0": {"embed_dims": (32, 64, 160, 256), "depths": (2, 2, 2, 2), "decoder_dim": 256},
    "b1": {"embed_dims": _B2_B5_DIMS, "depths": (2, 2, 2, 2), "decoder_dim": 256},
    "b2": {"embed_dims": _B2_B5_DIMS, "depths": (3, 4, 6, 3), "decoder_dim": 768},
    "b3": {"embed_dims": _B2_B5_DIMS, "depths": (3, 4, 18, 3), "decoder_dim": 768},
    "b4": {"embed_dims": _B2_B5_DIMS, "depths": (3, 8, 27, 3), "decoder_dim": 768},
    "b5": {"embed_dims": _B2_B5_DIMS, "depths": (3, 6, 40, 3), "decoder_dim": 768},
}


def variant_config(variant: str, **overrides: Any) -> SegFormerConfig:
    """The config of a named variant (``b0``..``b5``), with optional field overrides."""
    key = variant.lower()
    if key not in VARIANTS:
        raise ValueError(f"unknown SegFormer variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return SegFormerConfig(variant=key, **{**VARIANTS[key], **overrides})


def match_variant(config: SegFormerConfig) -> str:
    """The preset name whose architecture equals ``config`` (ignoring classes and dropout), or ``custom``."""
    for name in VARIANTS:
        ref = variant_config(name)
        same = replace(
            config,
            variant=name,
            num_classes=ref.num_classes,
            drop_path_rate=ref.drop_path_rate,
            decoder_dropout=ref.decoder_dropout,
        )
        if same == ref:
            return name
    return "custom"


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class OverlapPatchEmbed(nn.Module):
    """Overlapped patch merging: a strided conv with padding ``k // 2``, then LayerNorm on tokens."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)  # eps 1e-5, as in the reference code

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)  # (B, Cin, H, W) -> (B, C, H', W')
        h, w = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)  # (B, C, H', W') -> (B, N, C)
        return self.norm(x), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys and values come from a spatially reduced sequence."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(dim)  # eps 1e-5, as in the reference code

    def _split_heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        # (B, L, C) -> (B, L, heads, d) -> (B, heads, L, d) -> (B * heads, L, d)
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2).reshape(-1, n, self.head_dim)

    def reduce_kv(self, x: Tensor, h: int, w: int) -> Tensor:
        """The key/value sequence: ``x`` itself, or its spatial reduction by ``sr_ratio``."""
        if self.sr_ratio == 1:
            return x  # (B, M, C), M = N
        b, _, c = x.shape
        kv = x.transpose(1, 2).reshape(b, c, h, w)  # (B, N, C) -> (B, C, H, W)
        kv = self.sr(kv).flatten(2).transpose(1, 2)  # -> (B, M, C), M = (H // R) * (W // R)
        return self.sr_norm(kv)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Scaled dot-product attention over batched heads: (G, N, d), (G, M, d), (G, M, d) -> (G, N, d)."""
        attn = torch.bmm(q * self.scale, k.transpose(1, 2)).softmax(dim=-1)  # (G, N, M)
        return torch.bmm(attn, v)  # (G, N, d)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape  # (B, N, C), N = H * W
        kv = self.reduce_kv(x, h, w)  # (B, M, C)
        q = self._split_heads(self.q(x))  # (B * heads, N, d)
        k = self._split_heads(self.k(kv))  # (B * heads, M, d)
        v = self._split_heads(self.v(kv))  # (B * heads, M, d)
        out = self.attend(q, k, v)  # (B * heads, N, d)
        out = out.reshape(b, self.num_heads, n, self.head_dim).transpose(1, 2).reshape(b, n, c)  # (B, N, C)
        return self.proj(out)


class MixFFN(nn.Module):
    """Mix-FFN: ``fc2(GELU(DWConv3x3(fc1(x))))``; the depth-wise conv leaks position information."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = self.fc1(x)  # (B, N, C) -> (B, N, Ch)
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, h, w)  # (B, N, Ch) -> (B, Ch, H, W)
        x = self.dwconv(x).flatten(2).transpose(1, 2)  # (B, Ch, H, W) -> (B, N, Ch)
        return self.fc2(self.act(x))  # (B, N, Ch) -> (B, N, C)


class Block(nn.Module):
    """Pre-norm transformer block: efficient self-attention and Mix-FFN, each with a residual."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, dim * mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))  # (B, N, C)
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))  # (B, N, C)


class Stage(nn.Module):
    """One encoder stage: patch merging, ``depth`` blocks, a final LayerNorm; NCHW in and out."""

    def __init__(
        self,
        in_chans: int,
        dim: int,
        kernel: int,
        stride: int,
        depth: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: int,
        drop_paths: list[float],
    ) -> None:
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_chans, dim, kernel, stride)
        self.blocks = nn.ModuleList(
            [Block(dim, num_heads, sr_ratio, mlp_ratio, drop_paths[i]) for i in range(depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        x, h, w = self.patch_embed(x)  # (B, Cin, H, W) -> (B, N, C)
        for block in self.blocks:
            x = block(x, h, w)
        x = self.norm(x)
        return x.transpose(1, 2).reshape(b, -1, h, w)  # (B, N, C) -> (B, C, H', W')


class MixTransformer(nn.Module):
    """The MiT encoder. ``forward`` returns the four NCHW feature maps at strides 4, 8, 16 and 32."""

    def __init__(self, config: SegFormerConfig) -> None:
        super().__init__()
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages = []
        in_chans, start = config.in_chans, 0
        for i, (dim, depth) in enumerate(zip(config.embed_dims, config.depths)):
            kernel, stride = (7, 4) if i == 0 else (3, 2)
            stages.append(
                Stage(
                    in_chans,
                    dim,
                    kernel,
                    stride,
                    depth,
                    config.num_heads[i],
                    config.sr_ratios[i],
                    config.mlp_ratio,
                    rates[start : start + depth],
                )
            )
            in_chans, start = dim, start + depth
        self.stages = nn.ModuleList(stages)
        self.feature_info = [
            {"num_chs": dim, "reduction": 4 * 2**i, "module": f"stages.{i}"} for i, dim in enumerate(config.embed_dims)
        ]

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)  # (B, C_i, H / 2^(i+2), W / 2^(i+2))
            features.append(x)
        return features


class SegFormerHead(nn.Module):
    """The all-MLP decoder. BatchNorm is kept separate from the fuse conv so that it can be folded."""

    def __init__(self, config: SegFormerConfig) -> None:
        super().__init__()
        c = config.decoder_dim
        # A Linear on tokens is a 1x1 conv on the NCHW map: same weights, no transposes.
        self.linear_c = nn.ModuleList([nn.Conv2d(dim, c, kernel_size=1) for dim in config.embed_dims])
        self.fuse = nn.Conv2d(4 * c, c, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(config.decoder_dropout)
        self.classifier = nn.Conv2d(c, config.num_classes, kernel_size=1)

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.classifier(self.dropout(self.fuse_features(features)))  # (B, K, H/4, W/4)

    def fuse_features(self, features: list[Tensor]) -> Tensor:
        """The fused decoder feature before the classifier: (B, C, H/4, W/4)."""
        size = features[0].shape[2:]  # (H / 4, W / 4)
        projected = []
        for i, (feature, linear) in enumerate(zip(features, self.linear_c)):
            x = linear(feature)  # (B, C_i, H_i, W_i) -> (B, C, H_i, W_i)
            if i > 0:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # -> (B, C, H/4, W/4)
            projected.append(x)
        x = torch.cat(projected[::-1], dim=1)  # stages 4, 3, 2, 1: (B, 4C, H/4, W/4)
        return self.act(self.bn(self.fuse(x)))  # (B, C, H/4, W/4)


class ProjectedHead(nn.Module):
    """The all-MLP decoder with its fuse conv and BatchNorm (eval statistics) folded into the four stage
    projections, which then run before the upsampling: the same function as :class:`SegFormerHead`.

    The fuse conv is linear in each stage's slice of the concatenation, and bilinear upsampling is a per-pixel
    convex combination (its weights sum to 1, so it commutes with a 1x1 conv and its bias). So
    ``fuse(cat(up(P_4 x_4), ..., P_1 x_1)) = sum_i up(W_i P_i x_i)``: each stage is projected by ``W_i P_i``
    (C_i -> C) at its own resolution, upsampled and summed. The 4C -> C conv at 1/4 resolution, most of a
    b2's multiply-accumulates at 512x512 (38.6 of 62 G), and the 4C-channel concatenation are gone.
    """

    def __init__(self, head: SegFormerHead) -> None:
        super().__init__()
        c = head.fuse.out_channels
        w = head.fuse.weight.detach().double()[:, :, 0, 0]  # (C, 4C): columns of stages 4, 3, 2, 1
        b = head.fuse.bias.detach().double() if head.fuse.bias is not None else torch.zeros(c, dtype=torch.float64)
        if isinstance(head.bn, nn.BatchNorm2d):
            bn = head.bn
            scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)  # (C,)
            shift = bn.bias.detach().double() - bn.running_mean.double() * scale  # (C,)
        elif isinstance(head.bn, nn.Identity):
            scale, shift = torch.ones(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        else:
            raise TypeError(f"cannot fold a decoder normalisation of type {type(head.bn).__name__}")
        self.linear_c = nn.ModuleList()
        last = len(head.linear_c) - 1
        for i, linear in enumerate(head.linear_c):
            w_i = w[:, (last - i) * c : (last - i + 1) * c]  # (C, C): this stage's slice of the fuse conv
            p = linear.weight.detach().double()[:, :, 0, 0]  # (C, C_i)
            p_bias = linear.bias.detach().double() if linear.bias is not None else torch.zeros(c, dtype=torch.float64)
            bias = scale * (w_i @ p_bias)  # (C,)
            if i == 0:  # the fuse bias and the BatchNorm shift, added once
                bias = bias + scale * b + shift
            conv = nn.Conv2d(linear.in_channels, c, kernel_size=1)
            with torch.no_grad():
                conv.weight.copy_((scale[:, None] * (w_i @ p))[:, :, None, None].to(conv.weight.dtype))  # (C, C_i, 1, 1)
                conv.bias.copy_(bias.to(conv.bias.dtype))
            self.linear_c.append(conv)
        self.act = head.act
        self.dropout = head.dropout
        self.classifier = head.classifier

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.classifier(self.dropout(self.fuse_features(features)))  # (B, K, H/4, W/4)

    def fuse_features(self, features: list[Tensor]) -> Tensor:
        """The fused decoder feature before the classifier: (B, C, H/4, W/4)."""
        size = features[0].shape[2:]  # (H / 4, W / 4)
        x = self.linear_c[0](features[0])  # (B, C_1, H/4, W/4) -> (B, C, H/4, W/4)
        for feature, linear in zip(features[1:], self.linear_c[1:]):
            y = linear(feature)  # (B, C_i, H_i, W_i) -> (B, C, H_i, W_i)
            x = x + F.interpolate(y, size=size, mode="bilinear", align_corners=False)  # (B, C, H/4, W/4)
        return self.act(x)  # (B, C, H/4, W/4)


class SegFormer(nn.Module):
    """SegFormer: images ``(B, 3, H, W)`` -> logits ``(B, K, ceil(H/4), ceil(W/4))``."""

    def __init__(self, config: SegFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.meta = ModelMeta.default(config.num_classes)
        self.encoder = MixTransformer(config)
        self.decoder = SegFormerHead(config)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))  # (B, 3, H, W) -> (B, K, H/4, W/4)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters split as the paper's recipe needs them: encoder/head x decay/no-decay."""
        groups: dict[str, list[nn.Parameter]] = {
            "encoder_decay": [],
            "encoder_no_decay": [],
            "head_decay": [],
            "head_no_decay": [],
        }
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            part = "head" if name.startswith("decoder.") else "encoder"
            # Norm weights and every bias are not decayed (conv/linear weights are 2-D or 4-D).
            decay = "decay" if param.ndim > 1 else "no_decay"
            groups[f"{part}_{decay}"].append(param)
        return groups


def _init_weights(m: nn.Module) -> None:
    """The reference initialisation: truncated normal for linears, fan-out normal for convs."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def create_model(variant: str | SegFormerConfig = "b0", num_classes: int | None = None, **overrides: Any) -> SegFormer:
    """Build a randomly initialised SegFormer.

    Args:
        variant: ``b0``..``b5``, or a full :class:`SegFormerConfig` (for custom or tiny models).
        num_classes: Output classes; defaults to the config's (150 for a named variant, as ADE20K).
        **overrides: Any other :class:`SegFormerConfig` field.

    Example:
        >>> model = create_model("b0", num_classes=19).eval()
        >>> model(torch.randn(1, 3, 512, 1024)).shape
        torch.Size([1, 19, 128, 256])
    """
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if isinstance(variant, SegFormerConfig):
        config = replace(variant, **overrides)
    else:
        config = variant_config(variant, **overrides)
    return SegFormer(config)

