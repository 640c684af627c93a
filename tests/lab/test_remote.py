"""tasks.remote against real SSH servers.

Two kinds of target:
- a throwaway sshd on loopback (127.0.0.11-13, own port, host key and authorized key under a
  temporary directory), started and stopped by PID here: needs root and openssh-server only, so
  these run everywhere, CI included;
- the lab (`@pytest.mark.lab`, the `lab` fixture from tests/conftest.py).

"Unreachable" never means a real foreign address: on loopback a listener whose accept queue is
full drops SYNs (a silent host, like a powered-off Pi); in the lab an unused address on the lab's
own bridge (10.77.0.99).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tasks.config import LAB_CLUSTER_FILE, SSH, Cluster, load_cluster
from tasks.remote import HIDDEN, Kind, Remote, RemoteError

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
LOOPBACK = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]

needs_sshd = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(SSHD), reason="needs root and openssh-server (sshd)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackSSH:
    """One sshd listening on several loopback addresses, all state in `root`."""

    def __init__(self, root: Path, addresses: list[str]):
        self.root = root
        self.addresses = addresses
        self.port = _free_port()
        self.key = root / "id_ed25519"
        self.host_key = root / "host_ed25519"
        self.known_hosts = root / "known_hosts"
        for path, comment in ((self.key, "client"), (self.host_key, "host")):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                            "-f", str(path)], check=True)
        (root / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        host_pub = self.host_key.with_suffix(".pub").read_text().split()
        self.known_hosts.write_text("".join(
            f"[{a}]:{self.port} {host_pub[0]} {host_pub[1]}\n" for a in addresses))
        listen = "".join(f"ListenAddress {a}:{self.port}\n" for a in addresses)
        (root / "sshd_config").write_text(
            f"{listen}HostKey {self.host_key}\nPidFile {root}/sshd.pid\n"
            f"AuthorizedKeysFile {root}/authorized_keys\nStrictModes no\nUsePAM no\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nMaxStartups 50:30:100\n"
            "Subsystem sftp internal-sftp\nLogLevel ERROR\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")],
                                     stdin=subprocess.DEVNULL, stderr=open(root / "sshd.log", "w"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((addresses[-1], self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not start: {(root / 'sshd.log').read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)

    def cluster(self, connect_timeout: float = 3) -> Cluster:
        """A cluster file for these addresses, loaded the normal way (paths resolved)."""
        data = yaml.safe_load(LAB_CLUSTER_FILE.read_text())
        data["ssh"] = {"user": "root", "port": self.port, "key": str(self.key),
                       "known_hosts": str(self.known_hosts), "connect_timeout": connect_timeout}
        data["nodes"] = [{"name": f"pi{i + 1}", "address": a}
                         for i, a in enumerate(self.addresses)]
        path = self.root / "cluster.yml"
        path.write_text(yaml.safe_dump(data))
        return load_cluster(path)


class SilentHost:
    """A loopback TCP port that never answers a SYN: the listen backlog is full, so the kernel
    drops further handshakes, like a powered-off host. Stop with close()."""

    def __init__(self, address: str = "127.0.0.99"):
        self.address = address
        self.server = socket.socket()
        self.server.bind((address, 0))
        self.port = self.server.getsockname()[1]
        self.server.listen(0)
        # Fill the accept queue (backlog 0 still admits one); later SYNs are dropped.
        self.fillers = []
        for _ in range(2):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((address, self.port))
            self.fillers.append(s)
        time.sleep(0.1)

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.server.close()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackSSH]:
    if os.geteuid() != 0 or not os.path.exists(SSHD):
        pytest.skip("needs root and openssh-server (sshd)")
    server = LoopbackSSH(tmp_path_factory.mktemp("sshd"), LOOPBACK)
    yield server
    server.stop()


@pytest.fixture
def cluster(sshd: LoopbackSSH) -> Cluster:
    return sshd.cluster()


def _with_node(c: Cluster, name: str, **update: object) -> Cluster:
    nodes = [n.model_copy(update=update) if n.name == name else n for n in c.nodes]
    return c.model_copy(update={"nodes": nodes})


# ---------------------------------------------------------------------------------------------
# Loopback


@needs_sshd
def test_run_all_in_parallel(cluster: Cluster) -> None:
    with Remote(cluster) as r:
        r.run_all("warm up", "true")
        res = r.run_all("sleep", "date +%s.%N; sleep 1; echo $((6*7)); date +%s.%N")
    lines = {k: v.stdout.split() for k, v in res.items()}
    assert {k: v[1] for k, v in lines.items()} == {"pi1": "42", "pi2": "42", "pi3": "42"}
    # parallel: every command started before any ended (one clock: the nodes share this host)
    starts, ends = [float(v[0]) for v in lines.values()], [float(v[2]) for v in lines.values()]
    assert max(starts) < min(ends), f"not parallel: started {starts}, ended {ends}"


@needs_sshd
def test_failures_of_every_node_are_collected(cluster: Cluster) -> None:
    with Remote(cluster) as r, pytest.raises(RemoteError) as ei:
        # pi1 fails at once, pi3 after a while: both are reported, pi2 finishes.
        r.run_all("demo: fail", 'case "$SSH_CONNECTION" in '
                  '*127.0.0.12*) echo fine ;; *127.0.0.13*) sleep 0.5; echo late >&2; exit 3 ;; '
                  '*) echo "no such thing" >&2; exit 2 ;; esac')
    e = ei.value
    assert e.nodes == ["pi1", "pi3"]
    assert [f.exit_code for f in e.failures] == [2, 3]
    text = str(e)
    assert "2 nodes failed: pi1, pi3" in text
    assert "pi1 (127.0.0.11) failed at 'demo: fail'" in text and "no such thing" in text
    assert "late" in text


@needs_sshd
def test_stdin_exit_code_and_secret(cluster: Cluster) -> None:
    secret = "s3cr3t-value-that-must-not-leak"
    with Remote(cluster) as r:
        res = r.run("pi1", "cat", "cat", stdin="hello\n")
        assert res.stdout == "hello\n" and res.exit_code == 0
        assert r.run("pi1", "exit", "exit 5", check=False).exit_code == 5
        with pytest.raises(RemoteError) as ei:
            r.run("pi2", "db: set password",
                  'read -r pw; echo "ERROR 1045: bad password $pw" >&2; exit 1',
                  stdin=secret + "\n", secret=True)
    text = str(ei.value)
    assert secret not in text and HIDDEN in text and "ERROR 1045: bad password ***" in text


@needs_sshd
def test_stdin_large_or_unread(cluster: Cluster) -> None:
    with Remote(cluster) as r:
        assert r.run("pi1", "unread", "true", stdin="x" * 300_000).exit_code == 0
        t0 = time.monotonic()
        assert r.run("pi1", "count", "wc -c", stdin="y" * 5_000_000).stdout.strip() == "5000000"
        assert time.monotonic() - t0 < 10
        assert r.run("pi1", "bg", "sleep 30 >/dev/null 2>&1 & echo started",
                     timeout=5).stdout == "started\n"


@needs_sshd
def test_clock_offset(cluster: Cluster) -> None:
    with Remote(cluster) as r:
        offsets = r.on_all("clock", lambda n: r.clock_offset(n))
    for skew, error in offsets.values():
        assert abs(skew) < 0.05 and 0 <= error < 0.05, (skew, error)


@needs_sshd
def test_timeout(cluster: Cluster) -> None:
    with Remote(cluster) as r, pytest.raises(RemoteError) as ei:
        t0 = time.monotonic()
        r.run("pi1", "wait", "sleep 30", timeout=1)
    assert time.monotonic() - t0 < 5
    assert ei.value.failures[0].kind == Kind.TIMEOUT


@needs_sshd
def test_put_is_idempotent_and_read(cluster: Cluster, tmp_path: Path) -> None:
    target = tmp_path / "sub" / "dir" / "file.conf"
    with Remote(cluster) as r:
        assert r.read("pi1", target) is None
        assert r.put("pi1", "put", "a = 1\n", target, mode=0o640) is True
        assert r.put("pi1", "put", "a = 1\n", target, mode=0o640) is False
        assert r.read("pi1", target) == "a = 1\n"
        assert oct(target.stat().st_mode & 0o7777) == "0o640"
        assert r.put("pi1", "put", "a = 1\n", target, mode=0o600) is True  # mode only
        assert oct(target.stat().st_mode & 0o7777) == "0o600"
        assert r.put("pi1", "put", b"\x00binary\xff", target, mode=0o600,
                     owner="root:root") is True
        assert target.read_bytes() == b"\x00binary\xff"
        assert r.put("pi1", "put", b"\x00binary\xff", target, mode=0o600,
                     owner="root:root") is False
        assert r.put("pi1", "put", b"x", target, owner="nobody") is True
        assert target.owner() == "nobody"
        big = os.urandom(3 * 1024 * 1024)
        assert r.put("pi2", "put", big, target) is True
        assert target.read_bytes() == big
        assert r.put("pi2", "put", big, target) is False
    leftovers = [p for p in Path("/tmp").glob(".haswarm-put.*")]
    assert not leftovers and not list(target.parent.glob(".haswarm-new.*"))


@needs_sshd
def test_unknown_host_key_refused(sshd: LoopbackSSH, cluster: Cluster, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text("".join(line + "\n" for line in sshd.known_hosts.read_text().splitlines()
                          if not line.startswith("[127.0.0.12]")))
    c = cluster.model_copy(update={"ssh": cluster.ssh.model_copy(update={"known_hosts": kh})})
    with Remote(c) as r, pytest.raises(RemoteError) as ei:
        r.run_all("ssh: check", "true")
    f = ei.value.failures
    assert [x.node for x in f] == ["pi2"] and f[0].kind == Kind.HOST_KEY
    assert f"ssh-keyscan -p {sshd.port} -t ed25519 127.0.0.12 >> {kh}" in str(ei.value)
    assert "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub" in str(ei.value)
    assert "SHA256:" in str(ei.value)
    assert "[127.0.0.12]" not in kh.read_text(), "the unknown key must not be added"


@needs_sshd
def test_changed_host_key_refused(sshd: LoopbackSSH, cluster: Cluster, tmp_path: Path) -> None:
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    fake = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    kh = tmp_path / "known_hosts"
    kh.write_text("".join(
        (f"[127.0.0.13]:{sshd.port} {fake}" if line.startswith("[127.0.0.13]") else line) + "\n"
        for line in sshd.known_hosts.read_text().splitlines()))
    c = cluster.model_copy(update={"ssh": cluster.ssh.model_copy(update={"known_hosts": kh})})
    with Remote(c) as r, pytest.raises(RemoteError) as ei:
        r.run_all("ssh: check", "true")
    text = str(ei.value)
    assert ei.value.nodes == ["pi3"] and "CHANGED" in text
    assert f"ssh-keygen -f {kh} -R '[127.0.0.13]:{sshd.port}'" in text


@needs_sshd
def test_wrong_key_and_missing_key(cluster: Cluster, tmp_path: Path) -> None:
    other = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    c = _with_node(cluster, "pi1", ssh=SSH(key=other))
    c = _with_node(c, "pi2", ssh=SSH(key=tmp_path / "nope"))
    with Remote(c) as r, pytest.raises(RemoteError) as ei:
        r.run_all("ssh: check", "true")
    f = {x.node: x for x in ei.value.failures}
    assert set(f) == {"pi1", "pi2"}
    assert f["pi1"].kind == Kind.AUTH and "ssh-copy-id -i" in f["pi1"].hint
    assert f["pi2"].kind == Kind.AUTH and "does not exist" in f["pi2"].detail


@needs_sshd
def test_silent_host_fails_fast_and_others_finish(cluster: Cluster) -> None:
    silent = SilentHost()
    try:
        c = cluster.model_copy(update={"ssh": cluster.ssh.model_copy(update={"port": silent.port})})
        # Only pi2 points at the silent port; the others keep the real sshd port.
        real = cluster.ssh.port
        nodes = [n.model_copy(update={"address": silent.address}) if n.name == "pi2"
                 else n.model_copy(update={"ssh": SSH(port=real)}) for n in c.nodes]
        c = c.model_copy(update={"nodes": nodes})
        with Remote(c) as r, pytest.raises(RemoteError) as ei:
            t0 = time.monotonic()
            r.run_all("ssh: check", "sleep 0.2")
        took = time.monotonic() - t0
    finally:
        silent.close()
    assert ei.value.nodes == ["pi2"]
    assert ei.value.failures[0].kind == Kind.UNREACHABLE
    assert "within 3 s" in str(ei.value) and "pi2 (127.0.0.99)" in str(ei.value)
    assert took < cluster.ssh.connect_timeout + 2


@needs_sshd
def test_refused_port(cluster: Cluster) -> None:
    c = _with_node(cluster, "pi3", ssh=SSH(port=_free_port()))
    with Remote(c) as r, pytest.raises(RemoteError) as ei:
        r.run("pi3", "ssh: check", "true")
    assert "connection refused" in str(ei.value)


@needs_sshd
def test_broken_connection_is_reopened(cluster: Cluster) -> None:
    with Remote(cluster) as r:
        r.run("pi1", "one", "true")
        r._conns["pi1"].client.get_transport().close()  # as if the Pi rebooted in between
        assert r.run("pi1", "two", "echo again").stdout == "again\n"


@needs_sshd
@pytest.mark.skipif(not shutil.which("sudo"), reason="sudo not installed")
def test_sudo_wrapping_runs_for_real(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    with Remote(cluster) as r:
        # Pretend the login user is not root: the command goes through `sudo -n sh -c`.
        monkeypatch.setattr(r, "_needs_sudo", lambda n: True)
        assert r.run("pi1", "sudo", "echo 'it''s' \"$(id -u)\"").stdout == "its 0\n"


@needs_sshd
def test_docker_client_over_ssh(cluster: Cluster) -> None:
    if not shutil.which("docker"):
        pytest.skip("no docker CLI on the node")
    probe = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("no Docker engine on this machine")
    with Remote(cluster) as r:
        clients = r.on_all("docker: version", lambda n: r.docker(n).version()["Version"])
        assert set(clients.values()) == {probe.stdout.strip()}
        d = r.docker("pi1")
        assert d.ping() is True and isinstance(d.api.images(), list)
        assert r.docker("pi1") is d


@needs_sshd
def test_many_threads_share_a_connection(cluster: Cluster) -> None:
    with Remote(cluster) as r:
        out: list[str] = []
        ts = [threading.Thread(target=lambda i=i: out.append(
            r.run("pi1", "n", f"echo {i}").stdout.strip())) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert sorted(out, key=int) == [str(i) for i in range(8)]
        assert len(r._conns) == 1


# ---------------------------------------------------------------------------------------------
# The lab (the `lab` fixture of tests/conftest.py: leaves it as it found it)


def _lab_route_ok(address: str) -> bool:
    """True if `address` is routed to a local bridge (never send test traffic off the machine)."""
    out = subprocess.run(["ip", "route", "get", address], capture_output=True, text=True).stdout
    return " via " not in out and " dev " in out


@pytest.mark.lab
def test_lab_parallel_and_unreachable(lab: object) -> None:
    c = load_cluster(LAB_CLUSTER_FILE)
    with Remote(c) as r:
        res = r.run_all("lab: hostname", "uname -m; hostname")
        assert set(res) == set(c.names)
    assert _lab_route_ok("10.77.0.99"), "10.77.0.99 must be on the lab bridge"
    bad = _with_node(c, "pi2", address="10.77.0.99")
    t0 = time.monotonic()
    with Remote(bad) as r, pytest.raises(RemoteError) as ei:
        r.run_all("lab: hostname", "hostname")
    took = time.monotonic() - t0
    assert ei.value.nodes == ["pi2"] and ei.value.failures[0].kind == Kind.UNREACHABLE
    assert took < 10, f"unreachable node took {took:.1f} s"
    print(f"\nlab: unreachable pi2 failed after {took:.2f} s")


@pytest.mark.lab
def test_lab_put_idempotent_and_host_key(lab: object, tmp_path: Path) -> None:
    c = load_cluster(LAB_CLUSTER_FILE)
    with Remote(c) as r:
        path = "/etc/haswarm-test/remote.txt"
        r.run_all("cleanup", f"rm -f {path}")
        changed = r.on_all("put", lambda n: r.put(n, "put", f"{n.name}\n", path, mode=0o600))
        assert set(changed.values()) == {True}
        again = r.on_all("put", lambda n: r.put(n, "put", f"{n.name}\n", path, mode=0o600))
        assert set(again.values()) == {False}
        r.run_all("cleanup", "rm -rf /etc/haswarm-test")
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    c2 = c.model_copy(update={"ssh": c.ssh.model_copy(update={"known_hosts": kh})})
    with Remote(c2) as r, pytest.raises(RemoteError) as ei:
        r.run_all("ssh: check", "true")
    assert ei.value.nodes == c.names and all(f.kind == Kind.HOST_KEY for f in ei.value.failures)
