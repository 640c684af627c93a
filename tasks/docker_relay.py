"""Docker over the SSH transport: the Docker SDK talks to a node's engine through a private unix
socket whose every connection becomes `docker system dial-stdio` on the node."""

from __future__ import annotations

import selectors
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import docker
    from fabric import Connection

def _ssh():  # noqa: ANN202 - paramiko, imported on first use (doit list never pays for it)
    import paramiko

    return paramiko


# Docker relay channels: a larger window than paramiko's 2 MiB keeps image uploads streaming.
WINDOW = 16 * 1024 * 1024
PACKET = 64 * 1024


# ---------------------------------------------------------------------------------------------
# Docker over the SSH transport


class _DockerRelay:
    """A private unix socket; each connection to it becomes `docker system dial-stdio` on the
    node, over a dedicated (host-key checked) SSH connection.

    The Docker SDK keeps one connection pool per URL (25 by default, and its `num_pools` is
    ignored for unix sockets), while sshd allows 10 sessions per connection: beyond
    `MAX_CHANNELS`, the least recently used relayed connection is closed; the SDK sees it as
    dropped and reconnects when it needs it again.
    """

    MAX_CHANNELS = 8

    def __init__(self, conn: Connection, command: str):
        self._conn = conn
        self._command = command
        self._dir = tempfile.mkdtemp(prefix="haswarm-docker-")  # 0700
        self.path = str(Path(self._dir) / "docker.sock")
        self.clients: list[docker.DockerClient] = []
        self._active: dict[socket.socket, float] = {}  # local end -> last activity
        self._lock = threading.Lock()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen(16)
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="docker-relay").start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                local, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                while len(self._active) >= self.MAX_CHANNELS:
                    oldest = min(self._active, key=self._active.__getitem__)
                    del self._active[oldest]
                    try:
                        oldest.shutdown(socket.SHUT_RDWR)  # its pump sees EOF and ends
                    except OSError:
                        pass
                self._active[local] = time.monotonic()
            threading.Thread(target=self._pump, args=(local,), daemon=True).start()

    def _touch(self, local: socket.socket) -> None:
        with self._lock:
            if local in self._active:
                self._active[local] = time.monotonic()

    def _pump(self, local: socket.socket) -> None:
        chan = None
        try:
            try:
                chan = self._conn.transport.open_session(window_size=WINDOW,
                                                         max_packet_size=PACKET)
                chan.exec_command(self._command)
            except Exception:  # noqa: BLE001 - the client sees a closed connection, reports it
                return
            with selectors.DefaultSelector() as sel:
                sel.register(local, selectors.EVENT_READ)
                sel.register(chan, selectors.EVENT_READ)
                while not self._closed:
                    for key, _ in sel.select(timeout=1):
                        if key.fileobj is local:
                            data = local.recv(65536)
                            if not data:  # the HTTP client closed: nothing more to relay
                                return
                            chan.sendall(data)
                        else:
                            data = chan.recv(65536)
                            if not data:
                                return
                            local.sendall(data)
                        self._touch(local)
        except (OSError, EOFError, _ssh().SSHException):
            return  # likewise
        finally:
            with self._lock:
                self._active.pop(local, None)
            for end in (chan, local):
                try:
                    if end is not None:
                        end.close()
                except (OSError, EOFError, _ssh().SSHException):
                    pass

    def close(self) -> None:
        self._closed = True
        for client in self.clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass
        self._server.close()
        shutil.rmtree(self._dir, ignore_errors=True)
        try:
            self._conn.close()
        except Exception:  # noqa: BLE001
            pass
