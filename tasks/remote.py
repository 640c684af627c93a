"""The only place that speaks SSH: node connections, parallel fan-out, errors per node.

    with Remote(cluster) as r:
        r.run_all("docker: version", "docker version --format '{{.Server.Version}}'")
        changed = r.put("pi1", "mosquitto: config", text, "/etc/haswarm/mosquitto.conf")

- One Fabric `Connection` per node, opened lazily on first use (never at import or task-load
  time) with the cluster's `connect_timeout` (TCP connect, SSH banner, authentication and channel
  opening each), the node's key file, and **host keys checked** against `cluster.ssh.known_hosts`
  (Fabric's AutoAddPolicy is replaced: an unknown or changed key is an error with instructions).
- Every command runs under `/bin/sh -c`, as root: through `sudo -n` when the login user is not root.
- Every command has a deadline: `timeout` seconds (default `COMMAND_TIMEOUT`, 60 s; the long
  steps pass their own). A node that freezes (stopped processes, a hung FUSE mount, a wedged
  dockerd) fails the step within the deadline plus `ssh.connect_timeout` (opening the channel)
  and 1 s, with a TIMEOUT failure naming the node, the step and the command. Connections send
  SSH keepalives (`tasks.connection.keep_alive`): a node that vanished breaks its connection
  within KEEPALIVE_INTERVAL + DEAD_AFTER s (65 s), also during a long command.
- Failures are `RemoteError`s holding one `Failure` per node (node, address, step, command, exit
  code, stderr tail, and a hint of what to do next); `str()` is the message for the user.
  `on_all`/`run_all` run every node in parallel, let each finish, and raise one `RemoteError`
  carrying every failed node.
- Secrets: `secret=True` keeps the command text out of errors; pass secret values on `stdin`
  (never in the command line, where `ps` on the node shows them) and they are scrubbed from any
  stderr quoted in an error. `Remote.redact()` registers further values to scrub.
- Reads: a step reads its facts inside `with r.reading():`; the shared Remote of a doit run keeps
  them until anything else runs (tasks.fact_cache), and `prefetch` reads them all up front.

Opening one connection and explaining why one failed: `tasks.connection`; the error model:
`tasks.failures`; Docker over SSH: `tasks.docker_relay`."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from tasks.config import Cluster, Node
from tasks.connection import (  # noqa: F401  (the exceptions are re-exported for callers)
    _SHARED_CONNS,
    _SHARED_GUARD,
    _SHARED_LOCKS,
    COMMAND_TIMEOUT,
    KeyFileProblem,
    UnknownHostKey,
    _ChannelRefused,
    _collect,
    _CommandTimeout,
    _deadline,
    _RejectUnknown,
    close_all,
    close_shared,
    explain,
    load_key,
    open_connection,
    shared_key,
)
from tasks.docker_relay import _DockerRelay
from tasks.fact_cache import READ_AHEAD_TIMEOUT, carry, in_reading, parse_sections, probe_script
from tasks.fact_cache import SHARED as _FACTS
from tasks.fact_cache import reading as _reading
from tasks.failures import (  # noqa: F401  (re-exported: callers import them from here)
    HIDDEN,
    STDERR_LINE_WIDTH,
    STDERR_TAIL_LINES,
    Failure,
    Kind,
    RemoteError,
    Result,
    _host_pattern,
    _sudo_problem,
    key_values,
    progress,
    redact,
    tail,
)

if TYPE_CHECKING:
    import docker
    import paramiko
    from fabric import Connection

T = TypeVar("T")


def _ssh() -> Any:
    """paramiko, imported on first use: task creation (`doit list`) never pays for it."""
    import paramiko

    return paramiko

_TRACE = bool(os.environ.get("HASWARM_TRACE"))
# Seconds an SFTP read/write may stall before the upload is given up (not a limit on its length).
SFTP_IO_TIMEOUT = 60.0
# Exit code `read` uses for "no such file" (unlikely to come from `cat`, which exits 1).
_MISSING = 77


# ---------------------------------------------------------------------------------------------
# The connection pool


class Remote:
    """Connections to the cluster's nodes, opened on first use; a context manager closing them.

    `shared=True`: the SSH connections outlive this Remote and serve every later shared Remote
    of the process (the steps of one `doit setup` or `doit clean`); `close` then leaves them
    open. Thread-safe: `on_all` calls its function for every node at once.
    """

    def __init__(self, cluster: Cluster, shared: bool = False):
        self.cluster = cluster
        self.shared = shared
        self._conns: dict[Any, Connection] = _SHARED_CONNS if shared else {}
        self._locks: dict[Any, threading.Lock] = _SHARED_LOCKS if shared else {}
        self._keys: dict[Path, paramiko.PKey] = {}
        self._guard = threading.Lock()
        self._secrets: set[str] = set()
        self._relays: list[_DockerRelay] = []
        self._docker: dict[tuple[str, float], docker.DockerClient] = {}
        # No ~/.ssh/config or /etc/ssh/ssh_config: the cluster file alone says how to connect.
        from fabric import Config

        self._config = Config(overrides={"load_ssh_configs": False})

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection (and Docker relay) opened so far."""
        with self._guard:
            relays, self._relays = self._relays, []
            self._docker = {}
            conns = []
            if not self.shared:
                conns, self._conns = list(self._conns.values()), {}
        for relay in relays:
            relay.close()
        close_all(conns)

    def redact(self, *values: str) -> None:
        """Register secret values: they are replaced by *** in every error this Remote raises."""
        self._secrets.update(v for v in values if v)

    # -- commands --------------------------------------------------------------------------------

    def run(self, node: Node | str, step: str, cmd: str, *, check: bool = True,
            stdin: str | None = None, timeout: float = COMMAND_TIMEOUT, secret: bool = False,
            sudo: bool = True, hint: str | None = None) -> Result:
        """Run `cmd` with /bin/sh on `node` (as root, via `sudo -n` unless the user is root).

        `step` is a short label for errors ("gluster: create volume"). With `check`, a non-zero
        exit raises `RemoteError`; connection problems always do. `stdin` is sent to the command
        (secrets, payloads; `put` for files). `timeout`: the command's deadline in seconds
        (default COMMAND_TIMEOUT, 60 s): after it the wait ends with a TIMEOUT `RemoteError`
        naming node, step and command (the channel is closed; the remote process may go on), at
        most `timeout` + `ssh.connect_timeout` + 1 s after the call. `secret` hides the command
        text in errors. `sudo=False` runs as the login user. `hint` is shown when the command
        fails.
        """
        n = self._node(node)
        shown = HIDDEN if secret else cmd
        secrets = [*self._secrets, *([stdin] if stdin else [])]
        if self.shared and stdin is None and sudo and not secret and in_reading():
            res = _FACTS.read(self._key_of(n), f"{n.name}@{n.address}", cmd, lambda: (
                self._execute(n, step, cmd, stdin, timeout, sudo, shown, hint)))
        elif self.shared:  # may change a node: no result read before it serves after it
            _FACTS.changed()
            try:
                res = self._execute(n, step, cmd, stdin, timeout, sudo, shown, hint)
            finally:
                _FACTS.changed()
        else:
            res = self._execute(n, step, cmd, stdin, timeout, sudo, shown, hint)
        if check and not res.ok:
            raise RemoteError([self._command_failure(n, step, shown, res, secrets, hint)])
        return res

    def _execute(self, n: Node, step: str, cmd: str, stdin: str | None, timeout: float,
                 sudo: bool, shown: str, hint: str | None = None) -> Result:
        """Run `cmd` on `n` now: the Result, or RemoteError for a timeout or a connection
        problem (not for an exit code: `run` judges that)."""
        started = time.monotonic()
        kept = self._conns.get(self._key_of(n))
        reused = kept is not None and kept.is_connected  # it ran a command before
        conn = self._connection(n, step, shown)
        try:
            try:
                res = self._exec(conn, self._wrap(n, cmd, sudo), stdin, timeout)
            except _ChannelRefused as e:
                if not reused:
                    raise e.error from None
                # A kept connection (shared) to a node that vanished since its last command: the
                # command never started. Once more on a new connection, which says why.
                self._forget(n)
                conn = self._connection(n, step, shown)
                res = self._exec(conn, self._wrap(n, cmd, sudo), stdin, timeout)
            if _TRACE:  # HASWARM_TRACE=1: every command's time, to find where a run goes
                print(f"[trace] {time.monotonic() - started:6.3f} s {n.name} {step}: "
                      f"{shown[:100]!r}", file=sys.stderr, flush=True)
        except _CommandTimeout:
            raise RemoteError([self._timeout_failure(n, step, shown, timeout, hint)]) from None
        except RemoteError:  # the new connection could not be opened: it says why
            raise
        except Exception as e:  # connection lost in the middle, channel refused...
            self._forget(n)
            cause = e.error if isinstance(e, _ChannelRefused) else e
            raise RemoteError([self._from_exception(n, step, shown, cause)]) from cause
        return res

    def reading(self) -> AbstractContextManager[None]:
        """`with r.reading():` the commands run in the block (and in `on_all` threads started
        from it) only read. Their results may serve the rest of the run (see the module's
        docstring); never wrap a wait or a poll in it."""
        return _reading()

    def read_probes(self, node: Node | str, step: str, probes: dict[str, str],
                    timeout: float = COMMAND_TIMEOUT) -> dict[str, str]:
        """{probe: its output (stdout and stderr)} of shell probes, run on `node` in one
        command (tasks.facts.probe_script). Inside `reading()` on the shared Remote each probe
        is kept as a read of its own: one another step asked already is not asked again."""
        n = self._node(node)
        if not (self.shared and in_reading()):
            return parse_sections(self.run(n, step, probe_script(probes), check=False,
                                           timeout=timeout).stdout)
        return _FACTS.read_probes(self._key_of(n), f"{n.name}@{n.address}", probes, lambda s: (
            self._execute(n, step, s, None, timeout, True, s).stdout))

    def connect(self, node: Node | str, step: str) -> None:
        """Open the connection to `node` now (RemoteError naming `step` when it cannot)."""
        self._connection(self._node(node), step, None)

    def read_live(self, node: Node | str, step: str, cmd: str, *,
                  timeout: float = COMMAND_TIMEOUT) -> Result:
        """Run `cmd`, which only reads, live (exit code not judged): its result is not kept, and
        it drops nothing kept (preflight's checks, which run beside the read-ahead)."""
        return self._execute(self._node(node), step, cmd, None, timeout, True, cmd)

    def prefetch(self, node: Node | str, cmds: list[str]) -> int:
        """Read `cmds` on `node` now, in one command, for the run's later readers (shared
        Remote only). Returns how many were kept. RemoteError when the node does not answer
        within READ_AHEAD_TIMEOUT s (the commands' deadline is shorter: then it hangs)."""
        n = self._node(node)
        if not (self.shared and cmds):
            return 0
        return _FACTS.read_ahead(self._key_of(n), cmds, lambda s: self._execute(
            n, "preflight: read facts", s, None, READ_AHEAD_TIMEOUT, True,
            "(the facts the last run read)"))

    def run_all(self, step: str, cmd: str, nodes: Iterable[Node | str] | None = None, *,
                check: bool = True, stdin: str | None = None, timeout: float = COMMAND_TIMEOUT,
                secret: bool = False, sudo: bool = True) -> dict[str, Result]:
        """`run` on every node (default: all) in parallel; one `RemoteError` for all failures."""
        return self.on_all(step, lambda n: self.run(n, step, cmd, check=check, stdin=stdin,
                                                    timeout=timeout, secret=secret, sudo=sudo),
                           nodes)

    def on_all(self, step: str, fn: Callable[[Node], T],
               nodes: Iterable[Node | str] | None = None) -> dict[str, T]:
        """Call `fn(node)` for every node (default: all) in parallel threads.

        Returns {node name: result} in cluster order. Every node runs to its end; then, if any
        failed, raises one `RemoteError` with every failure (a `RemoteError` raised by `fn`
        keeps its own failures; any other exception is attributed to its node under `step`).
        """
        targets = [self._node(n) for n in (self.cluster.nodes if nodes is None else nodes)]
        if not targets:
            return {}
        results: dict[str, T] = {}
        failures: list[Failure] = []
        with ThreadPoolExecutor(max_workers=len(targets), thread_name_prefix="remote") as pool:
            futures = [(n, pool.submit(carry(fn), n)) for n in targets]
            for n, fut in futures:
                try:
                    results[n.name] = fut.result()
                except RemoteError as e:
                    failures.extend(e.failures)
                except Exception as e:  # noqa: BLE001 - attributed to the node, reported below
                    failures.append(self._from_exception(n, step, None, e))
        if failures:
            raise RemoteError(failures)
        return results

    def clock_offset(self, node: Node | str, step: str = "clock",
                     timeout: float = 10) -> tuple[float, float]:
        """(node's clock - this computer's clock, uncertainty), in seconds.

        A shell is started first and only then asked for the time, so the measured round trip
        is the network's (plus one `date`), not SSH session and shell start-up.
        """
        n = self._node(node)
        conn = self._connection(n, step, None)
        expired = threading.Event()
        try:
            chan = conn.transport.open_session(timeout=self.cluster.ssh.connect_timeout)
            try:
                with _deadline(chan, timeout) as expired:
                    chan.settimeout(timeout)
                    chan.exec_command(self._wrap(n, "echo ready; read x; date +%s.%N", sudo=False))
                    out = b""
                    while b"ready\n" not in out:
                        data = chan.recv(256)
                        if not data:
                            raise _ssh().SSHException("the shell ended before the clock was read")
                        out += data
                    t0 = time.time()
                    chan.sendall(b"\n")
                    out = b""
                    while data := chan.recv(256):
                        out += data
                    t1 = time.time()
            finally:
                chan.close()
        except Exception as e:
            if expired.is_set():
                raise RemoteError([self._timeout_failure(n, step, "date +%s.%N", timeout,
                                                         None)]) from None
            self._forget(n)
            raise RemoteError([self._from_exception(n, step, "date +%s.%N", e)]) from e
        m = re.match(rb"\s*(\d+)(\.\d+)?", out)
        if not m:
            raise RemoteError([self._failure(
                n, step, Kind.ERROR, f"cannot read the clock: `date +%s.%N` printed {out[:80]!r}",
                hint="is GNU coreutils' date installed on the node?")])
        # %N unsupported (busybox): whole seconds, one more second of uncertainty.
        remote = float(m[1] + (m[2] or b""))
        return remote - (t0 + t1) / 2, (t1 - t0) / 2 + (0 if m[2] else 1)

    # -- files -----------------------------------------------------------------------------------

    def put(self, node: Node | str, step: str, data: bytes | str,
            remote_path: str | PurePosixPath, *, mode: int = 0o644,
            owner: str | None = None, dryrun: bool = False) -> bool:
        """Make `remote_path` on `node` hold `data` with `mode` (and `owner`: "user" or
        "user:group"; None leaves ownership to root/as is). Returns whether anything changed
        (with `dryrun`: whether anything would; nothing is changed).

        Compares sha256, mode and owner on the node first and touches nothing when they match.
        Otherwise uploads to a private temp file of the login user (mktemp: a new name, 0600),
        copies it as root into a second new file beside `remote_path` (mktemp again: no name a
        local user could create or link beforehand) and renames that into place (parent
        directories created), so readers never see a half-written file.
        """
        n = self._node(node)
        content = data.encode() if isinstance(data, str) else data
        path = str(remote_path)
        q = shlex.quote(path)
        want = hashlib.sha256(content).hexdigest()
        with self.reading():
            state = self.run(n, step, f"if [ -e {q} ]; then stat -L -c '%a %U %G' -- {q} && "
                                      f"sha256sum -- {q}; else echo missing; fi").stdout.split()
        same_content = len(state) >= 4 and state[3] == want
        if same_content and _meta_ok(state, mode, owner):
            return False
        if dryrun:
            return True
        chown = f"chown {shlex.quote(owner)} -- {{f}} && " if owner else ""
        if same_content:
            self.run(n, step, f"chmod {mode:o} -- {q} && " + chown.format(f=q) + "true")
            return True
        tmp = self.run(n, step, "mktemp /tmp/.haswarm-put.XXXXXXXXXX", sudo=False).stdout.strip()
        try:
            self._upload(n, step, content, tmp)
        except RemoteError:
            self.run(n, step, f"rm -f -- {shlex.quote(tmp)}", check=False, sudo=False)
            raise
        parent = str(PurePosixPath(path).parent)
        cleanup = shlex.quote(f'rm -f -- {shlex.quote(tmp)} "$new"')
        self.run(n, step,
                 f"new=; trap {cleanup} EXIT; set -e; mkdir -p -- {shlex.quote(parent)}; "
                 f"new=$(mktemp -- {shlex.quote(parent + '/.haswarm-new.XXXXXXXXXX')}); "
                 f'cp -- {shlex.quote(tmp)} "$new"; chmod {mode:o} -- "$new"; '
                 + chown.format(f='"$new"') + f'mv -f -- "$new" {q}')
        return True

    def read(self, node: Node | str, path: str | PurePosixPath,
             step: str = "read file") -> str | None:
        """The text of `path` on `node` (read as root), or None if it does not exist."""
        q = shlex.quote(str(path))
        res = self.run(node, step, f"[ -e {q} ] || exit {_MISSING}; cat -- {q}", check=False)
        if res.exit_code == _MISSING:
            return None
        if not res.ok:
            raise RemoteError([self._command_failure(self._node(node), step, f"cat {path}", res,
                                                     self._secrets, None)])
        return res.stdout

    # -- Docker ----------------------------------------------------------------------------------

    def docker(self, node: Node | str, timeout: float = 60) -> docker.DockerClient:
        """A Docker SDK client for `node`'s engine, tunnelled through SSH (one per node and
        `timeout`, reused on later calls; closed with this Remote). `timeout`: seconds for one
        API call (raise it for `images.load`).

        Each HTTP connection of the client runs `docker system dial-stdio` on the node through
        a dedicated, host-key checked SSH connection, relayed by a private local unix socket.
        Every distinct API URL gets its own HTTP connection in the SDK, so the first call of each
        kind costs one `dial-stdio` start; at most `_DockerRelay.MAX_CHANNELS` stay open.
        """
        import docker as docker_sdk

        if self.shared:
            _FACTS.changed()  # what the client will do is not known: as a change
        n = self._node(node)
        with self._lock(n):  # one client per node and timeout, even from many threads
            client = self._docker.get((n.name, timeout))
            if client is not None:
                return client
            try:
                conn = self._open(n)
            except Exception as e:
                raise RemoteError([self._from_exception(n, "docker: connect", None, e)]) from e
            relay = _DockerRelay(conn, self._wrap(n, "exec docker system dial-stdio", True))
            try:
                client = docker_sdk.DockerClient(base_url=f"unix://{relay.path}",
                                                 timeout=int(timeout))
            except Exception as e:  # version negotiation: the engine did not answer
                relay.close()
                raise RemoteError([self._failure(
                    n, "docker: connect", Kind.ERROR, f"the Docker engine does not answer ({e})",
                    hint="is Docker installed and running on the node? (systemctl status docker)",
                )]) from e
            relay.clients.append(client)
            self._docker[(n.name, timeout)] = client
        with self._guard:
            self._relays.append(relay)
        return client

    # -- internals -------------------------------------------------------------------------------

    def _node(self, node: Node | str) -> Node:
        return self.cluster.node(node) if isinstance(node, str) else node

    def _key_of(self, n: Node) -> Any:
        """What identifies `n`'s connection: its name; in the shared pool, also how it is
        reached (another cluster file may name another machine alike)."""
        return shared_key(self.cluster, n) if self.shared else n.name

    def _lock(self, n: Node) -> threading.Lock:
        with _SHARED_GUARD if self.shared else self._guard:
            return self._locks.setdefault(self._key_of(n), threading.Lock())

    def _wrap(self, n: Node, cmd: str, sudo: bool) -> str:
        """Always /bin/sh (login shells differ); as root via sudo -n when needed."""
        if sudo and self._needs_sudo(n):
            return f"sudo -n -- sh -c {shlex.quote(cmd)}"
        return f"sh -c {shlex.quote(cmd)}"

    def _exec(self, conn: Connection, command: str, stdin: str | None,
              timeout: float) -> Result:
        """Run `command` on a new session channel: stdin sent whole (then EOF), stdout and
        stderr collected until the command exits. Raises _CommandTimeout after `timeout` s: a
        watchdog closes the channel then, which also ends a wait paramiko would not end by
        itself (its `exec_command` waits for the node's answer without a limit).

        (Not Fabric's `run`: invoke feeds stdin at ~100 KB/s and fails when a command exits
        without reading it.)
        """
        try:
            chan = conn.transport.open_session(timeout=self.cluster.ssh.connect_timeout)
        except Exception as e:  # noqa: BLE001 - the node did not take a new channel
            raise _ChannelRefused(e) from e
        try:
            with _deadline(chan, timeout) as expired:
                try:
                    res = _collect(conn, chan, command, stdin)
                except _ssh().SSHException:  # "Channel closed." when the watchdog closed it
                    if expired.is_set():
                        raise _CommandTimeout() from None
                    raise
            if expired.is_set():
                raise _CommandTimeout()
            return res
        finally:
            chan.close()

    def _needs_sudo(self, n: Node) -> bool:
        return self.cluster.ssh_for(n).user != "root"

    def _forget(self, n: Node) -> None:
        with self._lock(n):
            conn = self._conns.pop(self._key_of(n), None)
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass

    def _connection(self, n: Node, step: str, shown: str | None) -> Connection:
        """The open connection to `n` (opened now if needed); RemoteError if that fails."""
        with self._lock(n):
            conn = self._conns.get(self._key_of(n))
            if conn is not None and conn.is_connected:
                return conn
            if conn is not None:
                conn.close()
            try:
                conn = self._open(n)
            except Exception as e:
                raise RemoteError([self._from_exception(n, step, shown, e)]) from e
            self._conns[self._key_of(n)] = conn
            return conn

    def _open(self, n: Node) -> Connection:
        key = self.cluster.ssh_for(n).key
        return open_connection(self.cluster, n, self._config,
                               None if key is None else self._key(key))

    def _key(self, path: Path) -> paramiko.PKey:
        with self._guard:
            if path in self._keys:
                return self._keys[path]
        key = load_key(path)
        with self._guard:
            self._keys[path] = key
        return key

    def _upload(self, n: Node, step: str, content: bytes, tmp: str) -> None:
        conn = self._connection(n, step, None)
        try:
            with self._lock(n):
                sftp = conn.sftp()
                sftp.get_channel().settimeout(SFTP_IO_TIMEOUT)
                sftp.putfo(io.BytesIO(content), tmp, confirm=True)
        except Exception as e:
            self._forget(n)
            raise RemoteError([self._from_exception(n, step, f"(upload to {tmp})", e)]) from e

    # -- turning problems into Failures ------------------------------------------------------

    def _failure(self, n: Node, step: str, kind: str, detail: str, *, hint: str,
                 command: str | None = None, exit_code: int | None = None,
                 stderr: str = "") -> Failure:
        return Failure(node=n.name, address=n.address, step=step, kind=kind,
                       detail=redact(detail, self._secrets), hint=hint,
                       command=None if command is None else redact(command, self._secrets),
                       exit_code=exit_code, stderr=redact(stderr, self._secrets))

    def _timeout_failure(self, n: Node, step: str, shown: str, timeout: float,
                         hint: str | None) -> Failure:
        """The Failure of a command that passed its deadline (a frozen or overloaded node)."""
        return self._failure(
            n, step, Kind.TIMEOUT, f"no result within {timeout:g} s (the command's deadline)",
            command=shown,
            hint=(hint + "; " if hint else "") + "the node may be frozen or overloaded, or the "
            "command stuck: check that the node answers (ssh, `uptime`), run the command by "
            "hand there to see what it waits for, then run the task again")

    def _command_failure(self, n: Node, step: str, shown: str, res: Result,
                         secrets: Iterable[str], hint: str | None) -> Failure:
        user = self.cluster.ssh_for(n).user
        err = redact(tail(res.stderr) or tail(res.stdout), secrets)
        sudo = _sudo_problem(res)
        if sudo:
            return self._failure(
                n, step, Kind.SUDO, sudo, command=shown, exit_code=res.exit_code, stderr=err,
                hint=f"haswarm needs root on every node. Log in as root (ssh.user: root), or "
                f"let {user} use sudo without a password: on the Pi run `echo '{user} ALL=(ALL) "
                f"NOPASSWD: ALL' | sudo tee /etc/sudoers.d/haswarm` (install sudo first if "
                "missing: apt install sudo)",
            )
        return self._failure(
            n, step, Kind.COMMAND, f"exit code {res.exit_code}", command=shown,
            exit_code=res.exit_code, stderr=err,
            hint=hint or ("read the error output above; fix the cause on the node (or in the "
                          "cluster file) and run the task again"
                          if err else "the command printed no error; run it by hand on the node"),
        )

    def _from_exception(self, n: Node, step: str, shown: str | None,
                        e: BaseException) -> Failure:
        """A Failure explaining a connection-level (or unexpected) exception for node `n`."""
        kind, detail, hint = explain(self.cluster, n, e)
        return self._failure(n, step, kind, detail, hint=hint, command=shown)


def _meta_ok(state: list[str], mode: int, owner: str | None) -> bool:
    """state = [mode in octal, user, group, sha256]: do mode and owner match the wish?"""
    user, _, group = (owner or "").partition(":")
    return state[0] == f"{mode:o}" and (owner is None or (
        state[1] == user and (not group or state[2] == group)))
