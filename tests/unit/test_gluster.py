"""Gluster, Home Assistant files and Avahi: the fact -> command logic, fed recorded facts.

The XML below was captured from the lab (GlusterFS 10.3, `gluster --mode=script --xml ...`) right
after `gluster` setup; the rest are small hand-made variations of it.
"""

from __future__ import annotations

import inspect
import re
import subprocess
from pathlib import Path

import pytest

from tasks import avahi, gluster, gluster_facts, gluster_plans, homeassistant
from tasks import facts as fact_lib
from tasks.config import LAB_CLUSTER_FILE, Cluster, Node, load_cluster
from tasks.ops import Op, StepError

# `gluster --mode=script --xml volume info haswarm` on pi1 after setup

def recorded(name: str) -> str:
    """An output recorded from the lab (tests/unit/data/<fact>/<case>)."""
    return (Path(__file__).parent / "data" / name).read_text()


VOLUME_INFO = recorded("gluster/volume-info.xml")

# `gluster --mode=script --xml peer status` on pi1 after setup
PEER_STATUS = recorded("gluster/peer-status.xml")

# the same on a node that has no peers yet
NO_PEERS = recorded("gluster/peer-status-none.xml")

# `gluster --mode=script --xml volume info haswarm` before the volume exists (exit code 0!)
NO_VOLUME = recorded("gluster/volume-info-none.xml")

GLUSTERD_DOWN = "Connection failed. Please check if gluster daemon is operational.\n"

DEBIAN_FSTAB = "# UNCONFIGURED FSTAB FOR BASE SYSTEM\n"
USER_FSTAB = recorded("fstab/user.fstab")

# the [server] section of Debian 12's /etc/avahi/avahi-daemon.conf (abridged)
AVAHI_CONF = recorded("avahi/avahi-daemon.conf")


@pytest.fixture
def c(tmp_path: Path) -> Cluster:
    """The lab cluster, its build directory (rendered files, stamps) in tmp."""
    return load_cluster(LAB_CLUSTER_FILE).model_copy(update={"build_dir": tmp_path / "build"})


def two_nodes(c: Cluster) -> Cluster:
    return c.model_copy(update={"nodes": c.nodes[:2], "allow_two_nodes": True})


def cmds(ops: list[Op]) -> list[str]:
    return [op.cmd or f"put {op.put[0]}" for op in ops if op.cmd or op.put]


def sh(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=10)


# ---------------------------------------------------------------------------------------------
# Parsing gluster's XML


def test_parse_volume_info_recorded() -> None:
    vol = gluster_facts.parse_volume_info(VOLUME_INFO)
    assert vol is not None
    assert (vol.name, vol.type, vol.status, vol.replica) == ("haswarm", "Replicate", "Started", 3)
    assert vol.bricks == ("10.77.0.11:/srv/gluster/haswarm", "10.77.0.12:/srv/gluster/haswarm",
                          "10.77.0.13:/srv/gluster/haswarm")
    assert vol.options["network.ping-timeout"] == "5"
    assert vol.options["cluster.quorum-type"] == "auto"


def test_parse_volume_info_absent_and_errors() -> None:
    assert gluster_facts.parse_volume_info(NO_VOLUME) is None
    with pytest.raises(gluster_facts.GlusterOutputError, match="no XML"):
        gluster_facts.parse_volume_info(GLUSTERD_DOWN)
    other = NO_VOLUME.replace("Volume does not exist", "Locking failed on 10.77.0.12")
    with pytest.raises(gluster_facts.GlusterOutputError, match="Locking failed"):
        gluster_facts.parse_volume_info(other)


def test_parse_peer_status() -> None:
    peers = gluster_facts.parse_peer_status(PEER_STATUS)
    assert [p.names for p in peers] == [("10.77.0.12",), ("10.77.0.13",)]
    assert all(p.in_cluster for p in peers)
    assert gluster_facts.parse_peer_status(NO_PEERS) == []
    with pytest.raises(gluster_facts.GlusterOutputError):
        gluster_facts.parse_peer_status(GLUSTERD_DOWN)


# ---------------------------------------------------------------------------------------------
# Peers and volume


def test_plan_daemon() -> None:
    running = {"cli": "yes\n", "disabled": "no\n", "peers": PEER_STATUS}
    assert gluster_plans.plan_daemon(running) == []
    stopped = gluster_plans.plan_daemon({**running, "peers": "Connection failed. Please check "
                                         "if gluster daemon is operational.\n"})
    assert [op.cmd for op in stopped] == [gluster_plans.START_GLUSTERD]
    # the start command works with systemd (a Pi) and with the lab's stand-in
    assert "systemctl enable --now glusterd" in gluster_plans.START_GLUSTERD
    assert "/usr/local/sbin/lab-service glusterd start" in gluster_plans.START_GLUSTERD
    disabled = gluster_plans.plan_daemon({**running, "disabled": "yes\n"})
    assert [op.cmd for op in disabled] == ["systemctl enable glusterd"]
    with pytest.raises(StepError, match="apt-get install glusterfs-server"):
        gluster_plans.plan_daemon({**running, "cli": "no\n"})


