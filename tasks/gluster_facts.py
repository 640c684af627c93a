"""GlusterFS facts: the commands that ask a node about glusterd, the volume and haswarm's mount,
and the pure parsers of their output (gluster's `--xml` output, /etc/fstab, /proc/mounts, stat).

The fstab helpers here also write haswarm's line into (or out of) fstab text; tasks/gluster_plans.py
turns these facts into commands, tasks/gluster.py runs the steps.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tasks.service import SYSTEMD

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET

    from tasks.config import Cluster

GLUSTER = "gluster --mode=script"
# The pool and the volume as one node sees them: the same command in every step that reads
# them, so that a run asks each node once (tasks/fact_cache.py).
PEER_STATUS = f"timeout 20 {GLUSTER} --xml peer status"


def volume_info_command(volume: str) -> str:
    """`volume info` of `volume` as XML (parse_volume_info)."""
    return f"timeout 20 {GLUSTER} --xml volume info {shlex.quote(volume)}"


def status_command(c: Cluster) -> str:
    """`volume status` of the volume (brick -> online: tasks.facts_cluster.parse_volume_status;
    the brick processes: parse_brick_processes). A pool-wide transaction: ask one node."""
    return f"timeout 20 {GLUSTER} --xml volume status {shlex.quote(c.gluster.volume)}"

# Deadline of a change to the pool or the volume (peer probe, volume create/set/start/stop/delete):
# the gluster CLI gives up by itself after 120 s when a peer does not answer, with its reason.
GLUSTER_CHANGE_TIMEOUT = 150.0
# A dead FUSE mount makes stat hang until the client gives up: never wait longer than this.
STAT_TIMEOUT = 8
# Marker of haswarm's own line in /etc/fstab (the line below it is haswarm's entry).
FSTAB_MARKER = "# haswarm: GlusterFS volume"


# ---------------------------------------------------------------------------------------------
# Parsing gluster's XML output (`gluster --xml ...`): stable, unlike the human text


@dataclass(frozen=True)
class Peer:
    """One entry of `gluster peer status`: the names the pool knows it by, and its state."""

    names: tuple[str, ...]
    connected: bool
    state: str
    uuid: str = ""  # its glusterd's UUID, as this node knows it

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
    id: str = ""  # the volume's UUID (its bricks carry it as trusted.glusterfs.volume-id)


class GlusterOutputError(ValueError):
    """Output of the gluster CLI that cannot be understood."""


def cli_xml(text: str) -> ET.Element:
    """The XML document in the gluster CLI's `--xml` output (raises GlusterOutputError)."""
    import xml.etree.ElementTree as ET  # here: loading the doit tasks does not need a parser

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
            uuid=(p.findtext("uuid") or "").strip(),
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
        id=(vol.findtext("id") or "").strip(),
    )


def brick_hosts(text: str) -> set[str]:
    """`gluster --xml volume info` (every volume) -> the hosts that hold a brick of any."""
    if cli_error(text) is not None:
        raise GlusterOutputError(f"volume info failed: {cli_error(text)}")
    return {(b.findtext("name") or (b.text or "")).strip().rsplit(":", 1)[0]
            for b in cli_xml(text).findall("volInfo/volumes/volume/bricks/brick")}


# -- glusterd ------------------------------------------------------------------------------------

DAEMON_PROBES = {
    "cli": "if command -v gluster >/dev/null; then echo yes; else echo no; fi",
    "disabled": f"if {SYSTEMD} && ! systemctl is-enabled -q glusterd 2>/dev/null; "
                "then echo yes; else echo no; fi",
    # glusterd answers when its peer status does (the pool's own read: asked once a run)
    "peers": PEER_STATUS,
}


# -- a node's identity in the pool and its brick (tasks/gluster_replace.py) ---------------------

GLUSTERD_DIR = "/var/lib/glusterd"
GLUSTERD_INFO = f"{GLUSTERD_DIR}/glusterd.info"  # UUID=... and operating-version=...
VOLUME_ID_XATTR = "trusted.glusterfs.volume-id"


@dataclass(frozen=True)
class GlusterdInfo:
    """/var/lib/glusterd/glusterd.info: the UUID this glusterd is known by in the pool (made on
    its first start) and the pool's operating version."""

    uuid: str = ""  # "": no file yet (glusterd never started)
    op_version: str = ""


def parse_glusterd_info(text: str) -> GlusterdInfo:
    """The `KEY=VALUE` lines of glusterd.info -> GlusterdInfo (missing keys: "")."""
    kv = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep:
            kv[key.strip()] = value.strip()
    return GlusterdInfo(uuid=kv.get("UUID", "").lower(), op_version=kv.get("operating-version", ""))


def glusterd_info_text(uuid: str, op_version: str) -> str:
    """glusterd.info as glusterd writes it."""
    return f"UUID={uuid}\n" + (f"operating-version={op_version}\n" if op_version else "")


def peer_file_text(uuid: str, names: tuple[str, ...] | list[str]) -> str:
    """/var/lib/glusterd/peers/UUID as glusterd stores a befriended peer (state 3: "Peer in
    Cluster"), with every name the pool knows it by."""
    return f"uuid={uuid}\nstate=3\n" + "".join(f"hostname{i}={n}\n"
                                                for i, n in enumerate(names, start=1))


def brick_id_probe(brick_dir: str) -> str:
    """Shell probe: the brick dir's volume-id xattr (getfattr is in `attr`, a dependency of
    glusterfs-common), or why there is none."""
    return (f"getfattr --absolute-names -n {VOLUME_ID_XATTR} -e hex "
            f"{shlex.quote(brick_dir)} 2>&1")


def parse_brick_id(text: str) -> tuple[str, str | None]:
    """`brick_id_probe` output -> ("present", volume UUID) | ("absent", None): the dir is
    missing or has no volume-id (a fresh disk) | ("unknown", None): getfattr could not say."""
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key == VOLUME_ID_XATTR:
            h = value.strip().lower().removeprefix("0x")
            if re.fullmatch(r"[0-9a-f]{32}", h):
                return "present", f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
            return "unknown", None
    if "No such attribute" in text or "No such file or directory" in text:
        return "absent", None
    return "unknown", None


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


def is_gluster(fstype: str) -> bool:
    """A filesystem type (/proc/mounts) of a GlusterFS FUSE mount."""
    return fstype in ("fuse.glusterfs", "glusterfs")


# -- service dirs on the volume ------------------------------------------------------------------


def parse_stat_owner(text: str) -> dict[str, int]:
    """Lines "PATH UID" (from `stat -c '%n %u'`) -> {path: uid}; missing paths are absent."""
    out = {}
    for line in text.splitlines():
        path, _, uid = line.rpartition(" ")
        if path and uid.isdigit():
            out[path] = int(uid)
    return out
