"""The swarm step on the lab: 3 managers, heartbeat, re-run is a no-op, clean leaves nothing,
setup again works. Runs before test_stack.py (tests/conftest.py orders the lab modules); it takes
any stack down first, the way
`doit clean` does (dependents first), and leaves a formed swarm behind."""

from __future__ import annotations

import contextlib
import io
import json
import time

import pytest

from tasks import stack, swarm
from tasks.remote import Remote
from tasks.state import forget

pytestmark = pytest.mark.lab


def swarm_info(lab, node: str) -> dict:
    return json.loads(lab.exec(node, "docker info --format '{{json .Swarm}}'").stdout)


def quiet(fn, *args, **kwargs):
    """Call fn with stdout captured; (result, output, seconds)."""
    buf = io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stdout(buf):
        result = fn(*args, **kwargs)
    return result, buf.getvalue(), time.monotonic() - started


def form(c, dryrun: bool = False):
    """The swarm step's setup, on its own connection (as the doit task runs it)."""
    with Remote(c) as r:
        return swarm.setup(c, r, dryrun)


def take_down(c, dryrun: bool = False):
    """The swarm step's clean side (teardown), on its own connection."""
    with Remote(c) as r:
        return swarm.teardown(c, r, dryrun=dryrun)


@pytest.fixture(scope="module")
def formed(lab, cluster):
    """A formed swarm (takes whatever stack runs down first, as `doit clean` would)."""
    with Remote(cluster) as r:
        quiet(stack.remove, cluster, r)
        quiet(stack.remove_objects, cluster, r)
    quiet(take_down, cluster)
    for step in ("swarm", *swarm.INSIDE_SWARM):  # these tests bypass doit: its stamps go
        forget(cluster, step)
    facts, out, seconds = quiet(form, cluster)
    print(f"\n[swarm] setup from nothing: {seconds:.2f} s\n{out}")
    return facts, out, seconds


def test_three_managers_and_heartbeat(lab, cluster, formed):
    facts, out, _ = formed
    assert facts["managers"] == ["pi1", "pi2", "pi3"]
    rows = [json.loads(x) for x in lab.exec("pi2", "docker node ls --format '{{json .}}'")
            .stdout.splitlines()]
    assert sorted(r["Hostname"] for r in rows) == ["pi1", "pi2", "pi3"]
    assert all(r["Status"] == "Ready" for r in rows)
    assert sorted(r["ManagerStatus"] for r in rows) == ["Leader", "Reachable", "Reachable"]
    for name in lab.names:
        info = swarm_info(lab, name)
        assert info["LocalNodeState"] == "active" and info["ControlAvailable"] is True
        assert info["Cluster"]["Spec"]["Dispatcher"]["HeartbeatPeriod"] == 2_000_000_000
        assert info["NodeAddr"] == cluster.node(name).address
    assert "init" in out and out.count("join as manager") == 2


def test_rerun_changes_nothing(lab, cluster, formed):
    before = swarm_info(lab, "pi1")["Cluster"]["Version"]["Index"]
    _, out, seconds = quiet(form, cluster)
    print(f"\n[swarm] re-run: {seconds:.2f} s")
    assert "managers already" in out
    for word in ("init", "join", "promote", "heartbeat 5"):
        assert word not in out.replace("dispatcher heartbeat 2 s", "")
    _, dry, _ = quiet(form, cluster, True)
    assert "swarm: nothing to do" in dry and "would" not in dry
    assert swarm_info(lab, "pi1")["Cluster"]["Version"]["Index"] == before


def test_dry_run_clean_touches_nothing(lab, cluster, formed):
    _, out, _ = quiet(take_down, cluster, dryrun=True)
    assert out.count("would demote to worker") == 2, out
    assert "would leave (last manager: the swarm ends)" in out
    assert all(swarm_info(lab, n)["LocalNodeState"] == "active" for n in lab.names)


def test_clean_leaves_no_swarm_state_then_setup_again(lab, cluster, formed):
    notes, out, seconds = quiet(take_down, cluster)
    print(f"\n[swarm] clean: {seconds:.2f} s\n{out}" + "\n".join(notes))
    assert out.count("demote to worker") == 2, notes
    for name in lab.names:
        assert swarm_info(lab, name)["LocalNodeState"] == "inactive"
        left = lab.exec(name, "ls -A /var/lib/docker/swarm 2>/dev/null; "
                              "docker network ls --filter driver=overlay -q").stdout.split()
        assert left == [], f"{name}: swarm state left: {left}"
    again, _, _ = quiet(take_down, cluster)
    assert again == ["swarm: no node is in this swarm: nothing to remove"]
    facts, _, seconds = quiet(form, cluster)
    print(f"[swarm] setup again: {seconds:.2f} s")
    assert facts["managers"] == ["pi1", "pi2", "pi3"]


def test_node_in_another_swarm_is_refused_with_instructions(lab, cluster, formed):
    # pi3 leaves and starts a swarm of its own: setup must refuse and change nothing.
    quiet(take_down, cluster)
    lab.exec("pi3", "docker swarm init --advertise-addr 10.77.0.13 >/dev/null")
    lab.exec("pi2", "docker swarm init --advertise-addr 10.77.0.12 >/dev/null")
    try:
        with pytest.raises(swarm.RemoteError) as e:
            quiet(form, cluster)
        msg = str(e.value)
        assert "different swarm" in msg and "docker swarm leave --force" in msg
        assert "nothing was changed" in msg
        assert swarm_info(lab, "pi1")["LocalNodeState"] == "inactive"
    finally:
        quiet(take_down, cluster)
        quiet(form, cluster)
    assert all(swarm_info(lab, n)["ControlAvailable"] for n in lab.names)
