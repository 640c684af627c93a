"""tasks.remote without SSH: error aggregation, hints, redaction, sudo wrapping, put's logic.

A fake connection stands in for Fabric's; tests/lab/test_remote.py covers real SSH.
"""

from __future__ import annotations

import errno
import shlex
import socket
import subprocess
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest
from fabric import Connection
from paramiko.ssh_exception import (
    AuthenticationException,
    BadHostKeyException,
    NoValidConnectionsError,
    SSHException,
)

from tasks import remote
from tasks.config import LAB_CLUSTER_FILE, SSH, Cluster, load_cluster
from tasks.remote import (
    HIDDEN,
    Failure,
    Kind,
    Remote,
    RemoteError,
    Result,
    UnknownHostKey,
    progress,
    redact,
    tail,
)
from tests.unit.fake_ssh import OpenServer

Handler = Callable[[str, str, str], tuple[str, str, int]]


@pytest.fixture
def cluster() -> Cluster:
    return load_cluster(LAB_CLUSTER_FILE)


class FakeConn:
    """Stands for a Fabric connection; `fails` is raised by every command on it."""

    def __init__(self, node: str, fails: BaseException | None = None):
        self.node, self.fails = node, fails
        self.is_connected = True

    def close(self) -> None:
        self.is_connected = False


class FakeRemote(Remote):
    """A Remote whose connections are FakeConns; `broken` maps node -> exception on connect."""

    def __init__(self, cluster: Cluster, handler: Handler,
                 broken: dict[str, BaseException] | None = None, shared: bool = False):
        super().__init__(cluster, shared=shared)
        self.handler = handler
        self.broken = broken or {}
        self.log: list[tuple[str, str, str]] = []
        self.opened: list[str] = []
        self.uploads: list[tuple[str, bytes, str]] = []

    def _open(self, n):  # noqa: ANN001, ANN202
        self.opened.append(n.name)
        if n.name in self.broken:
            raise self.broken[n.name]
        return FakeConn(n.name)

    def _exec(self, conn, command, stdin, timeout):  # noqa: ANN001, ANN202
        self.log.append((conn.node, command, stdin or ""))
        if conn.fails is not None:
            raise conn.fails
        return Result(*self.handler(conn.node, command, stdin or ""))

    def _upload(self, n, step, content, tmp):  # noqa: ANN001, ANN202
        self.uploads.append((n.name, content, tmp))


def ok(out: str = "") -> Handler:
    return lambda node, cmd, stdin: (out, "", 0)


def _unwrap(cmd: str) -> str:
    """The command inside `sh -c '...'` (as the fake's handler would see it unquoted)."""
    import shlex

    return shlex.split(cmd)[-1]


# ---------------------------------------------------------------------------------------------
# Aggregation


def test_nothing_opens_before_use(cluster: Cluster) -> None:
    r = FakeRemote(cluster, ok())
    assert r.opened == []
    r.run("pi2", "x", "true")
    r.run("pi2", "y", "true")
    assert r.opened == ["pi2"], "one connection per node, reused"


def test_shared_remotes_keep_one_connection_per_node_for_the_process(cluster: Cluster) -> None:
    remote.close_shared()
    try:
        with FakeRemote(cluster, ok(), shared=True) as first:  # one step of `doit setup`
            first.run_all("x", "true")
        kept = dict(remote._SHARED_CONNS)
        assert sorted(first.opened) == ["pi1", "pi2", "pi3"]
        assert all(conn.is_connected for conn in kept.values()), "closing a step keeps them"
        with FakeRemote(cluster, ok(), shared=True) as second:  # the next step
            second.run_all("y", "true")
        assert second.opened == [], "the next step reuses every node's connection"
        next(c for k, c in kept.items() if k[0] == "pi2").close()  # as if pi2 rebooted
        with FakeRemote(cluster, ok(), shared=True) as third:
            third.run_all("z", "true")
        assert third.opened == ["pi2"], "a broken one is opened again"
        with FakeRemote(cluster, ok()) as private:  # not shared: its own, closed with it
            private.run("pi1", "x", "true")
        assert private.opened == ["pi1"] and not private._conns
    finally:
        remote.close_shared()
    assert not remote._SHARED_CONNS and not any(c.is_connected for c in kept.values())


