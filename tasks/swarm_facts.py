"""The Docker swarm's facts: each node's `docker info` (`SwarmFacts`) and the swarm's node list
(`read_members`), read for tasks/swarm.py and tasks/depart.py; the parsers are pure."""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tasks.config import Node
from tasks.remote import Failure, Remote, RemoteError

if TYPE_CHECKING:
    from tasks.facts_cluster import SwarmNode

SWARM_PORT = 2377
INFO_CMD = "docker info --format '{{json .Swarm}}'"


# ---------------------------------------------------------------------------------------------
# Facts


@dataclass(frozen=True)
class SwarmFacts:
    """One node's view of its swarm membership (`docker info` .Swarm)."""

    state: str  # inactive | pending | active | error | locked
    node_id: str = ""
    node_addr: str = ""
    manager: bool = False  # ControlAvailable: this node is a manager
    cluster_id: str = ""  # only managers know it
    managers: tuple[str, ...] = ()  # manager addresses (host part of RemoteManagers)
    heartbeat_ns: int | None = None  # only managers know it
    error: str = ""

    @property
    def active(self) -> bool:
        """The node is a working member of a swarm."""
        return self.state == "active"


def parse_swarm_info(text: str) -> SwarmFacts:
    """Parse `docker info --format '{{json .Swarm}}'`."""
    data = json.loads(text.strip() or "{}")
    cluster = data.get("Cluster") or {}
    spec = cluster.get("Spec") or {}
    heartbeat = (spec.get("Dispatcher") or {}).get("HeartbeatPeriod")
    managers = tuple(host_part(m.get("Addr", "")) for m in data.get("RemoteManagers") or [])
    return SwarmFacts(
        state=str(data.get("LocalNodeState") or "inactive"),
        node_id=str(data.get("NodeID") or ""),
        node_addr=str(data.get("NodeAddr") or ""),
        manager=bool(data.get("ControlAvailable")),
        cluster_id=str(cluster.get("ID") or ""),
        managers=tuple(sorted(m for m in managers if m)),
        heartbeat_ns=int(heartbeat) if heartbeat is not None else None,
        error=str(data.get("Error") or ""),
    )


def host_part(addr: str) -> str:
    """'10.0.0.1:2377' -> '10.0.0.1'; '[fe80::1]:2377' -> 'fe80::1'."""
    if addr.startswith("["):
        return addr[1:].split("]", 1)[0]
    return addr.rsplit(":", 1)[0] if addr.count(":") == 1 else addr


def advertise_address(node: Node) -> str:
    """The IP address the node advertises to the swarm: its address in the cluster file, a
    host name resolved here (the controller reaches the node at that address)."""
    try:
        return str(ipaddress.ip_address(node.address))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(node.address, SWARM_PORT, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"{node.name}: cannot resolve {node.address!r} ({e}): put the Pi's IP "
                         "address in the cluster file") from None
    return str(infos[0][4][0])


def read_facts(r: Remote, nodes: Sequence[Node] | None = None) -> dict[str, SwarmFacts]:
    """`docker info` on every node (in parallel); RemoteError naming each node that failed."""
    res = r.run_all("swarm: read state", INFO_CMD, nodes)
    return {name: parse_swarm_info(out.stdout) for name, out in res.items()}


def read_facts_reachable(r: Remote, nodes: Sequence[Node] | None = None
                         ) -> tuple[dict[str, SwarmFacts], list[Failure]]:
    """Like `read_facts`, but unreachable nodes are returned as failures instead of raised."""

    def one(n: Node) -> SwarmFacts | Failure:
        try:
            return parse_swarm_info(r.run(n, "swarm: read state", INFO_CMD).stdout)
        except RemoteError as e:
            return e.failures[0]

    got = r.on_all("swarm: read state", one, nodes)
    retry = [k for k, v in got.items() if isinstance(v, Failure)]
    if retry:  # once more: a busy node may just have been slow to answer
        time.sleep(2)
        got |= r.on_all("swarm: read state", one, retry)
    facts = {k: v for k, v in got.items() if isinstance(v, SwarmFacts)}
    failures = [v for v in got.values() if isinstance(v, Failure)]
    return facts, failures


def read_members(r: Remote, manager: str) -> list[SwarmNode]:
    """The swarm's node list as `manager` sees it (`docker node inspect` of every node); []
    when it cannot tell (a swarm without a leader: the changes that follow fail, saying so)."""
    from tasks.facts_cluster import NODES_PROBE, parse_node_inspect  # not at `doit list`

    return parse_node_inspect(r.run(manager, "swarm: read the node list", NODES_PROBE,
                                    check=False).stdout)
