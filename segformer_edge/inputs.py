"""The one place preprocessing is written: resize, normalise, layout and input dtype.

:class:`InputSpec` describes what a graph takes: its size, its layout (NCHW or NHWC), what kind of values
(``normalized`` floats, ``rgb01`` floats in 0..1 or ``uint8`` 0..255, the last two with the normalisation
fused into the graph), the mean and std, and whether H and W are dynamic. Data loading, export,
calibration, sensitivity, verify, predict and bench all call it, and an artifact's manifest stores it
(:meth:`InputSpec.to_manifest` / :meth:`InputSpec.from_manifest`). Numpy and Pillow only: runners on small
devices use it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["INPUT_KINDS", "LAYOUTS", "InputSpec", "normalize", "resize_pair"]

INPUT_KINDS = ("normalized", "rgb01", "uint8")
LAYOUTS = ("nchw", "nhwc")


def resize_pair(image: np.ndarray, mask: np.ndarray | None, size_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize an image (bilinear) and its mask (nearest, labels intact) to (H, W)."""
    h, w = size_hw
    if image.shape[:2] != (h, w):
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    if mask is not None and mask.shape[:2] != (h, w):
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    return image, mask


def normalize(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 RGB (..., H, W, 3) -> float32 ``(x / 255 - mean) / std`` in the same layout."""
    x = images.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


@dataclass(frozen=True)
class InputSpec:
    """What a graph's input is, and how to turn RGB photos into it.

    Attributes:
        size: (H, W) the graph takes (the export size; for dynamic graphs the size they were checked at).
        mean: Per-channel mean of RGB in 0..1.
        std: Per-channel standard deviation.
        kind: ``normalized`` (float, already normalised), ``rgb01`` (float RGB in 0..1) or ``uint8`` (0..255).
        layout: ``nchw`` or ``nhwc``.
        dynamic: Whether H and W are dynamic in the graph.
        dtype: The input tensor's dtype in the artifact (``uint8`` inputs are float32 where a runtime has
            no uint8 tensors, as in Core ML multi-arrays).
        image: The input is a camera frame (an image type of the runtime), normalisation folded in.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    kind: str = "normalized"
    layout: str = "nchw"
    dynamic: bool = False
    dtype: str = ""
    image: bool = False

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"--input {self.kind}: choose one of {', '.join(INPUT_KINDS)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"--layout {self.layout}: choose nchw or nhwc")
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if not self.dtype:
            object.__setattr__(self, "dtype", "uint8" if self.kind == "uint8" else "float32")

    @classmethod
    def for_model(cls, meta: Any, size: tuple[int, int] | None = None, **kwargs: Any) -> InputSpec:
        """The spec of a model's own float input (normalised NCHW) at ``size`` (default: its training size)."""
        return cls(size or tuple(meta.input_size), tuple(meta.mean), tuple(meta.std), **kwargs)

    def with_(self, **changes: Any) -> InputSpec:
        return replace(self, **changes)

    @property
    def float_spec(self) -> InputSpec:
        """The float model's own input at this size: normalised, NCHW, float32."""
        return InputSpec(self.size, self.mean, self.std)

    @property
    def shape(self) -> tuple[int, ...]:
        h, w = self.size
        return (1, h, w, 3) if self.layout == "nhwc" else (1, 3, h, w)

    @property
    def scale(self) -> float:
        """What the fused normalisation divides raw values by to get 0..1 RGB."""
        return 255.0 if self.kind == "uint8" else 1.0

    def resize(self, image: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """An (H, W, 3) uint8 image (and its mask) at this spec's size."""
        return resize_pair(image, mask, self.size)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB images (N, H, W, 3) -> the graph's input: kind, layout and dtype of this spec."""
        if images.ndim == 3:
            images = images[None]  # (H, W, 3) -> (1, H, W, 3)
        if self.kind == "uint8":
            x = images.astype(np.uint8)
        elif self.kind == "rgb01":
            x = images.astype(np.float32) / 255.0
        else:
            x = normalize(images, self.mean, self.std)  # (N, H, W, 3)
        if self.layout == "nchw":
            x = x.transpose(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)
        return np.ascontiguousarray(x, dtype=np.dtype(self.dtype))

    def to_manifest(self) -> dict[str, Any]:
        h, w = self.size
        shape: list[Any] = list(self.shape)
        if self.dynamic:
            hi, wi = (1, 2) if self.layout == "nhwc" else (2, 3)
            shape[hi], shape[wi] = "H", "W"
        block: dict[str, Any] = {
            "shape": shape,
            "size": [h, w],
            "layout": self.layout,
            "dtype": self.dtype,
            "kind": self.kind,
            "normalization": {"mean": list(self.mean), "std": list(self.std), "fused": self.kind != "normalized",
                              "scale": self.scale},  # fmt: skip
            "dynamic_hw": self.dynamic,
        }
        if self.image:
            block["image"] = True
        return block

    @classmethod
    def from_manifest(cls, block: dict[str, Any]) -> InputSpec:
        """The spec stored in a manifest's ``input`` block."""
        shape = block["shape"]
        layout = block["layout"]
        size = block.get("size") or ((shape[1], shape[2]) if layout == "nhwc" else (shape[2], shape[3]))
        norm = block["normalization"]
        return cls(tuple(size), tuple(norm["mean"]), tuple(norm["std"]), kind=block["kind"], layout=layout,  # type: ignore[arg-type]
                   dynamic=bool(block.get("dynamic_hw")), dtype=block["dtype"], image=bool(block.get("image")))  # fmt: skip
