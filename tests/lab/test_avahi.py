"""Avahi on the lab, end to end: the shared mDNS name on every node, the restart cron, a second
run that changes nothing, restart_cron switched off, and clean restoring every node exactly.

The tests run in file order; the module ends with Avahi set up (the state `doit setup` leaves).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from lab.driver import Lab
from tasks import avahi, ops, render, state
from tasks.config import LAB_CLUSTER_FILE, Cluster, load_cluster

pytestmark = pytest.mark.lab

SETUP = [("avahi-hostname", avahi.setup_hostname), ("avahi-cron", avahi.setup_cron)]
CLEAN = [("avahi-cron", avahi.clean_cron), ("avahi-hostname", avahi.clean_hostname)]
NAMES = ["pi1", "pi2", "pi3"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    build = tmp_path_factory.mktemp("avahi") / "build"
    c = load_cluster(LAB_CLUSTER_FILE).model_copy(update={"build_dir": build})
    for out in render.outputs(c):
        if out.target == "avahi-restart.cron":
            render.write(render.build_dir(c) / out.target, render.render(c, out), out.mode)
    return c


def on(lab: Lab, name: str, cmd: str, check: bool = True) -> str:
    return lab.exec(name, cmd, check=check, timeout=60).stdout


def run(c: Cluster, steps: list[tuple[str, Callable[..., Any]]], clean: bool = False) -> float:
    started = time.monotonic()
    for step, fn in steps:
        res = ops.clean_step(c, step, fn, False) if clean else ops.run_step(c, step, fn)
        assert res is None, str(res)
    return time.monotonic() - started


def resolve(lab: Lab, node: str, name: str, timeout: float = 20) -> str:
    """The IPv4 address `node` resolves NAME.local to (retried: cron restarts Avahi every
    minute, and a restarted daemon needs a moment to probe its name)."""
    deadline = time.monotonic() + timeout
    while True:
        res = lab.exec(node, f"avahi-resolve -4 -n {name}.local", check=False, timeout=30)
        if res.returncode == 0 and res.stdout.split():
            return res.stdout.split()[-1]
        if time.monotonic() > deadline:
            raise AssertionError(f"{node}: {name}.local did not resolve: {res.stderr}")
        time.sleep(0.5)


def server_host_names(conf: str) -> list[str]:
    section = conf.split("[server]", 1)[1].split("\n[", 1)[0]
    return [line for line in section.splitlines() if line.startswith("host-name=")]


ORIGINAL: dict[str, str] = {}


def test_shared_name_and_cron_on_every_node(lab: Lab, cluster: Cluster) -> None:
    run(cluster, CLEAN, clean=True)  # whatever a previous run left
    for n in NAMES:
        ORIGINAL[n] = on(lab, n, f"cat {avahi.AVAHI_CONF}")
    took = run(cluster, SETUP)
    print(f"\nlab: avahi setup: {took:.2f} s")
    cron = (render.build_dir(cluster) / "avahi-restart.cron").read_text()
    for n in NAMES:
        conf = on(lab, n, f"cat {avahi.AVAHI_CONF}")
        assert server_host_names(conf) == [f"host-name={cluster.mdns.name}"]
        assert on(lab, n, f"cat {avahi.CRON_FILE}") == cron
        assert on(lab, n, f"stat -c '%a %U:%G' {avahi.CRON_FILE}").strip() == "644 root:root"
        assert lab.exec(n, "avahi-daemon --check", check=False).returncode == 0

    # one node holds the name; every other node resolves it to that node's LAN address (the
    # holder itself may answer with one of its Docker bridges' addresses)
    addresses = {n.address: n.name for n in cluster.nodes}
    answers = {n: resolve(lab, n, cluster.mdns.name) for n in NAMES}
    lan = {a for a in answers.values() if a in addresses}
    assert len(lan) == 1, answers
    holder = addresses[lan.pop()]
    assert all(a == cluster.nodes[NAMES.index(holder)].address
               for n, a in answers.items() if n != holder), answers


def test_second_run_changes_nothing(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    took = run(cluster, SETUP)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("pi")]
    assert len(lines) == 6 and all(line.endswith("nothing to do") for line in lines), out
    with capsys.disabled():
        print(f"\nlab: avahi re-run on converged nodes: {took:.2f} s")


def test_restart_cron_off_removes_the_file(lab: Lab, cluster: Cluster) -> None:
    off = cluster.model_copy(update={"mdns": cluster.mdns.model_copy(
        update={"restart_cron": False})})
    run(off, [("avahi-cron", avahi.setup_cron)])
    for n in NAMES:
        assert lab.exec(n, f"test -e {avahi.CRON_FILE}", check=False).returncode != 0
    run(cluster, [("avahi-cron", avahi.setup_cron)])
    assert on(lab, "pi2", f"cat {avahi.CRON_FILE}")


def test_clean_restores_every_node(lab: Lab, cluster: Cluster,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    took = run(cluster, CLEAN, clean=True)
    for n in NAMES:
        assert on(lab, n, f"cat {avahi.AVAHI_CONF}") == ORIGINAL[n]
        assert lab.exec(n, f"test -e {avahi.CRON_FILE}", check=False).returncode != 0
        assert lab.exec(n, "avahi-daemon --check", check=False).returncode == 0
    # each node announces its own host name again
    assert resolve(lab, "pi1", "pi2") == "10.77.0.12"

    capsys.readouterr()
    run(cluster, CLEAN, clean=True)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("pi")]
    assert len(lines) == 6 and all(line.endswith("nothing to do") for line in lines), out

    # leave the lab as `doit setup` leaves it
    run(cluster, SETUP)
    with capsys.disabled():
        print(f"\nlab: avahi clean: {took:.2f} s")


def test_dry_run_changes_nothing(lab: Lab, cluster: Cluster,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    before = {n: on(lab, n, f"cat {avahi.AVAHI_CONF} {avahi.CRON_FILE}") for n in NAMES}
    stamp = state.stamp(cluster, "avahi-cron")
    assert stamp.exists()
    capsys.readouterr()
    for step, fn in CLEAN:
        assert ops.clean_step(cluster, step, fn, True) is None
    out = capsys.readouterr().out
    assert f"would remove {avahi.CRON_FILE}" in out and "would restart avahi-daemon" in out
    assert {n: on(lab, n, f"cat {avahi.AVAHI_CONF} {avahi.CRON_FILE}")
            for n in NAMES} == before
    assert stamp.exists()