def test_a_kept_connection_to_a_node_gone_since_is_opened_again(cluster: Cluster) -> None:
    """A command that cannot get a channel on a connection that ran one before (the node went
    away since) never started: it runs once more on a new connection, whose opening says why
    it fails. On a connection just opened, the refusal is the answer."""
    remote.close_shared()
    refused = remote._ChannelRefused(SSHException("Timeout opening channel."))
    try:
        r = FakeRemote(cluster, ok(), shared=True)
        r.run("pi1", "x", "true")
        next(c for k, c in remote._SHARED_CONNS.items() if k[0] == "pi1").fails = refused
        assert r.run("pi1", "y", "true").ok
        assert r.opened == ["pi1", "pi1"]
        fresh = FakeRemote(cluster, ok())
        fresh._open = lambda n: FakeConn(n.name, fails=refused)  # type: ignore[method-assign]
        with pytest.raises(RemoteError) as ei:
            fresh.run("pi2", "x", "true")
        assert "Timeout opening channel" in ei.value.failures[0].detail
    finally:
        remote.close_shared()


def test_every_failure_is_collected_others_finish(cluster: Cluster) -> None:
    done: list[str] = []

    def handler(node: str, cmd: str, stdin: str) -> tuple[str, str, int]:
        if node == "pi2":
            return "", "volume create: haswarm: failed: brick is already part of a volume\n", 1
        time.sleep(0.05)
        done.append(node)
        return "fine\n", "", 0

    r = FakeRemote(cluster, handler, broken={"pi3": TimeoutError("timed out")})
    with pytest.raises(RemoteError) as ei:
        r.run_all("gluster: create volume", "gluster volume create haswarm")
    e = ei.value
    assert e.nodes == ["pi2", "pi3"] and done == ["pi1"]
    f2, f3 = e.failures
    assert (f2.kind, f2.exit_code, f2.step) == (Kind.COMMAND, 1, "gluster: create volume")
    assert f2.command == "gluster volume create haswarm"
    assert "brick is already part of a volume" in f2.stderr
    assert f3.kind == Kind.UNREACHABLE and f3.address == "10.77.0.13"
    text = str(e)
    assert text.startswith("2 nodes failed: pi2, pi3\n\n")
    assert "pi2 (10.77.0.12) failed at 'gluster: create volume': command failed" in text
    assert "command: gluster volume create haswarm" in text
    assert "    | volume create: haswarm: failed" in text
    assert "pi3 (10.77.0.13) failed at 'gluster: create volume': unreachable" in text
    assert "no answer from 10.77.0.13 port 22 within 5 s" in text
    assert "powered on" in text and "address in the cluster file" in text


def test_remote_error_pickles() -> None:
    import pickle

    f = Failure("pi1", "10.77.0.11", "x", Kind.COMMAND, "exit code 1", "fix it", "false", 1, "e")
    e = pickle.loads(pickle.dumps(RemoteError([f])))
    assert e.failures == [f] and str(e) == str(RemoteError([f]))


def test_on_all_attributes_any_exception_and_keeps_order(cluster: Cluster) -> None:
    r = FakeRemote(cluster, ok())

    def fn(n):  # noqa: ANN001, ANN202
        if n.name == "pi1":
            raise ValueError("bad answer from docker")
        return n.address

    with pytest.raises(RemoteError) as ei:
        r.on_all("docker: inspect", fn)
    (f,) = ei.value.failures
    assert (f.node, f.kind, f.step) == ("pi1", Kind.ERROR, "docker: inspect")
    assert "ValueError: bad answer from docker" in str(ei.value)
    assert list(FakeRemote(cluster, ok()).on_all("x", lambda n: n.name)) == ["pi1", "pi2", "pi3"]
    assert r.on_all("x", lambda n: 1, nodes=[]) == {}
    assert r.on_all("x", lambda n: n.name, nodes=["pi3", "pi1"]) == {"pi3": "pi3", "pi1": "pi1"}


def test_on_all_runs_in_parallel(cluster: Cluster) -> None:
    barrier = threading.Barrier(3, timeout=2)
    r = FakeRemote(cluster, ok())
    assert r.on_all("x", lambda n: barrier.wait() >= 0) == {"pi1": True, "pi2": True,
                                                              "pi3": True}


def test_check_false_returns_the_exit_code(cluster: Cluster) -> None:
    r = FakeRemote(cluster, lambda n, c, s: ("out", "err", 3))
    assert r.run("pi1", "x", "false", check=False) == Result("out", "err", 3)
    assert not Result("", "", 3).ok and Result("", "", 0).ok


