"""A full outage on the lab: every node down, then back, with no operator action.

`run_outage` kills every node (at once, or one after another), boots them again (at once, or
staggered), measures from the first boot until Galera commits, Mosquitto accepts a login and
Home Assistant answers, waits until the cluster has converged, and reads every marker back.
tests/lab/test_outage.py runs the at-once variant; bench/outage.py all three.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lab.faults import lab_for
from tasks import status
from tasks.config import Cluster
from tasks.drill import (
    CONVERGE_TIMEOUT,
    READY_TIMEOUT,
    DrillError,
    Outcome,
    _secret_values,
    converge,
)
from tasks.failover import Probe, measure
from tasks.markers import cleanup, db_container, insert_sql, sql, verify, write_markers
from tasks.mqtt_client import MQTT_USER, mqtt_accepts, mqtt_password
from tasks.remote import Remote


@dataclass(kw_only=True)
class OutageResult(Outcome):
    """What a full outage measured: seconds from the first node's return (boot started)."""

    kill_plan: list[tuple[float, str]]
    boot_plan: list[tuple[float, str]]

    def report(self) -> str:
        """The figures as a few lines for people."""
        def plan(p: list[tuple[float, str]]) -> str:
            return ", ".join(f"{n}@{t:g}s" for t, n in p)

        def fmt(key: str) -> str:
            v = self.figures.get(key)
            return "never (timeout)" if v is None else f"{v:.1f} s"

        lines = [f"outage: killed {plan(self.kill_plan)}; booted {plan(self.boot_plan)}",
                 "  seconds after the first node came back:"]
        for key, label in (("galera", "Galera commits a write"),
                           ("mqtt", "Mosquitto accepts a login"),
                           ("ha", "Home Assistant answers HTTP"),
                           ("converged", "whole cluster converged (doit status clean)")):
            where = f"  ({self.where[key]})" if key in self.where else ""
            lines.append(f"    {label:<46} {fmt(key)}{where}")
        lines.append(("  LOST: " + "; ".join(self.lost)) if self.lost else
                     f"  nothing lost: {self.rows_committed} Galera rows, the file on Gluster, "
                     "the retained MQTT message")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _write_rows(r: Remote, st: status.ClusterStatus, nodes: list[str], prefix: str, count: int,
                phase: str, timeout: float = 60) -> list[str]:
    """Commit `count` rows through the db containers of `nodes` in turn (retrying while no
    primary component accepts them); their tokens."""
    tokens: list[str] = []
    deadline = time.monotonic() + timeout
    i = 0
    while len(tokens) < count and time.monotonic() < deadline:
        node = nodes[i % len(nodes)]
        cid = db_container(st, node)
        i += 1
        if cid is None:
            continue
        token = f"{prefix}-{phase}-{len(tokens)}"
        try:
            sql(r, node, cid, insert_sql(token, node, "outage", phase, False), timeout=5)
        except Exception:  # noqa: BLE001 - not Primary (yet): try again / another node
            time.sleep(0.5)
            continue
        tokens.append(token)
    return tokens


