#!/usr/bin/env python3
"""Preload timings on lab nodes (a script, not a test).

Prints:
  - wall time and bytes of a first preload to one node alone, and to all nodes at once
    through the relay (tasks/images/relay.py; goals: the bytes leaving the controller = 1x the
    image set, the time <= 1.3x one node's);
  - with --compare, the same without the relay (every node its own stream from here);
  - bytes sent and wall time of a second run (goals: 0 bytes, <= 2 s).

--throttle RATE limits the controller's link to the nodes (a tc token bucket on the lab
bridge, e.g. 100mbit: a Pi's Ethernet), the case the relay is for; --nodes N (default 3).

Which nodes: by default a private lab instance (`lab.driver.instance_lab("pb3")`: nodes
pb31..pb33 on their own bridge and subnet, state in .lab/instance-pb3) is started for the run
and purged afterwards, so nobody else's lab is disturbed; `--shared-lab` uses the running lab of
config/lab.yml instead. To
measure a first run, the manifest's images are removed from the lab nodes first (lab nodes only,
never the controller's engine).

Which images: build/images/manifest.json when `doit images` has saved the whole stack, else
(or with `--small`) a manifest of the local Debian base plus a one-file image built on it.

    python3 bench/preload.py [--shared-lab] [--small] [--manifest PATH] [--keep] [--nodes N]
                             [--throttle 100mbit] [--compare]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tasks.images as images  # noqa: E402
from tasks.config import LAB_CLUSTER_FILE, Cluster, load_cluster  # noqa: E402
from tasks.remote import Remote  # noqa: E402

INSTANCE = "pb"  # + the node count: pb3, pb5


def small_manifest(c: Cluster, d: Path) -> Path:
    """The Debian base + an image with one small layer on it, saved with a manifest in `d`."""
    platform = images.Platform.parse(c.platform)
    base = images.ensure_base("debian:bookworm", platform, d / "base")
    refs = {"base": "haswarm-bench/preload-base:1", "app": "haswarm-bench/preload-app:1"}
    subprocess.run(["docker", "tag", base.use, refs["base"]], check=True)
    ctx = d / "ctx"
    ctx.mkdir()
    (ctx / "hello").write_text("bench\n")
    (ctx / "Dockerfile").write_text(f"FROM {refs['base']}\nCOPY hello /hello\n")
    subprocess.run(["docker", "build", "-q", "--platform", c.platform, "-t", refs["app"],
                    str(ctx)], check=True, capture_output=True,
                   env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/bin"})
    out = d / "images"
    out.mkdir()
    manifest = {}
    for service, ref in refs.items():
        info = images.verify_local(ref, platform)
        subprocess.run(["docker", "save", "-o", str(out / f"{service}.tar"), ref], check=True)
        manifest[service] = {"image": ref, "id": info["Id"], "platform": c.platform,
                             "tar": f"{service}.tar", "layers": info["RootFS"]["Layers"]}
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2))
    return path


def remove_images(c: Cluster, nodes: list[str], wanted: list[images.Wanted]) -> None:
    """Remove the manifest's images from lab nodes (by ID, then dangling layers)."""
    if not c.lab:
        raise SystemExit("refusing to remove images: not a lab cluster")
    ids = " ".join(shlex.quote(w.id) for w in wanted)
    with Remote(c) as r:
        r.run_all("bench: remove images",
                  f"docker image rm -f {ids} >/dev/null 2>&1; docker image prune -f >/dev/null;"
                  " true", nodes)


def throttle(bridge: str, rate: str | None) -> None:
    """Limit (rate) or free (None) what leaves this machine for the lab nodes: a token bucket
    on the bridge's own egress (bridged node-to-node traffic does not pass it)."""
    if rate is None:
        subprocess.run(["tc", "qdisc", "del", "dev", bridge, "root"], capture_output=True)
        return
    subprocess.run(["tc", "qdisc", "replace", "dev", bridge, "root", "tbf", "rate", rate,
                    "burst", "256kb", "latency", "100ms"], check=True)


