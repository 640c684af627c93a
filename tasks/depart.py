"""Nodes taken out of the cluster file: drained and cleaned while they still answer (`depart`).

A node leaves the cluster when `nodes:` no longer lists it (the cluster shrinks, or a Pi is
replaced by another one). The other steps only ever act on the nodes listed, so this step runs
first, before the firewall shuts the leaving node out. It finds the leavers in what the cluster
itself remembers, the swarm's node list and the Gluster pool (read on a listed node), and for
each one that still answers over SSH, one node at a time:

    drain       `docker node update --availability drain` (from a manager), then wait until no
                container of the stack runs on it: Home Assistant, its db task (a clean Galera
                leave) and Mosquitto start on the nodes that stay
    unmount     the volume unmounted there, haswarm's fstab line removed (as `doit clean`)
    brick       its brick removed, `remove-brick ... replica R-1 force` (every other node holds
                a full copy), while it is still connected; the files stay in its brick dir
    detach      `gluster peer detach` from a node that stays
    clean       the per-node part of `doit clean` there: avahi, the node list, leader guard,
                VIP, firewall
    leave       demoted (a manager), `docker swarm leave` on it, its entry removed

Its data (brick dir, database volume, images) stays on it, as `doit clean` without purge leaves
it. A leaver that does not answer is dead or switched off: the steps after this one take it out
as a dead Pi (gluster:volume removes or moves its brick, swarm removes its entry).

Facts first (one manager's node list and peer status); a cluster without leavers costs those
two reads and says "nothing to do".
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tasks.config import Cluster, Node
from tasks.gluster_facts import GLUSTER, GLUSTER_CHANGE_TIMEOUT, GlusterOutputError
from tasks.ops import Op, apply_ops, remote_task, say

if TYPE_CHECKING:
    from tasks.facts_cluster import SwarmNode
    from tasks.gluster_facts import Peer, Volume
    from tasks.remote import Remote

STEP = "depart"
DRAIN_WAIT = 180.0  # s for the stack's containers to stop on a drained node (HA, a Galera leave)
LEAVE_WAIT = 60.0  # s for a node that left the swarm to show Down
DEMOTE_WAIT = 30.0  # s for a demoted manager to leave the raft


@dataclass(frozen=True)
class Leaver:
    """A node the cluster remembers (swarm entry, pool peer) that the cluster file dropped."""

    node: Node
    entry: SwarmNode | None = None  # its swarm entry
    peer: str = ""  # its name in the Gluster pool ("" when not in it)
    brick: str = ""  # its brick of the volume ("" when it holds none)


def leavers(c: Cluster, members: list[SwarmNode], peers: list[Peer], vol: Volume | None
            ) -> list[Leaver]:
    """The swarm entries and pool peers that are no node of `c` (by address or name), one
    Leaver per address, in the order the swarm lists them (pure)."""
    from tasks.gluster_plans import departed_peers
    from tasks.swarm import departed_entries
    from tasks.swarm_facts import advertise_address

    def node(name: str, address: str) -> Node:  # as the cluster knew it: not validated again
        return Node.model_construct(name=name or address, address=address)

    addresses = {n.name: advertise_address(n) for n in c.nodes}
    out: dict[str, Leaver] = {}
    for e in departed_entries(c, addresses, members):
        if e.addr and e.addr != "0.0.0.0":
            out[e.addr] = Leaver(node(e.host, e.addr), entry=e)
    for p in departed_peers(c, peers, set()):
        address = p.names[0]  # as probed: the node's address
        got = out.get(address) or Leaver(node(next(iter(p.names[1:]), address), address))
        out[address] = Leaver(got.node, got.entry, peer=address)
    bricks = vol.bricks if vol is not None else ()
    return [Leaver(x.node, x.entry, x.peer,
                   next((b for b in bricks if b.rsplit(":", 1)[0] == a), ""))
            for a, x in out.items()]


def plan_drain(c: Cluster, x: Leaver, via: str) -> list[Op]:
    """Drain it (when not yet) and wait until none of the stack's containers runs on it."""
    if x.entry is None or x.entry.state != "ready":
        return []
    ops = []
    if x.entry.availability != "drain":
        ops.append(Op(f"drain {x.node.name} in the swarm (its tasks start on the nodes that "
                      "stay)", node=via,
                      cmd=f"docker node update --availability drain {shlex.quote(x.entry.id)}"))
    label = shlex.quote(f"label=com.docker.stack.namespace={c.name}")
    ops.append(Op(f"wait until no container of stack {c.name} runs on {x.node.name} (at most "
                  f"{DRAIN_WAIT:g} s)", node=x.node,
                  cmd=f'[ -z "$(docker ps -q --filter {label})" ]', wait=DRAIN_WAIT,
                  hint="`docker ps` on the node shows what still runs; `docker node ps` on a "
                       "manager why"))
    return ops


def plan_pool(c: Cluster, x: Leaver, replica: int, via: str) -> list[Op]:
    """Its brick removed (the replica count one down) and the node detached, seen from `via`."""
    from tasks.gluster_plans import shrink_ops

    ops = [Op(o.what, o.cmd, node=via, timeout=o.timeout, hint=o.hint)
           for o in shrink_ops(c, replica, [x.brick])] if x.brick else []
    if x.peer:
        ops.append(Op(f"detach {x.peer} from the Gluster pool", node=via,
                      cmd=f"{GLUSTER} peer detach {shlex.quote(x.peer)}",
                      timeout=GLUSTER_CHANGE_TIMEOUT,
                      hint="a peer that still holds a brick of another volume cannot be "
                           "detached: `gluster volume info` on the node"))
    return ops


