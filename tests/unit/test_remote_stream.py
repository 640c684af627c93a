"""tasks.remote_stream against an SSH server in this process that runs each command here, in a
shell, with its stdin, stdout and stderr wired to the channel: megabytes both ways, exit codes,
deadlines, local errors."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
import threading
import time
import types

import paramiko
import pytest

from tasks.config import LAB_CLUSTER_FILE, Cluster, load_cluster
from tasks.failures import Kind, RemoteError
from tasks.remote import Remote
from tasks.remote_stream import stream
from tests.unit.fake_ssh import OpenServer


@pytest.fixture
def cluster() -> Cluster:
    return load_cluster(LAB_CLUSTER_FILE)


class _Shell(OpenServer):
    """Runs every exec request with /bin/sh here; the channel is its stdin/stdout/stderr."""

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        threading.Thread(target=self._run, args=(channel, command.decode()), daemon=True).start()
        return True

    @staticmethod
    def _run(channel: paramiko.Channel, command: str) -> None:
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def to_proc() -> None:
            try:
                while data := channel.recv(65536):
                    proc.stdin.write(data)
            except (OSError, EOFError):
                pass
            finally:
                try:
                    proc.stdin.close()
                except OSError:
                    pass

        def from_proc(pipe, send) -> None:  # noqa: ANN001
            while data := pipe.read1(65536):
                try:
                    send(data)
                except (OSError, EOFError):
                    return

        threads = [threading.Thread(target=to_proc, daemon=True),
                   threading.Thread(target=from_proc, args=(proc.stdout, channel.sendall)),
                   threading.Thread(target=from_proc, args=(proc.stderr, channel.sendall_stderr))]
        for t in threads:
            t.start()
        code = proc.wait()
        for t in threads[1:]:
            t.join()
        try:
            channel.send_exit_status(code)
            channel.shutdown_write()
            channel.close()
        except (OSError, EOFError):
            pass


@pytest.fixture
def remote(cluster: Cluster):
    listener = socket.create_server(("127.0.0.1", 0))
    client_sock = socket.create_connection(listener.getsockname())
    server_sock, _ = listener.accept()
    listener.close()
    server = paramiko.Transport(server_sock)
    server.add_server_key(paramiko.RSAKey.generate(1024))
    server.start_server(event=threading.Event(), server=_Shell())
    client = paramiko.Transport(client_sock)
    client.start_client(timeout=5)
    client.auth_none("root")
    r = Remote(cluster)
    conn = types.SimpleNamespace(transport=client, is_connected=True, close=lambda: None)
    r._conns = {n.name: conn for n in cluster.nodes}  # type: ignore[assignment]
    yield r
    client.close()
    server.close()


def test_stdout_streams_into_a_file(remote: Remote, tmp_path) -> None:
    data = os.urandom(3_000_000)
    src = tmp_path / "payload"
    src.write_bytes(data)
    sink = io.BytesIO()
    res = stream(remote, "pi1", "backup: x", f"cat {src}; echo done >&2", sink=sink, timeout=30)
    assert sink.getvalue() == data
    assert (res.exit_code, res.stdout, res.stderr) == (0, "", "done\n")


def test_a_file_streams_into_stdin(remote: Remote, tmp_path) -> None:
    data = os.urandom(3_000_000)
    out = tmp_path / "received"
    res = stream(remote, "pi2", "restore: x", f"cat > {out} && sha256sum {out}",
                 source=io.BytesIO(data), timeout=30)
    assert out.read_bytes() == data
    assert res.stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_an_exit_code_not_allowed_names_node_step_and_stderr(remote: Remote) -> None:
    with pytest.raises(RemoteError) as ei:
        stream(remote, "pi3", "backup: volume", "echo 'tar: fatal' >&2; exit 2",
               sink=io.BytesIO(), timeout=10, ok=(0, 1), hint="is it mounted?")
    (f,) = ei.value.failures
    assert (f.node, f.step, f.kind, f.exit_code) == ("pi3", "backup: volume", Kind.COMMAND, 2)
    assert "tar: fatal" in f.stderr and f.hint == "is it mounted?"
    res = stream(remote, "pi3", "backup: volume", "echo changed >&2; exit 1", sink=io.BytesIO(),
                 timeout=10, ok=(0, 1))
    assert res.exit_code == 1


def test_the_deadline_ends_a_stream(remote: Remote) -> None:
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as ei:
        stream(remote, "pi1", "restore: database", "sleep 5", source=io.BytesIO(b"x"),
               timeout=0.5)
    assert time.monotonic() - t0 < 2
    assert ei.value.failures[0].kind == Kind.TIMEOUT


class _Full(io.RawIOBase):
    def write(self, data) -> int:  # noqa: ANN001
        raise OSError(28, "No space left on device")


def test_a_local_write_error_is_raised_as_itself(remote: Remote) -> None:
    with pytest.raises(OSError, match="No space left") as ei:
        stream(remote, "pi1", "backup: database", "head -c 1000000 /dev/zero", sink=_Full(),
               timeout=10)
    assert not isinstance(ei.value, RemoteError)


class _Broken(io.RawIOBase):
    def __init__(self) -> None:
        self.calls = 0

    def read(self, size: int = -1) -> bytes:
        self.calls += 1
        if self.calls > 3:
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")
        return b"x" * 1000


def test_a_local_read_error_fails_the_stream(remote: Remote, tmp_path) -> None:
    out = tmp_path / "got"
    with pytest.raises(OSError, match="Compressed file ended"):
        stream(remote, "pi1", "restore: volume", f"cat > {out}", source=_Broken(), timeout=10)
