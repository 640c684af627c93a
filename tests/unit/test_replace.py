"""Replace a dead Pi (same name and address, re-flashed): the swarm's stale entry, Gluster's
same-hostname procedure, Galera's decision and the lab's known_hosts, fed recorded outputs.

The Gluster XML comes from tests/unit/data/gluster (recorded on the lab, GlusterFS 10.3) or is
built in exactly that layout (`peer_status` reproduces the recorded file); the getfattr lines are
what `getfattr --absolute-names -n trusted.glusterfs.volume-id -e hex DIR` prints (attr 2.5);
the swarm node list is the recorded `docker node inspect` of a lab where pi3 was Down.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import pytest

from tasks import gluster, gluster_replace, plan, swarm
from tasks.config import LAB_CLUSTER_FILE, Cluster, Node, load_cluster
from tasks.facts_cluster import NODES_PROBE, parse_node_inspect
from tasks.failures import Result
from tasks.galera import STEADY, GaleraFacts, Member, decide
from tasks.galera import plan as galera_plan
from tasks.gluster_facts import (
    GLUSTERD_INFO,
    parse_brick_id,
    parse_glusterd_info,
    parse_peer_status,
    parse_volume_info,
    peer_file_text,
)
from tasks.gluster_replace import NodeFacts, heal_left, node_facts, plan_replace, pool_view
from tasks.ops import Op, StepError
from tasks.swarm import stale_entries
from tasks.swarm_facts import INFO_CMD, parse_swarm_info


def recorded(name: str) -> str:
    return (Path(__file__).parent / "data" / name).read_text()


@pytest.fixture(scope="module")
def c() -> Cluster:
    return load_cluster(LAB_CLUSTER_FILE)


ADDR = {"pi1": "10.77.0.11", "pi2": "10.77.0.12", "pi3": "10.77.0.13"}
UUID = {"pi1": "a66d0c23-04de-49d3-aa83-f87ea581c7b8",  # as in the recorded volume info
        "pi2": "612472b0-6e96-48c8-8808-17dff3ac064b",
        "pi3": "91a59f04-8cae-49b4-9d44-5b0875e9dcef"}
NEW = "5c1e3b0a-7a52-4f0e-9d1b-2f6c1f0b9a11"  # the re-flashed pi3's own glusterd
VOL_ID = "feb866f7-d0ca-40d4-a14d-df7f446f896c"
BRICK = "/srv/gluster/haswarm"
VOLUME_INFO = recorded("gluster/volume-info.xml")
NO_VOLUME = recorded("gluster/volume-info-none.xml")
NO_PEERS = recorded("gluster/peer-status-none.xml")
HEAL_SUMMARY = recorded("gluster/heal-summary.xml")
GLUSTERD_DOWN = "Connection failed. Please check if gluster daemon is operational.\n"


def peer_status(*entries: tuple[str, bool, str]) -> str:
    """`gluster --mode=script --xml peer status` listing (node, connected, stateStr) entries."""
    peers = "".join(
        f"    <peer>\n      <uuid>{UUID[n]}</uuid>\n      <hostname>{ADDR[n]}</hostname>\n"
        f"      <hostnames>\n        <hostname>{ADDR[n]}</hostname>\n      </hostnames>\n"
        f"      <connected>{int(up)}</connected>\n      <state>3</state>\n"
        f"      <stateStr>{state}</stateStr>\n    </peer>\n" for n, up, state in entries)
    return ('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<cliOutput>\n'
            "  <opRet>0</opRet>\n  <opErrno>0</opErrno>\n  <opErrstr/>\n  <peerStatus>\n"
            f"{peers}  </peerStatus>\n</cliOutput>\n")


IN = "Peer in Cluster"


def volume_status(*up: str) -> str:
    """`gluster --xml volume status haswarm` with the bricks of `up` online (the layout of
    tests/unit/test_failover.py's recorded variant)."""
    nodes = "".join(f"<node><hostname>{ADDR[n]}</hostname><path>{BRICK}</path><peerid>x</peerid>"
                    "<status>1</status><port>53527</port></node>" for n in up)
    return ('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<cliOutput><opRet>0'
            "</opRet><opErrno>0</opErrno><opErrstr/><volStatus><volumes><volume><volName>haswarm"
            f"</volName><nodeCount>{len(up)}</nodeCount>{nodes}<node><hostname>Self-heal Daemon"
            "</hostname><path>localhost</path><status>1</status></node><tasks/></volume>"
            "</volumes></volStatus></cliOutput>\n")


def getfattr(volume_id: str | None, path: str = BRICK) -> str:
    if volume_id is None:
        return f"{path}: trusted.glusterfs.volume-id: No such attribute\n"
    return (f"# file: {path}\ntrusted.glusterfs.volume-id=0x{volume_id.replace('-', '')}\n\n")


def info(uuid: str) -> str:
    return f"UUID={uuid}\noperating-version=100000\n"


def sections(node: str, *, uuid: str | None = None, peers: str | None = None,
             volume: str = VOLUME_INFO, status: str | None = None,
             brick: str | None = None) -> dict[str, str]:
    """The probe output of a healthy member (pi3 Disconnected unless told otherwise)."""
    others = [(n, True, IN) for n in ADDR if n != node]
    return {"info": info(uuid or UUID[node]), "peers": peers or peer_status(*others),
            "volume": volume, "status": status or volume_status(*ADDR),
            "brick": brick if brick is not None else getfattr(VOL_ID)}


def converged() -> dict[str, NodeFacts]:
    return {n: node_facts(sections(n)) for n in ADDR}


def pi3_reflashed() -> dict[str, NodeFacts]:
    """pi1 and pi2 see pi3 (old UUID) Disconnected, its brick down; pi3 is a bare glusterd."""
    def member(n: str) -> dict[str, str]:
        other = "pi2" if n == "pi1" else "pi1"
        return sections(n, peers=peer_status((other, True, IN), ("pi3", False, IN)),
                        status=volume_status("pi1", "pi2"))

    fresh = {"info": info(NEW), "peers": NO_PEERS, "volume": NO_VOLUME, "status": GLUSTERD_DOWN,
             "brick": f"getfattr: {BRICK}: No such file or directory\n"}
    return {"pi1": node_facts(member("pi1")), "pi2": node_facts(member("pi2")),
            "pi3": node_facts(fresh)}


def whats(ops: list[Op]) -> list[tuple[str | None, str]]:
    return [(op.node, op.what) for op in ops]


# ---------------------------------------------------------------------------------------------
# Gluster: facts


def test_peer_status_builder_is_the_recorded_layout():
    assert peer_status(("pi2", True, IN), ("pi3", True, IN)) == recorded(
        "gluster/peer-status.xml")


def test_peer_uuid_and_volume_id_parsed():
    peers = parse_peer_status(recorded("gluster/peer-status.xml"))
    assert [p.uuid for p in peers] == [UUID["pi2"], UUID["pi3"]]
    assert parse_volume_info(VOLUME_INFO).id == VOL_ID


def test_parse_glusterd_info():
    got = parse_glusterd_info(info(UUID["pi3"]))
    assert (got.uuid, got.op_version) == (UUID["pi3"], "100000")
    assert parse_glusterd_info("") == type(got)()  # no file yet


@pytest.mark.parametrize("text,want", [
    (getfattr(VOL_ID), ("present", VOL_ID)),
    (getfattr(None), ("absent", None)),
    (f"getfattr: {BRICK}: No such file or directory\n", ("absent", None)),
    ("sh: 1: getfattr: not found\n", ("unknown", None)),
    ("", ("unknown", None)),
])
def test_parse_brick_id(text, want):
    assert parse_brick_id(text) == want


def test_node_facts_of_a_fresh_node_and_of_a_member():
    fresh = pi3_reflashed()["pi3"]
    assert (fresh.uuid, fresh.peers, fresh.volume, fresh.brick, fresh.online) == (
        NEW, (), None, "absent", None)
    assert not fresh.member
    m = converged()["pi1"]
    assert m.member and m.brick_id == VOL_ID and all(m.online.values())
    down = node_facts({"info": info(NEW), "peers": GLUSTERD_DOWN, "volume": GLUSTERD_DOWN})
    assert down.peers is None and down.volume is None


def test_pool_view_lists_every_member_with_its_names(c):
    assert pool_view(c, pi3_reflashed()) == {UUID[n]: (ADDR[n],) for n in ADDR}


def test_peer_file_is_what_glusterd_stores():
    assert peer_file_text(UUID["pi1"], ("10.77.0.11", "pi1")) == (
        f"uuid={UUID['pi1']}\nstate=3\nhostname1=10.77.0.11\nhostname2=pi1\n")


# ---------------------------------------------------------------------------------------------
# Gluster: the plan


def test_converged_pool_and_no_volume_give_no_op(c):
    assert plan_replace(c, converged()) == []
    bare = {"info": info(NEW), "peers": NO_PEERS, "volume": NO_VOLUME, "status": "",
            "brick": getfattr(None)}
    assert plan_replace(c, {n: node_facts(bare) for n in ADDR}) == []  # gluster:peers' job


def test_reflashed_node_gets_its_old_uuid_peers_and_brick_back(c):
    ops = plan_replace(c, pi3_reflashed())
    assert whats(ops) == [
        ("pi3", f"stop glusterd: it runs as a new member ({NEW}), the pool knows pi3 as "
                f"{UUID['pi3']}"),
        ("pi3", f"write {GLUSTERD_INFO}: UUID={UUID['pi3']} (the pool's pi3), "
                "operating-version=100000"),
        ("pi3", f"write /var/lib/glusterd/peers/{UUID['pi2']} (10.77.0.12, Peer in Cluster)"),
        ("pi3", f"write /var/lib/glusterd/peers/{UUID['pi1']} (10.77.0.11, Peer in Cluster)"),
        ("pi3", f"start glusterd as {UUID['pi3']}"),
        ("pi3", "wait until glusterd answers"),
        ("pi3", "probe pi1 (10.77.0.11) from pi3: the pool's config comes over"),
        ("pi3", "wait until pi3 has volume haswarm from the pool (at most 90 s)"),
        ("pi3", "restart glusterd (it starts with the pool's volume and peers)"),
        ("pi3", "wait until glusterd answers"),
        ("pi3", "wait until pi3 and pi1, pi2 see each other as Peer in Cluster (Connected) "
                "(at most 90 s)"),
        ("pi1", f"reset-brick 10.77.0.13:{BRICK} start (its dir on pi3 holds no data of "
                "haswarm: stop its brick process, if one runs)"),
        ("pi3", f"create the brick dir {BRICK} (a fresh disk has none; glusterd makes only the "
                "last component)"),
        ("pi1", f"reset-brick 10.77.0.13:{BRICK} 10.77.0.13:{BRICK} commit force (same host "
                "and path: the dir gets the volume's id, the brick starts empty)"),
        ("pi1", f"wait until brick 10.77.0.13:{BRICK} is online (at most 60 s)"),
        ("pi1", "heal haswarm full (the self-heal daemons copy every file to pi3)"),
        ("pi1", "wait until heal info shows 0 entries on every brick (at most 3600 s)"),
    ]
    assert ops[1].put == (GLUSTERD_INFO, f"UUID={UUID['pi3']}\noperating-version=100000\n")
    assert ops[1].mode == 0o600
    assert ops[3].put == (f"/var/lib/glusterd/peers/{UUID['pi1']}",
                          f"uuid={UUID['pi1']}\nstate=3\nhostname1=10.77.0.11\n")
    assert "glusterd stop" in ops[0].cmd and "systemctl stop glusterd" in ops[0].cmd
    assert ops[6].cmd == "gluster --mode=script peer probe 10.77.0.11"
    assert "systemctl restart glusterd" in ops[8].cmd
    assert ops[11].cmd.startswith("gluster --mode=script volume reset-brick haswarm "
                                  f"10.77.0.13:{BRICK} start")
    assert ops[13].cmd == (f"gluster --mode=script volume reset-brick haswarm 10.77.0.13:{BRICK}"
                           f" 10.77.0.13:{BRICK} commit force")
    assert ops[12].cmd == "mkdir -p /srv/gluster/haswarm"
    assert ops[15].cmd == "gluster --mode=script volume heal haswarm full"
    wait_peers, wait_heal = ops[10].call, ops[16].call
    assert wait_peers.func is gluster_replace.wait_in_cluster
    assert wait_peers.keywords | {"c": None} == {"c": None, "node": "pi3",
                                                 "sees": ["pi1", "pi2"],
                                                 "seen_by": ["pi1", "pi2"]}
    assert wait_heal.func is gluster_replace.wait_healed and wait_heal.keywords["via"] == "pi1"
    # every gluster command runs in script mode (an interactive "n" would exit 0)
    assert all("gluster --mode=script" in op.cmd for op in ops
               if op.cmd and "gluster " in op.cmd)


def test_the_first_node_replaced_takes_the_pool_from_the_second(c):
    f = pi3_reflashed()
    # the same situation with pi1 re-flashed: pi2 is the first healthy member
    def member(n: str) -> dict[str, str]:
        other = "pi3" if n == "pi2" else "pi2"
        return sections(n, peers=peer_status(("pi1", False, IN), (other, True, IN)),
                        status=volume_status("pi2", "pi3"))
    f = {"pi1": f["pi3"], "pi2": node_facts(member("pi2")), "pi3": node_facts(member("pi3"))}
    ops = plan_replace(c, f)
    assert ("pi1", "probe pi2 (10.77.0.12) from pi1: the pool's config comes over") in whats(ops)
    assert ops[1].put[1].startswith(f"UUID={UUID['pi1']}\n")
    assert {op.node for op in ops if "reset-brick" in op.what} == {"pi2"}


def test_interrupted_after_the_uuid_continues_without_stopping_glusterd(c):
    f = pi3_reflashed()
    f["pi3"] = node_facts({"info": info(UUID["pi3"]),
                           "peers": peer_status(("pi1", True, IN), ("pi2", True, IN)),
                           "volume": NO_VOLUME, "status": "", "brick": getfattr(None)})
    got = [w for _, w in whats(plan_replace(c, f))]
    assert got[:4] == ["wait until pi3 has volume haswarm from the pool (at most 90 s)",
                       "restart glusterd (it starts with the pool's volume and peers)",
                       "wait until glusterd answers",
                       "wait until pi3 and pi1, pi2 see each other as Peer in Cluster "
                       "(Connected) (at most 90 s)"]
    assert not any("stop glusterd" in w or "probe" in w for w in got)


def test_back_in_the_pool_only_the_empty_brick_is_reset(c):
    f = converged()
    f["pi3"] = node_facts(sections("pi3", brick=getfattr(None)))
    for n in ("pi1", "pi2", "pi3"):
        f[n] = NodeFacts(**{**f[n].__dict__, "online": {f"{ADDR[m]}:{BRICK}": m != "pi3"
                                                        for m in ADDR}})
    assert [w.split(" (")[0] for _, w in whats(plan_replace(c, f))] == [
        f"reset-brick 10.77.0.13:{BRICK} start", f"create the brick dir {BRICK}",
        f"reset-brick 10.77.0.13:{BRICK} "
        f"10.77.0.13:{BRICK} commit force", f"wait until brick 10.77.0.13:{BRICK} is online",
        "heal haswarm full", "wait until heal info shows 0 entries on every brick"]


def test_a_running_brick_or_an_unreadable_xattr_is_never_reset(c):
    f = converged()
    f["pi3"] = node_facts(sections("pi3", brick=getfattr(None)))  # absent, but it runs
    assert plan_replace(c, f) == []
    f["pi3"] = node_facts(sections("pi3", brick="sh: 1: getfattr: not found\n"))
    assert plan_replace(c, f) == []


def test_a_member_whose_volume_info_failed_is_never_restarted(c):
    f = converged()
    f["pi3"] = node_facts(sections("pi3", volume=GLUSTERD_DOWN))  # e.g. a CLI timeout
    assert not f["pi3"].member and not f["pi3"].volume_known
    assert plan_replace(c, f) == []
    f = pi3_reflashed()  # a fresh node whose `volume info` failed: refused, not guessed
    f["pi3"] = node_facts({"info": info(NEW), "peers": NO_PEERS, "volume": GLUSTERD_DOWN,
                           "brick": getfattr(None)})
    with pytest.raises(StepError, match="`gluster volume info` failed on pi3"):
        plan_replace(c, f)


def test_refusals_change_nothing(c):
    f = pi3_reflashed()
    f["pi3"] = node_facts({"info": info(NEW), "peers": peer_status(("pi1", True, IN)),
                           "volume": NO_VOLUME, "status": "", "brick": getfattr(None)})
    with pytest.raises(StepError, match="a pool of its own"):
        plan_replace(c, f)
    f = pi3_reflashed()
    f["pi3"] = node_facts({"info": info(NEW), "peers": GLUSTERD_DOWN, "volume": GLUSTERD_DOWN})
    with pytest.raises(StepError, match="does not answer"):
        plan_replace(c, f)
    f = pi3_reflashed()
    f["pi2"] = node_facts(sections("pi2", brick=getfattr(NEW)))
    with pytest.raises(StepError, match="belongs to another volume"):
        plan_replace(c, f)
    f = pi3_reflashed()
    for n in ("pi1", "pi2"):  # pi2's brick is down too: pi3 could heal from pi1 alone
        f[n] = NodeFacts(**{**f[n].__dict__, "online": {f"10.77.0.11:{BRICK}": True}})
    with pytest.raises(StepError, match="bricks of pi2 are offline"):
        plan_replace(c, f)


def test_heal_left_from_recorded_summary(c):
    assert heal_left(c, None) == ["heal info did not answer"]
    from tasks.facts_cluster import parse_heal_summary

    assert heal_left(c, parse_heal_summary(HEAL_SUMMARY)) == [
        "pi1: 4 entries", "pi3: Transport endpoint is not connected"]
    healed = HEAL_SUMMARY.replace(">4<", ">0<").replace(
        "Transport endpoint is not connected", "Connected").replace(">-<", ">0<")
    assert heal_left(c, parse_heal_summary(healed)) == []


class GlusterRemote:
    """A Remote answering the replace probes from `facts_text` ({node: sections}) and the heal
    and peer reads from queues; every other command is logged."""
    reading = staticmethod(nullcontext)  # every read is live here

    def __init__(self, c: Cluster, facts_text: dict[str, dict[str, str]],
                 heal: list[str] | None = None, peers: dict[str, list[str]] | None = None):
        self.cluster, self.facts_text, self.log = c, facts_text, []
        self.status_asked: list[str] = []
        self.heal, self.peers = list(heal or []), {k: list(v) for k, v in (peers or {}).items()}

    def read_probes(self, node, step, probes, timeout=60):
        name = node if isinstance(node, str) else node.name
        return {key: self.facts_text[name].get(key, "") for key in probes}

    def run(self, node, step, cmd, **kw):
        name = node if isinstance(node, str) else node.name
        if cmd == gluster_replace.status_command(self.cluster):  # asked on one member only
            self.status_asked.append(name)
            return Result(self.facts_text[name]["status"], "", 0)
        if "info summary" in cmd:
            return Result(self.heal.pop(0) if len(self.heal) > 1 else self.heal[0], "", 0)
        if cmd.endswith("--xml peer status"):
            q = self.peers[name]
            return Result(q.pop(0) if len(q) > 1 else q[0], "", 0)
        self.log.append((name, cmd))
        return Result("", "", 0)

    def on_all(self, step, fn, nodes=None):
        return {n.name: fn(n) for n in (self.cluster.nodes if nodes is None else nodes)}


def test_setup_dry_run_only_reads_and_says_everything(c, capsys):
    members = {n: sections(n, peers=peer_status(*[(o, o != "pi3", IN) for o in ADDR if o != n]),
                           status=volume_status("pi1", "pi2")) for n in ("pi1", "pi2")}
    fresh = {"info": info(NEW), "peers": NO_PEERS, "volume": NO_VOLUME, "status": "",
             "brick": getfattr(None)}
    r = GlusterRemote(c, {**members, "pi3": fresh})
    assert gluster_replace.setup_replace(c, r, dryrun=True) == {}
    assert r.log == [] and r.status_asked == ["pi1"]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"pi3: gluster:replace: would stop glusterd: it runs as a new member "
                      f"({NEW}), the pool knows pi3 as {UUID['pi3']}")
    assert out[-1] == ("pi1: gluster:replace: would wait until heal info shows 0 entries on "
                       "every brick (at most 3600 s)")
    r = GlusterRemote(c, {n: sections(n) for n in ADDR})
    assert gluster_replace.setup_replace(c, r) == {"done": []}
    assert capsys.readouterr().out == "pi1: gluster:replace: nothing to do\n"


