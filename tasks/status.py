"""`doit status`: the whole cluster in one table, read-only, and fast with a node down.

What a user runs first when something looks wrong. For every node at once (one SSH round trip
each, `ssh.connect_timeout` for one that does not answer): its swarm membership, the stack's
containers on it (with health), the Galera state of its db container (`galera-status`: state,
component, size, seqno), whether the Gluster mount answers, whether it holds the VIP and which
mDNS name its Avahi holds. Then, from one node that answers: the swarm's view of every node
(`docker node inspect`: Ready/Down, availability, manager reachability), the volume's bricks
(`gluster volume status --xml`) and the entries each brick still has to heal (`gluster volume
heal VOL info summary --xml`), the services' replica counts. From this computer: does Home
Assistant answer HTTP, does Mosquitto answer MQTT (CONNACK), on which node (and on the VIP);
and, with haswarm's Home Assistant token (tasks/onboard.py), the state of HA's MQTT integration
and whether a message sent to the broker reaches HA (an entry "loaded" alone is no proof: HA
keeps it loaded while its client reconnects).

Unreachable nodes appear as such, with what the others say about them. `problems()` lists every
deviation from a healthy, converged cluster (the drill waits for it to be empty); the task prints
them under the table and fails only with `--check`.

The probes and their pure parsers are facts (tasks/facts_cluster.py); the problem list and
the table are pure too; all are unit-tested with recorded output.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from tasks.config import Cluster, Node
from tasks.facts import GaleraMember, parse_galera, parse_sections, probe_script
from tasks.mqtt_probe import mqtt_connack

# The probes and parsers (tasks/facts_cluster.py) are imported where a status is read: loading
# the doit tasks does not need them.
if TYPE_CHECKING:
    from tasks.facts_cluster import Brick, SwarmNode
    from tasks.remote import Remote
    from tasks.stack_facts import Container

# Seconds one node may take for its whole probe script once connected; each command inside is
# bounded further by `timeout` (a dead FUSE mount, a hung glusterd or dockerd).
NODE_TIMEOUT = 25.0
HA = "homeassistant"
MQTT = "mosquitto"


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class NodeStatus:
    """Everything known about one node."""

    name: str
    address: str
    reachable: bool = False
    error: str = ""  # why it is unreachable (short)
    swarm_state: str = ""  # docker info: active | inactive | pending | error | locked
    manager: bool = False  # docker info: ControlAvailable
    swarm: SwarmNode | None = None  # the swarm's view (docker node inspect on a manager)
    containers: list[Container] = field(default_factory=list)
    galera: list[GaleraMember] = field(default_factory=list)
    mount: str = ""  # ok | dead | not mounted | wrong type (X) | "" (unknown)
    brick: Brick | None = None
    index: int | None = None  # entries in the brick's heal index (node probe)
    mdns: str = ""  # the mDNS name this node's Avahi holds (e.g. hacluster.local)
    vip: bool | None = None  # holds the VIP (None: no VIP configured / unknown)
    keepalived: bool | None = None
    http: int | None = None  # HTTP status of Home Assistant's port from here (None: no answer)
    mqtt: int | None = None  # MQTT CONNACK return code from here (None: no answer)

    def running(self, service: str) -> list[Container]:
        """The running containers of `service` on this node."""
        return [ct for ct in self.containers if ct.service == service and ct.state == "running"]


@dataclass
class ClusterStatus:
    """The cluster as `doit status` shows it."""

    cluster: Cluster
    nodes: list[NodeStatus]
    observer: str | None = None  # the node the swarm and Gluster views came from
    services: dict[str, str] = field(default_factory=dict)  # short name -> '1/1'
    updating: dict[str, str] = field(default_factory=dict)  # short name -> update state
    gluster_known: bool = False  # volume status / heal info answered
    vip_mqtt: int | None = None  # CONNACK return code through the VIP (None: no answer)
    # Home Assistant's MQTT integration (its config entry's state, "loaded" when it runs;
    # "absent", "token refused"); None: not asked (HA answers nowhere) or no token here.
    ha_mqtt: str | None = None
    # Seconds a message sent to the broker took to reach HA (math.inf: none within the probe's
    # 3 s); None: not tried (the entry is not loaded, no broker answers, no token).
    ha_mqtt_delivery: float | None = None
    seconds: float = 0.0

    def node(self, name: str) -> NodeStatus:
        """The status of node `name`."""
        return next(n for n in self.nodes if n.name == name)

    def where(self, service: str) -> list[str]:
        """Nodes running a container of `service`."""
        return [n.name for n in self.nodes if n.running(service)]

    def _active(self, service: str, standby: bool, answers: list[str]) -> list[str]:
        """Nodes where `service` itself runs. With standby, every node has a container and only
        the lock holder runs the program; host publishing makes it the only one that answers."""
        return [n for n in answers if n in self.where(service)] if standby \
            else self.where(service)

    def ha_nodes(self) -> list[str]:
        """Nodes where Home Assistant itself runs (not where a standby waits)."""
        return self._active(HA, self.cluster.ha_standby, self.ha_answers())

    def ha_standbys(self) -> list[str]:
        """Nodes with a Home Assistant container that waits (standby), not running HA."""
        return [n for n in self.where(HA) if n not in self.ha_nodes()]

    def mqtt_nodes(self) -> list[str]:
        """Nodes where the broker itself runs (not where a standby waits)."""
        return self._active(MQTT, self.cluster.mqtt_standby, self.mqtt_answers())

    def mqtt_standbys(self) -> list[str]:
        """Nodes with a Mosquitto container that waits (standby), not running the broker."""
        return [n for n in self.where(MQTT) if n not in self.mqtt_nodes()]

    def runs(self, node: str) -> set[str]:
        """The services that really run on `node`: a waiting (standby) container is not HA's or
        Mosquitto's."""
        active = {HA: self.ha_nodes(), MQTT: self.mqtt_nodes()}
        return {ct.service for ct in self.node(node).containers
                if ct.service not in active or node in active[ct.service]}

    def ha_answers(self) -> list[str]:
        """Nodes where Home Assistant answers HTTP (below 500) from here."""
        return [n.name for n in self.nodes if n.http is not None and n.http < 500]

    def mqtt_answers(self) -> list[str]:
        """Nodes where a broker sends CONNACK from here."""
        return [n.name for n in self.nodes if n.mqtt is not None]

    def galera_members(self) -> list[GaleraMember]:
        """The running `db` members (the seed excluded) on every node that answered."""
        return [m for n in self.nodes for m in n.galera if m.service == "db"]

    def problems(self) -> list[str]:
        """Every way the cluster differs from healthy and converged; [] when it is."""
        c = self.cluster
        out: list[str] = []
        count = len(self.nodes)
        for n in self.nodes:
            if not n.reachable:
                out.append(f"{n.name} does not answer over SSH ({n.error or 'unreachable'})")
            elif n.swarm_state != "active":
                out.append(f"{n.name}: not in a swarm (docker info: {n.swarm_state or '?'})")
            if n.swarm is None and self.observer:
                out.append(f"{n.name}: unknown to the swarm (seen from {self.observer})")
            elif n.swarm is not None:
                if n.swarm.state != "ready":
                    out.append(f"{n.name}: swarm node {n.swarm.state}")
                if n.swarm.availability != "active":
                    out.append(f"{n.name}: swarm availability {n.swarm.availability}")
                if n.swarm.role == "manager" and not n.swarm.leader \
                        and n.swarm.reachability != "reachable":
                    out.append(f"{n.name}: manager {n.swarm.reachability or 'not reachable'}")
            if n.reachable and n.mount != "ok":
                out.append(f"{n.name}: Gluster mount {c.gluster.mount_point} {n.mount or '?'}")
            if n.brick is not None and self.gluster_known:
                if n.brick.port_lost:
                    out.append(f"{n.name}: brick {n.brick.address}:{n.brick.path} runs but "
                               "glusterd has no port for it, so no client reaches it "
                               "(`doit setup` restarts it)")
                elif n.brick.online is False:
                    out.append(f"{n.name}: brick {n.brick.address}:{n.brick.path} offline")
                if n.brick.heal_pending:
                    out.append(f"{n.name}: brick has {n.brick.heal_pending} entries to heal")
                if n.brick.split_brain:
                    out.append(f"{n.name}: brick has {n.brick.split_brain} entries in "
                               "SPLIT-BRAIN (manual repair: gluster volume heal ... split-brain)")
            if n.reachable:
                for ct in n.containers:
                    if ct.health == "unhealthy":
                        out.append(f"{n.name}: {ct.service} container {ct.id} unhealthy")
                dbs = n.running("db")
                if not dbs:
                    out.append(f"{n.name}: no db container running")
                for m in n.galera:
                    if m.service == "db" and (not m.synced or m.cluster_size != count):
                        out.append(f"{n.name}: Galera {m.state()} (want Synced/Primary, "
                                   f"size {count})")
                if c.vip.address and n.keepalived is False:
                    out.append(f"{n.name}: keepalived is not running (the VIP cannot move here)")
        if not self.observer:
            out.append("no node answers as a swarm manager: the swarm's view is unknown")
        elif not self.gluster_known:
            out.append(f"Gluster volume {c.gluster.volume}: status or heal info did not answer")
        for service, where in ((HA, self.ha_nodes()), (MQTT, self.mqtt_nodes())):
            if len(where) > 1 or (len(where) == 0 and service == MQTT):
                out.append(f"{service}: runs on {len(where)} nodes "
                           f"({', '.join(where) or 'none'}), want 1")
        if HA not in self.services and not self.where(HA):
            out.append(f"{HA}: no container runs, want "
                       f"{len(c.nodes) if c.ha_standby else 1}")
        for name, state in sorted(self.updating.items()):
            out.append(f"{name}: service update {state.replace('_', ' ')}")
        for name, replicas in sorted(self.services.items()):
            have, _, want = replicas.partition("/")
            if have != want:
                out.append(f"{name}: {replicas} tasks running")
        seeds = self.where("db-seed")
        if seeds:
            out.append(f"db-seed runs on {', '.join(seeds)} (a bootstrap did not finish)")
        if not self.ha_answers():
            out.append(f"Home Assistant answers HTTP on no node (port {c.homeassistant.port})")
        if self.ha_mqtt not in (None, "loaded", "token refused"):
            out.append(f"Home Assistant's MQTT integration is {self.ha_mqtt}, want loaded"
                       + (" (`doit ha-onboard` adds it)" if self.ha_mqtt == "absent" else ""))
        if not self.mqtt_answers():
            out.append(f"Mosquitto answers MQTT on no node (port {c.mqtt.port})")
        if c.vip.address:
            holders = [n.name for n in self.nodes if n.vip]
            if len(holders) != 1:
                out.append(f"VIP {c.vip.address} held by {len(holders)} nodes "
                           f"({', '.join(holders) or 'none'}), want 1")
            if self.vip_mqtt is None:
                out.append(f"VIP {c.vip.address}: no MQTT answer on port {c.mqtt.port}")
        return out


