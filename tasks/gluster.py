"""GlusterFS: a replica volume over every node, mounted on every node through fstab.

Setup, in order (doit subtasks of `gluster`; each clean action sits beside its setup step and
undoes exactly it, so `doit clean` runs them in the reverse order):

    gluster:daemon  glusterd answers on every node         clean: nothing (glusterd stays installed)
    gluster:peers   the first node probes the others       clean: peers detached
    gluster:bricks  brick dirs exist on every node         clean: kept; `purge=yes` removes them
    gluster:volume  replica N volume, options, started     clean: stopped and deleted
    gluster:mount   fstab line + FUSE mount on every node  clean: unmounted, haswarm's line removed
    gluster:dirs    service dirs created on the volume     clean: kept (user data, on the bricks)

Every step reads facts from the nodes first and runs only the commands those facts call for; a
converged node prints "nothing to do". The fact -> command logic is made of pure functions (the
`plan_*`, `parse_*` and `fstab_*` ones) so unit tests feed them recorded facts.

Always `gluster --mode=script`: the interactive confirmation exits 0 even when it was answered
"n". Errors that mean "already done" ("does not exist", "not in the started state", "is not part
of cluster") are treated as success by the clean steps.
"""

from __future__ import annotations

import re
import shlex
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from tasks import render
from tasks.config import Cluster, Node, current, purge_requested
from tasks.facts import gather
from tasks.ops import Op, StepError, apply_ops, on_nodes, remote_task, say
from tasks.service import SYSTEMD, service

if TYPE_CHECKING:
    from tasks.remote import Remote

GLUSTER = "gluster --mode=script"
# The uid/gid the eclipse-mosquitto image (and the lab's) runs the broker as.
MOSQUITTO_UID = 1883
# A dead FUSE mount makes stat hang until the client gives up: never wait longer than this.
STAT_TIMEOUT = 8
# Marker of haswarm's own line in /etc/fstab (the line below it is haswarm's entry).
FSTAB_MARKER = "# haswarm: GlusterFS volume"
# Seconds to wait for glusterd to answer after starting it, and for probed peers to connect.
DAEMON_WAIT = 30
PEER_WAIT = 60


# ---------------------------------------------------------------------------------------------
# Parsing gluster's XML output (`gluster --xml ...`): stable, unlike the human text


@dataclass(frozen=True)
class Peer:
    """One entry of `gluster peer status`: the names the pool knows it by, and its state."""

    names: tuple[str, ...]
    connected: bool
    state: str

    @property
    def in_cluster(self) -> bool:
        """Connected and a full member of the trusted pool."""
        return self.connected and self.state == "Peer in Cluster"


@dataclass(frozen=True)
class Volume:
    """What `gluster volume info VOL` says about one volume."""

    name: str
    type: str  # Replicate, Distribute, Distributed-Replicate, ...
    status: str  # Created, Started, Stopped
    replica: int
    bricks: tuple[str, ...]  # "ADDRESS:/path"
    options: dict[str, str] = field(default_factory=dict)


class GlusterOutputError(ValueError):
    """Output of the gluster CLI that cannot be understood."""


def cli_xml(text: str) -> ET.Element:
    """The XML document in the gluster CLI's `--xml` output (raises GlusterOutputError)."""
    start = text.find("<?xml")
    if start < 0:
        start = text.find("<cliOutput")
    if start < 0:
        raise GlusterOutputError(f"no XML in gluster output: {text.strip()[:300]!r}")
    try:
        return ET.fromstring(text[start:].strip())
    except ET.ParseError as e:
        raise GlusterOutputError(f"unreadable gluster XML ({e}): {text.strip()[:300]!r}") from e


def cli_error(text: str) -> str | None:
    """The error gluster reported in its XML (opRet != 0), or None when it succeeded."""
    root = cli_xml(text)
    if (root.findtext("opRet") or "0").strip() == "0":
        return None
    return (root.findtext("opErrstr") or "").strip() or "unknown error"


def parse_peer_status(text: str) -> list[Peer]:
    """`gluster --xml peer status` -> peers (this node itself is never listed)."""
    root = cli_xml(text)
    if (err := cli_error(text)) is not None:
        raise GlusterOutputError(f"peer status failed: {err}")
    peers = []
    for p in root.iter("peer"):
        names = [p.findtext("hostname") or ""]
        names += [h.text or "" for h in p.findall("hostnames/hostname")]
        peers.append(Peer(
            names=tuple(dict.fromkeys(n.strip() for n in names if n and n.strip())),
            connected=(p.findtext("connected") or "0").strip() == "1",
            state=(p.findtext("stateStr") or "").strip(),
        ))
    return peers