def test_wait_healed_says_progress_until_two_clean_reads(c, capsys, monkeypatch):
    monkeypatch.setattr(gluster_replace.time, "sleep", lambda s: None)
    healed = HEAL_SUMMARY.replace(">4<", ">0<").replace(
        "Transport endpoint is not connected", "Connected").replace(">-<", ">0<")
    r = GlusterRemote(c, {}, heal=[HEAL_SUMMARY, HEAL_SUMMARY.replace(">4<", ">2<"), healed])
    gluster_replace.wait_healed(r, c=c, via="pi1")
    out = capsys.readouterr().out
    assert "pi1: gluster:replace: healing (0 s): pi1: 4 entries; pi3: Transport endpoint" in out
    assert "pi1: 2 entries" in out and "pi1: gluster:replace: healed: 0 entries" in out
    r = GlusterRemote(c, {}, heal=[HEAL_SUMMARY])
    with pytest.raises(StepError, match="heal is not done after 0 s: pi1: 4 entries"):
        gluster_replace.wait_healed(r, c=c, via="pi1", timeout=0)


def test_wait_healed_ends_when_only_files_in_use_are_left(c, capsys, monkeypatch):
    """A lock file written every second through one descriptor stays "possibly undergoing heal"
    (seen on the lab after a replace): named after the grace time, not waited on for an hour."""
    monkeypatch.setattr(gluster_replace.time, "sleep", lambda s: None)
    in_use = HEAL_SUMMARY.replace("Transport endpoint is not connected", "Connected").replace(
        ">-<", ">0<").replace("<numberOfEntriesInHealPending>4<",
                              "<numberOfEntriesInHealPending>0<").replace(
        "<numberOfEntriesPossiblyHealing>0</numberOfEntriesPossiblyHealing>\n      </brick>\n"
        "      <brick hostUuid=\"6124\">",
        "<numberOfEntriesPossiblyHealing>4</numberOfEntriesPossiblyHealing>\n      </brick>\n"
        "      <brick hostUuid=\"6124\">", 1)
    assert gluster_replace.only_in_use(c, in_use) and not gluster_replace.only_in_use(
        c, HEAL_SUMMARY)
    r = GlusterRemote(c, {}, heal=[in_use])
    gluster_replace.wait_healed(r, c=c, via="pi1", in_use_grace=0)
    out = capsys.readouterr().out
    assert "healed (0 s), except what is held open and written without a pause" in out
    # pending entries are always waited for
    r = GlusterRemote(c, {}, heal=[HEAL_SUMMARY.replace("Transport endpoint is not connected",
                                                        "Connected").replace(">-<", ">0<")])
    with pytest.raises(StepError, match="heal is not done after 0 s: pi1: 4 entries"):
        gluster_replace.wait_healed(r, c=c, via="pi1", timeout=0, in_use_grace=0)