def test_timeout_is_reported(cluster: Cluster) -> None:
    r = FakeRemote(cluster, ok())
    r._open = lambda n: FakeConn(n.name, fails=remote._CommandTimeout())  # type: ignore
    with pytest.raises(RemoteError) as ei:
        r.run("pi1", "swarm: join", "docker swarm join", timeout=2)
    f = ei.value.failures[0]
    assert f.kind == Kind.TIMEOUT and "no result within 2 s" in f.detail


def test_connection_lost_mid_command_is_forgotten(cluster: Cluster) -> None:
    r = FakeRemote(cluster, ok())
    r._open = lambda n: FakeConn(n.name, fails=EOFError())  # type: ignore
    with pytest.raises(RemoteError) as ei:
        r.run("pi1", "x", "true")
    assert ei.value.failures[0].kind == Kind.UNREACHABLE
    assert "pi1" not in r._conns, "a broken connection is dropped and reopened next time"


# ---------------------------------------------------------------------------------------------
# Secrets


def test_secret_command_hidden_and_stdin_scrubbed(cluster: Cluster) -> None:
    pw = "Zq9-very-secret-Pw"

    def handler(node: str, cmd: str, stdin: str) -> tuple[str, str, int]:
        return "", f"ERROR 1045: Access denied for password '{stdin.strip()}'\n", 1

    r = FakeRemote(cluster, handler)
    with pytest.raises(RemoteError) as ei:
        r.run("pi1", "db: create user", f"mysql -e \"SET PASSWORD = '{pw}'\"", stdin=pw + "\n",
              secret=True)
    text = str(ei.value)
    assert pw not in text and HIDDEN in text and "Access denied for password '***'" in text
    assert ei.value.failures[0].command == HIDDEN
    assert r.log[0][2] == pw + "\n", "the secret did reach the command's stdin"


def test_registered_secrets_are_scrubbed_everywhere(cluster: Cluster) -> None:
    r = FakeRemote(cluster, lambda n, c, s: ("", "token SWMTKN-1-abcdef is wrong", 1))
    r.redact("SWMTKN-1-abcdef")
    with pytest.raises(RemoteError) as ei:
        r.run("pi2", "swarm: join", "docker swarm join --token SWMTKN-1-abcdef 10.77.0.11")
    assert "SWMTKN" not in str(ei.value)
    assert "--token *** 10.77.0.11" in str(ei.value)


def test_redact_and_tail_helpers() -> None:
    assert redact("a hunter22 b", ["hunter22"]) == "a *** b"
    assert redact("user: x\npw: longsecret\n", ["x", "longsecret\n"]) == "user: x\npw: ***\n"
    assert redact("nothing", ["", "abc"]) == "nothing"
    assert redact("pw=ab12cd34 ab12", ["ab12", "ab12cd34"]) == "pw=*** ***"
    many = "\n".join(f"line {i}" for i in range(40)) + "\n\n"
    assert tail(many).splitlines() == [f"line {i}" for i in range(25, 40)]
    assert tail("x" * 500, width=10) == "xxxxxxx..."


# ---------------------------------------------------------------------------------------------
# sudo


def _as_user(cluster: Cluster, user: str) -> Cluster:
    return cluster.model_copy(update={"ssh": cluster.ssh.model_copy(update={"user": user})})


def test_commands_run_under_sh_and_sudo_for_non_root(cluster: Cluster) -> None:
    r = FakeRemote(cluster, ok())
    r.run("pi1", "x", "echo 'a b' | wc -c")
    assert r.log[-1][1] == "sh -c 'echo '\"'\"'a b'\"'\"' | wc -c'"
    assert _unwrap(r.log[-1][1]) == "echo 'a b' | wc -c"
    pi = FakeRemote(_as_user(cluster, "pi"), ok())
    pi.run("pi1", "x", "id -u")
    assert pi.log[-1][1] == "sudo -n -- sh -c 'id -u'"
    pi.run("pi1", "x", "mktemp", sudo=False)
    assert pi.log[-1][1] == "sh -c mktemp"
    # A node's own user wins over the cluster's.
    nodes = [n.model_copy(update={"ssh": SSH(user="root")}) if n.name == "pi2" else n
             for n in _as_user(cluster, "pi").nodes]
    mixed = FakeRemote(_as_user(cluster, "pi").model_copy(update={"nodes": nodes}), ok())
    mixed.run_all("x", "true")
    assert sorted(c for _, c, _ in mixed.log) == ["sh -c true", "sudo -n -- sh -c true",
                                                   "sudo -n -- sh -c true"]