# ---------------------------------------------------------------------------------------------
# Reading it


def probe_login(c: Cluster) -> tuple[str | None, str | None]:
    """The MQTT login the probes use: the stack healthcheck's user when its secret exists here
    (a CONNACK 0 then proves authentication works), else anonymous (CONNACK 5 still proves a
    broker answers)."""
    from tasks import secrets

    user = secrets.HEALTHCHECK_MQTT_USER
    try:
        return user, secrets.read(c, f"mqtt_{user}")
    except OSError:
        return None, None


def _short_error(e: Exception) -> str:
    from tasks.remote import RemoteError

    if isinstance(e, RemoteError) and e.failures:
        f = e.failures[0]
        return f.detail or f.kind
    return f"{type(e).__name__}: {e}"


def read_node(r: Remote, c: Cluster, node: Node, st: NodeStatus) -> None:
    """Fill `st` from one round trip to `node`; unreachable nodes keep reachable=False."""
    from tasks.facts_cluster import node_probes, parse_index, parse_mount, parse_swarm
    from tasks.remote import RemoteError
    from tasks.stack_facts import parse_containers

    try:
        res = r.run(node, "status", probe_script(node_probes(c, node)), check=False,
                    timeout=NODE_TIMEOUT)
    except RemoteError as e:
        st.error = _short_error(e)
        return
    st.reachable = True
    sec = parse_sections(res.stdout)
    st.swarm_state, st.manager = parse_swarm(sec.get("swarm", ""))
    st.containers = parse_containers(node.name, sec.get("containers", ""), c.name)
    ids = {ct.id: ct.service for ct in st.containers}
    st.galera = parse_galera(sec.get("galera", ""), ids)
    st.mount = parse_mount(sec.get("mount", ""))
    st.index = parse_index(sec.get("index", ""))
    st.mdns = sec.get("mdns", "").strip().splitlines()[0] if sec.get("mdns", "").strip() else ""
    if "vip" in sec:
        lines = [x.strip() for x in sec["vip"].splitlines() if x.strip()]
        st.keepalived = "keepalived=running" in lines
        st.vip = any(x and not x.startswith("keepalived=") for x in lines)


