"""A loopback OpenSSH server for the ``--device ssh://`` tests and benchmarks/arm_parity.py.

:func:`loopback_sshd` starts Debian's sshd as the current user's server on 127.0.0.1, with its own host key, port and
authorized key in ``root``, and writes an ssh_config that reaches it as host ``board``; it points
``SEGFORMER_EDGE_SSH_COMMAND`` at that config while it runs, then stops the server.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SSHD = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if Path(p).exists()), None)
SSH_COMMAND_ENV = "SEGFORMER_EDGE_SSH_COMMAND"  # what segformer_edge.converters.remote reads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wrapper(path: Path, body: str) -> str:
    """An executable shell script at ``path`` (a board's "python"); its path."""
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


@contextmanager
def loopback_sshd(root: Path) -> Iterator[int]:
    """Run sshd on a free port of 127.0.0.1 (yielded) until the block ends; ``ssh board`` reaches it."""
    if SSHD is None or shutil.which("ssh") is None:
        raise RuntimeError("needs OpenSSH's sshd and ssh (apt-get install openssh-server openssh-client)")
    user = pwd.getpwuid(os.getuid()).pw_name
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    for key in ("host_key", "client_key"):
        for old in (root / key, root / f"{key}.pub"):  # a folder used before: ssh-keygen will not overwrite
            old.unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True)
    shutil.copy(root / "client_key.pub", root / "authorized_keys")
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\nPidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\nAllowUsers {user}\n"
        "LogLevel ERROR\n"
    )  # fmt: skip
    kind, key = (root / "host_key.pub").read_text().split()[:2]
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {kind} {key}\n")
    (root / "ssh_config").write_text(
        f"Host board\n  HostName 127.0.0.1\n  User {user}\n  IdentityFile {root / 'client_key'}\n  IdentitiesOnly yes\n"
        f"Host *\n  UserKnownHostsFile {root / 'known_hosts'}\n  StrictHostKeyChecking yes\n  LogLevel ERROR\n"
    )  # fmt: skip
    if os.geteuid() == 0:  # root's sshd wants its privilege-separation folder
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    with open(root / "sshd.log", "w") as log:
        server = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stdout=log, stderr=subprocess.STDOUT
        )
        old = os.environ.get(SSH_COMMAND_ENV)
        os.environ[SSH_COMMAND_ENV] = f"ssh -F {root / 'ssh_config'}"
        try:
            for _ in range(100):
                probe = subprocess.run(["ssh", "-F", str(root / "ssh_config"), "-o", "BatchMode=yes", "-p", str(port), "board", "true"],
                                       check=False, capture_output=True, text=True)  # fmt: skip
                if probe.returncode == 0:
                    break
                if server.poll() is not None:
                    raise RuntimeError(f"sshd exited: {(root / 'sshd.log').read_text()}")
                time.sleep(0.1)
            else:
                raise RuntimeError(f"sshd did not accept the key: {probe.stderr} {(root / 'sshd.log').read_text()}")
            yield port
        finally:
            server.terminate()
            server.wait(timeout=10)
            if old is None:
                os.environ.pop(SSH_COMMAND_ENV, None)
            else:
                os.environ[SSH_COMMAND_ENV] = old