def test_wait_in_cluster_waits_for_both_sides(c, monkeypatch):
    monkeypatch.setattr(gluster_replace.time, "sleep", lambda s: None)
    rejected = "Peer Rejected"
    r = GlusterRemote(c, {}, peers={
        "pi3": [NO_PEERS, peer_status(("pi1", True, IN), ("pi2", True, IN))],
        "pi1": [peer_status(("pi2", True, IN), ("pi3", True, rejected)),
                peer_status(("pi2", True, IN), ("pi3", True, IN))],
        "pi2": [peer_status(("pi1", True, IN), ("pi3", True, IN))]})
    gluster_replace.wait_in_cluster(r, c=c, node="pi3", sees=["pi1", "pi2"],
                                    seen_by=["pi1", "pi2"])
    r = GlusterRemote(c, {}, peers={"pi3": [NO_PEERS], "pi1": [peer_status(
        ("pi2", True, IN), ("pi3", True, rejected))]})
    with pytest.raises(StepError, match="pi3 does not see pi1; .*pi1 sees pi3 as Peer Rejected"):
        gluster_replace.wait_in_cluster(r, c=c, node="pi3", sees=["pi1"], seen_by=["pi1"],
                                        timeout=0, restart_after=0)
    # still rejected after `restart_after`: glusterd on pi3 is restarted once, not more
    assert [n for n, cmd in r.log if "glusterd restart" in cmd] == ["pi3"]


