"""Grow and shrink (issue "Day two"; README "Add or remove a Pi"), end to end on the shared lab:
the cluster file lists one more Pi (pi4: bare, booted by lab-up), `doit setup`; then pi4 is
taken out of `nodes:` again while it still runs, `doit setup`. (Five nodes and back, with what
the household feels meanwhile: `bench/grow.py`, kept out of CI for its time.)

- grown to four: three managers and pi4 a worker (an odd raft); the volume a replica 4 with a
  brick on each, nothing to heal, a file written before on pi4's brick; pi4's db Synced in a
  Galera of 4 with a row written before; the retained message; a second setup has nothing to do;
- neither change restarts a container of the stack on pi1-pi3 (the node list is a file the
  keepers read, not part of the services' specs);
- shrunk: pi4 drained and cleaned by `depart` (no stack container, no mount, no fstab line, out
  of the swarm, detached from the pool), the volume a replica 3 on pi1-pi3, a Galera of 3, the
  data all there.

Prints the times (`pytest -s`). The module leaves the lab as it was (pi4 off, its disk gone).
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


def stack_containers(c, tools) -> dict[str, list[str]]:
    """{node: the stack's running containers on it, 'service id'} for the nodes of `c`."""
    out = {}
    for n in c.names:
        lines = tools.sh(n, f"docker ps --filter label=com.docker.stack.namespace={c.name} "
                            "--format '{{.Label \"com.docker.swarm.service.name\"}} {{.ID}}'")
        out[n] = sorted(x for x in lines.splitlines() if x.strip())
    return out


def test_grow_to_four_nodes_and_shrink_back_to_three(lab, ready, tools, capsys):
    c = ready
    token, topic = plant_data(c, tools, "grow")
    before = stack_containers(c, tools)  # a grow or shrink must restart none of them
    cfg = grown_cluster_file(1)
    c4 = load_cluster(cfg)
    lab4 = Lab(c4)
    tools4 = Tools(lab4, c4)
    n, a = "pi4", NEW["pi4"]
    forget_node(lab4, n)  # a bare Pi, whatever an earlier run left
    shrink = None
    try:
        say("the cluster file lists pi4 too")
        t0 = time.monotonic()
        grow = doit(f"config={cfg}", "setup")  # lab-up boots pi4 bare first
        assert grow.ok, grow.output[-6000:]
        status.wait_converged(c4, 900, log=say)
        t_grow = time.monotonic() - t0
        for needle in (f"add brick {a}:", "replica 3 -> 4", "pi4: swarm: join as worker"):
            assert needle in grow.output, needle
        nodes = swarm_nodes(tools4)
        assert [x.split()[:2] for x in nodes] == [[f"pi{i}", "Ready"] for i in range(1, 5)], \
            nodes
        assert check_roles(tools4) == {"pi1": "manager", "pi2": "manager", "pi3": "manager",
                                       "pi4": "worker"}
        assert bricks(c4, tools4) == sorted(f"{x.address}:{c4.gluster.brick_dir}"
                                            for x in c4.nodes)
        check_data_back(c4, tools4, n, token, topic)
        # the node list is a file the keepers read, not a part of the services' specs
        assert {k: v for k, v in stack_containers(c4, tools4).items() if k != n} == before
        assert tools4.sh(n, "cat /etc/haswarm/members/nodes").split() == [
            x.address for x in c4.nodes]
        again = doit(f"config={cfg}", "setup")
        assert again.ok, again.output[-4000:]
        for step in ("depart", *QUIET):
            assert f": {step}: nothing to do" in again.output, [
                line for line in again.output.splitlines() if f": {step}:" in line]

        say("pi4 taken out of the cluster file (still running)")
        t1 = time.monotonic()
        shrink = doit("setup")
        assert shrink.ok, shrink.output[-6000:]
        status.wait_converged(c, 900, log=say)
        t_shrink = time.monotonic() - t1
        for needle in (f"depart: {n} ({a}) left the cluster file and still answers",
                       f"drain {n}", f"remove brick {a}:", f"detach {a}", f"{n} leaves the swarm"):
            assert needle in shrink.output, needle
        left = tools4.sh(n, "docker info --format '{{.Swarm.LocalNodeState}}'; "
                            "docker ps -q | wc -l; "
                            f"grep -c ' {c.gluster.mount_point} ' /proc/mounts; "
                            f"grep -c haswarm /etc/fstab; "
                            "gluster --mode=script pool list | grep -c Connected; "  # localhost
                            "ls /etc/haswarm/members 2>/dev/null | wc -l",
                         check=False).split()
        assert left == ["inactive", "0", "0", "0", "1", "0"], left
        nodes = swarm_nodes(tools)
        assert [x.split()[0] for x in nodes] == sorted(c.names), nodes
        assert bricks(c, tools) == sorted(f"{x.address}:{c.gluster.brick_dir}" for x in c.nodes)
        pool = tools.sh("pi1", "gluster --mode=script pool list")
        assert pool.count("Connected") == 3 and a not in pool, pool
        check_data_back(c, tools, "pi3", token, topic)
        assert stack_containers(c, tools) == before
        for node in c.names:
            assert tools.sh(node, "cat /etc/haswarm/members/nodes").split() == [
                x.address for x in c.nodes]
    finally:
        forget_node(lab4, n)
        cfg.unlink()
        if shrink is None or not shrink.ok:  # leave the shared lab as it was
            doit("setup")
            status.wait_converged(c, 900, log=say)
    remove_data(c, tools, topic)
    with capsys.disabled():
        print(f"\n[grow] 3 -> 4 nodes: converged {t_grow:.1f} s after `doit setup` started "
              f"(setup {grow.seconds:.1f} s; second setup {again.seconds:.1f} s); 4 -> 3 (pi4 "
              f"still running): converged {t_shrink:.1f} s (setup {shrink.seconds:.1f} s)")
