"""doit backup / restore: the archive (name, manifest, writing, verification: damaged, another
stack's, incomplete), the commands the nodes run (the volume's tar and its restore script run
here, on a directory standing for the mount), the restore plan, and the order of the steps
against fakes of the nodes."""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import subprocess
import tarfile
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tasks import backup, secrets
from tasks import backup_archive as fmt
from tasks.backup_archive import ArchiveError, BackupError, Digest
from tasks.config import LAB_CLUSTER_FILE, Cluster, load_cluster
from tasks.facts import GaleraMember
from tasks.failures import RemoteError, Result

WHEN = datetime(2026, 12, 5, 14, 3, 22, tzinfo=timezone(timedelta(hours=1)))
DUMP = b"-- MariaDB dump\nCREATE DATABASE homeassistant;\n-- Dump completed on 2026-12-05\n"


@pytest.fixture
def c(tmp_path: Path) -> Cluster:
    lab = load_cluster(LAB_CLUSTER_FILE)
    g = lab.gluster.model_copy(update={"mount_point": tmp_path / "mnt"})
    return lab.model_copy(update={"gluster": g, "secrets_dir": tmp_path / "secrets"})


def volume_tar(entries: list[tuple[str, bytes | None]] | None = None) -> bytes:
    """A volume.tar: (name, content) with None for a directory."""
    entries = entries or [("homeassistant", None), ("homeassistant/.storage", None),
                          ("homeassistant/.storage/auth", b"{}"),
                          ("homeassistant/configuration.yaml", b"default_config:\n"),
                          ("mosquitto/data", None), ("mosquitto/data/mosquitto.db", b"\0db")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                t.addfile(info)
            else:
                info.size = len(content)
                t.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def make_archive(tmp_path: Path, c: Cluster, *, dump: bytes = DUMP, volume: bytes | None = None,
                 extra: dict[str, bytes] | None = None,
                 edit: Callable[[dict[str, Any]], None] | None = None,
                 drop: tuple[str, ...] = (), with_sidecar: bool = True) -> Path:
    parts = {fmt.DATABASE: dump, fmt.VOLUME: volume if volume is not None else volume_tar(),
             fmt.TOKEN: b"old-token\n", **(extra or {})}
    files, digests = {}, {}
    for name, data in parts.items():
        p = tmp_path / "parts" / name.replace("/", "_")
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data)
        files[name] = p
        digests[name] = Digest()
        digests[name].write(data)
    manifest = fmt.build_manifest(
        c, created=WHEN, cluster_text="name: haswarm\n", version="0.1.0", members=digests,
        databases=["haswarm", "homeassistant"], sources={"database": "pi2"},
        secret_fingerprints={"mqtt_homeassistant": "abc"})
    if edit:
        edit(manifest)
    for name in drop:
        files.pop(name)
    out = tmp_path / fmt.archive_name(c.name, WHEN)
    out.unlink(missing_ok=True)
    fmt.write_archive(out, manifest, files, WHEN.timestamp())
    fmt.sidecar(out).unlink(missing_ok=True)
    if with_sidecar:
        sha = hashlib.sha256(out.read_bytes()).hexdigest()
        fmt.sidecar(out).write_text(fmt.sidecar_text(out, sha))
    return out


# ---------------------------------------------------------------------------------------------
# The archive


