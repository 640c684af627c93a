"""End to end on the lab: the stack deployed by `doit setup` (fixture `deployed`, once), then
Home Assistant, Galera, Mosquitto, secrets, a no-op re-run, and clean + setup again (the data
kept by clean is recovered without a seed). Wall times are printed (`pytest -s`)."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from tasks import secrets, stack_observe
from tasks.mqtt_probe import mqtt_connack
from tasks.remote import Remote

pytestmark = pytest.mark.lab

TEST_DB = "haswarm_lab_test"


def secret_values(c) -> dict[str, str]:
    return {p.name: p.read_text().strip() for p in sorted(secrets.directory(c).iterdir())
            if p.is_file()}


def db_size(tools, node: str, cid: str) -> int:
    out = tools.sql(node, cid, "SHOW GLOBAL STATUS LIKE 'wsrep_cluster_size';")
    return int(out.split()[1])


def broker(c, timeout: float = 60) -> str:
    """The address of the node where a broker answers MQTT (host publish mode: one node; with
    standby, Docker accepts TCP on every node, but only the lock holder's broker answers)."""
    deadline = time.monotonic() + timeout
    while True:
        for n in c.nodes:
            if mqtt_connack(n.address, c.mqtt.port, timeout=1) is not None:
                return n.address
        if time.monotonic() > deadline:
            raise AssertionError(f"no node accepts MQTT on port {c.mqtt.port}")
        time.sleep(1)


def mqtt_connect(address: str, port: int, user: str | None = None, password: str | None = None):
    """Connect with paho-mqtt; (client or None, reason code as a string)."""
    import paho.mqtt.client as mqtt

    result: dict[str, str] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}")
    if user:
        client.username_pw_set(user, password)
    client.on_connect = lambda cl, ud, flags, rc, props: result.setdefault("rc", str(rc))
    client.connect(address, port, keepalive=10)
    client.loop_start()
    deadline = time.monotonic() + 10
    while "rc" not in result and time.monotonic() < deadline:
        time.sleep(0.05)
    rc = result.get("rc", "timeout")
    if rc != "Success":
        client.loop_stop()
        client.disconnect()
        return None, rc
    return client, rc


# ---------------------------------------------------------------------------------------------


def test_setup_converges(deployed):
    print(f"\n[stack] {deployed.how}: {deployed.seconds:.1f} s")
    assert deployed.ok
    assert "galera:" in deployed.output


def test_homeassistant_answers_http(cluster, deployed):
    node, status = stack_observe.probe_http(cluster, cluster.homeassistant.port, timeout=60)
    assert status < 500
    print(f"\n[stack] Home Assistant answers {status} on {node}:{cluster.homeassistant.port}")


def test_galera_has_three_members_and_no_seed(tools, deployed):
    dbs = tools.containers("db")
    assert sorted(dbs) == ["pi1", "pi2", "pi3"]
    for node, cid in dbs.items():
        assert db_size(tools, node, cid) == 3
        status = tools.sh(node, f"docker exec {cid} /usr/local/bin/galera-status")
        assert "local_state=Synced" in status and "cluster_status=Primary" in status
    assert tools.containers("db-seed") == {}


def test_rows_written_on_one_node_are_read_on_another(tools, deployed):
    dbs = list(tools.containers("db").items())
    (n1, c1), (n2, c2) = dbs[0], dbs[1]
    token = uuid.uuid4().hex
    tools.sql(n1, c1, f"CREATE DATABASE IF NOT EXISTS {TEST_DB}; "
                      f"CREATE TABLE IF NOT EXISTS {TEST_DB}.t (id INT AUTO_INCREMENT PRIMARY "
                      f"KEY, v VARCHAR(64)); INSERT INTO {TEST_DB}.t (v) VALUES ('{token}');")
    out = tools.sql(n2, c2, f"SET SESSION wsrep_sync_wait = 1; "
                            f"SELECT v FROM {TEST_DB}.t WHERE v = '{token}';")
    assert out.split() == [token]


