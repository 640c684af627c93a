"""The lab's locally built Home Assistant and Mosquitto images (lab/images/*) keep their contract.

Builds each image once (its `prepare` first, when the context has one) through the project's own
build path, as `doit images` does (fixture `project_build`: FROM resolved to a local Debian base,
bootstrapped when the engine lacks it; buildx or the legacy builder, HASWARM_BUILDER=buildx|legacy
forces one), then runs real containers:
Home Assistant on an empty config dir answers HTTP and finishes onboarding with --skip-pip
(default_config set up whole), and records into a real MariaDB; Mosquitto refuses anonymous
clients, accepts the user of a password file mounted like a Docker secret (uid 1883, mode 0400),
and keeps a retained message over a restart and over a replacement container on the same data
dir; Home Assistant's MQTT integration, set up through its config flow with a password, connects
to the lab's Mosquitto and publishes through it.

Every container and network made here is named `hswlab-test-<run id>-*` and removed at the end,
also on failure. The helper image `haswarm-lab-test/mariadb:bookworm` (Debian's mariadb-server,
built the same way) is kept: later runs rebuild it from the layer cache.
Figures (prepare, build, sizes, time to HTTP, RSS) are printed at the end of the module.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "lab" / "images"
HA_TAG = "haswarm-lab/homeassistant:2026.2.3"
HA_VERSION = "2026.2.3"
MQ_TAG = "haswarm-lab/mosquitto:2.0.21"
MQ_VERSION = "2.0.21"
MARIADB_TAG = "haswarm-lab-test/mariadb:bookworm"
RUN_ID = uuid.uuid4().hex[:8]
PREFIX = f"hswlab-test-{RUN_ID}"
HA_HTTP_TIMEOUT = 180  # s; ~3-4 s on an idle 2-core host
FIGURES: dict[str, str] = {}

MARIADB_DOCKERFILE = """\
FROM debian:bookworm
RUN printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d \\
 && apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mariadb-server \\
 && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d
