"""`doit backup` and `doit restore`: one archive on this computer holds what the cluster cannot
make again (the archive's format and the pure plans: tasks/backup_archive.py).

backup, in order (nothing is stopped; a few seconds of a busy Pi):
  1. one db member Synced in the Primary component is picked; `SET GLOBAL wsrep_desync = ON`
     on it (flow control ignores it while it dumps, so the cluster does not stall), then
     mariadb-dump of the stack's databases in one consistent snapshot (`--single-transaction`)
     streamed to this computer (nothing written on the node), then `wsrep_desync = OFF`, also
     when the dump failed or was interrupted;
  2. tar of Home Assistant's config dir and Mosquitto's store from a node where the volume is
     mounted, streamed to this computer;
  3. haswarm's Home Assistant token and the owner's password (this computer's secrets: they
     belong to that Home Assistant's .storage);
  4. the manifest; the archive written 0600 into backups/ (0700), its .sha256 beside it.

restore, in order (the archive is verified first, touching no node; then asked for, `yes=1`):
  1. homeassistant and mosquitto scaled to 0; wait until their containers are gone everywhere;
  2. both directories replaced through one node's mount (tasks/backup_archive.py untar_script);
     haswarm's package written again as `doit setup` renders it (tasks/homeassistant.py);
     the token and owner's password written back on this computer;
  3. the dump loaded through one Synced db member (Galera replicates it); every member is
     asked for the restored tables;
  4. homeassistant and mosquitto scaled back to the stack file's counts; wait until they run
     and Home Assistant answers.
A failure after step 1 leaves both stopped and says so: run the restore again (it starts
over), or `doit stack` to start them on what the volume and database hold now.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from doit.exceptions import TaskFailed

from tasks import backup_archive as fmt
from tasks import secrets
from tasks.backup_archive import ArchiveError, BackupError, Digest, Verified
from tasks.config import PROJECT_ROOT, Cluster, Node, cluster_file
from tasks.errors import HaswarmError
from tasks.failures import redact

if TYPE_CHECKING:
    from tasks.facts import GaleraMember
    from tasks.remote import Remote

BACKUP_DIR = PROJECT_ROOT / "backups"
HA, MQTT, DB = "homeassistant", "mosquitto", "db"
STREAM_TIMEOUT = 3600.0  # s: a dump or the volume's tar, however large (a dead node: 65 s)
SQL_TIMEOUT = 30.0  # s: one short statement
CHECK_TIMEOUT = 120.0  # s: a causal read after the load waits until the member has applied it
STOP_TIMEOUT = 180.0  # s: HA's stop grace period is 30 s, Mosquitto's 20 s
START_TIMEOUT = 600.0  # s: until both run and are healthy again
HA_TIMEOUT = 600.0  # s: until Home Assistant answers HTTP (a restored database may migrate)
RESTORE_RATE = 100_000  # bytes/s at the slowest (a Pi's SD card through Gluster): deadlines


def _say(node: Node | str, msg: str) -> None:
    from tasks.remote import progress

    progress(node, msg)


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def sql(r: Remote, node: str, container: str, statements: str, step: str,
        timeout: float = SQL_TIMEOUT) -> str:
    """tasks.markers.sql (imported here: `doit list` loads this module) under `step`."""
    from tasks.markers import sql as run_sql

    return run_sql(r, node, container, statements, timeout=timeout, step=step)


@contextmanager
def _private(path: Path) -> Iterator[IO[bytes]]:
    """A new file only root can read, opened for writing."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        yield f


def _version() -> str | None:
    """haswarm's version (pyproject.toml) and commit, when known."""
    try:
        version = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, ValueError):
        version = None
    try:
        commit = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version or '?'}+{commit}" if commit else version


def _synced_member(r: Remote, c: Cluster, manager: str, avoid: set[str]) -> GaleraMember:
    from tasks.galera import members
    from tasks.stack_observe import observe

    member = fmt.pick_member(members(r, c, observe(r, c, manager)), avoid)
    if member is None:
        raise BackupError("no db member is Synced in a Primary component",
                          "run `doit status` to see the database's state; bring it back "
                          "(`doit stack`), then run this again")
    return member


def _mounted(r: Remote, c: Cluster, step: str) -> Node:
    from tasks.gluster import mounted_node

    node = mounted_node(c, r, step)
    if node is None:
        raise BackupError(f"the volume is mounted on no node at {c.gluster.mount_point}",
                          "run `doit gluster` (or `doit status` to see why), then this again")
    return node


