"""The haswarm MariaDB Galera image (images/mariadb-galera), for real on the host's Docker engine.

One image build, then one cluster shared by the tests in file order, the way the stack runs it:
a `seed` creates the cluster, three `node`s join it, the seed is removed; then rows, a second seed
that must not create a second cluster, and full outages (kill -9 of every node, graceful stops in
turn, kill without gvwstate.dat, a node that stays away) from which the cluster must come back by
itself with every committed row.

Containers sit on their own bridge network with the aliases `tasks.db-seed` / `tasks.db`, as
swarm's DNS names them. Secrets are files mounted read-only. Everything created here is removed
at the end, also on failure.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from .conftest import entrypoint_lines

pymysql = pytest.importorskip("pymysql")

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = ROOT / "images" / "mariadb-galera"
IMAGE = "haswarm/mariadb-galera:test"
RUN_ID = uuid.uuid4().hex[:6]
PREFIX = f"hswgt-{RUN_ID}"
NET = f"{PREFIX}-net"
NODES = [f"{PREFIX}-db{i}" for i in (1, 2, 3)]
SEED = f"{PREFIX}-seed"
SECRETS = {"root": "r00t-Pw'\"x", "user": "ha-Pw'q\\\"z", "sst": "sst-Pw'y"}
# Measured figures, printed at the end of the module (pytest -s shows them).
FIGURES: dict[str, str] = {}


def docker(*args: str, check: bool = True, timeout: float = 120, input: str | None = None):
    proc = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, input=input
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} -> {proc.returncode}: {proc.stderr}")
    return proc


def docker_answers() -> str | None:
    """None when a Docker engine answers, else why not."""
    if not shutil.which("docker"):
        return "no docker CLI on PATH"
    try:
        proc = docker("version", "--format", "{{.Server.Version}}", check=False, timeout=20)
    except subprocess.TimeoutExpired:
        return "the Docker engine does not answer (timeout)"
    if proc.returncode != 0:
        return f"no Docker engine answers: {proc.stderr.strip()[:200]}"
    return None


_why_not = docker_answers()
if _why_not:
    pytest.skip(f"needs a Docker engine: {_why_not}", allow_module_level=True)


def wait_for(what: str, predicate, timeout: float, interval: float = 0.5):
    """Poll predicate until it returns a truthy value; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (AssertionError, subprocess.SubprocessError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Lab:
    """Containers, volumes and the network of this module, and what the tests ask of them."""

    def __init__(self, secrets_dir: Path, config_dir: Path):
        self.secrets_dir = secrets_dir
        self.config_dir = config_dir
        self.containers: set[str] = set()
        self.volumes: set[str] = set()
        docker("network", "create", NET)

    # -- lifecycle -------------------------------------------------------------------------
    def run(
        self, name: str, command: str, alias: str, *, secrets=True, env=None, sst="mariabackup"
    ):
        """Start NAME with the stack's extra config mounted as 60-haswarm.cnf (SST method `sst`:
        the joiner chooses it)."""
        cnf = self.config_dir / f"{name}.cnf"
        cnf.write_text(f"[mysqld]\ninnodb_buffer_pool_size = 32M\nwsrep_sst_method = {sst}\n")
        cnf.chmod(0o444)
        self.containers.add(name)
        self.volumes.add(f"{name}-data")
        environment = {
            "GALERA_CLUSTER_NAME": "haswarm-test",
            "GALERA_PEERS": "tasks.db-seed,tasks.db",
            "GALERA_EXPECTED_NODES": "3",
            "GALERA_PC_RECOVERY_TIMEOUT": "10",
            "MARIADB_DATABASE": "homeassistant",
            "MARIADB_USER": "homeassistant",
        }
        if secrets:
            environment |= {
                "MARIADB_ROOT_PASSWORD_FILE": "/run/secrets/root",
                "MARIADB_PASSWORD_FILE": "/run/secrets/user",
                "GALERA_SST_PASSWORD_FILE": "/run/secrets/sst",
            }
        environment |= env or {}
        args = ["run", "-d", "--name", name, "--hostname", name.removeprefix(PREFIX + "-")]
        args += ["--network", NET, "--network-alias", alias]
        args += ["-v", f"{name}-data:/var/lib/mysql", "-v", f"{self.secrets_dir}:/run/secrets:ro"]
        args += ["-v", f"{cnf}:/etc/mysql/mariadb.conf.d/60-haswarm.cnf:ro"]
        for key, value in environment.items():
            args += ["-e", f"{key}={value}"]
        docker(*args, IMAGE, command)

    def remove(self, name: str) -> None:
        docker("rm", "-f", "-v", name, check=False)
        docker("volume", "rm", f"{name}-data", check=False)
        self.containers.discard(name)
        self.volumes.discard(f"{name}-data")

    def cleanup(self) -> None:
        for name in sorted(self.containers):
            docker("rm", "-f", "-v", name, check=False)
        for volume in sorted(self.volumes):
            docker("volume", "rm", "-f", volume, check=False)
        docker("network", "rm", NET, check=False)

    # -- what a container says -------------------------------------------------------------
    def status(self, name: str) -> dict[str, str]:
        out = docker("exec", name, "galera-status", timeout=20).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def synced(self, names: list[str], size: int) -> bool:
        for name in names:
            st = self.status(name)
            if (st.get("cluster_status"), st.get("local_state"), st.get("cluster_size")) != (
                "Primary",
                "Synced",
                str(size),
            ):
                return False
        return True

    def wait_synced(self, names: list[str], size: int, timeout: float) -> float:
        start = time.monotonic()
        try:
            wait_for(
                f"{names} Synced in a Primary component of {size}",
                lambda: self.synced(names, size),
                timeout,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.entrypoint_logs(names)}") from None
        return time.monotonic() - start

    def entrypoint_logs(self, names: list[str], lines: int = 15) -> str:
        """The entrypoint's own lines (not mariadbd's) of each container, for failure reports."""
        return "\n".join(entrypoint_lines(self.logs(n), n, lines) for n in names)

    def health(self, name: str) -> str:
        return docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip()

    def healthcheck(self, name: str) -> subprocess.CompletedProcess:
        return docker("exec", name, "galera-healthcheck", check=False, timeout=20)

    def logs(self, name: str, since: str | None = None) -> str:
        args = ["logs", name] if since is None else ["logs", "--since", since, name]
        proc = docker(*args, check=False)
        return proc.stdout + proc.stderr

    def ip(self, name: str) -> str:
        fmt = f'{{{{(index .NetworkSettings.Networks "{NET}").IPAddress}}}}'
        return docker("inspect", "-f", fmt, name).stdout.strip()

    def connect(self, name: str):
        return pymysql.connect(
            host=self.ip(name),
            user="homeassistant",
            password=SECRETS["user"],
            database="homeassistant",
            connect_timeout=5,
            autocommit=True,
        )

    def query(self, name: str, sql: str, args=None):
        conn = self.connect(name)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall()
        finally:
            conn.close()

    def rows(self, name: str) -> list[str]:
        return [r[0] for r in self.query(name, "SELECT v FROM t ORDER BY id")]

    def wipe_gvwstate(self, name: str) -> None:
        docker(
            "run",
            "--rm",
            "-v",
            f"{name}-data:/d",
            "--entrypoint",
            "rm",
            IMAGE,
            "-f",
            "/d/gvwstate.dat",
        )


def now() -> str:
    """A timestamp for `docker logs --since` (containers share the host's clock)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image(project_build):
    seconds = project_build(CONTEXT, IMAGE)  # base resolved locally, as `doit images` does
    FIGURES["image build (s; cached layers are reused)"] = f"{seconds:.1f}"
    size = docker("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout.strip()
    FIGURES["image size (MB)"] = f"{int(size) / 1e6:.0f}"
    yield IMAGE


@pytest.fixture(scope="module")
def galera_lab(image, tmp_path_factory):
    config_dir = tmp_path_factory.mktemp("galera-config")
    secrets_dir = tmp_path_factory.mktemp("galera-secrets")
    secrets_dir.chmod(0o755)
    for name, value in SECRETS.items():
        path = secrets_dir / name
        path.write_text(value + "\n")
        path.chmod(0o444)  # what a Docker secret looks like by default
    lab = Lab(secrets_dir, config_dir)
    try:
        yield lab
    finally:
        lab.cleanup()
        print("\nGalera image figures:", *(f"  {k}: {v}" for k, v in FIGURES.items()), sep="\n")


@pytest.fixture(scope="module")
def cluster(galera_lab):
    lab = galera_lab
    """The real bootstrap: seed healthy -> 3 nodes join (size 4) -> seed removed (size 3)."""
    start = time.monotonic()
    lab.run(SEED, "seed", "tasks.db-seed")
    wait_for("a healthy seed", lambda: lab.health(SEED) == "healthy", 90)
    FIGURES["seed healthy (s)"] = f"{time.monotonic() - start:.1f}"
    for name in NODES:
        lab.run(name, "node", "tasks.db")
    lab.wait_synced([SEED, *NODES], 4, 240)
    FIGURES["3 nodes joined by SST, size 4 (s from seed start)"] = f"{time.monotonic() - start:.1f}"
    docker("stop", "-t", "30", SEED)
    lab.remove(SEED)
    lab.wait_synced(NODES, 3, 60)
    FIGURES["cluster of 3 formed, seed removed (s)"] = f"{time.monotonic() - start:.1f}"
    lab.query(NODES[0], "CREATE TABLE t (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(40))")
    return lab


# --------------------------------------------------------------------------------------------
def start_and_time(cluster, figure: str, *names: str) -> None:
    """Start containers `names`, wait until all NODES are Synced in one cluster of 3, and record
    the seconds it took as `figure`."""
    start = time.monotonic()
    docker("start", *names)
    cluster.wait_synced(NODES, 3, 90)
    FIGURES[figure] = f"{time.monotonic() - start:.1f}"


def exit_code(name: str, timeout: float = 30) -> str:
    """The exit code of container `name`, once it has exited."""
    return wait_for(
        "the container to exit",
        lambda: docker(
            "inspect", "-f", "{{if not .State.Running}}{{.State.ExitCode}}{{end}}", name
        ).stdout.strip(),
        timeout,
    )


def test_refuses_to_start_without_secret_files(galera_lab):
    lab = galera_lab
    name = f"{PREFIX}-nosecret"
    lab.run(name, "seed", "tasks.nothing", secrets=False)
    assert exit_code(name) == "1"
    assert "MARIADB_ROOT_PASSWORD_FILE is not set" in lab.logs(name)
    lab.remove(name)

    lab.run(name, "node", "tasks.nothing", env={"MARIADB_PASSWORD_FILE": "/run/secrets/missing"})
    assert exit_code(name) == "1"
    assert "MARIADB_PASSWORD_FILE=/run/secrets/missing: no such file" in lab.logs(name)
    lab.remove(name)


def test_cluster_forms_from_seed_and_nodes(cluster):
    for name in NODES:
        st = cluster.status(name)
        assert st["cluster_status"] == "Primary" and st["cluster_size"] == "3"
        wait_for(f"{name} healthy", lambda n=name: cluster.health(n) == "healthy", 30)
        assert cluster.healthcheck(name).returncode == 0
    assert len({cluster.status(n)["uuid"] for n in NODES}) == 1
    charset = cluster.query(
        NODES[1],
        "SELECT default_character_set_name, default_collation_name "
        "FROM information_schema.schemata WHERE schema_name = 'homeassistant'",
    )
    assert charset == (("utf8mb4", "utf8mb4_unicode_ci"),)
    # the stack's 60-haswarm.cnf overrides the image's default (48M)
    assert cluster.query(NODES[2], "SELECT @@innodb_buffer_pool_size") == ((32 * 1024 * 1024,),)


def test_rows_written_on_one_node_are_read_on_the_others(cluster):
    cluster.query(NODES[0], "INSERT INTO t (v) VALUES ('one'), ('two')")
    cluster.query(NODES[1], "INSERT INTO t (v) VALUES ('three')")
    for name in NODES:
        assert cluster.rows(name) == ["one", "two", "three"]


def test_no_secret_in_logs_or_process_list(cluster):
    ps = docker("exec", NODES[0], "ps", "-eo", "args").stdout
    assert "mariadbd" in ps
    for name in NODES:
        text = cluster.logs(name) + (ps if name == NODES[0] else "")
        for secret in SECRETS.values():
            assert secret not in text
    mode = docker("exec", NODES[0], "stat", "-c", "%a %U", "/run/galera/sst-auth.cnf").stdout
    assert mode.strip() == "600 mysql"


def test_a_second_seed_joins_the_running_cluster_instead_of_creating_one(cluster):
    """A seed started again (empty volume) while a Primary component runs must join it."""
    seed2 = f"{PREFIX}-seed2"
    cluster_uuid = cluster.status(NODES[0])["uuid"]
    cluster.run(seed2, "seed", "tasks.db-seed", sst="rsync")
    try:
        cluster.wait_synced([seed2, *NODES], 4, 120)
        assert cluster.status(seed2)["uuid"] == cluster_uuid
        assert "joining it instead of creating a second cluster" in cluster.logs(seed2)
        assert cluster.rows(seed2) == ["one", "two", "three"]
    finally:
        docker("stop", "-t", "30", seed2, check=False)
        cluster.remove(seed2)
    cluster.wait_synced(NODES, 3, 60)


def test_full_kill_comes_back_by_itself_with_every_row(cluster):
    """kill -9 of all three (a power cut): pc.recovery restores the primary component."""
    cluster_uuid = cluster.status(NODES[0])["uuid"]
    cluster.query(NODES[2], "INSERT INTO t (v) VALUES ('before the power cut')")
    docker("kill", *NODES)
    start = time.monotonic()
    docker("start", *NODES)
    took = cluster.wait_synced(NODES, 3, 90)
    FIGURES["full kill -9 -> Primary, 3 Synced (s)"] = f"{time.monotonic() - start:.1f}"
    assert took < 90
    expected = ["one", "two", "three", "before the power cut"]
    for name in NODES:
        assert cluster.rows(name) == expected
        assert cluster.status(name)["uuid"] == cluster_uuid
    cluster.query(NODES[0], "INSERT INTO t (v) VALUES ('after')")
    assert cluster.rows(NODES[1])[-1] == "after"


def test_nodes_that_are_behind_never_bootstrap(cluster):
    """Graceful stops in turn with writes in between: db3 ends most advanced. db1 and db2 must
    wait (healthy, not Primary), also when a new seed (empty volume) shows up beside them: the
    seed must not create a cluster, and it does not count as a node with a position. Once db3 is
    back it bootstraps, the others rejoin by IST with every row, and the seed joins by SST."""
    cluster_uuid = cluster.status(NODES[0])["uuid"]
    db1, db2, db3 = NODES
    seed3 = f"{PREFIX}-seed3"
    docker("stop", "-t", "30", db1)
    cluster.query(db2, "INSERT INTO t (v) VALUES ('db1 missed this')")
    docker("stop", "-t", "30", db2)
    cluster.query(db3, "INSERT INTO t (v) VALUES ('only db3 has this')")
    docker("stop", "-t", "30", db3)

    since = now()
    docker("start", db1, db2)
    cluster.run(seed3, "seed", "tasks.db-seed", sst="rsync")
    try:
        wait_for(
            "db1, db2 and the new seed waiting",
            lambda: all(cluster.status(n)["phase"] == "waiting" for n in (db1, db2, seed3)),
            60,
        )
        time.sleep(5)
        for name in (db1, db2, seed3):
            st = cluster.status(name)
            assert st["phase"] == "waiting" and st["cluster_status"] == "none", st
            assert cluster.healthcheck(name).returncode == 0  # busy, not to be killed
        assert cluster.status(seed3)["data"] == "no"
        assert "not creating a new cluster" in cluster.logs(seed3)
        logs = cluster.logs(db1, since) + cluster.logs(db2, since) + cluster.logs(seed3)
        assert "bootstrapping" not in logs and "creating a new cluster '" not in logs

        start_and_time(cluster, "graceful full stop -> all back (s after the last node started)",
                       db3)
        assert "bootstrapping the cluster from it" in cluster.logs(db3, since)
        for name in NODES:
            assert cluster.rows(name)[-2:] == ["db1 missed this", "only db3 has this"]
            assert cluster.status(name)["uuid"] == cluster_uuid
        cluster.wait_synced([seed3, *NODES], 4, 120)
        assert cluster.rows(seed3)[-1] == "only db3 has this"
    finally:
        docker("stop", "-t", "30", seed3, check=False)
        cluster.remove(seed3)
    cluster.wait_synced(NODES, 3, 60)


def test_kill_without_gvwstate_bootstraps_once_from_the_recovered_position(cluster):
    """No gvwstate.dat (pc.recovery impossible): positions from --wsrep-recover are exchanged,
    exactly one node bootstraps with its start position, so the cluster UUID is kept (no SST)."""
    cluster_uuid = cluster.status(NODES[0])["uuid"]
    cluster.query(NODES[1], "INSERT INTO t (v) VALUES ('before kill 2')")
    docker("kill", *NODES)
    for name in NODES:
        cluster.wipe_gvwstate(name)
    since = now()
    start = time.monotonic()
    docker("start", *NODES)
    cluster.wait_synced(NODES, 3, 90)
    FIGURES["kill -9 without gvwstate -> all back (s)"] = f"{time.monotonic() - start:.1f}"
    logs = {n: cluster.logs(n, since) for n in NODES}
    assert sum("bootstrapping the cluster from it" in text for text in logs.values()) == 1
    for name in NODES:
        assert cluster.rows(name)[-1] == "before kill 2"
        assert cluster.status(name)["uuid"] == cluster_uuid


def test_a_node_that_stays_away_does_not_block_the_others_forever(cluster):
    """kill -9 of all, only two come back: pc.recovery cannot complete, they give up on it
    (GALERA_PC_RECOVERY_TIMEOUT, 10 s here) and wait for the third; when it starts, it joins the
    position exchange and the cluster forms with every row."""
    db1, db2, db3 = NODES
    cluster.query(db1, "INSERT INTO t (v) VALUES ('before kill 3')")
    docker("kill", *NODES)
    since = now()
    docker("start", db1, db2)
    wait_for(
        "db1 and db2 giving up on pc.recovery",
        lambda: all(
            cluster.status(n)["pc"] == "no" and cluster.status(n)["phase"] == "waiting"
            for n in (db1, db2)
        ),
        60,
    )
    assert cluster.status(db1)["cluster_status"] == "none"
    start_and_time(cluster, "two back first, third later -> all back (s after the third started)",
                   db3)
    assert "did not come back" in cluster.logs(db1, since)
    for name in NODES:
        assert cluster.rows(name)[-1] == "before kill 3"


def test_the_last_to_leave_bootstraps_without_a_dead_node(cluster):
    """What a swarm leader change can do: db3's node dies (kill -9), then swarm stops the two
    healthy members one after the other. db1 left last and cleanly (safe_to_bootstrap 1), so it
    holds every write: it bootstraps without waiting for db3, db2 joins it, and db3 joins when
    it is back."""
    db1, db2, db3 = NODES
    cluster_uuid = cluster.status(db1)["uuid"]
    docker("kill", db3)
    cluster.query(db2, "INSERT INTO t (v) VALUES ('db3 was dead')")
    docker("stop", "-t", "30", db2)
    cluster.query(db1, "INSERT INTO t (v) VALUES ('only db1 has this')")
    docker("stop", "-t", "30", db1)
    since = now()
    start = time.monotonic()
    docker("start", db2, db1)
    try:
        cluster.wait_synced([db1, db2], 2, 90)
        FIGURES["last to leave + one more back, third dead -> Primary (s)"] = (
            f"{time.monotonic() - start:.1f}"
        )
        assert "not waiting for" in cluster.logs(db1, since)
        assert "bootstrapping the cluster from it" in cluster.logs(db1, since)
        assert "bootstrapping" not in cluster.logs(db2, since)
        assert cluster.rows(db2)[-2:] == ["db3 was dead", "only db1 has this"]
    finally:  # the next tests need all three, whatever happened here
        docker("start", db3)
    cluster.wait_synced(NODES, 3, 90)
    assert cluster.rows(db3)[-1] == "only db1 has this"
    assert cluster.status(db3)["uuid"] == cluster_uuid


def test_sigterm_stops_gracefully(cluster):
    """docker stop (SIGTERM) lets mariadbd flush: grastate.dat then holds the real seqno."""
    name = NODES[2]
    start = time.monotonic()
    docker("stop", "-t", "30", name)
    FIGURES["docker stop of a node (s)"] = f"{time.monotonic() - start:.1f}"
    code = docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
    assert code == "0"
    grastate = docker(
        "run", "--rm", "-v", f"{name}-data:/d", "--entrypoint", "cat", IMAGE, "/d/grastate.dat"
    ).stdout
    assert "seqno:   -1" not in grastate
    docker("start", name)
    cluster.wait_synced(NODES, 3, 60)


def test_a_second_sigterm_does_not_cut_the_shutdown_short(cluster):
    """swarm's stop and a second signal: the container ends only once mariadbd has left the
    cluster (10.11-3 ended it halfway, and the others blocked every commit until they evicted
    the member). The others take a write at once after."""
    name, other = NODES[2], NODES[0]
    docker("kill", "-s", "TERM", name)
    time.sleep(0.2)
    docker("kill", "-s", "TERM", name, check=False)
    assert exit_code(name) == "0"
    logs = cluster.logs(name)
    assert "mariadbd: Shutdown complete" in logs, entrypoint_lines(logs, name, 20)
    assert logs.index("mariadbd: Shutdown complete") < logs.index("mariadbd stopped (exit 0)")
    start = time.monotonic()
    cluster.query(other, "INSERT INTO t (v) VALUES ('after a double stop')")
    FIGURES["a write right after a member left (s)"] = f"{time.monotonic() - start:.2f}"
    assert time.monotonic() - start < 2, "the others did not wait to evict the member"
    docker("start", name)
    cluster.wait_synced(NODES, 3, 60)
