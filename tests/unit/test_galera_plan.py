"""The stack step's plan (tasks/galera.py): the Ops a decision turns into, compared as data, and
`converge` showing them in a dry run without changing anything, or applying them in order."""

from __future__ import annotations

from contextlib import nullcontext

import pytest

from tasks import galera
from tasks.config import LAB_CLUSTER_FILE, Cluster, load_cluster
from tasks.galera import GaleraFacts, Member, decide, plan
from tasks.ops import Op


@pytest.fixture(scope="module")
def c() -> Cluster:
    return load_cluster(LAB_CLUSTER_FILE)


def whats(ops: list[Op]) -> list[tuple[str | None, str]]:
    """(node, what) of each op: the plan as the user reads it."""
    return [(op.node, op.what) for op in ops]


def m(node: str, service: str = "db", synced: bool = True, size: int = 3,
      phase: str = "running") -> Member:
    return Member(node=node, service=service, container=f"{service}-{node}", phase=phase,
                  cluster_status="Primary" if synced else "none",
                  local_state="Synced" if synced else "none", cluster_size=size if synced else 0)


FRESH = GaleraFacts(seed_desired=None, db_desired=None,
                    problems=["db: no such service", "homeassistant: no such service"])


def converged(**kw) -> GaleraFacts:
    return GaleraFacts(seed_desired=0, db_desired=3, members=[m("pi1"), m("pi2"), m("pi3")],
                       deployed=True, **kw)


def ha(c: Cluster) -> str:
    return f"ask every node for Home Assistant on HTTP port {c.homeassistant.port} (from here)"


def steady_wait(now: str = "") -> str:
    return ("wait until every service runs and is healthy, 3 db Synced, cluster size 3; then "
            "remove unused configs and secrets" + now)


def test_plan_fresh_is_the_full_bootstrap_on_the_manager(c):
    ops = plan(c, "pi1", FRESH, decide(FRESH, 3))
    assert whats(ops) == [
        ("pi1", "deploy stack.bootstrap.yml (db-seed 1, db 0, homeassistant 0): the seed "
                "creates the cluster"),
        ("pi1", "wait until the seed is Synced in a Primary component (at most 300 s)"),
        ("pi1", "scale db to 3 (one per node)"),
        ("pi1", "wait until 3 db tasks are Synced, cluster size 4 (at most 900 s)"),
        ("pi1", "scale db-seed to 0; wait until the cluster size is 3 (at most 180 s)"),
        ("pi1", "deploy stack.yml (it is not the deployed one)"),
        ("pi1", steady_wait()),  # the problems before the bootstrap are not shown
        ("pi1", ha(c))]
    assert [op.call.func for op in ops] == [
        galera.deploy_bootstrap, galera.wait_seed, galera.scale_db, galera.wait_db_seeded,
        galera.remove_seed, galera.deploy_steady, galera.wait_stack, galera.probe_ha]
    assert all(op.call.keywords == {"c": c, "manager": "pi1"} for op in ops)
    assert all(op.cmd is None and op.put is None and op.wait is None for op in ops)


def test_plan_resume_continues_where_the_bootstrap_stopped(c):
    f = GaleraFacts(seed_desired=1, db_desired=3,
                    members=[m("pi2", "db-seed", size=4), m("pi1", size=4)])
    assert [w for _, w in whats(plan(c, "pi2", f, decide(f, 3)))][:2] == [
        "scale db to 3 (one per node)",
        "wait until 3 db tasks are Synced, cluster size 4 (at most 900 s)"]


def test_plan_converged_is_empty(c):
    f = converged()
    assert decide(f, 3).kind == "running"
    assert plan(c, "pi1", f, decide(f, 3)) == []


def test_plan_converged_with_unused_objects_only_removes_them(c):
    f = converged(unused=["config clu_old_1", "secret clu_old_2"])
    ops = plan(c, "pi1", f, decide(f, 3))
    assert whats(ops) == [("pi1", "remove config clu_old_1, secret clu_old_2 (unused)")]
    assert ops[0].call.func is galera.prune_unused


def test_plan_changed_stack_file_is_the_plain_redeploy(c):
    f = converged()
    f.deployed = False
    assert whats(plan(c, "pi1", f, decide(f, 3))) == [
        ("pi1", "deploy stack.yml (it is not the deployed one)"),
        ("pi1", steady_wait()),
        ("pi1", ha(c))]


