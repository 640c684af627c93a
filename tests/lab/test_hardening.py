"""A stranger on the home LAN (lab/stranger.py: a host on the lab bridge that is not a node)
tries what a hostile guest device would, against the deployed cluster. Each attempt must fail,
while the same thing from a node, or as the configured user, works (so a test never passes only
because the service was down)."""

from __future__ import annotations

import shlex
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lab.stranger import Stranger
from tasks import secrets

from .conftest import doit
from .test_stack import broker

pytestmark = pytest.mark.lab

# Galera and the Docker API (never published), swarm management and gossip, glusterd (behind the
# firewall).
CLOSED_PORTS = (3306, 4444, 4567, 4568, 2375, 2376, 2377, 7946, 24007, 24008)


@pytest.fixture(scope="module")
def stranger(lab, deployed):
    with Stranger(lab) as s:
        reach = s.run(f"nc -z -w 2 {lab.nodes[0].address} 22")
        assert reach.returncode == 0, f"the stranger cannot reach the LAN:\n{reach.stdout}"
        yield s


def test_stranger_cannot_mount_the_volume(stranger, cluster, tools):
    node = cluster.nodes[0]
    target = f"/run/haswarm-stranger-mnt-{cluster.gluster.volume}"
    volume = f"{node.address}:/{cluster.gluster.volume}"
    try:
        got = stranger.run(f"mkdir -p {target} && timeout 30 mount -t glusterfs {volume} {target}"
                           f" && ls {target}", timeout=60)
    finally:
        stranger.run(f"umount -l {target} 2>/dev/null; rmdir {target}")
    assert got.returncode != 0, f"the stranger mounted {volume}:\n{got.stdout}"
    assert "homeassistant" not in got.stdout
    # The nodes themselves still use it.
    listing = tools.sh(node.name, f"ls {shlex.quote(str(cluster.gluster.mount_point))}")
    assert "homeassistant" in listing.split()


@pytest.mark.parametrize("port", CLOSED_PORTS)
def test_stranger_reaches_no_internal_port(stranger, cluster, port):
    for n in cluster.nodes:
        got = stranger.run(f"nc -z -w 2 {n.address} {port}")
        assert got.returncode != 0, f"the stranger connected to {n.name}:{port}"


def test_stranger_cannot_log_in_to_mqtt_anonymously(stranger, cluster):
    address = broker(cluster)
    got = stranger.run(f"mosquitto_pub -h {address} -p {cluster.mqtt.port} -t probe -m x "
                       "-q 1 -i stranger-anon", timeout=30)
    assert got.returncode != 0 and "not authori" in got.stdout.lower(), got.stdout
    # ... while a configured user's login from the same host is accepted.
    assert mqtt_login(stranger, address, cluster.mqtt.port, "sensors",
                      secrets.read(cluster, "mqtt_sensors")) == "Success"


def mqtt_login(stranger: Stranger, address: str, port: int, user: str, password: str) -> str:
    """Log in from the stranger with paho (the password on stdin, not in argv); the reason."""
    code = ("import sys, paho.mqtt.client as m\n"
            "c = m.Client(m.CallbackAPIVersion.VERSION2, client_id='stranger-login')\n"
            "c.username_pw_set(sys.argv[1], sys.stdin.read().strip())\n"
            "c.on_connect = lambda cl, ud, fl, rc, pr: (print(rc), cl.disconnect())\n"
            "c.connect(sys.argv[2], int(sys.argv[3]), keepalive=10)\n"
            "c.loop_forever(timeout=1)\n")
    got = stranger.run(f"python3 -c {shlex.quote(code)} {user} {address} {port}",
                       input=password, timeout=30)
    return got.stdout.strip()


def test_no_secret_in_any_argv(lab, cluster, tools):
    """Every node's process list, sampled every 0.5 s while setup runs again, `doit status`
    runs and the healthchecks (every 10 s) fire, never shows a generated secret."""
    seconds = 40
    sample = (f"end=$(( $(date +%s) + {seconds} )); while [ $(date +%s) -lt $end ]; do "
              "ps -eo args; sleep 0.5; done")
    with ThreadPoolExecutor(len(lab.names)) as pool:
        samples = {n: pool.submit(lab.exec, n, sample, timeout=seconds + 60) for n in lab.names}
        again = tools.setup()
        status = doit("status")
        outputs = {n: f.result().stdout for n, f in samples.items()}
    assert again.ok, again.output[-3000:]
    assert status.ok, status.output[-3000:]
    values = secrets.secret_values(cluster)
    assert values
    for node, text in outputs.items():
        assert text.count("\n") > seconds, f"{node}: too few samples"
        leaked = [line for line in text.splitlines() if any(v in line for v in values)]
        shown = [line_scrubbed(line, values) for line in leaked[:5]]
        assert not leaked, f"{node}: a secret in argv:\n" + "\n".join(shown)


def line_scrubbed(line: str, values: list[str]) -> str:
    for v in values:
        line = line.replace(v, "<secret>")
    return line


def test_a_sensor_publishes_only_its_own_topics(cluster):
    """The ACL: the `sensors` user may announce a sensor, not a switch (a switch's discovery
    config would give it a command topic into Home Assistant)."""
    import paho.mqtt.client as mqtt

    address, port = broker(cluster), cluster.mqtt.port
    got: list[str] = []

    def client(user: str) -> mqtt.Client:
        cl = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"acl-{user}")
        cl.username_pw_set(user, secrets.read(cluster, f"mqtt_{user}"))
        cl.connect(address, port, keepalive=10)
        cl.loop_start()
        return cl

    ha = client("homeassistant")
    ha.on_message = lambda cl, ud, msg: got.append(msg.topic)
    ha.subscribe("homeassistant/+/haswarm_acl_test/#", qos=1)
    sensor = client("sensors")
    try:
        time.sleep(1)
        for kind in ("switch", "sensor"):
            topic = f"homeassistant/{kind}/haswarm_acl_test/config"
            sensor.publish(topic, "{}", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for cl in (ha, sensor):
            cl.loop_stop()
            cl.disconnect()
    assert got == ["homeassistant/sensor/haswarm_acl_test/config"], got
