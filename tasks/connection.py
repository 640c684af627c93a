"""One node's SSH connection: opened with the cluster's timeouts and key file, host keys checked
against `cluster.ssh.known_hosts` (an unknown key is refused, never added); and, when talking
to a node fails, what went wrong in words and what to do next. `tasks.remote` pools the
connections and turns the explanations into `Failure`s.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import selectors
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import Cluster, Node
from tasks.failures import Kind, Result, _host_pattern

if TYPE_CHECKING:
    import paramiko
    from fabric import Config, Connection


def _ssh() -> Any:
    """paramiko, imported on first use: task creation (`doit list`) never pays for it."""
    import paramiko

    return paramiko


# Seconds a remote command may run when its caller names no other deadline (`Remote.run`,
# `Op.timeout`): every command haswarm runs ends in seconds on a healthy node; the few long ones
# (a stack deploy, Gluster's volume changes, removing images) pass a longer deadline.
COMMAND_TIMEOUT = 60.0
# SSH keepalive: after KEEPALIVE_INTERVAL s without traffic the client sends a keepalive
# packet, and the kernel drops a connection whose sent data stays unacknowledged for DEAD_AFTER
# s (TCP_USER_TIMEOUT): a node that vanished (power cut, cable, cut link) breaks its connection
# within KEEPALIVE_INTERVAL + DEAD_AFTER s even during a long command (an image load may take
# 900 s). Not shorter: a busy engine that reads an image stream slowly keeps the TCP window shut
# and Linux counts that time too. A frozen node whose kernel still acknowledges is stopped by
# the command's deadline instead.
KEEPALIVE_INTERVAL = 5
DEAD_AFTER = 60


# The connections kept for the whole process by `Remote(c, shared=True)` (tasks.remote): one
# `doit setup` runs ~20 steps, each with its own Remote; without this each would open (key
# exchange, authentication) every node's connection again. Keyed by `shared_key`; a connection
# found broken is opened again. Closed when the process ends.
_SHARED_CONNS: dict[tuple[str, ...], Connection] = {}
_SHARED_LOCKS: dict[tuple[str, ...], threading.Lock] = {}
_SHARED_GUARD = threading.Lock()


def shared_key(cluster: Cluster, n: Node) -> tuple[str, ...]:
    """What identifies `n`'s shared connection: its name and how it is reached (another
    cluster file may give the same name to another machine)."""
    ssh = cluster.ssh_for(n)
    return (n.name, n.address, str(ssh.port), ssh.user, str(ssh.key),
            str(cluster.ssh.known_hosts), str(cluster.ssh.connect_timeout))


def close_all(conns: list[Connection]) -> None:
    """Close each connection; one already dead may raise anything on close: ignored."""
    for conn in conns:
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass


def close_shared() -> None:
    """Close the connections kept for the process (at its exit; tests call it)."""
    with _SHARED_GUARD:
        conns = list(_SHARED_CONNS.values())
        _SHARED_CONNS.clear()
    close_all(conns)


atexit.register(close_shared)


class UnknownHostKey(Exception):
    """The node offered a host key that known_hosts does not list."""

    def __init__(self, hostname: str, key: paramiko.PKey):
        self.hostname = hostname
        self.key = key
        super().__init__(f"host key for {hostname} not in known_hosts")


class _RejectUnknown:
    """paramiko host-key policy: a key known_hosts does not list is refused."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        raise UnknownHostKey(hostname, key)


class KeyFileProblem(Exception):
    """The private key named in the cluster file cannot be used."""


# Fabric's Config is not thread-safe: a Connection built while another thread's Connection
# merges the shared config can find keys missing ("No attribute or config key found for
# 'gateway'", seen when a watch's threads reconnect at once). Each connection gets its own
# copy, made under this lock.
_CONFIG_LOCK = threading.Lock()


def load_key(path: Path) -> paramiko.PKey:
    """The private key in `path`; `KeyFileProblem` saying why if it cannot be used."""
    try:
        return _ssh().PKey.from_path(path)
    except FileNotFoundError:
        raise KeyFileProblem(f"the key file {path} does not exist") from None
    except PermissionError:
        raise KeyFileProblem(f"the key file {path} cannot be read (permissions)") from None
    except _ssh().PasswordRequiredException:
        raise KeyFileProblem(f"the key file {path} is protected by a passphrase") from None
    except (_ssh().SSHException, ValueError, OSError) as e:
        raise KeyFileProblem(f"the key file {path} is not a usable private key ({e})") from None


