"""Gluster: a dead Pi back under the same name and address, re-flashed (`gluster:replace`).

The node comes back with a fresh glusterd: a new UUID, no peers, no volume; and an empty brick
dir. The pool still lists its address under the OLD UUID (Disconnected, or "Peer Rejected" once
the new glusterd refused the pool's friend request: it does not know the pool). Probing it as a
new peer fails (the pool knows that address), so this step follows GlusterFS's procedure for
replacing a host with the same hostname (Red Hat Gluster Storage Administration Guide, "Replacing
a Host Machine with the Same Hostname"; gluster-ansible-maintenance's replace_node role):

  on the fresh node: stop glusterd; write the pool's UUID for it into glusterd.info (with the
  pool's operating-version) and a peer file for every other member (as the guide copies
  /var/lib/glusterd/peers from a healthy member); start glusterd; probe a healthy member from
  it; wait until the volume's config has come over; restart glusterd; wait until it and every
  member see each other as "Peer in Cluster (Connected)" (a member still showing "Peer Rejected"
  after 30 s gets one more restart of the node's glusterd). (A probe *from* a healthy member does
  not help: it knows the address already and only answers "already in peer list"; the fresh
  glusterd refuses friend requests from peers it does not know.)

  then its brick (any brick dir without the volume's `trusted.glusterfs.volume-id`, whose brick
  does not run: a new disk, or a wiped one): `volume reset-brick VOL B start` (stops its brick
  process, if one runs), `reset-brick VOL B B commit force` (same host and path: glusterd
  (re)makes the dir with the volume's id, and starts the brick; `force` as the volume was
  created with it, e.g. for a brick on the root file system), `volume heal VOL full` (the
  self-heal daemons copy everything from the other bricks), and a wait until `heal info` shows
  0 entries on every brick (progress shown). Every other brick must be online first.

Facts (every node in one round trip: `replace_probes`) -> `plan_replace` (pure) -> `apply_ops`.
A converged pool gives no op. A node whose glusterd has a different UUID AND peers or a volume
of its own is in another pool: refused with what to do, nothing changed.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from tasks.config import Cluster, Node
from tasks.facts import gather
from tasks.gluster_facts import (
    GLUSTER,
    GLUSTER_CHANGE_TIMEOUT,
    GLUSTERD_DIR,
    GLUSTERD_INFO,
    PEER_STATUS,
    GlusterOutputError,
    Peer,
    Volume,
    brick_id_probe,
    glusterd_info_text,
    parse_brick_id,
    parse_glusterd_info,
    parse_peer_status,
    parse_volume_info,
    peer_file_text,
    status_command,
    volume_info_command,
)
from tasks.gluster_plans import START_GLUSTERD
from tasks.ops import Op, StepError, apply_ops, on_nodes, say
from tasks.service import service

if TYPE_CHECKING:
    from tasks.remote import Remote

STEP = "gluster:replace"
DAEMON_WAIT = 30.0  # s for glusterd to answer after a start
SYNC_WAIT = 90.0  # s for the volume's config to come over from the pool
PEER_WAIT = 90.0  # s for the node and the members to see each other "Peer in Cluster"
RESTART_AFTER = 30.0  # s still "Peer Rejected" before glusterd is restarted once more
BRICK_WAIT = 60.0  # s for a reset brick to come online
# s that only "possibly undergoing heal" entries may be left before the heal counts as done
IN_USE_GRACE = 60.0
HEAL_TIMEOUT = 3600.0  # s for the heal of an empty brick (Home Assistant's config and backups)
ANSWERS = f"timeout 20 {GLUSTER} peer status >/dev/null 2>&1"


# ---------------------------------------------------------------------------------------------
# Facts


@dataclass(frozen=True)
class NodeFacts:
    """One node's glusterd as this step needs it."""

    uuid: str = ""  # glusterd.info: the UUID its glusterd runs as ("" before its first start)
    op_version: str = ""
    peers: tuple[Peer, ...] | None = None  # None: glusterd does not answer
    volume: Volume | None = None  # the volume as this glusterd knows it
    volume_known: bool = False  # `volume info` answered (with the volume or "does not exist")
    brick: str = "unknown"  # the brick dir's volume-id: present | absent | unknown
    brick_id: str | None = None
    online: dict[str, bool] | None = None  # `volume status` from here: brick -> online

    @property
    def member(self) -> bool:
        """In the pool with the volume: a healthy member to take the pool's view from."""
        return self.volume is not None and bool(self.peers)