def test_peers_to_probe(c: Cluster) -> None:
    assert [n.name for n in gluster_plans.peers_to_probe(c, [])] == ["pi2", "pi3"]
    assert gluster_plans.peers_to_probe(c, gluster_facts.parse_peer_status(PEER_STATUS)) == []
    # known by its name (a pool probed by host name) counts as well
    by_name = [gluster_facts.Peer(("pi2",), True, "Peer in Cluster")]
    assert [n.name for n in gluster_plans.peers_to_probe(c, by_name)] == ["pi3"]


def test_peers_not_ready(c: Cluster) -> None:
    assert gluster_plans.peers_not_ready(c, gluster_facts.parse_peer_status(PEER_STATUS)) == []
    half = PEER_STATUS.replace("<connected>1</connected>", "<connected>0</connected>", 1)
    assert gluster_plans.peers_not_ready(c, gluster_facts.parse_peer_status(half)) == ["pi2"]
    assert gluster_plans.peers_not_ready(c, []) == ["pi2", "pi3"]


def test_plan_volume_from_scratch(c: Cluster) -> None:
    ops = gluster_plans.plan_volume(c, None)
    create, options, start = cmds(ops)
    assert create == ("gluster --mode=script volume create haswarm replica 3 transport tcp "
                      "10.77.0.11:/srv/gluster/haswarm 10.77.0.12:/srv/gluster/haswarm "
                      "10.77.0.13:/srv/gluster/haswarm force")
    # one `volume set` transaction with every option
    assert options.startswith("gluster --mode=script volume set haswarm ")
    for key, value in gluster_plans.volume_options(c).items():
        assert f" {key} {value}" in options
    assert "network.ping-timeout 5" in options
    assert "cluster.quorum-type auto" in options and "cluster.server-quorum-type server" in options
    assert start == "gluster --mode=script volume start haswarm"


def test_plan_volume_two_nodes_is_replica_2(c: Cluster) -> None:
    create = cmds(gluster_plans.plan_volume(two_nodes(c), None))[0]
    assert " replica 2 " in create and "10.77.0.13" not in create


def with_option(xml: str, name: str, value: str) -> str:
    """`gluster volume info` XML with one more option, as gluster lists one it was given."""
    count = int(re.search(r"<optCount>(\d+)</optCount>", xml)[1])  # type: ignore[index]
    return (xml.replace(f"<optCount>{count}<", f"<optCount>{count + 1}<")
            .replace("<options>", f"<options>\n          <option>\n            <name>{name}"
                     f"</name>\n            <value>{value}</value>\n          </option>", 1))


# The recorded volume (set up before auth.allow existed) with the option setup now sets.
CONVERGED = with_option(VOLUME_INFO, "auth.allow", "10.77.0.11,10.77.0.12,10.77.0.13")


def test_plan_volume_converged_does_nothing(c: Cluster) -> None:
    assert gluster_plans.plan_volume(c, gluster_facts.parse_volume_info(CONVERGED)) == []


def test_plan_volume_allows_only_the_nodes(c: Cluster) -> None:
    # a volume of an older haswarm (the recording): open to any host on the LAN
    assert "auth.allow" not in gluster_facts.parse_volume_info(VOLUME_INFO).options
    (op,) = gluster_plans.plan_volume(c, gluster_facts.parse_volume_info(VOLUME_INFO))
    assert op.what == "set auth.allow=10.77.0.11,10.77.0.12,10.77.0.13"
    assert op.cmd == ("gluster --mode=script volume set haswarm auth.allow "
                      "10.77.0.11,10.77.0.12,10.77.0.13")
    # someone widened it by hand (or a node was replaced): set back to the cluster's nodes
    wide = with_option(VOLUME_INFO, "auth.allow", "*")
    assert cmds(gluster_plans.plan_volume(c, gluster_facts.parse_volume_info(wide))) == [op.cmd]
    moved = c.model_copy(update={"nodes": [*c.nodes[:2], c.nodes[2].model_copy(
        update={"address": "pi3.lan"})]})
    assert gluster_plans.allowed_clients(moved) == "10.77.0.11,10.77.0.12,pi3.lan"