class _ClusterView:
    """The swarm's and Gluster's views, read from the first node that has them (tried as soon
    as its own node probe has answered: a dead node never delays it)."""

    def __init__(self, r: Remote, c: Cluster, status: ClusterStatus) -> None:
        self.r, self.c, self.status = r, c, status
        self.swarm_done = self.gluster_done = False

    @property
    def done(self) -> bool:
        """Both views read."""
        return self.swarm_done and self.gluster_done

    def ask(self, st: NodeStatus) -> None:
        """Read what is still missing from node `st` (reachable)."""
        from tasks.facts_cluster import (
            bricks_from,
            cluster_probes,
            heal_probe,
            parse_node_inspect,
            parse_services,
            parse_updates,
            parse_volume_status,
        )
        from tasks.remote import RemoteError

        c, status = self.c, self.status
        try:
            res = self.r.run(st.name, "status: cluster view", probe_script(cluster_probes(c)),
                             check=False, timeout=NODE_TIMEOUT)
        except RemoteError:  # it answered a moment ago; the next one will be asked
            return
        sec = parse_sections(res.stdout)
        if not self.swarm_done:
            nodes = parse_node_inspect(sec.get("nodes", ""))
            if nodes:
                self.swarm_done = True
                status.observer = st.name
                by_addr = {n.address: n for n in status.nodes}
                by_name = {n.name: n for n in status.nodes}
                for sn in nodes:
                    target = by_addr.get(sn.addr) or by_name.get(sn.host)
                    # a re-joined node may be listed twice (old entry Down): keep the best
                    if target is not None and (target.swarm is None
                                               or target.swarm.state != "ready"):
                        target.swarm = sn
                status.services = parse_services(sec.get("services", ""), c.name)
                status.updating = parse_updates(sec.get("updates", ""), c.name)
        if not self.gluster_done:
            status_text = sec.get("bricks", "")
            online = parse_volume_status(status_text)
            if online is None:
                return
            self.gluster_done = status.gluster_known = True
            heal_text = None
            if len(online) == len(c.nodes) and all(online.values()):
                try:
                    heal_text = self.r.run(st.name, "status: heal info", heal_probe(c),
                                           check=False, timeout=40).stdout
                except RemoteError:
                    heal_text = None
            for n, b in zip(status.nodes, bricks_from(c, status_text, heal_text), strict=True):
                n.brick = b