def replace_probes(c: Cluster) -> dict[str, str]:
    """Shell probes (one round trip, `gather`) for `node_facts`: local reads only. The volume's
    status (a pool-wide transaction: asked on every node at once, glusterd answers "Another
    transaction is in progress") is asked on one member only (`status_command`)."""
    return {
        "info": f"cat {GLUSTERD_INFO} 2>/dev/null",
        "peers": PEER_STATUS,
        "volume": volume_info_command(c.gluster.volume),
        "brick": brick_id_probe(str(c.gluster.brick_dir)),
    }


def node_facts(sections: dict[str, str]) -> NodeFacts:
    """NodeFacts from the output of `replace_probes`, and of `status_command` as "status"
    when it was asked (pure)."""
    from tasks.facts_cluster import parse_volume_status  # not at `doit list` time

    info = parse_glusterd_info(sections.get("info", ""))
    try:
        peers: tuple[Peer, ...] | None = tuple(parse_peer_status(sections.get("peers", "")))
    except GlusterOutputError:
        peers = None
    volume, volume_known = None, False
    if peers is not None:
        try:
            volume, volume_known = parse_volume_info(sections.get("volume", "")), True
        except GlusterOutputError:
            pass
    brick, brick_id = parse_brick_id(sections.get("brick", ""))
    online = parse_volume_status(sections.get("status", "")) if volume is not None else None
    return NodeFacts(uuid=info.uuid, op_version=info.op_version, peers=peers, volume=volume,
                     volume_known=volume_known, brick=brick, brick_id=brick_id, online=online)


def _knows(peers: tuple[Peer, ...] | None, node: Node) -> Peer | None:
    """The entry of `peers` for `node` (by address or name)."""
    return next((p for p in peers or () if node.address in p.names or node.name in p.names),
                None)


def pool_view(c: Cluster, facts: dict[str, NodeFacts]) -> dict[str, tuple[str, ...]]:
    """{UUID: names} of the pool as its healthy members list each other (themselves included)."""
    members = [n for n in c.nodes if facts[n.name].member]
    pool: dict[str, list[str]] = {}
    for m in members:
        for p in facts[m.name].peers or ():
            if p.uuid:
                pool.setdefault(p.uuid, []).extend(p.names)
    for m in members:
        if facts[m.name].uuid and facts[m.name].uuid not in pool:
            pool[facts[m.name].uuid] = [m.address]
    return {u: tuple(dict.fromkeys(names)) for u, names in pool.items()}


# ---------------------------------------------------------------------------------------------
# The plan (pure)


def plan_replace(c: Cluster, facts: dict[str, NodeFacts]) -> list[Op]:
    """The ops that bring a re-flashed node back into the pool under its old UUID and refill
    every empty brick of the volume; [] when the pool is whole (or has no volume yet: the other
    gluster steps make it). Raises StepError, before anything is changed, for a node in another
    pool, a brick dir of another volume, or a reset while another brick is offline."""
    members = [n for n in c.nodes if facts[n.name].member]
    if not members:
        return []
    via = members[0]
    vol = facts[via.name].volume
    assert vol is not None
    pool = pool_view(c, facts)
    ops: list[Op] = []
    rejoined: list[Node] = []
    for x in c.nodes:
        if facts[x.name].member:
            continue
        known = next((p for m in members if (p := _knows(facts[m.name].peers, x))), None)
        if known is None or not known.uuid:
            continue  # not in the pool: a new node, gluster:peers probes it
        back = _identity_ops(c, x, facts[x.name], known, via, facts[via.name], members, pool)
        ops += back
        rejoined += [x] if back else []
    return ops + _brick_ops(c, facts, via, vol, rejoined)


