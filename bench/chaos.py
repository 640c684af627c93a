#!/usr/bin/env python3
"""Chaos soak on the lab: random faults, every service probed throughout (figures, not a test).

N faults one after another: a random fault (kill, cut, docker: the node's Docker engine
stopped) on a random node, held 20-60 s, then the node restored; the next one 30-120 s later
(`--spacing`). Only one node is down at a time (three nodes keep quorum with one down). After
the last one every node is restored and the cluster must converge by itself, with no operator.

Throughout, tasks/watch.py probes every 0.5 s (Home Assistant over HTTP, an MQTT round trip, a
Galera write) and counts containers on every node. At the end it prints availability % per
service, every gap with the fault that was active when it began, the containers that started
(restart / move), every moment two Home Assistants ran, and what was lost: every Galera row the
probe committed must be on every node, plus a Gluster file and a retained MQTT message written
before the first fault.

    python3 bench/chaos.py --minutes 30                # the issue's soak: a fault ~every 2 min
    python3 bench/chaos.py --faults 3 --spacing 30,60   # a short run
    python3 bench/chaos.py --seed 7 --json out.json

Goal (issue): over 30 minutes with a fault about every 2 minutes, HA availability >= 99.5 %,
0 items lost, converged at the end without an operator. Uses the shared lab (deployed).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import running_lab  # noqa: E402

from tasks import drill, status, watch  # noqa: E402
from tasks.remote import Remote  # noqa: E402


def say(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cause(t: float, faults: list[dict[str, Any]]) -> str:
    """The fault active at `t` (or the last one restored before it)."""
    active = [f for f in faults if f["at"] <= t <= f.get("restored", float("inf"))]
    if active:
        return f"{active[-1]['fault']} {active[-1]['node']}"
    before = [f for f in faults if f.get("restored", float("inf")) < t]
    if before:
        f = before[-1]
        return f"after the restore of {f['node']} ({t - f['restored']:.0f} s after)"
    return "no fault"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=0.0, help="run this long (else --faults)")
    ap.add_argument("--faults", type=int, default=3)
    ap.add_argument("--kinds", default="kill,cut,docker")
    ap.add_argument("--spacing", default="30,120", help="seconds between faults: min,max")
    ap.add_argument("--hold", default="20,60", help="seconds a node stays down: min,max")
    ap.add_argument("--after", type=float, default=60.0, help="probing after convergence")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    gap_min, gap_max = (float(x) for x in args.spacing.split(","))
    hold_min, hold_max = (float(x) for x in args.hold.split(","))
    kinds = [k for k in args.kinds.split(",") if k]

    c, lab = running_lab()
    st = status.wait_converged(c, 600, log=say)
    with Remote(c) as r:
        markers = drill.write_markers(r, c, st, c.names[0], "chaos", say)
    time.sleep(c.mqtt.autosave_interval + 2)
    w = watch.Watch(c, watch.lab_runner(lab), mqtt_user=drill.MQTT_USER,
                    mqtt_password=drill.mqtt_password(c)).start()
    faults: list[dict[str, Any]] = []
    deadline = time.monotonic() + args.minutes * 60 if args.minutes else None
    try:
        while (len(faults) < args.faults) if deadline is None else time.monotonic() < deadline:
            time.sleep(rng.uniform(gap_min, gap_max))
            fault, node = rng.choice(kinds), rng.choice(c.names)
            f: dict[str, Any] = {"fault": fault, "node": node}
            say(f"fault {len(faults) + 1}: {fault} {node}")
            t0, stopping = drill.inject(c, fault, node, lab)
            f["at"] = t0 - w.t0
            faults.append(f)
            time.sleep(rng.uniform(hold_min, hold_max))
            if stopping is not None:
                stopping.join(240)
            drill.restore(c, fault, node, lab)
            f["restored"] = w.now()
            say(f"restored {node}")
    finally:
        lab.up()  # whatever happened: every node back
    t_end = time.monotonic()
    try:
        final = status.wait_converged(c, 900, log=say)
        converged: float | None = time.monotonic() - t_end
    except TimeoutError as e:
        say(str(e))
        final, converged = status.gather(c), None
    time.sleep(args.after)
    report = w.stop()
    with Remote(c) as r:
        lost = drill.verify(r, c, final, markers, [markers.token, *report.committed])
        if not lost:
            drill.cleanup(r, c, markers)

    print(f"\n== chaos: {len(faults)} faults over {report.window / 60:.1f} min "
          f"(seed {args.seed})")
    for f in faults:
        print(f"  {f['at']:7.1f} s  {f['fault']:<6} {f['node']}  (restored at "
              f"{f.get('restored', float('nan')):.1f} s)")
    print("\n".join(report.lines({"ha": "Home Assistant (HTTP)", "mqtt": "MQTT round trip",
                                  "galera": "Galera write"})))
    for key, a in report.probes.items():
        for start, end in a.gaps:
            print(f"  gap {key:<7} {start:7.1f}-{end:7.1f} s ({end - start:5.1f} s): "
                  f"{cause(start, faults)}")
    print(f"  converged {'never' if converged is None else f'{converged:.0f} s'} after the "
          "last restore, no operator")
    print(f"  lost: {'; '.join(lost) if lost else 'nothing'} ({len(report.committed) + 1} "
          "Galera rows, a Gluster file, a retained MQTT message)")
    ha = report.probes["ha"].percent
    print(f"  Home Assistant availability {ha:.2f} % (goal >= 99.5 %)")
    if args.json:
        args.json.write_text(json.dumps({
            "faults": faults, "lost": lost, "converged": converged,
            "probes": {k: {"percent": a.percent, "down": a.down, "gaps": a.gaps}
                       for k, a in report.probes.items()},
            "starts": [s.__dict__ for s in report.starts],
            "overlaps": [o.__dict__ for o in report.overlaps]}, indent=2, default=str))
    return 1 if lost or converged is None or report.overlaps else 0


if __name__ == "__main__":
    sys.exit(main())
