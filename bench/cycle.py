#!/usr/bin/env python3
"""Setup/clean cycles on the lab (a script printing figures, not a timed test).

Runs `doit clean`, then CYCLES times `doit setup` + `doit clean`, snapshotting every node after
each clean (mounts, fstab, cron, Avahi host name, Gluster peers and volumes, swarm state,
containers, Docker volumes and networks, daemon.json: the same snapshot as
tests/lab/test_cycle.py) and printing the wall time of each run and whether every snapshot equals
the first. Ends with a `doit setup` so the lab is left deployed.

    python3 bench/cycle.py [--cycles 3]

Uses the shared lab of config/lab.yml; exit status 1 when a snapshot differs or a run fails.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.driver import Lab  # noqa: E402
from tasks.config import LAB_CLUSTER_FILE, load_cluster  # noqa: E402
from tests.lab.conftest import doit  # noqa: E402
from tests.lab.test_cycle import snapshot  # noqa: E402


def run(*args: str) -> float:
    r = doit(*args)
    print(f"  {r.how}: {r.seconds:.1f} s" + ("" if r.ok else "  FAILED"), flush=True)
    if not r.ok:
        print(r.output[-4000:])
        raise SystemExit(1)
    return r.seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=3)
    args = ap.parse_args()
    lab = Lab(load_cluster(LAB_CLUSTER_FILE))
    lab.up()
    run("clean")
    first = snapshot(lab)
    same = True
    for i in range(1, args.cycles + 1):
        print(f"cycle {i}", flush=True)
        run("setup")
        run("clean")
        now = snapshot(lab)
        for node in first:
            if now[node] != first[node]:
                same = False
                print(f"  {node} differs from the first clean:")
                print("".join(difflib.unified_diff(first[node].splitlines(True),
                                                   now[node].splitlines(True))))
    print(f"after {args.cycles} cycles every node is "
          + ("identical to the first clean" if same else "NOT identical (diff above)"))
    run("setup")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