def test_name_manifest_and_a_private_archive_that_verifies(tmp_path: Path, c: Cluster) -> None:
    assert fmt.archive_name("haswarm", WHEN) == "haswarm-20261205-140322.tar.gz"
    path = make_archive(tmp_path, c)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert fmt.sidecar(path).name == "haswarm-20261205-140322.tar.gz.sha256"
    with tarfile.open(path) as t:
        assert t.getnames() == ["manifest.json", "database.sql", "volume.tar", "secrets/ha_token"]
    v = fmt.verify(path, "haswarm", fmt.volume_dirs(c))
    m = v.manifest
    assert (m["format"], m["stack"], m["haswarm_version"]) == (1, "haswarm", "0.1.0")
    assert m["created"] == "2026-12-05T14:03:22+01:00"
    assert m["cluster_file_sha256"] == hashlib.sha256(b"name: haswarm\n").hexdigest()
    assert m["images"]["homeassistant"] == c.images.homeassistant.image
    assert m["volume_dirs"] == ["homeassistant", "mosquitto/data"]
    assert m["members"]["database.sql"] == {"size": len(DUMP),
                                            "sha256": hashlib.sha256(DUMP).hexdigest()}
    assert v.notes == [] and v.has(fmt.TOKEN) and not v.has(fmt.OWNER_PASSWORD)
    # sha256sum -c reads the checksum file
    r = subprocess.run(["sha256sum", "-c", fmt.sidecar(path).name], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_an_existing_archive_is_never_overwritten(tmp_path: Path, c: Cluster) -> None:
    path = make_archive(tmp_path, c)
    with pytest.raises(FileExistsError):
        fmt.write_archive(path, {}, {}, 0)


def test_another_stacks_archive_is_refused(tmp_path: Path, c: Cluster) -> None:
    path = make_archive(tmp_path, c)
    with pytest.raises(ArchiveError, match="an archive of stack 'haswarm'; this cluster is 'home'"):
        fmt.verify(path, "home", fmt.volume_dirs(c))


def test_a_damaged_archive_is_refused(tmp_path: Path, c: Cluster) -> None:
    path = make_archive(tmp_path, c)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="checksum mismatch: the file's sha256"):
        fmt.verify(path, "haswarm", fmt.volume_dirs(c))
    fmt.sidecar(path).unlink()  # without its .sha256: gzip's CRC or the tar headers tell
    with pytest.raises(ArchiveError, match="damaged"):
        fmt.verify(path, "haswarm", fmt.volume_dirs(c))


def test_a_truncated_archive_is_refused(tmp_path: Path, c: Cluster) -> None:
    path = make_archive(tmp_path, c, with_sidecar=False)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ArchiveError, match="not a readable tar archive"):
        fmt.verify(path, "haswarm", fmt.volume_dirs(c))


def test_what_is_not_a_tar_is_refused(tmp_path: Path, c: Cluster) -> None:
    path = tmp_path / "notes.tar.gz"
    path.write_text("hello\n")
    with pytest.raises(ArchiveError, match="notes.tar.gz: not a tar archive"):
        fmt.verify(path, "haswarm", fmt.volume_dirs(c))
    with pytest.raises(ArchiveError, match="no such file"):
        fmt.verify(tmp_path / "nothing.tar.gz", "haswarm", fmt.volume_dirs(c))


def test_a_member_that_does_not_match_the_manifest_is_refused(tmp_path: Path,
                                                              c: Cluster) -> None:
    def wrong(m: dict[str, Any]) -> None:
        m["members"][fmt.VOLUME]["sha256"] = "0" * 64

    path = make_archive(tmp_path, c, edit=wrong)  # a .sha256 made after: only members tell
    with pytest.raises(ArchiveError, match="member volume.tar: checksum mismatch"):
        fmt.verify(path, "haswarm", fmt.volume_dirs(c))


def test_a_missing_member_is_refused(tmp_path: Path, c: Cluster) -> None:
    path = make_archive(tmp_path, c, drop=(fmt.TOKEN,))
    with pytest.raises(ArchiveError, match="missing member secrets/ha_token"):
        fmt.verify(path, "haswarm", fmt.volume_dirs(c))

    def unlist(m: dict[str, Any]) -> None:
        del m["members"][fmt.DATABASE]

    path = make_archive(tmp_path, c, edit=unlist, drop=(fmt.DATABASE,))
    with pytest.raises(ArchiveError, match="missing member database.sql"):
        fmt.verify(path, "haswarm", fmt.volume_dirs(c))


def test_a_member_the_manifest_does_not_list_is_refused(tmp_path: Path, c: Cluster) -> None:
    def unlist(m: dict[str, Any]) -> None:
        del m["members"][fmt.TOKEN]

    path = make_archive(tmp_path, c, edit=unlist)
    with pytest.raises(ArchiveError, match="member secrets/ha_token not in the manifest"):
        fmt.verify(path, "haswarm", fmt.volume_dirs(c))


