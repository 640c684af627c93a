#!/usr/bin/env python3
"""An upgrade as a household feels it (a script printing figures, not a timed test).

Changes one image tag in a copy of the lab's cluster file (the same image under a new tag: to
swarm, a new image), runs `doit setup` with it while every service is probed every 0.5 s
(tasks/watch.py, as in the drills), then `doit setup` with the lab's own file, which is the way
back, probed the same way. For each: the seconds Home Assistant, MQTT and Galera writes were
unavailable, the longest gap, the containers that started, any moment two of a kind ran.

    python3 bench/upgrade.py --service homeassistant
    python3 bench/upgrade.py --service db            # the Galera rolling upgrade
    python3 bench/upgrade.py --broken                # HA to an image that cannot run HA

`--broken` builds an image of Home Assistant's with the homeassistant package removed: the
upgrade must fail (doit setup exits non-zero, naming the rollback), swarm must roll it back by
itself, and Home Assistant must keep running on the old image.

Goals (issue 15): an HA upgrade costs no more than one HA start; a Galera rolling upgrade costs
0 s of database writes. Uses the shared lab of config/lab.yml (deployed); leaves it as its file
says.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import running_lab  # noqa: E402

from lab.faults import lab_runner  # noqa: E402
from tasks import status, watch  # noqa: E402
from tasks.config import LAB_CLUSTER_FILE, PROJECT_ROOT  # noqa: E402
from tasks.mqtt_client import MQTT_USER, mqtt_password  # noqa: E402

IMAGE_KEY = {"homeassistant": "homeassistant", "db": "mariadb", "mosquitto": "mosquitto"}
AFTER = 30.0  # s probed after doit returned


def variant(service: str, suffix: str, broken: bool = False) -> Path:
    """A copy of the lab's cluster file with `service`'s image under tag+suffix (`broken`: built
    from the old one without the homeassistant package)."""
    data = yaml.safe_load(LAB_CLUSTER_FILE.read_text())
    entry = data["images"][IMAGE_KEY[service]]
    if broken:
        context = PROJECT_ROOT / "build" / "bench-broken-ha"
        context.mkdir(parents=True, exist_ok=True)
        (context / "Dockerfile").write_text(
            f"FROM {entry['image']}\n"
            "RUN rm -rf /opt/venv/lib/python3*/site-packages/homeassistant\n")
        entry["build"] = str(context.relative_to(PROJECT_ROOT))
    entry["image"] = entry["image"] + suffix
    out = PROJECT_ROOT / "build" / f"bench-upgrade-{service}.yml"
    out.parent.mkdir(exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def measured(c, lab, label: str, config: Path) -> bool:
    """`doit config=CONFIG setup` under the probes; prints the figures."""
    w = watch.Watch(c, lab_runner(lab), mqtt_user=MQTT_USER, mqtt_password=mqtt_password(c)
                    ).start()
    time.sleep(5)
    w.mark_fault()
    started = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "doit", f"config={config}", "setup"],
                       cwd=PROJECT_ROOT, capture_output=True, text=True)
    took = time.monotonic() - started
    time.sleep(AFTER)
    report = w.stop()
    print(f"\n{label}: doit setup {'ok' if p.returncode == 0 else 'FAILED'} in {took:.1f} s")
    for line in report.lines():
        print(line)
    if p.returncode:
        print(p.stdout[-3000:], p.stderr[-2000:], sep="\n")
    return p.returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--service", choices=sorted(IMAGE_KEY), default="homeassistant")
    ap.add_argument("--suffix", default="-next")
    ap.add_argument("--broken", action="store_true")
    args = ap.parse_args()
    c, lab = running_lab()
    status.wait_converged(c, 600)
    if args.broken:
        failed = not measured(c, lab, "upgrade homeassistant to a broken image",
                              variant("homeassistant", "-broken", broken=True))
        print("the upgrade failed, as it must" if failed else "THE BROKEN UPGRADE PASSED")
        # (not converged until the next deploy: swarm reports the rollback until then)
        ok = measured(c, lab, "the lab's own file again", LAB_CLUSTER_FILE) and failed
        return 0 if ok else 1
    ok = measured(c, lab, f"upgrade {args.service} (tag +{args.suffix})",
                  variant(args.service, args.suffix))
    status.wait_converged(c, 600)
    ok = measured(c, lab, f"back to the lab's {args.service} tag", LAB_CLUSTER_FILE) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