# ---------------------------------------------------------------------------------------------
# backup


def dump(r: Remote, m: GaleraMember, dest: Path) -> tuple[Digest, list[str]]:
    """The stack's databases dumped from member `m` (desynced meanwhile) into `dest`."""
    from tasks.remote import RemoteError
    from tasks.remote_stream import stream

    step = "backup: database"
    dbs = fmt.databases_to_dump(sql(r, m.node, m.container, "SHOW DATABASES;\n", step))
    if not dbs:
        raise BackupError("the database holds no database of the stack: nothing to dump",
                          "is Home Assistant's recorder on it? (`doit status`)")
    _say(m.node, f"{step}: wsrep_desync=ON on db {m.container[:12]}, then dump "
                 f"{', '.join(dbs)} (one consistent snapshot)")
    started, done = time.monotonic(), False
    try:  # OFF below also when ON failed (it may have been set): OFF twice is a mere warning
        sql(r, m.node, m.container, "SET GLOBAL wsrep_desync = ON;\n", step)
        with _private(dest) as f:
            d = Digest(f)
            stream(r, m.node, step, fmt.dump_command(m.container, dbs), sink=d,
                   timeout=STREAM_TIMEOUT, hint="see the db container's log "
                   "(`docker logs` on the node)")
        done = True
    finally:
        try:
            sql(r, m.node, m.container, "SET GLOBAL wsrep_desync = OFF;\n", step)
            _say(m.node, f"{step}: wsrep_desync=OFF again")
        except RemoteError:
            _say(m.node, f"{step}: WARNING: wsrep_desync could not be set OFF again: run "
                         f"`docker exec -i {m.container} mariadb -e 'SET GLOBAL wsrep_desync"
                         "=OFF'` on the node (a restart of the container does it too)")
            if done:
                raise
    if not fmt.dump_complete(d.tail):
        raise BackupError(f"the dump ended without mariadb-dump's '{fmt.DUMP_END.decode()}'",
                          "see the db container's log, then run the backup again")
    _say(m.node, f"{step}: {_mb(d.size)} in {time.monotonic() - started:.1f} s")
    return d, dbs


def tar_volume(r: Remote, c: Cluster, node: Node, dest: Path) -> Digest:
    """Home Assistant's config dir and Mosquitto's store, as tar, from `node`'s mount."""
    from tasks.remote import tail
    from tasks.remote_stream import stream

    step = "backup: volume"
    dirs = fmt.volume_dirs(c)
    _say(node, f"{step}: tar of {', '.join(f'{c.gluster.mount_point}/{d}' for d in dirs)}")
    started = time.monotonic()
    with _private(dest) as f:
        d = Digest(f)
        res = stream(r, node, step, fmt.tar_command(c), sink=d, timeout=STREAM_TIMEOUT,
                     ok=(0, 1), hint="is the volume mounted and readable there?")
    if res.exit_code == 1:  # GNU tar: a file changed while it was read (Home Assistant runs)
        _say(node, f"{step}: tar: {tail(res.stderr, 3) or 'some files changed while read'}")
    with tarfile.open(dest, "r:") as t:
        problems = fmt.volume_problems([(e.name, e.type, e.linkname) for e in t], dirs)
    if problems:
        raise BackupError(f"the volume's tar is not as expected: {'; '.join(problems[:3])}")
    _say(node, f"{step}: {_mb(d.size)} in {time.monotonic() - started:.1f} s")
    return d


