"""GlusterFS plans: pure functions that turn the facts (tasks/gluster_facts.py) into the `Op`s
each step of tasks/gluster.py runs, for setup and for clean.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from tasks import render
from tasks.gluster_facts import (
    GLUSTER,
    GLUSTER_CHANGE_TIMEOUT,
    STAT_TIMEOUT,
    MountFacts,
    Peer,
    Volume,
    fstab_conflicts,
    fstab_with_entry,
    fstab_without_entry,
    is_gluster,
)
from tasks.ops import Op, StepError
from tasks.service import service

if TYPE_CHECKING:
    from collections.abc import Callable

    from tasks.config import Cluster, Node
    from tasks.facts_cluster import BrickProcess
    from tasks.remote import Remote

# Seconds a moved brick may take to come online, and its node's self-heal daemon to take a heal.
MOVE_WAIT = 60.0
# The uid/gid the eclipse-mosquitto image (and the lab's) runs the broker as.
MOSQUITTO_UID = 1883


# -- glusterd ------------------------------------------------------------------------------------

START_GLUSTERD = service("glusterd", "start", enable=True, direct="glusterd")


def plan_daemon(facts: dict[str, str]) -> list[Op]:
    """From `DAEMON_PROBES` output: enable glusterd (systemd), start it when it does not
    answer (its peer status is not an XML answer with opRet 0). Raises StepError when
    GlusterFS is not installed."""
    def yes(key: str) -> bool:
        return facts.get(key, "").strip() == "yes"

    if not yes("cli"):
        raise StepError("the gluster command is missing.\n  what to do: install GlusterFS on "
                        "the node (apt-get install glusterfs-server) and re-run setup")
    ops = []
    if yes("disabled"):
        ops.append(Op("enable glusterd at boot", "systemctl enable glusterd"))
    if "<opRet>0</opRet>" not in facts.get("peers", ""):  # glusterd does not answer
        ops.append(Op("start glusterd", START_GLUSTERD,
                      hint="see /var/log/glusterfs/glusterd.log on the node"))
    return ops


# -- peers and the volume ------------------------------------------------------------------------


def replica_count(c: Cluster) -> int:
    """Every node holds a full copy: replica 3 with 3 nodes, replica 2 with the two-node opt-in."""
    return len(c.nodes)


def bricks(c: Cluster) -> list[str]:
    """The volume's bricks, one per node, in cluster order."""
    return [f"{n.address}:{c.gluster.brick_dir}" for n in c.nodes]


def volume_options(c: Cluster) -> dict[str, str]:
    """Options haswarm sets on the volume (checked and re-applied on every setup)."""
    return {
        # Drop a silently vanished node after this many seconds (default 42: writes stall 77 s).
        "network.ping-timeout": str(c.gluster.ping_timeout),
        # The bricks drop a silent client (and the locks it held: the Home Assistant lock,
        # stack/haswarm-lock.py.j2) ~4 s after that client itself has given the volume up, so
        # a cut-off HA has fenced itself before another can take the lock (defaults: 20 s idle
        # + 9 x 2 s probes; 42 s with unacknowledged data).
        **server_keepalive(render.client_drop(c)),
        # Client quorum: write only while more than half of the copies are reachable.
        "cluster.quorum-type": "auto",
        # Server quorum: glusterd stops its bricks when it loses contact with most of the pool.
        "cluster.server-quorum-type": "server",
        # Self-heal: the daemon heals a returning brick; its periodic crawl every minute
        # (default 10) catches anything the change index missed; a split-brain file (possible
        # with replica 2) is resolved to its newest copy instead of staying unreadable.
        "cluster.self-heal-daemon": "on",
        "cluster.heal-timeout": "60",
        "cluster.favorite-child-policy": "mtime",
        # Only the nodes may connect to the bricks (mount the volume): without it any host on
        # the LAN with glusterfs-client could read and write Home Assistant's config.
        "auth.allow": allowed_clients(c),
    }


def allowed_clients(c: Cluster) -> str:
    """The volume's `auth.allow`: the node addresses as the cluster file gives them, in its
    order (Gluster matches a host name against the client's reverse lookup: give IPs)."""
    return ",".join(n.address for n in c.nodes)


