"""``bench`` and ``verify`` on a Linux board over ssh: the host's side of ``--device ssh://[user@]host[:port]``.

Everything goes through the system's OpenSSH client, so the user's ``~/.ssh/config`` (keys, agents, jump hosts,
ports, ``ControlMaster``) applies as it does for any ``ssh`` they type. ``SEGFORMER_EDGE_SSH_COMMAND`` replaces the
``ssh`` program and its leading options (as ``GIT_SSH_COMMAND`` does for git). Added to every call:
``BatchMode=yes`` (never a password prompt; a key or an agent logs in) and ``ConnectTimeout``.

One ssh session per step, each running :mod:`.remote_worker` on the board: ``probe`` (facts, cache, runtimes),
``receive`` (one per artifact not yet in the board's cache; the copy is hash-checked there and renamed only when
whole), then ``bench`` (the local bench, run there) or ``serve`` (one session for every image of a verify).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import select
import shlex
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import numpy as np

from segformer_edge.errors import DeviceError

from .base import Artifact, read_manifest
from .remote_worker import MODULE, PROTOCOL, read_frame

__all__ = ["RemoteRunner", "SshDevice", "bench_over_ssh", "ssh_failure"]

logger = logging.getLogger(__name__)

SSH_COMMAND_ENV = "SEGFORMER_EDGE_SSH_COMMAND"
INSTALL = "pip install 'segformer-edge[runtime]'"


@dataclass(frozen=True)
class SshDevice:
    """A board reached with ``ssh``: ``ssh://[user@]host[:port]`` and the Python that runs the worker there."""

    url: str
    host: str
    user: str | None = None
    port: int | None = None
    python: str = "python3"
    connect_timeout: int = 10
    timeout: float = 1800.0  # seconds one step (a copy, a bench, a verify) may take

    @classmethod
    def parse(
        cls, url: str, *, python: str = "python3", timeout: float = 1800.0, connect_timeout: int = 10
    ) -> SshDevice:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme != "ssh" or not parts.hostname or port == -1 or parts.path not in ("", "/") or parts.query:
            raise DeviceError(
                f"{url}: not an ssh device; write ssh://[user@]host[:port] (a Host alias from ~/.ssh/config works)"
            )
        return cls(url, parts.hostname, parts.username, port, python, connect_timeout, timeout)

    def argv(self, remote: str) -> list[str]:
        """The ssh command line that runs ``remote`` (a shell command line) on the board."""
        base = shlex.split(os.environ.get(SSH_COMMAND_ENV, "ssh"))
        options = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}",
                   "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3"]  # fmt: skip
        if self.port is not None:
            options += ["-p", str(self.port)]
        destination = f"{self.user}@{self.host}" if self.user else self.host
        return [*base, *options, destination, remote]

    def worker_command(self) -> str:
        python = self.python
        if python.startswith("~/"):  # the board's home, expanded by its shell
            python = '"$HOME"/' + shlex.quote(python[2:])
        else:
            python = shlex.quote(python)
        return f"{python} -m {MODULE}"