def run_backup(c: Cluster, r: Remote, out_dir: Path) -> Path:
    """Write one archive of cluster `c` into `out_dir`; its path."""
    from tasks.stack_observe import containers_everywhere, find_manager

    r.redact(*secrets.secret_values(c))
    created = datetime.now().astimezone()
    final = out_dir / fmt.archive_name(c.name, created)
    if final.exists():
        raise BackupError(f"{final} exists already", "run the backup again in a second")
    manager = find_manager(r, c)
    assert manager is not None
    running, _ = containers_everywhere(r, c)
    busy = set() if c.ha_standby else {ct.node for ct in running if ct.service == HA}
    member = _synced_member(r, c, manager, busy)
    node = _mounted(r, c, "backup: volume")
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(out_dir, 0o700)
    work = out_dir / f".{final.name}.parts"
    partial = out_dir / f".{final.name}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700)
    try:
        digests, files = {}, {}
        files[fmt.DATABASE], files[fmt.VOLUME] = work / "database.sql", work / "volume.tar"
        digests[fmt.DATABASE], dbs = dump(r, member, files[fmt.DATABASE])
        digests[fmt.VOLUME] = tar_volume(r, c, node, files[fmt.VOLUME])
        for name, source in ((fmt.TOKEN, secrets.token_path(c)),
                             (fmt.OWNER_PASSWORD, secrets.path(c, secrets.HA_OWNER_PASSWORD))):
            try:
                value = source.read_text().strip()
            except OSError:
                continue
            if value:
                files[name] = work / name.replace("/", "_")
                with _private(files[name]) as f:
                    digests[name] = Digest(f)
                    digests[name].write(value.encode() + b"\n")
        fingerprints = {n: secrets.digest(c, n) for n in secrets.names(c)
                        if secrets.path(c, n).is_file()}
        manifest = fmt.build_manifest(
            c, created=created, cluster_text=_cluster_text(), version=_version(),
            members=digests, databases=dbs, secret_fingerprints=fingerprints,
            sources={"database": f"{member.node} (db {member.container[:12]}, desynced)",
                     "volume": f"{node.name}:{c.gluster.mount_point}"})
        partial.unlink(missing_ok=True)
        fmt.write_archive(partial, manifest, files, created.timestamp())
        with open(partial, "rb") as f:
            sha256 = fmt.digest_of(f).sha256
        os.replace(partial, final)
        secrets.write_private(fmt.sidecar(final), fmt.sidecar_text(final, sha256).strip())
        held = [n.removeprefix("secrets/") for n in (fmt.TOKEN, fmt.OWNER_PASSWORD) if n in files]
        _say("backup", f"{final.name}: mode 0600" + (
            f"; it holds secrets ({', '.join(held)}): keep it as safe as {secrets.directory(c)}"
            if held else ""))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        partial.unlink(missing_ok=True)
    return final


def _cluster_text() -> str:
    from doit import get_var

    try:
        return cluster_file(get_var("config")).read_text()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# restore


def prepare_restore(c: Cluster, archive: Path) -> tuple[Verified, fmt.RestorePlan]:
    """Verify the archive and plan its restore onto `c` (this computer only: no node)."""
    from tasks.galera import steady_file
    from tasks.homeassistant import rendered
    from tasks.stack_facts import expected_replicas

    v = fmt.verify(archive, c.name, fmt.volume_dirs(c))
    needed = [steady_file(c), rendered(c, "packages/haswarm/haswarm.yaml")]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise BackupError(f"{', '.join(missing)} missing: the cluster is not set up from here",
                          "run `doit setup` first (a restore goes onto a set-up cluster)")
    replicas = expected_replicas(steady_file(c).read_text(), len(c.nodes))
    fingerprints = {n: secrets.digest(c, n) for n in secrets.names(c)
                    if secrets.path(c, n).is_file()}
    plan = fmt.plan_restore(v, c, cluster_text=_cluster_text(), replicas=replicas,
                            fingerprints=fingerprints, token_file=str(secrets.token_path(c)),
                            owner_file=str(secrets.path(c, secrets.HA_OWNER_PASSWORD)))
    return v, plan


def _wait_gone(r: Remote, c: Cluster, services: tuple[str, ...], timeout: float) -> None:
    """Until no container of `services` runs on any node (every node must answer)."""
    from tasks.stack_observe import containers_everywhere

    deadline = time.monotonic() + timeout
    while True:
        running, unreachable = containers_everywhere(r, c)
        left = sorted({f"{ct.service} on {ct.node}" for ct in running if ct.service in services})
        if not left and not unreachable:
            return
        if time.monotonic() > deadline:
            raise BackupError(f"after {timeout:g} s still running: {', '.join(left) or 'none'}"
                              + (f"; not answering: {', '.join(unreachable)}"
                                 if unreachable else ""),
                              "look at `docker ps` on those nodes")
        time.sleep(1)


def _phase(number: int, what: str) -> float:
    print(f"restore: [{number}/4] {what}", flush=True)
    return time.monotonic()


def _done(number: int, started: float) -> None:
    print(f"restore: [{number}/4] done in {time.monotonic() - started:.1f} s", flush=True)


