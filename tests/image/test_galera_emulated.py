"""The Galera image cross-built for the Pis' architectures and run as a cluster under QEMU.

For each emulated platform (linux/arm64, linux/arm/v7: `HASWARM_EMULATED_PLATFORMS`, comma
separated, narrows the list) the image is built through `doit images:mariadb` with a throwaway
cluster file whose only built image is images/mariadb-galera (the project's one build path: base
bootstrapped with mmdebstrap for the platform, FROM rewritten, buildx or the legacy builder,
platform check, docker save), then three emulated containers form a Galera cluster on a
user-defined bridge network of the controller's engine, the way the stack runs the db services:

  seed bootstrapped -> two nodes join (size 3, Synced) -> seed removed, a third node joins by SST
  -> a row written on one member is read on the others
  -> one member killed (docker kill) and started again: rejoins (IST) with the row
  -> all three killed, all started: the cluster comes back by itself (the image's recovery:
     pc.recovery, else the position exchange and one bootstrap from the most advanced node,
     README "Behaviour"), every row kept, same cluster UUID.

Each step's seconds are printed (`pytest -s`). The image is built once: its tag carries a hash
of the build context (`haswarm/mariadb-galera:ctx-<hash>-arm64`), and a local image with that
tag and the right platform is reused. Everything else created here is named `hsw-qemu-*` and
removed at the end, also on failure.

Time (2-core x86, QEMU, a lab test beside it): ~4 min per platform with the image cached
(both: 7 min 48 s); a first build adds ~3.5 min (arm64) / ~2.5 min (arm/v7), the Debian base
included. Figures per step: images/mariadb-galera/README.md "Under QEMU".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from doit.cmd_base import ModuleTaskLoader
from doit.doit_cmd import DoitMain

import tasks.images as images
from tasks.config import LAB_CLUSTER_FILE, PROJECT_ROOT

from .conftest import entrypoint_lines

pymysql = pytest.importorskip("pymysql")

CONTEXT = PROJECT_ROOT / "images" / "mariadb-galera"
REPO = "haswarm/mariadb-galera"
PLATFORMS_ENV = "HASWARM_EMULATED_PLATFORMS"
ALL_PLATFORMS = ("linux/arm64", "linux/arm/v7")
SECRETS = {"root": "r00t-Pw'x", "user": "ha-Pw'q", "sst": "sst-Pw'y"}
# The stack's stack/galera.cnf.j2 rendered with the lab's `galera:` values (rsync SST).
GALERA_CNF = """[mysqld]
innodb_buffer_pool_size = 32M
wsrep_provider_options = "gcache.size=32M;pc.recovery=TRUE;gmcast.peer_timeout=PT3S;\
evs.suspect_timeout=PT4S;evs.inactive_timeout=PT15S"
wsrep_sst_method = {sst}
max_connections = 64
"""
# Seconds for one emulated step (a join under QEMU is ~5-10x slower than natively).
STEP_TIMEOUT = 300.0
# Memory of one emulated member (a Pi has 1 GB; qemu-user adds its own translation buffers).
MEMORY_CAP = "1g"


def wanted_platforms() -> list[str]:
    """The platforms to test: HASWARM_EMULATED_PLATFORMS (comma separated) or both."""
    text = os.environ.get(PLATFORMS_ENV, "").strip()
    return [p.strip() for p in text.split(",") if p.strip()] if text else list(ALL_PLATFORMS)


def _why_skip(platform: images.Platform) -> str | None:
    if shutil.which("docker") is None or not images.docker_available():
        return "no Docker engine answers the docker CLI"
    if images.daemon_platform().arch == platform.arch:
        return f"the engine runs {platform} natively: nothing to emulate"
    entry = images.BINFMT_DIR / platform.binfmt
    registered = entry.exists() and entry.read_text().startswith("enabled")
    if not registered and not (shutil.which(f"{platform.binfmt}-static") and os.geteuid() == 0):
        return (f"no QEMU for {platform}: install qemu-user-static and binfmt-support "
                "(and run as root to register it)")
    base = images.base_tag("bookworm", platform)
    if images.local_image(base) is None and shutil.which("mmdebstrap") is None:
        return f"no {base} and no mmdebstrap to make it"
    return None


pytestmark = pytest.mark.lab


# --------------------------------------------------------------------------------------------
# The image: built once per context hash and platform


def image_tag(platform: images.Platform, ctx: Path = CONTEXT) -> str:
    """haswarm/mariadb-galera:ctx-<hash>-arm64 (or -armv7): the cached emulated image."""
    return f"{REPO}:ctx-{images.context_hash(ctx)}-{platform.arch}{platform.variant}"


def _cluster_file(work: Path, platform: images.Platform, tag: str) -> Path:
    """A throwaway cluster file: the lab's, for `platform`, building only the db image."""
    data = yaml.safe_load(LAB_CLUSTER_FILE.read_text())
    data["platform"] = str(platform)
    data["build_dir"] = str(work / "build")  # absolute: stays out of the project
    data["images"] = {"mariadb": {"image": tag, "build": str(CONTEXT)},
                      # never built or pulled: only images:mariadb runs
                      "homeassistant": {"image": "hsw-qemu/unused:ha"},
                      "mosquitto": {"image": "hsw-qemu/unused:mqtt"}}
    for key in ("key", "known_hosts"):  # relative to the cluster file: keep the lab's
        data["ssh"][key] = str((LAB_CLUSTER_FILE.parent / data["ssh"][key]).resolve())
    path = work / "cluster.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def build_emulated(platform: images.Platform, work: Path) -> tuple[str, float | None]:
    """(tag, seconds of `doit images:mariadb`) for `platform`; seconds is None when the tag was
    there already (same context hash, right platform) and nothing was built."""
    tag = image_tag(platform)
    info = images.local_image(tag)
    if info is not None and images.image_matches(platform, info):
        return tag, None
    work.mkdir(parents=True, exist_ok=True)
    cfg = _cluster_file(work, platform, tag)
    t0 = time.monotonic()
    rc = DoitMain(ModuleTaskLoader(images)).run(
        ["--db-file", str(work / ".doit.db"), "images:mariadb", f"config={cfg}"])
    assert rc == 0, f"doit images:mariadb for {platform} failed (output above)"
    images.verify_local(tag, platform)
    (work / "build" / "images" / "mariadb.tar").unlink(missing_ok=True)  # 300 MB, not needed
    return tag, time.monotonic() - t0


