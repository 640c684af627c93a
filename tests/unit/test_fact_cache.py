"""The facts a doit run reads once (tasks/fact_cache.py): reads kept until a change, what the
next run reads up front, and the batch that reads it (run here with a real sh)."""

from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path

import pytest

from tasks import fact_cache
from tasks.config import LAB_CLUSTER_FILE, Cluster, load_cluster
from tasks.failures import Result
from tests.unit.test_remote import FakeRemote, LocalRemote


@pytest.fixture
def cluster() -> Cluster:
    return load_cluster(LAB_CLUSTER_FILE)


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> fact_cache.FactCache:
    """Each test its own shared cache (the process-wide one is doit's run)."""
    cache = fact_cache.FactCache()
    cache.begin()
    monkeypatch.setattr("tasks.remote._FACTS", cache)
    return cache


def counting(out: str = "x\n"):  # noqa: ANN201 - a Handler that counts its commands
    seen: list[str] = []

    def handler(node: str, cmd: str, stdin: str) -> tuple[str, str, int]:
        seen.append(f"{node}: {shlex.split(cmd)[-1]}")
        return f"{out}{len(seen)}\n", "", 0

    return handler, seen


# ---------------------------------------------------------------------------------------------
# Reads kept until a change


def test_a_read_serves_the_later_reads_of_the_run(cluster: Cluster) -> None:
    handler, seen = counting()
    r = FakeRemote(cluster, handler, shared=True)
    with r.reading():
        first = r.run("pi1", "a", "docker info")
    with r.reading():
        again = r.run("pi1", "b", "docker info")  # another step, same fact: not asked again
        other = r.run("pi2", "b", "docker info")  # another node: asked
    assert first.stdout == again.stdout == "x\n1\n"
    assert other.stdout == "x\n2\n"
    assert seen == ["pi1: docker info", "pi2: docker info"]


def test_a_command_outside_reading_drops_every_kept_read(cluster: Cluster) -> None:
    handler, seen = counting()
    r = FakeRemote(cluster, handler, shared=True)
    with r.reading():
        r.run("pi1", "a", "cat /etc/x")
    r.run("pi2", "a", "touch /etc/y")  # a change (or a poll), on any node
    with r.reading():
        after = r.run("pi1", "a", "cat /etc/x")
    assert after.stdout == "x\n3\n", "read live after the change"
    assert seen == ["pi1: cat /etc/x", "pi2: touch /etc/y", "pi1: cat /etc/x"]


def test_waits_and_polls_outside_reading_always_read_live(cluster: Cluster) -> None:
    handler, seen = counting()
    r = FakeRemote(cluster, handler, shared=True)
    with r.reading():
        r.run("pi1", "a", "docker ps")
    outs = [r.run("pi1", "wait", "docker ps").stdout for _ in range(3)]
    assert outs == ["x\n2\n", "x\n3\n", "x\n4\n"]


def test_only_the_shared_remote_of_a_run_keeps_reads(cluster: Cluster) -> None:
    handler, seen = counting()
    r = FakeRemote(cluster, handler)  # status, drill, tests
    with r.reading():
        r.run("pi1", "a", "docker ps")
        r.run("pi1", "a", "docker ps")
    assert len(seen) == 2


def test_commands_with_stdin_or_secret_are_never_kept_nor_recorded(
        cluster: Cluster, fresh_cache: fact_cache.FactCache) -> None:
    handler, seen = counting()
    r = FakeRemote(cluster, handler, shared=True)
    with r.reading():
        for _ in range(2):
            r.run("pi1", "a", "cat", stdin="payload")
            r.run("pi1", "a", "mysql -e 'x'", secret=True)
    assert len(seen) == 4
    assert fresh_cache.asked == {}


