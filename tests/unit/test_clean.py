"""`doit clean` after a fault: the stack's containers that no longer run are removed rather than
waited for; a failed clean step keeps the steps it needs from running; the command exits 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from doit.cmd_base import ModuleTaskLoader
from doit.doit_cmd import DoitMain
from doit.exceptions import TaskFailed

from tasks import clean_run, stack
from tasks.config import LAB_CLUSTER_FILE, PROJECT_ROOT, Cluster, load_cluster
from tasks.errors import StackError
from tasks.failures import Result
from tasks.ops import StepError, remote_task


@pytest.fixture(scope="module")
def c() -> Cluster:
    return load_cluster(LAB_CLUSTER_FILE)


@pytest.fixture(autouse=True)
def fresh_record():
    clean_run.reset()
    yield
    clean_run.reset()


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


# ---------------------------------------------------------------------------------------------
# The record of a clean run, and what a failure keeps from running


def test_needed_by_is_transitive():
    deps = {"stack": ["swarm", "render"], "swarm": ["gluster"], "gluster": ["gluster:mount"],
            "gluster:mount": ["gluster:volume"], "vip": ["stack"], "firewall": []}
    got = clean_run.needed_by(deps)
    assert got["gluster:volume"] == {"gluster:mount", "gluster", "swarm", "stack", "vip"}
    assert got["stack"] == {"vip"} and got["render"] == {"stack", "vip"}
    assert "vip" not in got and "firewall" not in got  # nothing needs them


def test_a_failure_refuses_the_steps_it_needs_naming_it():
    failed = clean_run.record_failure("stack", "stack (clean) failed:\nstack haswarm: still "
                                      "present 180 s after `docker stack rm`")
    assert isinstance(failed, TaskFailed) and "still present 180 s" in str(failed)
    assert list(clean_run.FAILED) == ["stack"]
    assert clean_run.refusal("vip", []) is None  # needed by nothing that failed
    why = clean_run.refusal("swarm", {"stack", "vip"})
    assert why == ("swarm (clean): not run: the clean of stack, which needs swarm, failed "
                   "(its error is above). Fix that, then run `doit clean` again")
    assert clean_run.REFUSED == {"swarm": "stack"}
    assert clean_run.summary() == ("doit clean: failed: stack (1 step they need not run); "
                                   "see above, fix it, then run `doit clean` again")
    clean_run.reset()
    assert clean_run.summary() == "" and clean_run.refusal("swarm", {"stack"}) is None


# ---------------------------------------------------------------------------------------------
# The command: doit's clean order, refusals, exit code


def dodo(c: Cluster, calls: list[str], failing: str | None,
         error: type[Exception] = StepError) -> dict[str, Any]:
    """A tiny dodo of remote steps: top -> mid -> base, and other (needs nothing), grouped by
    `all` (the default); the clean step `failing` fails, as a step does when a node does not
    do what it must."""

    def creator(name: str, deps: list[str]):
        def setup(c: Cluster, r: Any, dryrun: bool = False) -> None:
            return None

        def clean(c: Cluster, r: Any, dryrun: bool) -> None:
            calls.append(name)
            if name == failing:
                raise error(f"{name}: still there")

        def task_creator() -> dict[str, Any]:
            return {**remote_task(c, name, None, f"the {name} step", setup, clean,
                                  task_dep=deps), "basename": name}

        return task_creator

    return {"task_base": creator("base", []), "task_mid": creator("mid", ["base"]),
            "task_top": creator("top", ["mid"]), "task_other": creator("other", []),
            "task_all": lambda: {"actions": None, "task_dep": ["top", "other"]},
            "DOIT_CONFIG": {"default_tasks": ["all"]}}


def run_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, namespace: dict[str, Any],
              *args: str) -> int:
    monkeypatch.chdir(PROJECT_ROOT)  # its pyproject.toml names the command (plugins.command)
    return DoitMain(ModuleTaskLoader(namespace)).run(
        ["clean", "--db-file", str(tmp_path / "doit.db"), *args])


def test_pyproject_makes_clean_ours(monkeypatch):
    monkeypatch.chdir(PROJECT_ROOT)
    assert DoitMain().get_cmds().get_plugin("clean") is clean_run.Clean


def test_the_command_module_is_light():
    """`doit help` loads every command: no SSH or Docker client for it."""
    code = ("import sys, tasks.clean_run; "
            "print(sorted(m for m in ('paramiko', 'fabric', 'docker', 'tasks.config') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_a_failed_step_keeps_what_it_needs_and_the_command_exits_1(
        c, tmp_path, monkeypatch, capsys):
    calls: list[str] = []
    assert run_clean(tmp_path, monkeypatch, dodo(c, calls, failing="mid")) == 1
    assert calls == ["other", "top", "mid"]  # base: refused, without connecting
    out, err = capsys.readouterr()
    assert "base (clean): not run: the clean of mid, which needs base, failed " \
           "(its error is above). Fix that, then run `doit clean` again" in out
    assert "mid: still there" in err
    assert "all (clean)" not in out  # a group: nothing of its own to clean, nothing to refuse
    assert err.splitlines()[-1] == ("doit clean: failed: mid (1 step they need not run); see "
                                    "above, fix it, then run `doit clean` again")


def test_a_clean_run_that_fails_nothing_exits_0(c, tmp_path, monkeypatch, capsys):
    calls: list[str] = []
    assert run_clean(tmp_path, monkeypatch, dodo(c, calls, failing=None)) == 0
    assert calls == ["other", "top", "mid", "base"]
    assert "doit clean:" not in capsys.readouterr().err
    # a run after a failed one starts with a clean record
    assert run_clean(tmp_path, monkeypatch, dodo(c, calls, failing="top")) == 1
    assert clean_run.FAILED.keys() == {"top"} and clean_run.REFUSED.keys() == {"mid", "base"}
    assert run_clean(tmp_path, monkeypatch, dodo(c, calls, failing=None)) == 0


def test_a_bug_in_a_clean_step_counts_as_a_failure(c, tmp_path, monkeypatch, capsys):
    calls: list[str] = []
    assert run_clean(tmp_path, monkeypatch, dodo(c, calls, "mid", RuntimeError)) == 1
    assert calls == ["other", "top", "mid"]
    err = capsys.readouterr().err
    assert "RuntimeError: mid: still there" in err  # doit's traceback
    assert "doit clean: failed: mid (1 step they need not run)" in err


def test_a_failed_dry_run_refuses_too(c, tmp_path, monkeypatch, capsys):
    calls: list[str] = []
    assert run_clean(tmp_path, monkeypatch, dodo(c, calls, failing="top"), "-n") == 1
    assert calls == ["other", "top"]


def test_doits_own_clean_would_have_gone_on_and_exited_0(c, tmp_path, monkeypatch):
    """Why haswarm has its own command: doit's runs every step and exits 0 (or None)."""
    calls: list[str] = []
    monkeypatch.chdir(tmp_path)  # no pyproject.toml: doit's own clean
    code = DoitMain(ModuleTaskLoader(dodo(c, calls, failing="mid"))).run(
        ["clean", "--db-file", str(tmp_path / "doit.db")])
    assert not code and calls == ["other", "top", "mid", "base"]
