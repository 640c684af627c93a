"""Talking to the MQTT broker as the drill and the watch do: one authenticated paho-mqtt session
(synchronous: the client's loop is driven here, no thread), whether a broker accepts a login, the
`homeassistant` user's password and an address where a broker answers. paho is imported when a
session opens, not with this module (`doit list` stays fast)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tasks import secrets
from tasks.config import Cluster
from tasks.errors import DrillError

if TYPE_CHECKING:
    from tasks.status import ClusterStatus

MQTT_USER = "homeassistant"


def _paho() -> Any:
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise DrillError("the drill needs paho-mqtt on this computer: pip install "
                         "'paho-mqtt>=2.0'") from None
    return mqtt


class MQTTSession:
    """One authenticated MQTT 3.1.1 connection; raises OSError/TimeoutError when the broker
    does not accept it within `timeout`."""

    def __init__(self, host: str, port: int, user: str, password: str,
                 timeout: float = 2.0) -> None:
        mqtt = _paho()
        self.timeout = timeout
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"haswarm-drill-{uuid.uuid4().hex[:10]}",
                                  protocol=mqtt.MQTTv311, clean_session=True)
        self.client.username_pw_set(user, password)
        self.client.connect_timeout = timeout
        self.messages: dict[str, bytes] = {}
        self._rc: str | None = None

        def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
            self._rc = str(rc)

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            if msg.retain:
                self.messages[msg.topic] = msg.payload

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.connect(host, port, keepalive=15)
        self._until(lambda: self._rc is not None, timeout)
        if self._rc != "Success":
            self.close()
            raise OSError(f"MQTT broker {host}:{port} refused the login: {self._rc}")

    def _until(self, cond: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from the MQTT broker")
            rc = self.client.loop(timeout=0.05)
            if rc != 0 and not cond():
                raise OSError(f"MQTT connection lost ({rc})")

    def publish_retained(self, topic: str, payload: str) -> None:
        """Publish a retained message with QoS 1 and wait for the broker's PUBACK."""
        info = self.client.publish(topic, payload, qos=1, retain=True)
        self._until(info.is_published, self.timeout * 3)

    def read_retained(self, topic: str, timeout: float = 5.0) -> bytes | None:
        """The retained message of `topic`, None when the broker has none."""
        self.client.subscribe(topic, qos=1)
        try:
            self._until(lambda: topic in self.messages, timeout)
        except TimeoutError:
            return None
        return self.messages[topic]

    def close(self) -> None:
        """Disconnect (quietly when the connection is already gone)."""
        try:
            self.client.disconnect()
            self.client.loop(timeout=0.05)
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass


def mqtt_accepts(host: str, port: int, user: str, password: str, timeout: float = 1.5) -> bool:
    """Does the broker at host:port accept this login (CONNACK 0) within `timeout`?"""
    try:
        MQTTSession(host, port, user, password, timeout).close()
        return True
    except (OSError, TimeoutError):
        return False


def mqtt_password(c: Cluster) -> str:
    """The generated password of the `homeassistant` MQTT user (secrets/<name>/)."""
    try:
        return secrets.read(c, f"mqtt_{MQTT_USER}")
    except OSError:
        raise DrillError(f"no MQTT password in {secrets.directory(c)}: run `doit setup` "
                         "first") from None


def broker_address(c: Cluster, st: ClusterStatus | None = None,
                   exclude: tuple[str, ...] = ()) -> str | None:
    """An address where the broker accepts the homeassistant login: the VIP first, then the
    nodes (host publish mode: only the node running it)."""
    password = mqtt_password(c)
    hosts = ([c.vip.address] if c.vip.address else []) + [
        n.address for n in c.nodes if n.name not in exclude]
    for host in hosts:
        if host and mqtt_accepts(host, c.mqtt.port, MQTT_USER, password):
            return host
    return None
