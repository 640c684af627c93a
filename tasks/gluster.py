"""GlusterFS: a replica volume over every node, mounted on every node through fstab.

Setup, in order (doit subtasks of `gluster`; each clean action sits beside its setup step and
undoes exactly it, so `doit clean` runs them in the reverse order):

    gluster:daemon  glusterd answers on every node         clean: nothing (glusterd stays installed)
    gluster:replace a re-flashed node (same name and address) clean: nothing to undo
                    back under its old UUID, an empty brick
                    reset and healed (tasks/gluster_replace.py)
    gluster:peers   the first node probes the others       clean: peers detached
    gluster:bricks  brick dirs exist on every node         clean: kept; `purge=yes` removes them
    gluster:volume  replica N volume, options, started;    clean: stopped and deleted
                    it follows `nodes:`: a new node's brick
                    added (replica N+1) and healed, the
                    brick of a Pi no longer listed removed
                    (N-1) or moved to its replacement, and
                    that Pi detached from the pool
    gluster:mount   fstab line + FUSE mount on every node  clean: unmounted, haswarm's line removed
    gluster:dirs    service dirs created on the volume     clean: kept (user data, on the bricks)

Every step reads facts from the nodes first and runs only the commands those facts call for; a
converged node prints "nothing to do". The fact -> command logic is made of pure functions (the
`plan_*`, `parse_*` and `fstab_*` ones) so unit tests feed them recorded facts.
The facts (probes, parsers, fstab text) are in tasks/gluster_facts.py, the plans in
tasks/gluster_plans.py; this module runs the steps and builds the doit tasks.

Always `gluster --mode=script`: the interactive confirmation exits 0 even when it was answered
"n". Errors that mean "already done" ("does not exist", "not in the started state", "is not part
of cluster") are treated as success by the clean steps.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

from tasks import render
from tasks.config import Cluster, Node, current, purge_requested
from tasks.facts import gather
from tasks.gluster_facts import (
    DAEMON_PROBES,
    GLUSTER,
    GLUSTER_CHANGE_TIMEOUT,
    PEER_STATUS,
    GlusterOutputError,
    Peer,
    Volume,
    brick_hosts,
    is_gluster,
    mount_facts,
    mount_probes,
    parse_peer_status,
    parse_stat_owner,
    parse_volume_info,
    status_command,
    volume_info_command,
)
from tasks.gluster_plans import (
    START_GLUSTERD,
    departed_peers,
    peers_not_ready,
    peers_to_probe,
    plan_brick_restarts,
    plan_daemon,
    plan_dirs,
    plan_mount,
    plan_mount_clean,
    plan_volume,
    plan_volume_clean,
    replica_count,
    service_dirs,
    tolerant,
)
from tasks.gluster_replace import clean_replace, setup_replace, wait_healed
from tasks.ops import Op, StepError, apply_ops, on_nodes, remote_task, say

if TYPE_CHECKING:
    from tasks.facts_cluster import BrickProcess
    from tasks.remote import Remote

# Seconds to wait for glusterd to answer after starting it, and for probed peers to connect.
DAEMON_WAIT = 30
PEER_WAIT = 60
# Deadline of removing a brick (`purge=yes`): Home Assistant's config with its backups may be
# gigabytes on an SD card.
BRICK_REMOVE_TIMEOUT = 900.0


# ---------------------------------------------------------------------------------------------
# The steps (actions of the doit tasks below): each gets the cluster and an open Remote


def _glusterd_answers(r: Remote, node: Node, step: str) -> bool:
    res = r.run(node, step, f"timeout 20 {GLUSTER} peer status >/dev/null 2>&1", check=False)
    return res.ok


def setup_daemon(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """glusterd answers on every node (started, and enabled under systemd, when it does not)."""
    from tasks.remote import progress

    step = "gluster:daemon"

    def one(node: Node) -> bool:
        with r.reading():
            ops = plan_daemon(gather(r, node, step, DAEMON_PROBES))
        changed = apply_ops(r, node, step, ops, dryrun=dryrun)
        if not dryrun and any(op.cmd == START_GLUSTERD for op in ops):
            deadline = time.monotonic() + DAEMON_WAIT
            while not _glusterd_answers(r, node, step):
                if time.monotonic() > deadline:
                    r.run(node, step, f"{GLUSTER} peer status", hint=(
                        f"glusterd did not answer within {DAEMON_WAIT} s of starting; see "
                        "/var/log/glusterfs/glusterd.log on the node"))
                time.sleep(0.3)
            progress(node, f"{step}: glusterd answers")
        return changed

    return {"changed": sorted(n for n, ch in on_nodes(r, step, one).items() if ch)}


def clean_daemon(c: Cluster, r: Remote, dryrun: bool) -> None:
    """glusterd is left installed and running (the package is not haswarm's to remove)."""
    say(c.nodes[0], "gluster:daemon (clean): glusterd left running on every node "
                     "(it serves no volume and no peers any more)")


def setup_peers(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """The first node probes every node its `peer status` lacks; wait until all are connected."""
    from tasks.remote import progress

    step = "gluster:peers"

    def status(first: Node) -> list[Peer]:
        return parse_peer_status(r.run(first, step, PEER_STATUS).stdout)

    def one(first: Node) -> dict[str, Any]:
        with r.reading():
            peers = status(first)
        ops = [Op(f"probe {n.name} ({n.address})",
                  f"{GLUSTER} peer probe {shlex.quote(n.address)}",
                  hint=f"if {n.address} is already in another trusted pool, detach it there "
                  "first (gluster peer detach); every node's glusterd must be reachable on TCP "
                  "24007", timeout=GLUSTER_CHANGE_TIMEOUT)
               for n in peers_to_probe(c, peers)]
        apply_ops(r, first, step, ops, dryrun=dryrun)
        deadline = time.monotonic() + PEER_WAIT
        while not dryrun and (waiting := peers_not_ready(c, peers)):
            if time.monotonic() > deadline:
                raise StepError(
                    f"peers {', '.join(waiting)} not 'Peer in Cluster (Connected)' after "
                    f"{PEER_WAIT} s.\n  what to do: check `gluster peer status` on "
                    f"{first.name} and that glusterd runs on {', '.join(waiting)}")
            if ops:
                progress(first, f"{step}: waiting for {', '.join(waiting)} to join")
            time.sleep(0.25)
            peers = status(first)
        return {"probed": [op.what for op in ops]}

    return on_nodes(r, step, one, c.nodes[:1])[c.nodes[0].name]


def clean_peers(c: Cluster, r: Remote, dryrun: bool) -> None:
    """Detach every cluster node from the trusted pool (seen from any node that lists it)."""
    from tasks.remote import RemoteError

    step = "gluster:peers (clean)"
    ours = {n.address: n for n in c.nodes} | {n.name: n for n in c.nodes}
    detached: set[str] = set()
    unreachable: list[RemoteError] = []
    for node in c.nodes:
        try:
            res = r.run(node, step, PEER_STATUS, check=False)
        except RemoteError as e:
            unreachable.append(e)  # the others are detached all the same; reported below
            continue
        try:
            peers = parse_peer_status(res.stdout)
        except GlusterOutputError:
            say(node, f"{step}: glusterd does not answer here, skipped")
            continue
        ops = []
        if peers:
            detached.add(node.name)  # detaching all its peers takes this node out as well
        for p in peers:
            target = next((ours[name] for name in p.names if name in ours), None)
            if target is None or target.name in detached:
                continue  # not ours (leave it), or out of the pool already
            detached.add(target.name)
            a = shlex.quote(target.address)
            ops.append(Op(
                f"detach peer {target.name} ({target.address})",
                tolerant(f"{GLUSTER} peer detach {a}", "is not part of cluster"),
                hint="a volume using its brick must be deleted first (gluster:volume); a peer "
                "that is down can be dropped with: gluster --mode=script peer detach ADDR force",
                timeout=GLUSTER_CHANGE_TIMEOUT))
        apply_ops(r, node, step, ops, dryrun=dryrun)
    if unreachable:
        raise RemoteError([f for e in unreachable for f in e.failures])


def setup_bricks(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """The brick directory exists on every node."""
    step = "gluster:bricks"
    b = shlex.quote(str(c.gluster.brick_dir))

    def one(node: Node) -> bool:
        with r.reading():
            exists = r.run(node, step, f"[ -d {b} ]", check=False).ok
        ops = [] if exists else [Op(f"create brick dir {c.gluster.brick_dir}", f"mkdir -p {b}")]
        return apply_ops(r, node, step, ops, dryrun=dryrun)

    return {"created": sorted(n for n, ch in on_nodes(r, step, one).items() if ch)}


def clean_bricks(c: Cluster, r: Remote, dryrun: bool) -> None:
    """Kept (user data) unless `purge=yes`: then removed with Gluster's metadata and xattrs."""
    step = "gluster:bricks (clean)"
    brick = str(c.gluster.brick_dir)
    if not purge_requested():
        for node in c.nodes:
            say(node, f"{step}: brick {brick} kept (user data; `doit purge=yes clean` "
                       "removes it)")
        return
    b = shlex.quote(brick)
    v = shlex.quote(c.gluster.volume)

    def one(node: Node) -> None:
        facts = gather(r, node, step, {
            "exists": f"if [ -e {b} ]; then echo yes; else echo no; fi",
            "volume": f"timeout 20 {GLUSTER} --xml volume info {v}",
        })
        try:
            vol = parse_volume_info(facts.get("volume", ""))
        except GlusterOutputError:
            vol = None  # glusterd down here: no brick process can use the dir
        if vol is not None and not dryrun:  # (a dry run did not delete it before)
            raise StepError(f"volume {c.gluster.volume} still exists; its bricks are not "
                            "removed.\n  what to do: `doit clean gluster:volume` first")
        ops = []
        if facts.get("exists", "").strip() == "yes":
            ops.append(Op(f"remove brick {brick} (data, .glusterfs, trusted.* xattrs)",
                          f"rm -rf --one-file-system {b}", timeout=BRICK_REMOVE_TIMEOUT))
        apply_ops(r, node, step, ops, dryrun=dryrun)

    on_nodes(r, step, one)


def _volume_on(r: Remote, node: Node, c: Cluster, step: str) -> Volume | None:
    res = r.run(node, step, volume_info_command(c.gluster.volume), check=False)
    try:
        return parse_volume_info(res.stdout)
    except GlusterOutputError as e:
        raise StepError(f"{e}.\n  what to do: check that glusterd runs on {node.name} "
                        "(gluster:daemon)") from None


def setup_volume(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """Create the replica volume when absent, set its options, start it (from the first node)."""
    step = "gluster:volume"

    def one(first: Node) -> dict[str, Any]:
        with r.reading():
            before = _volume_on(r, first, c, step)
        healed = partial(wait_healed, c=c, via=first.name)
        changed = apply_ops(r, first, step, plan_volume(c, before, healed), dryrun=dryrun)
        if dryrun:
            if before is not None and before.status == "Started":
                restart_bricks(c, r, first, step, dryrun=True)  # `doit plan` shows them too
            return {}
        vol = _volume_on(r, first, c, step) if changed else before  # unchanged: as just read
        if vol is None or vol.status != "Started":
            raise StepError(f"volume {c.gluster.volume} is not started after setup.\n  what to "
                            f"do: see `gluster volume status {c.gluster.volume}` on the node")
        restart_bricks(c, r, first, step)
        detach_departed(c, r, first, vol, step)
        return {"volume": vol.name, "type": vol.type, "bricks": list(vol.bricks)}

    return on_nodes(r, step, one, c.nodes[:1])[c.nodes[0].name]


def detach_departed(c: Cluster, r: Remote, first: Node, vol: Volume, step: str) -> None:
    """Take the peers that are no node of the cluster file and hold no brick of any volume (a
    replaced Pi, once its brick moved) out of the pool (`force`: the old Pi may be dead). A peer
    with a brick of another volume of the user's stays."""
    with r.reading():
        peers = parse_peer_status(r.run(first, step, PEER_STATUS).stdout)
    gone = departed_peers(c, peers, set(b.rsplit(":", 1)[0] for b in vol.bricks))
    if gone:  # only then: the bricks of every volume
        hosts = brick_hosts(r.run(first, step, f"{GLUSTER} --xml volume info").stdout)
        gone = departed_peers(c, gone, hosts)
    if gone:
        apply_ops(r, first, step, [
            Op(f"detach {p.names[0]} from the pool (no node of the cluster file, no brick)",
               f"{GLUSTER} peer detach {shlex.quote(p.names[0])} force",
               timeout=GLUSTER_CHANGE_TIMEOUT) for p in gone])


def _brick_processes(c: Cluster, r: Remote, node: Node, step: str) -> dict[str, BrickProcess]:
    from tasks.facts_cluster import parse_brick_processes

    res = r.run(node, step, status_command(c), check=False, timeout=30)
    procs = parse_brick_processes(res.stdout)
    if procs is None:
        raise StepError(f"`gluster volume status {c.gluster.volume}` failed: "
                        f"{(res.stdout + res.stderr).strip()[-300:]}\n  what to do: check that "
                        f"glusterd runs on {node.name} (gluster:daemon)")
    return procs


def restart_bricks(c: Cluster, r: Remote, node: Node, step: str, *, dryrun: bool = False,
                   settle: float = 3.0) -> list[str]:
    """Restart the volume's bricks that serve no client although their node is up (seen from
    `node`); returns the bricks that needed it. Fails when one still does not serve after."""
    with r.reading():
        procs = _brick_processes(c, r, node, step)
    if all(p.serving for p in procs.values()):
        return []
    time.sleep(settle)  # a brick that is starting up serves by now
    again = _brick_processes(c, r, node, step)
    ops = plan_brick_restarts(c, procs, again)
    if not ops or dryrun:
        apply_ops(r, node, step, ops, dryrun=dryrun)
        return []
    broken = sorted(b for b, p in again.items() if not p.serving)
    apply_ops(r, node, step, ops)
    deadline = time.monotonic() + 30
    while True:
        now = _brick_processes(c, r, node, step)
        still = [b for b in broken if b in now and not now[b].serving]
        if not still:
            return broken
        if time.monotonic() > deadline:
            raise StepError(f"brick(s) {', '.join(still)} still serve no client 30 s after "
                            "`volume start force`.\n  what to do: read the brick's log under "
                            "/var/log/glusterfs/bricks/ on its node; `systemctl restart "
                            "glusterd` there, then `doit setup` again")
        time.sleep(1)


def clean_volume(c: Cluster, r: Remote, dryrun: bool) -> None:
    """Stop and delete the volume (seen from the first node whose glusterd answers)."""
    from tasks.remote import RemoteError

    step = "gluster:volume (clean)"
    for node in c.nodes:
        try:
            vol = _volume_on(r, node, c, step)
        except (StepError, RemoteError) as e:
            why = "unreachable" if isinstance(e, RemoteError) else "glusterd does not answer"
            say(node, f"{step}: {why}, trying the next node")
            continue
        apply_ops(r, node, step, plan_volume_clean(c, vol), dryrun=dryrun)
        return
    raise StepError(f"no node's glusterd answers: volume {c.gluster.volume} was not deleted.\n"
                    "  what to do: start glusterd on the nodes (gluster:daemon) and clean again")


def fstab_entry(c: Cluster, node: Node) -> str:
    """The node's rendered fstab line (tasks.render writes it)."""
    return (render.build_dir(c) / "nodes" / node.name / "fstab").read_text().strip()


def setup_mount(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """haswarm's fstab line on every node, and the volume mounted there."""
    step = "gluster:mount"
    entries = {n.name: fstab_entry(c, n) for n in c.nodes}

    def one(node: Node) -> bool:
        with r.reading():
            facts = mount_facts(c, gather(r, node, step, mount_probes(c)))
        changed = apply_ops(r, node, step, plan_mount(c, entries[node.name], facts),
                            dryrun=dryrun)
        if changed and not dryrun:
            after = mount_facts(c, gather(r, node, step, mount_probes(c)))
            if not (after.alive and any(is_gluster(t) for t in after.types)):
                raise StepError(f"{c.gluster.mount_point} is not a live glusterfs mount "
                                "after mounting.\n  what to do: see the client log under "
                                "/var/log/glusterfs/ on the node")
        return changed

    return {"changed": sorted(n for n, ch in on_nodes(r, step, one).items() if ch)}


def clean_mount(c: Cluster, r: Remote, dryrun: bool) -> None:
    """Unmount `mount_point` on every node and remove haswarm's fstab line."""
    step = "gluster:mount (clean)"

    def one(node: Node) -> None:
        facts = mount_facts(c, gather(r, node, step, mount_probes(c)))
        apply_ops(r, node, step, plan_mount_clean(c, facts), dryrun=dryrun)

    on_nodes(r, step, one)


def mounted_node(c: Cluster, r: Remote, step: str) -> Node | None:
    """The first node (cluster order) where the volume is mounted and answers."""
    for node in c.nodes:
        try:
            facts = mount_facts(c, gather(r, node, step, mount_probes(c)))
        except Exception:  # noqa: BLE001 - an unreachable node: try the next one
            continue
        if facts.alive and any(is_gluster(t) for t in facts.types):
            return node
    return None


def setup_dirs(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """Service directories on the volume (through one node's mount): HA config, Mosquitto data."""
    step = "gluster:dirs"
    with r.reading():
        node = mounted_node(c, r, step)
    if node is None and dryrun:
        say(c.nodes[0], f"{step}: would create {', '.join(d.path for d in service_dirs(c))} "
                        "once the volume is mounted")
        return {}
    if node is None:
        raise StepError(f"the volume is mounted on no node at {c.gluster.mount_point}.\n"
                        "  what to do: run `doit gluster:mount` first")
    paths = " ".join(shlex.quote(d.path) for d in service_dirs(c))
    with r.reading():
        owners = parse_stat_owner(r.run(node, step, f"stat -c '%n %u' {paths} 2>/dev/null",
                                        check=False).stdout)
    apply_ops(r, node, step, plan_dirs(c, owners), dryrun=dryrun)
    return {"via": node.name}


def clean_dirs(c: Cluster, r: Remote, dryrun: bool) -> None:
    """The service directories hold user data: kept (with `purge=yes` the bricks go)."""
    say(c.nodes[0], f"gluster:dirs (clean): {', '.join(d.path for d in service_dirs(c))} kept "
                     "on the volume (user data)")


# ---------------------------------------------------------------------------------------------
# The doit tasks


def task_gluster() -> Iterator[dict[str, Any]]:
    """GlusterFS replica volume on every node, mounted at gluster.mount_point (fstab)."""
    c = current()
    g = c.gluster
    fstabs = [str(render.build_dir(c) / "nodes" / n.name / "fstab") for n in c.nodes]
    yield remote_task(c, "gluster-daemon", "daemon", "glusterd running on every node",
                      setup_daemon, clean_daemon)
    yield remote_task(c, "gluster-replace", "replace",
                      "a re-flashed node back in the pool under its old UUID; empty bricks "
                      "reset and healed", setup_replace, clean_replace,
                      task_dep=["gluster:daemon"])
    yield remote_task(c, "gluster-peers", "peers", "trusted pool: the first node probes the rest",
                      setup_peers, clean_peers,
                      task_dep=["gluster:replace"])
    yield remote_task(c, "gluster-bricks", "bricks", f"brick dir {g.brick_dir} on every node",
                      setup_bricks, clean_bricks,
                      task_dep=["gluster:daemon"])
    yield remote_task(c, "gluster-volume", "volume",
                      f"replica {replica_count(c)} volume {g.volume}: options, started",
                      setup_volume, clean_volume,
                      task_dep=["gluster:peers", "gluster:bricks"])
    yield remote_task(c, "gluster-mount", "mount",
                      f"volume mounted at {g.mount_point} on every node (fstab)",
                      setup_mount, clean_mount,
                      file_dep=fstabs,
                      task_dep=["gluster:volume"])
    yield remote_task(c, "gluster-dirs", "dirs",
                      "Home Assistant and Mosquitto directories on the volume",
                      setup_dirs, clean_dirs,
                      task_dep=["gluster:mount"])
