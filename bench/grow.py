#!/usr/bin/env python3
"""Grow the lab to five nodes and shrink it back, as a household feels it (figures, not a test).

    python3 bench/grow.py            # 3 -> 5, on 5: a no-op setup and a drill, 5 -> 3
    python3 bench/grow.py --no-drill

1. A copy of the lab's cluster file lists pi4 and pi5 too (bare Pis, booted by lab-up): `doit
   config=COPY setup` while every service is probed every 0.5 s (tasks/watch.py, as in the
   drills): the time to converge, the seconds Home Assistant, MQTT and Galera writes were
   unavailable, the containers that started.
2. On the five nodes: `doit setup` again (a no-op: its time), then `doit drill` (a kill of Home
   Assistant's node; the drill prints its own figures).
3. The lab's own file again (pi4 and pi5 still running: `depart` drains and cleans them), probed
   the same way. pi4 and pi5 are then switched off and their disks removed.

Uses the shared lab of config/lab.yml (deployed); leaves it as its file says.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import running_lab  # noqa: E402

from lab.driver import Lab  # noqa: E402
from lab.faults import lab_runner  # noqa: E402
from tasks import status, watch  # noqa: E402
from tasks.config import LAB_CLUSTER_FILE, PROJECT_ROOT, load_cluster  # noqa: E402
from tasks.mqtt_client import MQTT_USER, mqtt_password  # noqa: E402

NEW = {"pi4": "10.77.0.14", "pi5": "10.77.0.15"}
AFTER = 30.0  # s probed after the cluster converged


def grown_file() -> Path:
    data = yaml.safe_load(LAB_CLUSTER_FILE.read_text())
    data["nodes"] += [{"name": n, "address": a} for n, a in NEW.items()]
    out = LAB_CLUSTER_FILE.with_name(".bench-grown-lab.yml")  # beside lab.yml: its key paths
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def doit(*args: str) -> tuple[bool, float, str]:
    started = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "doit", *args], cwd=PROJECT_ROOT,
                       capture_output=True, text=True)
    return p.returncode == 0, time.monotonic() - started, p.stdout + p.stderr


def measured(c_probe, c_target, lab, label: str, config: Path) -> bool:
    """`doit config=CONFIG setup` under the probes (of `c_probe`'s services); prints figures."""
    w = watch.Watch(c_probe, lab_runner(lab), mqtt_user=MQTT_USER,
                    mqtt_password=mqtt_password(c_probe)).start()
    time.sleep(5)
    w.mark_fault()
    ok, took, out = doit(f"config={config}", "setup")
    converged = time.monotonic()
    if ok:
        status.wait_converged(c_target, 900)
    conv = took + time.monotonic() - converged
    time.sleep(AFTER)
    report = w.stop()
    print(f"\n{label}: doit setup {'ok' if ok else 'FAILED'} in {took:.1f} s, converged "
          f"{conv:.1f} s after it started")
    for line in report.lines():
        print(line)
    if not ok:
        print(out[-4000:])
    return ok


def forget(lab: Lab, name: str) -> None:
    lab.kill(name)
    shutil.rmtree(lab.node_dir(name), ignore_errors=True)
    subprocess.run(["ssh-keygen", "-f", str(lab.known_hosts), "-R", lab.node(name).address],
                   capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-drill", action="store_true")
    args = ap.parse_args()
    c, lab = running_lab()
    status.wait_converged(c, 600)
    cfg = grown_file()
    c5 = load_cluster(cfg)
    lab5 = Lab(c5)
    for n in NEW:
        forget(lab5, n)
    try:
        # probes and census on all five (a service may run on pi4 or pi5 meanwhile)
        ok = measured(c5, c5, lab5, "3 -> 5 nodes (pi4, pi5 bare)", cfg)
        if ok:
            noop_ok, noop, _ = doit(f"config={cfg}", "setup")
            print(f"\non 5 nodes: a no-op doit setup {'ok' if noop_ok else 'FAILED'} in "
                  f"{noop:.1f} s")
            if not args.no_drill:
                drill_ok, took, out = doit(f"config={cfg}", "drill")
                print(f"\non 5 nodes: doit drill {'ok' if drill_ok else 'FAILED'} in "
                      f"{took:.1f} s")
                print("\n".join(line for line in out.splitlines()
                                if not line.startswith(("pi", ".", "--"))))
                status.wait_converged(c5, 900)
        ok = measured(c5, c, lab5, "5 -> 3 nodes (pi4, pi5 still running)",
                      LAB_CLUSTER_FILE) and ok
    finally:
        for n in NEW:
            forget(lab5, n)
        cfg.unlink(missing_ok=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
