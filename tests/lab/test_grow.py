"""Grow and shrink (issue "Day two"; README "Add or remove a Pi"), end to end on the shared lab:
the cluster file lists one more Pi (pi4: bare, booted by lab-up), `doit setup`; then a fifth
(pi5), `doit setup`; then the two are taken out of `nodes:` again while they still run, `doit
setup`.

- four nodes: three managers and pi4 a worker (an odd raft);
- grown to five: pi4 promoted, 5 Ready managers; the volume a replica 5 with a brick on each,
  nothing to heal, a file written before on pi5's brick; pi5's db Synced in a Galera of 5 with
  a row written before; the retained message; a second setup has nothing to do;
- shrunk: the leavers drained and cleaned by `depart` (no stack container, no mount, no fstab
  line, out of the swarm, detached from the pool), the volume a replica 3 on pi1-pi3, a Galera
  of 3, the data all there.

Prints the times (`pytest -s`). The module leaves the lab as it was (pi4 and pi5 off, disks gone).
"""

from __future__ import annotations

import re
import time

import pytest
import yaml

from lab.driver import Lab
from tasks import status
from tasks.config import LAB_CLUSTER_FILE, load_cluster

from .conftest import Tools, doit
from .test_replace import QUIET, check_data_back, forget_node, plant_data, ready, remove_data

pytestmark = pytest.mark.lab
__all__ = ["ready"]  # the fixture, shared with test_replace

NEW = {"pi4": "10.77.0.14", "pi5": "10.77.0.15"}


def say(msg: str) -> None:
    print(f"  [grow] {msg}", flush=True)


def grown_cluster_file(count: int = len(NEW)):
    """lab.yml with the first `count` of pi4 and pi5 added (beside it: the same key paths)."""
    data = yaml.safe_load(LAB_CLUSTER_FILE.read_text())
    data["nodes"] += [{"name": n, "address": a} for n, a in list(NEW.items())[:count]]
    path = LAB_CLUSTER_FILE.with_name(f".test-grown{count}-lab.yml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def swarm_nodes(tools) -> list[str]:
    return sorted(x for x in tools.sh("pi1", "docker node ls --format '{{.Hostname}} "
                                             "{{.Status}} {{.ManagerStatus}}'").split("\n") if x)


def check_roles(tools) -> dict[str, str]:
    out = tools.sh("pi1", "docker node ls -q | xargs docker node inspect --format "
                          "'{{.Description.Hostname}} {{.Spec.Role}}'")
    return dict(line.split() for line in out.splitlines() if line.strip())


def bricks(c, tools) -> list[str]:
    info = tools.sh("pi1", f"gluster --mode=script volume info {c.gluster.volume}")
    assert f"1 x {len(c.nodes)} = {len(c.nodes)}" in info, info
    return sorted(re.findall(r"Brick\d+: (\S+)", info))


def test_grow_to_five_nodes_and_shrink_back_to_three(lab, ready, tools, capsys):
    c = ready
    token, topic = plant_data(c, tools, "grow")
    cfg = grown_cluster_file()
    c5 = load_cluster(cfg)
    lab5 = Lab(c5)
    tools5 = Tools(lab5, c5)
    for n in NEW:
        forget_node(lab5, n)  # bare Pis, whatever an earlier run left
    grow = shrink = None
    cfg4 = grown_cluster_file(1)
    try:
        say("the cluster file lists pi4 too")
        t0 = time.monotonic()
        four = doit(f"config={cfg4}", "setup")  # lab-up boots pi4 bare first
        assert four.ok, four.output[-6000:]
        c4 = load_cluster(cfg4)
        status.wait_converged(c4, 900, log=say)
        t_four = time.monotonic() - t0
        for needle in ("add brick 10.77.0.14:", "replica 3 -> 4", "pi4: swarm: join as worker"):
            assert needle in four.output, needle
        nodes = swarm_nodes(tools5)
        assert [x.split()[:2] for x in nodes] == [[f"pi{i}", "Ready"] for i in range(1, 5)], \
            nodes
        assert check_roles(tools5) == {"pi1": "manager", "pi2": "manager", "pi3": "manager",
                                       "pi4": "worker"}

        say("and pi5")
        t0 = time.monotonic()
        grow = doit(f"config={cfg}", "setup")  # lab-up boots pi5 bare first
        assert grow.ok, grow.output[-6000:]
        status.wait_converged(c5, 900, log=say)
        t_grow = time.monotonic() - t0
        for needle in ("add brick 10.77.0.15:", "replica 4 -> 5", "pi5: swarm: join as manager",
                       "promote pi4 (a worker) to manager"):
            assert needle in grow.output, needle
        nodes = swarm_nodes(tools5)
        assert [x.split()[0] for x in nodes] == sorted(c5.names), nodes
        assert all(re.fullmatch(r"pi\d Ready (Leader|Reachable)", x) for x in nodes), nodes
        assert bricks(c5, tools5) == sorted(f"{n.address}:{c5.gluster.brick_dir}"
                                            for n in c5.nodes)
        check_data_back(c5, tools5, "pi5", token, topic)
        again = doit(f"config={cfg}", "setup")
        assert again.ok, again.output[-4000:]
        for step in ("depart", *QUIET):
            assert f": {step}: nothing to do" in again.output, [
                line for line in again.output.splitlines() if f": {step}:" in line]

        say(f"{', '.join(NEW)} taken out of the cluster file (still running)")
        t1 = time.monotonic()
        shrink = doit("setup")
        assert shrink.ok, shrink.output[-6000:]
        status.wait_converged(c, 900, log=say)
        t_shrink = time.monotonic() - t1
        for n, a in NEW.items():
            for needle in (f"depart: {n} ({a}) left the cluster file and still answers",
                           f"drain {n}", f"remove brick {a}:", f"detach {a}",
                           f"{n} leaves the swarm"):
                assert needle in shrink.output, needle
            left = tools5.sh(n, "docker info --format '{{.Swarm.LocalNodeState}}'; "
                                "docker ps -q | wc -l; "
                                f"grep -c ' {c.gluster.mount_point} ' /proc/mounts; "
                                f"grep -c haswarm /etc/fstab; "
                                "gluster --mode=script pool list | grep -c Connected",  # localhost
                             check=False).split()
            assert left == ["inactive", "0", "0", "0", "1"], (n, left)
        nodes = swarm_nodes(tools)
        assert [x.split()[0] for x in nodes] == sorted(c.names), nodes
        assert bricks(c, tools) == sorted(f"{n.address}:{c.gluster.brick_dir}"
                                          for n in c.nodes)
        pool = tools.sh("pi1", "gluster --mode=script pool list")
        assert pool.count("Connected") == 3 and not any(a in pool for a in NEW.values()), pool
        check_data_back(c, tools, "pi3", token, topic)
    finally:
        for n in NEW:
            forget_node(lab5, n)
        cfg.unlink()
        cfg4.unlink()
        if shrink is None or not shrink.ok:  # leave the shared lab as it was
            doit("setup")
            status.wait_converged(c, 900, log=say)
    remove_data(c, tools, topic)
    with capsys.disabled():
        print(f"\n[grow] 3 -> 4 nodes: converged {t_four:.1f} s after `doit setup` started "
              f"(setup {four.seconds:.1f} s); 4 -> 5: converged {t_grow:.1f} s "
              f"(setup {grow.seconds:.1f} s; second setup {again.seconds:.1f} s); 5 -> 3 (the "
              f"two still running): converged {t_shrink:.1f} s (setup {shrink.seconds:.1f} s)")