def parse_volume_info(text: str) -> Volume | None:
    """`gluster --xml volume info VOL` -> the volume, or None when it does not exist."""
    err = cli_error(text)
    if err is not None:
        if "does not exist" in err:
            return None
        raise GlusterOutputError(f"volume info failed: {err}")
    vol = cli_xml(text).find("volInfo/volumes/volume")
    if vol is None:
        return None
    bricks = tuple((b.findtext("name") or (b.text or "")).strip()
                   for b in vol.findall("bricks/brick"))
    options = {(o.findtext("name") or "").strip(): (o.findtext("value") or "").strip()
               for o in vol.findall("options/option")}
    return Volume(
        name=(vol.findtext("name") or "").strip(),
        type=(vol.findtext("typeStr") or "").strip(),
        status=(vol.findtext("statusStr") or "").strip(),
        replica=int((vol.findtext("replicaCount") or "1").strip()),
        bricks=bricks,
        options=options,
    )


# ---------------------------------------------------------------------------------------------
# The plan: facts -> commands (pure)


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
        **server_keepalive(c.gluster.ping_timeout),
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
    }


def server_keepalive(ping_timeout: int) -> dict[str, str]:
    """Brick-side TCP keepalive: a silent client is dropped after ping_timeout + 4 s."""
    idle = max(1, ping_timeout - 1)
    return {"server.keepalive-time": str(idle), "server.keepalive-interval": "1",
            "server.keepalive-count": "5", "server.tcp-user-timeout": str(ping_timeout + 4)}


def peers_to_probe(c: Cluster, peers: list[Peer]) -> list[Node]:
    """The nodes (other than the first, which probes) its `peer status` does not list."""
    known = {name for p in peers for name in p.names}
    return [n for n in c.nodes[1:] if n.address not in known and n.name not in known]


def peers_not_ready(c: Cluster, peers: list[Peer]) -> list[str]:
    """Names of the other nodes not (yet) 'Peer in Cluster' and connected."""
    ready = {name for p in peers if p.in_cluster for name in p.names}
    return [n.name for n in c.nodes[1:] if n.address not in ready and n.name not in ready]


def plan_volume(c: Cluster, vol: Volume | None) -> list[Op]:
    """Create (when absent), set options that differ, start (when not started).

    Raises StepError when an existing volume has another shape: haswarm never reshapes one.
    """
    name = c.gluster.volume
    v = shlex.quote(name)
    ops: list[Op] = []
    want_bricks = bricks(c)
    replica = replica_count(c)
    if vol is None:
        ops.append(Op(
            f"create volume {name} (replica {replica}: {' '.join(want_bricks)})",
            f"{GLUSTER} volume create {v} replica {replica} transport tcp "
            + " ".join(shlex.quote(b) for b in want_bricks) + " force",
            hint="a brick dir that belonged to another volume is reused as is; a node in "
            "another trusted pool must be detached there first",
        ))
        current_options: dict[str, str] = {}
        status = "Created"
    else:
        problems = []
        if vol.type != "Replicate" or vol.replica != replica:
            problems.append(f"it is {vol.type} (replica {vol.replica}), haswarm needs Replicate "
                            f"with replica {replica}")
        if sorted(vol.bricks) != sorted(want_bricks):
            problems.append(f"its bricks are {', '.join(vol.bricks)}; the cluster file gives "
                            f"{', '.join(want_bricks)}")
        if problems:
            raise StepError(
                f"volume {name} exists but " + "; ".join(problems) + ".\n  what to do: haswarm "
                "does not reshape a volume that holds data. Copy the data off the mount, then "
                "`doit clean` (bricks are kept) and `doit setup`; or fix it by hand (gluster "
                "volume replace-brick / add-brick ... replica N) and re-run setup."
            )
        current_options = vol.options
        status = vol.status
    differ = {k: val for k, val in volume_options(c).items() if current_options.get(k) != val}
    if differ:  # one transaction for all of them (the CLI takes several KEY VALUE pairs)
        pairs = " ".join(f"{shlex.quote(k)} {shlex.quote(val)}" for k, val in differ.items())
        ops.append(Op("set " + ", ".join(f"{k}={val}" for k, val in differ.items()),
                      f"{GLUSTER} volume set {v} {pairs}"))
    if status != "Started":
        ops.append(Op(f"start volume {name} (about 2 s)", f"{GLUSTER} volume start {v}",
                      hint="`gluster volume status` on the node shows which brick failed; "
                      "every node's glusterd must be running"))
    return ops