def test_plan_deployed_but_not_converged_waits_without_deploying(c):
    f = converged(problems=["homeassistant: 0 of 1 running and healthy"])
    assert whats(plan(c, "pi1", f, decide(f, 3))) == [
        ("pi1", steady_wait(" (now: homeassistant: 0 of 1 running and healthy)")),
        ("pi1", ha(c))]


def test_plan_full_outage_recovers_from_the_volumes_without_a_seed(c):
    # every node rebooted: the stack is still deployed, the db nodes wait on their own data
    f = GaleraFacts(seed_desired=0, db_desired=3, data_nodes=["pi1", "pi2", "pi3"],
                    members=[m(n, synced=False, phase="waiting") for n in ("pi1", "pi2", "pi3")],
                    deployed=True, problems=["db: 0 of 3 Synced"])
    d = decide(f, 3)
    assert d.kind == "recover"
    assert whats(plan(c, "pi1", f, d)) == [
        ("pi1", steady_wait(" (now: db: 0 of 3 Synced)")), ("pi1", ha(c))]
    # after `doit clean` without purge: nothing runs, nothing is deployed
    f = GaleraFacts(seed_desired=None, db_desired=None, data_nodes=["pi1", "pi2", "pi3"],
                    problems=["db: no such service"])
    ops = plan(c, "pi1", f, decide(f, 3))
    assert [op.call.func for op in ops] == [galera.deploy_steady, galera.wait_stack,
                                            galera.probe_ha]


# ---------------------------------------------------------------------------------------------
# converge: gather -> decide -> plan -> apply_ops


class RecordingRemote:
    """A Remote that records every call; converge's reads are faked around it."""
    reading = staticmethod(nullcontext)  # every read is live here

    def __init__(self, c: Cluster):
        self.cluster, self.calls = c, []

    def redact(self, *values):
        pass

    def __getattr__(self, name):
        def record(*args, **kw):
            self.calls.append((name, args))
            raise AssertionError(f"unexpected Remote.{name}{args}")
        return record


@pytest.fixture
def faked(c, monkeypatch):
    """converge with `gather` answering `facts`, and every step recording its call."""
    called: list[str] = []
    state: dict[str, GaleraFacts] = {}
    monkeypatch.setattr(galera, "find_manager", lambda r, c: "pi1")
    monkeypatch.setattr(galera, "gather", lambda r, c, manager: (state["facts"], None))
    monkeypatch.setattr(galera, "secret_values", lambda c: [])
    for name in ("deploy_bootstrap", "wait_seed", "scale_db", "wait_db_seeded", "remove_seed",
                 "deploy_steady", "wait_stack", "probe_ha", "prune_unused"):
        monkeypatch.setattr(galera, name,
                            lambda r, c, manager, name=name: called.append(f"{name} {manager}"))
    return state, called


def test_converge_dry_run_of_a_fresh_cluster_only_says_what_it_would_do(c, faked, capsys):
    state, called = faked
    state["facts"] = FRESH
    r = RecordingRemote(c)
    assert galera.converge(c, r, dryrun=True) == {}
    assert r.calls == [] and called == []
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("pi1: galera: fresh cluster")
    assert lines[1:] == [f"pi1: stack: would {w}" for _, w in
                         whats(plan(c, "pi1", FRESH, decide(FRESH, 3)))]
    assert len(lines) == 9


def test_converge_applies_the_bootstrap_in_order(c, faked, capsys):
    state, called = faked
    state["facts"] = FRESH
    assert galera.converge(c, RecordingRemote(c)) == {"decision": "bootstrap",
                                                      "steps": list(galera.BOOTSTRAP)}
    assert called == [f"{s.replace('-', '_')} pi1" for s in galera.BOOTSTRAP]
    assert "pi1: stack: scale db to 3 (one per node)" in capsys.readouterr().out


def test_converge_on_a_converged_cluster_says_nothing_to_do(c, faked, capsys):
    state, called = faked
    state["facts"] = converged()
    assert galera.converge(c, RecordingRemote(c)) == {"decision": "running",
                                                      "steps": list(galera.STEADY)}
    assert called == []
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("pi1: galera: db already runs Synced on pi1, pi2, pi3")
    assert out[1:] == ["pi1: stack: nothing to do"]


def test_converge_refuses_before_planning(c, faked):
    state, called = faked
    state["facts"] = GaleraFacts(seed_desired=None, db_desired=None, unknown_nodes=["pi3"])
    with pytest.raises(galera.StackError, match="pi3 did not answer"):
        galera.converge(c, RecordingRemote(c))
    assert called == []