def test_sudo_password_gives_a_clear_hint(cluster: Cluster) -> None:
    r = FakeRemote(_as_user(cluster, "pi"),
                   lambda n, c, s: ("", "sudo: a password is required\n", 1))
    with pytest.raises(RemoteError) as ei:
        r.run("pi1", "docker: version", "docker version")
    f = ei.value.failures[0]
    assert f.kind == Kind.SUDO and "sudo -n" in f.detail
    assert "echo 'pi ALL=(ALL) NOPASSWD: ALL' | sudo tee /etc/sudoers.d/haswarm" in f.hint
    r2 = FakeRemote(_as_user(cluster, "pi"), lambda n, c, s: ("", "sh: 1: sudo: not found", 127))
    with pytest.raises(RemoteError) as ei:
        r2.run("pi1", "x", "true")
    assert "sudo is not installed" in str(ei.value)


# ---------------------------------------------------------------------------------------------
# Hints for connection problems


def _failure_for(cluster: Cluster, exc: BaseException, node: str = "pi2") -> Failure:
    r = FakeRemote(cluster, ok(), broken={node: exc})
    with pytest.raises(RemoteError) as ei:
        r.run(node, "ssh: check", "true")
    (f,) = ei.value.failures
    assert f.node == node
    return f


def test_hint_unreachable_kinds(cluster: Cluster) -> None:
    f = _failure_for(cluster, TimeoutError("timed out"))
    assert f.kind == Kind.UNREACHABLE and "within 5 s" in f.detail and "ping 10.77.0.12" in f.hint
    refused = NoValidConnectionsError({("10.77.0.12", 22): ConnectionRefusedError(
        errno.ECONNREFUSED, "refused")})
    f = _failure_for(cluster, refused)
    assert "connection refused" in f.detail and "systemctl status ssh" in f.hint
    unreach = NoValidConnectionsError({("10.77.0.12", 22): OSError(errno.EHOSTUNREACH, "No rt")})
    f = _failure_for(cluster, unreach)
    assert "host unreachable" in f.detail and "powered on" in f.hint
    f = _failure_for(cluster, socket.gaierror(-2, "Name or service not known"))
    assert "cannot resolve" in f.detail
    f = _failure_for(cluster, SSHException("Error reading SSH protocol banner"))
    assert f.kind == Kind.UNREACHABLE and "no SSH greeting" in f.detail


def test_hint_authentication(cluster: Cluster) -> None:
    f = _failure_for(cluster, AuthenticationException("Authentication failed."))
    key = cluster.ssh.key
    assert f.kind == Kind.AUTH and f"refused the key {key} for user 'root'" in f.detail
    assert f"ssh-copy-id -i {key}.pub root@10.77.0.12" in f.hint
    f = _failure_for(cluster, remote.KeyFileProblem("the key file /x does not exist"))
    assert f.kind == Kind.AUTH and "ssh-keygen -t ed25519" in f.hint


def test_hint_unknown_host_key(cluster: Cluster) -> None:
    key = _some_key()
    f = _failure_for(cluster, UnknownHostKey("10.77.0.12", key))
    kh = cluster.ssh.known_hosts
    assert f.kind == Kind.HOST_KEY and key.fingerprint in f.detail
    assert f"ssh-keyscan -t ed25519 10.77.0.12 >> {kh}" in f.hint
    assert "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub" in f.hint
    other_port = cluster.model_copy(update={"ssh": cluster.ssh.model_copy(update={"port": 2222})})
    f = _failure_for(other_port, UnknownHostKey("[10.77.0.12]:2222", key))
    assert f"ssh-keyscan -p 2222 -t ed25519 10.77.0.12 >> {kh}" in f.hint


def test_hint_changed_host_key(cluster: Cluster) -> None:
    new, old = _some_key(), _some_key()
    f = _failure_for(cluster, BadHostKeyException("10.77.0.12", new, old))
    assert "CHANGED" in f.detail and new.fingerprint in f.detail and old.fingerprint in f.detail
    assert f"ssh-keygen -f {cluster.ssh.known_hosts} -R '10.77.0.12'" in f.hint
    assert "do not go on" in f.hint