def test_plan_volume_changed_option_and_stopped(c: Cluster) -> None:
    slower = c.model_copy(update={"gluster": c.gluster.model_copy(update={"ping_timeout": 10})})
    vol = gluster_facts.parse_volume_info(
        CONVERGED.replace("<statusStr>Started", "<statusStr>Stopped"))
    assert cmds(gluster_plans.plan_volume(slower, vol)) == [
        "gluster --mode=script volume set haswarm network.ping-timeout 10 server.keepalive-time 8 "
        "server.tcp-user-timeout 12",
        "gluster --mode=script volume start haswarm",
    ]


def test_plan_volume_refuses_a_distributed_volume(c: Cluster) -> None:
    # what the 2019 system created: no replica count given
    distributed = (VOLUME_INFO.replace("<typeStr>Replicate", "<typeStr>Distribute")
                   .replace("<replicaCount>3", "<replicaCount>1"))
    with pytest.raises(StepError, match="Distribute.*haswarm needs Replicate with replica 3"):
        gluster_plans.plan_volume(c, gluster_facts.parse_volume_info(distributed))


def test_plan_volume_moves_the_brick_of_a_replaced_pi(c: Cluster) -> None:
    """The volume has a brick on 10.77.0.99, a host the cluster file no longer lists, and pi3
    has none: pi3 replaced that Pi. The options first (auth.allow admits pi3's heal daemon),
    then replace-brick, heal full, and the wait; an unrelated brick change is still refused."""
    old = CONVERGED.replace("10.77.0.13:/srv", "10.77.0.99:/srv").replace(
        "10.77.0.11,10.77.0.12,10.77.0.13", "10.77.0.11,10.77.0.12,10.77.0.99")
    waits = []
    ops = gluster_plans.plan_volume(c, gluster_facts.parse_volume_info(old), waits.append)
    assert [op.what.split(" (")[0] for op in ops] == [
        "set auth.allow=10.77.0.11,10.77.0.12,10.77.0.13",
        "move brick 10.77.0.99:/srv/gluster/haswarm to 10.77.0.13:/srv/gluster/haswarm",
        "wait until brick 10.77.0.13:/srv/gluster/haswarm is online",
        "heal the new brick 10.77.0.13:/srv/gluster/haswarm from the other copies",
        "wait until the heal is done", "set auth.allow=10.77.0.11,10.77.0.12,10.77.0.13 again"]
    assert ops[1].cmd == ("gluster --mode=script volume replace-brick haswarm "
                          "10.77.0.99:/srv/gluster/haswarm 10.77.0.13:/srv/gluster/haswarm "
                          "commit force")
    assert ops[3].cmd == "gluster --mode=script volume heal haswarm full" and ops[3].wait
    ops[4].call("remote")
    assert waits == ["remote"]
    other_dir = VOLUME_INFO.replace("10.77.0.13:/srv/gluster/haswarm", "10.77.0.13:/data/b")
    with pytest.raises(StepError, match="10.77.0.13:/data/b"):
        gluster_plans.plan_volume(c, gluster_facts.parse_volume_info(other_dir))
    grown = c.model_copy(update={"nodes": [*c.nodes, Node(name="pi4", address="10.77.0.14")]})
    with pytest.raises(StepError, match="drops 1 node.*adds 2: one change per setup"):
        gluster_plans.plan_volume(grown, gluster_facts.parse_volume_info(old))


def five(c: Cluster) -> Cluster:
    return c.model_copy(update={"nodes": [*c.nodes, Node(name="pi4", address="10.77.0.14"),
                                          Node(name="pi5", address="10.77.0.15")]})


def test_plan_volume_grows_one_brick_at_a_time(c: Cluster) -> None:
    """Two nodes added to `nodes:`: auth.allow first, then per new node add-brick with the
    replica count one up, wait online, heal full, wait healed; auth.allow once more at the end
    (an add-brick may rewrite it)."""
    waits = []
    ops = gluster_plans.plan_volume(five(c), gluster_facts.parse_volume_info(CONVERGED),
                                    waits.append)
    b4, b5 = "10.77.0.14:/srv/gluster/haswarm", "10.77.0.15:/srv/gluster/haswarm"
    assert [op.what.split(" (")[0] for op in ops] == [
        "set auth.allow=10.77.0.11,10.77.0.12,10.77.0.13,10.77.0.14,10.77.0.15",
        f"add brick {b4}: replica 3 -> 4", f"wait until brick {b4} is online",
        f"heal the new brick {b4} from the other copies", "wait until the heal is done",
        f"add brick {b5}: replica 4 -> 5", f"wait until brick {b5} is online",
        f"heal the new brick {b5} from the other copies", "wait until the heal is done",
        "set auth.allow=10.77.0.11,10.77.0.12,10.77.0.13,10.77.0.14,10.77.0.15 again"]
    assert ops[1].cmd == f"gluster --mode=script volume add-brick haswarm replica 4 {b4} force"
    assert ops[5].cmd == f"gluster --mode=script volume add-brick haswarm replica 5 {b5} force"
    ops[4].call("remote")
    assert waits == ["remote"]