def plan_volume_clean(c: Cluster, vol: Volume | None) -> list[Op]:
    """Stop (when started) and delete the volume; nothing when it is gone already."""
    if vol is None:
        return []
    v = shlex.quote(c.gluster.volume)
    ops = []
    if vol.status == "Started":
        ops.append(Op(f"stop volume {c.gluster.volume}",
                      tolerant(f"{GLUSTER} volume stop {v}", "is not in the started state")))
    ops.append(Op(f"delete volume {c.gluster.volume} (bricks keep their data)",
                  tolerant(f"{GLUSTER} volume delete {v}", "does not exist"),
                  hint="every node's glusterd must be running to delete a volume"))
    return ops


def tolerant(cmd: str, already: str) -> str:
    """`cmd`, succeeding also when it fails with the error text `already` ("already done");
    any other failure exits 1 with the command's output on stderr."""
    err = "printf '%s\\n' \"$_err\""
    return (f"_err=$({cmd} 2>&1) || {{ {err} | grep -qF {shlex.quote(already)} "
            f"|| {{ {err} >&2; exit 1; }}; }}")


# -- fstab ---------------------------------------------------------------------------------------


def _unescape(field_: str) -> str:
    """fstab and /proc/mounts write space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field_)


def _entry_fields(line: str) -> list[str] | None:
    s = line.strip()
    if not s or s.startswith("#"):
        return None
    return s.split()


def _marker(volume: str) -> str:
    return f"{FSTAB_MARKER} {volume} (written by haswarm; `doit clean` removes it)"


def _haswarm_lines(lines: list[str], mount_point: str, volume: str) -> set[int]:
    """Indices of haswarm's own fstab lines for `volume`: its marker comment, the entry right
    below it (wherever it mounts: a changed mount_point replaces the old line), and any
    glusterfs entry on the mount point (written before markers existed, or by hand)."""
    own: set[int] = set()
    marker = _marker(volume).partition(" (")[0] + " ("
    for i, line in enumerate(lines):
        if line.startswith(marker):
            own.add(i)
            if i + 1 < len(lines) and _entry_fields(lines[i + 1]):
                own.add(i + 1)
            continue
        f = _entry_fields(line)
        if f and len(f) >= 3 and _unescape(f[1]).rstrip("/") == mount_point.rstrip("/") \
                and f[2] in ("glusterfs", "fuse.glusterfs"):
            own.add(i)
    return own


def fstab_conflicts(text: str, mount_point: str, volume: str) -> list[str]:
    """Entries of another filesystem on haswarm's mount point (haswarm would hide them)."""
    lines = text.splitlines()
    own = _haswarm_lines(lines, mount_point, volume)
    out = []
    for i, line in enumerate(lines):
        f = _entry_fields(line)
        if i not in own and f and len(f) >= 2 and \
                _unescape(f[1]).rstrip("/") == mount_point.rstrip("/"):
            out.append(line.strip())
    return out


def fstab_with_entry(text: str, entry: str, mount_point: str, volume: str) -> str:
    """`text` with haswarm's entry (below its marker) in place of any earlier one of haswarm's,
    at the same position; every other line as it was. Idempotent."""
    lines = text.splitlines()
    own = _haswarm_lines(lines, mount_point, volume)
    block = [_marker(volume), entry.strip()]
    out: list[str] = []
    placed = False
    for i, line in enumerate(lines):
        if i in own:
            if not placed:
                out += block
                placed = True
            continue
        out.append(line)
    if not placed:
        out += block
    return "\n".join(out) + "\n"


def fstab_without_entry(text: str, mount_point: str, volume: str) -> str:
    """`text` without haswarm's lines for `volume`; every other line as it was (byte for
    byte)."""
    lines = text.splitlines(keepends=True)
    own = _haswarm_lines([line.rstrip("\n") for line in lines], mount_point, volume)
    return "".join(line for i, line in enumerate(lines) if i not in own)


# -- mounts --------------------------------------------------------------------------------------


def mounted_types(proc_mounts: str, mount_point: str) -> list[str]:
    """The filesystem types mounted on `mount_point` according to /proc/mounts, in order."""
    want = mount_point.rstrip("/") or "/"
    types = []
    for line in proc_mounts.splitlines():
        f = line.split()
        if len(f) >= 3 and _unescape(f[1]) == want:
            types.append(f[2])
    return types