CMD ["sh", "-c", "install -d -o mysql -g mysql /run/mysqld && exec mariadbd --user=mysql \\
--bind-address=0.0.0.0 --innodb-buffer-pool-size=32M --skip-name-resolve"]
"""


# --- helpers ------------------------------------------------------------------------------------


def sh(
    *args: str,
    timeout: float = 120,
    check: bool = True,
    env: dict | None = None,
    input: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        input=input,
        cwd=cwd,
    )
    if check and proc.returncode:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
        )
    return proc


def docker(*args: str, **kw) -> subprocess.CompletedProcess:
    return sh("docker", *args, **kw)


class Resources:
    """Containers and networks of this run, removed at module teardown (and on demand)."""

    def __init__(self) -> None:
        self.containers: list[str] = []
        self.networks: list[str] = []

    def run(self, role: str, image: str, *args: str, run_opts: tuple[str, ...] = ()) -> str:
        name = f"{PREFIX}-{role}"
        self.containers.append(name)
        docker(
            "run",
            "-d",
            "--name",
            name,
            "--label",
            "haswarm.test=lab-images",
            *run_opts,
            image,
            *args,
        )
        return name

    def network(self) -> str:
        name = f"{PREFIX}-net{len(self.networks) + 1}"  # one per test that asks (scope: module)
        docker("network", "create", "--label", "haswarm.test=lab-images", name)
        self.networks.append(name)
        return name

    def remove(self, name: str) -> None:
        docker("rm", "-f", "-v", name, check=False, timeout=60)
        if name in self.containers:
            self.containers.remove(name)

    def cleanup(self) -> None:
        for name in list(self.containers):
            self.remove(name)
        for net in self.networks:
            docker("network", "rm", net, check=False, timeout=60)
        self.networks.clear()


def host_port(container: str, port: int) -> int:
    out = docker("port", container, f"{port}/tcp").stdout.split()
    return int(out[0].rsplit(":", 1)[1])


def logs(container: str) -> str:
    proc = docker("logs", container, check=False)
    return proc.stdout + proc.stderr


def pid1_status(container: str, pid: int = 1) -> dict[str, str]:
    text = docker("exec", container, "cat", f"/proc/{pid}/status").stdout
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def ha_pid(container: str) -> int:
    """Home Assistant's process: a child of PID 1 (/init), as in the official image."""
    out = docker("exec", container, "sh", "-c",
                 "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline | grep -q "
                 "'^/opt/venv/bin/python3 -m homeassistant' && echo ${p#/proc/}; done; true"
                 ).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


def http_get(url: str, timeout: float = 5) -> tuple[int, dict]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


def wait_http(url: str, container: str, timeout: float) -> tuple[int, dict, float]:
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        try:
            code, headers = http_get(url)
            if code in (200, 302):
                return code, headers, time.monotonic() - t0
            last = code
        except OSError as e:
            last = e
        state = docker("inspect", "-f", "{{.State.Status}}", container).stdout.strip()
        if state != "running":
            raise AssertionError(f"{container} is {state}:\n{logs(container)[-5000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no HTTP answer in {timeout} s ({last}):\n{logs(container)[-5000:]}")


def api(base: str, path: str, data=None, token: str | None = None, form: bool = False):
    headers = {}
    body = None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if data is not None:
        if form:
            body = urllib.parse.urlencode(data).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        else:
            body = json.dumps(data).encode()
            headers["Content-Type"] = "application/json"
    req = urllib.request.Request(base + path, body, headers)
    with urllib.request.urlopen(req, timeout=60) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def onboard(base: str) -> str:
    """Finish Home Assistant's onboarding as the frontend does; return an access token."""
    client = base + "/"
    auth = api(
        base,
        "/api/onboarding/users",
        {
            "client_id": client,
            "name": "Lab",
            "username": "lab",
            "password": "lab-password",
            "language": "en",
        },
    )["auth_code"]
    token = api(
        base,
        "/auth/token",
        {
            "grant_type": "authorization_code",
            "code": auth,
            "client_id": client,
        },
        form=True,
    )["access_token"]
    api(base, "/api/onboarding/core_config", {}, token)
    api(base, "/api/onboarding/analytics", {}, token)
    api(base, "/api/onboarding/integration", {"client_id": client, "redirect_uri": client}, token)
    steps = api(base, "/api/onboarding", token=token)
    assert all(step["done"] for step in steps), steps
    return token


def assert_no_missing_requirements(log: str) -> None:
    """With --skip-pip every loaded integration must find its requirements in the image."""
    bad = [
        line
        for line in log.splitlines()
        if any(
            s in line
            for s in (
                "Setup failed for",
                "No module named",
                "Unable to import component",
                "Unable to set up dependencies",
                "Unable to install package",
            )
        )
    ]
    assert not bad, "integrations failed:\n" + "\n".join(bad) + "\n\n" + log[-5000:]


def image_size(tag: str) -> str:
    size = int(docker("image", "inspect", "-f", "{{.Size}}", tag).stdout)
    return f"{size / 1e6:.0f} MB"


def prepare(context: Path) -> float | None:
    script = context / "prepare"
    if not script.exists():
        return None
    assert os.access(script, os.X_OK), f"{script} must be executable"
    t0 = time.monotonic()
    sh(str(script), cwd=context, timeout=1800)
    return time.monotonic() - t0


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> None:
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI on PATH")
    try:
        proc = sh("docker", "version", "--format", "{{.Server.Version}}", check=False, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.skip("no Docker engine answers (docker version timed out)")
    if proc.returncode:
        pytest.skip(f"no Docker engine answers: {proc.stderr.strip()[:300]}")


@pytest.fixture(scope="module")
def res(engine, request):
    resources = Resources()
    yield resources
    resources.cleanup()
    tr = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if tr is not None and FIGURES:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            tr.write_line("")
            tr.write_line("lab image figures:")
            for key, value in FIGURES.items():
                tr.write_line(f"  {key}: {value}")


@pytest.fixture(scope="module")
def ha_image(engine, project_build) -> str:
    context = IMAGES / "homeassistant"
    first = prepare(context)
    second = prepare(context)  # must be idempotent and fast
    FIGURES["homeassistant prepare (this run, then again)"] = f"{first:.1f} s, {second:.2f} s"
    assert second < 5, f"a second prepare took {second:.1f} s"
    FIGURES["homeassistant build (layer cache as found)"] = (
        f"{project_build(context, HA_TAG):.1f} s"
    )
    FIGURES["homeassistant image size"] = image_size(HA_TAG)
    return HA_TAG


@pytest.fixture(scope="module")
def mq_image(engine, project_build) -> str:
    context = IMAGES / "mosquitto"
    prepare(context)  # none today; the contract allows one
    FIGURES["mosquitto build (layer cache as found)"] = (
        f"{project_build(context, MQ_TAG):.1f} s"
    )
    FIGURES["mosquitto image size"] = image_size(MQ_TAG)
    return MQ_TAG


@pytest.fixture(scope="module")
def mariadb_image(engine, project_build, tmp_path_factory) -> str:
    context = tmp_path_factory.mktemp("mariadb-context")
    (context / "Dockerfile").write_text(MARIADB_DOCKERFILE)
    project_build(context, MARIADB_TAG)  # the layer cache makes a rebuild cheap
    return MARIADB_TAG


# --- Home Assistant -------------------------------------------------------------------------------


def test_ha_image_contract(ha_image):
    cfg = json.loads(docker("image", "inspect", "-f", "{{json .Config}}", ha_image).stdout)
    assert cfg["Entrypoint"] == ["/init"]
    assert not cfg.get("Cmd")
    assert cfg.get("User", "") in ("", "root", "0")
    assert "8123/tcp" in (cfg.get("ExposedPorts") or {})
    script = r"""
set -e
cat /init
command -v python3
python3 -c 'import homeassistant.const as c; print("HA", c.__version__)'
python3 -c 'import MySQLdb; print("MySQLdb", MySQLdb.version_info)'
for tool in gcc cc c++ make ld; do if command -v $tool; then echo "COMPILER $tool"; fi; done
ls -A /root/.cache 2>/dev/null | sed 's/^/CACHE /' || true
"""
    out = docker("run", "--rm", "--entrypoint", "/bin/sh", ha_image, "-c", script).stdout
    assert 'os.execv' in out and '"-m", "homeassistant", "--config", "/config", "--skip-pip"' \
        in out, out
    assert f"HA {HA_VERSION}" in out, out
    assert "MySQLdb (" in out, out
    assert "COMPILER" not in out, out
    assert "CACHE" not in out, out


def test_ha_answers_http_on_empty_config_and_onboards(ha_image, res, tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    t0 = time.monotonic()
    name = res.run(
        "ha-empty",
        ha_image,
        run_opts=("-p", "127.0.0.1::8123", "-v", f"{config}:/config"),
    )
    base = f"http://127.0.0.1:{host_port(name, 8123)}"
    code, headers, _ = wait_http(base + "/", name, HA_HTTP_TIMEOUT)
    FIGURES["HA empty config: docker run -> HTTP answer"] = f"{time.monotonic() - t0:.1f} s"
    if code == 302:
        assert headers.get("Location", headers.get("location")) == "/onboarding.html"

    pid = ha_pid(name)
    assert pid != 1  # PID 1 is /init, which can pass signals on; HA can be SIGKILLed
    cmdline = docker("exec", name, "cat", f"/proc/{pid}/cmdline").stdout.split("\0")
    assert "--skip-pip" in cmdline and "homeassistant" in cmdline, cmdline
    assert (config / "configuration.yaml").exists()  # HA wrote its default config (default_config)

    # Finish onboarding as the frontend does: it sets up integrations of its own.
    token = onboard(base)
    assert api(base, "/api/", token=token) == {"message": "API running."}

    # The integrations onboarding sets up appear a few seconds after its last step (HA 2026.2:
    # their config flows run as tasks): wait for them, then for every entry to settle.
    deadline = time.monotonic() + 60
    while True:
        entries = {
            e["domain"]: e["state"]
            for e in api(base, "/api/config/config_entries/entry", token=token)
        }
        settling = [d for d, s in entries.items() if s in ("not_loaded", "setup_in_progress")]
        expected = {"google_translate", "shopping_list"} <= entries.keys()
        if (expected and not settling) or time.monotonic() > deadline:
            break
        time.sleep(1)
    # radio_browser has no internet here: setup_retry is fine, an import error is not
    assert entries.get("google_translate") == "loaded", entries
    assert entries.get("shopping_list") == "loaded", entries
    assert not [d for d, s in entries.items() if s in ("setup_error", "migration_error")], entries
    # default_config and every integration it depends on (go2rtc too: see the image's /init);
    # default_config is set up last, in bootstrap's stage 2
    wanted = {"default_config", "recorder", "http", "frontend", "go2rtc"}
    deadline = time.monotonic() + 60
    while not wanted <= (components := set(api(base, "/api/config", token=token)["components"])):
        assert time.monotonic() < deadline, f"missing {wanted - components}\n{logs(name)[-5000:]}"
        time.sleep(1)
    time.sleep(5)
    assert_no_missing_requirements(logs(name))
    rss_kb = int(pid1_status(name, ha_pid(name))["VmRSS"].split()[0])
    FIGURES["HA RSS after onboarding (default_config)"] = f"{rss_kb / 1024:.0f} MB"


def test_ha_recorder_on_mariadb(ha_image, mariadb_image, res, tmp_path):
    import pymysql

    net = res.network()
    db = res.run(
        "mariadb",
        mariadb_image,
        run_opts=(
            "--network",
            net,
            "-p",
            "127.0.0.1::3306",
        ),
    )
    sql = (
        "CREATE DATABASE homeassistant CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;"
        "CREATE USER 'ha'@'%' IDENTIFIED BY 'ha-pw';"
        "GRANT ALL PRIVILEGES ON homeassistant.* TO 'ha'@'%';"
    )
    deadline = time.monotonic() + 60
    while docker("exec", db, "mariadb", "-e", "SELECT 1", check=False).returncode:
        assert time.monotonic() < deadline, logs(db)
        time.sleep(0.5)
    docker("exec", db, "mariadb", "-e", sql)

    config = tmp_path / "config"
    config.mkdir()
    (config / "configuration.yaml").write_text(
        "default_config:\n"
        "recorder:\n"
        f"  db_url: mysql://ha:ha-pw@{db}/homeassistant?charset=utf8mb4\n"
        "  commit_interval: 1\n"
    )
    name = res.run(
        "ha-recorder",
        ha_image,
        run_opts=("--network", net, "-p", "127.0.0.1::8123", "-v", f"{config}:/config"),
    )
    base = f"http://127.0.0.1:{host_port(name, 8123)}"
    _, _, took = wait_http(base + "/", name, HA_HTTP_TIMEOUT)
    FIGURES["HA with recorder on MariaDB: HTTP answer"] = f"{took:.1f} s"

    conn = pymysql.connect(
        host="127.0.0.1",
        port=host_port(db, 3306),
        user="ha",
        password="ha-pw",
        database="homeassistant",
        autocommit=True,
    )
    try:
        deadline = time.monotonic() + 90
        states = 0
        while time.monotonic() < deadline:
            with conn.cursor() as cur:
                cur.execute("SHOW TABLES")
                tables = {row[0] for row in cur.fetchall()}
                if {"states", "events", "recorder_runs", "schema_changes"} <= tables:
                    cur.execute("SELECT COUNT(*) FROM states")
                    states = cur.fetchone()[0]
                    if states:
                        break
            time.sleep(1)
        assert states > 0, f"no states recorded; tables: {tables}\n{logs(name)[-5000:]}"
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM recorder_runs WHERE `end` IS NULL")
            assert cur.fetchone()[0] == 1
    finally:
        conn.close()
    log = logs(name)
    assert "recorder" not in "\n".join(line for line in log.splitlines() if " ERROR " in line), log[
        -5000:
    ]
    assert_no_missing_requirements(log)


# --- Mosquitto ------------------------------------------------------------------------------------

MQ_CONF = """\
listener 1883 0.0.0.0
allow_anonymous false
password_file /run/secrets/mosquitto_passwd
persistence true
persistence_location /mosquitto/data/
autosave_interval 5
log_dest stdout
"""


def test_mosquitto_image_contract(mq_image, res):
    cfg = json.loads(docker("image", "inspect", "-f", "{{json .Config}}", mq_image).stdout)
    assert cfg["Cmd"] == ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
    assert cfg["Entrypoint"] == ["/docker-entrypoint.sh"]
    script = r"""
set -e
id mosquitto
stat -c '%n %u:%g' /mosquitto/config /mosquitto/data /mosquitto/log /run/mosquitto
test -f /mosquitto/config/mosquitto.conf && echo CONF
dpkg-query -W -f '${Version}\n' mosquitto
for tool in mosquitto_sub mosquitto_pub mosquitto_passwd; do command -v $tool; done
"""
    out = docker("run", "--rm", "--entrypoint", "/bin/sh", mq_image, "-c", script).stdout
    assert "uid=1883(mosquitto) gid=1883(mosquitto)" in out, out
    for path in ("/mosquitto/config", "/mosquitto/data", "/mosquitto/log", "/run/mosquitto"):
        assert f"{path} 1883:1883" in out, out
    assert "CONF" in out and f"\n{MQ_VERSION}-" in out, out
    assert "/usr/bin/mosquitto_sub" in out and "/usr/bin/mosquitto_passwd" in out, out

    # default command with the default config: the broker runs as uid 1883
    name = res.run("mq-default", mq_image)
    deadline = time.monotonic() + 20
    while f"{MQ_VERSION} running" not in logs(name):
        assert time.monotonic() < deadline, logs(name)
        time.sleep(0.1)
    status = pid1_status(name)
    assert status["Uid"].split()[:2] == ["1883", "1883"], status["Uid"]
    assert status["Gid"].split()[:2] == ["1883", "1883"], status["Gid"]
    res.remove(name)


def mqtt_connect(port: int, user: str | None = None, password: str | None = None):
    """Connect with paho-mqtt 2.x; return (client, reason code)."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}")
    if user is not None:
        client.username_pw_set(user, password)
    result: dict = {}
    client.on_connect = lambda c, u, flags, rc, props: result.setdefault("rc", rc)
    client.on_disconnect = lambda c, u, flags, rc, props: result.setdefault("rc", rc)
    client.connect("127.0.0.1", port, keepalive=10)
    client.loop_start()
    deadline = time.monotonic() + 10
    while "rc" not in result and time.monotonic() < deadline:
        time.sleep(0.05)
    return client, result.get("rc")


def retained(port: int, user: str, password: str, topic: str) -> str | None:
    """The retained message on `topic` (None when none arrives within 10 s)."""
    got: dict = {}
    client, rc = mqtt_connect(port, user, password)
    assert rc is not None and not rc.is_failure, rc
    client.on_message = lambda c, u, msg: got.setdefault("payload", msg.payload.decode())
    client.subscribe(topic, qos=1)
    deadline = time.monotonic() + 10
    while "payload" not in got and time.monotonic() < deadline:
        time.sleep(0.05)
    client.loop_stop()
    client.disconnect()
    return got.get("payload")


def wait_broker(name: str, starts: int = 1, timeout: float = 20) -> int:
    """Wait for the `starts`-th "running" line of the container's broker; return its host port."""
    deadline = time.monotonic() + timeout
    while logs(name).count(f"mosquitto version {MQ_VERSION} running") < starts:
        assert time.monotonic() < deadline, logs(name)
        time.sleep(0.1)
    return host_port(name, 1883)


def test_mosquitto_auth_and_retained_message_persist(mq_image, res, tmp_path):
    conf_dir, data_dir, secrets = (tmp_path / d for d in ("config", "data", "secrets"))
    for d in (conf_dir, data_dir, secrets):
        d.mkdir()
    (conf_dir / "mosquitto.conf").write_text(MQ_CONF)
    # the broker reads the password file after dropping to uid 1883
    passwd = mosquitto_passwd(mq_image, secrets, "lab", "lab-secret")
    assert (passwd.stat().st_uid, passwd.stat().st_mode & 0o777) == (1883, 0o400)
    opts = (
        "-p",
        "127.0.0.1::1883",
        "-v",
        f"{conf_dir}:/mosquitto/config:ro",
        "-v",
        f"{data_dir}:/mosquitto/data",
        "-v",
        f"{passwd}:/run/secrets/mosquitto_passwd:ro",
    )
    t0 = time.monotonic()
    name = res.run("mq-auth", mq_image, run_opts=opts)
    port = wait_broker(name)
    FIGURES["mosquitto docker run -> listening"] = f"{time.monotonic() - t0:.2f} s"

    client, rc = mqtt_connect(port)
    client.loop_stop()
    client.disconnect()
    assert rc is not None and rc.is_failure, f"anonymous client accepted: {rc}"
    client, rc = mqtt_connect(port, "lab", "wrong")
    client.loop_stop()
    client.disconnect()
    assert rc is not None and rc.is_failure, f"wrong password accepted: {rc}"

    payload = f"retained-{RUN_ID}"
    client, rc = mqtt_connect(port, "lab", "lab-secret")
    assert rc is not None and not rc.is_failure, rc
    info = client.publish("haswarm/lab/retained", payload, qos=1, retain=True)
    info.wait_for_publish(timeout=10)
    assert info.is_published()
    client.loop_stop()
    client.disconnect()

    # the healthcheck the stack will use
    hc = ["mosquitto_sub", "-E", "-t", "$SYS/#", "-C", "1", "-i", "healthcheck", "-W", "3"]
    assert docker("exec", name, *hc, "-u", "lab", "-P", "lab-secret", check=False).returncode == 0
    assert docker("exec", name, *hc, check=False).returncode != 0

    def read_retained(port: int) -> str | None:
        return retained(port, "lab", "lab-secret", "haswarm/lab/retained")

    docker("restart", "-t", "10", name)
    assert read_retained(wait_broker(name, starts=2)) == payload, logs(name)

    # a new container on the same data dir (what a swarm reschedule does)
    res.remove(name)
    assert (data_dir / "mosquitto.db").exists()
    name = res.run("mq-auth2", mq_image, run_opts=opts)
    assert read_retained(wait_broker(name)) == payload, logs(name)
    status = pid1_status(name)
    assert status["Uid"].split()[0] == "1883", status["Uid"]


# --- Home Assistant's MQTT client on the lab's Mosquitto ----------------------------------------


def mosquitto_passwd(mq_image: str, secrets: Path, user: str, password: str) -> Path:
    """A password file made with the image's mosquitto_passwd, owned like a Docker secret
    (uid 1883, mode 0400)."""
    docker(
        "run",
        "--rm",
        "-v",
        f"{secrets}:/out",
        mq_image,
        "sh",
        "-c",
        f"mosquitto_passwd -b -c /out/mosquitto_passwd {user} {password}"
        " && chown 1883:1883 /out/mosquitto_passwd && chmod 0400 /out/mosquitto_passwd",
    )
    return secrets / "mosquitto_passwd"


def test_ha_mqtt_client_on_lab_mosquitto(ha_image, mq_image, res, tmp_path):
    """As a user does after `doit setup`: the MQTT integration set up through its config flow
    (the broker, user homeassistant and its password), connected, and publishing through HA."""
    conf_dir, data_dir, secrets, config = (
        tmp_path / d for d in ("mq-config", "mq-data", "secrets", "config"))
    for d in (conf_dir, data_dir, secrets, config):
        d.mkdir()
    (conf_dir / "mosquitto.conf").write_text(MQ_CONF)
    passwd = mosquitto_passwd(mq_image, secrets, "homeassistant", "ha-mqtt-secret")
    net = res.network()
    broker = res.run(
        "mq-for-ha",
        mq_image,
        run_opts=(
            "--network", net,
            "-p", "127.0.0.1::1883",
            "-v", f"{conf_dir}:/mosquitto/config:ro",
            "-v", f"{data_dir}:/mosquitto/data",
            "-v", f"{passwd}:/run/secrets/mosquitto_passwd:ro",
        ),
    )  # fmt: skip
    port = wait_broker(broker)
    name = res.run(
        "ha-mqtt",
        ha_image,
        run_opts=("--network", net, "-p", "127.0.0.1::8123", "-v", f"{config}:/config"),
    )
    base = f"http://127.0.0.1:{host_port(name, 8123)}"
    wait_http(base + "/", name, HA_HTTP_TIMEOUT)
    token = onboard(base)

    flow = api(base, "/api/config/config_entries/flow", {"handler": "mqtt"}, token)
    # no Supervisor, no discovery: the first step is the broker form
    assert flow.get("type") == "form", flow
    t0 = time.monotonic()
    result = api(
        base,
        f"/api/config/config_entries/flow/{flow['flow_id']}",
        {"broker": broker, "port": 1883, "username": "homeassistant",
         "password": "ha-mqtt-secret"},
        token,
    )
    assert result.get("type") == "create_entry", result
    deadline = time.monotonic() + 60
    while True:
        state = {e["domain"]: e["state"]
                 for e in api(base, "/api/config/config_entries/entry", token=token)}.get("mqtt")
        if state == "loaded" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert state == "loaded", f"mqtt entry {state}\n{logs(name)[-5000:]}"
    FIGURES["HA MQTT config flow -> entry loaded"] = f"{time.monotonic() - t0:.1f} s"
    assert "u'homeassistant'" in logs(broker), logs(broker)[-3000:]

    # HA publishes (retained) through its client; a subscriber of our own reads it back
    payload = f"from-ha-{RUN_ID}"
    api(base, "/api/services/mqtt/publish",
        {"topic": "haswarm/lab/from-ha", "payload": payload, "retain": True, "qos": 1}, token)
    got = retained(port, "homeassistant", "ha-mqtt-secret", "haswarm/lab/from-ha")
    assert got == payload, logs(name)[-5000:]
    assert_no_missing_requirements(logs(name))