def test_a_manifest_of_another_format_or_shape_is_refused(tmp_path: Path, c: Cluster) -> None:
    path = make_archive(tmp_path, c, edit=lambda m: m.update(format=2))
    with pytest.raises(ArchiveError, match="archive format 2"):
        fmt.verify(path, "haswarm", fmt.volume_dirs(c))
    path = make_archive(tmp_path, c, edit=lambda m: m.pop("members"))
    with pytest.raises(ArchiveError, match="lacks stack, members"):
        fmt.verify(path, "haswarm", fmt.volume_dirs(c))


def test_a_dump_cut_short_is_refused(tmp_path: Path, c: Cluster) -> None:
    path = make_archive(tmp_path, c, dump=b"CREATE DATABASE homeassistant;\nINSERT INTO")
    with pytest.raises(ArchiveError, match="the dump was cut short"):
        fmt.verify(path, "haswarm", fmt.volume_dirs(c))


@pytest.mark.parametrize("entries, problem", [
    ([("homeassistant", None), ("mosquitto/data", None), ("etc/passwd", b"x")],
     "'etc/passwd' lies outside"),
    ([("homeassistant", None), ("mosquitto/data", None), ("homeassistant/../../x", b"x")],
     "lies outside"),
    ([("homeassistant", None), ("mosquitto/data/db", b"x")], "the directory mosquitto/data/"),
])
def test_a_volume_tar_reaching_outside_its_directories_is_refused(
        tmp_path: Path, c: Cluster, entries: list, problem: str) -> None:
    path = make_archive(tmp_path, c, volume=volume_tar(entries))
    with pytest.raises(ArchiveError, match=problem):
        fmt.verify(path, "haswarm", fmt.volume_dirs(c))


def test_volume_problems() -> None:
    dirs = ["homeassistant", "mosquitto/data"]
    ok = [("homeassistant", tarfile.DIRTYPE, ""), ("homeassistant/a", tarfile.REGTYPE, ""),
          ("homeassistant/l", tarfile.SYMTYPE, "/etc"), ("mosquitto/data", tarfile.DIRTYPE, ""),
          ("mosquitto/data/h", tarfile.LNKTYPE, "homeassistant/a")]
    assert fmt.volume_problems(ok, dirs) == []
    bad = [*ok, ("homeassistant/l/passwd", tarfile.REGTYPE, ""),
           ("/etc/x", tarfile.REGTYPE, ""), ("mosquitto/data/d", tarfile.CHRTYPE, ""),
           ("homeassistant/h", tarfile.LNKTYPE, "etc/shadow")]
    assert fmt.volume_problems(bad, dirs) == [
        "'homeassistant/l/passwd' lies below a symbolic link of the archive",
        "'/etc/x' lies outside homeassistant, mosquitto/data",
        "'mosquitto/data/d' is not a file, directory or link",
        "hard link 'homeassistant/h' points outside: 'etc/shadow'"]


# ---------------------------------------------------------------------------------------------
# What runs on the nodes


def test_the_dump_leaves_out_mariadbs_own_schemas() -> None:
    out = "haswarm\nhomeassistant\ninformation_schema\nmysql\nperformance_schema\nsys\n"
    assert fmt.databases_to_dump(out) == ["haswarm", "homeassistant"]
    cmd = fmt.dump_command("3f2a", ["haswarm", "homeassistant"])
    assert cmd.startswith("docker exec 3f2a mariadb-dump --single-transaction --routines "
                          "--events --triggers --skip-add-locks --add-drop-database")
    assert cmd.endswith("--databases haswarm homeassistant") and "--all-databases" not in cmd
    assert fmt.load_command("3f2a") == ("docker exec -i 3f2a mariadb --batch "
                                        "--default-character-set=utf8mb4")
    assert fmt.dump_complete(DUMP[-40:]) and not fmt.dump_complete(b"INSERT INTO t VALUES")


def test_the_dump_is_taken_from_a_synced_db_member() -> None:
    def m(node: str, state: str = "Synced", service: str = "db") -> GaleraMember:
        return GaleraMember(container=f"c-{node}", service=service, cluster_status="Primary",
                            local_state=state, cluster_size=3, node=node)

    members = [m("pi1", "Donor/Desynced"), m("pi2"), m("pi3"), m("pi1", service="db-seed")]
    assert fmt.pick_member(members).node == "pi2"
    assert fmt.pick_member(members, avoid={"pi2"}).node == "pi3"
    assert fmt.pick_member(members, avoid={"pi2", "pi3"}).node == "pi2"  # better than none
    assert fmt.pick_member([m("pi1", "Joining")]) is None


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): ("dir" if p.is_dir() else p.read_text())
            for p in sorted(root.rglob("*"))}