def server_keepalive(drop_after: int) -> dict[str, str]:
    """Brick-side TCP keepalive: a silent client is dropped (and its locks released) after
    `drop_after` s (tasks.render.client_drop), once a cut-off node's lock keeper has fenced
    Home Assistant, so that another node's HA can take the lock then and not later."""
    probes = 4
    return {"server.keepalive-time": str(max(1, drop_after - probes)),
            "server.keepalive-interval": "1", "server.keepalive-count": str(probes),
            "server.tcp-user-timeout": str(drop_after)}


def peers_to_probe(c: Cluster, peers: list[Peer]) -> list[Node]:
    """The nodes (other than the first, which probes) its `peer status` does not list."""
    known = {name for p in peers for name in p.names}
    return [n for n in c.nodes[1:] if n.address not in known and n.name not in known]


def peers_not_ready(c: Cluster, peers: list[Peer]) -> list[str]:
    """Names of the other nodes not (yet) 'Peer in Cluster' and connected."""
    ready = {name for p in peers if p.in_cluster for name in p.names}
    return [n.name for n in c.nodes[1:] if n.address not in ready and n.name not in ready]


def move_ops(c: Cluster, moves: list[tuple[str, str]],
             wait_healed: Callable[[Remote], None]) -> list[Op]:
    """One brick at a time: `replace-brick ... commit force` (the old host may be dead: its
    brick's data comes from the other copies), `heal full`, and `wait_healed` (the call that
    polls heal info) before the next, so at most one copy is missing at any time."""
    v = shlex.quote(c.gluster.volume)
    ops = []
    for old, new in moves:
        ops += [
            Op(f"move brick {old} to {new} (its old host is no longer in the cluster file)",
               f"{GLUSTER} volume replace-brick {v} {shlex.quote(old)} {shlex.quote(new)} "
               "commit force", timeout=GLUSTER_CHANGE_TIMEOUT,
               hint="every other brick must be online (gluster volume status) and the new "
                    "brick dir empty; an old Pi that still runs must be switched off first "
                    "(its own firewall keeps the new node out: 'Host NEW not connected')"),
            *_heal_ops(c, new, wait_healed),
        ]
    return [*ops, _allow_again(c, "replace-brick added a host to it, keeping the value "
                                  "before as old.auth.allow")]


def _allow_again(c: Cluster, why: str) -> Op:
    """`auth.allow` set once more after a brick change: Gluster rewrites it itself."""
    allow = allowed_clients(c)
    return Op(f"set auth.allow={allow} again ({why})",
              f"{GLUSTER} volume set {shlex.quote(c.gluster.volume)} auth.allow "
              f"{shlex.quote(allow)}", timeout=GLUSTER_CHANGE_TIMEOUT)


def departed_peers(c: Cluster, peers: list[Peer], brick_hosts: set[str]) -> list[Peer]:
    """Peers of the pool that are no node of the cluster file and none of `brick_hosts` (a
    replaced Pi, once its brick moved): they leave the pool."""
    ours = {n.address for n in c.nodes} | {n.name for n in c.nodes}
    return [p for p in peers if not set(p.names) & (ours | brick_hosts)]


def brick_changes(c: Cluster, vol: Volume) -> tuple[list[str], list[str]]:
    """(bricks to remove, bricks to add) to make the volume one full copy per node of the
    cluster file: bricks on hosts it no longer lists go, its nodes without a brick get one.
    A brick on a listed host at another path is neither (plan_volume refuses it)."""
    want = bricks(c)
    ours = {n.address for n in c.nodes}
    gone = [b for b in vol.bricks if b not in want and b.rsplit(":", 1)[0] not in ours]
    new = [b for b in want if b not in vol.bricks]
    return gone, new


def grow_ops(c: Cluster, replica: int, new: list[str],
             wait_healed: Callable[[Remote], None]) -> list[Op]:
    """One brick at a time (a node added to `nodes:`): `add-brick ... replica R+1`, wait for
    it online, `heal full` (it starts empty), `wait_healed` before the next."""
    v = shlex.quote(c.gluster.volume)
    ops = []
    for i, b in enumerate(new, start=1):
        r = replica + i
        ops += [
            Op(f"add brick {b}: replica {r - 1} -> {r} (its node is new in the cluster file)",
               f"{GLUSTER} volume add-brick {v} replica {r} {shlex.quote(b)} force",
               timeout=GLUSTER_CHANGE_TIMEOUT,
               hint="every brick of the volume must be online (gluster volume status) and "
                    "the new node in the pool (gluster:peers)"),
            *_heal_ops(c, b, wait_healed),
        ]
    # Seen on the lab: a Pi swapped while the old one ran (depart's remove-brick, then this
    # add-brick, after an earlier replace-brick) left auth.allow naming the departed Pi and not
    # the new one; the next setup had to set it.
    return [*ops, _allow_again(c, "add-brick may rewrite it")]