def test_unexpected_exception(cluster: Cluster) -> None:
    f = _failure_for(cluster, RuntimeError("weird"))
    assert f.kind == Kind.ERROR and "RuntimeError: weird" in f.detail


def _some_key() -> paramiko.PKey:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    raw = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    msg = paramiko.Message()
    msg.add_string("ssh-ed25519")
    msg.add_string(raw)
    return paramiko.Ed25519Key(data=msg.asbytes())


# ---------------------------------------------------------------------------------------------
# The real connection object: host keys checked, timeouts set (no network: open() is stubbed)


def test_open_checks_host_keys_and_sets_timeouts(cluster: Cluster, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    kh = tmp_path / "known_hosts"
    host = _some_key()
    kh.write_text(f"10.77.0.11 {host.get_name()} {host.get_base64()}\n")
    c = cluster.model_copy(update={"ssh": cluster.ssh.model_copy(
        update={"key": key, "known_hosts": kh, "connect_timeout": 2.5})})
    monkeypatch.setattr(Connection, "open", lambda self: None)
    conn = Remote(c)._open(c.nodes[0])
    assert isinstance(conn.client._policy, remote._RejectUnknown)
    assert conn.client._system_host_keys.lookup("10.77.0.11")
    kw = conn.connect_kwargs
    assert kw["timeout"] == kw["banner_timeout"] == kw["auth_timeout"] == 2.5
    assert kw["channel_timeout"] == 2.5
    assert kw["look_for_keys"] is False and kw["allow_agent"] is False
    assert isinstance(kw["pkey"], paramiko.PKey)
    assert (conn.host, conn.user, conn.port) == ("10.77.0.11", "root", 22)


# ---------------------------------------------------------------------------------------------
# put


def _put_remote(cluster: Cluster, state: str) -> FakeRemote:
    def handler(node: str, cmd: str, stdin: str) -> tuple[str, str, int]:
        inner = _unwrap(cmd)
        if inner.startswith("if [ -e"):
            return state, "", 0
        if inner.startswith("mktemp"):
            return "/tmp/.haswarm-put.abc\n", "", 0
        return "", "", 0

    return FakeRemote(cluster, handler)


SHA_HELLO = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"  # "hello\n"


def test_put_unchanged_touches_nothing(cluster: Cluster) -> None:
    r = _put_remote(cluster, f"640 root mosquitto\n{SHA_HELLO}  /etc/x\n")
    assert r.put("pi1", "cfg", "hello\n", "/etc/x", mode=0o640, owner="root:mosquitto") is False
    assert r.put("pi1", "cfg", b"hello\n", "/etc/x", mode=0o640, owner="root") is False
    assert r.put("pi1", "cfg", b"hello\n", "/etc/x", mode=0o640) is False
    assert r.uploads == [] and len(r.log) == 3


def test_put_fixes_mode_without_upload(cluster: Cluster) -> None:
    r = _put_remote(cluster, f"644 root root\n{SHA_HELLO}  /etc/x\n")
    assert r.put("pi1", "cfg", "hello\n", "/etc/x", mode=0o600, owner="nobody") is True
    assert r.uploads == []
    assert _unwrap(r.log[-1][1]) == "chmod 600 -- /etc/x && chown nobody -- /etc/x && true"


def test_put_uploads_new_content_via_temp(cluster: Cluster) -> None:
    r = _put_remote(cluster, "missing\n")
    assert r.put("pi3", "cfg", "hello\n", "/etc/my dir/x.conf", mode=0o600) is True
    assert r.uploads == [("pi3", b"hello\n", "/tmp/.haswarm-put.abc")]
    mktemp = [c for _, c, _ in r.log if "mktemp" in c][0]
    assert not mktemp.startswith("sudo"), "the temp file belongs to the login user"
    install = _unwrap(r.log[-1][1])
    assert "mkdir -p -- '/etc/my dir'" in install
    assert "new=$(mktemp -- '/etc/my dir/.haswarm-new.XXXXXXXXXX')" in install
    assert 'chmod 600 -- "$new"' in install
    assert install.endswith("mv -f -- \"$new\" '/etc/my dir/x.conf'")
    assert "rm -f -- /tmp/.haswarm-put.abc" in install
    assert "x.conf.haswarm-new" not in install, "no fixed name beside the file"


class LocalRemote(FakeRemote):
    """A FakeRemote whose "node" is this machine: commands run here with sh, uploads are
    written here (so put's real shell is exercised, as the current user)."""

    def __init__(self, cluster: Cluster):
        def run_here(node: str, cmd: str, stdin: str) -> tuple[str, str, int]:
            res = subprocess.run(["sh", "-c", _unwrap(cmd)], input=stdin, capture_output=True,
                                 text=True, timeout=10)
            return res.stdout, res.stderr, res.returncode

        super().__init__(cluster, run_here)

    def _wrap(self, n, cmd, sudo):  # noqa: ANN001, ANN202 - no sudo here
        return f"sh -c {shlex.quote(cmd)}"

    def _upload(self, n, step, content, tmp):  # noqa: ANN001, ANN202
        Path(tmp).write_bytes(content)


def test_put_cannot_be_hijacked_by_a_file_planted_beside_the_target(cluster: Cluster,
                                                                    tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    target = tmp_path / "dir" / "stack.yml"
    target.parent.mkdir()
    planted = ["stack.yml.haswarm-new", ".haswarm-new", "stack.yml.tmp"]
    for name in planted:
        (target.parent / name).symlink_to(victim)  # what a local user could have prepared
    before = set(Path("/tmp").glob(".haswarm-put.*"))
    r = LocalRemote(cluster)
    assert r.put("pi1", "stack", "services: {}\n", str(target), mode=0o600) is True
    assert target.read_text() == "services: {}\n" and not target.is_symlink()
    assert target.stat().st_mode & 0o777 == 0o600
    assert victim.read_text() == "precious\n", "nothing was written through a planted link"
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([*planted, "stack.yml"]), \
        "the temporary file beside it is gone"
    assert set(Path("/tmp").glob(".haswarm-put.*")) == before, "the upload's temp file is gone"
    assert r.put("pi1", "stack", "services: {}\n", str(target), mode=0o600) is False


def test_put_changed_content(cluster: Cluster) -> None:
    r = _put_remote(cluster, "644 root root\n" + "0" * 64 + "  /etc/x\n")
    assert r.put("pi1", "cfg", "hello\n", "/etc/x") is True and len(r.uploads) == 1


def test_read(cluster: Cluster) -> None:
    r = FakeRemote(cluster, lambda n, c, s: ("", "", 77))
    assert r.read("pi1", "/etc/none") is None
    r = FakeRemote(cluster, lambda n, c, s: ("text\n", "", 0))
    assert r.read("pi1", "/etc/x") == "text\n"
    r = FakeRemote(cluster, lambda n, c, s: ("", "cat: /etc/x: Permission denied", 1))
    with pytest.raises(RemoteError, match="Permission denied"):
        r.read("pi1", "/etc/x")


def test_docker_engine_not_answering(cluster: Cluster) -> None:
    class NoSessions:
        def open_session(self, **kw: object) -> None:
            raise SSHException("Connect failed")

    r = FakeRemote(cluster, ok())
    conn = FakeConn("pi1")
    conn.transport = NoSessions()  # type: ignore[attr-defined]
    r._open = lambda n: conn  # type: ignore[method-assign]
    with pytest.raises(RemoteError) as ei:
        r.docker("pi1", timeout=5)
    f = ei.value.failures[0]
    assert (f.node, f.step) == ("pi1", "docker: connect")
    assert "Docker engine does not answer" in f.detail and "systemctl status docker" in f.hint
    assert not conn.is_connected, "the relay's SSH connection is closed again"
    r.close()


def test_progress(capsys: pytest.CaptureFixture[str], cluster: Cluster) -> None:
    progress(cluster.nodes[1], "loading image 3/5")
    progress("pi3", "done")
    assert capsys.readouterr().out == "pi2: loading image 3/5\npi3: done\n"


# ---------------------------------------------------------------------------------------------
# Deadlines and keepalive, against an SSH server in this process (paramiko, over TCP loopback)


class _Node(OpenServer):
    """An SSH server standing for a node: `mode` "frozen" never answers a command request (its
    SSH server hangs), "hung" starts the command and never ends it, "ok" prints and exits 0."""

    def __init__(self, mode: str):
        self.mode = mode
        self.thaw = threading.Event()
        self.global_requests: list[str] = []

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        if self.mode == "frozen":
            self.thaw.wait(30)
        elif self.mode == "ok":
            def answer() -> None:
                channel.sendall(b"hello\n")
                channel.send_exit_status(0)
                channel.close()
            threading.Timer(0.05, answer).start()
        return True

    def check_global_request(self, kind: str, msg: paramiko.Message) -> bool:
        self.global_requests.append(kind)
        return False


@pytest.fixture
def ssh_node():
    """A function mode -> (client Transport, the server's _Node); everything closed after."""
    opened: list[tuple[paramiko.Transport, paramiko.Transport, _Node]] = []

    def start(mode: str) -> tuple[paramiko.Transport, _Node]:
        listener = socket.create_server(("127.0.0.1", 0))
        client_sock = socket.create_connection(listener.getsockname())
        server_sock, _ = listener.accept()
        listener.close()
        node = _Node(mode)
        server = paramiko.Transport(server_sock)
        server.add_server_key(paramiko.RSAKey.generate(1024))
        server.start_server(event=threading.Event(), server=node)  # does not wait
        client = paramiko.Transport(client_sock)
        client.start_client(timeout=5)
        client.auth_none("root")
        opened.append((client, server, node))
        return client, node

    yield start
    for client, server, node in opened:
        node.thaw.set()
        client.close()
        server.close()


def _remote_on(cluster: Cluster, transport: paramiko.Transport) -> Remote:
    r = Remote(cluster)
    conn = types.SimpleNamespace(transport=transport, is_connected=True, close=lambda: None)
    r._conns = {n.name: conn for n in cluster.nodes}  # type: ignore[assignment]
    return r


@pytest.mark.parametrize("mode", ["frozen", "hung"])
def test_a_frozen_node_fails_the_step_at_the_deadline(cluster: Cluster, ssh_node, mode) -> None:
    client, _ = ssh_node(mode)
    r = _remote_on(cluster, client)
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as ei:
        r.run("pi2", "gluster: create volume", "gluster volume create haswarm", timeout=0.5)
    took = time.monotonic() - t0
    assert 0.5 <= took < 1.5, f"the deadline is 0.5 s; failed after {took:.2f} s"
    (f,) = ei.value.failures
    assert (f.node, f.step, f.kind) == ("pi2", "gluster: create volume", Kind.TIMEOUT)
    assert f.command == "gluster volume create haswarm"
    assert "no result within 0.5 s" in f.detail and "frozen" in f.hint
    text = str(ei.value)
    assert "pi2 (10.77.0.12) failed at 'gluster: create volume'" in text


def test_a_command_within_its_deadline_is_not_cut(cluster: Cluster, ssh_node) -> None:
    client, _ = ssh_node("ok")
    r = _remote_on(cluster, client)
    assert r.run("pi1", "x", "echo hello", timeout=2) == Result("hello\n", "", 0)
    time.sleep(2.2)  # the watchdog of that command would have fired by now
    assert client.is_active()
    assert r.run("pi1", "x", "echo hello") == Result("hello\n", "", 0)


def test_every_command_has_a_default_deadline() -> None:
    import inspect

    for fn in (Remote.run, Remote.run_all):
        assert inspect.signature(fn).parameters["timeout"].default == remote.COMMAND_TIMEOUT
    assert remote.COMMAND_TIMEOUT == 60
    from tasks.ops import Op

    assert Op("x", "true").timeout == remote.COMMAND_TIMEOUT


def test_keepalive_packets_and_a_tcp_user_timeout(ssh_node) -> None:
    from tasks.connection import keep_alive

    client, node = ssh_node("ok")
    keep_alive(client, interval=0.2, dead_after=3)
    assert client.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 3000
    deadline = time.monotonic() + 3
    while not node.global_requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "keepalive@lag.net" in node.global_requests


def test_clock_read_of_a_frozen_node_has_a_deadline(cluster: Cluster, ssh_node) -> None:
    client, _ = ssh_node("frozen")
    r = _remote_on(cluster, client)
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as ei:
        r.clock_offset("pi3", "preflight: clock", timeout=0.5)
    assert time.monotonic() - t0 < 1.5
    (f,) = ei.value.failures
    assert (f.node, f.step, f.kind, f.command) == ("pi3", "preflight: clock", Kind.TIMEOUT,
                                                   "date +%s.%N")
