"""Streams between this computer and a node: a command's stdout written into a local file as it
arrives, or a local file fed to its stdin, never held whole in memory (`Remote.run` collects a
command's output as text; a database dump or a tar of Home Assistant's config is neither small
nor text). `doit backup` and `doit restore` (tasks/backup.py) move their data this way.

Same rules as `Remote.run`: /bin/sh as root (sudo -n when needed), a deadline after which the
channel is closed and a TIMEOUT `RemoteError` names node, step and command, connection problems
explained per node, secrets scrubbed from quoted stderr. A local file that cannot be written
(disk full) raises its own OSError, not a node's failure.
"""

from __future__ import annotations

import selectors
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from tasks.config import Node
from tasks.failures import Result

if TYPE_CHECKING:
    import paramiko

    from tasks.remote import Remote

CHUNK = 256 * 1024
STDERR_KEEP = 64 * 1024  # bytes of stderr kept (its end) for the error message


class Sink(Protocol):
    """Where a command's stdout goes (a file opened "wb", or anything with `write`)."""

    def write(self, data: bytes, /) -> int | None: ...


class Source(Protocol):
    """What is fed to a command's stdin (a file opened "rb", a tar member...)."""

    def read(self, size: int = ..., /) -> bytes: ...


class _LocalError(Exception):
    """A local read or write failed (wraps the OSError, raised as it is to the caller)."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


def stream(r: Remote, node: Node | str, step: str, cmd: str, *, timeout: float,
           sink: Sink | None = None, source: Source | None = None,
           ok: Iterable[int] = (0,), hint: str | None = None) -> Result:
    """Run `cmd` on `node`: its stdout written to `sink` as it arrives (else collected into
    the Result), `source` read to its end and fed to its stdin (else none). An exit code not in
    `ok` raises RemoteError (stderr's tail quoted); so does the deadline `timeout` (s)."""
    from tasks.remote import RemoteError, _CommandTimeout

    n = r._node(node)
    conn = r._connection(n, step, cmd)
    try:
        res = _pump(r, conn.transport, r._wrap(n, cmd, True), sink, source, timeout)
    except _LocalError as e:
        raise e.error from None
    except _CommandTimeout:
        raise RemoteError([r._timeout_failure(n, step, cmd, timeout, hint)]) from None
    except Exception as e:  # connection lost in the middle, channel refused...
        r._forget(n)
        raise RemoteError([r._from_exception(n, step, cmd, e)]) from e
    if res.exit_code not in set(ok):
        raise RemoteError([r._command_failure(n, step, cmd, res, r._secrets, hint)])
    return res


def _pump(r: Remote, transport: paramiko.Transport, command: str, sink: Sink | None,
          source: Source | None, timeout: float) -> Result:
    """Open a session channel, start `command`, feed `source`, drain stdout into `sink` (or a
    buffer) and stderr into a bounded buffer until the command exits; the deadline as in
    `Remote._exec` (a watchdog closes the channel)."""
    from tasks.remote import _CommandTimeout, _deadline, _ssh

    chan = transport.open_session(timeout=r.cluster.ssh.connect_timeout)
    fed: list[OSError] = []
    try:
        with _deadline(chan, timeout) as expired:
            try:
                chan.exec_command(command)
                if source is not None:
                    threading.Thread(target=_feed, args=(chan, source, fed), daemon=True,
                                     name="remote-stream-stdin").start()
                else:
                    chan.shutdown_write()
                out, err = _drain(chan, sink)
            except _ssh().SSHException:  # "Channel closed." when the watchdog closed it
                if expired.is_set():
                    raise _CommandTimeout() from None
                raise
            while not chan.status_event.wait(1.0):
                if not transport.is_active() or expired.is_set():
                    break
            if expired.is_set():
                raise _CommandTimeout()
            if not chan.exit_status_ready():
                raise EOFError("the connection closed before the command ended")
            if fed:
                raise _LocalError(fed[0])
            return Result(out.decode(errors="replace"), err.decode(errors="replace"),
                          chan.recv_exit_status())
    finally:
        chan.close()


def _drain(chan: paramiko.Channel, sink: Sink | None) -> tuple[bytes, bytes]:
    """stdout (into `sink`, or returned) and the end of stderr, until EOF or the channel closes."""
    out, err = bytearray(), bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(chan, selectors.EVENT_READ)  # readable: stdout, stderr or EOF
        while True:
            while chan.recv_ready():
                data = chan.recv(CHUNK)
                if sink is None:
                    out += data
                    continue
                try:
                    sink.write(data)
                except OSError as e:
                    chan.close()
                    raise _LocalError(e) from None
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(CHUNK)
                del err[:-STDERR_KEEP]
            if chan.eof_received or chan.closed:
                if not (chan.recv_ready() or chan.recv_stderr_ready()):
                    break
                continue
            sel.select(timeout=1.0)
    return bytes(out), bytes(err)


def _feed(chan: paramiko.Channel, source: Source, failed: list[OSError]) -> None:
    """Send `source` to the command's stdin, then EOF. A command that exits without reading all
    of it is no error here (its exit code tells). A local read error closes the channel at once
    (the command's input ends there, as with a connection cut) and `stream` raises it: the
    step fails even when the command took what it got for the whole."""
    from tasks.remote import _ssh

    while True:
        try:
            data = source.read(CHUNK)
        except Exception as e:  # noqa: BLE001 - OSError, EOFError, zlib.error, tarfile.ReadError
            failed.append(e if isinstance(e, OSError) else OSError(f"reading the input: {e}"))
            chan.close()
            return
        if not data:
            break
        try:
            chan.sendall(data)
        except (OSError, EOFError, _ssh().SSHException):
            return  # the command ended (or the deadline closed the channel)
    try:
        chan.shutdown_write()
    except (OSError, EOFError, _ssh().SSHException):
        pass