def test_plan_volume_shrinks_to_the_nodes_listed(c: Cluster) -> None:
    """A volume of five bricks, pi4 and pi5 taken out of `nodes:`: their bricks are removed,
    the replica count following (5 -> 4 -> 3), then auth.allow admits only the three."""
    b4, b5 = "10.77.0.14:/srv/gluster/haswarm", "10.77.0.15:/srv/gluster/haswarm"
    wide = five(c)
    xml = CONVERGED
    vol = gluster_facts.parse_volume_info(xml)
    vol = vol.__class__(**{**vol.__dict__, "replica": 5, "bricks": (*vol.bricks, b4, b5),
                           "options": {**vol.options,
                                       **gluster_plans.volume_options(wide)}})
    assert gluster_plans.plan_volume(wide, vol) == []
    ops = gluster_plans.plan_volume(c, vol)
    assert cmds(ops) == [
        "gluster --mode=script volume set haswarm auth.allow 10.77.0.11,10.77.0.12,10.77.0.13",
        f"gluster --mode=script volume remove-brick haswarm replica 4 {b4} force",
        f"gluster --mode=script volume remove-brick haswarm replica 3 {b5} force"]
    assert "replica 5 -> 4" in ops[1].what and "replica 4 -> 3" in ops[2].what


def test_departed_peers_are_no_node_and_hold_no_brick(c: Cluster) -> None:
    peers = [gluster_facts.Peer(("10.77.0.12",), True, "Peer in Cluster"),
             gluster_facts.Peer(("10.77.0.99", "pi9"), False, "Peer in Cluster"),
             gluster_facts.Peer(("10.77.0.98",), False, "Peer in Cluster")]
    other_volume = VOLUME_INFO.replace("10.77.0.13:/srv", "10.77.0.98:/srv")
    hosts = gluster_facts.brick_hosts(other_volume)
    assert hosts == {"10.77.0.11", "10.77.0.12", "10.77.0.98"}
    assert [p.names[0] for p in gluster_plans.departed_peers(c, peers, hosts)] == ["10.77.0.99"]


def test_plan_volume_clean(c: Cluster) -> None:
    assert gluster_plans.plan_volume_clean(c, None) == []
    ops = gluster_plans.plan_volume_clean(c, gluster_facts.parse_volume_info(VOLUME_INFO))
    assert [op.what for op in ops] == ["stop volume haswarm",
                                       "delete volume haswarm (bricks keep their data)"]
    assert all("--mode=script" in (op.cmd or "") for op in ops)
    stopped = VOLUME_INFO.replace("<statusStr>Started", "<statusStr>Stopped")
    ops = gluster_plans.plan_volume_clean(c, gluster_facts.parse_volume_info(stopped))
    assert [op.what for op in ops] == ["delete volume haswarm (bricks keep their data)"]


@pytest.mark.parametrize(("script", "ok"), [
    ("echo 'volume stop: haswarm: failed: Volume haswarm is not in the started state' >&2; "
     "exit 1", True),
    ("echo 'volume stop: haswarm: success'", True),
    ("echo 'volume stop: haswarm: failed: Another transaction is in progress' >&2; exit 1", False),
])
def test_tolerant_accepts_only_the_already_done_error(script: str, ok: bool) -> None:
    res = sh(gluster_plans.tolerant(f"sh -c \"{script}\"", "is not in the started state"))
    assert (res.returncode == 0) is ok
    if not ok:
        assert "Another transaction is in progress" in res.stderr


# ---------------------------------------------------------------------------------------------
# fstab and mounts

ENTRY = ("localhost:/haswarm /mnt/haswarm glusterfs "
         "defaults,_netdev,backup-volfile-servers=10.77.0.12:10.77.0.13 0 0")


def test_fstab_entry_added_then_idempotent_then_removed_exactly() -> None:
    once = gluster_facts.fstab_with_entry(USER_FSTAB, ENTRY, "/mnt/haswarm", "haswarm")
    assert once.startswith(USER_FSTAB)  # every user line kept, in place
    assert once.count(ENTRY) == 1 and once.count(gluster_facts.FSTAB_MARKER) == 1
    assert gluster_facts.fstab_with_entry(once, ENTRY, "/mnt/haswarm", "haswarm") == once
    assert gluster_facts.fstab_without_entry(once, "/mnt/haswarm", "haswarm") == USER_FSTAB
    assert gluster_facts.fstab_without_entry(USER_FSTAB, "/mnt/haswarm", "haswarm") == USER_FSTAB