def test_replace_runs_after_the_daemon_and_before_the_peers_in_setup_and_plan():
    names = [n for n, _ in plan.REMOTE_STEPS["gluster"]]
    assert names[:3] == ["gluster:daemon", "gluster:replace", "gluster:peers"]
    assert dict(plan.REMOTE_STEPS["gluster"])["gluster:replace"] is gluster.setup_replace


# ---------------------------------------------------------------------------------------------
# Swarm: the stale entry goes before the fresh node joins

NODE_INSPECT = recorded("swarm/node-inspect.txt")  # pi3 Down, an unreachable manager
INACTIVE = ('{"NodeID":"","NodeAddr":"","LocalNodeState":"inactive","ControlAvailable":false,'
            '"Error":"","RemoteManagers":null}')


def manager_info(node_id: str, addr: str) -> str:
    return json.dumps({
        "NodeID": node_id, "NodeAddr": addr, "LocalNodeState": "active",
        "ControlAvailable": True, "Error": "",
        "RemoteManagers": [{"NodeID": "x", "Addr": f"{a}:2377"} for a in ADDR.values()],
        "Cluster": {"ID": "clu", "Spec": {"Dispatcher": {"HeartbeatPeriod": 2_000_000_000}}}})


def swarm_facts(pi3: str = INACTIVE) -> dict:
    return {"pi1": parse_swarm_info(manager_info("o7p071hn4w8q", ADDR["pi1"])),
            "pi2": parse_swarm_info(manager_info("x0f604u3wb0z", ADDR["pi2"])),
            "pi3": parse_swarm_info(pi3)}