def _sh(script: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/sh", "-c", script], input=stdin, capture_output=True,
                          timeout=60)


def test_the_volume_tar_and_its_restore_replace_both_directories(c: Cluster) -> None:
    m = Path(c.gluster.mount_point)
    ha, mq = m / "homeassistant", m / "mosquitto" / "data"
    for d in (ha / ".storage", ha / ".haswarm", ha / "packages" / "haswarm", mq / ".haswarm"):
        d.mkdir(parents=True)
    (ha / "configuration.yaml").write_text("backed up\n")
    (ha / ".storage" / "auth").write_text("old auth\n")
    (ha / ".ha_run.lock").write_text("lock\n")
    (ha / ".haswarm" / "homeassistant.lock").write_text("pi1\n")
    (ha / "packages" / "haswarm" / "haswarm.yaml").write_text("recorder:\n")
    (ha / "packages" / "haswarm" / "secrets.yaml").write_text("db password\n")
    (mq / "mosquitto.db").write_text("retained\n")
    (mq / ".haswarm" / "mosquitto.lock.beat").write_text("pi2 @1\n")
    if os.geteuid() == 0:
        os.chown(mq / "mosquitto.db", 1883, 1883)
    made = _sh(fmt.tar_command(c))
    assert made.returncode == 0, made.stderr
    with tarfile.open(fileobj=io.BytesIO(made.stdout)) as t:
        names = set(t.getnames())
        owners = {i.name: i.uid for i in t.getmembers()}
    assert names == {"homeassistant", "homeassistant/configuration.yaml",
                     "homeassistant/.storage", "homeassistant/.storage/auth",
                     "homeassistant/packages", "homeassistant/packages/haswarm",
                     "homeassistant/packages/haswarm/haswarm.yaml",
                     "mosquitto/data", "mosquitto/data/mosquitto.db"}
    if os.geteuid() == 0:
        assert owners["mosquitto/data/mosquitto.db"] == 1883
    # later: everything changed, a new file, the lock keepers' files of the running cluster
    (ha / "configuration.yaml").write_text("changed\n")
    (ha / "new.yaml").write_text("new\n")
    (mq / "mosquitto.db").write_text("newer\n")
    restored = _sh(fmt.untar_script(c), made.stdout)
    assert restored.returncode == 0, restored.stderr
    assert _tree(m) == {
        "homeassistant": "dir", "homeassistant/.storage": "dir",
        "homeassistant/.storage/auth": "old auth\n",
        "homeassistant/configuration.yaml": "backed up\n",
        "homeassistant/packages": "dir", "homeassistant/packages/haswarm": "dir",
        "homeassistant/packages/haswarm/haswarm.yaml": "recorder:\n",
        "mosquitto": "dir", "mosquitto/data": "dir", "mosquitto/data/mosquitto.db": "retained\n"}
    if os.geteuid() == 0:
        assert (mq / "mosquitto.db").stat().st_uid == 1883


def test_a_restore_of_a_broken_tar_changes_nothing(c: Cluster) -> None:
    m = Path(c.gluster.mount_point)
    (m / "homeassistant").mkdir(parents=True)
    (m / "mosquitto" / "data").mkdir(parents=True)
    (m / "homeassistant" / "configuration.yaml").write_text("mine\n")
    before = _tree(m)
    whole = volume_tar([("homeassistant", None), ("homeassistant/big", b"x" * 100_000),
                        ("mosquitto/data", None)])
    for stdin in (whole[:50_000], volume_tar([("homeassistant", None)]), b"not a tar"):
        res = _sh(fmt.untar_script(c), stdin)
        assert res.returncode != 0
        assert _tree(m) == before  # no work dir left behind either


# ---------------------------------------------------------------------------------------------
# The restore plan


