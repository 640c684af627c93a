"""The facts `doit status` reads: what every node is asked (`node_probes`), what one node is
asked about the whole cluster (`cluster_probes`, `heal_probe`), and their pure parsers.

The shared machinery (`probe_script`, `parse_sections`, `gather`) and the Galera member fact are
in tasks/facts.py; each subsystem's own facts beside it (gluster_facts.py, stack_facts.py). These
are the cross-cutting ones `doit status` and `doit drill` read.
"""

from __future__ import annotations

import json
import shlex
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tasks.facts import GALERA_STATUS
from tasks.gluster_facts import GlusterOutputError, cli_xml
from tasks.stack_facts import CONTAINER_FORMAT, NAMESPACE

if TYPE_CHECKING:
    from tasks.config import Cluster, Node

KEEPALIVED_PID = "/run/keepalived.pid"
DB_SERVICES = ("db", "db-seed")

SWARM_FORMAT = ('{"state":{{json .Swarm.LocalNodeState}},'
                '"control":{{json .Swarm.ControlAvailable}},"error":{{json .Swarm.Error}}}')
NODE_INSPECT_FORMAT = (
    '{"id":{{json .ID}},"host":{{json .Description.Hostname}},"state":{{json .Status.State}},'
    '"addr":{{json .Status.Addr}},"availability":{{json .Spec.Availability}},'
    '"role":{{json .Spec.Role}},"manager":{{json .ManagerStatus}}}'
)
# Every node of the swarm as a manager sees it, one NODE_INSPECT_FORMAT line each.
NODES_PROBE = ("ids=$(timeout 10 docker node ls -q) && "
               f"timeout 10 docker node inspect --format {shlex.quote(NODE_INSPECT_FORMAT)} "
               "$ids 2>/dev/null")


# ---------------------------------------------------------------------------------------------
# Probes (shell, read-only) and their parsing (pure)


def node_probes(c: Cluster, node: Node) -> dict[str, str]:
    """What every node is asked (read-only; each command time-limited)."""
    stack_filter = shlex.quote(f"label={NAMESPACE}={c.name}")
    services = " ".join(shlex.quote(f"{c.name}_{s}") for s in DB_SERVICES)
    mp = shlex.quote(str(c.gluster.mount_point))
    probes = {
        "swarm": f"timeout 10 docker info --format {shlex.quote(SWARM_FORMAT)} 2>/dev/null",
        "containers": f"timeout 10 docker ps --filter {stack_filter} "
                      f"--format {shlex.quote(CONTAINER_FORMAT)} 2>/dev/null",
        "galera": f"for s in {services}; do "
                  "for c in $(timeout 10 docker ps -q --filter "
                  "\"label=com.docker.swarm.service.name=$s\" 2>/dev/null); do "
                  f"echo \"== $c\"; timeout 10 docker exec \"$c\" {GALERA_STATUS} 2>/dev/null; "
                  "done; done",
        "mount": f"awk -v m={mp} '$2 == m {{print $3}}' /proc/mounts; "
                 f"if timeout 5 stat -t {mp} >/dev/null 2>&1; then echo alive; else echo dead; fi",
        # entries this brick still has to heal, from its index (what `heal info` lists)
        "index": f"ls -f {shlex.quote(str(c.gluster.brick_dir))}/.glusterfs/indices/xattrop "
                 "2>/dev/null | grep -cv -e '^xattrop-' -e '^[.][.]*$'",
        # the name this node's Avahi holds (a local D-Bus call: instant)
        "mdns": "timeout 3 dbus-send --system --print-reply=literal "
                "--dest=org.freedesktop.Avahi / org.freedesktop.Avahi.Server.GetHostNameFqdn "
                "2>/dev/null; echo",
    }
    if c.vip.address:
        probes["vip"] = (f"ip -o -4 addr show to {shlex.quote(c.vip.address)}/32 | "
                         "awk '{print $2}'; "
                         f"if [ -e {KEEPALIVED_PID} ] && kill -0 \"$(cat {KEEPALIVED_PID})\" "
                         "2>/dev/null || pidof keepalived >/dev/null 2>&1; "
                         "then echo keepalived=running; else echo keepalived=stopped; fi")
    return probes


def cluster_probes(c: Cluster) -> dict[str, str]:
    """What one node is asked about the whole cluster (the swarm's and Gluster's view)."""
    vol = shlex.quote(c.gluster.volume)
    stack_filter = shlex.quote(f"label=com.docker.stack.namespace={c.name}")
    return {
        "nodes": NODES_PROBE,
        "services": f"timeout 10 docker service ls --filter {stack_filter} "
                    "--format '{{.Name}}\t{{.Replicas}}' 2>/dev/null",
        # services in the middle of an update (or whose last update failed)
        "updates": f"ids=$(timeout 10 docker service ls -q --filter {stack_filter}) && "
                   "[ -n \"$ids\" ] && timeout 10 docker service inspect --format "
                   "'{{.Spec.Name}}\t{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}' "
                   "$ids 2>/dev/null",
        "bricks": f"timeout 15 gluster --mode=script volume status {vol} --xml 2>/dev/null",
    }


