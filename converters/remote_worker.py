"""The board's side of ``--device ssh://``: ``python -m segformer_edge.converters.remote_worker``.

It needs what a board has after ``pip install 'segformer-edge[runtime]'`` and never imports torch (except for the
eager reference of ``bench --compare-torch``, where the board has torch). One ssh session runs one request:

- the first line of stdin is a JSON request, ``{"protocol": 1, "kind": ...}``;
- ``probe``: the board's facts, which artifacts its cache already holds (each re-hashed), and which runtimes it lacks;
- ``receive``: the rest of stdin is a tar stream of one model file, unpacked under a temporary name in the cache,
  hash-checked, then renamed to its sha256: a dropped copy leaves only a ``.incoming-*`` folder, which nothing trusts
  (and the next copy removes);
- ``bench``: :func:`.bench.bench_paired` on cached artifacts; one JSON line per finished step, then the records;
- ``serve``: loads one artifact's runner, then answers frames (8-byte big-endian length + ``.npy`` bytes) until EOF.

Replies go to stdout; stdout's file descriptor is moved aside first, so that a runtime's own prints reach stderr and
never the protocol. Errors are one ``error: ...`` line on stderr and exit code 2 (the bench worker's convention).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

PROTOCOL = 1
MODULE = "segformer_edge.converters.remote_worker"
MANIFEST = "manifest.json"
# Runtime module -> the distribution whose version the board's facts record.
RUNTIMES = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime", "onnxruntime": "onnxruntime",
            "openvino": "openvino", "coremltools": "coremltools", "executorch": "executorch", "torch": "torch"}  # fmt: skip
_SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class WorkerError(Exception):
    """A request the board cannot serve: its message is the one line the host shows."""


def cache_root() -> Path:
    """Where the board keeps copied artifacts: ``$SEGFORMER_EDGE_CACHE`` or ``$XDG_CACHE_HOME/segformer-edge``."""
    base = os.environ.get("SEGFORMER_EDGE_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segformer-edge"
    )
    return Path(base) / "artifacts"


def board_facts() -> dict[str, Any]:
    """CPU model, cores, architecture, memory, OS and runtime versions of this machine."""
    import platform
    from importlib import metadata

    from .bench import machine_info

    facts: dict[str, Any] = {"hostname": platform.node(), **machine_info()}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                facts["memory_mb"] = int(line.split()[1]) // 1024  # KiB
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                facts["os"] = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        facts["os"] = f"{platform.system()} {platform.release()}"
    if "cpu" not in facts:  # arm64 /proc/cpuinfo has no "model name": the device tree names the board
        try:
            facts["cpu"] = Path("/proc/device-tree/model").read_text().strip("\x00\n ")
        except OSError:
            pass
    features = arm_features()
    if features is not None:
        facts["arm_features"] = features
    versions = {}
    for dist in ("segformer-edge", "numpy", *RUNTIMES.values()):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    facts["versions"] = versions
    return facts


# The aarch64 HWCAP / HWCAP2 bits (Linux arch/arm64/include/uapi/asm/hwcap.h) that pick XNNPACK's kernels.
_HWCAP = {1: "asimd", 9: "fphp", 10: "asimdhp", 20: "asimddp", 22: "sve"}
_HWCAP2 = {1: "sve2", 13: "i8mm", 14: "bf16"}


def arm_features() -> list[str] | None:
    """The arm64 CPU features this process sees (from its auxiliary vector, which qemu-user emulates too), or None
    off arm64: NEON (asimd), fp16 arithmetic (fphp, asimdhp), int8 dot product (asimddp), i8mm, bf16, SVE."""
    import platform
    import struct

    if platform.machine() not in ("aarch64", "arm64"):
        return None
    try:
        raw = Path("/proc/self/auxv").read_bytes()
    except OSError:
        return None
    pairs = dict(struct.iter_unpack("<QQ", raw[: len(raw) // 16 * 16]))
    hwcap, hwcap2 = pairs.get(16, 0), pairs.get(26, 0)  # AT_HWCAP, AT_HWCAP2
    return [name for bit, name in _HWCAP.items() if hwcap >> bit & 1] + [
        name for bit, name in _HWCAP2.items() if hwcap2 >> bit & 1
    ]


def _entry(sha: str) -> Path:
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise WorkerError(f"{sha!r} is not a sha256")
    return cache_root() / sha


def _cached(sha: str, name: str) -> bool:
    """Whether the cache holds the model file ``name`` with this sha256 (hashed again: a damaged entry is removed)."""
    from .base import file_sha256

    path = _entry(sha) / name
    if not path.exists():
        return False
    if file_sha256(path) == sha:
        return True
    shutil.rmtree(_entry(sha), ignore_errors=True)
    return False


def _space_error(exc: OSError, what: str, where: Path) -> WorkerError:
    return WorkerError(f"no room for {what} in {where} on the board ({exc.strerror}): free space there, "
                       "or set SEGFORMER_EDGE_CACHE on the board to a disk with room")  # fmt: skip


def probe(request: dict[str, Any]) -> dict[str, Any]:
    import importlib

    missing = []
    for module in request.get("modules", []):  # imported, not only found: a broken install counts as missing
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    have = [a["sha256"] for a in request.get("artifacts", []) if _cached(a["sha256"], a["file"])]
    torch = None
    if request.get("torch"):  # --compare-torch: whether torch imports here (not merely whether it is on the path)
        try:
            import torch as _torch

            torch = str(_torch.__version__)
        except ImportError:
            torch = None
    return {"facts": board_facts(), "have": have, "missing": missing, "cache": str(cache_root()), "torch": torch}


def _sweep(root: Path) -> None:
    """Remove the ``.incoming-*`` folders of copies whose process is gone (a dropped connection's leftovers)."""
    for stale in root.glob(".incoming-*"):
        try:
            os.kill(int(stale.name.rsplit("-", 1)[1]), 0)
        except (ValueError, IndexError, ProcessLookupError):
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def receive(request: dict[str, Any], stream: IO[bytes]) -> dict[str, Any]:
    """Unpack one model file from the tar on ``stream`` under a temporary name, check its sha256, rename it."""
    from .base import file_sha256

    sha, name, size = request["sha256"], request["file"], int(request["bytes"])
    final = _entry(sha)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    _sweep(root)
    free = shutil.disk_usage(root).free
    if free < size:
        raise WorkerError(f"no room for {name} ({size / 1e6:.1f} MB) in {root} on the board ({free / 1e6:.1f} MB free): "
                          "free space there, or set SEGFORMER_EDGE_CACHE on the board to a disk with room")  # fmt: skip
    incoming = root / f".incoming-{sha[:16]}-{os.getpid()}"
    shutil.rmtree(incoming, ignore_errors=True)
    try:
        incoming.mkdir()
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                target = (incoming / member.name).resolve()
                if not (member.isfile() or member.isdir()) or not target.is_relative_to(incoming.resolve()):
                    raise WorkerError(f"{member.name}: not a plain file inside the artifact")
                tar.extract(member, incoming, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        if not (incoming / name).exists():
            raise WorkerError(f"{name}: the copy ended before the file arrived (the connection dropped?)")
        actual = file_sha256(incoming / name)
        if actual != sha:
            raise WorkerError(
                f"{name} arrived with sha256 {actual[:12]}..., not {sha[:12]}...: the copy was damaged; run again"
            )
        if final.exists():  # another run copied it meanwhile
            shutil.rmtree(incoming)
        else:
            os.rename(incoming, final)
    except tarfile.TarError as exc:
        raise WorkerError(f"{name}: the copy broke off ({exc}): the connection dropped?") from exc
    except OSError as exc:
        if exc.errno in _SPACE_ERRORS:
            raise _space_error(exc, f"{name} ({size / 1e6:.1f} MB)", root) from exc
        raise
    finally:
        if incoming.exists():
            shutil.rmtree(incoming, ignore_errors=True)
    return {"received": sha}


def _place(artifact: dict[str, Any]) -> Path:
    """The cached artifact folder with this request's manifest beside the model file (written only when it changed)."""
    folder = _entry(artifact["sha256"])
    if not (folder / artifact["file"]).exists():
        raise WorkerError(
            f"{artifact['file']}: not in the board's cache {folder.parent} (removed since the copy?); run again"
        )
    text = json.dumps(artifact["manifest"], indent=2)
    path = folder / MANIFEST
    if not path.exists() or path.read_text() != text:
        tmp = folder / f".{MANIFEST}.{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, path)
    return folder


def bench(request: dict[str, Any], emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    from .bench import bench_paired

    folders = [_place(a) for a in request["artifacts"]]
    checkpoint = None
    if request.get("checkpoint"):
        ckpt = request["checkpoint"]
        checkpoint = _entry(ckpt["sha256"]) / ckpt["file"]
        if not checkpoint.exists():
            raise WorkerError(f"{ckpt['file']}: not in the board's cache; run again")
    records = bench_paired(
        folders, request["threads"], warmup=request["warmup"], runs=request["runs"], rounds=request["rounds"],
        compare_torch=request["compare_torch"], checkpoint=checkpoint, size=tuple(request["size"]) if request.get("size") else None,
        compute_units=request["compute_units"], profile=request["profile"], floor=request["floor"],
        on_step=lambda: emit({"step": 1}),
    )  # fmt: skip
    return {"records": records}


def write_frame(out: IO[bytes], payload: bytes) -> None:
    out.write(len(payload).to_bytes(8, "big"))
    out.write(payload)
    out.flush()


def read_frame(stream: IO[bytes]) -> bytes | None:
    """One frame, or None at a clean end of the stream."""
    head = stream.read(8)
    if not head:
        return None
    if len(head) < 8:
        raise WorkerError("the input ended inside a frame (the connection dropped?)")
    size = int.from_bytes(head, "big")
    payload = stream.read(size)
    if len(payload) < size:
        raise WorkerError("the input ended inside a frame (the connection dropped?)")
    return payload


def serve(request: dict[str, Any], stream: IO[bytes], out: IO[bytes]) -> None:
    """Load the artifact's runner, then run each array that arrives and send its output back."""
    import numpy as np

    from . import get_target
    from .base import read_manifest

    artifact = read_manifest(_place(request["artifact"]))
    target = get_target(artifact.target)
    if not target.runs_here():
        raise WorkerError(f"{artifact.target} artifacts {target.not_here} (the board)")
    target.check_runtime()
    runner = target.load(artifact, threads=request.get("threads"))
    header = {"executor": runner.executor, "facts": board_facts()}
    write_frame(out, json.dumps(header).encode())
    while (payload := read_frame(stream)) is not None:
        x = np.load(io.BytesIO(payload), allow_pickle=False)
        result = np.asarray(runner(x))
        buffer = io.BytesIO()
        np.save(buffer, result, allow_pickle=False)
        write_frame(out, buffer.getvalue())


def _extra_for(root: str) -> str:
    """The pip extra that installs the module ``root`` (the target that runs on it, else the base install's)."""
    from . import get_target, target_names

    for name in target_names():
        target = get_target(name)
        if root in {m.split(".")[0] for m in target.runtime_modules}:
            return target.extra
    return "runtime" if root in ("numpy", "PIL") else "export"


def _protocol_out() -> IO[bytes]:
    """Stdout for the protocol alone: fd 1 is pointed at stderr, so that what a runtime prints cannot corrupt it."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "wb", buffering=0)


def _hangup(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds: a copy in progress removes its temporary folder, a bench kills its child


def _watch_session(parent: int) -> None:
    """Stop when the ssh session that started this worker is gone (the worker is handed to another parent): an ssh
    session without a terminal sends no hangup, and a bench must not run on for a host that stopped listening."""
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    out = _protocol_out()
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, _hangup)
    threading.Thread(target=_watch_session, args=(os.getppid(),), daemon=True).start()
    from segformer_edge.errors import SegformerEdgeError

    stdin = sys.stdin.buffer
    try:
        request = json.loads(stdin.readline() or "null")
        if not isinstance(request, dict):
            raise WorkerError("no request on stdin")
        if request.get("protocol") != PROTOCOL:
            raise WorkerError(f"the host speaks protocol {request.get('protocol')} and the board {PROTOCOL}: "
                              "install the same segformer-edge version on both")  # fmt: skip
        kind = request.get("kind")

        def emit(reply: dict[str, Any]) -> None:
            out.write((json.dumps(reply) + "\n").encode())

        if kind == "probe":
            emit(probe(request))
        elif kind == "receive":
            emit(receive(request, stdin))
        elif kind == "bench":
            emit(bench(request, emit))
        elif kind == "serve":
            serve(request, stdin, out)
        else:
            raise WorkerError(f"unknown request {kind!r}")
    except (WorkerError, SegformerEdgeError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except ModuleNotFoundError as exc:
        root = (exc.name or "?").split(".")[0]
        sys.stderr.write(
            f"error: needs {root}, which is not installed on the board; pip install 'segformer-edge[{_extra_for(root)}]' there\n"
        )
        return 2
    except OSError as exc:
        if exc.errno in _SPACE_ERRORS:
            sys.stderr.write(f"error: {_space_error(exc, 'a file', cache_root())}\n")
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
