"""The local lab: the nodes of config/lab.yml as simulated Raspberry Pis on this machine.

Each node is a set of Linux namespaces on a lab bridge, booted by `lab/node-init.sh` the way a Pi
boots (sshd, dbus, avahi-daemon, dockerd, glusterd, cron), so haswarm deploys to it over real SSH
exactly as to a real cluster:

  host                                   node pi1 (same for pi2, pi3, ...)
  ----                                   ---------------------------------
  bridge hswlab0 10.77.0.1/24  <-veth->  eth0 10.77.0.11/24, default route via 10.77.0.1
  iptables FORWARD ACCEPT in/out hswlab0 (Docker's FORWARD policy is DROP)
  /run/netns/hswlab-pi1                  network namespace
  cgroups /haswarm-lab/pi1 (memory,      nsenter --net=... unshare --mount --uts --pid --fork
  pids; dockerd --cgroup-parent)           --mount-proc --propagation private tini -s -- node-init
  .lab/nodes/pi1/                        overlay uppers of /etc, /var, /usr/local; /root, /srv,
                                           /mnt, /var/lib/docker bound in; tmpfs /run and /tmp

Python API (tests use it; doit tasks below wrap it):
  lab = Lab(load_cluster(LAB_CLUSTER_FILE))
  lab.up()            start every node that is not running (heal cut links), wait until sshd,
                      dockerd and glusterd answer over SSH on every node; idempotent
  lab.down(purge=False)  stop every node (SIGTERM: services stop in order; SIGKILL after a
                      timeout) and remove every host-side piece; purge also removes node disks
  lab.kill(name)      power cut: SIGKILL the node's tini (PID 1 of its PID namespace) so every
                      process dies at once; its netns/veth/cgroups go, its disk stays
  lab.cut(name)       silent link loss: the host side of its veth goes down (peers time out)
  lab.heal(name)      link back up
  lab.boot(name)      start a killed node again (as after a reboot: disk kept, services started)
  lab.status() / lab.is_up() / lab.memory(name) / lab.exec(name, cmd) / lab.ssh(name, cmd)
  lab.ensure_controller_engine()  a Docker engine on the host for building images
  instance_lab("x")   a second, independent lab (own bridge, subnet, names, .lab/instance-x)

State lives in <project>/.lab (git-ignored): nodes/NAME (node disks and console.log), run/
(pid files), ssh/ (controller key pair, known_hosts with every node's host key, an ssh config:
`ssh -F .lab/ssh/config pi1`), controller/ (a lab-started dockerd, if any). Nothing is written to
the host's /root/.ssh, /etc or Docker state.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tasks.config import LAB_CLUSTER_FILE, PROJECT_ROOT, Cluster, Node

BRIDGE = "hswlab0"                  # the names of the default lab instance ("")
TAG = "haswarm-lab"                 # iptables comment, cgroup parent directory
NETNS_PREFIX = "hswlab-"            # /run/netns/hswlab-NAME
VETH_PREFIX = "hsw-"                # host end of a node's veth: hsw-NAME
STATE_DIR = PROJECT_ROOT / ".lab"
# Host directories every node mounts its own file system over (lab/node-init.sh: tmpfs, its own
# directories, overlays): the project (and so the lab's state) cannot live below them.
NODE_PRIVATE_DIRS = tuple(Path(d) for d in ("/tmp", "/run", "/dev/shm", "/root", "/srv", "/mnt",
                                            "/var", "/etc", "/usr/local"))
SCRIPTS_DIR = PROJECT_ROOT / "lab"
CGROUP_FS = Path("/sys/fs/cgroup")
NODE_CONTROLLERS = ("memory", "pids")     # the node's processes are placed in these
NETNS_DIR = Path("/run/netns")
CONTROLLER_SOCKET = "/var/run/docker.sock"
NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_TOOLS = {
    "ip": "iproute2", "iptables": "iptables", "nsenter": "util-linux", "unshare": "util-linux",
    "tini": "tini", "sshd": "openssh-server", "ssh": "openssh-client",
    "ssh-keygen": "openssh-client", "dockerd": "docker.io", "docker": "docker.io",
    "glusterd": "glusterfs-server", "mount.glusterfs": "glusterfs-client",
    "avahi-daemon": "avahi-daemon", "dbus-daemon": "dbus", "dbus-uuidgen": "dbus",
    "cron": "cron", "curl": "curl",
}

# Popen handles of the nodes this process started, so their host-side parent (`unshare`) is
# reaped when a node ends (pid -> Popen).
_CHILDREN: dict[int, subprocess.Popen] = {}
_CHILDREN_LOCK = threading.Lock()


class LabError(Exception):
    """A lab operation that failed; str() names the node and says what to do."""


# ---------------------------------------------------------------------------------------------
# Small host helpers


def _run(argv: Sequence[str], check: bool = True, timeout: float = 60,
         input: str | None = None) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                           input=input, stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError:
        raise LabError(f"{argv[0]} is not installed (needed by the lab)") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"`{shlex.join(argv)}` did not finish within {timeout:.0f} s") from None
    if check and r.returncode != 0:
        raise LabError(f"`{shlex.join(argv)}` failed (exit {r.returncode}): "
                       f"{(r.stderr or r.stdout).strip()}")
    return r


def _start_time(pid: int) -> int | None:
    """Start time of a live (non-zombie) process in clock ticks, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _write_text(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)