# --------------------------------------------------------------------------------------------
# Containers


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the docker CLI; AssertionError with its stderr when it fails and `check`."""
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} -> {proc.returncode}: {proc.stderr}")
    return proc


def wait_for(what: str, predicate: Callable[[], Any], timeout: float,
             interval: float = 1.0) -> Any:
    """Poll `predicate` until it returns something truthy; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (AssertionError, subprocess.SubprocessError, pymysql.MySQLError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


class EmulatedCluster:
    """Three-plus Galera containers of one emulated image on their own network, the way the
    stack runs them: command seed/node, network aliases tasks.db-seed / tasks.db (swarm's DNS
    names, the image's default GALERA_PEERS), secrets as files of uid 999 mode 0400, the
    stack's galera.cnf as 60-haswarm.cnf. Each member has a named volume for /var/lib/mysql."""

    def __init__(self, image: str, platform: images.Platform, work: Path) -> None:
        self.image = image
        self.platform = platform
        self.prefix = f"hsw-qemu-{platform.arch}{platform.variant}-{uuid.uuid4().hex[:6]}"
        self.net = f"{self.prefix}-net"
        self.containers: set[str] = set()
        self.figures: dict[str, float] = {}
        self.secrets = work / "secrets"
        self.secrets.mkdir(mode=0o755)
        for key, value in SECRETS.items():
            path = self.secrets / key
            path.write_text(value + "\n")
            path.chmod(0o400)
            os.chown(path, 999, 999)  # as the stack's secrets: uid/gid 999, 0400
        self.cnf = work / "60-haswarm.cnf"
        self.cnf.write_text(GALERA_CNF.format(sst="mariabackup"))  # the stack's default
        self.cnf.chmod(0o444)
        docker("network", "create", self.net)

    def name(self, member: str) -> str:
        """The container name of `member` (seed, db1...)."""
        return f"{self.prefix}-{member}"

    def run(self, member: str, command: str) -> None:
        """Start `member` (a container and its volume) with command seed or node."""
        name = self.name(member)
        alias = "tasks.db-seed" if command == "seed" else "tasks.db"
        env = {"GALERA_CLUSTER_NAME": "hsw-qemu", "GALERA_PEERS": "tasks.db-seed,tasks.db",
               "GALERA_EXPECTED_NODES": "3", "MARIADB_DATABASE": "homeassistant",
               "MARIADB_USER": "homeassistant",
               "MARIADB_ROOT_PASSWORD_FILE": "/run/secrets/root",
               "MARIADB_PASSWORD_FILE": "/run/secrets/user",
               "GALERA_SST_PASSWORD_FILE": "/run/secrets/sst"}
        args = ["run", "-d", "--name", name, "--hostname", member,
                "--platform", str(self.platform), "--network", self.net,
                # a cap, so that a runaway emulated mariadbd cannot take the shared host down
                "--memory", MEMORY_CAP, "--memory-swap", MEMORY_CAP,
                "--network-alias", alias, "-v", f"{name}-data:/var/lib/mysql",
                "-v", f"{self.secrets}:/run/secrets:ro",
                "-v", f"{self.cnf}:/etc/mysql/mariadb.conf.d/60-haswarm.cnf:ro"]
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        self.containers.add(name)
        docker(*args, self.image, command)

    def remove(self, member: str) -> None:
        """Stop `member` gracefully, remove it and its volume."""
        name = self.name(member)
        docker("stop", "-t", "60", name, check=False, timeout=120)
        docker("rm", "-f", "-v", name, check=False)
        docker("volume", "rm", "-f", f"{name}-data", check=False)
        self.containers.discard(name)

    def cleanup(self) -> None:
        """Remove every container, volume and the network this cluster made."""
        for name in sorted(self.containers):
            docker("rm", "-f", "-v", name, check=False)
            docker("volume", "rm", "-f", f"{name}-data", check=False)
        docker("network", "rm", self.net, check=False)

    def status(self, member: str) -> dict[str, str]:
        """The image's `galera-status` of `member` (key=value lines)."""
        out = docker("exec", self.name(member), "galera-status", timeout=60).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def synced(self, members: list[str], size: int) -> bool:
        """Are all `members` Synced in one Primary component of `size`?"""
        want = ("Primary", "Synced", str(size))
        return all((st.get("cluster_status"), st.get("local_state"), st.get("cluster_size"))
                   == want for st in (self.status(m) for m in members))

    def wait_synced(self, members: list[str], size: int, timeout: float = STEP_TIMEOUT) -> None:
        """Wait until `members` are Synced in a Primary component of `size`."""
        try:
            wait_for(f"{members} Synced, cluster size {size}",
                     lambda: self.synced(members, size), timeout, interval=2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.entrypoint_logs(members)}") from None

    def logs(self, member: str) -> str:
        """`docker logs` of `member` (stdout and stderr)."""
        proc = docker("logs", self.name(member), check=False)
        return proc.stdout + proc.stderr

    def entrypoint_logs(self, members: list[str], lines: int = 20) -> str:
        """The last entrypoint lines of each member, for failure reports."""
        return "\n".join(entrypoint_lines(self.logs(m), m, lines) for m in members)

    def query(self, member: str, sql: str) -> tuple[tuple[Any, ...], ...]:
        """Run `sql` as the application user on `member` (over TCP, as Home Assistant does)."""
        fmt = f'{{{{(index .NetworkSettings.Networks "{self.net}").IPAddress}}}}'
        host = docker("inspect", "-f", fmt, self.name(member)).stdout.strip()
        conn = pymysql.connect(host=host, user="homeassistant", password=SECRETS["user"],
                               database="homeassistant", connect_timeout=10,
                               read_timeout=60, write_timeout=60, autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        finally:
            conn.close()

    def rows(self, member: str) -> list[str]:
        """The values of table t on `member`, in insertion order."""
        return [r[0] for r in self.query(member, "SELECT v FROM t ORDER BY id")]

    def timed(self, figure: str, since: float) -> None:
        """Record the seconds since `since` as `figure` and print them."""
        self.figures[figure] = time.monotonic() - since
        print(f"{self.platform}: {figure}: {self.figures[figure]:.1f} s", flush=True)


# --------------------------------------------------------------------------------------------
# Fixtures: one image and one cluster per platform, shared by the tests in file order


@pytest.fixture(scope="module", params=wanted_platforms())
def platform(request) -> images.Platform:
    p = images.Platform.parse(request.param)
    why = _why_skip(p)
    if why is not None:
        pytest.skip(why)
    return p


@pytest.fixture(scope="module")
def emulated_image(platform, tmp_path_factory) -> Iterator[str]:
    work = tmp_path_factory.mktemp(f"build-{platform.arch}{platform.variant}")
    tag, seconds = build_emulated(platform, work)
    print(f"\n{platform}: image {tag} "
          + (f"built in {seconds:.0f} s" if seconds is not None else "cached (not rebuilt)"))
    yield tag


@pytest.fixture(scope="module")
def cluster(emulated_image, platform, tmp_path_factory) -> Iterator[EmulatedCluster]:
    work = tmp_path_factory.mktemp(f"cluster-{platform.arch}{platform.variant}")
    c = EmulatedCluster(emulated_image, platform, work)
    try:
        yield c
    finally:
        c.cleanup()
        print(f"\n{platform} under QEMU, seconds per step:",
              *(f"  {k}: {v:.1f}" for k, v in c.figures.items()), sep="\n")


# --------------------------------------------------------------------------------------------
# Tests (in file order on one cluster per platform)


def test_mariadbd_is_the_platforms_build(emulated_image, platform):
    """`mariadbd --version` under QEMU is the target's build, not x86_64. Debian's armhf build
    says "for debian-linux-gnueabihf on armv8l" (built on 64-bit ARM machines): the ABI names it."""
    machine = {"arm64": "aarch64", "arm": "armv7l"}[platform.arch]
    build = {"arm64": "linux-gnu on aarch64", "arm": "linux-gnueabihf on "}[platform.arch]
    out = docker("run", "--rm", "--platform", str(platform), "--entrypoint", "sh",
                 emulated_image, "-c", "uname -m; mariadbd --version").stdout
    print(out)
    uname, version = out.strip().splitlines()[:2]
    assert uname == machine
    assert "MariaDB" in version
    assert build in version


def test_seed_then_nodes_then_seed_replaced(cluster):
    """seed -> two nodes join (size 3) -> seed removed -> a third node joins by SST."""
    t0 = time.monotonic()
    cluster.run("seed", "seed")
    cluster.wait_synced(["seed"], 1)
    cluster.timed("seed ready (new cluster, database, users)", t0)

    t1 = time.monotonic()
    cluster.run("db1", "node")
    cluster.run("db2", "node")
    cluster.wait_synced(["seed", "db1", "db2"], 3)
    cluster.timed("two nodes joined by SST (size 3)", t1)

    t2 = time.monotonic()
    cluster.remove("seed")
    cluster.wait_synced(["db1", "db2"], 2)
    cluster.timed("seed removed (size 2)", t2)

    t3 = time.monotonic()
    cluster.run("db3", "node")
    cluster.wait_synced(["db1", "db2", "db3"], 3)
    cluster.timed("third node joined by SST (size 3)", t3)
    assert "SST" in cluster.logs("db3")
    assert len({cluster.status(m)["uuid"] for m in ("db1", "db2", "db3")}) == 1


def test_a_row_written_on_one_is_read_on_the_others(cluster):
    t0 = time.monotonic()
    cluster.query("db1", "CREATE TABLE t (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(40))")
    cluster.query("db2", "INSERT INTO t (v) VALUES ('written on db2')")
    for member in ("db1", "db3"):
        assert cluster.rows(member) == ["written on db2"]
    cluster.timed("table, row on db2, read on db1 and db3", t0)


def test_a_killed_member_rejoins_with_the_rows(cluster):
    """docker kill of db2, a row written meanwhile, db2 started: IST (or SST) with every row."""
    docker("kill", cluster.name("db2"))
    cluster.wait_synced(["db1", "db3"], 2)
    cluster.query("db1", "INSERT INTO t (v) VALUES ('while db2 was dead')")
    t0 = time.monotonic()
    docker("start", cluster.name("db2"))
    cluster.wait_synced(["db1", "db2", "db3"], 3)
    cluster.timed("killed member started -> rejoined (size 3)", t0)
    assert cluster.rows("db2") == ["written on db2", "while db2 was dead"]
    how = "IST" if "IST received" in cluster.logs("db2") else "SST"
    print(f"{cluster.platform}: db2 rejoined by {how}")


def test_all_killed_recover_by_themselves(cluster):
    """docker kill of all three, all started: the image recovers (pc.recovery, else the most
    advanced node bootstraps with its start position), same cluster UUID, every row."""
    members = ["db1", "db2", "db3"]
    cluster_uuid = cluster.status("db1")["uuid"]
    cluster.query("db3", "INSERT INTO t (v) VALUES ('before the power cut')")
    docker("kill", *(cluster.name(m) for m in members))
    t0 = time.monotonic()
    docker("start", *(cluster.name(m) for m in members))
    cluster.wait_synced(members, 3)
    cluster.timed("all killed, all started -> Primary, 3 Synced", t0)
    for m in members:
        assert cluster.rows(m) == ["written on db2", "while db2 was dead", "before the power cut"]
        assert cluster.status(m)["uuid"] == cluster_uuid
    logs = "".join(cluster.logs(m) for m in members)
    how = ("position exchange + bootstrap" if "bootstrapping the cluster from it" in logs
           else "pc.recovery")
    print(f"{cluster.platform}: full outage recovered by {how}")