def test_fstab_entry_replaced_in_place() -> None:
    old = gluster_facts.fstab_with_entry(DEBIAN_FSTAB, ENTRY.replace("10.77.0.13", "10.77.0.14"),
                                         "/mnt/haswarm", "haswarm")
    old += "/dev/sdb1 /data ext4 defaults 0 2\n"
    new = gluster_facts.fstab_with_entry(old, ENTRY, "/mnt/haswarm", "haswarm")
    assert "10.77.0.14" not in new and new.count(ENTRY) == 1
    assert new.splitlines()[0] == DEBIAN_FSTAB.strip()
    assert new.splitlines()[-1] == "/dev/sdb1 /data ext4 defaults 0 2"  # order kept


def test_fstab_unmarked_glusterfs_line_on_the_mount_point_is_ours() -> None:
    # e.g. written by hand after the 2019 instructions: replaced, not doubled
    legacy = DEBIAN_FSTAB + "localhost:/haswarm /mnt/haswarm/ glusterfs defaults 0 0\n"
    new = gluster_facts.fstab_with_entry(legacy, ENTRY, "/mnt/haswarm", "haswarm")
    assert [line for line in new.splitlines() if "glusterfs" in line] == [ENTRY]
    assert gluster_facts.fstab_without_entry(new, "/mnt/haswarm", "haswarm") == DEBIAN_FSTAB


def test_fstab_changed_mount_point_replaces_the_old_line_other_volumes_kept() -> None:
    old = gluster_facts.fstab_with_entry(USER_FSTAB, ENTRY, "/mnt/haswarm", "haswarm")
    other = gluster_facts.fstab_with_entry(old, ENTRY.replace("/haswarm", "/other"), "/mnt/other",
                                           "other")
    moved = ENTRY.replace(" /mnt/haswarm ", " /srv/ha ")
    new = gluster_facts.fstab_with_entry(other, moved, "/srv/ha", "haswarm")
    assert moved in new and ENTRY not in new  # same volume: its old line replaced in place
    assert ENTRY.replace("/haswarm", "/other") in new  # another volume's line is not ours
    assert gluster_facts.fstab_without_entry(new, "/srv/ha", "haswarm") == \
        gluster_facts.fstab_without_entry(other, "/mnt/haswarm", "haswarm")


def test_fstab_file_without_trailing_newline() -> None:
    new = gluster_facts.fstab_with_entry("/dev/sda1 / ext4 defaults 0 1", ENTRY, "/mnt/haswarm",
                                         "hw")
    assert new.splitlines()[0] == "/dev/sda1 / ext4 defaults 0 1" and new.endswith(ENTRY + "\n")


def test_fstab_conflict_with_another_filesystem(c: Cluster) -> None:
    fstab = DEBIAN_FSTAB + "/dev/sdb1 /mnt/haswarm ext4 defaults 0 2\n"
    assert gluster_facts.fstab_conflicts(fstab, "/mnt/haswarm", "haswarm") == [
        "/dev/sdb1 /mnt/haswarm ext4 defaults 0 2"]
    facts = gluster_facts.MountFacts(fstab=fstab, types=[], alive=False, exists=True)
    with pytest.raises(StepError, match="choose another gluster.mount_point"):
        gluster_plans.plan_mount(c, ENTRY, facts)


def test_escaped_mount_point() -> None:
    proc = "localhost:/v /mnt/my\\040volume fuse.glusterfs rw 0 0\n"
    assert gluster_facts.mounted_types(proc, "/mnt/my volume") == ["fuse.glusterfs"]
    line = "localhost:/v /mnt/my\\040volume glusterfs defaults 0 0"
    fstab = DEBIAN_FSTAB + line + "\n"
    assert gluster_facts.fstab_without_entry(fstab, "/mnt/my volume", "v") == DEBIAN_FSTAB


PROC_MOUNTS = recorded("mounts/proc-mounts.txt")


def test_mount_facts_from_probe_output(c: Cluster) -> None:
    # the probe script runs in sh; its sections come back apart
    out = sh(fact_lib.probe_script({"a": "echo one; echo two", "b": "false", "c": "echo 3"}))
    assert fact_lib.parse_sections(out.stdout) == {"a": "one\ntwo\n", "b": "", "c": "3\n"}
    facts = gluster_facts.mount_facts(c, {"fstab": "@@missing@@\n", "mounts": PROC_MOUNTS,
                                          "alive": "yes\n", "exists": "yes\n"})
    assert facts == gluster_facts.MountFacts(fstab=None, types=["fuse.glusterfs"], alive=True,
                                             exists=True)
    # a dead mount: `[ -d ]` fails on it, yet it exists (no mkdir; rmdir after umount -l)
    dead = gluster_facts.mount_facts(c, {"fstab": DEBIAN_FSTAB, "mounts": PROC_MOUNTS,
                                         "alive": "no\n", "exists": "no\n"})
    assert dead.exists and not dead.alive


