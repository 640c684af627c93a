"""Rendering: valid stack file (real Docker CLI), every secret reaches its consumer, up-to-date."""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tasks import render, secrets
from tasks.config import LAB_CLUSTER_FILE, PROJECT_ROOT, Cluster, load_cluster
from tasks.members import MEMBERS_DIR, MEMBERS_FILE, members_text

EXAMPLE = PROJECT_ROOT / "config" / "cluster.example.yml"


def cluster_in(tmp_path: Path, source: Path = LAB_CLUSTER_FILE, **changes) -> Path:
    data = yaml.safe_load(source.read_text())
    data["build_dir"] = str(tmp_path / "build")
    data["secrets_dir"] = str(tmp_path / "secrets")
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        d = data
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = value
    out = tmp_path / "cluster.yml"
    out.write_text(yaml.safe_dump(data))
    return out


def render_all(c: Cluster) -> dict[str, str]:
    secrets.ensure(c)
    texts = {}
    for out in render.outputs(c):  # in order: the stack reads files rendered before it
        text = render.render(c, out)
        render.write(render.build_dir(c) / out.target, text, out.mode)
        texts[out.target] = text
    return texts


@pytest.fixture(params=["lab", "example-ingress-portainer"])
def rendered(request, tmp_path):
    if request.param == "lab":
        c = load_cluster(cluster_in(tmp_path))
    else:
        c = load_cluster(cluster_in(tmp_path, EXAMPLE, portainer__enabled=True))
    return c, render_all(c)