def test_the_recorded_down_entry_of_a_reflashed_node_is_stale(c):
    members = parse_node_inspect(NODE_INSPECT)
    assert members[2].manager_addr == "10.77.0.13:2377" and members[2].in_raft
    assert [(n, e.id) for n, e in stale_entries(c, swarm_facts(), ADDR, members)] == [
        ("pi3", "cs99sfr9mz3u")]
    # the same entry while pi3 still reports that ID (down a moment, not re-flashed): kept
    same = swarm_facts(manager_info("cs99sfr9mz3u", ADDR["pi3"]))
    assert stale_entries(c, same, ADDR, members) == []


def test_plan_demotes_and_removes_the_old_entry_before_the_join(c):
    ops = swarm.plan(c, swarm_facts(), ADDR, parse_node_inspect(NODE_INSPECT))
    assert [(op.node, op.what) for op in ops] == [
        ("pi1", "demote the swarm's old entry of pi3 (ID cs99sfr9mz3u, down, manager "
                "unreachable): 3 -> 2 managers, 2 reachable"),
        ("pi1", "wait until it has left the managers' raft (at most 30 s)"),
        ("pi1", "remove the swarm's old entry of pi3 (ID cs99sfr9mz3u)"),
        ("pi3", "join as manager via pi1"),
        ("pi1", "wait until pi1, pi2, pi3 are Ready managers")]
    assert ops[0].cmd == "docker node demote cs99sfr9mz3u"
    assert ops[1].wait == swarm.DEMOTION_TIMEOUT and "ManagerStatus" in ops[1].cmd
    assert ops[2].cmd == "docker node rm --force cs99sfr9mz3u"