@dataclass(frozen=True)
class MountFacts:
    """What one node says about haswarm's mount."""

    fstab: str | None  # None: no /etc/fstab
    types: list[str]  # filesystems mounted on the mount point (stacked: several)
    alive: bool  # a stat of the mount point answered
    exists: bool  # the mount point directory exists


def mount_probes(c: Cluster) -> dict[str, str]:
    """Shell probes (see `gather`) for `mount_facts`: fstab, /proc/mounts, liveness, dir."""
    m = shlex.quote(str(c.gluster.mount_point))
    return {
        "fstab": "cat /etc/fstab 2>/dev/null || echo @@missing@@",
        "mounts": "cat /proc/mounts",
        "alive": f"if timeout {STAT_TIMEOUT} stat -t {m} >/dev/null 2>&1; then echo yes; "
                 "else echo no; fi",
        "exists": f"if [ -d {m} ]; then echo yes; else echo no; fi",
    }


def mount_facts(c: Cluster, sections: dict[str, str]) -> MountFacts:
    """MountFacts from the output of `mount_probes`."""
    fstab = sections.get("fstab", "")
    types = mounted_types(sections.get("mounts", ""), str(c.gluster.mount_point))
    return MountFacts(
        fstab=None if fstab.strip() == "@@missing@@" else fstab,
        types=types,
        alive=sections.get("alive", "").strip() == "yes",
        # a dead FUSE mount fails `[ -d ]` ("Transport endpoint is not connected"); a path in
        # /proc/mounts exists
        exists=sections.get("exists", "").strip() == "yes" or bool(types),
    )


def _is_gluster(fstype: str) -> bool:
    return fstype in ("fuse.glusterfs", "glusterfs")


def plan_mount(c: Cluster, entry: str, facts: MountFacts) -> list[Op]:
    """fstab entry, mount point dir, and the mount itself (remounted when the FUSE mount died).

    Raises StepError when another filesystem sits on (or is configured for) the mount point."""
    mp = str(c.gluster.mount_point)
    m = shlex.quote(mp)
    fstab = facts.fstab or ""
    conflicts = fstab_conflicts(fstab, mp, c.gluster.volume)
    others = [t for t in facts.types if not _is_gluster(t)]
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
        if not _is_gluster(fstype):
            break  # someone else's filesystem below: leave it and everything under it
        if facts.alive:
            ops.append(Op(f"unmount {mp}", f"umount {m} || umount -l {m}"))
        else:
            ops.append(Op(f"unmount the dead mount on {mp} (umount -l)", f"umount -l {m}"))
    if facts.fstab is not None:
        new = fstab_without_entry(facts.fstab, mp, c.gluster.volume)
        if new != facts.fstab:
            ops.append(Op("remove haswarm's line from /etc/fstab", put=("/etc/fstab", new)))
    stays_mounted = any(not _is_gluster(t) for t in facts.types)
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


def parse_stat_owner(text: str) -> dict[str, int]:
    """Lines "PATH UID" (from `stat -c '%n %u'`) -> {path: uid}; missing paths are absent."""
    out = {}
    for line in text.splitlines():
        path, _, uid = line.rpartition(" ")
        if path and uid.isdigit():
            out[path] = int(uid)
    return out


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


# ---------------------------------------------------------------------------------------------
# The steps (actions of the doit tasks below): each gets the cluster and an open Remote


def _glusterd_answers(r: Remote, node: Node, step: str) -> bool:
    res = r.run(node, step, f"timeout 20 {GLUSTER} peer status >/dev/null 2>&1", check=False)
    return res.ok


START_GLUSTERD = service("glusterd", "start", enable=True, direct="glusterd")

DAEMON_PROBES = {
    "cli": "if command -v gluster >/dev/null; then echo yes; else echo no; fi",
    "disabled": f"if {SYSTEMD} && ! systemctl is-enabled -q glusterd 2>/dev/null; "
                "then echo yes; else echo no; fi",
    "answers": f"if timeout 20 {GLUSTER} peer status >/dev/null 2>&1; then echo yes; "
               "else echo no; fi",
}


def plan_daemon(facts: dict[str, str]) -> list[Op]:
    """From `DAEMON_PROBES` output: enable glusterd (systemd), start it when it does not
    answer. Raises StepError when GlusterFS is not installed."""
    def yes(key: str) -> bool:
        return facts.get(key, "").strip() == "yes"

    if not yes("cli"):
        raise StepError("the gluster command is missing.\n  what to do: install GlusterFS on "
                        "the node (apt-get install glusterfs-server) and re-run setup")
    ops = []
    if yes("disabled"):
        ops.append(Op("enable glusterd at boot", "systemctl enable glusterd"))
    if not yes("answers"):
        ops.append(Op("start glusterd", START_GLUSTERD,
                      hint="see /var/log/glusterfs/glusterd.log on the node"))
    return ops