def open_connection(cluster: Cluster, n: Node, config: Config,
                    pkey: paramiko.PKey | None) -> Connection:
    """An open Fabric connection to `n` (`pkey`: the node's key, None for default keys/agent);
    the cluster's `connect_timeout` bounds TCP connect, banner, authentication and channels."""
    ssh = cluster.ssh_for(n)
    timeout = cluster.ssh.connect_timeout
    kwargs: dict[str, object] = {
        "timeout": timeout, "banner_timeout": timeout, "auth_timeout": timeout,
        "channel_timeout": timeout,
    }
    if pkey is not None:
        kwargs.update(pkey=pkey, look_for_keys=False, allow_agent=False)
    from fabric import Connection

    with _CONFIG_LOCK:
        conn = Connection(n.address, user=ssh.user, port=ssh.port, config=config.clone(),
                          connect_kwargs=kwargs)
    # Fabric installs AutoAddPolicy; trust only what known_hosts lists.
    conn.client.set_missing_host_key_policy(_RejectUnknown())
    known = cluster.ssh.known_hosts
    if known.is_file():
        conn.client.load_system_host_keys(str(known))
    try:
        conn.open()
    except BaseException:
        conn.close()
        raise
    if conn.transport is not None:  # None only where a test stubs open()
        keep_alive(conn.transport)
    return conn


def keep_alive(transport: paramiko.Transport, interval: float = KEEPALIVE_INTERVAL,
               dead_after: float = DEAD_AFTER) -> None:
    """SSH keepalive packets every `interval` s of silence on `transport`, and its TCP socket
    given up when data stays unacknowledged `dead_after` s (Linux TCP_USER_TIMEOUT; paramiko's
    keepalive expects no answer, so the kernel is what notices a vanished peer)."""
    transport.set_keepalive(interval)
    sock = transport.sock
    if hasattr(socket, "TCP_USER_TIMEOUT") and isinstance(sock, socket.socket) \
            and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(dead_after * 1000))


def explain(cluster: Cluster, n: Node, e: BaseException) -> tuple[str, str, str]:
    """(kind, detail, hint) for a connection-level (or unexpected) exception on node `n`."""
    ssh = cluster.ssh_for(n)
    known = cluster.ssh.known_hosts
    timeout = cluster.ssh.connect_timeout
    where = f"{n.address} port {ssh.port}"
    check_node = (f"check that {n.name} is powered on and on the network (ping {n.address}) "
                  f"and that its address in the cluster file is right")
    pattern = _host_pattern(n.address, ssh.port)
    port_opt = f"-p {ssh.port} " if ssh.port != 22 else ""

    if isinstance(e, UnknownHostKey):
        return (
            Kind.HOST_KEY,
            f"{where} offered a {e.key.get_name()} host key {e.key.fingerprint} that "
            f"{known} does not list" + ("" if known.is_file() else " (the file does not "
                                        "exist yet)"),
            f"haswarm never trusts a new host key by itself. On {n.name}'s console run "
            f"`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`; if it prints the same "
            f"fingerprint, trust it with `ssh-keyscan {port_opt}-t ed25519 {n.address} >> "
            f"{known}` and run the task again",
        )
    if isinstance(e, _ssh().BadHostKeyException):
        return (
            Kind.HOST_KEY,
            f"{where} offered the host key {e.key.fingerprint}, but {known} lists "
            f"{e.expected_key.fingerprint} for it: the key CHANGED",
            f"if {n.name} was re-installed (new SD card), remove the old key with "
            f"`ssh-keygen -f {known} -R '{pattern}'`, check the new one on the Pi's console "
            f"(`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`) and add it with "
            f"`ssh-keyscan {port_opt}-t ed25519 {n.address} >> {known}`. If it was not "
            "re-installed, something else answers at that address: do not go on",
        )
    if isinstance(e, KeyFileProblem):
        return (Kind.AUTH, str(e),
                "set ssh.key in the cluster file to an unencrypted private key whose "
                "public half is in the Pi's authorized_keys (create one with "
                f"`ssh-keygen -t ed25519 -N '' -f {ssh.key or 'KEYFILE'}`)")
    if isinstance(e, _ssh().AuthenticationException):
        key = f"the key {ssh.key}" if ssh.key else "your default SSH keys/agent"
        copy = f"-i {ssh.key}.pub " if ssh.key else ""
        return (Kind.AUTH, f"{where} refused {key} for user {ssh.user!r}",
                f"install the public key on the Pi (`ssh-copy-id {copy}{port_opt}"
                f"{ssh.user}@{n.address}`), or set ssh.user / ssh.key for this node in "
                "the cluster file")
    if isinstance(e, _ssh().ssh_exception.NoValidConnectionsError):
        codes = {getattr(x, "errno", None) for x in e.errors.values()}
        if codes <= {errno.ECONNREFUSED}:
            return (Kind.UNREACHABLE, f"{where}: connection refused",
                    f"{n.address} is up but nothing listens on port {ssh.port}: is the "
                    "SSH server running on the Pi (`systemctl status ssh`), and is "
                    "ssh.port right?")
        return (Kind.UNREACHABLE, f"{where}: host unreachable", check_node)
    if isinstance(e, socket.gaierror):
        return (Kind.UNREACHABLE, f"cannot resolve the host name {n.address!r} ({e})",
                f"use the Pi's IP address in the cluster file, or {check_node}")
    if isinstance(e, TimeoutError):  # socket.timeout is TimeoutError
        return (Kind.UNREACHABLE, f"no answer from {where} within {timeout:g} s",
                check_node)
    if isinstance(e, _ssh().SSHException):
        msg = str(e)
        if "banner" in msg:
            return (Kind.UNREACHABLE,
                    f"{where} accepted the connection but sent no SSH greeting within "
                    f"{timeout:g} s", f"is it an SSH server and not overloaded? "
                    f"{check_node}")
        if "channel" in msg.lower() or "not active" in msg:
            return (Kind.UNREACHABLE, f"the SSH connection to {where} broke ({msg})",
                    f"{check_node}; then run the task again")
        return (Kind.ERROR, f"SSH error talking to {where}: {msg}", check_node)
    if isinstance(e, OSError) and e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH,
                                               errno.ECONNRESET, errno.EPIPE):
        return (Kind.UNREACHABLE, f"{where}: {e.strerror}", check_node)
    if isinstance(e, EOFError):
        return (Kind.UNREACHABLE, f"{where} closed the connection", check_node)
    return (Kind.ERROR, f"{type(e).__name__}: {e}",
            "unexpected: run the task again with `doit -v 2`; if it persists, report "
            "it with this message")