def run_outage(c: Cluster, kill_plan: list[tuple[float, str]] | None = None,
               boot_plan: list[tuple[float, str]] | None = None, *,
               log: Callable[[str], None] | None = None, rows: int = 10,
               measure_timeout: float = 600.0, converge_timeout: float = CONVERGE_TIMEOUT,
               ready_timeout: float = READY_TIMEOUT) -> OutageResult:
    """Lab only: kill every node (`kill_plan`: (seconds from the first kill, node); default:
    all at once), boot them (`boot_plan`: (seconds from the first boot, node); default: all
    at once, in cluster order), measure from the first boot until Galera commits, Mosquitto
    accepts a login and Home Assistant answers, wait until converged, read every marker back.
    Between staggered kills, rows are committed on the nodes still alive (while they form a
    primary component): the last to die hold rows the first lack."""
    say = log or (lambda msg: print(f"outage: {msg}", flush=True))
    if not c.lab:
        raise DrillError("a full outage is a lab drill: it kills every node")
    lab = lab_for(c)
    names = c.names
    kill_plan = kill_plan or [(0.0, n) for n in names]
    boot_plan = boot_plan or [(0.0, n) for n in names]
    result = OutageResult(kill_plan=kill_plan, boot_plan=boot_plan)
    say("checking that the cluster is healthy first")
    try:
        st = status.wait_converged(c, ready_timeout, log=say)
    except TimeoutError as e:
        raise DrillError(f"the cluster is not healthy, not starting: {e}") from None
    with Remote(c) as r:
        r.redact(*_secret_values(c))
        markers = write_markers(r, c, st, names[0], "outage", say)
        committed = [markers.token, *_write_rows(r, st, names, markers.token, rows, "before")]
    wait = c.mqtt.autosave_interval + 2 - (time.monotonic() - markers.published_at)
    if wait > 0:
        say(f"waiting {wait:.0f} s (longer than mqtt.autosave_interval)")
        time.sleep(wait)

    groups: dict[float, list[str]] = {}
    for delay, node in sorted(kill_plan):
        groups.setdefault(delay, []).append(node)
    alive = list(names)
    t_kill = time.monotonic()
    try:
        for delay, group in groups.items():
            if t_kill + delay > time.monotonic() and len(alive) > 1:
                # rows only the nodes still alive will have (while they are a primary component)
                budget = max(1.0, min(30.0, t_kill + delay - time.monotonic()))
                with Remote(c) as r:
                    r.redact(*_secret_values(c))
                    got = _write_rows(r, st, alive, markers.token, 3, f"before-{group[0]}",
                                      timeout=budget)
                committed += got
                say(f"committed {len(got)} rows on {', '.join(alive)}")
            time.sleep(max(0.0, t_kill + delay - time.monotonic()))
            pids = [p for p in (lab.pid(n) for n in group) if p is not None]
            for pid in pids:  # the whole group dies at the same instant
                os.kill(pid, signal.SIGKILL)
            for n in group:
                lab.kill(n)  # reaps and removes the node's netns, veth, cgroups
                alive.remove(n)
            say(f"killed {', '.join(group)} at {time.monotonic() - t_kill:.1f} s")
    finally:
        t_return = time.monotonic()

        def boot_all() -> None:
            waves: dict[float, list[str]] = {}
            for delay, node in sorted(boot_plan):
                waves.setdefault(delay, []).append(node)
            for delay, wave in waves.items():
                time.sleep(max(0.0, t_return + delay - time.monotonic()))
                say(f"booting {', '.join(wave)} at {time.monotonic() - t_return:.1f} s")
                # nodes due at the same moment boot in parallel (each waits for its own services)
                with ThreadPoolExecutor(max_workers=len(wave)) as pool:
                    list(pool.map(lab.boot, wave))
            for n in names:  # a node the plan missed comes back too
                if lab.pid(n) is None:
                    lab.boot(n)

        booter = threading.Thread(target=boot_all, name="outage-boot")
        booter.start()
    try:
        from tasks.stack_observe import http_answer

        password = mqtt_password(c)

        def ha() -> str | None:
            for n in c.nodes:
                code = http_answer(n.address, c.homeassistant.port, timeout=1.0)
                if code is not None and code < 500:
                    return n.name
            return None

        def broker() -> str | None:
            for n in c.nodes:
                if mqtt_accepts(n.address, c.mqtt.port, MQTT_USER, password, timeout=1.0):
                    return n.name
            return None

        after: list[str] = []

        def galera() -> str | None:
            fresh = status.gather(c)
            with Remote(c) as r:
                got = _write_rows(r, fresh, [n.name for n in fresh.nodes if n.reachable],
                                  markers.token, 1, "after", timeout=5)
            after.extend(got)
            return "committed" if got else None

        figures, where = measure(
            [Probe("galera", galera, 2.0), Probe("mqtt", broker, 1.0), Probe("ha", ha, 1.0)],
            t_return, measure_timeout, say)
        committed += after
        result.figures.update(figures)
        result.where.update(where)
    finally:
        booter.join()
    done, final = converge(c, t_return, converge_timeout, say)
    result.figures["converged"] = done["converged"]
    result.rows_committed = len(committed)
    final = final or status.gather(c)
    with Remote(c) as r:
        r.redact(*_secret_values(c))
        result.lost = verify(r, c, final, markers, committed)
        if not result.lost:
            cleanup(r, c, markers)
    return result