def test_reading_carries_into_on_all_threads_and_a_failed_read_still_fails(
        cluster: Cluster) -> None:
    calls: list[str] = []

    def handler(node: str, cmd: str, stdin: str) -> tuple[str, str, int]:
        calls.append(node)
        return "", "no such volume", 1

    r = FakeRemote(cluster, handler, shared=True)
    with r.reading():
        r.run_all("a", "gluster volume info v", check=False)
        with pytest.raises(Exception, match="no such volume"):
            r.run("pi1", "b", "gluster volume info v")  # kept, and judged again by `check`
    assert sorted(calls) == ["pi1", "pi2", "pi3"]


def test_nothing_is_kept_outside_a_run_nor_longer_than_max_age(
        cluster: Cluster, fresh_cache: fact_cache.FactCache,
        monkeypatch: pytest.MonkeyPatch) -> None:
    handler, seen = counting()
    r = FakeRemote(cluster, handler, shared=True)
    with r.reading():
        r.run("pi1", "a", "docker ps")
        monkeypatch.setattr(fact_cache, "MAX_AGE", 0.0)
        time.sleep(0.01)
        r.run("pi1", "a", "docker ps")  # too old: asked again
        monkeypatch.setattr(fact_cache, "MAX_AGE", 10.0)
        fresh_cache.end()  # the run is over (steps called on their own, tests)
        r.run("pi1", "a", "docker ps")
        r.run("pi1", "a", "docker ps")
    assert len(seen) == 4


def test_the_end_of_a_run_notes_what_it_read(cluster: Cluster, tmp_path: Path) -> None:
    cache = fact_cache.FactCache()
    record = tmp_path / "reads.json"
    cache.begin(record, "setup")
    cache.read("k", "pi1@10.77.0.11", "docker ps", lambda: Result("", "", 0))
    cache.read("k", "pi1@10.77.0.11", "uname", lambda: Result("", "", 0))
    cache.end()
    assert fact_cache.load_plan(record, "setup") == {"pi1@10.77.0.11": ["docker ps", "uname"]}
    cache.begin(record, "setup")
    cache.end()  # a run that read nothing leaves the record as it was
    assert fact_cache.load_plan(record, "setup") == {"pi1@10.77.0.11": ["docker ps", "uname"]}


def test_a_read_begun_before_a_change_is_not_kept() -> None:
    cache = fact_cache.FactCache()
    cache.begin()
    res, epoch = cache.lookup("k", "cmd", "pi1@a")
    assert res is None
    cache.changed()  # meanwhile, another thread changed a node
    cache.keep("k", "cmd", Result("old", "", 0), epoch)
    assert cache.lookup("k", "cmd", "pi1@a")[0] is None


# ---------------------------------------------------------------------------------------------
# What the next run reads up front


def test_the_commands_read_are_recorded_per_command_line(tmp_path: Path) -> None:
    path = tmp_path / "state" / "reads.json"
    fact_cache.save_plan(path, "setup", {"pi1@10.0.0.1": ["a", "b"]})
    fact_cache.save_plan(path, "clean", {"pi1@10.0.0.1": ["c"]})
    assert fact_cache.load_plan(path, "setup") == {"pi1@10.0.0.1": ["a", "b"]}
    assert fact_cache.load_plan(path, "clean") == {"pi1@10.0.0.1": ["c"]}
    assert fact_cache.load_plan(path, "status") == {}
    path.write_text("{broken")
    assert fact_cache.load_plan(path, "setup") == {}, "a damaged record: nothing read ahead"


def test_run_key_is_the_command_line_without_options() -> None:
    assert fact_cache.run_key(["setup"]) == "setup"
    assert fact_cache.run_key(["-v", "2", "config=x.yml", "setup"]) == "2 config=x.yml setup"
    assert fact_cache.run_key([]) == "(default)"