def _tcp_open(address: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def _docker_answers(sock_path: str, timeout: float = 2) -> bool:
    """True if a Docker engine answers /_ping on the unix socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(sock_path)
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return s.recv(64).split(b" ")[1:2] == [b"200"]
    except (OSError, IndexError):
        return False


def _reap(pid: int | None) -> None:
    if pid is None:
        return
    with _CHILDREN_LOCK:
        p = _CHILDREN.get(pid)
    if p is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)
            with _CHILDREN_LOCK:
                _CHILDREN.pop(pid, None)


# ---------------------------------------------------------------------------------------------
# The lab


class Lab:
    """The lab described by a cluster (normally config/lab.yml). See the module docstring."""

    def __init__(self, cluster: Cluster, state_dir: Path | str = STATE_DIR,
                 log: Callable[[str], None] | None = None, instance: str = ""):
        """instance: "" is the lab (bridge hswlab0, netns hswlab-NAME, veth hsw-NAME, cgroups
        /haswarm-lab/NAME); another short name gives a second, independent lab on the same
        machine (bridge hswlabX, ..., cgroups /haswarm-lab-X/NAME) with its own state_dir and
        cluster file (own subnet): the tests use one to try teardown without touching the lab
        other people use."""
        if not re.fullmatch(r"([a-z][a-z0-9]{0,5})?", instance):
            raise LabError(f"lab instance {instance!r}: a lower-case letter, then up to 5 more "
                           "letters or digits")
        self.instance = instance
        self.bridge = f"hswlab{instance}" if instance else BRIDGE
        self.tag = f"{TAG}-{instance}" if instance else TAG
        self.netns_prefix = f"hswlab{instance}-" if instance else NETNS_PREFIX
        self.veth_prefix = f"hsw{instance}-" if instance else VETH_PREFIX
        if not cluster.lab:
            raise LabError("this cluster file is not a lab (`lab: true` is missing): the lab "
                           "only simulates nodes listed in a lab cluster file such as "
                           "config/lab.yml")
        self.cluster = cluster
        self.nodes: list[Node] = list(cluster.nodes)
        self.state_dir = Path(state_dir)
        self.log = log or (lambda msg: None)
        addrs = []
        for n in self.nodes:
            try:
                addrs.append(ipaddress.IPv4Address(n.address))
            except ValueError:
                raise LabError(f"node {n.name}: address {n.address!r} is not an IPv4 address; "
                               "lab nodes need addresses such as 10.77.0.11") from None
        self.network = ipaddress.IPv4Network(f"{addrs[0]}/24", strict=False)
        self.gateway = self.network.network_address + 1
        for n, a in zip(self.nodes, addrs, strict=True):
            if a not in self.network or a in (self.gateway, self.network.broadcast_address):
                raise LabError(f"node {n.name}: address {a} must be in {self.network} and not "
                               f"{self.gateway} (the bridge's)")
        self.key = cluster.ssh.key or (self.state_dir / "ssh" / "id_ed25519")
        self.known_hosts = cluster.ssh.known_hosts
        self.ssh_dir = self.state_dir / "ssh"
        self.ssh_config = self.ssh_dir / "config"
        self.run_dir = self.state_dir / "run"
        self.controller_dir = self.state_dir / "controller"

    # -- names -----------------------------------------------------------------------------

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise LabError(f"no node {name!r} in the lab (nodes: {', '.join(self.names)})")

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def node_dir(self, name: str) -> Path:
        return self.state_dir / "nodes" / name

    def netns(self, name: str) -> str:
        return self.netns_prefix + name

    def veth(self, name: str) -> str:
        """Host end of the node's veth (interface names have at most 15 characters)."""
        v = self.veth_prefix + name
        if len(v) <= 15:
            return v
        return (self.veth_prefix + hashlib.sha1(name.encode()).hexdigest())[:15]

    def cgroup(self, name: str) -> str:
        """The node's cgroup path, the same in every hierarchy (dockerd's --cgroup-parent)."""
        return f"/{self.tag}/{name}"

    @staticmethod
    def _mac(prefix: int, address: str) -> str:
        """A stable, locally administered MAC from the address: a rebooted node keeps its MAC,
        so peers' ARP caches stay right (as with a real Pi)."""
        b = ipaddress.IPv4Address(address).packed
        return ":".join(f"{x:02x}" for x in (0x02, prefix, *b))

    def _pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    # -- state -----------------------------------------------------------------------------

    def pid(self, name: str) -> int | None:
        """Host pid of the node's tini (PID 1 of its PID namespace), None if it is not running."""
        self.node(name)
        try:
            rec = json.loads(self._pidfile(name).read_text())
            if _start_time(rec["tini"]) == rec["start"]:
                return rec["tini"]
        except (OSError, ValueError, KeyError):
            pass
        # No or stale pid file: the process that is PID 1 of a namespace in the node's cgroup.
        for pid in self._cgroup_pids(name, recursive=False):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("NSpid:") and line.split()[-1] == "1" and len(line.split()) > 2:
                    return pid
        return None

    def link(self, name: str) -> str:
        """'up', 'down' (cut) or 'absent' for the host end of the node's veth."""
        try:
            flags = int(Path(f"/sys/class/net/{self.veth(name)}/flags").read_text(), 16)
        except OSError:
            return "absent"
        return "up" if flags & 1 else "down"

    def is_up(self) -> bool:
        """Every node running with its link up (no SSH: see wait_ready for that)."""
        return self._bridge_present() and all(
            self.pid(n) is not None and self.link(n) == "up" for n in self.names)

    def memory(self, name: str) -> int:
        """Memory of the node in bytes: its cgroup's usage minus inactive page cache (the
        "working set", as `docker stats` counts it); includes the node's containers."""
        base = CGROUP_FS / "memory" / self.tag / name
        try:
            usage = int((base / "memory.usage_in_bytes").read_text())
            stat = dict(line.split() for line in (base / "memory.stat").read_text().splitlines())
        except OSError:
            raise LabError(f"node {name} has no memory cgroup: is it running? "
                           f"(doit lab-boot --node {name})") from None
        return max(0, usage - int(stat.get("total_inactive_file", 0)))

    def status(self) -> dict:
        """The lab as a dict: bridge, forward rule, controller engine and per node
        {address, state (running|cut|down), pid, link, memory (bytes or None)}."""
        nodes = {}
        for n in self.nodes:
            pid = self.pid(n.name)
            link = self.link(n.name)
            state = "down" if pid is None else ("running" if link == "up" else "cut")
            mem = None
            if pid is not None:
                with contextlib.suppress(LabError):
                    mem = self.memory(n.name)
            nodes[n.name] = {"address": n.address, "state": state, "pid": pid, "link": link,
                             "memory": mem}
        return {
            "bridge": {"name": self.bridge, "address": f"{self.gateway}/24",
                       "present": self._bridge_present()},
            "forward_rule": self._forward_rule_present(),
            "controller_engine": self._controller_engine_state(),
            "nodes": nodes,
        }

    # -- lifecycle -------------------------------------------------------------------------

    def up(self, timeout: float = 90) -> dict[str, list[str]]:
        """Start every node that is not running, heal cut links, start boot services someone
        stopped on a running node, then wait until sshd, dockerd and glusterd answer over SSH on
        every node. Returns {'started': nodes, 'healed': nodes, 'running': nodes that were
        fine, 'services': ['pi1:docker', ...] started on running nodes}."""
        self.check_host()
        with self._lock():
            self._ensure_ssh_keys()
            self._ensure_bridge()
            done: dict[str, list[str]] = {"started": [], "healed": [], "running": [],
                                          "services": []}
            for n in self.nodes:
                self._prepare_node_dir(n)
            self._write_known_hosts()
            for n in self.nodes:
                if self.pid(n.name) is not None:
                    if self.link(n.name) != "up":
                        self._set_link(n.name, up=True)
                        done["healed"].append(n.name)
                    else:
                        done["running"].append(n.name)
                else:
                    self._start_node(n)
                    done["started"].append(n.name)
        for name, services in self.wait_ready(timeout=timeout).items():
            done["services"].extend(f"{name}:{svc}" for svc in services)
        return done

    def down(self, purge: bool = False, timeout: float = 30) -> list[str]:
        """Stop every node and remove every host-side piece of the lab: processes, netns,
        veths, bridge, iptables rule, cgroups, /run/netns (if the lab created it) and a
        lab-started controller dockerd. Node disks stay unless purge (then .lab/nodes, .lab/run
        and the known_hosts go; the controller key pair in .lab/ssh is kept).
        Returns the nodes that were running."""
        self.check_host(services=False)
        with self._lock():
            running = {n: p for n in self._all_node_names() if (p := self.pid(n)) is not None}
            for pid in running.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for name, pid in running.items():
                if not self._wait_gone(name, pid, max(0.1, deadline - time.monotonic())):
                    self.log(f"{name}: did not stop within {timeout:.0f} s, killing it")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            for name in self._all_node_names():
                self._cleanup_node(name)
            self._remove_bridge()
            self._remove_forward_rule()
            self._remove_cgroup_root()
            self._release_netns_dir()
            self.stop_controller_engine()
            if purge:
                shutil.rmtree(self.state_dir / "nodes", ignore_errors=True)
                shutil.rmtree(self.run_dir, ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    self.known_hosts.unlink()
            return list(running)

    def kill(self, name: str) -> bool:
        """Power cut: SIGKILL the node's tini, so every process of the node dies at once; then
        remove its netns, veth and cgroups so it can boot again. Its disk is kept.
        False if it was not running."""
        self.node(name)
        with self._lock():
            pid = self.pid(name)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if not self._wait_gone(name, pid, 10):
                    raise LabError(f"{name}: its processes did not end within 10 s of SIGKILL; "
                                   "see `ps` for processes in D state, then `doit lab-down`")
            self._cleanup_node(name)
            return pid is not None

    def boot(self, name: str, timeout: float = 60) -> bool:
        """Start a node that is down, as after a reboot (disk kept, services started, link up),
        and wait until it answers over SSH. A running node only gets its link back up.
        False if it was already running."""
        node = self.node(name)
        self.check_host()
        with self._lock():
            if self.pid(name) is not None:
                if self.link(name) != "up":
                    self._set_link(name, up=True)
                return False
            self._ensure_ssh_keys()
            self._ensure_bridge()
            self._prepare_node_dir(node)
            self._write_known_hosts()
            self._start_node(node)
        self.wait_ready([name], timeout=timeout)
        return True

    def cut(self, name: str) -> None:
        """Silent link loss: the host end of the node's veth goes down. The node keeps running
        and peers see timeouts, not resets (as a pulled cable or a dead switch port)."""
        self._require_running(name)
        self._set_link(name, up=False)

    def heal(self, name: str) -> None:
        """Undo cut: the node's link is up again."""
        self._require_running(name)
        self._set_link(name, up=True)

    # -- reaching the nodes ----------------------------------------------------------------

    def exec(self, name: str, cmd: str | Sequence[str], check: bool = True, timeout: float = 120,
             input: str | None = None) -> subprocess.CompletedProcess:
        """Run a command inside a node without SSH (nsenter into its mount, UTS, net and PID
        namespaces, placed in its cgroups). A string runs with /bin/sh -c. Output is captured
        as text; with check, a non-zero exit raises LabError."""
        pid = self._require_running(name)
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        procs = [str(CGROUP_FS / c / self.tag / name / "cgroup.procs") for c in NODE_CONTROLLERS]
        full = ["sh", "-c", 'for f in "$1" "$2"; do echo $$ > "$f"; done; shift 2; exec "$@"',
                "lab-exec", *procs,
                "nsenter", "-t", str(pid), "-m", "-u", "-n", "-p", "--", *argv]
        env = {"PATH": NODE_PATH, "HOME": "/root", "LANG": "C.UTF-8", "USER": "root"}
        p = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env, cwd="/", start_new_session=True,
                             stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL)
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            # the command runs as nsenter's child, in nsenter's process group: end them all
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.communicate(timeout=5)
            raise LabError(f"{name}: `{_show(cmd)}` did not finish within {timeout:.0f} s "
                           "(a daemon started by exec must not keep stdout/stderr open)") from None
        r = subprocess.CompletedProcess(full, p.returncode, out, err)
        if check and r.returncode != 0:
            raise LabError(f"{name}: `{_show(cmd)}` failed (exit {r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()}")
        return r

    def ssh_argv(self, name: str) -> list[str]:
        """argv prefix for OpenSSH to the node as haswarm connects: the lab key, host key
        checked against known_hosts, nothing read from or written to ~/.ssh."""
        node = self.node(name)
        return ["ssh", "-F", str(self.ssh_config), f"{self.cluster.ssh_for(node).user}@"
                f"{node.address}"]

    def ssh(self, name: str, cmd: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a command on the node over real SSH (strict host key checking)."""
        try:
            r = subprocess.run([*self.ssh_argv(name), cmd], capture_output=True, text=True,
                               timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise LabError(f"{name}: ssh `{cmd}` did not finish within {timeout:.0f} s") \
                from None
        if check and r.returncode != 0:
            raise LabError(f"{name}: ssh `{cmd}` failed (exit {r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()}")
        return r

    def wait_ready(self, names: Sequence[str] | None = None,
                   timeout: float = 90) -> dict[str, list[str]]:
        """Wait until sshd, dockerd and glusterd answer over SSH on the nodes (default all).
        On a node that has finished booting, a boot service that is not running (someone
        stopped it) is started first. Returns {node: [services it had to start]}.
        Raises LabError naming every node that did not answer, with where to look."""
        names = list(names or self.names)
        deadline = time.monotonic() + timeout

        def one(name: str) -> str | None:
            node = self.node(name)
            while not _tcp_open(node.address, 22):
                if self.pid(name) is None:
                    return (f"{name}: the node died while booting; see "
                            f"{self.node_dir(name) / 'console.log'}:\n"
                            f"{self._console_tail(name)}")
                if time.monotonic() > deadline:
                    return f"{name}: sshd does not answer on {node.address}:22"
                time.sleep(0.05)
            left = max(1, int(deadline - time.monotonic()))
            script = READY_SCRIPT.replace("TRIES", str(left * 10))
            try:
                r = self.ssh(name, script, check=False, timeout=left + 10)
            except LabError as e:
                return str(e)
            if r.returncode != 0:
                return (f"{name}: not ready over SSH: {(r.stderr or r.stdout).strip()}\n"
                        f"  logs: {self.node_dir(name)}/upper/var/log/haswarm-lab/ and "
                        f"{self.node_dir(name)}/console.log")
            lines = r.stdout.splitlines()
            if f"ready {name}" not in lines:
                return (f"{name}: {node.address} answered as {r.stdout.strip()!r}: another "
                        "host uses this address?")
            started[name] = [x.split()[1] for x in lines if x.startswith("started ")]
            return None

        started: dict[str, list[str]] = {}
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            problems = [p for p in pool.map(one, names) if p]
        if problems:
            raise LabError("\n".join(problems) + "\nTry `doit lab-boot --node NAME` or "
                           "`doit lab-down` then `doit lab-up`.")
        return {n: v for n, v in started.items() if v}

    # -- the controller's Docker engine ----------------------------------------------------

    def ensure_controller_engine(self, timeout: float = 60) -> str:
        """A Docker engine on this machine (the controller) for building images: the one that
        answers on /var/run/docker.sock, else a dockerd started for the lab (data root
        .lab/controller/docker, stopped by lab-down). Returns the DOCKER_HOST URL."""
        url = f"unix://{CONTROLLER_SOCKET}"
        if _docker_answers(CONTROLLER_SOCKET):
            return url
        if shutil.which("dockerd") is None:
            raise LabError("no Docker engine answers on /var/run/docker.sock and dockerd is not "
                           "installed: apt-get install docker.io")
        with self._lock():
            if _docker_answers(CONTROLLER_SOCKET):
                return url
            d = self.controller_dir
            d.mkdir(parents=True, exist_ok=True)
            exec_root = Path("/run") / f"{self.tag}-dockerd"
            had_docker0 = Path("/sys/class/net/docker0").exists()
            had_run_docker = Path("/run/docker").exists()
            rules_before = _iptables_rules()
            logf = open(d / "dockerd.log", "ab")
            # its own config file and identity key: nothing in the host's /etc/docker
            (d / "daemon.json").write_text(json.dumps({"deprecated-key-path":
                                                       str(d / "key.json")}) + "\n")
            argv = ["dockerd", "-H", url, "--config-file", str(d / "daemon.json"),
                    "--data-root", str(d / "docker"), "--exec-root", str(exec_root),
                    "--pidfile", str(d / "dockerd.pid")]
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                 start_new_session=True, close_fds=True)
            logf.close()
            with _CHILDREN_LOCK:
                _CHILDREN[p.pid] = p
            _write_text(d / "started.json", json.dumps({
                "pid": p.pid, "start": None, "exec_root": str(exec_root),
                "had_docker0": had_docker0, "had_run_docker": had_run_docker,
                "iptables_before": rules_before}))
            end = time.monotonic() + timeout
            while not _docker_answers(CONTROLLER_SOCKET):
                if p.poll() is not None or time.monotonic() > end:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
                    raise LabError(f"the lab's dockerd did not answer on {CONTROLLER_SOCKET} "
                                   f"within {timeout:.0f} s; see {d / 'dockerd.log'}")
                time.sleep(0.1)
            rec = json.loads((d / "started.json").read_text())
            rec["start"] = _start_time(p.pid)
            _write_text(d / "started.json", json.dumps(rec))
            self.log(f"started a Docker engine for the lab on {CONTROLLER_SOCKET} "
                     f"(data root {d / 'docker'}); lab-down stops it")
            return url

    def stop_controller_engine(self, timeout: float = 30) -> bool:
        """Stop the controller dockerd if (and only if) the lab started it."""
        marker = self.controller_dir / "started.json"
        try:
            rec = json.loads(marker.read_text())
        except (OSError, ValueError):
            return False
        pid = rec.get("pid")
        if pid and rec.get("start") is not None and _start_time(pid) == rec["start"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not self._wait_gone(None, pid, timeout):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._wait_gone(None, pid, 5)
        # what that dockerd left on the host: its exec root, /run/docker (plugin sockets dir),
        # the docker0 bridge and its iptables chains and rules (and FORWARD policy DROP)
        shutil.rmtree(rec.get("exec_root") or "/nonexistent", ignore_errors=True)
        if not rec.get("had_run_docker") and Path("/run/docker").exists():
            for d, _, _ in sorted(os.walk("/run/docker"), key=lambda t: -t[0].count("/")):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
        if not rec.get("had_docker0") and Path("/sys/class/net/docker0").exists():
            _run(["ip", "link", "del", "docker0"], check=False)
        if "iptables_before" in rec:
            _undo_docker_iptables(rec["iptables_before"])
        marker.unlink(missing_ok=True)
        self.log("stopped the lab's Docker engine")
        return True

    def _controller_engine_state(self) -> str | None:
        marker = self.controller_dir / "started.json"
        if marker.exists():
            return "lab"
        return "host" if _docker_answers(CONTROLLER_SOCKET, timeout=0.5) else None

    # -- internals: host -------------------------------------------------------------------

    def check_host(self, services: bool = True) -> None:
        """Raise LabError if this machine cannot run the lab (root, packages, cgroup v1)."""
        if os.geteuid() != 0:
            raise LabError("the lab needs root (namespaces, a bridge, iptables): run as root")
        hidden = next((d for d in NODE_PRIVATE_DIRS
                       if self.state_dir.resolve().is_relative_to(d)), None)
        if hidden is not None:
            raise LabError(f"the lab's state {self.state_dir} is under {hidden}, which every "
                           "node mounts its own file system over (a node could not read its own "
                           f"disk): clone the project elsewhere (not below "
                           f"{', '.join(map(str, NODE_PRIVATE_DIRS))})")
        tools = HOST_TOOLS if services else {k: HOST_TOOLS[k] for k in ("ip", "iptables")}
        missing = sorted({pkg for tool, pkg in tools.items() if shutil.which(tool) is None})
        if missing:
            raise LabError(f"missing on this machine: apt-get install {' '.join(missing)}")
        for c in NODE_CONTROLLERS:
            if not (CGROUP_FS / c / "cgroup.procs").exists():
                raise LabError(f"no cgroup v1 '{c}' hierarchy at {CGROUP_FS / c}: the lab "
                               "needs cgroup v1 memory and pids controllers")

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One lab operation at a time, across processes (.lab/lock)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.log("waiting for another lab operation to finish (.lab/lock)")
                fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _ensure_ssh_keys(self) -> None:
        self.ssh_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.key.exists():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "haswarm-lab-controller",
                  "-f", str(self.key)])
        hosts = " ".join(n.address for n in self.nodes)
        user = self.cluster.ssh.user
        _write_text(self.ssh_config, (
            "# haswarm lab: ssh -F .lab/ssh/config pi1 (written by lab-up)\n"
            + "".join(f"Host {n.name}\n  HostName {n.address}\n" for n in self.nodes)
            + f"Host {' '.join(self.names)} {hosts}\n"
            f"  User {user}\n"
            f"  IdentityFile {self.key}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.known_hosts}\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n"
            "  BatchMode yes\n"
            f"  ConnectTimeout {int(self.cluster.ssh.connect_timeout)}\n"
            "  LogLevel ERROR\n"))

    def _write_known_hosts(self) -> None:
        lines = []
        for n in self.nodes:
            pub = (self.node_dir(n.name) / "ssh_host_ed25519_key.pub").read_text().split()
            lines.append(f"{n.address},{n.name} {pub[0]} {pub[1]}\n")
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        _write_text(self.known_hosts, "".join(lines))

    def _bridge_present(self) -> bool:
        return Path(f"/sys/class/net/{self.bridge}/bridge").exists()

    def _ensure_bridge(self) -> None:
        if not self._bridge_present():
            _run(["ip", "link", "add", self.bridge, "address", self._mac(0, str(self.gateway)),
                  "type", "bridge"])
        addrs = _run(["ip", "-o", "-4", "addr", "show", "dev", self.bridge]).stdout
        if f" {self.gateway}/24 " not in addrs:
            _run(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        if not self._forward_rule_present():
            _run(["iptables", "-w", "-I", "FORWARD", "1", *self._forward_rule()])

    def _forward_rule(self) -> list[str]:
        return ["-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT", "-m", "comment",
                "--comment", self.tag]

    def _forward_rule_present(self) -> bool:
        return _run(["iptables", "-w", "-C", "FORWARD", *self._forward_rule()],
                    check=False).returncode == 0

    def _remove_forward_rule(self) -> None:
        while self._forward_rule_present():
            _run(["iptables", "-w", "-D", "FORWARD", *self._forward_rule()])

    def _remove_bridge(self) -> None:
        if Path(f"/sys/class/net/{self.bridge}").exists():
            _run(["ip", "link", "del", self.bridge])

    def _remove_cgroup_root(self) -> None:
        for hierarchy in CGROUP_FS.iterdir():
            _rmdir_tree(hierarchy / self.tag)

    def _create_netns(self, name: str) -> None:
        """/run/netns/PREFIX-NAME, pinned by a bind mount. Not `ip netns add`: that also turns
        /run/netns into a (shared) mount point, which would outlive the lab."""
        if not NETNS_DIR.exists():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            NETNS_DIR.mkdir(parents=True)
            (self.run_dir / "created-run-netns").touch()
        pin = NETNS_DIR / self.netns(name)
        pin.touch()
        _run(["unshare", f"--net={pin}", "true"])

    def _delete_netns(self, name: str) -> None:
        pin = NETNS_DIR / self.netns(name)
        if os.path.ismount(pin):
            _run(["umount", "-l", str(pin)])
        pin.unlink(missing_ok=True)

    def _release_netns_dir(self) -> None:
        """Remove /run/netns if this lab created it and it is empty (unmounting it first if
        something, e.g. `ip netns add`, made it a mount point meanwhile)."""
        marker = self.run_dir / "created-run-netns"
        if not marker.exists():
            return
        if NETNS_DIR.exists() and not any(NETNS_DIR.iterdir()):
            while os.path.ismount(NETNS_DIR):
                if _run(["umount", str(NETNS_DIR)], check=False).returncode != 0:
                    break
            with contextlib.suppress(OSError):
                NETNS_DIR.rmdir()
        if not NETNS_DIR.exists():
            marker.unlink()

    def _all_node_names(self) -> list[str]:
        """Configured nodes plus any other node this lab left (a node removed from lab.yml)."""
        names = list(self.names)
        with contextlib.suppress(OSError):
            for d in (CGROUP_FS / "memory" / self.tag).iterdir():
                if d.is_dir() and d.name not in names:
                    names.append(d.name)
        with contextlib.suppress(OSError):
            for f in NETNS_DIR.iterdir():
                rest = f.name.removeprefix(self.netns_prefix)
                if f.name.startswith(self.netns_prefix) and rest not in names:
                    names.append(rest)
        return names

    # -- internals: one node ---------------------------------------------------------------

    def _require_running(self, name: str) -> int:
        self.node(name)
        pid = self.pid(name)
        if pid is None:
            raise LabError(f"node {name} is not running: start it with "
                           f"`doit lab-boot --node {name}` (or `doit lab-up`)")
        return pid

    def _set_link(self, name: str, up: bool) -> None:
        _run(["ip", "link", "set", self.veth(name), "up" if up else "down"])

    def _prepare_node_dir(self, node: Node) -> Path:
        d = self.node_dir(node.name)
        d.mkdir(parents=True, exist_ok=True)
        key = d / "ssh_host_ed25519_key"
        if not key.exists() or not key.with_suffix(".pub").exists():
            key.unlink(missing_ok=True)
            key.with_suffix(".pub").unlink(missing_ok=True)
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{node.name}",
                  "-f", str(key)])
        return d

    def _cgroup_pids(self, name: str, recursive: bool = True) -> list[int]:
        pids: list[int] = []
        for c in NODE_CONTROLLERS:
            base = CGROUP_FS / c / self.tag / name
            dirs = [base] if not recursive else [Path(p) for p, _, _ in os.walk(base)]
            for d in dirs:
                with contextlib.suppress(OSError):
                    pids += [int(x) for x in (d / "cgroup.procs").read_text().split()]
        return sorted(set(pids))

    def _wait_gone(self, name: str | None, pid: int, timeout: float) -> bool:
        """Wait until process pid (a node's tini, or the controller dockerd) has ended and, for
        a node, everything in its cgroups too."""
        end = time.monotonic() + timeout
        while True:
            if _start_time(pid) is None:
                if name is None:
                    _reap(pid)
                    return True
                _reap(self._unshare_of(name))
                if not any(_start_time(p) is not None for p in self._cgroup_pids(name)):
                    return True
            if time.monotonic() > end:
                return False
            time.sleep(0.02)

    def _unshare_of(self, name: str) -> int | None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return json.loads(self._pidfile(name).read_text())["unshare"]
        return None

    def _cleanup_node(self, name: str) -> None:
        """Remove the host-side pieces of a node that is not running: leftover processes in its
        cgroups, veth, netns, cgroups, pid file. Its disk stays."""
        for pid in self._cgroup_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + 10
        while any(_start_time(p) is not None for p in self._cgroup_pids(name)):
            if time.monotonic() > end:
                raise LabError(f"{name}: processes in its cgroup {self.cgroup(name)} survive "
                               "SIGKILL (D state?); see `ps`, then retry `doit lab-down`")
            time.sleep(0.05)
        _reap(self._unshare_of(name))
        if Path(f"/sys/class/net/{self.veth(name)}").exists():
            _run(["ip", "link", "del", self.veth(name)], check=False)
        self._delete_netns(name)
        for hierarchy in CGROUP_FS.iterdir():
            _rmdir_tree(hierarchy / self.tag / name)
        self._pidfile(name).unlink(missing_ok=True)

    def _start_node(self, node: Node) -> None:
        name = node.name
        self._cleanup_node(name)     # stale pieces of an earlier crash (not the disk)
        d = self._prepare_node_dir(node)
        ns, veth = self.netns(name), self.veth(name)
        self._create_netns(name)
        try:
            _run(["ip", "link", "add", veth, "address", self._mac(1, node.address), "type", "veth",
                  "peer", "name", "eth0", "address", self._mac(0, node.address), "netns", ns])
            _run(["ip", "link", "set", veth, "master", self.bridge, "up"])
            for argv in (["addr", "add", f"{node.address}/24", "dev", "eth0"],
                         ["link", "set", "lo", "up"], ["link", "set", "eth0", "up"],
                         ["route", "add", "default", "via", str(self.gateway)]):
                _run(["ip", "-n", ns, *argv])
            procs = []
            for c in NODE_CONTROLLERS:
                cg = CGROUP_FS / c / self.tag / name
                cg.mkdir(parents=True, exist_ok=True)
                procs.append(str(cg / "cgroup.procs"))
            pub = self.key.with_name(self.key.name + ".pub").read_text().strip()
            env = {"PATH": NODE_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb",
                   "LAB_NODE": name, "LAB_ADDRESS": node.address, "LAB_NODE_DIR": str(d),
                   "LAB_STATE_DIR": str(self.state_dir), "LAB_SCRIPTS": str(SCRIPTS_DIR),
                   "LAB_CGROUP": self.cgroup(name), "LAB_AUTHORIZED_KEY": pub}
            argv = ["sh", "-c", 'for f in "$1" "$2"; do echo $$ > "$f"; done; shift 2; exec "$@"',
                    "lab-spawn", *procs,
                    "nsenter", f"--net={NETNS_DIR / ns}",
                    "unshare", "--mount", "--uts", "--pid", "--fork", "--mount-proc",
                    "--propagation", "private",
                    "tini", "-s", "--", str(SCRIPTS_DIR / "node-init.sh")]
            with open(d / "console.log", "ab") as console:
                p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console,
                                     stderr=subprocess.STDOUT, env=env, cwd="/",
                                     start_new_session=True, close_fds=True)
            with _CHILDREN_LOCK:
                _CHILDREN[p.pid] = p
            tini = self._find_tini(p, name)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _write_text(self._pidfile(name), json.dumps({
                "tini": tini, "start": _start_time(tini), "unshare": p.pid,
                "booted": time.time()}))
        except BaseException:
            with contextlib.suppress(LabError):
                self._cleanup_node(name)
            raise

    def _find_tini(self, p: subprocess.Popen, name: str) -> int:
        """The host pid of the node's tini: the child unshare forks (PID 1 of the new ns)."""
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if p.poll() is not None:
                raise LabError(f"{name}: the node ended while starting (exit {p.returncode}); "
                               f"see {self.node_dir(name) / 'console.log'}:\n"
                               f"{self._console_tail(name)}")
            with contextlib.suppress(OSError):
                kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
                if kids and Path(f"/proc/{kids[0]}/comm").read_text().strip() == "tini":
                    return int(kids[0])
            time.sleep(0.01)
        raise LabError(f"{name}: tini did not start within 10 s; see "
                       f"{self.node_dir(name) / 'console.log'}")

    def _console_tail(self, name: str, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            text = (self.node_dir(name) / "console.log").read_text(errors="replace")
            return "\n".join("    " + x for x in text.splitlines()[-lines:])
        return "    (no console.log)"


def _iptables_rules() -> dict[str, list[str]]:
    """`iptables -S` of the filter and nat tables."""
    return {t: _run(["iptables", "-w", "-t", t, "-S"], check=False).stdout.splitlines()
            for t in ("filter", "nat")}


def _undo_docker_iptables(before: dict[str, list[str]]) -> None:
    """Remove the chains and rules a (lab-started) dockerd added since `before`, and put back a
    policy it changed (Docker sets FORWARD to DROP). Rules of others are left alone."""
    for table, old_lines in before.items():
        old = set(old_lines)
        now = _iptables_rules()[table]
        new_chains = [x.split()[1] for x in now if x.startswith("-N ") and x not in old]
        for line in reversed(now):
            if line.startswith("-A ") and line not in old and "docker" in line.lower():
                _run(["iptables", "-w", "-t", table, "-D", *shlex.split(line)[1:]], check=False)
        for chain in new_chains:
            _run(["iptables", "-w", "-t", table, "-F", chain], check=False)
        for chain in new_chains:
            _run(["iptables", "-w", "-t", table, "-X", chain], check=False)
        for line in old_lines:
            if line.startswith("-P ") and line not in now:
                _run(["iptables", "-w", "-t", table, *shlex.split(line)], check=False)


def _rmdir_tree(path: Path, timeout: float = 10) -> None:
    """Remove a cgroup directory and its children (bottom-up); a cgroup whose last task just
    exited can be busy for a moment."""
    if not path.exists():
        return
    end = time.monotonic() + timeout
    for d, _, _ in sorted(os.walk(path), key=lambda t: -t[0].count("/")):
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > end:
                    raise LabError(f"cannot remove cgroup {d}: {e.strerror} "
                                   f"(processes left: {Path(d, 'cgroup.procs').read_text()!r})"
                                   ) from None
                time.sleep(0.05)


def _show(cmd: str | Sequence[str]) -> str:
    return cmd if isinstance(cmd, str) else shlex.join(cmd)


# Run over SSH by wait_ready: (re)start stopped boot services of a booted node, then wait until
# dockerd (its API's /_ping) and glusterd (a CLI request) answer, TRIES x 0.1 s at most.
READY_SCRIPT = r"""
booted() { [ -e /run/haswarm-lab/booted ]; }
# A node that has finished booting runs its boot services: start any that was stopped.
if booted; then
    for s in sshd dbus docker glusterd avahi-daemon cron; do
        lab-service $s status >/dev/null 2>&1 || { lab-service $s start >&2 && echo "started $s"; }
    done
fi
for i in $(seq TRIES); do
    if curl -sf --max-time 2 --unix-socket /run/docker.sock http://docker/_ping >/dev/null \
        && gluster --mode=script pool list >/dev/null 2>&1; then
        echo "ready $(hostname)"; exit 0
    fi
    if booted; then     # booted, and a service is down: it failed to start, do not wait
        for s in docker glusterd; do
            if ! lab-service $s status >/dev/null 2>&1; then
                echo "$(hostname): $s failed to start; /var/log/haswarm-lab/$s.log ends:" >&2
                tail -n 3 /var/log/haswarm-lab/$s.log | sed 's/^/    /' >&2
                exit 1
            fi
        done
    fi
    sleep 0.1
done
echo "$(hostname): $(lab-service docker status); $(lab-service glusterd status)" >&2
exit 1
"""


def instance_lab(instance: str, count: int = 3, log: Callable[[str], None] | None = None) -> Lab:
    """A second lab on this machine, independent of the lab of config/lab.yml: nodes
    INSTANCE1..INSTANCE<count> on their own bridge and /24 (10.77.K.0, K from the name, a
    subnet no other lab bridge uses), state in .lab/instance-INSTANCE (cluster.yml, ssh/, nodes/).
    For destructive tests that must not disturb people using the lab, and for CI runs in
    parallel. Remove it with .down(purge=True) and the directory."""
    import yaml

    from tasks.config import load_cluster
    state = STATE_DIR / f"instance-{instance}"
    state.mkdir(parents=True, exist_ok=True)
    cluster_file = state / "cluster.yml"
    if not cluster_file.exists():
        used = set()
        for dev in Path("/sys/class/net").iterdir():
            if dev.name.startswith("hswlab"):
                out = _run(["ip", "-o", "-4", "addr", "show", "dev", dev.name], check=False).stdout
                used |= {w.split(".")[2] for w in out.split() if w.startswith("10.77.")}
        k = 1 + zlib.crc32(instance.encode()) % 250
        while str(k) in used:
            k = 1 + k % 250
        data = yaml.safe_load(LAB_CLUSTER_FILE.read_text())
        data["nodes"] = [{"name": f"{instance}{i}", "address": f"10.77.{k}.{10 + i}"}
                         for i in range(1, count + 1)]
        data["ssh"] = {**data.get("ssh", {}), "key": "ssh/id_ed25519",
                       "known_hosts": "ssh/known_hosts"}
        data["allow_two_nodes"] = count == 2
        _write_text(cluster_file, yaml.safe_dump(data, sort_keys=False))
    return Lab(load_cluster(cluster_file), state_dir=state, instance=instance, log=log)
