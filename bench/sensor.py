#!/usr/bin/env python3
"""A sensor's path through failovers (a script printing figures, not a timed test).

A sensor on the lab's LAN (lab/sensor.py, through the VIP, user `sensors`) publishes a state
every second; Home Assistant's state of it is read every 0.5 s. For a kill and a link cut of the
node running Home Assistant, then of the node running Mosquitto: the longest stretch HA went
without a new state, and whether every recorded state survived. It runs the lab test
tests/lab/test_sensor.py with the link cuts added (CI runs only the kills):

    python3 bench/sensor.py [--faults kill,cut] [--repeat 2]

Uses the shared lab of config/lab.yml (deployed: `doit setup`); leaves it converged.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURE = re.compile(r"\[sensor\] (\w+) of (\w+)'s node (\w+): HA without a new state for "
                    r"([\d.]+) s at most( \(it ran both\))?(?: \(by HA's own time of each state; "
                    r"seen from this machine: ([\d.]+) s\))?")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", default="kill,cut")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    figures: list[tuple[str, str, str, float]] = []
    status = 0
    for i in range(args.repeat):
        print(f"run {i + 1}/{args.repeat}", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "tests/lab/test_sensor.py", "-m", "lab", "-q",
             "-p", "no:cacheprovider", "-k", "fault_of"],
            cwd=ROOT, env={**os.environ, "HASWARM_SENSOR_FAULTS": args.faults},
            capture_output=True, text=True)
        for m in FIGURE.finditer(proc.stdout):
            role = "both" if m[5] else m[2]  # Mosquitto's node ran Home Assistant too
            figures.append((m[1], role, m[3], float(m[4])))
            seen = f"; {float(m[6]):.1f} s as seen from here" if m[6] else ""
            print(f"  {m[1]:4} of {m[2]}'s node {m[3]}: {float(m[4]):5.1f} s without a new "
                  f"state in HA{seen}{' (it ran both)' if m[5] else ''}", flush=True)
        if proc.returncode:
            status = 1
            print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n")
    print("\nfault  node running    HA without a new state (s)")
    for fault in args.faults.split(","):
        for role in ("homeassistant", "mosquitto", "both"):
            got = [f for x, r, _, f in figures if x == fault and r == role]
            if got:
                print(f"{fault:6} {role:14} {', '.join(f'{g:.1f}' for g in got)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
