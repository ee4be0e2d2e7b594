"""A reference executor for saved Core ML ML programs, in numpy: Core ML parity where there is no macOS.

It reads the ``.mlpackage`` itself (the ``model.mlmodel`` protobuf and ``weights/weight.bin``), without
importing coremltools' converters (which import torch), and evaluates the MIL ops in program order.

Numerics: each op computes in float32 and rounds its result to the dtype the program declares for it, so
an fp16 program is executed with fp16 tensors between ops (fp32 accumulation inside an op, as the Core ML
GPU and Neural Engine do). An op it does not implement is an error that names the op.
"""

from __future__ import annotations

import importlib.util
import math
import struct
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segformer_edge.errors import SegformerEdgeError

__all__ = ["MilProgram", "UnsupportedOpError"]


class UnsupportedOpError(SegformerEdgeError, NotImplementedError):
    """The program uses an op the reference executor does not implement."""


def _proto_modules() -> tuple[Any, Any]:
    """coremltools' generated protobuf modules, loaded without running ``coremltools/__init__``."""
    if "coremltools.proto.Model_pb2" in sys.modules:
        return sys.modules["coremltools.proto.Model_pb2"], sys.modules["coremltools.proto.MIL_pb2"]
    name = "_segformer_edge_coreml_proto"
    if name not in sys.modules:
        spec = importlib.util.find_spec("coremltools")
        if spec is None or not spec.submodule_search_locations:
            raise SegformerEdgeError("Core ML artifacts need coremltools' model format; pip install 'segformer-edge[export]'")
        package = types.ModuleType(name)
        package.__path__ = [str(Path(list(spec.submodule_search_locations)[0]) / "proto")]
        sys.modules[name] = package
    model_pb2 = importlib.import_module(f"{name}.Model_pb2")
    mil_pb2 = importlib.import_module(f"{name}.MIL_pb2")
    return model_pb2, mil_pb2


_DTYPES: dict[str, Any] = {
    "FLOAT16": np.float16, "FLOAT32": np.float32, "FLOAT64": np.float64, "INT8": np.int8, "INT16": np.int16,
    "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "BOOL": np.bool_, "STRING": np.str_,
}  # fmt: skip
_CAST_NAMES = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int32": np.int32, "int64": np.int64,
               "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}  # fmt: skip


