"""The failover figures of a drill: seconds from the fault until each thing works again (the
swarm marks the node Down, Galera commits on a survivor, Home Assistant and Mosquitto answer on
another node, the VIP, the mDNS name), each `Probe` polled in its own thread until it succeeds.
The continuous probes before, during and after a fault are tasks/watch.py's."""

from __future__ import annotations

import shlex
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tasks.config import Cluster
from tasks.markers import Markers, db_container, insert_sql, sql
from tasks.mqtt_client import MQTT_USER, mqtt_accepts, mqtt_password
from tasks.stack_observe import http_answer

if TYPE_CHECKING:
    from tasks.remote import Remote
    from tasks.status import ClusterStatus

# Seconds between two polls of each probe.
POLL = 0.5
VIP_POLL = 0.2
MDNS_POLL = 1.0
# The cron restarts Avahi every minute: a name that has not moved after this never will.
MDNS_TIMEOUT = 150.0


@dataclass
class Probe:
    """One figure: `check()` returns a truthy description once the thing works again."""

    key: str
    check: Callable[[], str | bool | None]
    interval: float = POLL
    timeout: float | None = None  # give up sooner than the drill's measure timeout


def measure(probes: list[Probe], t0: float, timeout: float,
            log: Callable[[str], None]) -> tuple[dict[str, float | None], dict[str, str]]:
    """Run every probe in its own thread until it succeeds or `timeout` seconds after `t0`.
    Returns ({key: seconds from t0 or None}, {key: what the check returned})."""
    figures: dict[str, float | None] = {}
    where: dict[str, str] = {}
    lock = threading.Lock()

    def run(p: Probe) -> None:
        while True:
            try:
                got = p.check()
            except Exception as e:  # noqa: BLE001 - a failing probe is "not yet"
                got = None
                last = f"{type(e).__name__}: {e}"
            else:
                last = ""
            now = time.monotonic()
            if got:
                with lock:
                    figures[p.key] = now - t0
                    if isinstance(got, str):
                        where[p.key] = got
                log(f"{p.key}: {now - t0:.1f} s" + (f" ({got})" if isinstance(got, str) else ""))
                return
            limit = timeout if p.timeout is None else min(timeout, p.timeout)
            if now - t0 > limit:
                with lock:
                    figures[p.key] = None
                log(f"{p.key}: not within {limit:g} s" + (f" (last: {last})" if last else ""))
                return
            time.sleep(p.interval)

    with ThreadPoolExecutor(max_workers=max(1, len(probes))) as pool:
        list(pool.map(run, probes))
    return figures, where


def failover_probes(r: Remote, c: Cluster, st: ClusterStatus, target: str, fault: str,
                    markers: Markers, committed: list[str], names: bool = True) -> list[Probe]:
    """The probes of step 3 (see tasks/drill.py's docstring)."""
    survivors = [n for n in c.nodes if n.name != target]
    password = mqtt_password(c)
    probes: list[Probe] = []

    observer = next((n.name for n in survivors if st.node(n.name).manager), None)
    swarm = st.node(target).swarm

    def swarm_down() -> str | None:
        assert observer is not None and swarm is not None
        state = r.run(observer, "drill: node state",
                      f"timeout 5 docker node inspect --format '{{{{.Status.State}}}}' "
                      f"{shlex.quote(swarm.id)}", check=False, timeout=10).stdout.strip()
        return f"seen from {observer}" if state == "down" else None

    if observer is not None and swarm is not None and swarm.id:
        probes.append(Probe("swarm_down", swarm_down))

    db_survivors = [(n.name, db_container(st, n.name)) for n in survivors
                    if db_container(st, n.name)]
    counter = iter(range(1, 10**6))

    def galera_write() -> str | None:
        for name, cid in db_survivors:
            token = f"{markers.token}-w{next(counter)}"
            try:
                sql(r, name, cid or "", insert_sql(token, target, fault, "during", False),
                    timeout=3)
            except Exception:  # noqa: BLE001 - blocked (no primary component yet) or refused
                continue
            committed.append(token)
            return name
        return None

    if db_survivors:
        probes.append(Probe("galera", galera_write))

    def ha() -> str | None:
        for n in survivors:
            status = http_answer(n.address, c.homeassistant.port, timeout=1.0)
            if status is not None and status < 500:
                return n.name
        return None

    probes.append(Probe("ha", ha))

    def broker() -> str | None:
        for n in survivors:
            if mqtt_accepts(n.address, c.mqtt.port, MQTT_USER, password, timeout=1.0):
                return n.name
        return None

    probes.append(Probe("mqtt", broker))

    if c.vip.address:
        vip = c.vip.address

        def vip_ok() -> str | None:
            return vip if mqtt_accepts(vip, c.mqtt.port, MQTT_USER, password, timeout=0.5) \
                else None

        probes.append(Probe("vip", vip_ok, VIP_POLL))

    if names and c.mdns.restart_cron and survivors and "mosquitto" in st.runs(target):
        name = f"{c.mdns.name}.local"
        asker = survivors[0].name
        live = {n.address: n.name for n in survivors}

        def resolved() -> str:
            out = r.run(asker, "drill: mdns", f"timeout 3 avahi-resolve -4 -n {name}",
                        check=False, timeout=10).stdout.split()
            return out[1] if len(out) >= 2 else ""

        def mdns_live() -> str | None:
            addr = resolved()
            return f"{addr} ({live[addr]})" if addr in live else None

        def mdns_broker() -> str | None:
            addr = resolved()
            if addr in live and mqtt_accepts(addr, c.mqtt.port, MQTT_USER, password, 1.0):
                return f"{addr} ({live[addr]})"
            return None

        probes.append(Probe("mdns_live", mdns_live, MDNS_POLL, MDNS_TIMEOUT))
        probes.append(Probe("mdns_broker", mdns_broker, MDNS_POLL, MDNS_TIMEOUT))
    return probes
