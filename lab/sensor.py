"""A temperature sensor on the lab's LAN, as a real one behaves: it logs in to the broker's
address (the VIP) as the `sensors` user, announces itself with a retained MQTT discovery config,
then publishes a new state every second, and reconnects by itself when the broker moves. Run in
a namespace on the lab bridge (lab/stranger.py), the password on stdin:

    python3 -m lab.sensor HOST PORT OBJECT_ID < password

Each state is the count of states published so far (1, 2, 3, ...), so a reader can tell which
states arrived. One line per state on stdout: "<unix time> <state>".
"""

from __future__ import annotations

import json
import sys
import time


def discovery(object_id: str) -> tuple[str, str]:
    """The discovery topic and config of the sensor (states under the `sensors` user's tree)."""
    return (f"homeassistant/sensor/{object_id}/config",
            json.dumps({"name": object_id.replace("_", " "), "unique_id": object_id,
                        "state_topic": state_topic(object_id), "device_class": "temperature",
                        "state_class": "measurement", "unit_of_measurement": "°C"}))


def state_topic(object_id: str) -> str:
    return f"sensors/lab/{object_id}"


def main() -> None:
    import paho.mqtt.client as mqtt

    host, port, object_id = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"lab-{object_id}")
    client.username_pw_set("sensors", sys.stdin.read().strip())
    client.reconnect_delay_set(min_delay=1, max_delay=2)
    topic, config = discovery(object_id)
    # (re)announced on every connect, as ESPHome and Tasmota do
    client.on_connect = lambda c, u, f, rc, p: c.publish(topic, config, qos=1, retain=True)
    client.connect_async(host, port, keepalive=5)
    client.loop_start()
    count = 0
    while True:
        if client.is_connected():
            count += 1
            client.publish(state_topic(object_id), str(count), qos=1)
            print(f"{time.time():.3f} {count}", flush=True)
        time.sleep(1.0)


if __name__ == "__main__":
    main()
