"""`doit backup` and `doit restore` on the lab (issue 15): a row in Galera, a file in Home
Assistant's config on the volume and a retained MQTT message are backed up; `doit purge=yes
clean` removes the stack, its database volumes and the swarm, the file and Mosquitto's store
are deleted, `doit setup` bootstraps a fresh cluster (the row is gone); `doit restore` brings
all three back, on every node, and Home Assistant's recorder writes again through the restored
token. A damaged archive and a file that is no archive are refused, touching nothing."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import pytest

from tasks import secrets
from tasks.config import PROJECT_ROOT

from .conftest import doit
from .test_onboard import ha
from .test_stack import (
    TEST_DB,
    broker,
    db_size,
    mqtt_connect,
    stack_leftovers,
    volumes,
)

pytestmark = pytest.mark.lab

FILE = "haswarm-backup-test.txt"  # in Home Assistant's config dir on the volume
ENTITY = "sensor.haswarm_backup_test"


def say(msg: str) -> None:
    print(f"  [backup] {msg}", flush=True)


def retained(c, topic: str, timeout: float = 10) -> list[str]:
    """The retained payloads of `topic` the broker hands a new subscriber."""
    password = secrets.read(c, "mqtt_homeassistant")
    client, rc = mqtt_connect(broker(c), c.mqtt.port, "homeassistant", password)
    assert client is not None, rc
    got: list[str] = []
    client.on_message = lambda cl, ud, msg: got.append(msg.payload.decode())
    client.subscribe(topic, qos=1)
    deadline = time.monotonic() + timeout
    while not got and time.monotonic() < deadline:
        time.sleep(0.1)
    client.loop_stop()
    client.disconnect()
    return got


def publish_retained(c, topic: str, payload: str) -> None:
    password = secrets.read(c, "mqtt_homeassistant")
    client, rc = mqtt_connect(broker(c), c.mqtt.port, "homeassistant", password)
    assert client is not None, rc
    client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()


def write_row(tools, node: str, cid: str, token: str) -> None:
    """A row holding `token` in TEST_DB.t (created when missing), through db container `cid`."""
    tools.sql(node, cid, f"CREATE DATABASE IF NOT EXISTS {TEST_DB}; CREATE TABLE IF NOT EXISTS "
                         f"{TEST_DB}.t (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(64)); "
                         f"INSERT INTO {TEST_DB}.t (v) VALUES ('{token}');")


def rows(tools, token: str) -> dict[str, list[str]]:
    """The test row as every db member sees it."""
    return {node: tools.sql(node, cid, f"SELECT v FROM {TEST_DB}.t WHERE v = '{token}';").split()
            for node, cid in tools.containers("db").items()}


def test_backup_purge_setup_restore_brings_everything_back(lab, cluster, tools, deployed,
                                                            capsys):
    c, token = cluster, uuid.uuid4().hex
    ha_dir = f"{c.gluster.mount_point}/homeassistant"
    topic = f"haswarm/test/backup-{token[:8]}"
    node, cid = next(iter(tools.containers("db").items()))
    write_row(tools, node, cid, token)
    tools.sh("pi1", f"echo {token} > {ha_dir}/{FILE}")
    publish_retained(c, topic, token)
    time.sleep(c.mqtt.autosave_interval + 2)  # in Mosquitto's store on the volume

    backup = doit("backup")
    assert backup.ok, backup.output[-4000:]
    m = re.search(r"wrote (\S+\.tar\.gz) \(([\d.]+ \w+)\)", backup.output)
    assert m, backup.output[-2000:]
    archive = Path(m[1])
    assert archive.stat().st_mode & 0o777 == 0o600

    # Refused before any node is touched: no archive at all, a damaged one.
    damaged = PROJECT_ROOT / "backups" / "damaged.tar.gz"
    damaged.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    try:
        for bad in (Path("/etc/hostname"), damaged):
            run = doit("restore", f"backup={bad}", "yes=1")
            assert not run.ok and str(bad.name) in run.output, run.output[-2000:]
            assert "stop homeassistant" not in run.output, run.output[-2000:]
    finally:
        damaged.unlink()

    purge = tools.clean(purge=True)
    assert purge.ok, purge.output[-3000:]
    assert stack_leftovers(lab, c) == {} and volumes(lab, c) == []
    tools.sh("pi1", f"rm -f {ha_dir}/{FILE} {c.gluster.mount_point}/mosquitto/data/mosquitto.db")
    fresh = tools.setup()
    assert fresh.ok and "fresh cluster" in fresh.output, fresh.output[-4000:]
    node, cid = next(iter(tools.containers("db").items()))
    assert TEST_DB not in tools.sql(node, cid, "SHOW DATABASES;").split()
    assert retained(c, topic, timeout=3) == []

    restore = doit("restore", f"backup={archive}", "yes=1")
    assert restore.ok, restore.output[-4000:]
    assert rows(tools, token) == {n: [token] for n in ("pi1", "pi2", "pi3")}
    assert db_size(tools, node, cid) == 3
    brick = f"{c.gluster.brick_dir}/homeassistant/{FILE}"
    assert tools.sh("pi3", f"cat {brick}").strip() == token, "the file is not on pi3's brick"
    assert retained(c, topic) == [token]

    # Home Assistant answers with the restored token, and its recorder writes again.
    api = ha(c)
    code, _ = api.call("POST", f"/api/states/{ENTITY}", token=secrets.ha_token(c),
                       body={"state": token[:8]})
    assert code in (200, 201), code
    deadline = time.monotonic() + 60
    while True:
        found = tools.sql(node, cid, "SELECT s.state FROM homeassistant.states s JOIN "
                          "homeassistant.states_meta m ON s.metadata_id = m.metadata_id "
                          f"WHERE m.entity_id = '{ENTITY}';").split()
        if token[:8] in found:
            break
        assert time.monotonic() < deadline, "the recorder wrote nothing after the restore"
        time.sleep(2)
    publish_retained(c, topic, "")  # clean up
    tools.sh("pi1", f"rm -f {ha_dir}/{FILE}")
    with capsys.disabled():
        print(f"\n[backup] backup {m[2]} in {backup.seconds:.1f} s; clean purge=yes "
              f"{purge.seconds:.1f} s; setup {fresh.seconds:.1f} s; restore "
              f"{restore.seconds:.1f} s")
