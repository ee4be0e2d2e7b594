"""The float model as the reference of parity: its logits and masks on the same images an artifact sees.

Everything here runs the float model in torch (or reads what identifies it); :mod:`.parity` compares an artifact
against it, :mod:`.int8` uses its masks where the user's photos have no labels, :mod:`.debug` its stage outputs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segformer_edge.errors import CheckpointError, DataError
from segformer_edge.inputs import InputSpec

from .base import Artifact, file_sha256

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "check_reference",
    "checkpoint_digest",
    "data_record",
    "float_labeler",
    "float_logits",
    "float_logits_of",
    "load_reference",
    "open_verify_data",
    "quarter_up",
    "reference_form",
    "softmax",
    "state_digest",
    "upsampled",
    "upsampled_argmax",
    "uses_builtin_labels",
]


def checkpoint_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else file_sha256(path)


def state_digest(model: Any) -> str:
    """sha256 of a model's parameters and buffers (names, shapes, dtypes, values): what identifies a model that has
    no checkpoint file (one trained in memory), and the same for a checkpoint and the model loaded from it."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def check_reference(artifact: Artifact, model: Any, source: str = "the model", option: str = "--checkpoint") -> None:
    """Refuse a float model whose parameters are not those the artifact was exported from (its manifest's
    ``checkpoint.state_sha256``; manifests written before it existed are not checked)."""
    expected = (artifact.manifest.get("checkpoint") or {}).get("state_sha256")
    if expected and state_digest(model) != expected:
        raise CheckpointError(
            f"{source}: this is not the model {artifact.folder.name} was exported from (its parameters differ from "
            f"those recorded, state sha256 {expected[:12]}...); pass the right {option}"
        )


def float_logits(model: Any, spec: InputSpec, images: np.ndarray) -> np.ndarray:
    """The float model's logits (N, K, H/4, W/4) for uint8 RGB images (N, H, W, 3).

    Remembered (:class:`_FloatMemo`): the calibration set's labels, then the verify of every target of a run, see the
    same photos at the same size, and the float model runs once on each (it is the slowest part of a verify: torch
    eager runs SegFormer 3-4x slower than the runtimes it is compared with, benchmarks/RESULTS.md). It runs with its
    decoder projected (:func:`reference_form`): the same function, checked against the decoder as trained."""
    import torch

    x = spec.float_spec(images)  # (N, 3, H, W) float32, normalised
    logits = _FLOAT_MEMO.get(model, x)
    if logits is None:
        shared = _FLOAT_MEMO.shared_file(model, x)
        logits = _read_shared(shared)
        if logits is None:
            logits = _FLOAT_MEMO.logits_of(model, x)
            _write_shared(shared, logits, _FLOAT_MEMO.form)
        else:
            logger.info("float logits of %d image(s) read from the run's shared folder (%s)", len(x), shared.name if shared else "")
            if _FLOAT_MEMO.form is None:  # computed by another process of the run: its form
                _FLOAT_MEMO.form = _read_form(shared)
        _FLOAT_MEMO.put(model, x, logits)
    return logits


# Targets exported side by side (converters/side_by_side.py) are separate processes: each has its own memo. The
# float logits one of them computes are left in this folder (named by the model state's digest and the input's) for
# the others, so that the run's float model still runs once on each image.
SHARED_LOGITS_ENV = "SEGFORMER_EDGE_SHARED_LOGITS"


def _read_shared(path: Path | None) -> np.ndarray | None:
    if path is None:
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None


def _write_shared(path: Path | None, logits: np.ndarray, form: dict[str, Any] | None) -> None:
    if path is None:
        return
    from segformer_edge.io import atomic_path, atomic_write_json

    try:
        if form is not None:
            atomic_write_json(path.with_suffix(".form.json"), form)  # first: the logits are read only with it there
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, logits, allow_pickle=False)
    except OSError as exc:
        logger.info("float logits not shared with the other targets (%s)", exc)


def _read_form(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.with_suffix(".form.json").read_text())
    except (OSError, ValueError):
        return None