def shrink_ops(c: Cluster, replica: int, gone: list[str]) -> list[Op]:
    """`remove-brick ... replica R-1 BRICK force` for each brick on a host the cluster file no
    longer lists (a node taken out of `nodes:`): the other bricks hold full copies, nothing to
    migrate; the brick's files stay on its old host."""
    v = shlex.quote(c.gluster.volume)
    return [Op(f"remove brick {b}: replica {replica - i + 1} -> {replica - i} (its host is "
               "no longer in the cluster file; its files stay there)",
               f"{GLUSTER} volume remove-brick {v} replica {replica - i} {shlex.quote(b)} force",
               timeout=GLUSTER_CHANGE_TIMEOUT,
               hint="the other bricks must be online (gluster volume status)")
            for i, b in enumerate(gone, start=1)]


def _heal_ops(c: Cluster, new: str, wait_healed: Callable[[Remote], None]) -> list[Op]:
    v = shlex.quote(c.gluster.volume)
    return [
        Op(f"wait until brick {new} is online (at most {MOVE_WAIT:g} s)",
           f"{GLUSTER} --xml volume status {v} {shlex.quote(new)} 2>/dev/null "
           "| grep -q '<status>1</status>'", wait=MOVE_WAIT,
           hint="see /var/log/glusterfs/bricks/ on the new node"),
        # retried: right after the change the new node's self-heal daemon may not run yet
        # ("Commit failed on NEW")
        Op(f"heal the new brick {new} from the other copies",
           f"{GLUSTER} volume heal {v} full", wait=MOVE_WAIT, timeout=GLUSTER_CHANGE_TIMEOUT),
        Op("wait until the heal is done (0 entries on every brick)", call=wait_healed),
    ]


def plan_volume(c: Cluster, vol: Volume | None,
                wait_healed: Callable[[Remote], None] | None = None) -> list[Op]:
    """Create (when absent), set options that differ, follow `nodes:` (after the options:
    `auth.allow` must admit a new node's heal daemon), start (when not started).

    The volume is one full copy per node (replica N). When `nodes:` changed:
    - a Pi replaced by another (as many bricks gone as nodes without one): `move_ops`;
    - nodes added: `grow_ops`; nodes taken out: `shrink_ops` (the replica count follows);
    - both at once with different counts: refused, one change per setup.

    Raises StepError when an existing volume has another shape: haswarm never reshapes one.
    """
    name = c.gluster.volume
    v = shlex.quote(name)
    ops: list[Op] = []
    want_bricks = bricks(c)
    replica = replica_count(c)
    changes: list[Op] = []
    healed = wait_healed or (lambda r: None)
    if vol is None:
        ops.append(Op(
            f"create volume {name} (replica {replica}: {' '.join(want_bricks)})",
            f"{GLUSTER} volume create {v} replica {replica} transport tcp "
            + " ".join(shlex.quote(b) for b in want_bricks) + " force",
            hint="a brick dir that belonged to another volume is reused as is; a node in "
            "another trusted pool must be detached there first",
            timeout=GLUSTER_CHANGE_TIMEOUT,
        ))
        current_options: dict[str, str] = {}
        status = "Created"
    else:
        problems = []
        if vol.type != "Replicate" or vol.replica != len(vol.bricks):
            problems.append(f"it is {vol.type} (replica {vol.replica}), haswarm needs Replicate "
                            f"with replica {replica} (one full copy per node)")
        gone, new = brick_changes(c, vol)
        stray = [b for b in vol.bricks if b not in want_bricks and b not in gone]
        if stray:
            problems.append(f"its bricks are {', '.join(vol.bricks)}; the cluster file gives "
                            f"{', '.join(want_bricks)}")
        elif gone and new and len(gone) != len(new):
            problems.append(f"the cluster file both drops {len(gone)} node(s) and adds "
                            f"{len(new)}: one change per setup (replace one Pi by another, or "
                            "add nodes, or take nodes out), then `doit setup` again")
        if problems:
            raise StepError(
                f"volume {name} exists but " + "; ".join(problems) + ".\n  what to do: haswarm "
                "does not reshape a volume that holds data. Copy the data off the mount, then "
                "`doit clean` (bricks are kept) and `doit setup`; or fix it by hand (gluster "
                "volume replace-brick / add-brick ... replica N) and re-run setup."
            )
        if gone and new:
            changes = move_ops(c, list(zip(gone, new, strict=True)), healed)
        elif new:
            changes = grow_ops(c, vol.replica, new, healed)
        elif gone:
            changes = shrink_ops(c, vol.replica, gone)
        current_options = vol.options
        status = vol.status
    differ = {k: val for k, val in volume_options(c).items() if current_options.get(k) != val}
    if differ:  # one transaction for all of them (the CLI takes several KEY VALUE pairs)
        pairs = " ".join(f"{shlex.quote(k)} {shlex.quote(val)}" for k, val in differ.items())
        ops.append(Op("set " + ", ".join(f"{k}={val}" for k, val in differ.items()),
                      f"{GLUSTER} volume set {v} {pairs}", timeout=GLUSTER_CHANGE_TIMEOUT))
    ops += changes
    if status != "Started":
        ops.append(Op(f"start volume {name} (about 2 s)", f"{GLUSTER} volume start {v}",
                      hint="`gluster volume status` on the node shows which brick failed; "
                      "every node's glusterd must be running", timeout=GLUSTER_CHANGE_TIMEOUT))
    return ops


