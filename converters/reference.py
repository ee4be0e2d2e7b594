"""The float model as the reference of parity: its logits and masks on the same images an artifact sees.

Everything here runs the float model in torch (or reads what identifies it); :mod:`.parity` compares an artifact
against it, :mod:`.int8` uses its masks where the user's photos have no labels, :mod:`.debug` its stage outputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segformer_edge.errors import CheckpointError, DataError
from segformer_edge.inputs import InputSpec

from .base import Artifact, file_sha256

if TYPE_CHECKING:
    import torch

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
    """The float model's logits (N, K, H/4, W/4) for uint8 RGB images (N, H, W, 3)."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(spec.float_spec(images))).numpy()


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
