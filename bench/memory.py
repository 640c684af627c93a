#!/usr/bin/env python3
"""Resident memory of the whole stack per node (a script printing figures, not a test).

Per node:
  - lab only: the node's memory cgroup (`Lab.memory`: usage minus inactive page cache, the
    "working set" `docker stats` also reports), which holds every process of the simulated Pi:
    dockerd, containerd, the containers, glusterd and the bricks, sshd, avahi, keepalived, cron;
  - every cluster: each container's memory (`docker stats --no-stream`) and the RSS of the
    host daemons (`ps`: dockerd, containerd and its shims, gluster*, avahi-daemon, keepalived,
    sshd, dbus-daemon, cron), summed.

Goal (issue): <= 500 MB per node.

    python3 bench/memory.py [--samples 3] [--interval 5] [--json out.json]

Uses the cluster file in effect (HASWARM_CONFIG, config/cluster.yml, else the lab). Read-only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.config import Node, cluster_file, load_cluster  # noqa: E402
from tasks.remote import Remote, RemoteError  # noqa: E402

MiB = 2**20
GOAL = 500 * 10**6
DAEMONS = ("dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2",
           "docker-proxy", "glusterd", "glusterfsd", "glusterfs", "avahi-daemon",
           "keepalived", "sshd", "dbus-daemon", "cron", "tini")
_UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6,
          "gb": 10**9}


def parse_size(text: str) -> int:
    """'105.3MiB' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]+)\s*", text)
    if not m:
        return 0
    return int(float(m[1]) * _UNITS.get(m[2].lower(), 1))


def parse_stats(text: str) -> dict[str, int]:
    """`docker stats --no-stream --format '{{.Name}}\\t{{.MemUsage}}'` -> {container: bytes}."""
    out = {}
    for line in text.splitlines():
        name, sep, usage = line.partition("\t")
        if sep:
            out[name.split(".")[0]] = out.get(name.split(".")[0], 0) + parse_size(
                usage.split("/")[0])
    return out


def parse_ps(text: str) -> dict[str, int]:
    """`ps -e -o rss=,comm=` -> {daemon: bytes} for DAEMONS (summed per name)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].isdigit() and parts[1].strip() in DAEMONS:
            out[parts[1].strip()] = out.get(parts[1].strip(), 0) + int(parts[0]) * 1024
    return out


def cgroup_resident(lab: Any, name: str) -> int:
    """Lab: the node cgroup's resident memory without page cache (anonymous + mapped files +
    shmem, from memory.stat): what the kernel cannot simply drop under memory pressure."""
    stat = Path(f"/sys/fs/cgroup/memory/{lab.tag}/{name}/memory.stat").read_text()
    values = dict(line.split() for line in stat.splitlines())
    return sum(int(values.get(k, 0)) for k in ("total_rss", "total_mapped_file",
                                                 "total_shmem"))


def sample(r: Remote, node: Node) -> dict[str, Any]:
    """Per-container memory (docker stats) and daemon RSS (ps) of one node."""
    res = r.run(node, "memory", "docker stats --no-stream --format "
                "'{{.Name}}\t{{.MemUsage}}'; echo @@ps; ps -e -o rss=,comm=", timeout=60)
    stats, _, ps = res.stdout.partition("@@ps")
    return {"containers": parse_stats(stats), "daemons": parse_ps(ps)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    c = load_cluster(cluster_file())
    lab = None
    if c.lab:
        from lab.driver import Lab
        lab = Lab(c)
    results: dict[str, list[dict[str, Any]]] = {n.name: [] for n in c.nodes}
    with Remote(c) as r:
        for i in range(args.samples):
            def one(node: Node) -> dict[str, Any]:
                got = sample(r, node)
                if lab is not None:
                    got["cgroup"] = lab.memory(node.name)
                    got["resident"] = cgroup_resident(lab, node.name)
                return got

            try:
                for name, got in r.on_all("memory", one).items():
                    results[name].append(got)
            except RemoteError as e:
                print(f"some nodes did not answer:\n{e}", file=sys.stderr)
            if i + 1 < args.samples:
                time.sleep(args.interval)

    worst = worst_resident = 0
    print(f"memory per node, max of {args.samples} samples (MiB)")
    for name, samples in results.items():
        if not samples:
            print(f"{name}: no answer")
            continue
        containers: dict[str, int] = {}
        daemons: dict[str, int] = {}
        for s in samples:
            for k, v in s["containers"].items():
                containers[k] = max(containers.get(k, 0), v)
            for k, v in s["daemons"].items():
                daemons[k] = max(daemons.get(k, 0), v)
        ctotal, dtotal = sum(containers.values()), sum(daemons.values())
        cg = max((s.get("cgroup") or 0) for s in samples)
        resident = max((s.get("resident") or 0) for s in samples)
        total = cg if lab is not None else ctotal + dtotal
        worst = max(worst, total)
        worst_resident = max(worst_resident, resident if lab is not None else total)
        if lab is not None:
            print(f"{name}: {total / MiB:.0f} MiB node cgroup working set (Lab.memory), "
                  f"{resident / MiB:.0f} MiB resident without page cache; containers "
                  f"{ctotal / MiB:.0f} MiB, daemons {dtotal / MiB:.0f} MiB RSS")
        else:
            print(f"{name}: {total / MiB:.0f} MiB = containers {ctotal / MiB:.0f} MiB + "
                  f"daemons {dtotal / MiB:.0f} MiB RSS")
        for k, v in sorted(containers.items(), key=lambda kv: -kv[1]):
            print(f"    container {k:<28} {v / MiB:7.0f}")
        for k, v in sorted(daemons.items(), key=lambda kv: -kv[1]):
            print(f"    daemon    {k:<28} {v / MiB:7.0f}")
    print(f"worst node: {worst / MiB:.0f} MiB ({worst / 1e6:.0f} MB); goal <= "
          f"{GOAL / 1e6:.0f} MB per node: {'met' if worst <= GOAL else 'NOT met'}")
    if lab is not None:
        print(f"worst node without page cache: {worst_resident / MiB:.0f} MiB "
              f"({worst_resident / 1e6:.0f} MB): "
              f"{'met' if worst_resident <= GOAL else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if worst <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
