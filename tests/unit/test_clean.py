"""`doit clean` after a fault: the stack's containers that no longer run are removed rather than
waited for."""

from __future__ import annotations

import pytest

from tasks import stack
from tasks.config import LAB_CLUSTER_FILE, Cluster, load_cluster
from tasks.errors import StackError
from tasks.failures import Result


@pytest.fixture(scope="module")
def c() -> Cluster:
    return load_cluster(LAB_CLUSTER_FILE)


# ---------------------------------------------------------------------------------------------
# The stack's leftovers: which containers are removed


PS_A = [  # `_leftovers_cmd` on one node: `docker ps -a` lines, then `docker network ls`
    "container 0a1b2c3d4e5f running haswarm_db",
    "container 1a1b2c3d4e5f exited haswarm_mosquitto",  # from the node's life before a reboot
    "container 2a1b2c3d4e5f created haswarm_homeassistant",
    "container 3a1b2c3d4e5f dead haswarm_db",
    "container 4a1b2c3d4e5f removing haswarm_db",  # Docker is at it already
    "container 5a1b2c3d4e5f restarting haswarm_mosquitto",
    "container 6a1b2c3d4e5f paused haswarm_homeassistant",
    "container 7a1b2c3d4e5f exited",  # no service label
    "network haswarm_default",
    "network exited",  # a network's name is never taken for a container
]


def test_stale_containers_are_those_that_no_longer_run():
    assert stack.stale_containers(PS_A) == ["1a1b2c3d4e5f", "2a1b2c3d4e5f", "3a1b2c3d4e5f",
                                            "7a1b2c3d4e5f"]
    assert stack.stale_containers(["container 0a1b2c3d4e5f running haswarm_db"]) == []
    assert stack.stale_containers([]) == []


def test_the_listing_shows_every_container_of_the_stack_and_its_networks(c):
    cmd = stack._leftovers_cmd(c)
    assert "docker ps -a --filter label=com.docker.stack.namespace=haswarm" in cmd
    assert "{{.State}}" in cmd and "docker network ls" in cmd


class LeftoverRemote:
    """Each node's containers ({id: [state, service]}) and networks as Docker would show them.
    `docker rm -v` removes the containers that do not run (printing their ids) and refuses the
    others; a running container exits after `runs_for` listings, then its networks go."""

    def __init__(self, c: Cluster, containers: dict[str, dict[str, list[str]]],
                 networks: dict[str, list[str]], runs_for: int = 2):
        self.cluster, self.containers, self.networks = c, containers, networks
        self.runs_for, self.log = runs_for, []

    def run(self, node, step, cmd, check=True, **kw):
        name = node if isinstance(node, str) else node.name
        mine = self.containers.setdefault(name, {})
        if cmd.startswith("docker ps -a"):
            self.runs_for -= 1
            for cid, (state, _) in mine.items():
                if state == "running" and self.runs_for < 0:
                    mine[cid][0] = "exited"
            if not any(s == "running" for s, _ in mine.values()):
                self.networks[name] = []
            return Result("".join(f"container {cid} {s} {svc}\n" for cid, (s, svc) in mine.items())
                          + "".join(f"network {n}\n" for n in self.networks.get(name, [])), "", 0)
        self.log.append((name, cmd))
        assert cmd.startswith("docker rm -v ")
        gone = [cid for cid in cmd.split()[3:] if mine.get(cid, ["running"])[0] != "running"]
        for cid in gone:
            del mine[cid]
        return Result("".join(f"{cid}\n" for cid in gone), "", 0)

    def on_all(self, step, fn, nodes=None):
        return {n.name: fn(n) for n in self.cluster.nodes}


def test_clean_removes_the_stale_containers_at_once_and_waits_for_running_ones(
        c, monkeypatch, capsys):
    monkeypatch.setattr(stack.time, "sleep", lambda s: None)
    r = LeftoverRemote(c, {"pi1": {"0a1b2c3d4e5f": ["running", "haswarm_db"]},
                           "pi3": {"1a1b2c3d4e5f": ["exited", "haswarm_mosquitto"]}},
                       {"pi1": ["haswarm_default"]})
    stack._wait_removed(r, c, timeout=60)
    assert r.log[0] == ("pi3", "docker rm -v 1a1b2c3d4e5f")  # in the first round, not waited for
    assert r.log[1:] == [("pi1", "docker rm -v 0a1b2c3d4e5f")]  # once it exited
    out = capsys.readouterr().out
    assert "pi3: stack: removed the stack's containers that no longer ran: " \
           "haswarm_mosquitto exited\n" in out
    assert "waiting for pi1: 1 containers (haswarm_db running), 1 networks\n" in out
    assert "pi3" not in out.split("waiting for")[1]  # the stale one is not waited for
    assert r.containers == {"pi1": {}, "pi2": {}, "pi3": {}}

    r.log.clear()
    stack._wait_removed(r, c, timeout=60)  # idempotent: nothing left, nothing to remove
    assert r.log == [] and capsys.readouterr().out == ""


def test_a_container_still_running_after_the_deadline_is_named(c, monkeypatch):
    monkeypatch.setattr(stack.time, "sleep", lambda s: None)
    r = LeftoverRemote(c, {"pi2": {"0a1b2c3d4e5f": ["running", "haswarm_db"],
                                   "1a1b2c3d4e5f": ["exited", "haswarm_db"]}}, {}, runs_for=99)
    with pytest.raises(StackError) as e:
        stack._wait_removed(r, c, timeout=0)
    assert "still present 0 s after `docker stack rm`: pi2: 1 containers (haswarm_db " \
           "running), 0 networks" in str(e.value)
    assert r.log == [("pi2", "docker rm -v 1a1b2c3d4e5f")]


def test_dry_run_only_says_which_it_would_remove(c, capsys):
    r = LeftoverRemote(c, {"pi3": {"1a1b2c3d4e5f": ["exited", "haswarm_mosquitto"]}}, {})
    assert stack._leftovers(r, c, c.node("pi3"), dryrun=True) == [
        "container 1a1b2c3d4e5f exited haswarm_mosquitto"]
    assert r.log == []
    assert capsys.readouterr().out == ("pi3: stack: would remove the stack's containers that no "
                                       "longer run: haswarm_mosquitto exited\n")