def run_restore(c: Cluster, r: Remote, v: Verified, plan: fmt.RestorePlan,
                stopped: list[bool]) -> None:
    """Carry out `plan` (see the module's docstring); `stopped` is set once HA and Mosquitto
    were scaled to 0."""
    from tasks.homeassistant import setup_files
    from tasks.remote_stream import stream
    from tasks.stack import scale
    from tasks.stack_observe import (
        containers_everywhere,
        find_manager,
        observe,
        probe_http,
        wait_for,
    )

    r.redact(*secrets.secret_values(c))
    manager = find_manager(r, c)
    assert manager is not None
    state = observe(r, c, manager)
    _, unreachable = containers_everywhere(r, c)
    absent = [s for s in (HA, MQTT, DB) if s not in state.services]
    if unreachable or absent:
        raise BackupError("; ".join(
            ([f"not answering: {', '.join(unreachable)}"] if unreachable else [])
            + ([f"no service {', '.join(absent)} in stack {c.name}"] if absent else [])),
            "every node must answer and the stack must run: `doit setup`, then this again")
    _synced_member(r, c, manager, set())
    node = _mounted(r, c, "restore: volume")
    members = v.manifest["members"]

    t = _phase(1, "stop homeassistant and mosquitto")
    stopped[0] = True
    for service in (HA, MQTT):
        scale(r, c, manager, service, 0)
    _wait_gone(r, c, (HA, MQTT), STOP_TIMEOUT)
    _done(1, t)

    t = _phase(2, f"files: {', '.join(v.manifest['volume_dirs'])} through {node.name}")
    size = members[fmt.VOLUME]["size"]
    with tarfile.open(v.path, "r:*") as tar:
        stream(r, node, "restore: volume", fmt.untar_script(c), timeout=600 + size / RESTORE_RATE,
               source=tar.extractfile(fmt.VOLUME), hint="the old files are kept in "
               f"{c.gluster.mount_point}/.haswarm-restore.*/old when a swap was half done")
    _say(node, f"restore: volume: {_mb(size)} restored")
    setup_files(c, r)
    _put_back_secrets(c, v)
    _done(2, t)

    t = _phase(3, f"database: {', '.join(v.manifest['databases'])}")
    m = _synced_member(r, c, manager, set())
    size = members[fmt.DATABASE]["size"]
    with tarfile.open(v.path, "r:*") as tar:
        stream(r, m.node, "restore: database", fmt.load_command(m.container),
               timeout=600 + size / RESTORE_RATE, source=tar.extractfile(fmt.DATABASE),
               hint="the line named in the error is a line of database.sql in the archive")
    _say(m.node, f"restore: database: {_mb(size)} loaded through db {m.container[:12]}")
    check_members(r, c, manager, v.manifest["databases"])
    _done(3, t)

    t = _phase(4, "start homeassistant and mosquitto")
    for service, n in plan.replicas.items():
        scale(r, c, manager, service, n)
    wait_for(r, c, manager, "restore: start",
             lambda st: st.problems(plan.replicas, len(c.nodes)), START_TIMEOUT)
    where, status = probe_http(c, c.homeassistant.port, HA_TIMEOUT)
    _say(where, f"restore: homeassistant answers HTTP {status} on port {c.homeassistant.port}")
    stopped[0] = False
    _done(4, t)


def check_members(r: Remote, c: Cluster, manager: str, databases: list[str]) -> None:
    """Every Synced db member has the restored databases with the same tables."""
    from tasks.galera import members
    from tasks.stack_observe import observe

    synced = [m for m in members(r, c, observe(r, c, manager)) if m.service == DB and m.synced]
    got = r.on_all("restore: check", lambda n: [
        (m.node, sql(r, m.node, m.container, fmt.table_counts_sql(databases), "restore: check",
                     timeout=CHECK_TIMEOUT))
        for m in synced if m.node == n.name], sorted({m.node for m in synced}))
    problems = fmt.counts_disagree(databases, dict(x for rows in got.values() for x in rows))
    if problems:
        raise BackupError("after the load: " + "; ".join(problems),
                          "run `doit status`; a member that lags catches up by itself, then "
                          "run the restore again if it does not")
    _say(manager, f"restore: database: {len(synced)} members have {', '.join(databases)}")