def timed(c: Cluster, manifest: Path, nodes: list[str]) -> tuple[float, int, float, float]:
    """(wall seconds, bytes sent, slowest upload seconds, this process's CPU seconds)."""
    t0, cpu0 = time.monotonic(), os.times()
    reports = images.preload(c, manifest, nodes)
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return (time.monotonic() - t0, sum(r.bytes_sent for r in reports.values()),
            max(r.upload_seconds for r in reports.values()), cpu)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared-lab", action="store_true", help="use the running config/lab.yml")
    ap.add_argument("--small", action="store_true", help="small manifest even if the stack "
                    "is built")
    ap.add_argument("--manifest", type=Path, help="a manifest.json to preload")
    ap.add_argument("--keep", action="store_true", help="leave the private lab running")
    ap.add_argument("--nodes", type=int, default=3, help="nodes of the private lab")
    ap.add_argument("--throttle", metavar="RATE", help="the controller's link, e.g. 100mbit")
    ap.add_argument("--compare", action="store_true", help="also all nodes without the relay")
    args = ap.parse_args()

    from lab.driver import Lab, instance_lab

    lab = (Lab(load_cluster(LAB_CLUSTER_FILE)) if args.shared_lab
           else instance_lab(f"{INSTANCE}{args.nodes}", args.nodes))
    c = lab.cluster
    direct = c.model_copy(update={"preload": c.preload.model_copy(update={"relay": False})})
    c = c.model_copy(update={"preload": c.preload.model_copy(update={"relay": True})})
    t0 = time.monotonic()
    lab.up()
    print(f"lab {'(shared)' if args.shared_lab else repr(INSTANCE + str(args.nodes))} up in "
          f"{time.monotonic() - t0:.1f} s: {', '.join(f'{n.name}={n.address}' for n in c.nodes)}")
    tmp = Path(tempfile.mkdtemp(prefix="haswarm-bench-"))
    try:
        real = images.manifest_path(load_cluster(LAB_CLUSTER_FILE))
        if args.manifest:
            manifest = args.manifest
        elif not args.small and real.exists() and all(
                w.tar.exists() and w.platform == c.platform for w in images.read_manifest(real)):
            manifest = real
        else:
            manifest = small_manifest(c, tmp)
        wanted = images.read_manifest(manifest)
        size = sum(w.tar.stat().st_size for w in wanted)
        print(f"manifest {manifest}: {', '.join(w.ref for w in wanted)} "
              f"({size / 1e6:.0f} MB of tarballs)")
        one = c.names[:1]
        if args.throttle:
            throttle(lab.bridge, args.throttle)
            print(f"the controller's link to the nodes limited to {args.throttle}")

        remove_images(c, c.names, wanted)
        t_one, b_one, up_one, cpu_one = timed(c, manifest, one)
        rows = []
        if args.compare:
            remove_images(c, c.names, wanted)
            rows.append((f"first run, {len(c.names)} nodes, no relay",
                         *timed(direct, manifest, c.names)))
        remove_images(c, c.names, wanted)
        t_all, b_all, up_all, cpu_all = timed(c, manifest, c.names)
        rows.append((f"first run, {len(c.names)} nodes, relay", t_all, b_all, up_all, cpu_all))
        t_again, b_again, _, _ = timed(c, manifest, c.names)

        ratio = t_all / t_one if t_one else float("inf")
        sent = b_all / b_one if b_one else float("inf")
        print()
        print(f"{'':<34} {'wall':>9}  {'sent':>11}  {'upload':>7}  controller CPU")
        print(f"{'first run, ' + one[0] + ' alone':<34} {t_one:7.2f} s  {b_one / 1e6:8.1f} MB"
              f"  {up_one:5.1f} s  {cpu_one:5.1f} s")
        for label, t, b, up, cpu in rows:
            print(f"{label:<34} {t:7.2f} s  {b / 1e6:8.1f} MB  {up:5.1f} s  {cpu:5.1f} s   "
                  f"time {t / t_one:.2f}x, bytes {b / b_one:.2f}x of one node's")
        print(f"{'second run, all nodes':<34} {t_again:7.2f} s  {b_again:8d} B    "
              f"(goals: 0 bytes, <= 2 s)")
        print(f"goals: relay time {ratio:.2f}x (<= 1.3x), bytes leaving the controller "
              f"{sent:.2f}x the image set (1x)")
        print(f"(machine load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: lab "
              "nodes share this machine's CPUs and disk, real Pis unpack on their own)")
        ok = ratio <= 1.3 and sent <= 1.01 and b_again == 0 and t_again <= 2
        print("goals met" if ok else "GOALS MISSED")
        return 0 if ok else 1
    finally:
        if args.throttle:
            throttle(lab.bridge, None)
        for ref in ("haswarm-bench/preload-app:1", "haswarm-bench/preload-base:1"):
            subprocess.run(["docker", "image", "rm", ref], capture_output=True)
        subprocess.run(["rm", "-rf", str(tmp)])
        if not args.shared_lab and not args.keep:
            lab.down(purge=True)
            shutil.rmtree(lab.state_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
