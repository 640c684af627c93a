"""apply_ops: every kind of Op, applied and dry-run, on a fake Remote that records commands."""

from __future__ import annotations

import pytest

from tasks import ops
from tasks.config import LAB_CLUSTER_FILE, Cluster, load_cluster
from tasks.failures import Kind, RemoteError, Result
from tasks.ops import Op, apply_ops


@pytest.fixture(scope="module")
def c() -> Cluster:
    return load_cluster(LAB_CLUSTER_FILE)


class FakeRemote:
    """Records (node, command); `exits` gives the exit codes a command returns, in turn."""

    def __init__(self, c: Cluster, exits: dict[str, list[int]] | None = None):
        self.cluster = c
        self.exits = exits or {}
        self.log: list[tuple[str, str]] = []

    def run(self, node, step, cmd, *, check=True, timeout=None, hint=None):  # noqa: ANN001, ANN201
        name = node if isinstance(node, str) else node.name
        self.log.append((name, cmd))
        codes = self.exits.get(cmd, [0])
        code = codes.pop(0) if len(codes) > 1 else codes[0]
        return Result(f"out of {cmd}", "", code)

    def put(self, node, step, data, path, mode, owner=None):  # noqa: ANN001, ANN201
        self.log.append((node if isinstance(node, str) else node.name, f"put {path}"))


def test_ops_run_in_order_each_on_its_node(c, capsys):
    r = FakeRemote(c)
    called = []
    plan = [Op("init", "init-cmd"), Op("join", call=lambda rr: called.append(rr), node="pi2"),
            Op("write f", put=("/f", "x"), node="pi3"), Op("settle", "check", wait=5)]
    assert apply_ops(r, c.nodes[0], "demo", plan) is True
    assert r.log == [("pi1", "init-cmd"), ("pi3", "put /f"), ("pi1", "check")]
    assert called == [r]
    assert capsys.readouterr().out.splitlines() == [
        "pi1: demo: init", "pi2: demo: join", "pi3: demo: write f", "pi1: demo: settle"]


def test_dry_run_only_says_what_it_would_do(c, capsys):
    r = FakeRemote(c)
    plan = [Op("join", call=lambda rr: pytest.fail("called in a dry run"), node="pi2"),
            Op("settle", "check", wait=5)]
    assert apply_ops(r, c.nodes[0], "demo", plan, dryrun=True) is True
    assert r.log == []
    assert capsys.readouterr().out.splitlines() == ["pi2: demo: would join",
                                                    "pi1: demo: would settle"]
    assert apply_ops(r, c.nodes[0], "demo", []) is False
    assert capsys.readouterr().out == "pi1: demo: nothing to do\n"


def test_wait_polls_until_the_check_succeeds(c, monkeypatch):
    monkeypatch.setattr(ops.time, "sleep", lambda s: None)
    r = FakeRemote(c, {"check": [1, 1, 0]})
    apply_ops(r, c.nodes[0], "demo", [Op("settle", "check", wait=5)])
    assert r.log == [("pi1", "check")] * 3


def test_wait_fails_after_its_deadline_naming_what_did_not_happen(c, monkeypatch):
    monkeypatch.setattr(ops.time, "sleep", lambda s: None)
    r = FakeRemote(c, {"check": [1]})
    with pytest.raises(RemoteError) as e:
        apply_ops(r, c.nodes[0], "demo",
                  [Op("wait until pi2 is ready", "check", wait=0.01, hint="look at pi2",
                      node="pi2")])
    (f,) = e.value.failures
    assert (f.node, f.kind, f.hint) == ("pi2", Kind.TIMEOUT, "look at pi2")
    assert f.detail == "not done after 0.01 s: wait until pi2 is ready"
    assert f.stderr == "out of check"
