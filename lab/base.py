"""What a lab is: its names (bridge, netns, veth and cgroup of each node, per lab instance), its
state directory, the host it needs (`check_host`) and its lock. `LabBase` holds this; the parts
of `Lab` (lab/nodes.py, network.py, access.py, engine.py) build on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from lab.proc import LabError
from tasks.config import PROJECT_ROOT, Cluster, Node

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


class LabBase:
    """The lab described by a cluster: its names, state directory, host check and lock."""

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
        """The node called `name`; LabError naming the lab's nodes if there is none."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise LabError(f"no node {name!r} in the lab (nodes: {', '.join(self.names)})")

    @property
    def names(self) -> list[str]:
        """The names of the lab's nodes, in the cluster file's order."""
        return [n.name for n in self.nodes]

    def node_dir(self, name: str) -> Path:
        """The node's disk and console.log: .lab/nodes/NAME."""
        return self.state_dir / "nodes" / name

    def netns(self, name: str) -> str:
        """The name of the node's network namespace (/run/netns/NAME)."""
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

    # -- the host --------------------------------------------------------------------------

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
