"""`doit backup` / `doit restore`, the pure half: the archive's format, its verification, and
the commands and plans the remote half (tasks/backup.py) runs. Nothing here talks to a node.

An archive is `backups/NAME-YYYYmmdd-HHMMSS.tar.gz` (local time; mode 0600), with
`NAME-....tar.gz.sha256` beside it (`sha256sum -c` reads it). Inside, as regular files:

    manifest.json               what is below, and where it came from (`build_manifest`)
    database.sql                mariadb-dump of the stack's databases (not `mysql`: see DUMP_FLAGS)
    volume.tar                  Home Assistant's config dir and Mosquitto's store, as tar made
                                them on a node from the volume's mount (owners numeric)
    secrets/ha_token            haswarm's long-lived token for that Home Assistant   (if any)
    secrets/ha_owner_password   the password of its owner account                     (if any)

The manifest gives each member's size and sha256. `verify` refuses (raising ArchiveError, before
any node is contacted) a file that is not a tar, a checksum that does not match (the .sha256 or a
member's), a member missing or one the manifest does not list, another stack's archive, a dump
that did not end, and a volume.tar with a path outside the two directories.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import tarfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any

from tasks.config import Cluster
from tasks.errors import HaswarmError
from tasks.facts import GaleraMember
from tasks.render import volume_paths

FORMAT = 1
MANIFEST = "manifest.json"
DATABASE = "database.sql"
VOLUME = "volume.tar"
TOKEN = "secrets/ha_token"
OWNER_PASSWORD = "secrets/ha_owner_password"
REQUIRED = (DATABASE, VOLUME)
KNOWN = (DATABASE, VOLUME, TOKEN, OWNER_PASSWORD)
# Never dumped nor loaded: MariaDB's own schemas. `mysql` holds the accounts (made by the image
# from the stack's secrets) in Aria tables, which Galera does not replicate: loading them on one
# node would give that node other passwords than the rest of the cluster.
SYSTEM_DATABASES = frozenset({"mysql", "information_schema", "performance_schema", "sys"})
# mariadb-dump: one consistent snapshot (InnoDB, no lock), routines, events and triggers, each
# database dropped and created again on load (the restore replaces), no LOCK TABLES in the
# output (Galera does not support them).
DUMP_FLAGS = ("--single-transaction", "--routines", "--events", "--triggers",
              "--skip-add-locks", "--add-drop-database", "--hex-blob",
              "--default-character-set=utf8mb4")
DUMP_END = b"-- Dump completed"  # mariadb-dump's last comment: the dump ran to its end
# Left out of volume.tar (relative to the mount point): the lock keepers' files (who holds the
# volume now, not then) and the database password the HA container writes at each start.
EXCLUDED = ("homeassistant/.haswarm", "homeassistant/.ha_run.lock",
            "homeassistant/packages/haswarm/secrets.yaml", "mosquitto/data/.haswarm")
STACK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class ArchiveError(HaswarmError):
    """The archive cannot be restored (damaged, incomplete, another stack's); nothing was done."""


class BackupError(HaswarmError):
    """A backup or a restore cannot go on; str() says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Names, checksums, members


def archive_name(stack: str, when: datetime) -> str:
    """'haswarm-20261205-140322.tar.gz' for stack 'haswarm' at `when`."""
    return f"{stack}-{when:%Y%m%d-%H%M%S}.tar.gz"


def sidecar(archive: Path) -> Path:
    """The checksum file beside an archive (`sha256sum` format)."""
    return archive.with_name(archive.name + ".sha256")


def sidecar_text(archive: Path, sha256: str) -> str:
    return f"{sha256}  {archive.name}\n"


class Digest:
    """A writer that hashes and counts what passes through it (into `out`, if any), keeping its
    last bytes (`tail`)."""

    def __init__(self, out: IO[bytes] | None = None, keep: int = 256):
        self.out, self.keep = out, keep
        self.hash = hashlib.sha256()
        self.size = 0
        self.tail = b""

    def write(self, data: bytes) -> int:
        if self.out is not None:
            self.out.write(data)
        self.hash.update(data)
        self.size += len(data)
        self.tail = (self.tail + bytes(data[-self.keep:]))[-self.keep:]
        return len(data)

    @property
    def sha256(self) -> str:
        return self.hash.hexdigest()


def digest_of(f: IO[bytes], chunk: int = 1 << 20) -> Digest:
    """Read `f` to its end: its sha256, size and last bytes."""
    d = Digest()
    while data := f.read(chunk):
        d.write(data)
    return d


def dump_complete(tail: bytes) -> bool:
    """Whether a dump's last bytes hold mariadb-dump's closing comment."""
    return DUMP_END in tail


# ---------------------------------------------------------------------------------------------
# What runs on the nodes


def databases_to_dump(show_databases: str) -> list[str]:
    """`SHOW DATABASES` output (one per line) -> the stack's databases, sorted."""
    return sorted({line.strip() for line in show_databases.splitlines()
                   if line.strip() and line.strip() not in SYSTEM_DATABASES})


def dump_command(container: str, databases: list[str]) -> str:
    """mariadb-dump in the db container, as root over its unix socket (no password)."""
    return (f"docker exec {shlex.quote(container)} mariadb-dump {' '.join(DUMP_FLAGS)} "
            f"--databases {' '.join(shlex.quote(d) for d in databases)}")


def load_command(container: str) -> str:
    """The mariadb client in the db container reading the dump on stdin; stops at an error."""
    return (f"docker exec -i {shlex.quote(container)} mariadb --batch "
            "--default-character-set=utf8mb4")


def volume_dirs(c: Cluster) -> list[str]:
    """Home Assistant's config dir and Mosquitto's store, relative to the mount point."""
    paths = volume_paths(c)
    mount = PurePosixPath(c.gluster.mount_point)
    return [str(PurePosixPath(paths[k]).relative_to(mount))
            for k in ("homeassistant", "mosquitto_data")]


def tar_command(c: Cluster) -> str:
    """tar of `volume_dirs` to stdout, from the mount point (owners numeric, EXCLUDED left
    out). Exit 1 ("file changed as we read it": Home Assistant runs) is no failure."""
    m = shlex.quote(str(c.gluster.mount_point))
    excluded = " ".join(f"--exclude={shlex.quote(x)}" for x in EXCLUDED)
    return (f"tar --create --file=- --numeric-owner --directory={m} --anchored {excluded} "
            + " ".join(shlex.quote(d) for d in volume_dirs(c)))


def untar_script(c: Cluster) -> str:
    """Read volume.tar on stdin and replace `volume_dirs` on the mount with its content.

    Unpacked first into a new directory on the volume itself (0700), so each directory is then
    swapped in by a rename; the old ones are deleted only after both are in place. A failed
    swap puts the old directory back; a half-done run leaves the old files in
    MOUNT/.haswarm-restore.*/old, never deletes them."""
    m = shlex.quote(str(c.gluster.mount_point))
    dirs = " ".join(shlex.quote(d) for d in volume_dirs(c))
    # emptied parents of the old dirs (mosquitto/ of mosquitto/data), deepest first; the dirs
    # are haswarm's own names (tasks.render.volume_paths): nothing to quote inside the trap
    assert all(re.fullmatch(r"[A-Za-z0-9._/-]+", d) for d in volume_dirs(c))
    parents = " ".join(f'"$work/old/{q}"' for d in volume_dirs(c)
                       for q in PurePosixPath(d).parents if str(q) != ".")
    return (
        f"set -eu; m={m}\n"
        'work=$(mktemp -d "$m/.haswarm-restore.XXXXXXXXXX")\n'
        f'trap \'rm -rf "$work/new"; rmdir {parents} "$work/old" "$work" 2>/dev/null '
        "|| true' EXIT\n"
        'mkdir "$work/new" "$work/old"\n'
        'tar --extract --file=- --numeric-owner --same-owner --same-permissions '
        '--directory="$work/new"\n'
        f"for d in {dirs}; do\n"
        '  [ -d "$work/new/$d" ] || { echo "volume.tar lacks $d" >&2; exit 3; }\n'
        "done\n"
        f"for d in {dirs}; do\n"
        '  mkdir -p "$(dirname "$m/$d")" "$(dirname "$work/old/$d")"\n'
        '  if [ -e "$m/$d" ]; then mv "$m/$d" "$work/old/$d"; fi\n'
        '  if ! mv "$work/new/$d" "$m/$d"; then\n'
        '    [ ! -e "$work/old/$d" ] || mv "$work/old/$d" "$m/$d"\n'
        '    echo "could not move the restored $d into place" >&2; exit 4\n'
        "  fi\n"
        "done\n"
        'rm -rf "$work"\n')


def pick_member(members: Iterable[GaleraMember], avoid: Iterable[str] = ()) -> GaleraMember | None:
    """A Synced db member (not the seed), preferably on a node not in `avoid` (the one running
    Home Assistant: it has enough to do); by node name otherwise. None when none is Synced."""
    busy = set(avoid)
    synced = sorted((m for m in members if m.service == "db" and m.synced),
                    key=lambda m: (m.node in busy, m.node))
    return synced[0] if synced else None


def table_counts_sql(databases: list[str]) -> str:
    """Tables per restored database, read after every earlier write is applied here."""
    names = ", ".join("'" + d.replace("\\", "\\\\").replace("'", "''") + "'" for d in databases)
    return ("SET SESSION wsrep_sync_wait = 1;\n"
            "SELECT table_schema, COUNT(*) FROM information_schema.tables "
            f"WHERE table_schema IN ({names}) GROUP BY table_schema ORDER BY table_schema;\n")


def counts_disagree(databases: list[str], by_node: Mapping[str, str]) -> list[str]:
    """Problems in `table_counts_sql` outputs by node: a database missing on a node, or nodes
    that disagree; [] when every node has the same tables in every database."""
    parsed: dict[str, dict[str, str]] = {}
    for node, text in by_node.items():
        rows = dict(line.split("\t", 1) for line in text.splitlines() if "\t" in line)
        parsed[node] = {k.strip(): v.strip() for k, v in rows.items()}
    problems = [f"{node}: database {d} is missing" for node, rows in sorted(parsed.items())
                for d in databases if d not in rows]
    views = {json.dumps(rows, sort_keys=True) for rows in parsed.values()}
    if len(views) > 1:
        problems.append("the db members disagree on the tables: " + "; ".join(
            f"{n} {rows}" for n, rows in sorted(parsed.items())))
    return problems


# ---------------------------------------------------------------------------------------------
# The manifest and the archive


def build_manifest(c: Cluster, *, created: datetime, cluster_text: str, version: str | None,
                   members: Mapping[str, Digest], databases: list[str],
                   sources: Mapping[str, str], secret_fingerprints: Mapping[str, str]
                   ) -> dict[str, Any]:
    """The manifest of an archive of cluster `c` (`created`: an aware datetime)."""
    return {
        "format": FORMAT,
        "stack": c.name,
        "haswarm_version": version,
        "created": created.isoformat(timespec="seconds"),
        "cluster_file_sha256": hashlib.sha256(cluster_text.encode()).hexdigest(),
        "images": {k: v.image for k, v in c.images if v is not None},
        "mount_point": str(c.gluster.mount_point),
        "volume_dirs": volume_dirs(c),
        "databases": list(databases),
        "sources": dict(sources),  # what was read where: {"database": "pi2 (db ...)", ...}
        # fingerprints (tasks.secrets.digest) of the stack's secrets then: the restored config
        # holds HA's MQTT password of that time
        "secret_fingerprints": dict(sorted(secret_fingerprints.items())),
        "members": {name: {"size": d.size, "sha256": d.sha256}
                    for name, d in sorted(members.items())},
    }


def write_archive(path: Path, manifest: Mapping[str, Any], files: Mapping[str, Path],
                  mtime: float) -> None:
    """Write the archive (manifest first, then `files` {member: local path}), 0600 from the
    start, as a new file: an existing one is never overwritten."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w:gz", compresslevel=6) as tar:
            data = (json.dumps(manifest, indent=2) + "\n").encode()
            tar.addfile(_info(MANIFEST, len(data), mtime), io.BytesIO(data))
            for name, local in files.items():
                with open(local, "rb") as f:
                    tar.addfile(_info(name, local.stat().st_size, mtime), f)
        raw.flush()
        os.fsync(raw.fileno())


def _info(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, int(mtime)
    return info


# ---------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True)
class Verified:
    """An archive that passed `verify`: its manifest, and notes for the user."""

    path: Path
    manifest: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def has(self, member: str) -> bool:
        return member in self.manifest["members"]


def verify(path: Path, stack: str, dirs: list[str]) -> Verified:
    """Check the archive at `path` for stack `stack`, whose volume holds `dirs`; ArchiveError
    naming the problem otherwise."""
    if not path.is_file():
        raise ArchiveError(f"{path}: no such file")
    notes = []
    side = sidecar(path)
    if side.is_file():
        want = side.read_text().split()[:1]
        if not want or not re.fullmatch(r"[0-9a-f]{64}", want[0]):
            raise ArchiveError(f"{side}: not a sha256 checksum line")
        with open(path, "rb") as f:
            got = digest_of(f).sha256
        if got != want[0]:
            raise ArchiveError(f"{path}: checksum mismatch: the file's sha256 is {got}, "
                               f"{side.name} says {want[0]}: the archive is damaged (or not "
                               "that file)")
    else:
        notes.append(f"no {side.name} beside it: the members' checksums in the manifest "
                     "are checked, not the file's")
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        raise ArchiveError(f"{path}: not a tar archive (plain or compressed): damaged, or not "
                           "a haswarm backup") from None
    try:
        with tar:
            manifest = _check_members(path, tar, stack, dirs)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ArchiveError(f"{path}: not a readable tar archive ({e}): damaged, or not a "
                           "haswarm backup") from None
    return Verified(path, manifest, notes)


def _check_members(path: Path, tar: tarfile.TarFile, stack: str, dirs: list[str]
                   ) -> dict[str, Any]:
    entries = tar.getmembers()
    names = [m.name for m in entries]
    if len(set(names)) != len(names):
        raise ArchiveError(f"{path}: a member appears twice: not an archive haswarm wrote")
    by_name = {m.name: m for m in entries}
    if MANIFEST not in by_name or not by_name[MANIFEST].isfile():
        raise ArchiveError(f"{path}: missing member {MANIFEST}: not a haswarm backup")
    manifest = _read_manifest(path, tar, by_name[MANIFEST])
    if manifest["stack"] != stack:
        raise ArchiveError(f"{path}: an archive of stack {manifest['stack']!r}; this cluster is "
                           f"{stack!r}: restore it onto the cluster it came from (`doit "
                           "config=FILE restore ...`)")
    listed = manifest["members"]
    missing = [n for n in [*REQUIRED, *listed] if n not in by_name]
    if missing:
        raise ArchiveError(f"{path}: missing member {', '.join(dict.fromkeys(missing))}")
    unlisted = [n for n in REQUIRED if n not in listed] + [
        n for n in names if n != MANIFEST and n not in listed]
    if unlisted:
        raise ArchiveError(f"{path}: member {', '.join(unlisted)} not in the manifest: "
                           "not an archive haswarm wrote")
    if manifest["volume_dirs"] != dirs:
        raise ArchiveError(f"{path}: holds {', '.join(manifest['volume_dirs'])} of the volume; "
                           f"this haswarm keeps {', '.join(dirs)}: restore with the haswarm "
                           "version that made it")
    for name, want in listed.items():
        m = by_name[name]
        f = tar.extractfile(m) if m.isfile() else None
        if f is None:
            raise ArchiveError(f"{path}: member {name} is not a regular file")
        d = digest_of(f)
        if (d.size, d.sha256) != (want["size"], want["sha256"]):
            raise ArchiveError(f"{path}: member {name}: checksum mismatch (sha256 {d.sha256}, "
                               f"{d.size} bytes; the manifest says {want['sha256']}, "
                               f"{want['size']} bytes): the archive is damaged")
        if name == DATABASE and not dump_complete(d.tail):
            raise ArchiveError(f"{path}: {DATABASE} does not end with mariadb-dump's "
                               f"'{DUMP_END.decode()}': the dump was cut short")
    inner = tar.extractfile(by_name[VOLUME])
    assert inner is not None
    try:
        with tarfile.open(fileobj=inner, mode="r|") as vol:
            problems = volume_problems([(e.name, e.type, e.linkname) for e in vol], dirs)
    except tarfile.TarError as e:
        raise ArchiveError(f"{path}: {VOLUME} is not a tar archive ({e})") from None
    if problems:
        raise ArchiveError(f"{path}: {VOLUME}: " + "; ".join(problems[:5]))
    return manifest


def _read_manifest(path: Path, tar: tarfile.TarFile, m: tarfile.TarInfo) -> dict[str, Any]:
    f = tar.extractfile(m)
    try:
        data = json.loads(f.read(1 << 20) if f else b"")
    except (ValueError, UnicodeDecodeError) as e:
        raise ArchiveError(f"{path}: {MANIFEST} is not JSON ({e}): the archive is damaged, or "
                           "not a haswarm backup") from None
    ok = (isinstance(data, dict) and isinstance(data.get("stack"), str)
          and isinstance(data.get("members"), dict)
          and isinstance(data.get("volume_dirs"), list)
          and isinstance(data.get("databases"), list)
          and all(isinstance(v, dict) and isinstance(v.get("size"), int)
                  and isinstance(v.get("sha256"), str) for v in data["members"].values()))
    if not ok:
        raise ArchiveError(f"{path}: {MANIFEST} lacks stack, members, volume_dirs or databases")
    if data.get("format") != FORMAT:
        raise ArchiveError(f"{path}: archive format {data.get('format')!r}; this haswarm reads "
                           f"format {FORMAT}")
    if any(n not in KNOWN for n in data["members"]):
        raise ArchiveError(f"{path}: {MANIFEST} lists members this haswarm does not know: "
                           + ", ".join(n for n in data["members"] if n not in KNOWN))
    return data


def volume_problems(entries: Iterable[tuple[str, bytes, str]], dirs: list[str]) -> list[str]:
    """What is wrong with volume.tar's entries (name, tarfile type, link target): a path
    outside `dirs`, absolute or with '..', below a symbolic link of the archive, a device;
    a directory of `dirs` missing."""
    problems, links, seen = [], set(), set()

    def inside(name: str) -> bool:
        p = PurePosixPath(name)
        return (not p.is_absolute() and ".." not in p.parts
                and any(name == d or name.startswith(d + "/") for d in dirs))

    for name, kind, linkname in entries:
        name = name.rstrip("/")
        if not inside(name):
            problems.append(f"{name!r} lies outside {', '.join(dirs)}")
            continue
        parents = {str(q) for q in PurePosixPath(name).parents}
        if parents & links:
            problems.append(f"{name!r} lies below a symbolic link of the archive")
        if kind == tarfile.LNKTYPE and not inside(linkname):
            problems.append(f"hard link {name!r} points outside: {linkname!r}")
        if kind == tarfile.SYMTYPE:
            links.add(name)
        elif kind not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.LNKTYPE,
                          tarfile.GNUTYPE_SPARSE):
            problems.append(f"{name!r} is not a file, directory or link")
        if kind == tarfile.DIRTYPE:
            seen.add(name)
    problems += [f"the directory {d}/ is missing" for d in dirs if d not in seen]
    return problems


# ---------------------------------------------------------------------------------------------
# The restore plan


@dataclass(frozen=True)
class RestorePlan:
    """What `doit restore` does, in order (shown first), and what the user should know."""

    phases: list[str]
    warnings: list[str]
    replicas: dict[str, int]  # homeassistant, mosquitto: scaled back to these


def plan_restore(v: Verified, c: Cluster, *, cluster_text: str, replicas: Mapping[str, int],
                 fingerprints: Mapping[str, str], token_file: str, owner_file: str
                 ) -> RestorePlan:
    """The restore of archive `v` onto cluster `c`. `replicas`: the stack file's counts;
    `fingerprints`: the stack's secrets now (tasks.secrets.digest); `token_file` and
    `owner_file`: where this computer keeps haswarm's token and the owner's password."""
    m = v.manifest
    want = {s: int(replicas[s]) for s in ("homeassistant", "mosquitto")}
    dirs = ", ".join(f"{c.gluster.mount_point}/{d}" for d in m["volume_dirs"])
    dbs = ", ".join(m["databases"]) or "none"
    phases = [
        "stop homeassistant and mosquitto (scale to 0), wait until their containers are gone "
        "on every node",
        f"replace {dirs} with the archive's (through one node's mount); haswarm's package "
        "written again as `doit setup` renders it",
    ]
    mine = [f for f, member in ((token_file, TOKEN), (owner_file, OWNER_PASSWORD))
            if v.has(member)]
    if mine:
        phases.append(f"write {' and '.join(mine)} (this computer) as the archive holds them: "
                      "they belong to the restored Home Assistant")
    phases += [
        f"load the database dump ({dbs}; each database dropped and created again) through one "
        "Synced db member: Galera replicates it to every member; check every member has it",
        f"scale homeassistant to {want['homeassistant']} and mosquitto to {want['mosquitto']}, "
        "wait until they run and Home Assistant answers",
    ]
    warnings = []
    now = hashlib.sha256(cluster_text.encode()).hexdigest()
    if m.get("cluster_file_sha256") not in (None, now):
        warnings.append("the archive was made with another version of the cluster file: fine "
                        "for a changed or new cluster (this file's paths and counts are used)")
    images = {k: v.image for k, v in c.images if v is not None}
    then_ha, now_ha = (m.get("images") or {}).get("homeassistant"), images["homeassistant"]
    if then_ha and then_ha != now_ha:
        warnings.append(f"the archive's Home Assistant ran {then_ha}, this cluster runs "
                        f"{now_ha}: Home Assistant migrates its config and database forward, "
                        "not back")
    mqtt = "mqtt_homeassistant"
    then_fp = (m.get("secret_fingerprints") or {}).get(mqtt)
    if then_fp and fingerprints.get(mqtt) not in (None, then_fp):
        warnings.append(f"{mqtt} is not the one of the archive's time: the restored MQTT "
                        "integration of Home Assistant logs in with the old password and the "
                        "broker refuses it. Put the old file back from a backup of the secrets "
                        "(then `doit setup`), or enter the new password in Home Assistant's "
                        "MQTT integration")
    if not v.has(TOKEN):
        warnings.append(f"the archive holds no haswarm token: {token_file} belongs to the "
                        "Home Assistant being replaced and will be refused after the restore "
                        "(`doit status` shows it); put a long-lived token of the restored one "
                        "there")
    return RestorePlan(phases, warnings, want)