def test_the_restore_plan_says_what_it_does_and_warns(tmp_path: Path, c: Cluster) -> None:
    v = fmt.verify(make_archive(tmp_path, c), "haswarm", fmt.volume_dirs(c))
    plan = fmt.plan_restore(v, c, cluster_text="name: haswarm\n",
                            replicas={"homeassistant": 3, "mosquitto": 3, "db": 3},
                            fingerprints={"mqtt_homeassistant": "abc"}, token_file="T",
                            owner_file="O")
    assert plan.replicas == {"homeassistant": 3, "mosquitto": 3}
    assert plan.warnings == []
    assert [p.split(" ")[0] for p in plan.phases] == ["stop", "replace", "write", "load",
                                                      "scale"]
    assert "write T (this computer)" in plan.phases[2]
    other = c.model_copy(update={"images": c.images.model_copy(update={
        "homeassistant": c.images.homeassistant.model_copy(update={"image": "ha:2027.1.0"})})})
    plan = fmt.plan_restore(v, other, cluster_text="name: other\n",
                            replicas={"homeassistant": 1, "mosquitto": 1},
                            fingerprints={"mqtt_homeassistant": "new"}, token_file="T",
                            owner_file="O")
    assert len(plan.warnings) == 3
    assert "another version of the cluster file" in plan.warnings[0]
    assert "this cluster runs ha:2027.1.0" in plan.warnings[1]
    assert "mqtt_homeassistant is not the one of the archive's time" in plan.warnings[2]


def test_an_archive_without_a_token_warns_that_haswarms_is_refused_after(
        tmp_path: Path, c: Cluster) -> None:
    path = make_archive(tmp_path, c, edit=lambda m: m["members"].pop(fmt.TOKEN),
                        drop=(fmt.TOKEN,))
    v = fmt.verify(path, "haswarm", fmt.volume_dirs(c))
    plan = fmt.plan_restore(v, c, cluster_text="name: haswarm\n",
                            replicas={"homeassistant": 1, "mosquitto": 1}, fingerprints={},
                            token_file="secrets/haswarm/ha_token", owner_file="O")
    assert not any(p.startswith("write") for p in plan.phases)
    assert plan.warnings == [
        "the archive holds no haswarm token: secrets/haswarm/ha_token belongs to the Home "
        "Assistant being replaced and will be refused after the restore (`doit status` shows "
        "it); put a long-lived token of the restored one there"]


def test_every_member_must_have_the_same_tables_after_the_load() -> None:
    dbs = ["haswarm", "homeassistant"]
    same = "haswarm\t1\nhomeassistant\t14\n"
    assert fmt.counts_disagree(dbs, {"pi1": same, "pi2": same}) == []
    assert fmt.counts_disagree(dbs, {"pi1": same, "pi2": "homeassistant\t14\n"}) == [
        "pi2: database haswarm is missing",
        "the db members disagree on the tables: pi1 {'haswarm': '1', 'homeassistant': '14'}; "
        "pi2 {'homeassistant': '14'}"]
    assert "wsrep_sync_wait = 1" in fmt.table_counts_sql(dbs)


# ---------------------------------------------------------------------------------------------
# The steps, against fakes of the nodes


class FakeRemote:
    """Records run() calls; `answers` maps a piece of the command (or stdin) to a Result."""

    def __init__(self, c: Cluster, answers: dict[str, Result] | None = None):
        self.cluster = c
        self.answers = answers or {}
        self.log: list[str] = []

    def run(self, node, step, cmd, *, stdin=None, check=True, timeout=60, **kw):  # noqa: ANN001, ANN201
        self.log.append(f"{node}: {stdin.strip() if stdin else cmd}")
        for key, res in self.answers.items():
            if key in cmd or (stdin and key in stdin):
                if isinstance(res, Exception):
                    raise res
                return res
        return Result("", "", 0)

    def redact(self, *values: str) -> None:
        pass


MEMBER = GaleraMember(container="c2", service="db", cluster_status="Primary",
                      local_state="Synced", cluster_size=3, node="pi2")