def _identity_ops(c: Cluster, x: Node, f: NodeFacts, known: Peer, via: Node, vf: NodeFacts,
                  members: list[Node], pool: dict[str, tuple[str, ...]]) -> list[Op]:
    """Give `x`'s glusterd the UUID the pool knows it by, and its peers; wait until it and the
    members see each other "Peer in Cluster"."""
    n, old = x.name, known.uuid
    if f.peers is None:
        raise StepError(f"the pool knows {n} ({x.address}) as {old}, but glusterd on {n} does "
                        "not answer.\n  what to do: start it (gluster:daemon) and run the task "
                        "again")
    fresh = f.uuid != old
    if not f.volume_known:
        if not fresh:
            return []  # a member whose `volume info` failed just now: never restart it for that
        raise StepError(f"the pool knows {n} ({x.address}) as {old}, {n}'s glusterd runs as "
                        f"{f.uuid or '?'}, and `gluster volume info` failed on {n}: nothing "
                        "was changed.\n  what to do: see /var/log/glusterfs/glusterd.log on "
                        f"{n} and run the task again")
    if fresh and (f.peers or f.volume is not None):
        theirs = ", ".join(name for p in f.peers for name in p.names[:1]) or "none"
        raise StepError(
            f"{n}'s glusterd runs as {f.uuid or '?'}, the pool knows {x.address} as {old}, and "
            f"{n} has a pool of its own (peers: {theirs}; volume: "
            f"{'yes' if f.volume else 'no'}): not a fresh node, nothing was changed.\n  what "
            f"to do: if {n} was re-installed and that pool is a leftover, on {n} stop glusterd, "
            f"empty {GLUSTERD_DIR}/peers and {GLUSTERD_DIR}/vols, start it and run the task "
            f"again; if another pool is meant, take {n} out of the cluster file")
    v = shlex.quote(c.gluster.volume)
    log = f"/var/log/glusterfs/glusterd.log on {n} and on {via.name}"
    ops: list[Op] = []
    if fresh:
        op_version = vf.op_version or f.op_version
        ops.append(Op(f"stop glusterd: it runs as a new member ({f.uuid or 'no UUID yet'}), "
                      f"the pool knows {n} as {old}", service("glusterd", "stop"), node=n))
        ops.append(Op(f"write {GLUSTERD_INFO}: UUID={old} (the pool's {n}), "
                      f"operating-version={op_version or '?'}",
                      put=(GLUSTERD_INFO, glusterd_info_text(old, op_version)), mode=0o600,
                      node=n))
        for uuid, names in sorted(pool.items()):
            if uuid != old:
                ops.append(Op(f"write {GLUSTERD_DIR}/peers/{uuid} ({', '.join(names)}, "
                              "Peer in Cluster)", put=(f"{GLUSTERD_DIR}/peers/{uuid}",
                                                       peer_file_text(uuid, names)),
                              mode=0o600, node=n))
        ops.append(Op(f"start glusterd as {old}", START_GLUSTERD, node=n, hint=f"see {log}"))
        ops.append(Op("wait until glusterd answers", ANSWERS, wait=DAEMON_WAIT, node=n,
                      hint=f"see {log}"))
    if fresh or _knows(f.peers, via) is None:
        ops.append(Op(f"probe {via.name} ({via.address}) from {n}: the pool's config comes "
                      "over", f"{GLUSTER} peer probe {shlex.quote(via.address)}", node=n,
                      timeout=GLUSTER_CHANGE_TIMEOUT,
                      hint=f"{via.name}'s glusterd must be reachable on TCP 24007; see {log}"))
    ops.append(Op(f"wait until {n} has volume {c.gluster.volume} from the pool (at most "
                  f"{SYNC_WAIT:g} s)", f"{GLUSTER} --xml volume info {v} 2>/dev/null "
                  "| grep -q '<volume>'", wait=SYNC_WAIT, node=n, hint=f"see {log}"))
    ops.append(Op("restart glusterd (it starts with the pool's volume and peers)",
                  service("glusterd", "restart"), node=n, hint=f"see {log}"))
    ops.append(Op("wait until glusterd answers", ANSWERS, wait=DAEMON_WAIT, node=n,
                  hint=f"see {log}"))
    others = [m for m in c.nodes if m.name != n]
    ops.append(Op(f"wait until {n} and {', '.join(m.name for m in members)} see each other "
                  f"as Peer in Cluster (Connected) (at most {PEER_WAIT:g} s)",
                  call=partial(wait_in_cluster, c=c, node=n, sees=[m.name for m in others],
                               seen_by=[m.name for m in members]), node=n))
    return ops