def test_recorder_tables_exist(tools, deployed):
    node, cid = next(iter(tools.containers("db").items()))
    deadline = time.monotonic() + 180
    while True:
        tables = set(tools.sql(node, cid, "SHOW TABLES FROM homeassistant;").split())
        if {"states", "events", "recorder_runs", "schema_changes"} <= tables:
            break
        assert time.monotonic() < deadline, f"recorder tables missing; have {sorted(tables)}"
        time.sleep(3)


def test_mosquitto_refuses_anonymous_accepts_homeassistant(cluster, deployed):
    address = broker(cluster)
    client, rc = mqtt_connect(address, cluster.mqtt.port)
    assert client is None and rc == "Not authorized", rc
    client, rc = mqtt_connect(address, cluster.mqtt.port, "homeassistant", "wrong-password")
    assert client is None, rc
    password = secrets.read(cluster, "mqtt_homeassistant")
    client, rc = mqtt_connect(address, cluster.mqtt.port, "homeassistant", password)
    assert client is not None, rc
    client.loop_stop()
    client.disconnect()


def test_retained_message_survives_forced_update(cluster, deployed):
    password = secrets.read(cluster, "mqtt_homeassistant")
    topic, payload = f"haswarm/test/{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    client, rc = mqtt_connect(broker(cluster), cluster.mqtt.port, "homeassistant", password)
    assert client is not None, rc
    client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()

    with Remote(cluster) as r:
        manager = stack_observe.find_manager(r, cluster)
        r.run(manager, "test: force update",
              f"docker service update --force --detach {cluster.name}_mosquitto")
        time.sleep(2)
        stack_observe.wait_for(r, cluster, manager, "test: mosquitto",
                       lambda s: s.problems({"mosquitto": len(cluster.nodes)
                                             if cluster.mqtt_standby else 1}, 3), timeout=120)

    got: list[str] = []
    client, rc = mqtt_connect(broker(cluster), cluster.mqtt.port, "homeassistant", password)
    assert client is not None, rc
    client.on_message = lambda cl, ud, msg: got.append(msg.payload.decode())
    client.subscribe(topic, qos=1)
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.1)
    client.unsubscribe(topic)
    client.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)  # clear it
    client.loop_stop()
    client.disconnect()
    assert got[:1] == [payload], got


def test_setup_prints_no_secret(cluster, deployed):
    leaked = [name for name, value in secret_values(cluster).items()
              if value and value in deployed.output]
    assert leaked == [], f"setup output contains the secret(s) {leaked}"


# For each file: "MODE REACHABLE PATH", REACHABLE = 1 when every parent directory lets any
# user through (o+x), so a world-readable mode really exposes the file.
_EXPOSURE = r"""
while IFS= read -r f; do
  [ "$f" = /tmp/.haswarm-test-patterns ] && continue
  m=$(stat -L -c %a "$f") || continue; ok=1; d=$(dirname "$f")
  while [ "$d" != / ]; do
    dm=$(stat -L -c %a "$d"); [ $(( 0$dm & 1 )) -eq 0 ] && ok=0; d=$(dirname "$d")
  done
  echo "$m $ok $f"
done
"""