def heal_probe(c: Cluster) -> str:
    """Entries each brick has to heal. Asked only when every brick is online: with one down,
    glfsheal waits ~10 s for it (the node probes' index count stands in then)."""
    vol = shlex.quote(c.gluster.volume)
    return f"timeout 30 gluster --mode=script volume heal {vol} info summary --xml 2>/dev/null"


def parse_swarm(text: str) -> tuple[str, bool]:
    """The SWARM_FORMAT line of `docker info` -> (local node state, is a manager);
    ('unknown', False) when Docker did not answer."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            return str(d.get("state") or "inactive"), bool(d.get("control"))
    return "unknown", False


@dataclass(frozen=True)
class SwarmNode:
    """The swarm's view of one node (`docker node inspect` on a manager)."""

    host: str
    state: str  # ready | down | unknown | disconnected
    addr: str
    availability: str  # active | pause | drain
    role: str  # manager | worker
    leader: bool = False
    reachability: str = ""  # reachable | unreachable | "" (worker)
    id: str = ""
    manager_addr: str = ""  # its raft address (ManagerStatus.Addr, "IP:2377"); "" (worker)

    @property
    def in_raft(self) -> bool:
        """A member of the managers' raft (listed with a ManagerStatus)."""
        return self.leader or bool(self.reachability)

    def describe(self) -> str:
        """'Leader Ready Active', 'Reachable Ready Active', 'Unreachable Down Active'."""
        if self.role == "manager":
            who = "Leader" if self.leader else (self.reachability.capitalize() or "Manager")
        else:
            who = "Worker"
        return f"{who} {self.state.capitalize()} {self.availability.capitalize()}"


def parse_node_inspect(text: str) -> list[SwarmNode]:
    """Lines of NODE_INSPECT_FORMAT -> the swarm's nodes."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        m = d.get("manager") or {}
        out.append(SwarmNode(host=d.get("host") or "", state=(d.get("state") or "").lower(),
                             addr=d.get("addr") or "",
                             availability=(d.get("availability") or "").lower(),
                             role=(d.get("role") or "").lower(), leader=bool(m.get("Leader")),
                             reachability=(m.get("Reachability") or "").lower(),
                             id=d.get("id") or "", manager_addr=m.get("Addr") or ""))
    return out


@dataclass(frozen=True)
class Brick:
    """One brick of the volume: online (volume status) and what it has left to heal."""

    address: str  # host part of ADDRESS:/path
    path: str
    online: bool | None = None  # None: not known (volume status failed)
    heal_pending: int | None = None  # entries still to heal; None: not known (brick down...)
    split_brain: int = 0
    heal_status: str = ""  # "Connected", "Transport endpoint is not connected", ...
    exact: bool = True  # heal_pending from `heal info`; False: from the brick's index
    port_lost: bool = False  # its process runs, but glusterd has no port for it (not serving)


def _xml_root(text: str) -> ET.Element | None:
    """gluster's XML output, or None when there is none (the node did not answer)."""
    try:
        return cli_xml(text)
    except GlusterOutputError:
        return None


def _int(text: str | None) -> int | None:
    try:
        return int((text or "").strip())
    except ValueError:
        return None


@dataclass(frozen=True)
class BrickProcess:
    """A brick's process as `gluster volume status` shows it."""

    running: bool  # glusterd counts it started ("Online Y")
    port: int | None  # the port it signed in with; None: "N/A"
    pid: int | None  # in its own node's PID namespace

    @property
    def serving(self) -> bool:
        """Clients can reach it: running, and glusterd knows its port."""
        return self.running and self.port is not None

    @property
    def port_lost(self) -> bool:
        """Running, but glusterd has no port for it (seen after a node's kill and boot): no
        client can reach it, and glusterd does not restart a brick it counts as running."""
        return self.running and self.port is None


def parse_brick_processes(text: str) -> dict[str, BrickProcess] | None:
    """`gluster volume status VOL --xml` -> {brick "ADDRESS:/path": its process}; None when the
    command failed (a brick of a peer that is down is simply absent from the output)."""
    root = _xml_root(text)
    if root is None or (root.findtext("opRet") or "0").strip() != "0":
        return None
    out = {}
    for n in root.iter("node"):
        host = (n.findtext("hostname") or "").strip()
        path = (n.findtext("path") or "").strip()
        if not path.startswith("/"):  # Self-heal Daemon, NFS server...: not a brick
            continue
        port = n.findtext("port")
        if port is None:
            port = n.findtext("ports/tcp")
        pid = _int(n.findtext("pid"))
        out[f"{host}:{path}"] = BrickProcess(running=(n.findtext("status") or "0").strip() == "1",
                                             port=_int(port) or None,
                                             pid=pid if pid and pid > 0 else None)
    return out