def _brick_ops(c: Cluster, facts: dict[str, NodeFacts], via: Node, vol: Volume,
               rejoined: list[Node]) -> list[Op]:
    """reset-brick + full heal for every brick whose dir has no volume-id and does not run
    (a node rejoining the pool with its brick's data kept counts as online: it will be)."""
    online = facts[via.name].online
    bricks = {n.name: f"{n.address}:{c.gluster.brick_dir}" for n in c.nodes}
    reset: list[Node] = []
    for n in c.nodes:
        f, brick = facts[n.name], bricks[n.name]
        if brick not in vol.bricks:
            continue  # another shape: gluster:volume says what to do
        if f.brick == "present" and vol.id and f.brick_id != vol.id:
            raise StepError(
                f"{n.name}'s brick dir {c.gluster.brick_dir} belongs to another volume "
                f"({f.brick_id}), not to {vol.name} ({vol.id}): nothing was changed.\n  what "
                "to do: move that data away (or choose another gluster.brick_dir) and run the "
                "task again")
        if f.brick == "absent" and not (online or {}).get(brick):
            reset.append(n)  # "unknown" (getfattr could not tell) is left alone
    if not reset:
        return []
    if online is None:
        raise StepError(f"the bricks of {', '.join(n.name for n in reset)} are empty, but "
                        f"`gluster volume status {vol.name}` does not answer on {via.name}: "
                        "cannot tell whether the others can heal them.\n  what to do: check "
                        "that the volume is started and run the task again")
    down = [n.name for n in c.nodes
            if n not in reset and n not in rejoined and not online.get(bricks[n.name])]
    if down:
        raise StepError(f"the bricks of {', '.join(n.name for n in reset)} are empty and must "
                        f"heal from the others, but the bricks of {', '.join(down)} are "
                        "offline: nothing was changed.\n  what to do: bring them back "
                        f"(`gluster volume status {vol.name}`) and run the task again")
    v = shlex.quote(vol.name)
    ops: list[Op] = []
    for n in reset:
        b = shlex.quote(bricks[n.name])
        ops += [
            Op(f"reset-brick {bricks[n.name]} start (its dir on {n.name} holds no data of "
               f"{vol.name}: stop its brick process, if one runs)",
               f"{GLUSTER} volume reset-brick {v} {b} start >/dev/null 2>&1 || true",
               node=via.name, timeout=GLUSTER_CHANGE_TIMEOUT),
            Op(f"create the brick dir {c.gluster.brick_dir} (a fresh disk has none; glusterd "
               "makes only the last component)",
               f"mkdir -p {shlex.quote(str(c.gluster.brick_dir))}", node=n.name),
            Op(f"reset-brick {bricks[n.name]} {bricks[n.name]} commit force (same host and "
               "path: the dir gets the volume's id, the brick starts empty)",
               f"{GLUSTER} volume reset-brick {v} {b} {b} commit force", node=via.name,
               timeout=GLUSTER_CHANGE_TIMEOUT,
               hint=f"every node must be Peer in Cluster (Connected) in `gluster peer status`; "
                    f"see /var/log/glusterfs/glusterd.log on {via.name} and {n.name}"),
            Op(f"wait until brick {bricks[n.name]} is online (at most {BRICK_WAIT:g} s)",
               f"{GLUSTER} --xml volume status {v} {b} 2>/dev/null | grep -q '<status>1</status>'",
               wait=BRICK_WAIT, node=via.name,
               hint=f"see /var/log/glusterfs/bricks/ on {n.name}"),
        ]
    ops.append(Op(f"heal {vol.name} full (the self-heal daemons copy every file to "
                  f"{', '.join(n.name for n in reset)})", f"{GLUSTER} volume heal {v} full",
                  node=via.name, timeout=GLUSTER_CHANGE_TIMEOUT))
    ops.append(Op(f"wait until heal info shows 0 entries on every brick (at most "
                  f"{HEAL_TIMEOUT:g} s)", call=partial(wait_healed, c=c, via=via.name),
                  node=via.name))
    return ops


