"""A node that hangs rather than dies (a frozen FUSE mount, a wedged dockerd): every one of its
processes is stopped (lab.freeze: its kernel still completes TCP handshakes, nothing answers)
while `doit setup` runs. Setup must fail within a stated bound, naming the node and the step,
not hang; after the node is thawed, setup converges again.

The bound: a remote command's deadline (60 s for most steps, tasks/remote.py
COMMAND_TIMEOUT) + the SSH connect timeout + 1 s, as the README states; a new connection to the
frozen node fails at the connect timeout (no SSH banner)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tasks import status
from tasks.config import LAB_CLUSTER_FILE, PROJECT_ROOT
from tasks.remote import COMMAND_TIMEOUT
from tasks.state import stamp

pytestmark = pytest.mark.lab


def say(msg: str) -> None:
    print(f"  [frozen] {msg}", flush=True)


def test_setup_fails_in_bounded_time_naming_a_frozen_node(lab, cluster, deployed, capsys):
    st = status.wait_converged(cluster, 600, log=say)
    busy = set(st.ha_nodes()) | set(st.mqtt_nodes())
    victim = next(n for n in lab.names if n not in busy)  # costs the household nothing
    bound = COMMAND_TIMEOUT + cluster.ssh.connect_timeout + 1
    env = {**os.environ, "HASWARM_CONFIG": str(LAB_CLUSTER_FILE)}
    # Without a record of what the last run read, this one reads every fact live, step by step
    # (as the first run after an update of haswarm does): the freeze then finds commands under
    # way on open connections. (With the record, preflight reads it all in its first second:
    # a freeze during that read fails preflight, naming the node, 15 s later at most.)
    stamp(cluster, "reads").unlink(missing_ok=True)
    setup = subprocess.Popen([sys.executable, "-m", "doit", "setup"], cwd=PROJECT_ROOT,
                             env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    try:
        time.sleep(2.0)  # setup is under way: connections to every node are open
        stopped = lab.freeze(victim)
        frozen_at = time.monotonic()
        say(f"froze {victim} ({stopped} processes) while setup ran")
        out, _ = setup.communicate(timeout=bound + 60)
        took = time.monotonic() - frozen_at
    finally:
        if setup.poll() is None:
            setup.kill()
        lab.thaw(victim)
    with capsys.disabled():  # the figure, in CI's log too
        print(f"\n[frozen] setup failed {took:.1f} s after {victim} froze (bound {bound:g} s)")
    assert setup.returncode != 0, out[-3000:]
    assert took <= bound + 5, f"setup took {took:.1f} s (bound {bound:g} s):\n{out[-3000:]}"
    failure = out[out.rfind("TaskFailed"):]
    assert victim in failure, out[-3000:]
    assert "failed" in failure
    # Thawed, the cluster converges again and setup is done.
    status.wait_converged(cluster, 600, log=say)
    again = subprocess.run([sys.executable, "-m", "doit", "setup"], cwd=PROJECT_ROOT,
                           env=env, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=900)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