def parse_volume_status(text: str) -> dict[str, bool] | None:
    """`gluster volume status VOL --xml` -> {brick "ADDRESS:/path": serving}; None when the
    command failed."""
    procs = parse_brick_processes(text)
    return None if procs is None else {k: p.serving for k, p in procs.items()}


def parse_heal_summary(text: str) -> dict[str, tuple[str, int | None, int]] | None:
    """`gluster volume heal VOL info summary --xml` (or `info --xml`) ->
    {brick: (status, entries to heal or None, split-brain entries)}; None when it failed."""
    root = _xml_root(text)
    if root is None or (root.findtext("opRet") or "0").strip() != "0":
        return None
    out = {}
    for b in root.iter("brick"):
        name = (b.findtext("name") or "").strip()
        status = (b.findtext("status") or "").strip()
        total = b.findtext("totalNumberOfEntries")
        if total is None:
            total = b.findtext("numberOfEntries")
        pending = _int(total) if status == "Connected" else None
        out[name] = (status, pending, _int(b.findtext("numberOfEntriesInSplitBrain")) or 0)
    return out


def parse_possibly_healing(text: str) -> dict[str, tuple[int, int]] | None:
    """`gluster volume heal VOL info summary --xml` -> {connected brick: (entries in heal
    pending or split-brain, entries "possibly undergoing heal")}; None when it failed.

    "Possibly undergoing heal": heal info could not lock the file to look, because a heal or a
    writer holds it (a file written continuously through one descriptor stays in this state)."""
    root = _xml_root(text)
    if root is None or (root.findtext("opRet") or "0").strip() != "0":
        return None
    out = {}
    for b in root.iter("brick"):
        if (b.findtext("status") or "").strip() != "Connected":
            continue
        pending = _int(b.findtext("numberOfEntriesInHealPending"))
        split = _int(b.findtext("numberOfEntriesInSplitBrain"))
        possibly = _int(b.findtext("numberOfEntriesPossiblyHealing"))
        if pending is None or split is None or possibly is None:
            continue
        out[(b.findtext("name") or "").strip()] = (pending + split, possibly)
    return out


def bricks_from(c: Cluster, status_text: str | None, heal_text: str | None) -> list[Brick]:
    """The volume's bricks (one per node, cluster order) with what the two outputs say."""
    procs = parse_brick_processes(status_text) if status_text else None
    heal = parse_heal_summary(heal_text) if heal_text else None
    out = []
    for n in c.nodes:
        name = f"{n.address}:{c.gluster.brick_dir}"
        h = (heal or {}).get(name)
        p = (procs or {}).get(name)
        out.append(Brick(address=n.address, path=str(c.gluster.brick_dir),
                         online=None if procs is None else bool(p and p.serving),
                         port_lost=bool(p and p.port_lost),
                         heal_pending=h[1] if h else None,
                         split_brain=h[2] if h else 0, heal_status=h[0] if h else ""))
    return out


def parse_mount(text: str) -> str:
    """The mount probe -> 'ok', 'dead' (mounted, not answering), 'not mounted', or
    'wrong type (X)'."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    alive = bool(lines) and lines[-1] == "alive"
    types = [x for x in lines[:-1] if x not in ("alive", "dead")]
    if not types:
        return "not mounted"
    if not any(t.startswith("fuse.glusterfs") or t == "glusterfs" for t in types):
        return f"wrong type ({types[-1]})"
    return "ok" if alive else "dead"


def parse_index(text: str) -> int | None:
    """The index probe -> entries the brick still has to heal (its last line); None when the
    probe printed nothing."""
    return _int(text.strip().splitlines()[-1]) if text.strip() else None


def parse_services(text: str, stack: str) -> dict[str, str]:
    """`docker service ls --format '{{.Name}}\\t{{.Replicas}}'` -> {short name: '1/1'}."""
    out = {}
    for line in text.splitlines():
        name, sep, replicas = line.strip().partition("\t")
        if sep and name.startswith(f"{stack}_"):
            out[name[len(stack) + 1:]] = replicas.split(" ")[0]
    return out


def parse_updates(text: str, stack: str) -> dict[str, str]:
    """`docker service inspect --format '{{.Spec.Name}}\\t{{.UpdateStatus.State}}'` ->
    {short name: state} for services whose update is under way, paused or rolled back
    (a completed update, or none, is left out)."""
    out = {}
    for line in text.splitlines():
        name, sep, state = line.strip().partition("\t")
        if sep and name.startswith(f"{stack}_") and state and state != "completed":
            out[name[len(stack) + 1:]] = state
    return out