def test_no_secret_file_is_world_readable_on_any_node(lab, cluster, tools, deployed):
    values = "\n".join(v for v in secret_values(cluster).values() if v) + "\n"
    scope = ("/mnt/haswarm /srv /etc /root /tmp /run /var/lib/docker/containers "
             "/var/lib/docker/swarm /var/lib/docker/volumes")
    found: dict[str, list[str]] = {}
    for name in lab.names:
        uppers = tools.sh(name, "for c in $(docker ps -q --filter label=com.docker.stack."
                                f"namespace={cluster.name}); do docker inspect --format "
                                "'{{.GraphDriver.Data.UpperDir}}' $c; done").split()
        out = tools.sh(name, "cat > /tmp/.haswarm-test-patterns; "
                             f"grep -rlsIF -f /tmp/.haswarm-test-patterns {scope} "
                             f"{' '.join(uppers)} 2>/dev/null | {_EXPOSURE}; "
                             "rm -f /tmp/.haswarm-test-patterns", input=values, check=False)
        found[name] = [line for line in out.splitlines() if line.strip()]
    print("\n[stack] files holding a secret value (mode, reachable by all, path):\n"
          + json.dumps(found, indent=1))
    world = [f"{n}: {line}" for n, lines in found.items() for line in lines
             if int(line.split()[0], 8) & 0o004 and line.split()[1] == "1"]
    assert world == [], "world-readable files hold secrets:\n" + "\n".join(world)


def service_versions(tools, c) -> dict[str, int]:
    out = tools.sh("pi1", "docker service inspect --format '{{.Spec.Name}} {{.Version.Index}}' "
                          f"$(docker service ls -q --filter label=com.docker.stack.namespace="
                          f"{c.name})")
    return {line.split()[0]: int(line.split()[1]) for line in out.splitlines() if line.strip()}


def test_second_setup_changes_nothing(cluster, tools, deployed):
    before = service_versions(tools, cluster)
    run = tools.setup()
    print(f"\n[stack] second setup ({run.how}): {run.seconds:.1f} s")
    assert run.ok, run.output[-3000:]
    # every step asks the nodes again (they are the truth) and finds nothing to change
    assert "no bootstrap" in run.output and "stack: nothing to do" in run.output
    assert service_versions(tools, cluster) == before


def stack_leftovers(lab, c) -> dict[str, str]:
    out = {}
    for name in lab.names:
        left = lab.exec(name, f"docker ps -aq --filter label=com.docker.stack.namespace={c.name}; "
                              f"docker network ls -q --filter label=com.docker.stack.namespace="
                              f"{c.name}; docker info --format '{{{{.Swarm.LocalNodeState}}}}'"
                        ).stdout.split()
        if left != ["inactive"]:
            out[name] = " ".join(left)
    return out


def volumes(lab, c) -> list[str]:
    return [name for name in lab.names
            if lab.exec(name, f"docker volume inspect {c.name}_db-data", check=False)
            .returncode == 0]


def test_clean_keeps_data_and_setup_again_recovers_it(lab, cluster, tools, deployed):
    dbs = list(tools.containers("db").items())
    token = uuid.uuid4().hex
    tools.sql(*dbs[0], f"CREATE DATABASE IF NOT EXISTS {TEST_DB}; CREATE TABLE IF NOT EXISTS "
                       f"{TEST_DB}.t (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(64)); "
                       f"INSERT INTO {TEST_DB}.t (v) VALUES ('{token}');")

    dry = tools.clean(dryrun=True)
    assert dry.ok and tools.containers("db"), "a dry run removed something"

    run = tools.clean()
    print(f"\n[stack] clean ({run.how}): {run.seconds:.1f} s")
    assert run.ok, run.output[-3000:]
    assert stack_leftovers(lab, cluster) == {}
    assert volumes(lab, cluster) == ["pi1", "pi2", "pi3"], "clean without purge lost the data"
    again = tools.clean()
    assert again.ok, again.output[-3000:]

    run = tools.setup()
    print(f"[stack] setup after clean, data kept ({run.how}): {run.seconds:.1f} s")
    assert run.ok, run.output[-4000:]
    assert "hold data" in run.output and "deploy stack.bootstrap.yml" not in run.output
    dbs = tools.containers("db")
    assert sorted(dbs) == ["pi1", "pi2", "pi3"]
    node, cid = next(iter(dbs.items()))
    assert db_size(tools, node, cid) == 3
    out = tools.sql(node, cid, f"SELECT v FROM {TEST_DB}.t WHERE v = '{token}';")
    assert out.split() == [token], "the row written before clean is gone"