class _FloatMemo:
    """The float logits of the inputs one model saw lately, up to ``LIMIT`` bytes, dropped for a new model.

    Keyed by the input's bytes and by what the model is now: each parameter and buffer tensor and its version
    counter (any in-place change, a training step or a ``load_state_dict``, bumps it) and its mode; a model in
    training mode (dropout) is never remembered. What it hands out and keeps are copies: a caller may change its own."""

    LIMIT = 512 * 2**20

    def __init__(self) -> None:
        self._runner: Any = None  # what computes the model's logits: its projected-decoder copy, checked, or itself
        self.form: dict[str, Any] | None = None  # how (reference_form)
        self._model: weakref.ref[Any] | None = None
        self._state: tuple[Any, ...] = ()
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._digest: str | None = None  # the model state's sha256, when a shared file needed it

    @staticmethod
    def _state_of(model: Any) -> tuple[Any, ...]:
        return tuple((id(t), t._version) for t in model.state_dict(keep_vars=True).values())

    def shared_file(self, model: Any, x: np.ndarray) -> Path | None:
        """Where the logits of ``x`` are shared between the processes of one run (None outside such a run, or for a
        model the memo cannot keep)."""
        folder = os.environ.get(SHARED_LOGITS_ENV)
        if not folder or not self._slot(model):
            return None
        if self._digest is None:
            self._digest = state_digest(model)
        return Path(folder) / f"{self._digest[:24]}-{self._key(x).hex()[:32]}.npy"

    def _slot(self, model: Any) -> bool:
        """Whether the entries are this model's as it is now (else they are dropped); False for one it cannot keep."""
        if not hasattr(model, "modules") or any(m.training for m in model.modules()):
            return False
        state = self._state_of(model)
        if self._model is None or self._model() is not model or state != self._state:
            self.clear()
            self._model, self._state = weakref.ref(model, lambda _: self.clear()), state
        return True

    def get_slot(self, model: Any) -> bool:
        """Whether what is remembered is ``model``'s as it is now."""
        return self._model is not None and self._model() is model and self._state == self._state_of(model)

    def get(self, model: Any, x: np.ndarray) -> np.ndarray | None:
        if not self._slot(model):
            return None
        kept = self._entries.get(self._key(x))
        return None if kept is None else kept.copy()

    def put(self, model: Any, x: np.ndarray, logits: np.ndarray) -> None:
        if not self._slot(model) or logits.nbytes > self.LIMIT:
            return
        self._entries[self._key(x)] = logits.copy()
        self._bytes += logits.nbytes
        while self._bytes > self.LIMIT:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes

    def logits_of(self, model: Any, x: np.ndarray) -> np.ndarray:
        """``model``'s logits (N, K, H/4, W/4) for ``x`` (N, 3, H, W), computed: with its copy whose decoder is projected
        where that agrees with the decoder as trained on the first image of ``x`` (checked once per model state, both
        forms run on it; a single image's logits are the check's own); with ``model`` itself otherwise (one it cannot
        keep, one already projected or not a SegFormer, or where the two disagree)."""
        import torch

        if not self._slot(model):
            with torch.no_grad():
                return model(torch.from_numpy(x)).numpy()
        if self._runner is None:
            self._runner, self.form, first = _checked_projection(model, x[:1])
            if len(x) == 1 and first is not None:
                return first
        with torch.no_grad():
            return self._runner(torch.from_numpy(x)).numpy()

    def clear(self) -> None:
        self._runner = self.form = None
        self._model, self._state, self._digest = None, (), None
        self._entries.clear()
        self._bytes = 0

    @staticmethod
    def _key(x: np.ndarray) -> bytes:
        return hashlib.sha256(f"{x.shape}{x.dtype}".encode() + np.ascontiguousarray(x).tobytes()).digest()


_FLOAT_MEMO = _FloatMemo()
PROJECTION_TOLERANCE = 1e-4  # largest |logit difference| / largest |logit| between the two forms of the decoder


def _checked_projection(model: Any, x: np.ndarray) -> tuple[Any, dict[str, Any], np.ndarray | None]:
    """(the module to compute ``model``'s logits with, how, its logits on ``x``): its copy with the decoder projected
    (:class:`segformer_edge.model.ProjectedHead`: fuse conv and BatchNorm folded into the stage projections, before
    upsampling; b2 at 512x512 runs in half the time) where its logits on ``x`` (1, 3, H, W) agree with the decoder as
    trained within :data:`PROJECTION_TOLERANCE`; else ``model`` itself."""
    import torch
    from segformer_edge.model import SegFormer, SegFormerHead

    if not isinstance(model, SegFormer) or not isinstance(model.decoder, SegFormerHead):
        return model, {"decoder": "as in the model", "checked": None}, None
    from .graph import project_decoder

    projected = project_decoder(model)
    with torch.no_grad():
        a, b = model(torch.from_numpy(x)), projected(torch.from_numpy(x))  # (1, K, H/4, W/4) each
    difference = float((a - b).abs().max() / a.abs().max().clamp(min=1e-12))
    if not math.isfinite(difference):  # a broken model: parity names its NaN; the reference stays the model as trained
        check = {"images": 1, "max_relative_logit_difference": None, "tolerance": PROJECTION_TOLERANCE, "note": "logits not finite"}
        return model, {"decoder": "as trained", "checked": check}, a.numpy()
    check = {"images": 1, "max_relative_logit_difference": difference, "tolerance": PROJECTION_TOLERANCE}
    if not difference <= PROJECTION_TOLERANCE:
        logger.warning("the float reference runs its decoder as trained: projected, its logits differ by %.2e (relative)", difference)
        return model, {"decoder": "as trained", "checked": check}, a.numpy()
    return projected, {"decoder": "projected", "checked": check}, b.numpy()