def ssh_failure(device: SshDevice, returncode: int, stderr: str) -> DeviceError:
    """One line for a failed ssh session, from ssh's exit code and what it (or the worker) wrote on stderr."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    worker = [line for line in lines if line.startswith("error: ")]
    if worker:
        return DeviceError(f"{device.url}: {worker[-1].removeprefix('error: ')}")
    text = "\n".join(lines)
    last = lines[-1] if lines else f"exit code {returncode}"
    if re.search(r"No module named '?segformer_edge\.converters\.remote_worker", text):
        return DeviceError(
            f"{device.url}: the segformer-edge of {device.python} on the board has no remote worker (older than this one); "
            f"pip install -U 'segformer-edge[runtime]' there"
        )
    if re.search(r"No module named '?segformer_edge\b", text):
        return DeviceError(
            f"{device.url}: segformer-edge is not installed for {device.python} on the board; {INSTALL} there"
        )
    if returncode == 127 or "command not found" in text or "No such file or directory" in last:
        return DeviceError(f"{device.url}: no {device.python} on the board; install Python 3.10+ and {INSTALL} there, "
                           "or name the board's Python with --device-python")  # fmt: skip
    if returncode == 255:
        if "timed out" in text.lower():
            return DeviceError(
                f"{device.url}: timed out connecting (ConnectTimeout {device.connect_timeout} s): is the board up and reachable?"
            )
        if "Connection refused" in text:
            return DeviceError(
                f"{device.url}: connection refused: no ssh server answers on {device.host}:{device.port or 22}"
            )
        if "Could not resolve hostname" in text:
            return DeviceError(f"{device.url}: unknown host {device.host} (not in DNS, /etc/hosts or ~/.ssh/config)")
        if "Permission denied" in text:
            return DeviceError(f"{device.url}: ssh could not log in without a prompt (BatchMode): add your key to the board's "
                               "authorized_keys or load it into ssh-agent")  # fmt: skip
        if "Host key verification failed" in text:
            return DeviceError(
                f"{device.url}: the board's host key is unknown or changed; connect once with ssh to check and accept it"
            )
        if any(
            s in text
            for s in (
                "closed by remote host",
                "Connection reset",
                "Broken pipe",
                "Connection closed",
                "Timeout, server",
            )
        ):
            return DeviceError(f"{device.url}: the connection dropped ({last}); nothing half-copied is kept: run again")
        return DeviceError(f"{device.url}: ssh failed: {last}")
    return DeviceError(f"{device.url}: the worker failed (exit code {returncode}): {last}")


class _Session:
    """One ssh process running the worker, with stderr collected aside and a deadline that kills it."""

    def __init__(self, device: SshDevice, request: dict[str, Any]) -> None:
        self.device = device
        argv = device.argv(device.worker_command())
        logger.debug("ssh: %s", shlex.join(argv))
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError as exc:
            raise DeviceError(f"{device.url}: no ssh client here ({argv[0]}); install OpenSSH's client") from exc
        self._stderr: list[bytes] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        self.timed_out = False
        self.write((json.dumps({"protocol": PROTOCOL, **request}) + "\n").encode())

    def _drain(self) -> None:
        if self.proc.stderr is None:  # started without a stderr pipe: nothing to collect
            return
        for chunk in iter(lambda: self.proc.stderr.read(4096), b""):  # type: ignore[union-attr]
            self._stderr.append(chunk)

    def write(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except (BrokenPipeError, ConnectionResetError):
            pass  # the failure is read from the exit code and stderr

    def close_input(self) -> None:
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _ready(self, deadline: float) -> int:
        """stdout's descriptor once it has something to read; past ``deadline``, the session is killed."""
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            self.timed_out = True
            self.kill()
            raise self.failure()
        return fd

    def read(self, n: int, deadline: float) -> bytes:
        """Up to ``n`` bytes of stdout (fewer only at its end), waiting until ``deadline`` at most."""
        chunks: list[bytes] = []
        got = 0
        while got < n:
            chunk = os.read(self._ready(deadline), n - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def lines(self, deadline: float) -> Iterator[dict[str, Any]]:
        """The JSON lines on stdout as they arrive, until it ends."""
        buffer = b""
        while True:
            chunk = os.read(self._ready(deadline), 1 << 16)
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for line in complete:
                if line.strip():
                    yield json.loads(line)
            if not chunk:
                if buffer.strip():
                    yield json.loads(buffer)
                return

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def finish(self, deadline: float) -> None:
        """Wait for the session to end; raise its failure, if any."""
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.timed_out = True
            self.kill()
        self._reader.join(timeout=5)
        if self.timed_out or self.proc.returncode != 0:
            raise self.failure()

    def failure(self) -> DeviceError:
        self.proc.poll()
        self._reader.join(timeout=2)
        if self.timed_out:
            return DeviceError(f"{self.device.url}: no answer from the board within {self.device.timeout:.0f} s "
                               "(--device-timeout); the session was closed, and the worker there stops with it")  # fmt: skip
        text = b"".join(self._stderr).decode(errors="replace")
        logger.debug("ssh stderr: %s", text)
        return ssh_failure(self.device, self.proc.returncode if self.proc.returncode is not None else -1, text)


def _call(device: SshDevice, request: dict[str, Any], payload: Callable[[IO[bytes]], None] | None = None,
          on_line: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """One request in one ssh session: the worker's last JSON line (earlier lines go to ``on_line``)."""
    deadline = time.monotonic() + device.timeout
    session = _Session(device, request)
    if payload is not None:
        writer = threading.Thread(target=lambda: _feed(session, payload), daemon=True)
        writer.start()
    else:
        session.close_input()
    last: dict[str, Any] | None = None
    try:
        for reply in session.lines(deadline):
            if last is not None and on_line is not None:
                on_line(last)
            last = reply
    except json.JSONDecodeError as exc:
        session.kill()
        raise DeviceError(f"{device.url}: the board's worker wrote something that is not its protocol ({exc})") from exc
    session.finish(deadline)
    if last is None:
        raise session.failure()
    return last


def _feed(session: _Session, payload: Callable[[IO[bytes]], None]) -> None:
    try:
        payload(session.proc.stdin)  # type: ignore[arg-type]
    except (BrokenPipeError, ConnectionResetError, ValueError):
        pass  # the session's exit code says why
    finally:
        session.close_input()


def _tar_of(path: Path) -> Callable[[IO[bytes]], None]:
    def write(stream: IO[bytes]) -> None:
        with tarfile.open(fileobj=stream, mode="w|") as tar:
            tar.add(path, arcname=path.name)

    return write


def _wire(artifact: Artifact) -> dict[str, Any]:
    return {"sha256": artifact.manifest["sha256"], "file": artifact.file.name, "manifest": artifact.manifest}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


@dataclass
class Board:
    """What a probe found on the board."""

    device: SshDevice
    facts: dict[str, Any]
    cache: str
    torch: str | None  # torch's version where it was asked for and imports on the board
    copied: list[str] = field(default_factory=list)  # the model files this run copied (the rest were in the cache)


def prepare(device: SshDevice, artifacts: list[Artifact], extra_files: list[tuple[str, Path]] | None = None, *,
            torch: bool = False) -> Board:  # fmt: skip
    """Probe the board, check its runtimes, and copy what its cache lacks (``extra_files``: (sha256, path) pairs;
    ``torch``: also ask whether torch imports there)."""
    from . import get_target

    modules: dict[str, str] = {}
    for artifact in artifacts:
        target = get_target(artifact.target)
        for module in target.runtime_modules:
            modules.setdefault(module.split(".")[0], f"{artifact.target} ({target.extra})")
    entries = [(_wire(a)["sha256"], a.file) for a in artifacts] + list(extra_files or [])
    reply = _call(device, {"kind": "probe", "modules": sorted(modules), "torch": torch,
                           "artifacts": [{"sha256": sha, "file": path.name} for sha, path in entries]})  # fmt: skip
    if reply.get("missing"):
        module = reply["missing"][0]
        needed_by, extra = modules[module].rsplit(" (", 1)
        alternative = " (or tflite-runtime)" if module == "ai_edge_litert" else ""
        raise DeviceError(f"{device.url}: {needed_by} artifacts need {module}{alternative}, which is not installed for "
                          f"{device.python} on the board; pip install 'segformer-edge[{extra.rstrip(')')}]' there")  # fmt: skip
    board = Board(device, reply["facts"], reply["cache"], reply["torch"])
    have = set(reply["have"])
    for sha, path in entries:
        if sha in have:
            continue
        have.add(sha)
        logger.info("%s: copying %s (%.1f MB)", device.url, path.name, _size(path) / 1e6)
        _call(
            device, {"kind": "receive", "sha256": sha, "file": path.name, "bytes": _size(path)}, payload=_tar_of(path)
        )
        board.copied.append(path.name)
    return board


def bench_over_ssh(
    device: SshDevice,
    paths: list[str | Path],
    threads: list[int],
    *,
    warmup: int = 5,
    runs: int = 30,
    rounds: int = 1,
    compare_torch: bool = False,
    checkpoint: str | Path | None = None,
    size: tuple[int, int] | None = None,
    compute_units: str = "all",
    profile: bool = False,
    floor: bool = False,
    on_step: Callable[[], None] | None = None,
) -> tuple[list[dict[str, Any]], Board]:
    """:func:`.bench.bench_paired` run on the board: the same records, each with the board's facts and ``device``."""
    from .base import file_sha256

    artifacts = [read_manifest(p) for p in paths]
    extra = []
    ckpt_wire = None
    if compare_torch and checkpoint is not None:
        ckpt_path = Path(checkpoint)
        ckpt_sha = file_sha256(ckpt_path)
        extra.append((ckpt_sha, ckpt_path))
        ckpt_wire = {"sha256": ckpt_sha, "file": ckpt_path.name}
    board = prepare(device, artifacts, extra, torch=compare_torch)
    if compare_torch and board.torch is None:
        raise DeviceError(f"{device.url}: --compare-torch needs torch on the board, which {device.python} there does not have; "
                          "pip install 'segformer-edge[train]' there, or bench without --compare-torch")  # fmt: skip
    request = {"kind": "bench", "artifacts": [_wire(a) for a in artifacts], "threads": threads, "warmup": warmup, "runs": runs,
               "rounds": rounds, "compare_torch": compare_torch, "checkpoint": ckpt_wire, "size": list(size) if size else None,
               "compute_units": compute_units, "profile": profile, "floor": floor}  # fmt: skip
    reply = _call(device, request, on_line=lambda _: on_step() if on_step is not None else None)
    local = {a.manifest["sha256"]: str(a.folder) for a in artifacts}
    records = reply["records"]
    for record in records:
        sha = Path(str(record.get("artifact", ""))).name
        if sha in local:
            record["board_path"] = record["artifact"]
            record["artifact"] = local[sha]
        record["device"] = device.url
        record["board"] = board.facts
    return records, board


class RemoteRunner:
    """A :class:`.base.Runner` whose artifact runs on the board: every call sends one input batch down one ssh session
    (opened by :meth:`open`, kept for all calls) and brings the output back. Use it as a context manager."""

    def __init__(self, device: SshDevice, path: str | Path, threads: int | None = None) -> None:
        self.device = device
        self.artifact = read_manifest(path)
        self.threads = threads
        self.executor = ""
        self.facts: dict[str, Any] = {}
        self.board: Board | None = None
        self._session: _Session | None = None

    def open(self) -> RemoteRunner:
        self.board = prepare(self.device, [self.artifact])
        self._session = _Session(
            self.device, {"kind": "serve", "artifact": _wire(self.artifact), "threads": self.threads}
        )
        header = json.loads(self._frame())
        self.executor = f"{header['executor']} on {self.device.url}"
        self.facts = header["facts"]
        return self

    def _frame(self) -> bytes:
        if self._session is None:
            raise DeviceError(f"{self.device.url}: the board's runner is not started; use it inside `with RemoteRunner(...)`")
        deadline = time.monotonic() + self.device.timeout
        reader = _DeadlineReader(self._session, deadline)
        try:
            payload = read_frame(reader)  # type: ignore[arg-type]
        except Exception as exc:  # a frame cut short: the session's exit code and stderr say why
            self._session.kill()
            raise self._session.failure() from exc
        if payload is None:
            self._session.finish(deadline)
            raise self._session.failure()
        return payload

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._session is None:
            raise RuntimeError("RemoteRunner: call open() (or use it in a with block) first")
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(x), allow_pickle=False)
        payload = buffer.getvalue()
        self._session.write(len(payload).to_bytes(8, "big") + payload)
        return np.load(io.BytesIO(self._frame()), allow_pickle=False)

    def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            session.close_input()
            session.finish(time.monotonic() + 30)

    def __enter__(self) -> RemoteRunner:  # noqa: PYI034 - Self needs Python 3.11; the package supports 3.10
        return self.open()

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        elif self._session is not None:
            self._session.kill()
            self._session = None


class _DeadlineReader:
    """``read(n)`` over a session's stdout that waits until the deadline at most."""

    def __init__(self, session: _Session, deadline: float) -> None:
        self.session = session
        self.deadline = deadline

    def read(self, n: int) -> bytes:
        return self.session.read(n, self.deadline)
