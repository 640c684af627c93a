#!/usr/bin/env python3
"""Availability as felt, per fault: the issue's fault matrix on the lab (figures, not a test).

Every drill probes continuously (tasks/watch.py: every 0.5 s from before the fault until
`--after` seconds after the cluster converged again) and reports per service the seconds
unavailable, the longest gap, the number of gaps, the first answer; the containers that started
(restart / move) and every moment two Home Assistants (or brokers) ran at once.

Roles (resolved from `doit status` just before each drill):
    ha            the node running Home Assistant
    db-only       a node running only a db task (not the leader when another such node exists)
    leader-ha     the swarm leader while it runs Home Assistant (with standby, HA is moved there
                  first; without, skipped when it does not)
    leader-no-ha  the swarm leader while it does not run Home Assistant
    mqtt          the node running Mosquitto

    python3 bench/availability.py                          # every role, kill and cut
    python3 bench/availability.py --roles leader-no-ha --faults kill --repeat 4
    python3 bench/availability.py --heartbeat 2 ...        # dispatcher heartbeat for the run
    python3 bench/availability.py --json out.json

Uses the shared lab of config/lab.yml (deployed: `doit setup`). Leaves it converged, with the
configured heartbeat.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import running_lab  # noqa: E402

from lab.faults import LabFaults  # noqa: E402
from tasks import drill, status, vip  # noqa: E402
from tasks.config import VIP, Cluster  # noqa: E402
from tasks.remote import Remote  # noqa: E402
from tasks.stack_observe import find_manager  # noqa: E402

ROLES = ("ha", "db-only", "leader-ha", "leader-no-ha", "mqtt")


def say(msg: str) -> None:
    print(f"    {msg}", flush=True)


def pick(st: status.ClusterStatus, role: str) -> str | None:
    """The node that has `role` now (None: no node has it)."""
    def runs(n: status.NodeStatus) -> set[str]:  # where it runs, not where it waits
        return st.runs(n.name)

    leader = next((n for n in st.nodes if n.swarm and n.swarm.leader), None)
    if role == "ha":
        return (st.ha_nodes() or [None])[0]
    if role == "mqtt":
        return (st.mqtt_nodes() or [None])[0]
    if role == "leader-ha":
        return leader.name if leader and "homeassistant" in runs(leader) else None
    if role == "leader-no-ha":
        return leader.name if leader and "homeassistant" not in runs(leader) else None
    if role == "db-only":
        only = [n for n in st.nodes if runs(n) == {"db"}]
        only.sort(key=lambda n: bool(n.swarm and n.swarm.leader))
        return only[0].name if only else None
    raise SystemExit(f"unknown role {role!r}: {', '.join(ROLES)}")


def ha_to_leader(c: Cluster) -> None:
    """With standby: stop the running Home Assistant until the leader's standby took over (each
    try lands on one of the waiting ones; a few tries are enough)."""
    for _ in range(8):
        st = status.wait_converged(c, 900, log=say)
        leader = next((n.name for n in st.nodes if n.swarm and n.swarm.leader), None)
        active = st.ha_nodes()
        if not c.ha_standby or leader is None or active == [leader]:
            return
        say(f"moving Home Assistant from {active[0]} towards the leader {leader}")
        with Remote(c) as r:
            r.run(c.node(active[0]), "bench: stop HA",
                  f"docker ps -q -f name={c.name}_homeassistant | xargs -r docker kill")
        time.sleep(5)


def set_heartbeat(c: Cluster, seconds: float) -> None:
    with Remote(c) as r:
        m = find_manager(r, c)
        assert m is not None
        r.run(m, "bench: heartbeat",
              f"docker swarm update --dispatcher-heartbeat {int(seconds * 1000)}ms")
    say(f"dispatcher heartbeat {seconds:g} s")


def row(role: str, r: drill.DrillResult) -> dict[str, Any]:
    w = r.watch
    assert w is not None
    return {
        "role": role, "fault": r.fault, "node": r.node, "leader": r.leader, "ran": r.ran,
        "probes": {k: {"down": a.down, "longest": a.longest, "gaps": len(a.gaps),
                       "first": a.first_answer} for k, a in w.probes.items()},
        "ha_starts": [f"{s.kind}@{s.t:.0f}s:{s.node}" for s in w.started("homeassistant")],
        "mqtt_starts": [f"{s.kind}@{s.t:.0f}s:{s.node}" for s in w.started("mosquitto")],
        "overlaps": [f"{o.service} x{o.count} {o.end - o.start:.1f}s" for o in w.overlaps],
        "incidents": r.incidents(), "lost": r.lost, "figures": r.figures,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = ["role", "fault", "node", "ldr", "HA down", "HA gaps", "HA first", "MQTT down",
            "MQTT first", "DB down", "HA moves", "two HAs", "MQTT moves", "two brokers", "lost"]
    lines = [head]
    for x in rows:
        p = x["probes"]

        def f(key: str, field: str, p: dict[str, Any] = p) -> str:
            v = p.get(key, {}).get(field)
            return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

        lines.append([x["role"], x["fault"], x["node"], "y" if x["leader"] else "n",
                      f("ha", "down"), f("ha", "gaps"), f("ha", "first"), f("mqtt", "down"),
                      f("mqtt", "first"), f("galera", "down"), ",".join(x["ha_starts"]) or "0",
                      ",".join(o for o in x["overlaps"] if o.startswith("homeassistant"))
                      or "0", ",".join(x["mqtt_starts"]) or "0",
                      ",".join(o for o in x["overlaps"] if o.startswith("mosquitto")) or "0",
                      str(len(x["lost"]))])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))
                     for r in lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--roles", default=",".join(ROLES))
    ap.add_argument("--faults", default="kill,cut")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--after", type=float, default=drill.WATCH_AFTER,
                    help="seconds of probing after the cluster converged again")
    ap.add_argument("--heartbeat", type=float, default=None,
                    help="dispatcher heartbeat (s) for this run; the configured one is put back")
    ap.add_argument("--vip", default="10.77.0.100",
                    help="a VIP for the run when the lab has none (sensors' address; '' for none)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    c, lab = running_lab()
    own_vip = bool(args.vip) and c.vip.address is None
    if own_vip:
        c = c.model_copy(update={"vip": VIP(address=args.vip)})
        with Remote(c) as r:
            vip.setup(c, r)
    rows: list[dict[str, Any]] = []
    status.wait_converged(c, 600, log=say)
    if args.heartbeat is not None:
        set_heartbeat(c, args.heartbeat)
    try:
        for _ in range(args.repeat):
            for role in [r for r in args.roles.split(",") if r]:
                for fault in [f for f in args.faults.split(",") if f]:
                    if role == "leader-ha":
                        ha_to_leader(c)
                    st = status.wait_converged(c, 900, log=say)
                    node = pick(st, role)
                    if node is None:
                        print(f"\n== {role} {fault}: no node has this role now, skipped")
                        continue
                    print(f"\n== {role} ({node}) {fault}", flush=True)
                    r = drill.run_drill(c, fault, node, faults=LabFaults(c, lab), names=False,
                                        log=say, watch_after=args.after)
                    print(r.report(), flush=True)
                    rows.append(row(role, r))
    finally:
        lab.up()
        if args.heartbeat is not None:
            set_heartbeat(c, c.swarm.dispatcher_heartbeat)
        status.wait_converged(c, 900, log=say)
        if own_vip:
            with Remote(c) as r:
                vip.remove(c, r, dryrun=False)
    print("\n== availability per fault (seconds; probed every 0.5 s until "
          f"{args.after:g} s after convergence)")
    print(table(rows))
    bad = [x for x in rows if x["incidents"] or x["lost"]]
    print(f"drills with an incident or a loss: {len(bad)} of {len(rows)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