class MilProgram:
    """The ``main`` function of a saved ML program, ready to run on numpy inputs."""

    def __init__(self, package: str | Path) -> None:
        self.package = Path(package)
        model_pb2, self._mil = _proto_modules()
        data = self.package / "Data" / "com.apple.CoreML"
        spec = model_pb2.Model()
        try:
            spec.ParseFromString((data / "model.mlmodel").read_bytes())
        except Exception as exc:
            raise SegformerEdgeError(f"{self.package}: not a readable Core ML package ({exc})") from exc
        if spec.WhichOneof("Type") != "mlProgram":
            raise SegformerEdgeError(f"{self.package}: not an ML program (neural-network models are not supported)")
        self.spec = spec
        self.weights_dir = data / "weights"
        self._blobs: dict[str, bytes] = {}
        function = spec.mlProgram.functions["main"]
        self.block = function.block_specializations[function.opset]
        self.opset = function.opset
        self.inputs = [(i.name, self._dtype(i.type)) for i in function.inputs]
        self.outputs = list(self.block.outputs)
        self.op_types = sorted({op.type for op in self.block.operations})
        self._steps: list[_Step] | None = None
        self._constants: dict[str, Any] = {}

    def dtype_counts(self) -> dict[str, dict[str, int]]:
        """How many stored constants (weights) and computed values of each dtype the program holds."""
        counts: dict[str, dict[str, int]] = {"constants": {}, "values": {}}
        for op in self.block.operations:
            kind = "constants" if op.type in ("const", *_CONSTEXPR) else "values"
            for out in op.outputs:
                name = self._mil.DataType.Name(out.type.tensorType.dataType).lower()
                counts[kind][name] = counts[kind].get(name, 0) + 1
        return counts

    def weight_storage(self) -> dict[str, int]:
        """How the weights of the compute ops (conv, linear, matmul) are stored, read from the program: ``int8``
        (``constexpr_affine_dequantize``), ``palettized_<n>bit`` (``constexpr_lut_to_dense``, n = log2 of the LUT
        size), ``dequantize`` (W8A8: an int8 const dequantized at run time) or the dtype of a plain ``const``."""
        producers = {out.name: op for op in self.block.operations for out in op.outputs}
        counts: dict[str, int] = {}
        for op in self.block.operations:
            if op.type not in ("conv", "linear", "matmul") or "weight" not in op.inputs and op.type != "matmul":
                continue
            argument = op.inputs["weight" if op.type != "matmul" else "y"].arguments[0]
            source = producers.get(argument.name) if argument.WhichOneof("binding") == "name" else None
            if source is None:
                continue  # an activation (matmul of two activations) or an inline value
            if source.type == "constexpr_lut_to_dense":
                lut = self._value(source.attributes["lut"])
                kind = f"palettized_{int(np.log2(np.asarray(lut).size))}bit"
            elif source.type == "constexpr_affine_dequantize":
                kind = self._mil.DataType.Name(source.attributes["quantized_data"].type.tensorType.dataType).lower()
            elif source.type == "const":
                kind = self._mil.DataType.Name(source.outputs[0].type.tensorType.dataType).lower()
            elif source.type == "dequantize" and producers.get(source.inputs["input"].arguments[0].name, source).type == "const":
                kind = "dequantize"  # W8A8: an int8 const dequantized at run time
            else:
                continue  # an activation (the attention matmuls)
            counts[kind] = counts.get(kind, 0) + 1
        return dict(sorted(counts.items()))

    def io_dtypes(self) -> dict[str, list[str]]:
        """The dtypes of the program's inputs and outputs."""
        produced = {out.name: out.type for op in self.block.operations for out in op.outputs}
        name = lambda value_type: self._mil.DataType.Name(value_type.tensorType.dataType).lower()
        function = self.spec.mlProgram.functions["main"]
        return {"inputs": [name(i.type) for i in function.inputs], "outputs": [name(produced[o]) for o in self.outputs if o in produced]}

    # -- values -------------------------------------------------------------------------------------------
    def _dtype(self, value_type: Any) -> Any:
        name = self._mil.DataType.Name(value_type.tensorType.dataType)
        return _DTYPES.get(name, np.float32)

    def _shape(self, value_type: Any) -> tuple[int, ...]:
        return tuple(int(d.constant.size) for d in value_type.tensorType.dimensions)

    def _value(self, value: Any) -> Any:
        dtype = self._dtype(value.type)
        shape = self._shape(value.type)
        kind = value.WhichOneof("value")
        if kind == "immediateValue":
            tensor = value.immediateValue.tensor
            field = tensor.WhichOneof("value")
            if field == "bytes":
                array = np.frombuffer(tensor.bytes.values, dtype=dtype)
            elif field == "strings":
                items = list(tensor.strings.values)
                return items[0] if not shape else np.array(items)
            else:
                array = np.array(list(getattr(tensor, field).values), dtype=dtype)
            return array.reshape(shape) if shape else array.reshape(()).item() if array.size == 1 else array
        if kind == "blobFileValue":
            return self._blob(value.blobFileValue.fileName, value.blobFileValue.offset, dtype).reshape(shape)
        raise UnsupportedOpError(f"{self.package}: constant of kind {kind!r} is not supported")

    def _blob(self, file_name: str, offset: int, dtype: Any) -> np.ndarray:
        rel = file_name.removeprefix("@model_path/weights/")
        path = (self.weights_dir / rel).resolve()
        if path.parent != self.weights_dir.resolve():
            raise SegformerEdgeError(f"{self.package}: weight file {file_name!r} lies outside the package")
        if rel not in self._blobs:
            self._blobs[rel] = path.read_bytes()
        blob = self._blobs[rel]
        sentinel, _, size, data_offset = struct.unpack_from("<IIQQ", blob, offset)
        if sentinel != 0xDEADBEEF:
            raise SegformerEdgeError(f"{path}: damaged weight blob at offset {offset}")
        return np.frombuffer(blob, dtype=dtype, count=size // np.dtype(dtype).itemsize, offset=data_offset)

    # -- execution ----------------------------------------------------------------------------------------
    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        steps, constants = self._compiled()
        env: dict[str, Any] = dict(constants)
        for name, dtype in self.inputs:
            if name not in inputs:
                raise ValueError(f"missing input {name!r}")
            env[name] = np.asarray(inputs[name]).astype(dtype)
        for step in steps:
            args = {key: [env[n] if n is not None else v for n, v in values] if many else
                    (env[values[0][0]] if values[0][0] is not None else values[0][1])
                    for key, many, values in step.args}  # fmt: skip
            result = step.kernel(**args)
            results = result if isinstance(result, tuple) else (result,)
            for (name, dtype), value in zip(step.outputs, results):
                env[name] = np.asarray(value).astype(dtype, copy=False)  # kernels never write their inputs
            for name in step.last_use:  # what no later op reads is freed now: its memory is the next op's
                del env[name]
        return {name: env[name] for name in self.outputs}

    def _compiled(self) -> tuple[list[_Step], dict[str, Any]]:
        """The program as steps (kernel, bound arguments, outputs, the values read for the last time), and its
        constants, built on the first call and kept: weights are decompressed once, not on every run; a value is
        held only until its last reader ran, not to the end of the call (benchmarks/COREML_EXECUTOR.md measures the
        time and peak memory against the executor that kept them)."""
        if self._steps is not None:
            return self._steps, self._constants
        constants: dict[str, Any] = {}
        steps: list[_Step] = []
        for op in self.block.operations:
            if op.type == "const":
                constants[op.outputs[0].name] = self._value(op.attributes["val"])
                continue
            if op.type == "constexpr_affine_dequantize":  # weights stored as int8 + scale/zero point
                attrs = {k: self._value(v) for k, v in op.attributes.items() if k != "name"}
                constants[op.outputs[0].name] = _dequantize(
                    attrs["quantized_data"], attrs["scale"], attrs.get("zero_point"), attrs.get("axis")
                ).astype(self._dtype(op.outputs[0].type))
                continue
            if op.type == "constexpr_lut_to_dense":  # palettized weights: packed n-bit indices into a look-up table
                attrs = {k: self._value(v) for k, v in op.attributes.items() if k != "name"}
                constants[op.outputs[0].name] = _lut_to_dense(attrs["indices"], attrs["lut"], attrs["shape"]).astype(
                    self._dtype(op.outputs[0].type)
                )
                continue
            kernel = _KERNELS.get(op.type)
            if kernel is None:
                raise UnsupportedOpError(
                    f"{self.package}: the Core ML reference executor does not implement op {op.type!r} "
                    f"(at {op.outputs[0].name})"
                )
            args = []
            for key, argument in op.inputs.items():
                values = [(b.name, None) if b.WhichOneof("binding") == "name" else (None, self._value(b.value)) for b in argument.arguments]
                args.append((key, key == "values", values))
            steps.append(_Step(kernel, args, [(out.name, self._dtype(out.type)) for out in op.outputs], []))
        kept = set(constants) | set(self.outputs)
        seen: set[str] = set()
        for step in reversed(steps):  # a value's last reader is the first step that reads it, walking back
            for _, _, values in step.args:
                for name, _ in values:
                    if name is not None and name not in seen and name not in kept:
                        seen.add(name)
                        step.last_use.append(name)
            unread = [name for name, _ in step.outputs if name not in seen and name not in kept]
            step.last_use.extend(unread)  # an output nothing reads (a tuple's unused part) goes at once
        self._steps, self._constants = steps, constants
        return steps, constants


@dataclass
class _Step:
    """One op of the program, bound: ``args`` is (input name, takes a list, [(value name or None, inline value)])."""

    kernel: Callable[..., Any]
    args: list[tuple[str, bool, list[tuple[str | None, Any]]]]
    outputs: list[tuple[str, Any]]
    last_use: list[str]


# ---------------------------------------------------------------------------------------------------------
# Kernels: float32 arithmetic; the caller rounds to the declared output dtype.


_CONSTEXPR = ("constexpr_affine_dequantize", "constexpr_lut_to_dense")  # compressed weights, decompressed at load


def _lut_to_dense(indices: np.ndarray, lut: np.ndarray, shape: Any) -> np.ndarray:
    """iOS16 ``constexpr_lut_to_dense``: n-bit indices (n = log2 of the LUT size) packed least significant bit
    first, one byte at a time, into a uint8 vector -> the dense tensor of ``shape``."""
    lut = np.asarray(lut).reshape(-1)  # (NUM_PALETTES,)
    shape = tuple(int(d) for d in np.atleast_1d(shape))
    nbits = int(np.log2(lut.size))
    count = int(np.prod(shape))
    bits = np.unpackbits(np.asarray(indices, np.uint8).reshape(-1), bitorder="little")[: count * nbits]  # (count * nbits,)
    index = (bits.reshape(count, nbits).astype(np.int64) << np.arange(nbits)).sum(axis=1)  # (count,)
    return lut[index].reshape(shape)


def _f(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _erf(x: np.ndarray) -> np.ndarray:
    """erf in float32: scipy's where it is installed (it comes with the export stack), else Abramowitz and Stegun
    7.1.26 refined in float64 (to about 1e-7, and slower)."""
    if _scipy_erf is not None:
        return _scipy_erf(np.asarray(x, np.float32))
    return _erf_series(x)


def _erf_series(x: np.ndarray) -> np.ndarray:
    x64 = np.asarray(x, np.float64)
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x64))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (np.sign(x64) * (1.0 - poly * np.exp(-x64 * x64))).astype(np.float32)


