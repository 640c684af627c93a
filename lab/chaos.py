"""Chaos on the lab: random faults one after another, every service probed throughout.

`run_chaos` injects `count` faults (or as many as fit in `minutes`): a random fault (kill, cut,
docker: the node's Docker engine stopped) on a random node, held `hold` seconds, then the node
restored; the next one `spacing` seconds later. One node is down at a time (three nodes keep
quorum with one down). Then every node is restored and the cluster must converge by itself.
tasks/watch.py probes every 0.5 s from before the first fault until `after` seconds after
convergence; the result says availability per service, every gap with the fault active when
it began, the containers that started, overlaps, and what was lost (every Galera row the probe
committed, a Gluster file and a retained MQTT message written before the first fault).

bench/chaos.py runs it for 30 minutes; tests/lab/test_chaos.py runs a short variant in CI.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lab.driver import Lab
from lab.faults import LabFaults
from tasks import status, watch
from tasks.config import Cluster
from tasks.markers import cleanup, verify, write_markers
from tasks.mqtt_client import MQTT_USER, mqtt_password


@dataclass
class Fault:
    """One fault: what, where, when (seconds from the watch's start) and when restored."""

    fault: str
    node: str
    at: float
    restored: float | None = None


@dataclass
class ChaosResult:
    faults: list[Fault]
    report: watch.WatchReport
    converged: float | None  # seconds after the last restore (None: not within the timeout)
    lost: list[str] = field(default_factory=list)

    def cause(self, t: float) -> str:
        """The fault active at `t`, or the last one restored before it."""
        active = [f for f in self.faults if f.at <= t <= (f.restored or float("inf"))]
        if active:
            return f"{active[-1].fault} {active[-1].node}"
        before = [f for f in self.faults if f.restored is not None and f.restored < t]
        if before:
            f = before[-1]
            return f"after the restore of {f.node} ({t - (f.restored or 0):.0f} s after)"
        return "no fault"

    def lines(self) -> list[str]:
        out = [f"chaos: {len(self.faults)} faults over {self.report.window / 60:.1f} min"]
        out += [f"  {f.at:7.1f} s  {f.fault:<6} {f.node}"
                + (f"  (restored at {f.restored:.1f} s)" if f.restored is not None else "")
                for f in self.faults]
        out += self.report.lines({"ha": "Home Assistant (HTTP)", "mqtt": "MQTT round trip",
                                  "galera": "Galera write"})
        for key, a in self.report.probes.items():
            out += [f"  gap {key:<7} {s:7.1f}-{e:7.1f} s ({e - s:5.1f} s): {self.cause(s)}"
                    for s, e in a.gaps]
        out.append("  converged " + ("never" if self.converged is None else
                                     f"{self.converged:.0f} s after the last restore")
                   + ", no operator")
        out.append(f"  lost: {'; '.join(self.lost) if self.lost else 'nothing'} "
                   f"({len(self.report.committed) + 1} Galera rows, a Gluster file, a retained "
                   "MQTT message)")
        return out


def run_chaos(c: Cluster, lab: Lab, *, count: int = 3, minutes: float = 0.0,
              kinds: tuple[str, ...] = ("kill", "cut", "docker"),
              spacing: tuple[float, float] = (30, 120), hold: tuple[float, float] = (20, 60),
              after: float = 60.0, seed: int | None = None,
              log: Callable[[str], None] = print) -> ChaosResult:
    """The whole run (see the module docstring)."""
    from tasks.remote import Remote

    rng = random.Random(seed)
    st = status.wait_converged(c, 600, log=log)
    with Remote(c) as r:
        markers = write_markers(r, c, st, c.names[0], "chaos", log)
    time.sleep(c.mqtt.autosave_interval + 2)
    faults = LabFaults(c, lab)
    w = watch.Watch(c, faults.run_on(), mqtt_user=MQTT_USER,
                    mqtt_password=mqtt_password(c)).start()
    done: list[Fault] = []
    deadline = time.monotonic() + minutes * 60 if minutes else None

    def more() -> bool:
        return len(done) < count if deadline is None else time.monotonic() < deadline

    try:
        while more():
            time.sleep(rng.uniform(*spacing))
            kind, node = rng.choice(kinds), rng.choice(c.names)
            log(f"fault {len(done) + 1}: {kind} {node}")
            f = Fault(kind, node, w.now())
            stopping = faults.inject(kind, node)
            done.append(f)
            time.sleep(rng.uniform(*hold))
            if stopping is not None:
                stopping.join(240)
            faults.restore(kind, node)
            f.restored = w.now()
            log(f"restored {node}")
    finally:
        lab.up()  # whatever happened: every node back
    t_end = time.monotonic()
    try:
        final = status.wait_converged(c, 900, log=log)
        converged: float | None = time.monotonic() - t_end
    except TimeoutError as e:
        log(str(e))
        final, converged = status.gather(c), None
    time.sleep(after)
    report = w.stop()
    with Remote(c) as r:
        lost = verify(r, c, final, markers, [markers.token, *report.committed])
        if not lost:
            cleanup(r, c, markers)
    return ChaosResult(done, report, converged, lost)