def test_prefetch_serves_the_steps_and_a_change_ends_it(cluster: Cluster) -> None:
    r = LocalRemote(cluster)
    r.shared = True
    cmds = ["echo one", "printf 'no newline'", "echo err >&2; exit 3"]
    assert r.prefetch("pi1", cmds) == 3
    batches = len(r.log)
    with r.reading():
        got = [r.run("pi1", "s", c, check=False) for c in cmds]
    assert len(r.log) == batches, "every read served from the batch"
    assert [(g.stdout, g.stderr, g.exit_code) for g in got] == [
        ("one\n", "", 0), ("no newline", "", 0), ("", "err\n", 3)]
    r.run("pi1", "s", "true")  # a change
    with r.reading():
        r.run("pi1", "s", "echo one")
    assert len(r.log) == batches + 2


# ---------------------------------------------------------------------------------------------
# The batch, run by a real sh


def _run_batch(cmds: list[str]) -> dict[str, Result]:
    script, nonce = fact_cache.batch_script(cmds)
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    return fact_cache.parse_batch(cmds, out.stdout, nonce)


def test_the_batch_gives_each_command_its_own_output_and_exit_code() -> None:
    cmds = ["echo a; echo b", "printf 'x'", "echo '@@haswarm-read-fake 0 0 o@@'",
            "echo 'quote '\\'' and $HOME' | tr a A", "cat", "exit 77", "printf '\\n\\n'"]
    got = _run_batch(cmds)
    assert got[cmds[0]] == Result("a\nb\n", "", 0)
    assert got[cmds[1]] == Result("x", "", 0)
    assert got[cmds[2]].stdout == "@@haswarm-read-fake 0 0 o@@\n", "another marker is data"
    assert got[cmds[3]].stdout == "quote ' And $HOME\n"
    assert got[cmds[4]] == Result("", "", 0), "no stdin: a command waiting for input ends"
    assert got[cmds[5]].exit_code == 77
    assert got[cmds[6]].stdout == "\n\n"


def test_the_batch_runs_at_once_but_gluster_commands_one_after_the_other() -> None:
    cmds = [f"sleep 0.5; echo {i}" for i in range(4)] + \
           [f"echo gluster volume status {i} $(date +%s.%N); sleep 0.3" for i in range(2)]
    t0 = time.monotonic()
    got = _run_batch(cmds)
    took = time.monotonic() - t0
    assert took < 1.5, f"the sleeps ran at once ({took:.1f} s)"
    starts = sorted(float(got[c].stdout.split()[-1]) for c in cmds[4:])
    assert starts[1] - starts[0] >= 0.25, "the gluster CLI is asked one transaction at a time"


def test_a_command_that_times_out_is_left_to_its_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fact_cache, "BATCH_COMMAND_TIMEOUT", 1)
    got = _run_batch(["sleep 5", "echo fast"])
    assert "sleep 5" not in got
    assert got["echo fast"].stdout == "fast\n"


def test_a_cut_off_batch_gives_nothing() -> None:
    cmds = ["echo a"]
    script, nonce = fact_cache.batch_script(cmds)
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True).stdout
    assert fact_cache.parse_batch(cmds, out[: out.rindex("@@haswarm")], nonce) == {}


def test_a_busy_gluster_answer_is_left_to_its_step() -> None:
    cmds = ["echo 'volume status: failed: Another transaction is in progress' >&2; exit 1",
            "echo 'Locking failed on 10.0.0.2'; exit 1", "echo fine"]
    assert list(_run_batch(cmds)) == ["echo fine"]


def test_probes_are_kept_one_by_one_so_steps_share_them(cluster: Cluster) -> None:
    from tasks.facts import gather

    r = LocalRemote(cluster)
    r.shared = True
    with r.reading():
        first = gather(r, cluster.node("pi1"), "a", {"x": "echo x", "y": "echo y >&2"})
        second = gather(r, cluster.node("pi1"), "b", {"y2": "echo y >&2", "z": "echo z"})
    assert first == {"x": "x\n", "y": "y\n"}
    assert second == {"y2": "y\n", "z": "z\n"}
    assert len(r.log) == 2 and "echo y" not in r.log[1][1], "the shared probe is asked once"
    assert gather(r, cluster.node("pi1"), "c", {"x": "echo x"}) == {"x": "x\n"}
    assert len(r.log) == 3, "outside reading: asked"