def test_plan_after_a_join_that_kept_the_old_entry_only_removes_it(c):
    demoted = NODE_INSPECT.replace('"role":"manager","manager":{"Reachability":"unreachable",'
                                   '"Addr":"10.77.0.13:2377"}', '"role":"worker","manager":null')
    fresh = parse_node_inspect(demoted.replace('"host":"pi1"', '"host":"pi1"') +
                               '{"id":"newpi3id","host":"pi3","state":"ready","addr":"10.77.0.13",'
                               '"availability":"active","role":"manager","manager":'
                               '{"Reachability":"reachable","Addr":"10.77.0.13:2377"}}\n')
    facts = swarm_facts(manager_info("newpi3id", ADDR["pi3"]))
    assert [(op.node, op.what) for op in swarm.plan(c, facts, ADDR, fresh)] == [
        ("pi1", "remove the swarm's old entry of pi3 (ID cs99sfr9mz3u)"),
        ("pi1", "wait until pi1, pi2, pi3 are Ready managers")]


def test_a_pi_replaced_by_another_leaves_the_swarm_before_the_new_one_joins(c):
    """`nodes:` edited, pi3 (dead, Down) replaced by pi4 at 10.77.0.14: pi3's entry is no node
    of the cluster file, the swarm (2 of its 3 managers are ours) is still this cluster's;
    pi3 is demoted and removed, then pi4 joins. A pi3 that still runs is refused."""
    c4 = c.model_copy(update={"nodes": [*c.nodes[:2], Node(name="pi4", address="10.77.0.14")]})
    addr = {"pi1": ADDR["pi1"], "pi2": ADDR["pi2"], "pi4": "10.77.0.14"}
    facts = {"pi1": swarm_facts()["pi1"], "pi2": swarm_facts()["pi2"],
             "pi4": parse_swarm_info(INACTIVE)}
    members = parse_node_inspect(NODE_INSPECT)
    assert [e.host for e in swarm.departed_entries(c4, addr, members)] == ["pi3"]
    ops = swarm.plan(c4, facts, addr, members)
    assert [(op.node, op.what.split(" (")[0]) for op in ops] == [
        ("pi1", "demote the swarm's old entry of pi3"),
        ("pi1", "wait until it has left the managers' raft"),
        ("pi1", "remove the swarm's old entry of pi3"),
        ("pi4", "join as manager via pi1"),
        ("pi1", "wait until pi1, pi2, pi4 are Ready managers")]
    # pi3 still running (Ready): refused before anything changes
    alive = parse_node_inspect(NODE_INSPECT.replace('"state":"down","addr":"10.77.0.13"',
                                                    '"state":"ready","addr":"10.77.0.13"'))
    with pytest.raises(StepError, match=r"(?s)pi3 \(10.77.0.13\) is in the swarm but not in "
                                        r"the cluster file, and the swarm still sees it Ready"
                                        r".*switch it off"):
        swarm.plan(c4, facts, addr, alive)