try:
    from scipy.special import erf as _scipy_erf
except ImportError:  # a runtime-only install: the series above
    _scipy_erf = None


def _gather(x: Any, indices: Any, axis: int = 0, batch_dims: int = 0, validate_indices: bool = False) -> np.ndarray:
    """MIL gather: ``x``'s slices at ``indices`` along ``axis`` (an embedding lookup)."""
    if int(batch_dims) != 0:
        raise UnsupportedOpError(f"gather with batch_dims={batch_dims}")
    return np.take(np.asarray(x), np.asarray(indices).astype(np.int64), axis=int(axis))


def _conv(x, weight, bias=None, strides=(1, 1), pad_type="valid", pad=(0, 0, 0, 0), dilations=(1, 1), groups=1):  # type: ignore[no-untyped-def]
    x, w = _f(x), _f(weight)
    if tuple(np.atleast_1d(dilations)) != (1, 1):
        raise UnsupportedOpError("conv with dilation is not implemented by the reference executor")
    b, cin, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    sh, sw = (int(s) for s in np.atleast_1d(strides))
    if pad_type == "custom":
        top, bottom, left, right = (int(p) for p in pad)
    elif pad_type == "same":
        oh, ow = -(-h // sh), -(-wd // sw)
        ph, pw = max((oh - 1) * sh + kh - h, 0), max((ow - 1) * sw + kw - wd, 0)
        top, bottom, left, right = ph // 2, ph - ph // 2, pw // 2, pw - pw // 2
    else:
        top = bottom = left = right = 0
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    g = int(groups)
    if kh == kw == 1 and g == 1:
        out = np.einsum("bchw,oc->bohw", x[:, :, ::sh, ::sw], w[:, :, 0, 0], optimize=True)
    elif g == cin and cin_g == 1:  # depthwise: one multiply-add of a shifted view per tap (the windows' einsum
        # below copies every window)
        ho, wo = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
        x = np.repeat(x, cout // g, axis=1) if cout != g else x  # output channel o reads input channel o // (cout / g)
        out = np.zeros((b, cout, ho, wo), np.float32)
        for i in range(kh):
            for j in range(kw):
                out += x[:, :, i : i + (ho - 1) * sh + 1 : sh, j : j + (wo - 1) * sw + 1 : sw] * w[:, 0, i, j].reshape(1, -1, 1, 1)
    else:
        windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]  # (B, C, Ho, Wo, kh, kw)
        ho, wo = windows.shape[2], windows.shape[3]
        if g == 1:
            out = np.tensordot(windows, w, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)  # (B, O, Ho, Wo)
        else:
            windows = windows.reshape(b, g, cin // g, ho, wo, kh, kw)
            wg = w.reshape(g, cout // g, cin_g, kh, kw)
            out = np.einsum("bgchwij,gocij->bgohw", windows, wg, optimize=True).reshape(b, cout, ho, wo)
    if bias is not None:
        out = out + _f(bias).reshape(1, -1, 1, 1)
    return out


def _linear(x, weight, bias=None):  # type: ignore[no-untyped-def]
    out = _f(x) @ _f(weight).T
    return out + _f(bias) if bias is not None else out


def _matmul(x, y, transpose_x=False, transpose_y=False):  # type: ignore[no-untyped-def]
    x, y = _f(x), _f(y)
    if transpose_x:
        x = np.swapaxes(x, -1, -2)
    if transpose_y:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5):  # type: ignore[no-untyped-def]
    x = _f(x)
    axes = tuple(int(a) for a in np.atleast_1d(axes)) if axes is not None else tuple(range(x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + np.float32(epsilon))
    if gamma is not None:
        y = y * _f(gamma)
    if beta is not None:
        y = y + _f(beta)
    return y


def _batch_norm(x, mean, variance, gamma=None, beta=None, epsilon=1e-5):  # type: ignore[no-untyped-def]
    x = _f(x)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - _f(mean).reshape(shape)) / np.sqrt(_f(variance).reshape(shape) + np.float32(epsilon))
    if gamma is not None:
        y = y * _f(gamma).reshape(shape)
    if beta is not None:
        y = y + _f(beta).reshape(shape)
    return y


def _softmax(x, axis=-1):  # type: ignore[no-untyped-def]
    x = _f(x)
    e = np.exp(x - x.max(axis=int(axis), keepdims=True))
    return e / e.sum(axis=int(axis), keepdims=True)


def _gelu(x, mode="EXACT"):  # type: ignore[no-untyped-def]
    x = _f(x)
    if mode == "EXACT":
        return 0.5 * x * (1.0 + _erf(x / np.float32(math.sqrt(2.0))))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2 / math.pi)) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-1.702 * x))
    raise UnsupportedOpError(f"gelu mode {mode!r} is not implemented by the reference executor")


