"""The whole graph on the lab, last of the lab modules (tests/conftest.py orders them):

- a changed value re-runs only what depends on it;
- `doit plan` shows exactly a change made by hand on one node, and setup repairs it;
- a node that drops off the network in the middle of `doit setup` fails it with the node's name
  and the step, and the next `doit setup` resumes and completes;
- `doit clean` is the mirror of `doit setup`: the nodes after clean -> setup -> clean are what
  they were after the first clean (mounts, fstab, cron, peers, swarm, containers, volumes).

Leaves the cluster deployed again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import yaml

from dodo import SETUP
from tasks import plan, status
from tasks.config import LAB_CLUSTER_FILE, PROJECT_ROOT
from tests.lab.conftest import Run, doit

pytestmark = pytest.mark.lab

SNAPSHOT = r"""
echo "## mounts"; grep -E ' (fuse\.glusterfs|glusterfs) ' /proc/mounts | awk '{print $2, $3}' | sort
echo "## fstab"; cat /etc/fstab
echo "## cron"; ls /etc/cron.d | sort
echo "## avahi"; grep -E '^#?host-name' /etc/avahi/avahi-daemon.conf || true
echo "## peers"; gluster --mode=script pool list | awk 'NR>1 {print $2, $3}' | sort
echo "## volumes"; gluster --mode=script volume list 2>&1 | sort
echo "## swarm"; docker info --format '{{.Swarm.LocalNodeState}}'
echo "## containers"; docker ps -a --format '{{.Names}}' | sort
echo "## docker volumes"; docker volume ls -q | sort
echo "## daemon.json"; cat /etc/docker/daemon.json 2>/dev/null || echo none
echo "## networks"; docker network ls --format '{{.Name}}' | sort
"""


def snapshot(lab) -> dict[str, str]:
    return {name: lab.exec(name, SNAPSHOT, check=False).stdout for name in lab.names}


def ran(output: str) -> set[str]:
    """Tasks doit executed (`.  NAME`), not those up to date (`-- NAME`)."""
    return {line[3:].strip() for line in output.splitlines() if line.startswith(".  ")}


ALWAYS = {"lab-up", "lab-engine", "preflight", "base-image"}  # cheap checks on every setup
# Remote steps run on every setup: the nodes are the truth, not doit's stamps (the list `doit
# plan` runs dry).
REMOTE = {name for name, _ in plan.steps(SETUP)}


def test_changing_one_value_reruns_only_what_depends_on_it(deployed):
    data = yaml.safe_load(LAB_CLUSTER_FILE.read_text())
    data["mqtt"]["autosave_interval"] += 1
    changed = LAB_CLUSTER_FILE.with_name(".test-changed-lab.yml")  # beside it: same key paths
    changed.write_text(yaml.safe_dump(data))
    try:
        run = doit(f"config={changed}", "setup")
        assert run.ok, run.output[-4000:]
        executed = ran(run.output) - ALWAYS - REMOTE
        assert executed == {"render:mosquitto/mosquitto.conf", "render:stack.yml",
                            "render:stack.bootstrap.yml"}, executed
        # the remote steps ask the nodes every time; only the stack has something to do
        for step in ("gluster:volume", "gluster:mount", "avahi:hostname", "ha-files"):
            assert f"{step}: nothing to do" in run.output, step
        assert "stack: docker stack deploy" in run.output
    finally:
        changed.unlink()
        back = doit("setup")
    assert back.ok, back.output[-4000:]


def would(output: str) -> list[str]:
    """The lines where `doit plan` says it would change something."""
    return [line for line in output.splitlines() if ": would " in line]


def test_plan_shows_exactly_a_change_made_by_hand(lab, deployed):
    """`doit plan` reads every node: nothing on a converged cluster; haswarm's fstab line removed
    by hand on one node is exactly what it shows (doit's stamps cannot hide it), and the next
    `doit setup` puts it back."""
    converged = doit("plan")
    assert converged.ok, converged.output[-4000:]
    assert would(converged.output) == [] and "cannot tell" not in converged.output, \
        converged.output[-4000:]
    lab.exec("pi2", "sed -i '\\#/mnt/haswarm #d' /etc/fstab")
    changed = doit("plan")
    assert changed.ok, changed.output[-4000:]
    assert would(changed.output) == [
        "pi2: gluster:mount: would write haswarm's line in /etc/fstab (/mnt/haswarm)"], \
        changed.output[-4000:]
    assert "/mnt/haswarm " not in lab.exec("pi2", "cat /etc/fstab").stdout  # plan changed nothing
    fixed = doit("setup")
    assert fixed.ok, fixed.output[-4000:]
    assert "pi2: gluster:mount: write haswarm's line in /etc/fstab" in fixed.output
    assert "/mnt/haswarm " in lab.exec("pi2", "cat /etc/fstab").stdout
    print(f"\n[cycle] doit plan on the converged lab: {converged.seconds:.1f} s")


def setup_cutting_a_node_at(lab, node: str, task: str) -> tuple[Run, float]:
    """`doit setup`, with `node`'s link cut as soon as doit starts `task`; the run and the
    seconds from the cut to doit's exit."""
    env = {**os.environ, "HASWARM_CONFIG": str(LAB_CLUSTER_FILE)}
    started = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "doit", "setup"], cwd=PROJECT_ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         stdin=subprocess.DEVNULL)
    killer = threading.Timer(1800, p.kill)
    killer.start()
    lines: list[str] = []
    cut_at = None
    assert p.stdout is not None
    for line in p.stdout:
        lines.append(line)
        if cut_at is None and line.rstrip() == f".  {task}":
            lab.cut(node)
            cut_at = time.monotonic()
    p.wait()
    killer.cancel()
    assert cut_at is not None, f"doit never started {task}:\n{''.join(lines)[-4000:]}"
    out = "".join(lines)
    return Run("doit setup", out, time.monotonic() - started, p.returncode == 0), \
        time.monotonic() - cut_at