def plan_brick_restarts(c: Cluster, procs: dict[str, BrickProcess],
                        again: dict[str, BrickProcess]) -> list[Op]:
    """Bring back the bricks that glusterd lists but that serve no client.

    `procs` and `again` are two reads of `gluster volume status` a few seconds apart; a brick
    is acted on only when both show it broken (one starting up may be between the two).
    - running with no port (glusterd lost its sign-in): stop its process, on its own node;
    - stopped, or just stopped here: `volume start force` starts the volume's missing bricks.
    A brick absent from the output (its node is down) is left alone."""
    by_address = {n.address: n for n in c.nodes}
    ops: list[Op] = []
    start = False
    for brick, p in sorted(procs.items()):
        q = again.get(brick)
        if q is None or p.serving or q.serving:
            continue
        node = by_address.get(brick.partition(":")[0])
        if node is None:
            continue
        start = True
        if q.port_lost and q.pid:
            pid = q.pid
            ops.append(Op(
                f"stop the brick process {pid} of {brick}: it runs, but glusterd has no port "
                "for it, so no client can reach it",
                f'[ "$(cat /proc/{pid}/comm 2>/dev/null)" = glusterfsd ] || exit 0; '
                f"kill {pid}; for i in $(seq 50); do kill -0 {pid} 2>/dev/null || exit 0; "
                f"sleep 0.2; done; kill -9 {pid}",
                node=node.name))
    if start:
        v = shlex.quote(c.gluster.volume)
        ops.append(Op(f"start the volume's missing brick processes ({GLUSTER} volume start "
                      f"{c.gluster.volume} force)", f"{GLUSTER} volume start {v} force",
                      hint="`gluster volume status` and the brick's log under "
                      "/var/log/glusterfs/bricks/ on its node say why it does not start",
                      timeout=GLUSTER_CHANGE_TIMEOUT))
    return ops


def plan_volume_clean(c: Cluster, vol: Volume | None) -> list[Op]:
    """Stop (when started) and delete the volume; nothing when it is gone already."""
    if vol is None:
        return []
    v = shlex.quote(c.gluster.volume)
    ops = []
    if vol.status == "Started":
        ops.append(Op(f"stop volume {c.gluster.volume}",
                      tolerant(f"{GLUSTER} volume stop {v}", "is not in the started state"),
                      timeout=GLUSTER_CHANGE_TIMEOUT))
    ops.append(Op(f"delete volume {c.gluster.volume} (bricks keep their data)",
                  tolerant(f"{GLUSTER} volume delete {v}", "does not exist"),
                  hint="every node's glusterd must be running to delete a volume",
                  timeout=GLUSTER_CHANGE_TIMEOUT))
    return ops


def tolerant(cmd: str, already: str) -> str:
    """`cmd`, succeeding also when it fails with the error text `already` ("already done");
    any other failure exits 1 with the command's output on stderr."""
    err = "printf '%s\\n' \"$_err\""
    return (f"_err=$({cmd} 2>&1) || {{ {err} | grep -qF {shlex.quote(already)} "
            f"|| {{ {err} >&2; exit 1; }}; }}")


