"""Fixtures for the end-to-end tests on the shared lab.

`deployed`: the whole cluster deployed ONCE per session. When dodo.py wires the `stack` task, it
runs the real `doit setup` (output captured: tests search it for secrets); before that it runs
the swarm, stack-objects and stack actions directly (skipping when the images are not on the
nodes yet). Its `.output` and `.seconds` are the run's whole output and wall time.
"""

from __future__ import annotations

import contextlib
import io
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


def wired() -> bool:
    """Does dodo.py have the `swarm`, `stack-objects` and `stack` tasks (and setup use them)?"""
    run = doit("list", "--all", "-q", timeout=120)
    names = {line.split()[0] for line in run.output.splitlines() if line.strip()}
    return {"swarm", "stack-objects", "stack"} <= names


def missing_images(lab, c: Cluster) -> list[str]:
    """Images of the stack absent from some node."""
    wanted = [c.images.homeassistant.image, c.images.mariadb.image, c.images.mosquitto.image]
    out = []
    for name in lab.names:
        have = lab.exec(name, "docker images --format '{{.Repository}}:{{.Tag}}'").stdout.split()
        out += [f"{name}: {img}" for img in wanted if img not in have]
    return out


def run_actions(c: Cluster) -> Run:
    """Setup without doit: the three actions of swarm, stack-objects and stack, in order."""
    from tasks import stack, swarm

    buf = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s: str) -> int:
            buf.write(s)
            return sys.__stdout__.write(s)

    started = time.monotonic()
    ok = True
    with contextlib.redirect_stdout(Tee()):
        for task in (swarm.swarm_task(c), stack.objects_task(c), stack.stack_task(c)):
            result = task["actions"][0]()
            if result is not None:
                print(result)
                ok = False
                break
    return Run("actions", buf.getvalue(), time.monotonic() - started, ok)


def run_setup(lab, c: Cluster) -> Run:
    """The real `doit setup` when wired, else the actions (skip if the images are missing)."""
    if wired():
        return doit("setup")
    missing = missing_images(lab, c)
    if missing:
        pytest.skip("images not on the nodes yet (doit preload-images): " + ", ".join(missing))
    doit("secrets", "render", timeout=300)
    for name in lab.names:  # until the gluster task makes them on the volume
        lab.exec(name, "test -d /mnt/haswarm/homeassistant || mkdir -p "
                       "/mnt/haswarm/homeassistant /mnt/haswarm/mosquitto/data && "
                       "chown 1883:1883 /mnt/haswarm/mosquitto/data")
    return run_actions(c)


def run_clean(c: Cluster, purge: bool = False, dryrun: bool = False) -> Run:
    """`doit clean stack stack-objects swarm` when wired, else the same clean steps called
    directly, stamps forgotten as the clean actions do. Never Gluster: others test on it."""
    if wired():
        # Only this part's tasks, dependents first: Gluster is shared with other tests.
        return doit(*(["purge=yes"] if purge else []), "clean", *(["-n"] if dryrun else []),
                    "stack", "stack-objects", "swarm")
    from tasks import stack, swarm
    from tasks.state import forget

    started = time.monotonic()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        notes = [*stack.remove(c, purge=purge, dryrun=dryrun),
                 *stack.remove_objects(c, dryrun=dryrun), *swarm.teardown(c, dryrun=dryrun)]
        print("\n".join(notes))
    if not dryrun:
        for step in ("stack", "stack-objects", "swarm"):
            forget(c, step)
    return Run("clean actions", buf.getvalue(), time.monotonic() - started)


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    return load_cluster(LAB_CLUSTER_FILE)


@pytest.fixture(scope="session")
def deployed(lab, cluster) -> Iterator[Run]:
    """The cluster deployed once on the lab (real `doit setup` when wired)."""
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
        """Setup again (real `doit setup` when wired)."""
        return run_setup(self.lab, self.c)

    def clean(self, purge: bool = False, dryrun: bool = False) -> Run:
        """Clean (real `doit clean` when wired)."""
        return run_clean(self.c, purge=purge, dryrun=dryrun)


@pytest.fixture(scope="session")
def tools(lab, cluster) -> Tools:
    return Tools(lab, cluster)
