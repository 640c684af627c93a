"""The whole graph on the lab: a changed value re-runs only what depends on it, and a full
`doit clean` mirrors `doit setup`: nodes after clean -> setup -> clean are what they were after
the first clean. Runs last (tests/conftest.py orders the lab modules) and leaves the cluster
deployed again."""

from __future__ import annotations

import pytest
import yaml

from tasks.config import LAB_CLUSTER_FILE
from tests.lab.conftest import doit

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
echo "## networks"; docker network ls --format '{{.Name}}' | sort
"""


def snapshot(lab) -> dict[str, str]:
    return {name: lab.exec(name, SNAPSHOT, check=False).stdout for name in lab.names}


def ran(output: str) -> set[str]:
    """Tasks doit executed (`.  NAME`), not those up to date (`-- NAME`)."""
    return {line[3:].strip() for line in output.splitlines() if line.startswith(".  ")}


ALWAYS = {"lab-up", "preflight", "base-image"}  # cheap checks that run on every setup


def test_changing_one_value_reruns_only_what_depends_on_it(deployed, tmp_path):
    data = yaml.safe_load(LAB_CLUSTER_FILE.read_text())
    data["mqtt"]["autosave_interval"] += 1
    changed = LAB_CLUSTER_FILE.with_name(".test-changed-lab.yml")  # beside it: same key paths
    changed.write_text(yaml.safe_dump(data))
    try:
        run = doit(f"config={changed}", "setup")
        assert run.ok, run.output[-4000:]
        executed = ran(run.output) - ALWAYS
        assert executed == {"render:mosquitto/mosquitto.conf", "render:stack.yml",
                            "render:stack.bootstrap.yml", "stack-objects", "stack"}, executed
        assert not {t for t in executed if t.startswith(("gluster", "swarm", "avahi"))}
    finally:
        changed.unlink()
        back = doit("setup")
    assert back.ok, back.output[-4000:]


def test_full_clean_mirrors_setup(lab, deployed):
    first = doit("clean")
    assert first.ok, first.output[-4000:]
    before = snapshot(lab)
    for name, snap in before.items():
        assert "haswarm" not in snap.split("## docker volumes")[0], f"{name} kept:\n{snap}"
    setup = doit("setup")
    assert setup.ok, setup.output[-4000:]
    second = doit("clean")
    assert second.ok, second.output[-4000:]
    assert snapshot(lab) == before
    again = doit("setup")  # leave the cluster deployed for whoever runs next
    assert again.ok, again.output[-4000:]
    print(f"\n[cycle] clean {first.seconds:.1f} s, setup {setup.seconds:.1f} s, "
          f"clean {second.seconds:.1f} s, setup {again.seconds:.1f} s")
