"""Fixtures for the end-to-end tests on the shared lab.

`deployed`: the whole cluster deployed ONCE per session by the real `doit setup` (output
captured: tests search it for secrets). Its `.output` and `.seconds` are the run's whole output
and wall time.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tasks.config import LAB_CLUSTER_FILE, PROJECT_ROOT, Cluster, load_cluster

DOIT_TIMEOUT = 1800


@dataclass
class Run:
    """One run of setup (or clean): how, its whole output, its wall time, its exit code."""

    how: str
    output: str
    seconds: float
    ok: bool = True


def doit(*args: str, timeout: float = DOIT_TIMEOUT) -> Run:
    """`doit ARGS` in the project root on the lab cluster; output and wall time."""
    env = {**os.environ, "HASWARM_CONFIG": str(LAB_CLUSTER_FILE)}
    started = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "doit", *args], cwd=PROJECT_ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    return Run(f"doit {' '.join(args)}", p.stdout + p.stderr, time.monotonic() - started,
               p.returncode == 0)


def run_setup(lab, c: Cluster) -> Run:
    """The real `doit setup` on the lab."""
    return doit("setup")


def run_clean(c: Cluster, purge: bool = False, dryrun: bool = False) -> Run:
    """`doit clean stack stack-objects swarm`: only this part's tasks, dependents first (the
    Gluster layer below stays: other modules' tests use it)."""
    return doit(*(["purge=yes", "yes=1"] if purge else []), "clean", *(["-n"] if dryrun else []),
                "stack", "stack-objects", "swarm")


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    return load_cluster(LAB_CLUSTER_FILE)


@pytest.fixture(scope="session")
def deployed(lab, cluster) -> Iterator[Run]:
    """The cluster deployed once on the lab."""
    run = run_setup(lab, cluster)
    print(f"\n[deployed] {run.how}: {run.seconds:.1f} s", flush=True)
    if not run.ok:
        pytest.fail(f"{run.how} failed:\n{run.output[-6000:]}", pytrace=False)
    yield run


def sh(lab, node: str, cmd: str, input: str | None = None, check: bool = True) -> str:
    """Run a shell command inside a lab node; its stdout."""
    return lab.exec(node, cmd, input=input, check=check).stdout


def containers(lab, c: Cluster, service: str) -> dict[str, str]:
    """{node: container id} of the running containers of a service of the stack."""
    out = {}
    for name in lab.names:
        ids = sh(lab, name, "docker ps -q --filter "
                 + shlex.quote(f"label=com.docker.swarm.service.name={c.name}_{service}")).split()
        if ids:
            out[name] = ids[0]
    return out


def sql(lab, node: str, container: str, statements: str) -> str:
    """Run SQL in a db container as root over the unix socket (socket auth: no password
    anywhere); statements on stdin. Tab-separated rows, no column names."""
    return sh(lab, node, f"docker exec -i {container} mariadb --batch --skip-column-names",
              input=statements)


class Tools:
    """Helpers for tests on a lab node (fixture `tools`)."""

    def __init__(self, lab, c: Cluster):
        self.lab, self.c = lab, c

    def sh(self, node: str, cmd: str, input: str | None = None, check: bool = True) -> str:
        return sh(self.lab, node, cmd, input=input, check=check)

    def containers(self, service: str) -> dict[str, str]:
        return containers(self.lab, self.c, service)

    def sql(self, node: str, container: str, statements: str) -> str:
        return sql(self.lab, node, container, statements)

    def setup(self) -> Run:
        """Setup again."""
        return run_setup(self.lab, self.c)

    def clean(self, purge: bool = False, dryrun: bool = False) -> Run:
        """Clean."""
        return run_clean(self.c, purge=purge, dryrun=dryrun)


@pytest.fixture(scope="session")
def tools(lab, cluster) -> Tools:
    return Tools(lab, cluster)


TEST_VIP = "10.77.0.100"


def with_test_vip(lab, cluster: Cluster, log) -> Iterator[Cluster]:
    """For a module's `cv` fixture: the lab cluster with a VIP (the lab's own when configured,
    else TEST_VIP, set up here and removed at the end); the lab converged again at the end."""
    from tasks import status, vip
    from tasks.config import VIP
    from tasks.remote import Remote

    own = cluster.vip.address is None
    c = cluster.model_copy(update={"vip": VIP(address=TEST_VIP)}) if own else cluster
    status.wait_converged(cluster, 600, log=log)
    if own:
        with Remote(c) as r:
            vip.setup(c, r)
    yield c
    lab.up()  # boot killed nodes, thaw frozen ones, heal cut links (nothing if all is well)
    try:
        status.wait_converged(c, 600, log=log)
    finally:
        if own:
            with Remote(c) as r:
                vip.remove(c, r, dryrun=False)