# ---------------------------------------------------------------------------------------------
# One command on one channel (tasks.remote runs them; tasks.remote_stream reuses the deadline)


class _CommandTimeout(Exception):
    pass


class _ChannelRefused(Exception):
    """Opening a channel for a command failed: the command did not start (`error` says why)."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _collect(conn: Connection, chan: paramiko.Channel, command: str,
             stdin: str | None) -> Result:
    """Start `command` on the open channel `chan`, send `stdin` (then EOF), collect stdout and
    stderr until it exits (or the channel is closed: see `_deadline`)."""
    chan.exec_command(command)
    if stdin:
        threading.Thread(target=_feed, args=(chan, stdin.encode()), daemon=True,
                         name="remote-stdin").start()
    else:
        chan.shutdown_write()
    out, err = bytearray(), bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(chan, selectors.EVENT_READ)  # readable: stdout, stderr or EOF
        while True:
            while chan.recv_ready():
                out += chan.recv(65536)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
            if chan.eof_received or chan.closed:
                if not (chan.recv_ready() or chan.recv_stderr_ready()):
                    break
                continue
            sel.select(timeout=1.0)
    # The exit status follows EOF (a command may also close its output and go on).
    while not chan.status_event.wait(1.0):
        if not conn.transport.is_active():
            break
    if not chan.exit_status_ready() and not conn.transport.is_active():
        raise EOFError("the connection closed before the command ended")
    return Result(out.decode(errors="replace"), err.decode(errors="replace"),
                  chan.recv_exit_status())


@contextlib.contextmanager
def _deadline(chan: paramiko.Channel, timeout: float) -> Iterator[threading.Event]:
    """A watchdog that closes `chan` after `timeout` s (a command's deadline) unless the block
    ends first; yields the event it sets when it did. Closing the channel also ends paramiko's
    own waits, which have no limit (`exec_command` waits for the node's answer forever)."""
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        chan.close()

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        yield expired
    finally:
        timer.cancel()


def _feed(chan: paramiko.Channel, data: bytes) -> None:
    """Send `data` to a command's stdin, then EOF; a command that exits without reading all
    of it is no error."""
    try:
        chan.sendall(data)
        chan.shutdown_write()
    except (OSError, EOFError, _ssh().SSHException):
        pass
