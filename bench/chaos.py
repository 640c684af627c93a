#!/usr/bin/env python3
"""Chaos soak on the lab: random faults, every service probed throughout (figures, not a test).

See lab/chaos.py for what one run does. At the end it prints availability % per service,
every gap with the fault that was active when it began, the containers that started (restart /
move), every moment two Home Assistants ran, and what was lost.

    python3 bench/chaos.py --minutes 30                 # the issue's soak: a fault ~every 2 min
    python3 bench/chaos.py --faults 3 --spacing 30,60   # a short run
    python3 bench/chaos.py --seed 7 --json out.json

Goal (issue): over 30 minutes with a fault about every 2 minutes, HA availability >= 99.5 %,
0 items lost, converged at the end without an operator. Uses the shared lab (deployed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import running_lab  # noqa: E402

from lab.chaos import run_chaos  # noqa: E402


def say(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pair(text: str) -> tuple[float, float]:
    low, high = (float(x) for x in text.split(","))
    return low, high


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
    c, lab = running_lab()
    result = run_chaos(c, lab, count=args.faults, minutes=args.minutes,
                       kinds=tuple(k for k in args.kinds.split(",") if k),
                       spacing=pair(args.spacing), hold=pair(args.hold), after=args.after,
                       seed=args.seed, log=say)
    print("\n".join(result.lines()))
    ha = result.report.probes["ha"].percent
    print(f"  Home Assistant availability {ha:.2f} % (goal >= 99.5 %); seed {args.seed}")
    if args.json:
        r = result.report
        args.json.write_text(json.dumps({
            "faults": [f.__dict__ for f in result.faults], "lost": result.lost,
            "converged": result.converged,
            "probes": {k: {"percent": a.percent, "down": a.down, "gaps": a.gaps}
                       for k, a in r.probes.items()},
            "starts": [s.__dict__ for s in r.starts],
            "overlaps": [o.__dict__ for o in r.overlaps]}, indent=2, default=str))
    return 1 if result.lost or result.converged is None or result.report.overlaps else 0


if __name__ == "__main__":
    sys.exit(main())