def _index_fallback(status: ClusterStatus) -> None:
    """Bricks without a `heal info` count take their node's index count (marked inexact)."""
    for n in status.nodes:
        if n.brick is not None and n.brick.heal_pending is None and n.index is not None \
                and n.reachable:
            n.brick = replace(n.brick, heal_pending=n.index, exact=False)


def gather(c: Cluster, r: Remote | None = None) -> ClusterStatus:
    """Read the whole status (SSH to every node at once, HTTP/MQTT probes from here)."""
    from tasks.onboard import mqtt_delivery, mqtt_state
    from tasks.remote import Remote
    from tasks.stack_observe import http_answer

    started = time.monotonic()
    status = ClusterStatus(cluster=c, nodes=[NodeStatus(n.name, n.address) for n in c.nodes])
    own = r is None
    remote = Remote(c) if r is None else r
    try:
        with ThreadPoolExecutor(max_workers=3 * len(c.nodes) + 2) as pool:
            http = {n.name: pool.submit(http_answer, n.address, c.homeassistant.port, 2.0)
                    for n in c.nodes}
            user, password = probe_login(c)
            mqtt = {n.name: pool.submit(mqtt_connack, n.address, c.mqtt.port, 1.5, user,
                                        password) for n in c.nodes}
            vip = pool.submit(mqtt_connack, c.vip.address, c.mqtt.port, 1.5, user, password) \
                if c.vip.address else None
            view = _ClusterView(remote, c, status)
            reads = {pool.submit(read_node, remote, c, n, status.node(n.name)): n.name
                     for n in c.nodes}
            for fut in as_completed(reads):
                fut.result()
                st = status.node(reads[fut])
                if st.reachable and not view.done:
                    view.ask(st)
            _index_fallback(status)
            for st in status.nodes:
                st.http = http[st.name].result()
                st.mqtt = mqtt[st.name].result()
            status.vip_mqtt = vip.result() if vip is not None else None
        if answers := status.ha_answers():
            ha = status.node(answers[0])
            status.ha_mqtt = mqtt_state(c, ha.name, ha.address)
            brokers = ([c.vip.address] if status.vip_mqtt is not None else []) + [
                status.node(n).address for n in status.mqtt_answers()]
            if status.ha_mqtt == "loaded" and brokers and brokers[0]:
                status.ha_mqtt_delivery = mqtt_delivery(c, ha.name, ha.address, brokers[0])
    finally:
        if own:
            remote.close()
    status.seconds = time.monotonic() - started
    return status