def reference_form(model: Any) -> dict[str, Any] | None:
    """How ``model``'s float logits were computed (parity records it), None where they were not remembered:
    ``decoder`` ``projected`` (the same function, checked against the decoder as trained on the first image: ``checked``)
    or ``as trained`` (where that check failed)."""
    return copy.deepcopy(_FLOAT_MEMO.form) if _FLOAT_MEMO.get_slot(model) else None


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the class axis (1) of (N, K, h, w) logits."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def quarter_up(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) labels at 1/4 resolution -> (N, H, W) by nearest neighbour."""
    from segformer_edge.predict import resize_labels

    return np.stack([resize_labels(one, size) for one in labels])


def upsampled(logits: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(N, K, h, w) logits -> (N, K, H, W) by bilinear upsampling to the input size (a torch tensor)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)


def upsampled_argmax(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, K, h, w) logits -> (N, H, W) labels: bilinear upsampling to the input size, then argmax."""
    return upsampled(logits, size).argmax(1).numpy()


def uses_builtin_labels(model: Any) -> bool:
    """Whether the model predicts the built-in synthetic scenes' classes (the reference model does)."""
    from segformer_edge.data import synthetic_labels

    return list(model.meta.class_names) == list(synthetic_labels().classes)


def float_logits_of(model: Any, size: tuple[int, int]) -> Callable[[np.ndarray], np.ndarray]:
    """(N, H, W, 3) uint8 images at ``size`` -> the float model's logits (N, K, H/4, W/4), one image at a time."""
    spec = InputSpec.for_model(model.meta, size)
    return lambda images: np.concatenate([float_logits(model, spec, images[i : i + 1]) for i in range(len(images))])


def float_labeler(model: Any, size: tuple[int, int]) -> Callable[[np.ndarray], np.ndarray]:
    """(H, W, 3) uint8 image at ``size`` -> (H, W) labels of the float model: the reference where data has no masks."""
    spec = InputSpec.for_model(model.meta, size)
    return lambda image: upsampled_argmax(float_logits(model, spec, image[None]), size)[0]


def load_reference(artifact: Artifact, checkpoint: str | Path | None, option: str = "--checkpoint") -> Any:
    """The float model an artifact was exported from: ``checkpoint`` (default: the built-in model), refused
    with a CheckpointError naming ``option`` when its sha256 is not the one the manifest records."""
    from segformer_edge.weights import builtin_checkpoint, load_pretrained

    record = artifact.manifest.get("checkpoint") or {}
    if checkpoint is None and record.get("state_sha256") and not record.get("sha256"):
        raise CheckpointError(
            f"{artifact.folder.name} was exported from a model in memory, not from a checkpoint file: verify it with "
            f"that model (segformer_edge.verify(artifact, model=...)), or save it with save_checkpoint and pass {option}"
        )
    ckpt = Path(checkpoint) if checkpoint is not None else builtin_checkpoint()
    expected = record.get("sha256")
    if expected and checkpoint_digest(ckpt) != expected:
        raise CheckpointError(
            f"{ckpt}: this is not the checkpoint {artifact.folder.name} was exported from "
            f"({artifact.manifest['checkpoint'].get('name')}); pass the right {option}"
        )
    model = load_pretrained(ckpt)
    if not expected:  # exported from a model in memory: its parameters are what identify it
        check_reference(artifact, model, str(ckpt), option)
    return model


def open_verify_data(data: str | None, model: Any) -> tuple[Any, str, bool]:
    """The images to verify on: (source, how they are used, whether their masks are usable).

    Without ``data``, the built-in synthetic scenes: with their labels where the model has their label
    space, as plain images (the float model's predictions as the reference) otherwise, and the report says so.
    """
    from segformer_edge.data import open_source

    spec = data or "synthetic"
    source = open_source(spec, "val")
    has_masks = source.has_masks
    if has_masks and source.labels.num_classes != model.config.num_classes:
        if data is not None:
            raise DataError(f"{data}: the data has {source.labels.num_classes} classes but the model has {model.config.num_classes}")
        has_masks = False
    if data is None and not uses_builtin_labels(model):
        has_masks = False  # the scenes' labels mean nothing to a model of other classes: its own predictions do
    usage = "labels" if has_masks else "images only; the float model's predictions are the reference"
    return source, usage, has_masks


def data_record(spec: str, source: Any, indices: range, usage: str) -> dict[str, Any]:
    """What a report and a manifest record of the images checked: where they came from, how many, how they were
    used, a hash of their names; ``skipped``: the photos of the folder left out because they do not read
    (``{"file", "reason"}``); ``converted``: what was converted in the images used (16-bit scaled, CMYK,
    transparency flattened), by file."""
    names = "\n".join(source.item_name(i) for i in indices)
    used = {str(source.samples[i].image) for i in indices} if source.samples else set()
    return {"spec": spec, "kind": source.name.split(":")[0], "images": len(indices), "usage": usage,
            "sha256": hashlib.sha256(names.encode()).hexdigest(), "skipped": list(source.skipped),
            "converted": {file: notes for file, notes in source.notes.items() if file in used}}  # fmt: skip