def _put_back_secrets(c: Cluster, v: Verified) -> None:
    """haswarm's token and the owner's password as the archive holds them (this computer)."""
    with tarfile.open(v.path, "r:*") as tar:
        for member in (fmt.TOKEN, fmt.OWNER_PASSWORD):
            if not v.has(member):
                continue
            f = tar.extractfile(member)
            value = f.read().decode().strip() if f else ""
            if not value:
                continue
            if member == fmt.TOKEN:
                where = secrets.token_path(c)
                if secrets.ha_token(c) != value:
                    secrets.write_private(where, value)
                    print(f"restore: wrote {where} (the restored Home Assistant's token)")
            elif secrets.put_back(c, secrets.HA_OWNER_PASSWORD, value):
                print(f"restore: wrote {secrets.path(c, secrets.HA_OWNER_PASSWORD)} (the "
                      "restored owner's password; its fingerprint recorded)")


# ---------------------------------------------------------------------------------------------
# doit


def _yes() -> bool:
    from doit import get_var

    return str(get_var("yes", "")).lower() in {"1", "yes", "true"}


def confirm(c: Cluster, v: Verified, ask: Callable[[str], str] | None) -> None:
    """The user types the stack's name (`ask`: input; None: no terminal), or passes yes=1;
    BackupError otherwise."""
    if _yes():
        return
    what = (f"restore replaces Home Assistant's config, Mosquitto's store and the databases "
            f"{', '.join(v.manifest['databases'])} of stack {c.name!r} with those of {v.path.name} "
            f"(made {v.manifest.get('created', '?')})")
    if ask is None:
        raise BackupError(f"{what}. No terminal to ask on", "add yes=1 to confirm")
    if ask(f"{what}.\nType the stack's name ({c.name}) to go on: ").strip() != c.name:
        raise BackupError("restore not confirmed")


def backup_task(c: Cluster) -> dict[str, Any]:
    """The `doit backup` task dict."""

    def action() -> TaskFailed | None:
        from tasks.remote import Remote, RemoteError

        started = time.monotonic()
        try:
            with Remote(c) as r:
                path = run_backup(c, r, BACKUP_DIR)
        except (RemoteError, HaswarmError, OSError) as e:
            return TaskFailed(redact(f"backup failed:\n{e}", secrets.secret_values(c)))
        print(f"backup: wrote {path} ({_mb(path.stat().st_size)}) and {fmt.sidecar(path).name} "
              f"in {time.monotonic() - started:.1f} s", flush=True)
        return None

    return {"actions": [action], "uptodate": [False], "verbosity": 2}


def restore_task(c: Cluster) -> dict[str, Any]:
    """The `doit restore backup=PATH` task dict."""

    def action() -> TaskFailed | None:
        from doit import get_var

        from tasks.remote import Remote, RemoteError

        started = time.monotonic()
        given = str(get_var("backup", "") or "").strip()
        if not given:
            return TaskFailed("restore: name the archive: doit restore backup=PATH "
                              f"(e.g. {BACKUP_DIR.name}/{c.name}-YYYYmmdd-HHMMSS.tar.gz)")
        stopped = [False]
        try:
            v, plan = prepare_restore(c, Path(given).expanduser().resolve())
            print(f"restore: {v.path} verified (stack {c.name}, made "
                  f"{v.manifest.get('created', '?')})", flush=True)
            for note in [*v.notes, *plan.warnings]:
                print(f"restore: note: {note}", flush=True)
            for i, phase in enumerate(plan.phases, 1):
                print(f"restore: will {i}. {phase}", flush=True)
            confirm(c, v, input if sys.stdin.isatty() else None)
            with Remote(c) as r:
                run_restore(c, r, v, plan, stopped)
        except ArchiveError as e:
            return TaskFailed(f"restore refused, nothing was done:\n{e}")
        except (RemoteError, HaswarmError, OSError) as e:
            after = ("\nHome Assistant and Mosquitto are stopped (scaled to 0): run the restore "
                     "again (it starts over), or `doit stack` to start them on what the volume "
                     "and the database hold now" if stopped[0] else "")
            after = after or "\nNothing was changed."
            return TaskFailed(redact(f"restore failed:\n{e}{after}", secrets.secret_values(c)))
        print(f"restore: done in {time.monotonic() - started:.1f} s; `doit status` shows the "
              "cluster", flush=True)
        return None

    return {"actions": [action], "uptodate": [False], "verbosity": 2}