def test_plan_mount_fresh_node(c: Cluster) -> None:
    facts = gluster_facts.MountFacts(fstab=DEBIAN_FSTAB, types=[], alive=False, exists=False)
    ops = gluster_plans.plan_mount(c, ENTRY, facts)
    assert [op.what for op in ops] == ["write haswarm's line in /etc/fstab (/mnt/haswarm)",
                                       "create /mnt/haswarm", "mount /mnt/haswarm"]
    assert ops[0].put == ("/etc/fstab", gluster_facts.fstab_with_entry(DEBIAN_FSTAB, ENTRY,
                                                                       "/mnt/haswarm", "haswarm"))
    assert ops[2].cmd.startswith("mount /mnt/haswarm")


def test_plan_mount_converged_and_dead(c: Cluster) -> None:
    fstab = gluster_facts.fstab_with_entry(DEBIAN_FSTAB, ENTRY, "/mnt/haswarm", "haswarm")
    live = gluster_facts.MountFacts(fstab=fstab, types=["fuse.glusterfs"], alive=True, exists=True)
    assert gluster_plans.plan_mount(c, ENTRY, live) == []
    dead = gluster_facts.MountFacts(fstab=fstab, types=["fuse.glusterfs"], alive=False, exists=True)
    assert cmds(gluster_plans.plan_mount(c, ENTRY, dead))[0] == "umount -l /mnt/haswarm"
    assert cmds(gluster_plans.plan_mount(c, ENTRY, dead))[1].startswith("mount /mnt/haswarm")


def test_plan_mount_clean(c: Cluster) -> None:
    fstab = gluster_facts.fstab_with_entry(USER_FSTAB, ENTRY, "/mnt/haswarm", "haswarm")
    live = gluster_facts.MountFacts(fstab=fstab, types=["fuse.glusterfs"], alive=True, exists=True)
    ops = gluster_plans.plan_mount_clean(c, live)
    assert ops[0].cmd == "umount /mnt/haswarm || umount -l /mnt/haswarm"
    assert ops[1].put == ("/etc/fstab", USER_FSTAB)
    assert ops[2].cmd.startswith("rmdir /mnt/haswarm")  # only when empty
    dead = gluster_facts.MountFacts(fstab=fstab, types=["fuse.glusterfs"], alive=False, exists=True)
    assert gluster_plans.plan_mount_clean(c, dead)[0].cmd == "umount -l /mnt/haswarm"
    # never the parent (the 2019 system unmounted a path below the real mount point)
    assert all("/mnt/haswarm/" not in (op.cmd or "") for op in ops)
    clean = gluster_facts.MountFacts(fstab=USER_FSTAB, types=[], alive=False, exists=False)
    assert gluster_plans.plan_mount_clean(c, clean) == []


def test_plan_mount_clean_leaves_a_foreign_filesystem(c: Cluster) -> None:
    below = gluster_facts.MountFacts(fstab=DEBIAN_FSTAB, types=["ext4", "fuse.glusterfs"],
                                     alive=True, exists=True)
    ops = gluster_plans.plan_mount_clean(c, below)
    assert [op.what for op in ops] == ["unmount /mnt/haswarm"]  # ours on top; no rmdir


# ---------------------------------------------------------------------------------------------
# Service directories


def test_plan_dirs(c: Cluster) -> None:
    created = cmds(gluster_plans.plan_dirs(c, {}))
    assert created == [
        "install -d -m 700 -o 0 -g 0 /mnt/haswarm/homeassistant",
        "install -d -m 755 -o 0 -g 0 /mnt/haswarm/mosquitto",
        "install -d -m 750 -o 1883 -g 1883 /mnt/haswarm/mosquitto/data",
    ]
    owners = gluster_facts.parse_stat_owner("/mnt/haswarm/homeassistant 0\n"
                                            "/mnt/haswarm/mosquitto 0\n"
                                            "/mnt/haswarm/mosquitto/data 0\n")
    assert cmds(gluster_plans.plan_dirs(c, owners)) == [
        "chown 1883:1883 /mnt/haswarm/mosquitto/data"]
    owners["/mnt/haswarm/mosquitto/data"] = 1883
    assert gluster_plans.plan_dirs(c, owners) == []


# ---------------------------------------------------------------------------------------------
# Home Assistant's files


@pytest.mark.parametrize(("text", "loads"), [
    ("homeassistant:\n  packages: !include_dir_named packages\n", True),
    ("homeassistant:\n  packages: !include_dir_named packages/  # haswarm\n", True),
    ("homeassistant:\n  packages: !include_dir_named 'packages'\n", True),
    ("homeassistant:\n  packages:\n    haswarm: !include packages/haswarm/haswarm.yaml\n", True),
    ("homeassistant:\n  # packages: !include_dir_named packages\n", False),
    ("homeassistant:\n  packages: !include_dir_merge_named packages\n", False),
    ("default_config:\n", False),
])
def test_loads_haswarm_package(text: str, loads: bool) -> None:
    assert homeassistant.loads_haswarm_package(text) is loads