def test_plan_without_quorum_changes_nothing_and_says_how_to_recover(c):
    two_down = NODE_INSPECT.replace('"state":"ready","addr":"10.77.0.12"',
                                    '"state":"down","addr":"10.77.0.12"').replace(
        '{"Reachability":"reachable","Addr":"10.77.0.12:2377"}',
        '{"Reachability":"unreachable","Addr":"10.77.0.12:2377"}')
    with pytest.raises(StepError, match="(?s)only 1 of its 3 managers are reachable.*"
                                        "force-new-cluster --advertise-addr 10.77.0.11"):
        swarm.plan(c, swarm_facts(), ADDR, parse_node_inspect(two_down))


def test_setup_removes_the_stale_entry_then_joins(c, capsys):
    log: list[tuple[str, str]] = []
    infos = {"pi1": manager_info("o7p071hn4w8q", ADDR["pi1"]),
             "pi2": manager_info("x0f604u3wb0z", ADDR["pi2"]), "pi3": INACTIVE}

    class R:

        reading = staticmethod(nullcontext)
        cluster = c

        def run(self, node, step, cmd, **kw):
            name = node if isinstance(node, str) else node.name
            if cmd == INFO_CMD:
                return Result(infos[name], "", 0)
            if cmd == NODES_PROBE:
                return Result(NODE_INSPECT, "", 0)
            log.append((name, cmd))
            return Result("TOKEN" if "join-token" in cmd else "", "", 0)

        def run_all(self, step, cmd, nodes=None, **kw):
            return {n.name: self.run(n, step, cmd) for n in c.nodes}

        def redact(self, *values):
            pass

        def docker(self, node):
            class Swarm:
                def join(self, remote_addrs, join_token, listen_addr, advertise_addr):
                    log.append((node.name, f"API join {remote_addrs}"))
                    infos[node.name] = manager_info("newpi3id", ADDR["pi3"])

            return type("Client", (), {"swarm": Swarm()})()

    swarm.setup(c, R())
    assert log[0] == ("pi1", "docker node demote cs99sfr9mz3u")
    assert log[1][0] == "pi1" and log[1][1].startswith('[ -z "$(docker node inspect')
    assert log[2:5] == [("pi1", "docker node rm --force cs99sfr9mz3u"),
                        ("pi1", "docker swarm join-token -q manager"),
                        ("pi3", "API join ['10.77.0.11:2377']")]


# ---------------------------------------------------------------------------------------------
# Galera: a wiped node's empty volume is a join (SST), never a bootstrap


def m(node: str, synced: bool = True, size: int = 2, phase: str = "running") -> Member:
    return Member(node=node, service="db", container=f"db-{node}", phase=phase,
                  cluster_status="Primary" if synced else "none",
                  local_state="Synced" if synced else "none", cluster_size=size if synced else 0)


@pytest.mark.parametrize("pi3", [[], [m("pi3", synced=False, phase="waiting")],
                                 [m("pi3", synced=False, phase="joining")]],
                         ids=["not-scheduled-yet", "waiting", "sst"])
