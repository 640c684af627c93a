"""`depart`: the nodes the cluster file dropped, found in the swarm's node list and the pool,
and the plans that drain them, take their brick and peer out, and take them out of the swarm."""

from __future__ import annotations

from contextlib import nullcontext
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


class DepartRemote:
    """A Remote for `depart.setup`: pi1 answers the node list and the pool; the leavers in
    `alive` answer, the others fail to connect; every other command is logged (node, cmd) and
    succeeds."""
    reading = staticmethod(nullcontext)  # every read is live here

    def __init__(self, c: Cluster, members: str, pool: str, alive: set[str]):
        self.cluster, self.members, self.pool, self.alive = c, members, pool, alive
        self.log: list[tuple[str, str]] = []

    def run(self, node, step, cmd, **kw):
        from tasks.facts_cluster import NODES_PROBE
        from tasks.failures import Result
        from tasks.remote import Failure, Kind, RemoteError

        n = self.cluster.node(node) if isinstance(node, str) else node
        if n.name not in self.cluster.names and n.name not in self.alive:
            raise RemoteError([Failure(node=n.name, address=n.address, step=step,
                                       kind=Kind.UNREACHABLE, detail="no route to host",
                                       hint="")])
        if cmd == NODES_PROBE:
            return Result(self.members if n.name == "pi1" else "", "", 0)
        if "peer status" in cmd:
            return Result(self.pool.partition("<!--cut-->")[0], "", 0)
        if "volume info" in cmd:
            return Result(self.pool.partition("<!--cut-->")[2], "", 0)
        self.log.append((n.name, cmd))
        return Result("", "", 0)


def inspect_line(host: str, addr: str, role: str = "manager") -> str:
    import json

    manager = {"Leader": host == "pi1", "Reachability": "reachable", "Addr": f"{addr}:2377"}
    return json.dumps({"id": f"id-{host}", "host": host, "state": "ready", "addr": addr,
                       "availability": "active", "role": role,
                       "manager": manager if role == "manager" else None})


def test_setup_drains_and_cleans_a_leaver_that_answers_and_leaves_a_dead_one(
        c: Cluster, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from tests.unit.test_gluster import PEER_STATUS, VOLUME_INFO

    members = "\n".join([inspect_line(f"pi{i}", f"10.77.0.1{i}") for i in (1, 2, 3)]
                        + [inspect_line("pi4", "10.77.0.14"),
                           inspect_line("pi5", "10.77.0.15", "worker")])
    block = PEER_STATUS[PEER_STATUS.rindex("<peer>"):PEER_STATUS.rindex("</peer>") + 7]
    with_pi4 = PEER_STATUS.replace(block, block + block.replace("10.77.0.13", "10.77.0.14"))
    cleaned: list[str] = []
    monkeypatch.setattr(depart, "_unmount", lambda c, x, dryrun: cleaned.append(
        f"unmount {x.node.name}"))
    monkeypatch.setattr(depart, "_clean_node", lambda c, x, dryrun: cleaned.append(
        f"clean {x.node.name}"))
    # the pool's peer status, then <!--cut-->, then its volume info
    r = DepartRemote(c, members, with_pi4 + "<!--cut-->" + VOLUME_INFO, alive={"pi4"})
    out = depart.setup(c, r)
    assert out == {"left": ["pi4"]}
    assert cleaned == ["unmount pi4", "clean pi4"]
    cmds = [(n, cmd.split(" 2>")[0]) for n, cmd in r.log if cmd != "true"]
    assert cmds[0] == ("pi1", "docker node update --availability drain id-pi4")
    assert cmds[1][0] == "pi4" and "com.docker.stack.namespace=haswarm" in cmds[1][1]
    assert [c for n, c in cmds[2:]] == [
        "gluster --mode=script peer detach 10.77.0.14",
        "docker node demote id-pi4",
        "[ -z \"$(docker node inspect --format '{{if .ManagerStatus}}m{{end}}' id-pi4)\" ]",
        "docker info --format '{{.Swarm.LocalNodeState}}' | grep -qx inactive || timeout 60 "
        "docker swarm leave",
        "docker node inspect --format '{{.Status.State}}' id-pi4 | grep -qx down",
        "docker node rm --force id-pi4"]
    said = capsys.readouterr().out
    assert "pi5 (10.77.0.15) left the cluster file and does not answer" in said