def test_plan_ha_files(c: Cluster) -> None:
    import hashlib

    pkg, conf = "recorder:\n  commit_interval: 5\n", "homeassistant:\n  packages: x\n"
    ops, warnings = homeassistant.plan_files(c, pkg, conf, homeassistant.HAFacts(None, None))
    assert [op.put for op in ops] == [
        ("/mnt/haswarm/homeassistant/packages/haswarm/haswarm.yaml", pkg),
        ("/mnt/haswarm/homeassistant/configuration.yaml", conf),
    ]
    assert warnings == []
    users = ("homeassistant:\n  name: Home\n  packages: !include_dir_named packages\n"
             "automation: []\n")
    same = homeassistant.HAFacts(hashlib.sha256(pkg.encode()).hexdigest(), users)
    assert homeassistant.plan_files(c, pkg, conf, same) == ([], [])
    # the user's configuration.yaml is never written, even without the packages line: a warning
    stale = homeassistant.HAFacts("0" * 64, "homeassistant:\n  name: Home\n")
    ops, warnings = homeassistant.plan_files(c, pkg, conf, stale)
    assert [op.what for op in ops] == ["write packages/haswarm/haswarm.yaml"]
    assert len(warnings) == 1 and "packages: !include_dir_named packages" in warnings[0]


def test_plan_ha_clean_keeps_configuration(c: Cluster) -> None:
    everything = {homeassistant.PACKAGE, homeassistant.PACKAGE_SECRETS, "packages/haswarm"}
    ops = homeassistant.plan_clean(c, everything)
    assert all("configuration.yaml" not in (op.cmd or "") for op in ops)
    assert [op.what for op in ops][:2] == ["remove packages/haswarm/haswarm.yaml",
                                           "remove packages/haswarm/secrets.yaml"]
    assert homeassistant.plan_clean(c, set()) == []


# ---------------------------------------------------------------------------------------------
# Avahi


def server_host_names(conf: str) -> list[str]:
    section = conf.split("[server]", 1)[1].split("\n[", 1)[0]
    return [line for line in section.splitlines() if line.startswith("host-name=")]


def test_avahi_host_name_set_idempotent_and_restored() -> None:
    once = avahi.set_host_name(AVAHI_CONF, "hacluster")
    assert server_host_names(once) == ["host-name=hacluster"]
    assert f"{avahi.MARKER} #host-name=foo" in once
    assert avahi.set_host_name(once, "hacluster") == once
    assert avahi.restore_host_name(once) == AVAHI_CONF
    assert avahi.restore_host_name(AVAHI_CONF) == AVAHI_CONF  # never touched: unchanged


def test_avahi_active_host_name_is_kept_for_restore() -> None:
    conf = AVAHI_CONF.replace("#host-name=foo", "host-name=kitchen-pi")
    ours = avahi.set_host_name(conf, "hacluster")
    assert server_host_names(ours) == ["host-name=hacluster"]
    renamed = avahi.set_host_name(ours, "house")  # a new mdns.name: same line, same backup
    assert server_host_names(renamed) == ["host-name=house"]
    assert avahi.restore_host_name(renamed) == conf


def test_avahi_without_host_name_line_or_section() -> None:
    conf = AVAHI_CONF.replace("#host-name=foo\n", "")
    ours = avahi.set_host_name(conf, "hacluster")
    assert server_host_names(ours) == ["host-name=hacluster"]
    assert avahi.restore_host_name(ours) == conf
    bare = "[publish]\npublish-hinfo=no\n"
    assert server_host_names(avahi.set_host_name(bare, "hacluster")) == ["host-name=hacluster"]


def test_plan_avahi_hostname(c: Cluster) -> None:
    ours = avahi.set_host_name(AVAHI_CONF, "hacluster")
    restart = c.mdns.restart_command
    assert cmds(avahi.plan_hostname(c, AVAHI_CONF, running=True)) == [
        f"put {avahi.AVAHI_CONF}", restart]
    assert avahi.plan_hostname(c, ours, running=True) == []
    assert cmds(avahi.plan_hostname(c, ours, running=False)) == [restart]
    with pytest.raises(StepError, match="apt-get install avahi-daemon"):
        avahi.plan_hostname(c, None, running=False)
    assert cmds(avahi.plan_hostname_clean(c, ours)) == [f"put {avahi.AVAHI_CONF}", restart]
    assert avahi.plan_hostname_clean(c, AVAHI_CONF) == []
    assert avahi.plan_hostname_clean(c, None) == []


# ---------------------------------------------------------------------------------------------
# The doit tasks: shape only, no connection at load time