@pytest.mark.parametrize("fails", [False, True])
def test_the_member_is_desynced_around_the_dump_also_when_it_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: bool) -> None:
    from tasks import remote_stream

    r = FakeRemote(load_cluster(LAB_CLUSTER_FILE),
                   {"SHOW DATABASES": Result("homeassistant\nmysql\n", "", 0)})

    def fake_stream(rr, node, step, cmd, *, sink, timeout, **kw):  # noqa: ANN001, ANN202
        r.log.append(f"{node}: {cmd}")
        sink.write(b"-- dump\n")
        if fails:
            raise RemoteError([])
        sink.write(b"-- Dump completed on 2026-12-05\n")
        return Result("", "", 0)

    monkeypatch.setattr(remote_stream, "stream", fake_stream)
    if fails:
        with pytest.raises(RemoteError):
            backup.dump(r, MEMBER, tmp_path / "db.sql")
    else:
        d, dbs = backup.dump(r, MEMBER, tmp_path / "db.sql")
        assert dbs == ["homeassistant"] and d.size == (tmp_path / "db.sql").stat().st_size
        assert stat.S_IMODE((tmp_path / "db.sql").stat().st_mode) == 0o600
    assert r.log == ["pi2: SHOW DATABASES;", "pi2: SET GLOBAL wsrep_desync = ON;",
                     "pi2: " + fmt.dump_command("c2", ["homeassistant"]),
                     "pi2: SET GLOBAL wsrep_desync = OFF;"]


def test_secrets_put_back_are_taken_for_the_ones_made(c: Cluster) -> None:
    secrets.ensure(c)
    assert secrets.put_back(c, secrets.HA_OWNER_PASSWORD, "the-old-password") is True
    assert secrets.read(c, secrets.HA_OWNER_PASSWORD) == "the-old-password"
    assert stat.S_IMODE(secrets.path(c, secrets.HA_OWNER_PASSWORD).stat().st_mode) == 0o600
    assert secrets.ensure(c) == []  # no SecretLost: the record follows
    assert secrets.put_back(c, secrets.HA_OWNER_PASSWORD, "the-old-password") is False