def setup_daemon(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """glusterd answers on every node (started, and enabled under systemd, when it does not)."""
    from tasks.remote import progress

    step = "gluster:daemon"

    def one(node: Node) -> bool:
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


def setup_peers(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """The first node probes every node its `peer status` lacks; wait until all are connected."""
    from tasks.remote import progress

    step = "gluster:peers"

    def status(first: Node) -> list[Peer]:
        return parse_peer_status(r.run(first, step, f"{GLUSTER} --xml peer status").stdout)

    def one(first: Node) -> dict[str, Any]:
        peers = status(first)
        ops = [Op(f"probe {n.name} ({n.address})",
                  f"{GLUSTER} peer probe {shlex.quote(n.address)}",
                  hint=f"if {n.address} is already in another trusted pool, detach it there "
                  "first (gluster peer detach); every node's glusterd must be reachable on TCP "
                  "24007")
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
            res = r.run(node, step, f"timeout 20 {GLUSTER} --xml peer status", check=False)
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
                "that is down can be dropped with: gluster --mode=script peer detach ADDR force"))
        apply_ops(r, node, step, ops, dryrun=dryrun)
    if unreachable:
        raise RemoteError([f for e in unreachable for f in e.failures])


def setup_bricks(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """The brick directory exists on every node."""
    step = "gluster:bricks"
    b = shlex.quote(str(c.gluster.brick_dir))

    def one(node: Node) -> bool:
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
                          f"rm -rf --one-file-system {b}"))
        apply_ops(r, node, step, ops, dryrun=dryrun)

    on_nodes(r, step, one)


def _volume_on(r: Remote, node: Node, c: Cluster, step: str) -> Volume | None:
    res = r.run(node, step, f"{GLUSTER} --xml volume info {shlex.quote(c.gluster.volume)}",
                check=False)
    try:
        return parse_volume_info(res.stdout)
    except GlusterOutputError as e:
        raise StepError(f"{e}.\n  what to do: check that glusterd runs on {node.name} "
                        "(gluster:daemon)") from None


def setup_volume(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """Create the replica volume when absent, set its options, start it (from the first node)."""
    step = "gluster:volume"

    def one(first: Node) -> dict[str, Any]:
        apply_ops(r, first, step, plan_volume(c, _volume_on(r, first, c, step)), dryrun=dryrun)
        if dryrun:
            return {}
        vol = _volume_on(r, first, c, step)
        if vol is None or vol.status != "Started":
            raise StepError(f"volume {c.gluster.volume} is not started after setup.\n  what to "
                            f"do: see `gluster volume status {c.gluster.volume}` on the node")
        return {"volume": vol.name, "type": vol.type, "bricks": list(vol.bricks)}

    return on_nodes(r, step, one, c.nodes[:1])[c.nodes[0].name]


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
        facts = mount_facts(c, gather(r, node, step, mount_probes(c)))
        changed = apply_ops(r, node, step, plan_mount(c, entries[node.name], facts),
                            dryrun=dryrun)
        if changed and not dryrun:
            after = mount_facts(c, gather(r, node, step, mount_probes(c)))
            if not (after.alive and any(_is_gluster(t) for t in after.types)):
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
        if facts.alive and any(_is_gluster(t) for t in facts.types):
            return node
    return None


def setup_dirs(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """Service directories on the volume (through one node's mount): HA config, Mosquitto data."""
    step = "gluster:dirs"
    node = mounted_node(c, r, step)
    if node is None and dryrun:
        say(c.nodes[0], f"{step}: would create {', '.join(d.path for d in service_dirs(c))} "
                        "once the volume is mounted")
        return {}
    if node is None:
        raise StepError(f"the volume is mounted on no node at {c.gluster.mount_point}.\n"
                        "  what to do: run `doit gluster:mount` first")
    paths = " ".join(shlex.quote(d.path) for d in service_dirs(c))
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
    yield remote_task(c, "gluster-peers", "peers", "trusted pool: the first node probes the rest",
                      setup_peers, clean_peers,
                      task_dep=["gluster:daemon"])
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


def clean_daemon(c: Cluster, r: Remote, dryrun: bool) -> None:
    """glusterd is left installed and running (the package is not haswarm's to remove)."""
    say(c.nodes[0], "gluster:daemon (clean): glusterd left running on every node "
                     "(it serves no volume and no peers any more)")