def test_clean_mirrors_setup_and_an_interrupted_setup_resumes(lab, cluster, deployed):
    # A node killed and booted again keeps its stack's containers from before, exited, which
    # `docker stack rm` leaves: clean removes them instead of waiting for them (issue 15).
    lab.kill("pi3")
    lab.boot("pi3")
    status.wait_converged(cluster, 600)
    exited = lab.exec("pi3", "docker ps -aq --filter status=exited").stdout.split()
    first = doit("clean")
    assert first.ok, first.output[-4000:]
    assert "still present" not in first.output
    assert not exited or "pi3: stack: removed the stack's containers" in first.output
    before = snapshot(lab)
    for name, snap in before.items():
        assert "haswarm" not in snap.split("## docker volumes")[0], f"{name} kept:\n{snap}"

    try:
        broken, to_fail = setup_cutting_a_node_at(lab, "pi3", "swarm")
    finally:
        lab.heal("pi3")
    assert not broken.ok, broken.output[-4000:]
    tail = broken.output[-3000:]
    assert "pi3" in tail and "swarm" in tail, tail
    resumed = doit("setup")
    assert resumed.ok, resumed.output[-4000:]
    assert "gluster:volume: nothing to do" in resumed.output  # done before the cut

    second = doit("clean")
    assert second.ok, second.output[-4000:]
    assert snapshot(lab) == before
    again = doit("setup")  # leave the cluster deployed for whoever runs next
    assert again.ok, again.output[-4000:]
    print(f"\n[cycle] clean {first.seconds:.1f} s; setup with pi3 cut at swarm failed after "
          f"{to_fail:.1f} s; resumed setup {resumed.seconds:.1f} s; clean {second.seconds:.1f} s; "
          f"setup {again.seconds:.1f} s")