def wait_converged(c: Cluster, timeout: float, interval: float = 2.0,
                   log: Callable[[str], None] | None = None,
                   also: Callable[[ClusterStatus], list[str]] | None = None) -> ClusterStatus:
    """Read the status until it shows no problem (nor any from `also`); TimeoutError naming
    what is left after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: list[str] = []
    while True:
        st = gather(c)
        left = st.problems() + (also(st) if also else [])
        if not left:
            return st
        if log and left != last:
            log("waiting: " + "; ".join(left))
        last = left
        if time.monotonic() > deadline:
            raise TimeoutError(f"not converged after {timeout:g} s:\n  - " + "\n  - ".join(left))
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Showing it (pure)


def _services_cell(n: NodeStatus) -> str:
    if not n.reachable:
        return "?"
    parts = []
    for ct in sorted(n.containers, key=lambda x: x.service):
        note = ct.health if ct.health else ct.state
        parts.append(f"{ct.service}({note})")
    return " ".join(parts) or "-"


def _galera_cell(n: NodeStatus) -> str:
    from tasks.facts_cluster import DB_SERVICES

    if not n.reachable:
        return "?"
    ms = [m for m in n.galera if m.service in DB_SERVICES]
    if not ms:
        return "-"
    return "; ".join(("seed " if m.service == "db-seed" else "") + m.state() for m in ms)


def _answers_cell(st: ClusterStatus, n: NodeStatus) -> str:
    parts = []
    if n.http is not None:
        parts.append(f"HTTP {n.http}")
    if n.mqtt is not None:
        parts.append("MQTT" + ("" if n.mqtt in (0, 4, 5) else f" rc {n.mqtt}"))
    if n.vip:
        parts.append("VIP")
    if n.mdns:
        parts.append(f"mDNS {n.mdns}")
    return ", ".join(parts) or "-"


def table(st: ClusterStatus) -> str:
    """The status as one table, then a summary and the problems."""
    head = ["NODE", "ADDRESS", "SSH", "SWARM", "BRICK", "HEAL", "MOUNT", "GALERA", "SEQNO",
            "CONTAINERS", "ANSWERS"]
    rows = []
    for n in st.nodes:
        swarm = n.swarm.describe() if n.swarm else (
            ("manager " if n.manager else "") + n.swarm_state if n.reachable else "?")
        brick = "?" if n.brick is None or n.brick.online is None else (
            "up" if n.brick.online else "DOWN")
        heal = "?" if n.brick is None or n.brick.heal_pending is None else (
            ("" if n.brick.exact else "~") + str(n.brick.heal_pending)
            + (f" SB {n.brick.split_brain}" if n.brick.split_brain else ""))
        seqnos = [str(m.seqno) for m in n.galera if m.service == "db" and m.seqno is not None]
        seqno = ",".join(seqnos) if seqnos else ("-" if n.reachable else "?")
        rows.append([n.name, n.address, "ok" if n.reachable else "DOWN", swarm, brick, heal,
                     n.mount if n.reachable else "?", _galera_cell(n), seqno or "-",
                     _services_cell(n), _answers_cell(st, n)])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in [head, *rows]]
    for n in st.nodes:
        if not n.reachable:
            lines.append(f"  {n.name}: {n.error or 'unreachable'}")
    lines.append("")
    lines += summary(st)
    problems = st.problems()
    if problems:
        lines.append(f"problems ({len(problems)}):")
        lines += [f"  - {p}" for p in problems]
    else:
        lines.append("problems: none: every node up, volume healed, Galera Synced, services "
                     "running")
    lines.append(f"(read in {st.seconds:.1f} s"
                 + (f"; swarm and Gluster as seen from {st.observer})" if st.observer else ")"))
    return "\n".join(lines)


def _ha_mqtt_line(st: ClusterStatus) -> str:
    """Home Assistant's MQTT integration: its entry's state, and whether a message sent to the
    broker reached HA."""
    from tasks.secrets import token_path

    if st.ha_mqtt is None:
        return ("Home Assistant's MQTT integration: unknown (no Home Assistant token in "
                f"{token_path(st.cluster)})")
    line = f"Home Assistant's MQTT integration: {st.ha_mqtt}"
    if st.ha_mqtt_delivery == math.inf:
        line += "; a message sent to the broker did NOT reach it within 3 s"
    elif st.ha_mqtt_delivery is not None:
        line += f"; a message sent to the broker reached it in {st.ha_mqtt_delivery:.1f} s"
    return line


def summary(st: ClusterStatus) -> list[str]:
    """A few lines: where Home Assistant and Mosquitto answer, VIP, mDNS, Gluster, Galera."""
    c = st.cluster
    by = {n.name: n for n in st.nodes}
    out = []
    ha = st.ha_answers()
    standby = st.ha_standbys()
    out.append(f"Home Assistant: runs on {', '.join(st.ha_nodes()) or 'no node'}"
               + (f" (standby on {', '.join(standby)})" if standby else "") + "; answers "
               + (", ".join(f"HTTP {by[x].http} at {by[x].address}:{c.homeassistant.port}"
                            for x in ha) if ha else "nowhere")
               + (f" (replicas {st.services[HA]})" if HA in st.services else ""))
    if st.ha_answers():
        out.append(_ha_mqtt_line(st))
    mq = st.mqtt_answers()
    standby = st.mqtt_standbys()
    out.append(f"Mosquitto: runs on {', '.join(st.mqtt_nodes()) or 'no node'}"
               + (f" (standby on {', '.join(standby)})" if standby else "") + "; answers at "
               + (", ".join(f"{by[x].address}:{c.mqtt.port}" for x in mq) if mq else "nowhere"))
    if c.vip.address:
        holders = [n.name for n in st.nodes if n.vip]
        out.append(f"VIP {c.vip.address}: held by {', '.join(holders) or 'no node'}; MQTT "
                   + ("answers" if st.vip_mqtt is not None else "does NOT answer"))
    names = [f"{n.name}={n.mdns}" for n in st.nodes if n.mdns]
    if names:
        holder = [n.name for n in st.nodes if n.mdns == f"{c.mdns.name}.local"]
        out.append(f"mDNS {c.mdns.name}.local: held by {', '.join(holder) or 'no node'}")
    if st.gluster_known:
        online = sum(1 for n in st.nodes if n.brick and n.brick.online)
        pending = sum(n.brick.heal_pending or 0 for n in st.nodes if n.brick)
        out.append(f"Gluster {c.gluster.volume}: {online}/{len(st.nodes)} bricks online, "
                   f"{pending} entries to heal")
    ms = st.galera_members()
    if ms:
        synced = [m for m in ms if m.synced]
        sizes = sorted({m.cluster_size for m in ms})
        out.append(f"Galera: {len(synced)}/{len(st.nodes)} Synced, cluster size "
                   f"{'/'.join(map(str, sizes))}")
    if st.services:
        out.append("services: " + ", ".join(f"{k} {v}" for k, v in sorted(st.services.items())))
    return out


# ---------------------------------------------------------------------------------------------
# doit


def show(c: Cluster, check: bool = False) -> Any:
    """The status task's action: print the table; with `check`, fail when there are problems."""
    from doit.exceptions import TaskFailed

    from tasks.remote import RemoteError
    from tasks.secrets import secret_values

    try:
        st = gather(c)
    except RemoteError as e:  # only for a failure of the whole read, not one node
        return TaskFailed(f"status:\n{e}")
    text = table(st)
    from tasks.remote import redact

    print(redact(text, secret_values(c)), flush=True)
    if check and st.problems():
        return TaskFailed(f"status: {len(st.problems())} problems (see above)")
    return None


def task_status() -> dict[str, Any]:
    """Show every node at a glance: swarm, Gluster, Galera, services, answers (read-only)."""
    from tasks.config import current

    c = current()

    def action(check: bool = False) -> Any:
        return show(c, check=check)

    return {
        "actions": [action],
        "params": [{"name": "check", "long": "check", "type": bool, "default": False,
                    "help": "fail (exit 1) when the cluster has a problem"}],
        "uptodate": [False],
        "verbosity": 2,
    }