# -- mount ---------------------------------------------------------------------------------------


def plan_mount(c: Cluster, entry: str, facts: MountFacts) -> list[Op]:
    """fstab entry, mount point dir, and the mount itself (remounted when the FUSE mount died).

    Raises StepError when another filesystem sits on (or is configured for) the mount point."""
    mp = str(c.gluster.mount_point)
    m = shlex.quote(mp)
    fstab = facts.fstab or ""
    conflicts = fstab_conflicts(fstab, mp, c.gluster.volume)
    others = [t for t in facts.types if not is_gluster(t)]
    if conflicts or others:
        what = "; ".join([*(f"/etc/fstab has {line!r}" for line in conflicts),
                          *(f"a {t} filesystem is mounted there" for t in others)])
        raise StepError(f"{mp} is in use: {what}.\n  what to do: choose another "
                        "gluster.mount_point in the cluster file, or free that path")
    ops = []
    new = fstab_with_entry(fstab, entry, mp, c.gluster.volume)
    if new != fstab:
        ops.append(Op(f"write haswarm's line in /etc/fstab ({mp})", put=("/etc/fstab", new)))
    if not facts.exists:
        ops.append(Op(f"create {mp}", f"mkdir -p {m}"))
    if facts.types and not facts.alive:
        ops.append(Op(f"detach the dead mount on {mp} (umount -l)", f"umount -l {m}"))
    if not facts.types or not facts.alive:
        ops.append(Op(f"mount {mp}",
                      f"mount {m} && timeout {STAT_TIMEOUT} stat -t {m} >/dev/null",
                      hint="the volume must be started (gluster:volume) and glusterd running "
                      "on this node; the client log is /var/log/glusterfs/"
                      + mp.strip("/").replace("/", "-") + ".log"))
    return ops


def plan_mount_clean(c: Cluster, facts: MountFacts) -> list[Op]:
    """Unmount every glusterfs mount on the mount point (lazily when it is dead), drop
    haswarm's fstab line, remove the mount point when it is an empty directory."""
    mp = str(c.gluster.mount_point)
    m = shlex.quote(mp)
    ops = []
    for fstype in reversed(facts.types):
        if not is_gluster(fstype):
            break  # someone else's filesystem below: leave it and everything under it
        if facts.alive:
            ops.append(Op(f"unmount {mp}", f"umount {m} || umount -l {m}"))
        else:
            ops.append(Op(f"unmount the dead mount on {mp} (umount -l)", f"umount -l {m}"))
    if facts.fstab is not None:
        new = fstab_without_entry(facts.fstab, mp, c.gluster.volume)
        if new != facts.fstab:
            ops.append(Op("remove haswarm's line from /etc/fstab", put=("/etc/fstab", new)))
    stays_mounted = any(not is_gluster(t) for t in facts.types)
    if facts.exists and not stays_mounted:
        ops.append(Op(f"remove {mp} (when empty)", f"rmdir {m} 2>/dev/null || true"))
    return ops


# -- service dirs on the volume ------------------------------------------------------------------


@dataclass(frozen=True)
class DirSpec:
    """A directory a service bind-mounts from the volume: path, owner uid (= gid), mode."""

    path: str
    owner: int
    mode: int


def service_dirs(c: Cluster) -> list[DirSpec]:
    """Directories the services bind-mount from the volume, parents first."""
    paths = render.volume_paths(c)
    dirs = [DirSpec(paths["homeassistant"], 0, 0o700),
            DirSpec(str(PurePosixPath(paths["mosquitto_data"]).parent), 0, 0o755),
            DirSpec(paths["mosquitto_data"], MOSQUITTO_UID, 0o750)]
    if c.portainer.enabled:
        dirs.append(DirSpec(paths["portainer"], 0, 0o700))
    return dirs


def plan_dirs(c: Cluster, owners: dict[str, int]) -> list[Op]:
    """Create missing service dirs (mode only on creation); fix a wrong owner."""
    ops = []
    for d in service_dirs(c):
        q = shlex.quote(d.path)
        if d.path not in owners:
            ops.append(Op(f"create {d.path} (owner {d.owner}, mode {d.mode:o})",
                          f"install -d -m {d.mode:o} -o {d.owner} -g {d.owner} {q}"))
        elif owners[d.path] != d.owner:
            ops.append(Op(f"give {d.path} to uid {d.owner}", f"chown {d.owner}:{d.owner} {q}"))
    return ops