def test_restore_refuses_a_bad_archive_before_any_node(tmp_path: Path, c: Cluster,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import doit

    from tasks import remote

    class NoRemote:
        def __init__(self, *a: Any) -> None:
            raise AssertionError("a node was contacted")

    monkeypatch.setattr(remote, "Remote", NoRemote)
    path = make_archive(tmp_path, c)
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(path.read_bytes()[:100])
    for given, message in ((str(bad), "not a (readable )?tar archive"),
                           (str(path), "an archive of stack 'haswarm'; this cluster is 'home'")):
        monkeypatch.setattr(doit, "get_var", lambda n, d=None, g=given: {"backup": g}.get(n, d))
        action = backup.restore_task(c.model_copy(update={"name": "home"}))["actions"][0]
        failed = action()
        assert failed is not None and "restore refused, nothing was done" in str(failed)
        assert re.search(message, str(failed))
    monkeypatch.setattr(doit, "get_var", lambda n, d=None: d)
    assert "name the archive" in str(backup.restore_task(c)["actions"][0]())


def test_restore_asks_for_the_stacks_name(tmp_path: Path, c: Cluster,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import doit

    v = fmt.verify(make_archive(tmp_path, c), "haswarm", fmt.volume_dirs(c))
    monkeypatch.setattr(doit, "get_var", lambda n, d=None: d)
    with pytest.raises(BackupError, match="No terminal to ask on"):
        backup.confirm(c, v, None)
    with pytest.raises(BackupError, match="not confirmed"):
        backup.confirm(c, v, lambda q: "yes")
    backup.confirm(c, v, lambda q: "haswarm")
    monkeypatch.setattr(doit, "get_var", lambda n, d=None: {"yes": "1"}.get(n, d))
    backup.confirm(c, v, None)


def test_restore_runs_its_phases_in_order(tmp_path: Path, c: Cluster,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks import galera, gluster, homeassistant, remote_stream, stack, stack_observe
    from tasks.stack_facts import StackState

    log: list[str] = []
    services = {s: object() for s in ("homeassistant", "mosquitto", "db")}
    gone = iter([False, True])
    monkeypatch.setattr(stack_observe, "find_manager", lambda r, c: "pi1")
    monkeypatch.setattr(stack_observe, "observe",
                        lambda r, c, m: StackState(services=services))  # type: ignore[arg-type]
    monkeypatch.setattr(stack_observe, "containers_everywhere",
                        lambda r, c: ([] if next(gone, True) else [], []))
    monkeypatch.setattr(galera, "members", lambda r, c, st: [MEMBER])
    monkeypatch.setattr(gluster, "mounted_node", lambda c, r, step: c.nodes[2])
    monkeypatch.setattr(stack, "scale", lambda r, c, m, s, n: log.append(f"scale {s} {n}"))
    monkeypatch.setattr(homeassistant, "setup_files", lambda c, r: log.append("ha-files"))
    monkeypatch.setattr(stack_observe, "wait_for",
                        lambda r, c, m, what, check, t: log.append(f"wait {what}"))
    monkeypatch.setattr(stack_observe, "probe_http",
                        lambda c, port, t: (log.append("probe") or ("pi1", 200)))

    def fake_stream(r, node, step, cmd, *, source, timeout, **kw):  # noqa: ANN001, ANN202
        log.append(f"{step} on {getattr(node, 'name', node)}: {len(source.read())} bytes")
        return Result("", "", 0)

    monkeypatch.setattr(remote_stream, "stream", fake_stream)
    counts = Result("haswarm\t1\nhomeassistant\t14\n", "", 0)

    class R(FakeRemote):
        def on_all(self, step, fn, nodes):  # noqa: ANN001, ANN201
            return {n: fn(self.cluster.node(n)) for n in nodes}

    r = R(c, {"information_schema": counts})
    path = make_archive(tmp_path, c)
    v = fmt.verify(path, "haswarm", fmt.volume_dirs(c))
    plan = fmt.RestorePlan([], [], {"homeassistant": 3, "mosquitto": 3})
    stopped = [False]
    backup.run_restore(c, r, v, plan, stopped)
    volume = len(volume_tar())
    assert log == ["scale homeassistant 0", "scale mosquitto 0",
                   f"restore: volume on pi3: {volume} bytes", "ha-files",
                   f"restore: database on pi2: {len(DUMP)} bytes",
                   "scale homeassistant 3", "scale mosquitto 3", "wait restore: start", "probe"]
    assert secrets.ha_token(c) == "old-token"
    assert stopped == [False]
    assert r.log[-1].startswith("pi2: SET SESSION wsrep_sync_wait = 1;")


def test_a_backup_writes_an_archive_that_verifies(tmp_path: Path, c: Cluster,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from tasks import galera, gluster, remote_stream, stack_observe

    monkeypatch.setattr(stack_observe, "find_manager", lambda r, c: "pi1")
    monkeypatch.setattr(stack_observe, "containers_everywhere", lambda r, c: ([], []))
    monkeypatch.setattr(stack_observe, "observe", lambda r, c, m: None)
    monkeypatch.setattr(galera, "members", lambda r, c, st: [MEMBER])
    monkeypatch.setattr(gluster, "mounted_node", lambda c, r, step: c.nodes[0])
    steps = []

    def fake_stream(r, node, step, cmd, *, sink, timeout, ok=(0,), **kw):  # noqa: ANN001, ANN202
        steps.append((getattr(node, "name", node), step, cmd))
        sink.write(DUMP if "mariadb-dump" in cmd else volume_tar())
        return Result("", "", 0)

    monkeypatch.setattr(remote_stream, "stream", fake_stream)
    secrets.write_private(secrets.token_path(c), "the-token")
    r = FakeRemote(c, {"SHOW DATABASES": Result("homeassistant\nmysql\nsys\n", "", 0)})
    out = tmp_path / "backups"
    path = backup.run_backup(c, r, out)
    assert [s[:2] for s in steps] == [("pi2", "backup: database"), ("pi1", "backup: volume")]
    assert steps[1][2] == fmt.tar_command(c)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert sorted(p.name for p in out.iterdir()) == [path.name, path.name + ".sha256"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(fmt.sidecar(path).stat().st_mode) == 0o600
    v = fmt.verify(path, "haswarm", fmt.volume_dirs(c))
    assert v.notes == [] and v.manifest["databases"] == ["homeassistant"]
    assert set(v.manifest["members"]) == {fmt.DATABASE, fmt.VOLUME, fmt.TOKEN}
    with tarfile.open(path) as t:
        assert t.extractfile(fmt.TOKEN).read() == b"the-token\n"
    assert "it holds secrets (ha_token)" in capsys.readouterr().out
    assert r.log[-1] == "pi2: SET GLOBAL wsrep_desync = OFF;"
