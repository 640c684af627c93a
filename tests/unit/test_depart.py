"""`depart`: the nodes the cluster file dropped, found in the swarm's node list and the pool,
and the plans that drain them, take their brick and peer out, and take them out of the swarm."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks import depart
from tasks.config import LAB_CLUSTER_FILE, Cluster, Node, load_cluster
from tasks.facts_cluster import SwarmNode
from tasks.gluster_facts import Peer, Volume

BRICK = "/srv/gluster/haswarm"


@pytest.fixture
def c(tmp_path: Path) -> Cluster:
    return load_cluster(LAB_CLUSTER_FILE).model_copy(update={"build_dir": tmp_path / "build"})


def entry(host: str, addr: str, **kw) -> SwarmNode:
    return SwarmNode(host=host, state=kw.pop("state", "ready"), addr=addr,
                     availability=kw.pop("availability", "active"),
                     role=kw.pop("role", "manager"), reachability=kw.pop("reach", "reachable"),
                     id=f"id-{host}", manager_addr=f"{addr}:2377", **kw)


def members(*extra: SwarmNode) -> list[SwarmNode]:
    return [entry(f"pi{i}", f"10.77.0.1{i}") for i in (1, 2, 3)] + list(extra)


def volume(*hosts: str) -> Volume:
    return Volume(name="haswarm", type="Replicate", status="Started", replica=len(hosts),
                  bricks=tuple(f"{h}:{BRICK}" for h in hosts))


def test_no_leavers_on_a_cluster_that_matches(c: Cluster) -> None:
    peers = [Peer(("10.77.0.12",), True, "Peer in Cluster"),
             Peer(("10.77.0.13",), True, "Peer in Cluster")]
    vol = volume("10.77.0.11", "10.77.0.12", "10.77.0.13")
    assert depart.leavers(c, members(), peers, vol) == []


def test_leavers_from_the_swarm_and_the_pool(c: Cluster) -> None:
    """pi4 is in the swarm, the pool and the volume; pi5 only in the pool (it never joined the
    swarm); each is found once, by address, with what it holds."""
    pi4 = entry("pi4", "10.77.0.14")
    peers = [Peer(("10.77.0.12",), True, "Peer in Cluster"),
             Peer(("10.77.0.14", "pi4"), True, "Peer in Cluster"),
             Peer(("10.77.0.15",), True, "Peer in Cluster")]
    vol = volume("10.77.0.11", "10.77.0.12", "10.77.0.13", "10.77.0.14")
    got = depart.leavers(c, members(pi4), peers, vol)
    assert [(x.node.name, x.node.address, x.entry, x.peer, x.brick) for x in got] == [
        ("pi4", "10.77.0.14", pi4, "10.77.0.14", f"10.77.0.14:{BRICK}"),
        ("10.77.0.15", "10.77.0.15", None, "10.77.0.15", "")]


def test_plan_drain_leave_and_pool(c: Cluster) -> None:
    x = depart.Leaver(Node(name="pi4", address="10.77.0.14"), entry("pi4", "10.77.0.14"),
                      peer="10.77.0.14", brick=f"10.77.0.14:{BRICK}")
    drain = depart.plan_drain(c, x, "pi1")
    assert [o.cmd for o in drain][0] == "docker node update --availability drain id-pi4"
    assert drain[1].node == x.node and drain[1].wait and "com.docker.stack.namespace=haswarm" \
        in drain[1].cmd
    drained = depart.Leaver(x.node, entry("pi4", "10.77.0.14", availability="drain"))
    assert len(depart.plan_drain(c, drained, "pi1")) == 1  # only the wait
    assert depart.plan_drain(c, depart.Leaver(x.node), "pi1") == []  # not in the swarm

    pool = depart.plan_pool(c, x, 4, "pi1")
    assert [o.cmd for o in pool] == [
        f"gluster --mode=script volume remove-brick haswarm replica 3 10.77.0.14:{BRICK} force",
        "gluster --mode=script peer detach 10.77.0.14"]
    assert all(o.node == "pi1" for o in pool)

    leave = depart.plan_leave(x, "pi1")
    assert [o.what for o in leave] == [
        "demote pi4", "wait until pi4 has left the managers' raft", "pi4 leaves the swarm",
        "wait until the swarm sees pi4 Down (at most 60 s)", "remove pi4's entry from the swarm"]
    assert leave[2].node == x.node and "docker swarm leave" in leave[2].cmd
    worker = depart.Leaver(x.node, entry("pi4", "10.77.0.14", role="worker", reach=""))
    assert [o.what for o in depart.plan_leave(worker, "pi1")][0] == "pi4 leaves the swarm"
