"""The whole quantization choice as one typed object, and the layer groups it can keep in float.

A :class:`QuantSpec` is passed to every target's quantizer; each target maps it to its own quantizer in
one function and raises a clear error for what it cannot honour. The manifest stores it whole
(:meth:`QuantSpec.to_manifest`), next to what the target actually did (read back from the artifact).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from segformer_edge.errors import ExportError

from .calibset import METHODS, CalibrationSet

__all__ = ["FLOAT_EDGES", "LAYER_GROUPS", "METHODS", "OUTLIER_MODES", "SCHEMES", "WRAPPER", "QuantSpec", "group_of", "module_names", "within"]

SCHEMES = ("static", "dynamic", "weight_only")
# ORT's quantize_static cannot set its Entropy calibrator's bins, and their defaults leave the KL search one
# candidate (tests/test_int8.py showed its scales equal to MinMax's on every tensor): refused, not mislabelled.
ENTROPY_REFUSED = ("--method entropy: ONNX Runtime's quantize_static searches KL thresholds on 128 histogram bins for 128 "
                   "levels, which leaves one candidate, the full range: it is minmax. Use minmax, percentile (clips "
                   "outliers) or mse (PT2E targets, OpenVINO)")  # fmt: skip
# Outlier handling before any target's quantizer (see .outliers; kept here so that the spec needs no torch).
OUTLIER_MODES = ("auto", "none", "smoothquant", "bias_correction", "smoothquant+bias_correction")

# Group name -> module names inside the export wrapper (EdgeModule holds the SegFormer as `model`).
LAYER_GROUPS: dict[str, tuple[str, ...]] = {
    "stage1": ("model.encoder.stages.0",),
    "stage2": ("model.encoder.stages.1",),
    "stage3": ("model.encoder.stages.2",),
    "stage4": ("model.encoder.stages.3",),
    "decoder.mlp": ("model.decoder.linear_c",),
    "decoder.head": ("model.decoder.fuse", "model.decoder.classifier"),
}


WRAPPER = "model."  # the SegFormer's module paths inside the export wrapper start with this
# Graph edges after the network that every quantizer leaves float: the candidate mask's blend and its labels
# (converters/graph.py, CandidateMask) compute on the dequantized logits, as the float model's mask does.
FLOAT_EDGES = ("mask_head",)


def module_names(entries: tuple[str, ...] | list[str]) -> list[str]:
    """The module names (inside the export wrapper) of these float-kept entries.

    An entry is a layer group (``stage2``) or one module of the SegFormer by its own path, as in its state dict
    (``encoder.stages.1.blocks.0.attn.q``, ``decoder.linear_c.2``): a block, an attention, a single layer.
    """
    unknown = [e for e in entries if e not in LAYER_GROUPS and group_of(WRAPPER + e) is None]
    if unknown:
        raise ExportError(f"unknown layer group or layer {', '.join(unknown)}: choose a group ({', '.join(LAYER_GROUPS)}) "
                          "or a module path inside one (encoder.stages.1.blocks.0.attn.q, decoder.linear_c.2)")  # fmt: skip
    return [name for e in entries for name in (LAYER_GROUPS[e] if e in LAYER_GROUPS else (WRAPPER + e,))]


def within(module_path: str, prefixes: list[str] | tuple[str, ...]) -> bool:
    """Whether ``module_path`` is one of ``prefixes`` or a module inside one of them."""
    return any(module_path == p or module_path.startswith(p + ".") for p in prefixes)


def group_of(module_path: str) -> str | None:
    """The layer group a module path (``model.encoder.stages.0.blocks.1.attn.q``) belongs to, or None."""
    for group, names in LAYER_GROUPS.items():
        if within(module_path, names):
            return group
    return None


@dataclass(frozen=True)
class QuantSpec:
    """One INT8 recipe, the same for every target.

    Attributes:
        scheme: ``static`` (int8 weights and activations, activation ranges from calibration), ``dynamic``
            (int8 weights; activations quantized with each inference's own min/max) or ``weight_only`` (int8 or
            palettized weights, float activations). Each target lists the schemes it has (``quant_schemes``).
        method: Activation range estimator: ``minmax``, ``moving_average``, ``percentile`` (99.99%),
            ``mse`` (histogram search for the least L2 error) or ``auto`` (each target's default: ``mse`` for PT2E
            quantizers and NNCF, ``minmax`` for ONNX Runtime). No ``entropy``: see :data:`ENTROPY_REFUSED`. The manifest
            records the method a target used.
        weights: Weight granularity, ``per_channel`` or ``per_tensor`` (symmetric int8).
        float_groups: What stays float: layer groups (see :data:`LAYER_GROUPS`) or single modules by their path in
            the SegFormer (``encoder.stages.1.blocks.0.attn.q``); see :func:`module_names`.
        outliers: Function-preserving rewrites of the float model before the target's quantizer
            (:mod:`.outliers`): ``smoothquant`` (LayerNorm scale migration, strength searched on the
            calibration images), ``bias_correction`` (of the int8 weight error), both
            (``smoothquant+bias_correction``), ``none``, or ``auto`` (each only where it measurably lowers
            the int8 error on the calibration images). The manifest records what was chosen and measured.
        calibration: The calibration set (its reference, not its images, goes into the manifest).
        policy: How ``float_groups`` was chosen (the ``--budget`` search), when it was.
    """

    scheme: str = "static"
    method: str = "auto"
    weights: str = "per_channel"
    float_groups: tuple[str, ...] = ()
    outliers: str = "auto"
    calibration: CalibrationSet | None = field(default=None, compare=False, repr=False)
    policy: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ExportError(f"quantization scheme {self.scheme!r}: choose one of {', '.join(SCHEMES)}")
        if self.method == "entropy":
            raise ExportError(ENTROPY_REFUSED)
        if self.method not in METHODS:
            raise ExportError(f"--method {self.method}: choose one of {', '.join(METHODS)}")
        if self.weights not in ("per_channel", "per_tensor"):
            raise ExportError(f"weight granularity {self.weights!r}: choose per_channel or per_tensor")
        if self.outliers not in OUTLIER_MODES:
            raise ExportError(f"--outliers {self.outliers}: choose one of {', '.join(OUTLIER_MODES)}")
        if self.scheme != "static" and self.method not in ("auto", "minmax"):
            what = "each inference's own min/max" if self.scheme == "dynamic" else "no activation range at all (float activations)"
            raise ExportError(f"--method {self.method} applies to --scheme static; --scheme {self.scheme} uses {what}")
        module_names(self.float_groups)  # validates the names
        object.__setattr__(self, "float_groups", tuple(self.float_groups))

    def with_(self, **changes: Any) -> QuantSpec:
        return replace(self, **changes)

    @property
    def float_modules(self) -> list[str]:
        return module_names(self.float_groups)

    def keeps_float(self, module_path: str) -> bool:
        """Whether an op traced in ``module_path`` (inside the export wrapper) stays float: the one test every
        target's quantizer applies, so that a group, a block or a single layer is honoured alike."""
        return within(module_path, FLOAT_EDGES) or (bool(self.float_groups) and within(module_path, self.float_modules))

    def only(self, groups: list[str] | tuple[str, ...]) -> QuantSpec:
        """The same recipe with only ``groups`` quantized (every other group in float)."""
        return replace(self, float_groups=tuple(g for g in LAYER_GROUPS if g not in groups))

    def require_calibration(self, target: str) -> CalibrationSet:
        if self.calibration is None:
            raise ExportError(f"{target}: static int8 needs a calibration set: pass --data or --calibration")
        return self.calibration

    def to_manifest(self) -> dict[str, Any]:
        calib = self.calibration
        block: dict[str, Any] = {
            "scheme": self.scheme,
            "method": self.method,
            "weights": self.weights,
            "float_groups": list(self.float_groups),
            "float_modules": self.float_modules,
            "outliers": self.outliers,
            "calibration": None if calib is None else calib.reference(),
        }
        if self.policy is not None:
            block["policy"] = self.policy
        return block