def plan_leave(x: Leaver, via: str) -> list[Op]:
    """Out of the swarm: demoted (a manager), `docker swarm leave` on it, its entry removed."""
    if x.entry is None:
        return []
    ident = shlex.quote(x.entry.id)
    ops = []
    if x.entry.role == "manager" or x.entry.in_raft:
        ops += [Op(f"demote {x.node.name}", node=via, cmd=f"docker node demote {ident}",
                   hint="the swarm changes its managers only with a quorum: `docker node ls`"),
                Op(f"wait until {x.node.name} has left the managers' raft", node=via,
                   cmd="[ -z \"$(docker node inspect --format '{{if .ManagerStatus}}m{{end}}' "
                       f"{ident})\" ]", wait=DEMOTE_WAIT)]
    ops += [Op(f"{x.node.name} leaves the swarm", node=x.node,
               cmd="docker info --format '{{.Swarm.LocalNodeState}}' | grep -qx inactive || "
                   "timeout 60 docker swarm leave"),
            Op(f"wait until the swarm sees {x.node.name} Down (at most {LEAVE_WAIT:g} s)",
               node=via, cmd=f"docker node inspect --format '{{{{.Status.State}}}}' {ident} "
                             "| grep -qx down", wait=LEAVE_WAIT),
            Op(f"remove {x.node.name}'s entry from the swarm", node=via,
               cmd=f"docker node rm --force {ident}")]
    return ops


def _clean_alone(c: Cluster, x: Leaver, cleans: list[Any], dryrun: bool) -> None:
    """Run clean steps (`fn(cluster, remote, dryrun)`) on the leaver alone, as a cluster of
    that one node."""
    from tasks.remote import Remote

    one = c.model_copy(update={"nodes": [x.node]})
    with Remote(one) as rx:
        for clean in cleans:
            clean(one, rx, dryrun)


def _clean_node(c: Cluster, x: Leaver, dryrun: bool) -> None:
    """The per-node part of `doit clean`, on the leaver alone: Avahi, the node list, the
    leader guard, the VIP, the firewall (the firewall last: it is what lets the node talk)."""
    from tasks import avahi, firewall, guard, members, vip

    _clean_alone(c, x, [avahi.clean_cron, avahi.clean_hostname, members.clean_members,
                        guard.clean, vip.remove, firewall.clean_rules], dryrun)


def _unmount(c: Cluster, x: Leaver, dryrun: bool) -> None:
    from tasks.gluster import clean_mount

    _clean_alone(c, x, [clean_mount], dryrun)


def _read(c: Cluster, r: Remote) -> tuple[str, list[SwarmNode], list[Peer], Volume | None]:
    """(a listed node that answered, the swarm's node list, the pool, the volume) from the
    first listed node whose swarm lists nodes (a manager), else the first that answers."""
    from tasks.gluster_facts import (
        PEER_STATUS,
        parse_peer_status,
        parse_volume_info,
        volume_info_command,
    )
    from tasks.remote import RemoteError
    from tasks.swarm_facts import read_members

    via, members = "", []
    for n in c.nodes:
        try:
            members = read_members(r, n.name)
        except RemoteError:
            continue
        via = via or n.name
        if members:
            via = n.name
            break
    if not via:
        return "", [], [], None
    peer_xml = r.run(via, STEP, PEER_STATUS, check=False).stdout
    vol_xml = r.run(via, STEP, volume_info_command(c.gluster.volume), check=False).stdout
    try:
        peers = parse_peer_status(peer_xml)
        vol = parse_volume_info(vol_xml)
    except GlusterOutputError:
        peers, vol = [], None
    return via, members, peers, vol


def _answers(r: Remote, node: Node) -> bool:
    from tasks.remote import RemoteError

    try:
        return r.run(node, STEP, "true", check=False, timeout=15).ok
    except RemoteError:
        return False


def setup(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """Drain and clean every node the cluster file dropped that still answers (see above)."""
    with r.reading():
        via, members, peers, vol = _read(c, r)
    first = c.nodes[0]
    if not via:
        say(first, f"{STEP}: no listed node answers: nothing to check")
        return {"left": []}
    found = leavers(c, members, peers, vol)
    if not found:
        say(via, f"{STEP}: nothing to do (no node left the cluster file)")
        return {"left": []}
    left = []
    replica = vol.replica if vol is not None else 0
    for x in found:
        if not _answers(r, x.node):
            say(via, f"{STEP}: {x.node.name} ({x.node.address}) left the cluster file and does "
                     "not answer: taken out as a dead Pi by gluster:volume and swarm")
            continue
        say(via, f"{STEP}: {x.node.name} ({x.node.address}) left the cluster file and still "
                 "answers: drained and cleaned (its data stays on it)")
        # each part says its own "nothing to do" (an entry already drained, no brick left ...)
        part = f"{STEP} {x.node.name}"
        apply_ops(r, c.node(via), f"{part}: drain", plan_drain(c, x, via), dryrun=dryrun)
        _unmount(c, x, dryrun)
        apply_ops(r, c.node(via), f"{part}: brick and peer", plan_pool(c, x, replica, via),
                  dryrun=dryrun)
        if x.brick:
            replica -= 1
        _clean_node(c, x, dryrun)
        apply_ops(r, c.node(via), f"{part}: swarm", plan_leave(x, via), dryrun=dryrun)
        left.append(x.node.name)
    return {"left": left}


def clean(c: Cluster, r: Remote, dryrun: bool) -> None:
    """Nothing: a node that left was cleaned when it left; `doit clean` acts on the nodes
    listed."""


def task_depart() -> dict[str, Any]:
    """Nodes taken out of `nodes:` that still answer: drained, unmounted, cleaned, out."""
    from tasks.config import current

    c = current()
    task = remote_task(c, STEP, None, task_depart.__doc__ or "", setup, clean,
                       task_dep=["preflight"])
    return {**task, "basename": STEP}