def heal_left(c: Cluster, summary: dict[str, tuple[str, int | None, int]] | None) -> list[str]:
    """What `heal info summary` (tasks.facts_cluster.parse_heal_summary) still shows, per
    brick of the volume (a node being added has none yet): [] when every brick is connected with
    nothing to heal."""
    if not summary:
        return ["heal info did not answer"]
    names = {f"{n.address}:{c.gluster.brick_dir}": n.name for n in c.nodes}
    left = []
    for brick, (status, pending, split) in summary.items():
        who = names.get(brick, brick)
        if status != "Connected":
            left.append(f"{who}: {status or 'no status'}")
        elif pending:
            left.append(f"{who}: {pending} entries")
        if split:
            left.append(f"{who}: {split} in split-brain")
    return left


def wait_in_cluster(r: Remote, *, c: Cluster, node: str, sees: list[str], seen_by: list[str],
                    timeout: float = PEER_WAIT, restart_after: float = RESTART_AFTER) -> None:
    """Wait until `node` lists every node of `sees`, and every node of `seen_by` lists `node`,
    as Peer in Cluster (Connected). A member that still sees it "Peer Rejected" after
    `restart_after` s gets one more restart of `node`'s glusterd (its friend request on
    connecting clears that state; the community's procedure for a rejected peer restarts
    glusterd "another time or two")."""
    from tasks.remote import progress

    started = time.monotonic()
    deadline, restarted = started + timeout, False
    while True:
        missing = []
        try:
            peers = parse_peer_status(r.run(node, STEP, f"{GLUSTER} --xml peer status",
                                            check=False).stdout)
            missing += [f"{node} does not see {s}" for s in sees
                        if not ((p := _knows(tuple(peers), c.node(s))) and p.in_cluster)]
        except GlusterOutputError:
            missing.append(f"glusterd on {node} does not answer")
        for m in seen_by:
            try:
                theirs = parse_peer_status(r.run(m, STEP, f"{GLUSTER} --xml peer status",
                                                 check=False).stdout)
            except GlusterOutputError:
                missing.append(f"glusterd on {m} does not answer")
                continue
            p = _knows(tuple(theirs), c.node(node))
            if not (p and p.in_cluster):
                missing.append(f"{m} sees {node} as {p.state if p else 'nothing'}"
                               f"{'' if p and p.connected else ' (Disconnected)'}")
        if not missing:
            return
        rejected = any("Rejected" in m for m in missing)
        if rejected and not restarted and time.monotonic() - started > restart_after:
            progress(node, f"{STEP}: still rejected by a member ({'; '.join(missing)}): "
                           "restarting glusterd once more")
            r.run(node, STEP, service("glusterd", "restart"), timeout=60)
            restarted = True
        if time.monotonic() > deadline:
            raise StepError(f"not Peer in Cluster (Connected) after {timeout:g} s: "
                            f"{'; '.join(missing)}.\n  what to do: restart glusterd on {node} "
                            "once more (`systemctl restart glusterd`) and run the task again; "
                            f"see /var/log/glusterfs/glusterd.log on {node}")
        time.sleep(1)


def only_in_use(c: Cluster, text: str) -> bool:
    """Every brick connected, and all that `heal info summary` lists is "possibly undergoing
    heal" (nothing pending, no split-brain)."""
    from tasks.facts_cluster import parse_heal_summary, parse_possibly_healing

    counts = parse_possibly_healing(text) or {}
    got = [counts.get(b) for b in parse_heal_summary(text) or {}]
    return bool(got) and all(x is not None and x[0] == 0 for x in got) and \
        any(x and x[1] for x in got)


