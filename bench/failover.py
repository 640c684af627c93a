#!/usr/bin/env python3
"""Failover figures on the lab (a script printing figures, not a timed test).

For every fault (kill, link cut) and every node (by default all three: the full 3x2 matrix), one
drill (`tasks.drill.run_drill`): seconds from the fault until Home Assistant answers HTTP on
another node, Mosquitto accepts a login, Galera commits a write on a survivor, the VIP answers,
and, after the node is restored, until Gluster healed and Galera is Synced everywhere; plus
what was lost (goal: nothing).

    python3 bench/failover.py                       # the 3x2 matrix
    python3 bench/failover.py --faults kill --nodes pi1
    python3 bench/failover.py --names               # mDNS name vs VIP after the broker's node dies
    python3 bench/failover.py --defaults            # the same drills with swarm defaults
    python3 bench/failover.py --nodes ha --defaults # kill/cut the HA node, ours vs defaults
    python3 bench/failover.py --json out.json

`--names` kills the node running Mosquitto and polls both ways a sensor finds the broker: the
mDNS name (`avahi-resolve -n NAME.local` from a survivor every 1 s; the cron restarts Avahi every
minute) and the VIP (TCP + MQTT login every 0.2 s).

`--defaults` sets swarm's defaults on the running stack (dispatcher heartbeat 5 s, restart delay
5 s for homeassistant and mosquitto), runs kill and cut on the node running Home Assistant, and
puts the lab's values back. "Image not preloaded on the target node" cannot be reproduced
faithfully without a registry: swarm would pull; here a node that lacks an image only fails the
task. It is emulated: the time to load the Home Assistant image into a fresh Docker engine that
already holds the MariaDB image (shared base layer, as on a node running db) is measured on a
private lab instance (`instance_lab("fobnch")`, purged afterwards) and added to the HA figure.
That is a lower bound of a pull: a Pi pulling from a registry over the internet is slower.

Goals (issue): HA <= 15 s after a kill, <= 25 s after a link cut, >= 2x faster than defaults.
Uses the shared lab of config/lab.yml (the stack must be deployed: `doit setup`); with no
`vip.address` there, a test VIP 10.77.0.100 is set up for the run and removed afterwards. Leaves
the lab converged.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.driver import Lab, instance_lab  # noqa: E402
from lab.faults import LabFaults  # noqa: E402
from tasks import drill, status, vip  # noqa: E402
from tasks.config import LAB_CLUSTER_FILE, VIP, Cluster, load_cluster  # noqa: E402
from tasks.remote import Remote  # noqa: E402
from tasks.stack_observe import find_manager  # noqa: E402

TEST_VIP = "10.77.0.100"
COLUMNS = [("swarm_down", "down"), ("galera", "galera"), ("mqtt", "mqtt"), ("vip", "vip"),
           ("ha", "HA"), ("restored", "restore"), ("heal", "heal"),
           ("galera_synced", "synced"), ("converged", "converged")]


def say(msg: str) -> None:
    """A progress line."""
    print(f"    {msg}", flush=True)


def fmt(v: float | None | str) -> str:
    """Seconds as text ('-' not measured, 'never' timed out)."""
    if v == "n/a":
        return "-"
    return "never" if v is None else f"{v:.1f}"


def table(rows: list[dict[str, Any]]) -> str:
    """The drills as a right-aligned table."""
    head = ["fault", "node", "leader", "ran"] + [h for _, h in COLUMNS] + ["lost"]
    lines = [head]
    for row in rows:
        f = row["figures"]
        lines.append([row["fault"], row["node"], "yes" if row.get("leader") else "no",
                      ",".join(s[:2] for s in row["ran"])]
                     + [fmt(f.get(k, "n/a")) for k, _ in COLUMNS]
                     + [str(len(row["lost"])) if row["lost"] else "0"])
    widths = [max(len(str(r[i])) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True))
                     for r in lines)


def one(c: Cluster, fault: str, node: str | None, names: bool = False) -> dict[str, Any]:
    """One drill, reported, as a row."""
    print(f"\n== {fault} {node or '(node running Home Assistant)'}", flush=True)
    r = drill.run_drill(c, fault, node, faults=LabFaults(c), names=names, log=say)
    print(r.report(), flush=True)
    return {"fault": fault, "node": r.node, "ran": r.ran, "leader": r.leader,
            "figures": r.figures,
            "where": r.where, "lost": r.lost, "rows": r.rows_committed}


def set_timing(c: Cluster, heartbeat: float, restart_delay: float) -> None:
    """Dispatcher heartbeat and restart delay of homeassistant and mosquitto on the running
    swarm (a service update replaces their tasks), then wait until converged."""
    with Remote(c) as r:
        m = find_manager(r, c)
        assert m is not None
        r.run(m, "bench: heartbeat", f"docker swarm update --dispatcher-heartbeat "
                                     f"{int(heartbeat * 1000)}ms")
        for svc in ("homeassistant", "mosquitto"):
            r.run(m, "bench: restart delay",
                  f"docker service update --detach --restart-delay "
                  f"{int(restart_delay * 1000)}ms {shlex.quote(f'{c.name}_{svc}')}")
    status.wait_converged(c, 600, log=say)


def image_load_seconds(c: Cluster) -> float:
    """Seconds to load the Home Assistant image (build/images) into a fresh engine that holds
    the MariaDB image already, on a private lab instance (purged afterwards)."""
    from tasks.images import images_dir

    d = images_dir(c)
    ha, db = d / "homeassistant.tar", d / "mariadb.tar"
    if not ha.exists() or not db.exists():
        raise SystemExit(f"{ha} / {db} missing: run `doit images` first")
    lab = instance_lab("fobnch", 2)
    try:
        lab.up()
        argv = lab.ssh_argv(lab.names[0])
        with open(db, "rb") as f:
            subprocess.run([*argv, "docker load -q"], stdin=f, check=True,
                           capture_output=True)
        started = time.monotonic()
        with open(ha, "rb") as f:
            subprocess.run([*argv, "docker load -q"], stdin=f, check=True,
                           capture_output=True)
        return time.monotonic() - started
    finally:
        lab.down(purge=True)
        import shutil
        shutil.rmtree(lab.state_dir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faults", default="kill,cut")
    ap.add_argument("--nodes", default="",
                    help="comma-separated; 'ha': the node running Home Assistant at that moment; "
                         "default: every node")
    ap.add_argument("--names", action="store_true", help="mDNS vs VIP after the broker dies")
    ap.add_argument("--defaults", action="store_true", help="also with swarm defaults")
    ap.add_argument("--repeat", type=int, default=1, help="drills per fault with --defaults")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    base = load_cluster(LAB_CLUSTER_FILE)
    own_vip = base.vip.address is None
    c = base.model_copy(update={"vip": VIP(address=TEST_VIP)}) if own_vip else base
    lab = Lab(base)
    if not lab.is_up():
        raise SystemExit("the lab is not running: doit lab-up && doit setup")
    out: dict[str, Any] = {"matrix": [], "names": None, "defaults": []}
    status.wait_converged(base, 600, log=say)
    if own_vip:
        with Remote(c) as r:
            vip.setup(c, r)
    try:
        nodes = [n for n in args.nodes.split(",") if n] or c.names
        for fault in [f for f in args.faults.split(",") if f and f != "none"]:
            for node in nodes:
                out["matrix"].append(one(c, fault, None if node == "ha" else node))
        if args.names:
            st = status.wait_converged(c, 600, log=say)
            broker = st.mqtt_nodes()[0]
            out["names"] = one(c, "kill", broker, names=True)
        if args.defaults:
            load = image_load_seconds(c)
            say(f"loading the Home Assistant image into a fresh engine: {load:.1f} s")
            out["image_load"] = load
            set_timing(c, 5, 5)
            try:
                for fault in ("kill", "cut"):
                    for _ in range(args.repeat):
                        out["defaults"].append(one(c, fault, None))
            finally:
                set_timing(c, c.swarm.dispatcher_heartbeat, c.swarm.restart_delay)
    finally:
        lab.up()
        status.wait_converged(c, 900, log=say)
        if own_vip:
            with Remote(c) as r:
                vip.remove(c, r, dryrun=False)

    print("\n== failover matrix (seconds after the fault; restore figures after the restore)")
    print(table(out["matrix"]))
    for fault, goal in (("kill", 15), ("cut", 25)):
        for row in out["matrix"]:
            if row["fault"] == fault and "homeassistant" in row["ran"]:
                ha = row["figures"].get("ha")
                met = "met" if ha is not None and ha <= goal else "NOT met"
                print(f"HA after {fault} of {row['node']} (ran HA"
                      + ("; swarm leader" if row.get("leader") else "") + f"): {fmt(ha)} s "
                      f"(goal <= {goal} s: {met})")
    lost = sum(len(row["lost"]) for row in out["matrix"])
    print(f"lost: {lost} (goal 0)")
    if out["names"]:
        f = out["names"]["figures"]
        print(f"\n== broker's node killed: how long a sensor's address is wrong\n"
              f"  VIP (TCP + MQTT login, 0.2 s polls): {fmt(f.get('vip'))} s\n"
              f"  mDNS name -> a live node: {fmt(f.get('mdns_live'))} s; -> the node where "
              f"Mosquitto answers: {fmt(f.get('mdns_broker'))} s\n"
              f"  (Mosquitto itself accepted a login on another node after "
              f"{fmt(f.get('mqtt'))} s)")
    if out["defaults"]:
        print("\n== swarm defaults (heartbeat 5 s, restart delay 5 s); image load "
              f"{out['image_load']:.1f} s added to HA")
        print(table(out["defaults"]))
        for row in out["defaults"]:
            # like for like: the same fault, and the killed node the leader or not as here
            ours = [x["figures"].get("ha") for x in out["matrix"]
                    if x["fault"] == row["fault"] and "homeassistant" in x["ran"]
                    and bool(x.get("leader")) == bool(row.get("leader"))
                    and x["figures"].get("ha") is not None]
            d = row["figures"].get("ha")
            kind = "leader" if row.get("leader") else "not leader"
            if d is not None and ours and "homeassistant" in row["ran"]:
                total = d + out["image_load"]
                print(f"{row['fault']} ({kind}): defaults {d:.1f} s + load "
                      f"{out['image_load']:.1f} s = {total:.1f} s vs ours median "
                      f"{statistics.median(ours):.1f} s: {total / statistics.median(ours):.1f}x "
                      "(goal >= 2x)")
            else:
                print(f"{row['fault']} ({kind}): defaults {fmt(d)} s; no comparable drill of "
                      "ours in this run")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