@pytest.mark.skipif(not shutil.which("docker"), reason="needs the docker CLI")
@pytest.mark.parametrize("target", ["stack.yml", "stack.bootstrap.yml"])
def test_stack_file_is_valid_for_docker(rendered, target):
    c, _ = rendered
    r = subprocess.run(["docker", "stack", "config", "-c", str(render.build_dir(c) / target)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "services:" in r.stdout


def stack(c: Cluster, target: str = "stack.yml") -> dict:
    return yaml.safe_load((render.build_dir(c) / target).read_text())


def test_every_secret_reaches_its_consumer(rendered):
    c, texts = rendered
    s = stack(c)
    services = s["services"]

    def secrets_of(service):
        return {x if isinstance(x, str) else x["source"] for x in services[service]["secrets"]}

    for db in ("db", "db-seed"):
        assert {"db_root_password", "db_password", "galera_sst_password"} <= secrets_of(db)
        env = services[db]["environment"]
        for var in ("MARIADB_ROOT_PASSWORD_FILE", "MARIADB_PASSWORD_FILE",
                    "GALERA_SST_PASSWORD_FILE"):
            assert env[var].startswith("/run/secrets/")
    assert {"db_password", "mqtt_homeassistant"} <= secrets_of("homeassistant")
    assert "mosquitto_passwd" in secrets_of("mosquitto")
    # The HA entrypoint turns the db_password secret into the !secret used by the recorder.
    assert "/run/secrets/db_password" in texts["homeassistant/haswarm-entrypoint.sh"]
    assert "haswarm_recorder_db_url" in texts["homeassistant/haswarm-entrypoint.sh"]
    assert "!secret haswarm_recorder_db_url" in texts["homeassistant/packages/haswarm/haswarm.yaml"]
    # Every secret in the stack is an external object named after its content.
    objects = render.docker_objects(c)
    for key, (name, _) in objects["secrets"].items():
        assert s["secrets"][key] == {"external": True, "name": name}
    for key, (name, _) in objects["configs"].items():
        assert s["configs"][key] == {"external": True, "name": name}
    # Mosquitto: one hashed line per user, each verifying against its generated password.
    lines = dict(line.split(":", 1) for line in texts["mosquitto/passwd"].split())
    assert set(lines) == set(secrets.mqtt_users(c))
    for user, stored in lines.items():
        _, seven, iterations, salt, digest = stored.split("$")
        assert seven == "7"
        pw = secrets.read(c, f"mqtt_{user}").encode()
        dk = hashlib.pbkdf2_hmac("sha512", pw, base64.b64decode(salt), int(iterations))
        assert base64.b64encode(dk).decode() == digest


def test_no_secret_value_in_any_rendered_file_but_the_hashed_one(rendered):
    c, texts = rendered
    values = [secrets.read(c, n) for n in secrets.names(c)]
    for target, text in texts.items():
        if target == render.HEALTHCHECK_OPTIONS:  # a Docker secret's source, like secrets/
            continue
        for v in values:
            assert v not in text, f"a secret is in {target}"
    for private in ("mosquitto/passwd", render.HEALTHCHECK_OPTIONS):
        assert (render.build_dir(c) / private).stat().st_mode & 0o777 == 0o600
    hc = secrets.HEALTHCHECK_MQTT_USER
    options = [line for line in texts[render.HEALTHCHECK_OPTIONS].splitlines()
               if not line.startswith("#")]
    assert options == [f"-u {hc}", f"-P {secrets.read(c, f'mqtt_{hc}')}"]


def test_stack_shape(rendered):
    c, _ = rendered
    s, boot = stack(c), stack(c, "stack.bootstrap.yml")
    svc = s["services"]
    assert svc["db"]["deploy"]["placement"]["max_replicas_per_node"] == 1
    assert svc["db"]["deploy"]["replicas"] == len(c.nodes)
    ha = svc["homeassistant"]["deploy"]
    assert svc["homeassistant"]["working_dir"] == "/"  # off the Gluster mount (see the template)
    assert svc["db-seed"]["deploy"]["replicas"] == 0
    if c.ha_standby:  # host mode (the lab): a waiting HA on every node, one per node
        assert (ha["replicas"], ha["placement"]["max_replicas_per_node"]) == (len(c.nodes), 1)
    else:  # the routing mesh would reach the waiting ones too: one HA, moved by swarm
        assert ha["replicas"] == 1 and "placement" not in ha
    mq = svc["mosquitto"]
    assert mq["entrypoint"] == ["/bin/sh", "/haswarm-entrypoint.sh"]  # the lock, always
    if c.mqtt_standby:  # the same for the broker: its store is on the volume
        assert (mq["deploy"]["replicas"], mq["deploy"]["placement"]["max_replicas_per_node"]) \
            == (len(c.nodes), 1)
    else:
        assert mq["deploy"]["replicas"] == 1 and "placement" not in mq["deploy"]
    b = boot["services"]
    assert (b["db-seed"]["deploy"]["replicas"], b["db"]["deploy"]["replicas"],
            b["homeassistant"]["deploy"]["replicas"]) == (1, 0, 0)
    assert "ports" not in svc["db"] and "ports" not in svc["db-seed"]  # MariaDB stays inside
    assert svc["db"]["environment"]["GALERA_PEERS"] == "tasks.db-seed,tasks.db"
    for name, service in svc.items():
        assert "restart_policy" in service["deploy"], name
        if not name.startswith("portainer"):
            assert "healthcheck" in service, name
    mode = c.swarm.publish_mode
    for name in ("homeassistant", "mosquitto"):
        assert {p["mode"] for p in svc[name]["ports"]} == {mode}
        assert (svc[name]["deploy"].get("endpoint_mode") == "dnsrr") == (mode == "host")
    assert ("portainer" in svc) == c.portainer.enabled
    assert svc["homeassistant"]["volumes"][0]["source"] == f"{c.gluster.mount_point}/homeassistant"


def test_mosquitto_conf(rendered):
    c, texts = rendered
    conf = texts["mosquitto/mosquitto.conf"]
    assert "listener 1883 0.0.0.0" in conf and "allow_anonymous false" in conf
    assert f"autosave_interval {c.mqtt.autosave_interval}\n" in conf
    assert "persistence_location /mosquitto/store/" in conf
    assert "\nacl_file /mosquitto/config/acl\n" in conf
    mosquitto = stack(c)["services"]["mosquitto"]
    assert {"source": "mosquitto_acl", "target": "/mosquitto/config/acl", "mode": 0o444} in \
        mosquitto["configs"]


def acl_allows(acl: str, user: str, access: str, topic: str) -> bool:
    """Whether Mosquitto's ACL file `acl` lets `user` `access` ("read"/"write") `topic`: the
    rules under `user USER` lines, topic filters matched as MQTT does (paho's matcher: `#` does
    not match `$SYS/...`)."""
    from paho.mqtt.client import topic_matches_sub

    current = None
    for line in acl.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            current = words[1]
        elif words[0] == "topic" and current == user:
            rule_access, pattern = (words[1], words[2]) if len(words) == 3 else ("readwrite",
                                                                              words[1])
            if access in rule_access and topic_matches_sub(pattern, topic):
                return True
    return False


def test_mosquitto_acl_gives_each_user_its_own_topics(tmp_path):
    c = load_cluster(cluster_in(tmp_path, mqtt__users=["homeassistant", "sensors", "garage"]))
    acl = render_all(c)["mosquitto/acl"]

    def may(user: str, access: str, topic: str) -> bool:
        return acl_allows(acl, user, access, topic)

    # Home Assistant: everything
    for topic in ("homeassistant/switch/garage/door/config", "sensors/kitchen/relay/command",
                  "zigbee2mqtt/bridge/request"):
        assert may("homeassistant", "write", topic) and may("homeassistant", "read", topic)
    # a device user: its own tree, sensor discovery, HA's status
    assert may("sensors", "write", "sensors/kitchen/sensor/temperature/state")
    assert may("sensors", "read", "sensors/kitchen/switch/relay/command")
    for topic in ("homeassistant/sensor/kitchen/temperature/config",
                  "homeassistant/sensor/temperature/config",
                  "homeassistant/binary_sensor/hall/motion/config"):
        assert may("sensors", "write", topic), topic
    assert may("sensors", "read", "homeassistant/status")
    # ... and nothing else: the attack of issue 14 (a switch announced by a sensor login)
    for topic in ("homeassistant/switch/kitchen/relay/config",
                  "homeassistant/light/hall/config", "homeassistant/lock/front/door/config",
                  "homeassistant/sensor/kitchen/temperature/state", "homeassistant/status",
                  "garage/door/cover/command", "$SYS/broker/uptime", "zigbee2mqtt/x/set"):
        assert not may("sensors", "write", topic), topic
    assert not may("sensors", "read", "garage/door/state")
    assert not may("garage", "write", "sensors/kitchen/sensor/temperature/state")
    # the healthcheck: the broker's uptime, read only
    assert may(secrets.HEALTHCHECK_MQTT_USER, "read", "$SYS/broker/uptime")
    assert not may(secrets.HEALTHCHECK_MQTT_USER, "write", "$SYS/broker/uptime")
    assert not may(secrets.HEALTHCHECK_MQTT_USER, "read", "homeassistant/status")
    # no rules for anyone unnamed (anonymous logins are refused anyway)
    assert acl.split("\nuser ")[0].count("\ntopic") == 0
    users = [line.split()[1] for line in acl.splitlines() if line.startswith("user ")]
    assert users == ["homeassistant", "sensors", "garage", secrets.HEALTHCHECK_MQTT_USER]


def test_node_files(rendered):
    c, texts = rendered
    for node in c.nodes:
        line = texts[f"nodes/{node.name}/fstab"].strip()
        others = ":".join(n.address for n in c.nodes if n is not node)
        assert line == (f"localhost:/{c.gluster.volume} {c.gluster.mount_point} glusterfs "
                        "defaults,_netdev,x-systemd.requires=glusterd.service,"
                        f"backup-volfile-servers={others} 0 0")
    assert re.search(r"^\* \* \* \* \* root .*avahi", texts["avahi-restart.cron"], re.M)
    assert "innodb_buffer_pool_size = " + c.galera.buffer_pool in texts["galera.cnf"]


def test_secrets_are_generated_once_0600_and_strong(tmp_path):
    c = load_cluster(cluster_in(tmp_path))
    made = secrets.ensure(c)
    assert set(made) == set(secrets.generated(c))
    before = {n: secrets.read(c, n) for n in made}
    assert secrets.ensure(c) == []
    assert {n: secrets.read(c, n) for n in made} == before
    assert len(set(before.values())) == len(before)
    for n in made:
        assert secrets.path(c, n).stat().st_mode & 0o777 == 0o600
        assert len(base64.urlsafe_b64decode(before[n] + "=")) * 8 >= 128
    assert secrets.directory(c).stat().st_mode & 0o777 == 0o700


def doit(tmp_path: Path, cfg: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "doit", "--db-file", str(tmp_path / "doit.db"),
                        f"config={cfg}", *args], cwd=PROJECT_ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def ran(output: str) -> set[str]:
    return {line[3:].strip() for line in output.splitlines() if line.startswith(".  ")}


def test_up_to_date_and_only_what_depends_on_a_value_re_renders(tmp_path):
    cfg = cluster_in(tmp_path)
    first = doit(tmp_path, cfg, "render")
    assert "render:stack.yml" in ran(first) and "secrets" in ran(first)
    assert ran(doit(tmp_path, cfg, "render")) == set()  # all up to date
    cluster_in(tmp_path, mqtt__autosave_interval=7)
    again = ran(doit(tmp_path, cfg, "render"))
    assert again == {"render:mosquitto/mosquitto.conf", "render:stack.yml",
                     "render:stack.bootstrap.yml"}
    cluster_in(tmp_path, galera__buffer_pool="48M")  # autosave back to 5, buffer pool changed
    assert "render:nodes/pi1/fstab" not in ran(doit(tmp_path, cfg, "render"))
    # a file overwritten behind doit's back (a run for another cluster file killed before doit
    # saved its stamps, an edit by hand) is rendered again
    stack = tmp_path / "build" / "stack.yml"
    stack.write_text(stack.read_text().replace("replicas: 3", "replicas: 5"))
    assert ran(doit(tmp_path, cfg, "render")) == {"render:stack.yml"}
    assert "replicas: 5" not in stack.read_text()


def test_the_lock_keeper_fences_before_the_bricks_release_its_lock(rendered):
    """A cut-off node's HA must be gone before the bricks drop it and another HA takes the lock;
    a peer's death (writes wait the ping timeout) must not fence."""
    from tasks.gluster_plans import server_keepalive

    c, _ = rendered
    hang = render.lock_hang(c)
    k = server_keepalive(render.client_drop(c))
    dropped = int(k["server.keepalive-time"]) + int(k["server.keepalive-count"])
    fenced = render.ISOLATED_AFTER + 1.5  # a probe's timeout, the watchdog's period
    assert dropped == render.client_drop(c) >= fenced + 2
    assert int(k["server.tcp-user-timeout"]) == dropped
    assert hang >= c.gluster.ping_timeout + 2  # a peer's death does not fence
    env = stack(c)["services"]["homeassistant"]["environment"]
    assert int(env["HASWARM_LOCK_HANG"]) == render.lock_hang_probed(c) > hang
    mq = stack(c)["services"]["mosquitto"].get("environment")
    if mq:  # the standby's keeper (not with ingress)
        assert mq["HASWARM_LOCK_HANG"] == str(hang)
        assert mq["HASWARM_LOCK_HANG_PROBED"] == env["HASWARM_LOCK_HANG"]
        assert mq["HASWARM_MEMBERS"] == env["HASWARM_MEMBERS"]
    assert env["HASWARM_MEMBERS"] == MEMBERS_FILE
    assert env["HASWARM_ISOLATED_AFTER"] == str(render.ISOLATED_AFTER)


def test_no_service_spec_names_the_nodes(rendered):
    """A node added or removed must change no service's spec (that would restart every Home
    Assistant, broker and Galera member): the node list reaches them as a file on each node,
    mounted read-only, which they read while they run."""
    c, _ = rendered
    text = (render.build_dir(c) / "stack.yml").read_text()
    for n in c.nodes:
        assert n.address not in text
    assert "GALERA_EXPECTED_NODES:" not in text and "HASWARM_NODES" not in text
    services = stack(c)["services"]
    for name in ("homeassistant", "mosquitto", "db", "db-seed"):
        mounts = services[name]["volumes"]
        assert {"type": "bind", "source": MEMBERS_DIR, "target": MEMBERS_DIR,
                "read_only": True} in mounts, name
    assert services["db"]["environment"]["GALERA_EXPECTED_NODES_FILE"] == MEMBERS_FILE
    assert members_text(c).split() == [n.address for n in c.nodes]


def test_a_secret_in_use_is_never_made_again(tmp_path):
    c = load_cluster(cluster_in(tmp_path))
    secrets.ensure(c)
    record = secrets.directory(c) / secrets.FINGERPRINTS
    assert record.stat().st_mode & 0o777 == 0o600
    assert set(secrets.recorded(c)) == set(secrets.generated(c)) and secrets.as_recorded(c)
    values = {n: secrets.read(c, n) for n in secrets.names(c)}
    assert not any(v in record.read_text() for v in values.values()), "no secret in the record"

    secrets.path(c, "db_password").unlink()  # "delete it to have a new one made": no more
    assert not secrets.as_recorded(c)
    with pytest.raises(secrets.SecretLost) as e:
        secrets.ensure(c)
    msg = str(e.value)
    assert msg.startswith(f"db_password: {secrets.path(c, 'db_password')} is missing, but this "
                          "cluster has used it")
    assert "the database keeps its users' old passwords" in msg
    assert "restore" in msg and "rotate-secrets" in msg
    assert not secrets.path(c, "db_password").exists(), "nothing was made"

    secrets.path(c, "db_password").write_text(values["db_password"] + "\n")  # from a backup
    secrets.path(c, "mqtt_homeassistant").write_text("another\n")
    with pytest.raises(secrets.SecretLost, match="mqtt_homeassistant: .* holds another value.*"
                                                  "Mosquitto's user 'homeassistant'"):
        secrets.ensure(c)
    secrets.path(c, "mqtt_homeassistant").write_text(values["mqtt_homeassistant"] + "\n")
    assert secrets.ensure(c) == [] and secrets.as_recorded(c)


def test_a_new_user_gets_a_secret_and_the_way_out_for_a_fresh_start(tmp_path):
    c = load_cluster(cluster_in(tmp_path))
    secrets.ensure(c)
    more = c.model_copy(update={"mqtt": c.mqtt.model_copy(
        update={"users": [*c.mqtt.users, "garage"]})})
    assert secrets.ensure(more) == ["mqtt_garage"], "a secret never made before is made"
    # the data is gone for good: delete the record's line, and a new one is made
    old = secrets.read(c, "db_root_password")
    secrets.path(c, "db_root_password").unlink()
    record = secrets.directory(c) / secrets.FINGERPRINTS
    record.write_text("".join(line + "\n" for line in record.read_text().splitlines()
                              if not line.startswith("db_root_password ")))
    assert secrets.ensure(c) == ["db_root_password"] and secrets.read(c, "db_root_password") != old


def test_secrets_made_before_the_record_existed_are_adopted(tmp_path):
    c = load_cluster(cluster_in(tmp_path))
    secrets.ensure(c)
    (secrets.directory(c) / secrets.FINGERPRINTS).unlink()  # as an older haswarm left them
    assert secrets.ensure(c) == [] and secrets.as_recorded(c)
    secrets.path(c, "galera_sst_password").unlink()
    with pytest.raises(secrets.SecretLost, match="galera_sst_password: .* is missing"):
        secrets.ensure(c)


def test_the_secrets_task_fails_naming_the_lost_secret(tmp_path, monkeypatch):
    c = load_cluster(cluster_in(tmp_path))
    secrets.ensure(c)
    secrets.path(c, "db_password").unlink()
    monkeypatch.setattr("tasks.config.current", lambda: c)
    task = secrets.task_secrets()
    assert task["uptodate"][0]() is False
    failed = task["actions"][0]()
    assert failed is not None and "secrets: db_password: " in str(failed)


def _fake_broker() -> tuple[socket.socket, dict[str, str]]:
    """A listening socket on 127.0.0.1 that answers one MQTT CONNECT with CONNACK 5 (not
    authorized) and records the login it carried: {'user': ..., 'password': ...}."""
    server = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, str] = {}

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            data = conn.recv(4096)
            i, length, shift = 1, 0, 0
            while True:  # remaining length (varint)
                length |= (data[i] & 0x7F) << shift
                shift += 7
                i += 1
                if not data[i - 1] & 0x80:
                    break

            def string(at: int) -> tuple[str, int]:
                n = int.from_bytes(data[at:at + 2], "big")
                return data[at + 2:at + 2 + n].decode(), at + 2 + n

            _, at = string(i)  # protocol name
            flags = data[at + 1]
            _, at = string(at + 4)  # client id
            if flags & 0x80:
                seen["user"], at = string(at)
            if flags & 0x40:
                seen["password"], at = string(at)
            conn.sendall(bytes([0x20, 2, 0, 5]))

    threading.Thread(target=serve, daemon=True).start()
    return server, seen


@pytest.mark.skipif(not shutil.which("mosquitto_sub"), reason="needs mosquitto-clients")
def test_mosquitto_healthcheck_logs_in_with_no_secret_in_argv(tmp_path):
    """The stack's healthcheck command, run here against a stand-in broker: mosquitto_sub takes
    the login from the options file (the Docker secret), and the command line holds none."""
    c = load_cluster(cluster_in(tmp_path))
    render_all(c)
    hc = secrets.HEALTHCHECK_MQTT_USER
    password = secrets.read(c, f"mqtt_{hc}")
    mq = stack(c)["services"]["mosquitto"]
    assert {"source": "mqtt_healthcheck_options", "target": "mosquitto_sub", "uid": "1883",
            "gid": "1883", "mode": 0o400} in mq["secrets"]
    kind, command = mq["healthcheck"]["test"]
    assert kind == "CMD-SHELL" and password not in command and " -P " not in command
    run_secrets = tmp_path / "run-secrets"
    run_secrets.mkdir()
    (run_secrets / "mosquitto_sub").write_bytes(
        (render.build_dir(c) / render.HEALTHCHECK_OPTIONS).read_bytes())
    ready = tmp_path / "lock.ready"
    ready.touch()
    server, seen = _fake_broker()
    port = server.getsockname()[1]
    here = (command.replace("$$", "$").replace("/run/secrets", str(run_secrets))
            .replace(render.HA_LOCK_READY, str(ready)).replace("-p 1883", f"-p {port}"))
    res = subprocess.run(["sh", "-c", here], capture_output=True, text=True, timeout=20)
    server.close()
    assert res.returncode != 0, "CONNACK 5: not authorized, so unhealthy"
    assert seen == {"user": hc, "password": password}


def _run_lock_wait(texts: dict[str, str], lock: Path, wait: int) -> str:
    """The entrypoint's wait for Home Assistant's own run lock, pointed at `lock`."""
    script = texts["homeassistant/haswarm-entrypoint.sh"]
    blocks = [b.split("\nPY\n", 1)[0] for b in script.split("<<'PY'\n")[1:]]
    [block] = [b for b in blocks if "/config/.ha_run.lock" in b]
    block = block.replace("/config/.ha_run.lock", str(lock))
    return block.replace(f"+ {render.HA_RUN_LOCK_WAIT_SECONDS},", f"+ {wait},")


def test_entrypoint_waits_for_home_assistants_own_run_lock(tmp_path):
    """HA 2025.x+ exits 1 when /config/.ha_run.lock is flocked: the entrypoint waits for a
    predecessor's to go (and gives up, naming the holder, after the deadline)."""
    import fcntl
    import time

    c = load_cluster(cluster_in(tmp_path))
    texts = render_all(c)
    lock = tmp_path / ".ha_run.lock"
    assert "/config/.ha_run.lock" in texts["homeassistant/haswarm-entrypoint.sh"]
    # free: goes on at once, and leaves the file unlocked
    proc = subprocess.run([sys.executable, "-c", _run_lock_wait(texts, lock, 5)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    # held by a predecessor that goes away after ~1 s
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write('{"pid": 4242, "ha_version": "2026.2.3"}')
        held.flush()
        t0 = time.monotonic()
        waiter = subprocess.Popen([sys.executable, "-c", _run_lock_wait(texts, lock, 30)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert waiter.poll() is None  # still waiting
    out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 0, err
    assert 1.0 <= time.monotonic() - t0 < 10
    assert "waiting for Home Assistant's own run lock" in out and "4242" in out
    # held for good: gives up after the deadline, naming the holder
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.run([sys.executable, "-c", _run_lock_wait(texts, lock, 1)],
                              capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "still held" in proc.stderr and "4242" in proc.stderr and "swarm retries" in proc.stderr


def test_portainer_is_https_only_with_a_generated_admin_password(tmp_path):
    c = load_cluster(cluster_in(tmp_path, EXAMPLE, portainer__enabled=True))
    render_all(c)
    portainer = stack(c)["services"]["portainer"]
    cmd = portainer["command"]
    assert "--http-disabled" in cmd
    assert cmd[cmd.index("--admin-password-file") + 1] == \
        "/run/secrets/portainer_admin_password"
    assert portainer["ports"][0]["target"] == 9443 and portainer["ports"][0]["published"] == 9443
    assert [s["source"] for s in portainer["secrets"]] == [secrets.PORTAINER_ADMIN_PASSWORD]
    assert secrets.path(c, secrets.PORTAINER_ADMIN_PASSWORD).stat().st_mode & 0o777 == 0o600
    off = load_cluster(cluster_in(tmp_path))
    assert secrets.PORTAINER_ADMIN_PASSWORD not in secrets.names(off)


def test_only_a_host_published_home_assistant_watches_its_broker(rendered):
    """With host publishing HA's MQTT client talks to the broker container's own address, which
    its keeper probes (and ends the connections to when it went silent: NET_ADMIN); behind the
    routing mesh the address is a virtual one that answers nothing else: no watch."""
    c, _ = rendered
    ha = stack(c)["services"]["homeassistant"]
    if c.swarm.publish_mode == "host":
        assert ha["cap_add"] == ["NET_ADMIN"]
        assert ha["environment"]["HASWARM_MQTT_PORT"] == "1883"
    else:
        assert "cap_add" not in ha and "HASWARM_MQTT_PORT" not in ha["environment"]