def wait_healed(r: Remote, *, c: Cluster, via: str, timeout: float = HEAL_TIMEOUT,
                interval: float = 3.0, in_use_grace: float = IN_USE_GRACE) -> None:
    """Poll `heal info summary` on `via` until every brick shows 0 entries twice in a row,
    saying what is left as it changes (and every 30 s). Entries that stay "possibly undergoing
    heal" with nothing else left for `in_use_grace` s are files held open and written without
    a pause: they are named, and the wait ends (the self-heal daemon heals them later)."""
    from tasks.facts_cluster import parse_heal_summary
    from tasks.remote import progress

    vol = shlex.quote(c.gluster.volume)
    cmd = f"timeout 60 {GLUSTER} --xml volume heal {vol} info summary"
    started = time.monotonic()
    last, said, clean = "", 0.0, 0
    in_use_since: float | None = None
    while True:
        out = r.run(via, STEP, cmd, check=False, timeout=90).stdout
        left = heal_left(c, parse_heal_summary(out))
        now = time.monotonic()
        if not left:
            clean += 1
            if clean >= 2:
                progress(via, f"{STEP}: healed: 0 entries on every brick "
                              f"({now - started:.0f} s)")
                return
        else:
            clean = 0
            in_use_since = (in_use_since or now) if only_in_use(c, out) else None
            if in_use_since is not None and now - in_use_since >= in_use_grace:
                files = r.run(via, STEP, f"timeout 60 {GLUSTER} volume heal {vol} info",
                              check=False, timeout=90).stdout
                names = sorted({ln.split(" - ")[0].strip() for ln in files.splitlines()
                                if "Possibly undergoing heal" in ln})
                progress(via, f"{STEP}: healed ({now - started:.0f} s), except what is held "
                              f"open and written without a pause, listed as possibly undergoing "
                              f"heal for {in_use_grace:g} s: {', '.join(names) or '?'}; the "
                              "self-heal daemon finishes them in the background")
                return
            line = "; ".join(left)
            if line != last or now - said >= 30:
                progress(via, f"{STEP}: healing ({now - started:.0f} s): {line}")
                last, said = line, now
        if now - started > timeout:
            raise StepError(f"the heal is not done after {timeout:g} s: {'; '.join(left)}.\n"
                            "  what to do: it goes on by itself; follow it with `gluster volume "
                            f"heal {c.gluster.volume} info summary` on {via}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# The step and its clean


def read_facts(c: Cluster, r: Remote) -> dict[str, NodeFacts]:
    """`replace_probes` on every node at once (RemoteError naming any node that is down), then
    the volume's status on the first member (retried while another transaction holds the
    volume's lock)."""
    from tasks.facts_cluster import parse_volume_status

    probes = replace_probes(c)
    facts: dict[str, NodeFacts] = on_nodes(r, STEP,
                                           lambda n: node_facts(gather(r, n, STEP, probes)))
    first = next((n for n in c.names if facts[n].member), None)
    if first is not None:
        for attempt in range(3):
            online = parse_volume_status(r.run(first, STEP, status_command(c), check=False,
                                               timeout=30).stdout)
            if online is not None or attempt == 2:
                break
            time.sleep(1)
        facts[first] = replace(facts[first], online=online)
    return facts


def setup_replace(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """A re-flashed node back in the pool under its old UUID, empty bricks reset and healed."""
    with r.reading():
        facts = read_facts(c, r)
    ops = plan_replace(c, facts)
    apply_ops(r, c.nodes[0], STEP, ops, dryrun=dryrun)
    return {} if dryrun else {"done": [f"{op.node}: {op.what}" for op in ops]}


def clean_replace(c: Cluster, r: Remote, dryrun: bool) -> None:
    """Nothing to undo: a replaced node is an ordinary member (peers and volume clean it)."""
    say(c.nodes[0], f"{STEP} (clean): nothing to undo (a replaced node is an ordinary member: "
                    "gluster:peers and gluster:volume clean it)")