def test_decide_with_two_synced_and_an_empty_node_waits_for_the_join(c, pi3):
    f = GaleraFacts(seed_desired=0, db_desired=3, members=[m("pi1"), m("pi2"), *pi3],
                    deployed=True, problems=["db: 2 of 3 Synced",
                                             "galera: wsrep_cluster_size [2], want 3"],
                    data_nodes=["pi1", "pi2"])  # pi3's volume is empty
    d = decide(f, 3)
    assert d.kind == "running" and d.steps == STEADY
    ops = galera_plan(c, "pi1", f, d)
    assert [op.call.func.__name__ for op in ops] == ["wait_stack", "probe_ha"]
    assert not any("seed" in op.what or "bootstrap" in op.what for op in ops)


# ---------------------------------------------------------------------------------------------
# The lab: known_hosts keeps the user's decision; a wipe leaves only console.log


def test_known_hosts_keeps_a_listed_node_and_adds_the_missing_ones():
    from lab.access import known_hosts_with

    old = "10.77.0.13,pi3 ssh-ed25519 OLDKEY\n"
    wanted = {"10.77.0.11": "10.77.0.11,pi1 ssh-ed25519 K1\n",
              "10.77.0.13": "10.77.0.13,pi3 ssh-ed25519 NEWKEY\n"}
    assert known_hosts_with(old, wanted) == old + "10.77.0.11,pi1 ssh-ed25519 K1\n"
    assert known_hosts_with("", wanted) == "".join(wanted.values())
    # after `ssh-keygen -R 10.77.0.13` and `ssh-keyscan -t ed25519 10.77.0.13 >> ...`
    trusted = "# 10.77.0.13:22 SSH-2.0-OpenSSH_9.2\n10.77.0.13 ssh-ed25519 NEWKEY"
    assert known_hosts_with(trusted, wanted) == trusted + "\n10.77.0.11,pi1 ssh-ed25519 K1\n"


def test_wipe_disk_leaves_only_the_console_log(tmp_path):
    from lab.driver import Lab

    lab = Lab(load_cluster(LAB_CLUSTER_FILE), state_dir=tmp_path, instance="uwipe")
    d = lab.node_dir("pi3")
    for rel in ("upper/var/lib/glusterd/glusterd.info", "upper/etc/cron.d/haswarm",
                "work/etc/work/x", "docker/swarm/state.json", "srv/gluster/haswarm/f",
                "root/.ssh/authorized_keys", "mnt/haswarm/x", "ssh_host_ed25519_key",
                "ssh_host_ed25519_key.pub", "console.log"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text("x")
    assert lab._wipe_disk("pi3") == ["docker", "mnt", "root", "srv", "ssh_host_ed25519_key",
                                     "ssh_host_ed25519_key.pub", "upper", "work"]
    assert [p.name for p in d.iterdir()] == ["console.log"]


# ---------------------------------------------------------------------------------------------
# What else a re-flashed node needs comes back through steps that ask the nodes every time


def test_no_step_a_replaced_node_needs_trusts_doits_memory():
    """Images, firewall, Gluster, the Avahi name and cron, swarm, the leader guard, the stack,
    the VIP, HA's files: each asks the nodes on every `doit setup` (a wiped node is noticed)."""
    import dodo

    tasks: list[dict] = []
    for creator in ("task_preload_images", "task_firewall", "task_gluster", "task_avahi",
                    "task_ha_files", "task_swarm", "task_leader_guard", "task_stack_objects",
                    "task_stack", "task_vip", "task_ha_onboard"):
        got = getattr(dodo, creator)()
        tasks += [got] if isinstance(got, dict) else list(got)
    assert len(tasks) >= 15
    for t in tasks:
        assert t["uptodate"] == [False], t.get("basename") or t.get("name")
        assert "targets" not in t, t.get("basename") or t.get("name")


def test_lab_tasks_act_on_the_lab_cluster_file_in_use(tmp_path, monkeypatch):
    """A lab variant in use (`lab: true`, pi3 replaced by pi4) is the lab `lab-up` starts;
    a cluster file that is no lab's, or that does not load, leaves config/lab.yml's lab."""
    import yaml

    from lab.tasks import _lab
    from tasks.config import ENV_VAR

    data = yaml.safe_load(LAB_CLUSTER_FILE.read_text())
    for key in ("key", "known_hosts"):
        data["ssh"][key] = str((LAB_CLUSTER_FILE.parent / data["ssh"][key]).resolve())
    data["nodes"][2] = {"name": "pi4", "address": "10.77.0.14"}
    variant = tmp_path / "variant.yml"
    variant.write_text(yaml.safe_dump(data))
    monkeypatch.delenv("HASWARM_LAB_INSTANCE", raising=False)
    monkeypatch.setenv(ENV_VAR, str(variant))
    assert _lab().names == ["pi1", "pi2", "pi4"]
    data["lab"] = False
    variant.write_text(yaml.safe_dump(data))
    assert _lab().names == ["pi1", "pi2", "pi3"]
    variant.write_text("nodes: [")
    assert _lab().names == ["pi1", "pi2", "pi3"]
