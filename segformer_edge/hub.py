"""Hugging Face Hub model ids (``org/name`` or ``org/name@revision``) as checkpoints.

:func:`resolve_model_path` turns a checkpoint argument into a local path: an existing file or folder is
returned as it is; an id is fetched into (or found in) the Hugging Face cache with
``huggingface_hub.snapshot_download``, which honours ``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``.
Only the files a SegFormer needs are fetched (config, weights, preprocessor config); nothing runs remote code.
``huggingface_hub`` is imported only when an id is resolved, so the CLI's ``--help`` stays light.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .errors import CheckpointError

__all__ = ["HUB_FILES", "is_hub_id", "parse_hub_id", "resolve_model_path"]

logger = logging.getLogger(__name__)

# What a transformers SegFormer checkpoint needs; everything else in a repo (TF/Flax weights, ONNX, images)
# is left on the Hub.
HUB_FILES: list[str] = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "preprocessor_config.json",
]

# The Hub's rules for a repo name part: letters, digits, '-', '_', '.'; no leading/trailing '-' or '.'.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._/-]*))?")
# A missing path ending like a checkpoint file is a mistyped path, never a Hub id.
_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".json")


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``spec`` has the shape of a Hub model id, else None. Touches no disk."""
    m = _HUB_ID.fullmatch(spec)
    if m is None or ".." in m["repo"] or "--" in m["repo"] or m["repo"].lower().endswith(_FILE_SUFFIXES):
        return None
    return m["repo"], m["revision"]


def is_hub_id(spec: str | Path) -> bool:
    """Whether ``spec`` is not an existing path but has the shape of a Hub model id."""
    return not Path(spec).exists() and parse_hub_id(str(spec)) is not None


def resolve_model_path(spec: str | Path) -> Path:
    """A local path for a checkpoint given as a path or a Hugging Face Hub model id.

    Args:
        spec: An existing file or folder (returned unchanged), or ``org/name`` / ``org/name@revision``
            (a branch, tag or commit). Ids are resolved through the Hugging Face cache: with the model cached
            this works offline (``HF_HUB_OFFLINE=1``); otherwise the needed files are downloaded once.

    Returns:
        The path, or the snapshot folder in the cache (``.../models--org--name/snapshots/<commit>``).

    Raises:
        CheckpointError: the path does not exist and is not an id; or the id cannot be resolved (not cached
            and offline or unreachable, no such repo or revision, not a transformers model).
    """
    path = Path(spec)
    if path.exists():
        return path
    text = str(spec)
    parsed = parse_hub_id(text)
    if parsed is None:
        raise CheckpointError(f"{text}: no such file or folder")
    repo_id, revision = parsed
    snapshot = _snapshot(repo_id, revision, text)
    if not (snapshot / "config.json").is_file():
        raise CheckpointError(
            f"{text}: the Hub repo has no config.json, so it is not a transformers SegFormer model"
        )
    return snapshot


def _snapshot(repo_id: str, revision: str | None, spec: str) -> Path:
    """Download (or find in the cache) the files of :data:`HUB_FILES`; every failure is a CheckpointError."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:
        raise CheckpointError(
            f"{spec}: Hub model ids need huggingface_hub; pip install 'segformer-edge[train]' "
            "(or pass a local checkpoint path)"
        ) from exc

    logger.info("resolving %s (revision %s) through the Hugging Face cache", repo_id, revision or "main")
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES)
    except GatedRepoError as exc:
        raise CheckpointError(
            f"{spec}: the Hub model is gated: accept its terms on huggingface.co and log in (hf auth login)"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise CheckpointError(
            f"{spec}: no such file or folder, and no such model on the Hugging Face Hub "
            "(or it is private: log in with hf auth login)"
        ) from exc
    except RevisionNotFoundError as exc:
        raise CheckpointError(f"{spec}: the Hub model {repo_id} has no revision {revision!r}") from exc
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"{spec}: no such file or folder, and the Hugging Face model {repo_id}"
            f"{'@' + revision if revision else ''} is not in the local cache and the Hub cannot be reached "
            "(offline, HF_HUB_OFFLINE=1, or no network); download it once with network access "
            f"(hf download {repo_id}), or set HF_HUB_CACHE to a cache that holds it"
        ) from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{spec}: could not fetch the Hugging Face model {repo_id} ({_first_line(exc)})") from exc
    logger.info("%s -> %s", spec, folder)
    return Path(folder)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