def _tasks(c: Cluster, monkeypatch: pytest.MonkeyPatch) -> dict[str, dict]:
    import tasks.remote

    def no_ssh(*a: object, **k: object) -> None:
        raise AssertionError("a task creator opened a connection")

    monkeypatch.setattr(tasks.remote.Remote, "__init__", no_ssh)
    for module in (gluster, homeassistant, avahi):
        monkeypatch.setattr(module, "current", lambda: c)
    out = {}
    for t in gluster.task_gluster():
        out[f"gluster:{t['name']}"] = t
    for t in avahi.task_avahi():
        out[f"avahi:{t['name']}"] = t
    ha = homeassistant.task_ha_files()
    out[ha["basename"]] = ha
    return out


def test_task_graph(c: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = _tasks(c, monkeypatch)
    deps = {name: t["task_dep"] for name, t in tasks.items()}
    assert deps == {
        "gluster:daemon": [],
        "gluster:replace": ["gluster:daemon"],
        "gluster:peers": ["gluster:replace"],
        "gluster:bricks": ["gluster:daemon"],
        "gluster:volume": ["gluster:peers", "gluster:bricks"],
        "gluster:mount": ["gluster:volume"],
        "gluster:dirs": ["gluster:mount"],
        "ha-files": ["gluster"],
        "avahi:hostname": ["gluster"],
        "avahi:cron": ["avahi:hostname"],
    }
    for name, t in tasks.items():
        assert t["doc"], name
        assert t["uptodate"] == [False], name  # always asks the nodes: they are the truth
        assert "targets" not in t, name
        (clean,) = t["clean"]
        assert "dryrun" in inspect.signature(clean).parameters, name
    build = str(c.build_dir)
    assert tasks["gluster:mount"]["file_dep"] == [f"{build}/nodes/pi{i}/fstab" for i in (1, 2, 3)]
    assert tasks["avahi:cron"]["file_dep"] == [f"{build}/avahi-restart.cron"]
    assert tasks["ha-files"]["file_dep"] == [
        f"{build}/homeassistant/packages/haswarm/haswarm.yaml",
        f"{build}/homeassistant/configuration.yaml"]


def test_avahi_cron_off_has_no_rendered_input(c: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    off = c.model_copy(update={"mdns": c.mdns.model_copy(update={"restart_cron": False})})
    tasks = _tasks(off, monkeypatch)
    assert tasks["avahi:cron"]["file_dep"] == []
    assert "absent" in tasks["avahi:cron"]["doc"]


def test_every_step_has_a_dry_run() -> None:
    """`doit plan` runs each setup step with dryrun=True."""
    import dodo
    from tasks import plan

    steps = plan.steps(dodo.SETUP)  # every task of setup is known to `doit plan`
    assert [name for name, _ in steps][:4] == ["depart", "firewall:script", "firewall:rules",
                                               "preload-images"]
    for name, fn in steps:
        assert "dryrun" in inspect.signature(fn).parameters, name


# -- bricks that serve no client -----------------------------------------------------------------


def _procs(**by_host: str) -> dict:
    from tasks.facts_cluster import BrickProcess

    shapes = {"ok": BrickProcess(True, 49152, 10), "lost": BrickProcess(True, None, 4242),
              "down": BrickProcess(False, None, None)}
    return {f"10.77.0.{i}:/srv/gluster/haswarm": shapes[v] for i, v in by_host.items()}


@pytest.mark.parametrize("first,second,want", [
    # all serve, or a brick that serves by the second read (it was starting): nothing
    ({"11": "ok", "12": "ok", "13": "ok"}, {"11": "ok", "12": "ok", "13": "ok"}, []),
    ({"11": "ok", "12": "ok", "13": "lost"}, {"11": "ok", "12": "ok", "13": "ok"}, []),
    # a node that is down is absent from the output: nothing
    ({"11": "ok", "12": "ok"}, {"11": "ok", "12": "ok"}, []),
    # running without a port on pi3: stop it there, then start force
    ({"11": "ok", "12": "ok", "13": "lost"}, {"11": "ok", "12": "ok", "13": "lost"},
     [("pi3", "kill 4242"), (None, "volume start haswarm force")]),
    # stopped: start force only
    ({"11": "ok", "12": "down", "13": "ok"}, {"11": "ok", "12": "down", "13": "ok"},
     [(None, "volume start haswarm force")]),
])
def test_plan_brick_restarts(c, first, second, want):
    ops = gluster_plans.plan_brick_restarts(c, _procs(**first), _procs(**second))
    assert len(ops) == len(want)
    for op, (node, part) in zip(ops, want, strict=True):
        assert op.node == node and part in op.cmd
    if ops and ops[0].node == "pi3":
        assert "glusterfsd" in ops[0].cmd  # only a brick process is ever killed
