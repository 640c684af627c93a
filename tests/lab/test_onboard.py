"""End to end on the lab: Home Assistant onboarded by `doit setup` (`ha-onboard`), its MQTT
integration loaded, a sensor discovered over MQTT as the README shows it, a re-run that does
nothing, and `doit status` showing the integration."""

from __future__ import annotations

import json
import time

import pytest

from tasks import ha_api, secrets, stack_observe
from tasks.mqtt_client import MQTTSession
from tests.lab.conftest import doit

pytestmark = pytest.mark.lab

SENSOR = "haswarm_lab_temperature"  # unique_id and object id of the test's sensor


def ha(cluster) -> ha_api.HomeAssistantAPI:
    """Home Assistant's API where it answers."""
    name, _ = stack_observe.probe_http(cluster, cluster.homeassistant.port, 120)
    node = cluster.node(name)
    return ha_api.HomeAssistantAPI(node.name, node.address, cluster.homeassistant.port)


def test_setup_onboarded_home_assistant_and_added_mqtt(cluster, deployed):
    api = ha(cluster)
    assert api.onboarding() == dict.fromkeys(ha_api.STEPS, True)
    token = secrets.ha_token(cluster)
    assert token, f"no token in {secrets.token_path(cluster)}"
    assert secrets.token_path(cluster).stat().st_mode & 0o777 == 0o600
    assert [e.state for e in api.entries(token)] == ["loaded"]


def test_onboard_again_does_nothing(cluster, deployed):
    run = doit("ha-onboard")
    assert run.ok, run.output[-3000:]
    assert "ha-onboard: nothing to do" in run.output


def test_status_shows_the_mqtt_integration_loaded(cluster, deployed):
    run = doit("status")
    assert ("Home Assistant's MQTT integration: loaded; a message sent to the broker reached "
            "it in") in run.output, run.output[-3000:]


def test_a_sensor_published_over_mqtt_appears_in_home_assistant(cluster, deployed):
    """The README's "connect your first sensor": discovery config, then a state."""
    if "sensors" not in cluster.mqtt.users:
        pytest.skip("no `sensors` MQTT user in the lab's cluster file")
    host = next((n.address for n in cluster.nodes
                 if _accepts(n.address, cluster)), None)
    assert host, "no node's broker accepts the sensors login"
    config_topic = f"homeassistant/sensor/{SENSOR}/config"
    session = MQTTSession(host, cluster.mqtt.port, "sensors",
                          secrets.read(cluster, "mqtt_sensors"), timeout=5)
    try:
        session.publish_retained(config_topic, json.dumps({
            "name": "haswarm lab temperature", "unique_id": SENSOR,
            "state_topic": f"sensors/lab/{SENSOR}", "device_class": "temperature",
            "state_class": "measurement", "unit_of_measurement": "°C"}))
        api, token = ha(cluster), secrets.ha_token(cluster) or ""
        state = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            session.publish_retained(f"sensors/lab/{SENSOR}", "21.5")
            status, data = api.call("GET", "/api/states/sensor.haswarm_lab_temperature",
                                    token=token)
            state = data.get("state") if status == 200 and isinstance(data, dict) else None
            if state == "21.5":
                break
            time.sleep(2)
        assert state == "21.5", f"Home Assistant shows {state!r}"
    finally:
        session.publish_retained(config_topic, "")  # removes the entity again
        session.publish_retained(f"sensors/lab/{SENSOR}", "")
        session.close()


def _accepts(address: str, cluster) -> bool:
    try:
        MQTTSession(address, cluster.mqtt.port, "sensors",
                    secrets.read(cluster, "mqtt_sensors"), timeout=2).close()
        return True
    except (OSError, TimeoutError):
        return False