def _bilinear_axis(n_in: int, n_out: int, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (lo, hi) and weights along one axis for bilinear resampling."""
    dst = np.arange(n_out, dtype=np.float64)
    if mode == "align_corners":
        src = dst * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    else:  # half-pixel centres; MIL recomputes the spacing from the output size (torch's align_corners=False)
        ratio = n_in / n_out
        src = np.maximum((dst + 0.5) * ratio - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


def _resample(x: np.ndarray, out_h: int, out_w: int, mode: str) -> np.ndarray:
    x = _f(x)
    h, w = x.shape[-2:]
    ylo, yhi, wy = _bilinear_axis(h, out_h, mode)
    xlo, xhi, wx = _bilinear_axis(w, out_w, mode)
    rows = x[..., ylo, :] * (1 - wy)[:, None] + x[..., yhi, :] * wy[:, None]  # (..., out_h, W)
    return rows[..., xlo] * (1 - wx) + rows[..., xhi] * wx  # (..., out_h, out_w)


def _upsample_bilinear(x, scale_factor_height=1.0, scale_factor_width=1.0, align_corners=False, half_pixel_centers=None):  # type: ignore[no-untyped-def]
    h, w = x.shape[-2:]
    out_h, out_w = int(math.floor(h * float(scale_factor_height))), int(math.floor(w * float(scale_factor_width)))
    mode = "align_corners" if align_corners else "half_pixel"
    return _resample(x, out_h, out_w, mode)


def _resize_bilinear(x, target_size_height=1, target_size_width=1, sampling_mode="DEFAULT"):  # type: ignore[no-untyped-def]
    modes = {"ALIGN_CORNERS": "align_corners", "STRICT_ALIGN_CORNERS": "align_corners", "UNALIGN_CORNERS": "half_pixel",
             "DEFAULT": "half_pixel"}  # fmt: skip
    if sampling_mode not in modes:
        raise UnsupportedOpError(f"resize_bilinear sampling mode {sampling_mode!r} is not implemented")
    return _resample(x, int(target_size_height), int(target_size_width), modes[sampling_mode])


def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):  # type: ignore[no-untyped-def]
    x = np.asarray(x)
    slices: list[Any] = []
    for i in range(x.ndim):
        b = None if begin_mask is not None and np.atleast_1d(begin_mask)[i] else int(np.atleast_1d(begin)[i])
        e = None if end_mask is not None and np.atleast_1d(end_mask)[i] else int(np.atleast_1d(end)[i])
        s = int(np.atleast_1d(stride)[i]) if stride is not None else 1
        if squeeze_mask is not None and np.atleast_1d(squeeze_mask)[i]:
            slices.append(b if b is not None else 0)
        else:
            slices.append(slice(b, e, s))
    return x[tuple(slices)]


def _concat(values, axis, interleave=False):  # type: ignore[no-untyped-def]
    if interleave:
        raise UnsupportedOpError("concat with interleave is not implemented by the reference executor")
    return np.concatenate([np.asarray(v) for v in values], axis=int(axis))


def _reduce(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def kernel(x, axes=None, keep_dims=False):  # type: ignore[no-untyped-def]
        axes_t = tuple(int(a) for a in np.atleast_1d(axes)) if axes is not None else None
        return fn(_f(x), axis=axes_t, keepdims=bool(keep_dims))

    return kernel


def _along(v: Any, ndim: int, axis: Any) -> np.ndarray:
    """A per-tensor scalar, or a per-channel vector shaped to broadcast along ``axis``."""
    v = np.asarray(v, dtype=np.float32)
    if v.ndim == 0 or v.size == 1:
        return v.reshape(())
    shape = [1] * ndim
    shape[int(axis) % ndim] = -1
    return v.reshape(shape)


def _dequantize(input, scale, zero_point=None, axis=None):  # type: ignore[no-untyped-def]
    q = np.asarray(input).astype(np.float32)  # a new array: shifted and scaled in place
    if zero_point is not None:
        q -= _along(zero_point, q.ndim, axis)
    q *= _along(scale, q.ndim, axis)
    return q


def _quantize(input, scale, output_dtype, zero_point=None, axis=None):  # type: ignore[no-untyped-def]
    x = _f(input)
    dtype = _CAST_NAMES[str(output_dtype)]
    q = x / _along(scale, x.ndim, axis)  # a new array: rounded, shifted and clipped in place (320 quantize ops a b2 image)
    np.round(q, out=q)  # round half to even, as Core ML
    if zero_point is not None:
        q += _along(zero_point, x.ndim, axis)
    info = np.iinfo(dtype)
    return np.clip(q, info.min, info.max, out=q).astype(dtype)


def _argmax(x, axis=-1, keep_dims=False):  # type: ignore[no-untyped-def]
    out = np.argmax(np.asarray(x), axis=int(axis))
    return np.expand_dims(out, int(axis)) if keep_dims else out


def _topk(x, k=1, axis=-1, ascending=False, sort=True, return_indices=True, output_indices_dtype="int32"):  # type: ignore[no-untyped-def]
    x = np.asarray(x)
    order = np.argsort(x if ascending else -x, axis=int(axis), kind="stable")
    indices = np.take(order, np.arange(int(k)), axis=int(axis))
    return np.take_along_axis(x, indices, axis=int(axis)), indices


def _pad(x, pad, mode="constant", constant_val=0.0):  # type: ignore[no-untyped-def]
    x = np.asarray(x)
    pairs = np.asarray(pad, np.int64).reshape(-1, 2)  # (before, after) for the last len(pairs) axes
    width = [(0, 0)] * (x.ndim - len(pairs)) + [(int(b), int(a)) for b, a in pairs]
    if mode == "constant":
        return np.pad(x, width, mode="constant", constant_values=constant_val)
    return np.pad(x, width, mode={"replicate": "edge", "reflect": "reflect"}[str(mode)])


def _pixel_shuffle(x, upscale_factor):  # type: ignore[no-untyped-def]
    x = np.asarray(x)
    b, c, h, w = x.shape
    r = int(upscale_factor)
    x = x.reshape(b, c // (r * r), r, r, h, w)  # (B, C', r, r, H, W)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, c // (r * r), h * r, w * r)


_KERNELS: dict[str, Callable[..., Any]] = {
    "topk": _topk,
    "pad": _pad,
    "pixel_shuffle": _pixel_shuffle,
    "gather": _gather,
    "greater_equal": lambda x, y: np.greater_equal(x, y),
    "greater": lambda x, y: np.greater(x, y),
    "less_equal": lambda x, y: np.less_equal(x, y),
    "less": lambda x, y: np.less(x, y),
    "equal": lambda x, y: np.equal(x, y),
    "not_equal": lambda x, y: np.not_equal(x, y),
    "logical_and": lambda x, y: np.logical_and(x, y),
    "logical_or": lambda x, y: np.logical_or(x, y),
    "logical_not": lambda x: np.logical_not(x),
    "select": lambda cond, a, b: np.where(cond, a, b),
    "gather_along_axis": lambda x, indices, axis=0, validate_indices=False: np.take_along_axis(
        np.asarray(x), np.asarray(indices).astype(np.int64), axis=int(axis)
    ),
    "conv": _conv,
    "linear": _linear,
    "matmul": _matmul,
    "layer_norm": _layer_norm,
    "batch_norm": _batch_norm,
    "softmax": _softmax,
    "gelu": _gelu,
    "relu": lambda x: np.maximum(_f(x), 0),
    "sigmoid": lambda x: 1 / (1 + np.exp(-_f(x))),
    "tanh": lambda x: np.tanh(_f(x)),
    "erf": lambda x: _erf(_f(x)),
    "exp": lambda x: np.exp(_f(x)),
    "sqrt": lambda x: np.sqrt(_f(x)),
    "rsqrt": lambda x, epsilon=1e-12: 1 / np.sqrt(_f(x) + np.float32(epsilon)),
    "add": lambda x, y: _f(x) + _f(y),
    "sub": lambda x, y: _f(x) - _f(y),
    "mul": lambda x, y: _f(x) * _f(y),
    "real_div": lambda x, y: _f(x) / _f(y),
    "pow": lambda x, y: np.power(_f(x), _f(y)),
    "maximum": lambda x, y: np.maximum(_f(x), _f(y)),
    "minimum": lambda x, y: np.minimum(_f(x), _f(y)),
    "clip": lambda x, alpha, beta: np.clip(_f(x), alpha, beta),
    "round": lambda x: np.round(_f(x)),
    "floor": lambda x: np.floor(_f(x)),
    "reshape": lambda x, shape: np.reshape(x, tuple(int(s) for s in np.atleast_1d(shape))),
    "transpose": lambda x, perm: np.transpose(x, tuple(int(p) for p in np.atleast_1d(perm))),
    "squeeze": lambda x, axes=None: np.squeeze(x, axis=None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))),
    "expand_dims": lambda x, axes: np.expand_dims(x, tuple(int(a) for a in np.atleast_1d(axes))),
    "cast": lambda x, dtype: np.asarray(x).astype(_CAST_NAMES[str(dtype)]),
    "identity": lambda x: np.asarray(x),
    "concat": _concat,
    "slice_by_index": _slice_by_index,
    "upsample_bilinear": _upsample_bilinear,
    "resize_bilinear": _resize_bilinear,
    "reduce_mean": _reduce(np.mean),
    "reduce_sum": _reduce(np.sum),
    "reduce_max": _reduce(np.max),
    "reduce_argmax": _argmax,
    "quantize": _quantize,
    "dequantize": _dequantize,
}
