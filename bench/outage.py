#!/usr/bin/env python3
"""Full-outage figures on the lab (a script printing figures, not a timed test).

Variants (`lab.outage.run_outage`; seconds are counted from the moment the first node comes
back):
  at-once      every node killed at the same instant, all booted together (CI runs this one:
               tests/lab/test_outage.py)
  staggered    every node killed at the same instant, booted one by one, GAP seconds apart
  last-late    nodes die one by one (pi1, then pi2 after DIE_GAP s, then pi3; rows are committed
               between the deaths, so the last to die holds the newest rows) and come back one
               by one GAP seconds apart in the same order: the last to die is the last back

For each: seconds until Galera commits a write, Mosquitto accepts a login, Home Assistant answers
HTTP (goal <= 180 s), the whole cluster converged, and rows lost (goal 0).

    python3 bench/outage.py [--variants at-once,staggered,last-late] [--gap 60] [--die-gap 20]
                            [--json out.json]

Uses the shared lab of config/lab.yml with the stack deployed; leaves it converged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import running_lab  # noqa: E402

from lab.outage import run_outage  # noqa: E402
from tasks import status  # noqa: E402


def say(msg: str) -> None:
    """A progress line."""
    print(f"    {msg}", flush=True)


def plans(names: list[str], variant: str, gap: float, die_gap: float
          ) -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
    """(kill plan, boot plan) of a variant."""
    if variant == "at-once":
        return [(0.0, n) for n in names], [(0.0, n) for n in names]
    if variant == "staggered":
        return [(0.0, n) for n in names], [(i * gap, n) for i, n in enumerate(names)]
    if variant == "last-late":
        return ([(i * die_gap, n) for i, n in enumerate(names)],
                [(i * gap, n) for i, n in enumerate(names)])
    raise SystemExit(f"unknown variant {variant!r}")


def fmt(v: float | None) -> str:
    """Seconds as text ('never': timed out)."""
    return "never" if v is None else f"{v:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="at-once,staggered,last-late")
    ap.add_argument("--gap", type=float, default=60.0, help="seconds between two boots")
    ap.add_argument("--die-gap", type=float, default=20.0, help="seconds between two deaths")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    c, lab = running_lab()
    rows: list[dict[str, Any]] = []
    try:
        for variant in [v for v in args.variants.split(",") if v]:
            kill_plan, boot_plan = plans(c.names, variant, args.gap, args.die_gap)
            print(f"\n== {variant}", flush=True)
            r = run_outage(c, kill_plan, boot_plan, log=say, measure_timeout=900)
            print(r.report(), flush=True)
            rows.append({"variant": variant, "figures": r.figures, "where": r.where,
                         "rows": r.rows_committed, "lost": r.lost, "kill": kill_plan,
                         "boot": boot_plan})
    finally:
        lab.up()
        status.wait_converged(c, 900, log=say)

    print("\n== full outage (seconds after the first node came back)")
    print(f"{'variant':<10} {'galera':>7} {'mqtt':>7} {'HA':>7} {'converged':>10} "
          f"{'rows':>5} {'lost':>5}")
    for row in rows:
        f = row["figures"]
        print(f"{row['variant']:<10} {fmt(f.get('galera')):>7} {fmt(f.get('mqtt')):>7} "
              f"{fmt(f.get('ha')):>7} {fmt(f.get('converged')):>10} {row['rows']:>5} "
              f"{len(row['lost']):>5}")
    print("goals: HA <= 180 s after the nodes' return, 0 rows lost")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    return 1 if any(row["lost"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
