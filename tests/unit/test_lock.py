"""stack/haswarm-lock.py.j2, the keeper that lets at most one Home Assistant run: two keepers on
one lock file (a local file here; the Gluster volume in the cluster)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks.render import TEMPLATES

SCRIPT = TEMPLATES / "haswarm-lock.py.j2"


@pytest.fixture(autouse=True)
def one_node(tmp_path, monkeypatch):
    """The node list every keeper reads (tasks/members.py): this host alone, which answers
    (a refused connection is an answer)."""
    members = tmp_path / "members"
    members.write_text("127.0.0.1\n")
    monkeypatch.setenv("HASWARM_MEMBERS", str(members))


def start(lock: Path, ready: Path, image: str = "") -> subprocess.Popen:
    env = {**os.environ, "HASWARM_IMAGE": image} if image else None
    return subprocess.Popen([sys.executable, str(SCRIPT), str(lock), str(ready)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def end(*procs: subprocess.Popen | None) -> None:
    """Kill whatever of `procs` still runs (a test's cleanup)."""
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(5)


def wait_file(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


def wait_for_text(path: Path, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return True
        time.sleep(0.05)
    return False


def test_the_second_keeper_waits_until_the_first_is_gone(tmp_path):
    lock = tmp_path / "config" / ".haswarm" / "homeassistant.lock"
    first = start(lock, tmp_path / "ready1")
    second = None
    try:
        assert wait_file(tmp_path / "ready1", 10)
        second = start(lock, tmp_path / "ready2")
        assert not wait_file(tmp_path / "ready2", 2.0)  # the first one holds it
        assert "pid" in lock.read_text()  # who holds it, for the waiting one's log
        first.kill()  # its container ended: the lock is released
        first.wait(5)
        assert wait_file(tmp_path / "ready2", 5)
    finally:
        end(first, second)
    assert "lock held after" in second.stdout.read()


def test_the_heartbeat_goes_to_its_own_file_and_a_failing_one_fences(tmp_path):
    """Writes through the lock's own descriptor would leave a replaced brick behind for as long
    as HA runs (Gluster does not reopen a descriptor holding a POSIX lock): the heartbeat is a
    file of its own, opened for each beat."""
    needs_root_unshare_flock()
    lock, beat = tmp_path / "lock", tmp_path / "lock.beat"
    proc = isolated_keeper(tmp_path, lo_up=True)
    try:
        assert wait_file(tmp_path / "ready", 10) and wait_file(beat, 5)
        written = lock.stat().st_mtime_ns
        first = beat.stat().st_mtime_ns
        time.sleep(2.5)
        assert lock.stat().st_mtime_ns == written  # the lock file: written once, when taken
        assert beat.stat().st_mtime_ns > first
        # (each beat truncates and rewrites the file: read between two, it may be empty)
        assert wait_for_text(beat, "pid", 2.0), beat.read_text()
        beat.unlink()
        beat.mkdir()  # the next beats fail (as on a volume that lost its quorum)
        out, _ = proc.communicate(timeout=10)
    finally:
        end(proc)
    assert "FENCING: heartbeat writes to the volume fail" in out


def test_during_an_upgrade_a_free_lock_is_left_to_the_new_image(tmp_path):
    lock = tmp_path / "config" / ".haswarm" / "homeassistant.lock"
    lock.parent.mkdir(parents=True)
    (lock.parent / "homeassistant.image").write_text("ha:new\n")  # `doit setup` announced it
    old = new = None
    try:
        old = start(lock, tmp_path / "old", image="ha:old")
        assert not wait_file(tmp_path / "old", 2.0)  # the lock is free, but left to ha:new
        new = start(lock, tmp_path / "new", image="ha:new")
        assert wait_file(tmp_path / "new", 5)
        assert not (tmp_path / "old").exists()
    finally:
        end(old, new)
    assert "being upgraded to ha:new" in old.stdout.read()


@pytest.mark.parametrize("why", ["the new image failed", "the announcement is old"])
def test_the_old_image_takes_a_free_lock_when(why, tmp_path):
    lock = tmp_path / "config" / ".haswarm" / "homeassistant.lock"
    lock.parent.mkdir(parents=True)
    announced = lock.parent / "homeassistant.image"
    announced.write_text("ha:new\n")
    if why == "the new image failed":  # its entrypoint said so
        (lock.parent / "homeassistant.image-failed").write_text("ha:new\n")
    else:  # an upgrade long over
        os.utime(announced, (time.time() - 3600, time.time() - 3600))
    old = start(lock, tmp_path / "old", image="ha:old")
    try:
        assert wait_file(tmp_path / "old", 5)
    finally:
        end(old)


def test_the_template_holds_no_jinja():
    text = SCRIPT.read_text()
    assert "{{" not in text and "{%" not in text and "{#" not in text


# ---------------------------------------------------------------------------------------------
# stack/mosquitto-entrypoint.sh.j2: the same for Mosquitto, in POSIX sh with flock. Each
# "container" is the rendered script in its own PID namespace (the keeper stops PID 1 when it
# fences), whose "image entrypoint" starts a fake broker that ends on SIGTERM as mosquitto does.


def mosquitto_entrypoint(tmp_path: Path, name: str, lock: Path,
                         on_term: str = "exit 0") -> tuple[Path, Path, Path]:
    """(script, its ready file, the file its broker writes once it runs). `on_term`: "" makes
    the fake broker ignore SIGTERM (as a broker whose store save hangs); else it saves its
    store and exits."""
    import jinja2

    ready, running = tmp_path / f"{name}.ready", tmp_path / f"{name}.running"
    store = tmp_path / f"{name}-store"  # the container's own store; the volume's: beside the lock
    broker = tmp_path / f"{name}-image-entrypoint"
    # A broker that writes its store when it starts (after the store was copied in: "from" the
    # copy's content) and when it stops, as Mosquitto does.
    db = store / "mosquitto.db"
    term = f"echo {name}-final > {db}; exit 0" if on_term else ""
    broker.write_text(
        "#!/bin/sh\n"
        f"trap '{term}' TERM\n"
        f"echo \"{name} from $(cat {db} 2>/dev/null || echo nothing)\" > {db}.new\n"
        f"mv {db}.new {db}\n"
        f"echo \"$@\" > {running}\n"
        "while :; do sleep 0.1; done\n")
    broker.chmod(0o755)
    text = jinja2.Template((TEMPLATES / "mosquitto-entrypoint.sh.j2").read_text(),
                           undefined=jinja2.StrictUndefined).render(
        lock_file=str(lock), lock_ready=str(ready), local_store=str(store),
        volume_store=str(lock.parent.parent / "mosquitto.db"))
    assert "\n/docker-entrypoint.sh \"$@\" &\n" in text
    script = tmp_path / f"{name}.sh"
    script.write_text(text.replace("\n/docker-entrypoint.sh", f"\n{broker}"))
    return script, ready, running


def container(script: Path, isolated: bool = False, host: str = "", **env: str
              ) -> subprocess.Popen:
    """The script as a container's PID 1; `isolated`: also in a network namespace of its own
    (loopback down: no node answers) with the nodes to probe (NODES_ENV); `host`: its host
    name (a container's ID in the cluster), in a UTS namespace of its own; `env` added."""
    tmp = script.with_suffix(".tmp")  # the container's own /tmp
    tmp.mkdir()
    net = ["--net"] if isolated else []
    named = ["--uts", "sh", "-c", f'hostname {host}; exec sh "$@"', "sh"] if host else ["sh"]
    return subprocess.Popen(["unshare", "--pid", *net, "--fork", "--kill-child", *named,
                             str(script), "mosquitto", "-c", "conf"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HASWARM_LOCK_HANG": "3",
                                 "HASWARM_LOCK_SETTLE": "2", "TMPDIR": str(tmp),
                                 **(nodes_env(script.parent) if isolated else {}), **env})


def stop(proc: subprocess.Popen) -> str:
    """`docker stop`: SIGTERM to the container's PID 1 (the child of unshare); its output."""
    init = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    subprocess.run(["kill", "-TERM", init[0]], check=True)
    out, _ = proc.communicate(timeout=10)
    return out


def needs_root_unshare_flock() -> None:
    import os
    import shutil

    import pytest

    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("flock")):
        pytest.skip("needs root, unshare and flock")


def test_mosquitto_handover_clean_at_once_unclean_after_the_settle_time(tmp_path):
    needs_root_unshare_flock()
    lock = tmp_path / "data" / ".haswarm" / "mosquitto.lock"
    scripts = [mosquitto_entrypoint(tmp_path, name, lock) for name in ("a", "b", "c")]
    procs: list[subprocess.Popen] = []
    try:
        procs.append(container(scripts[0][0]))
        assert wait_file(scripts[0][2], 10)
        assert scripts[0][2].read_text().split() == ["mosquitto", "-c", "conf"]  # the command
        procs.append(container(scripts[1][0]))
        assert not wait_file(scripts[1][2], 2.0)  # the first one holds the lock
        out = stop(procs[0])  # a clean stop: the broker ends, the lock is handed over
        assert re.search(r"lock held after [01] s", out) and "FENCING" not in out
        assert Path(f"{lock}.beat").read_text().startswith("released ")
        started = time.monotonic()
        assert wait_file(scripts[1][2], 3)
        assert time.monotonic() - started < 2.0  # at once: no settle time
        procs.append(container(scripts[2][0]))
        time.sleep(1.5)
        procs[1].kill()  # the node dies: no clean release
        procs[1].wait(5)
        started = time.monotonic()
        assert wait_file(scripts[2][2], 8)
        assert time.monotonic() - started >= 2.0  # HASWARM_LOCK_SETTLE
        out = stop(procs[2])
        assert "the last holder has not released the lock (container" in out
    finally:
        end(*procs)


def test_mosquitto_lock_let_go_by_a_dead_holder_sooner_than_the_bricks_drop_it(tmp_path):
    """A killed holder's lock moves at once (its connections are reset): its broker died with
    it, so the next one waits only until its last heartbeat is 3 s old, not the whole settle
    time meant for a holder cut off (whose lock moves only once the bricks drop it)."""
    needs_root_unshare_flock()
    lock = tmp_path / "data" / ".haswarm" / "mosquitto.lock"
    waits = {}
    for drop in ("0", "8"):  # no quick handover; the bricks drop a silent client after 8 s
        (tmp_path / drop).mkdir()
        scripts = [mosquitto_entrypoint(tmp_path / drop, name, lock) for name in ("a", "b")]
        # hang 3: a holder not heard of for 6 s has surely stopped; settle 10 s at most
        env = {"HASWARM_LOCK_SETTLE": "10", "HASWARM_LOCK_DROP": drop}
        procs = [container(scripts[0][0], **env)]
        try:
            assert wait_file(scripts[0][2], 10)
            procs.append(container(scripts[1][0], **env))
            time.sleep(2.5)
            procs[0].kill()  # the node dies: no clean release, the lock moves at once
            procs[0].wait(5)
            started = time.monotonic()
            assert wait_file(scripts[1][2], 12)
            waits[drop] = time.monotonic() - started
            out = stop(procs[1])
            # (with the quick handover it waited before it even tried the lock: no word then)
            assert ("has not released the lock" in out) == (drop == "0"), out
        finally:
            end(*procs)
        lock.unlink()
        Path(f"{lock}.beat").unlink()
    # its last beat 3 s old (whole seconds) and seen standing still for 3 s
    assert 1.0 <= waits["8"] <= 4.5, waits
    assert waits["0"] >= 4.0, waits  # its last beat 6 s old


def two_mosquittos_one_heartbeat(tmp_path: Path) -> tuple[tuple[Path, Path, Path], ...]:
    """Two Mosquitto entrypoints (as mosquitto_entrypoint) with a lock file each and one
    heartbeat file: as two keepers both granted the lock."""
    first_lock = tmp_path / "first" / ".haswarm" / "mosquitto.lock"
    later_lock = tmp_path / "later" / ".haswarm" / "mosquitto.lock"
    later_lock.parent.mkdir(parents=True)
    first_lock.parent.mkdir(parents=True)
    Path(f"{later_lock}.beat").symlink_to(Path(f"{first_lock}.beat"))
    return (mosquitto_entrypoint(tmp_path, "a", first_lock),
            mosquitto_entrypoint(tmp_path, "b", later_lock))


def test_a_mosquitto_that_beats_keeps_a_forgotten_lock_from_being_taken(tmp_path):
    """The bricks forgot the holder's flock (each restarted since it was taken), here: two lock
    files with one heartbeat file. The second does not even try the lock while the holder's
    heartbeat moves, however long; once the holder is gone (killed: no release), it runs."""
    needs_root_unshare_flock()
    first, later = two_mosquittos_one_heartbeat(tmp_path)
    env = {"HASWARM_LOCK_SETTLE": "3", "HASWARM_LOCK_DROP": "8"}  # settle 3 s: passed, still no
    procs = [container(first[0], **env)]
    try:
        assert wait_file(first[2], 10)
        procs.append(container(later[0], **env))
        assert not wait_file(later[2], 8.0)
        procs[0].kill()
        procs[0].wait(5)
        assert wait_file(later[2], 8)
        out = stop(procs[1])
    finally:
        end(*procs)
    assert "another Mosquitto holds the lock (container" in out and "; it beats" in out, out


def test_of_two_mosquittos_that_both_hold_the_lock_the_later_one_fences(tmp_path):
    """Should the heartbeat check fail too (a holder whose node stood still longer than its
    heartbeat's grace, then went on), two keepers hold the lock: each finds the other's beats
    between its own; the one that took the lock later fences, the other runs on."""
    needs_root_unshare_flock()
    first, later = two_mosquittos_one_heartbeat(tmp_path)
    env = {"HASWARM_LOCK_SETTLE": "3", "HASWARM_LOCK_DROP": "8", "HASWARM_LOCK_HANG": "30"}
    procs = [container(first[0], host="first", **env)]
    try:
        assert wait_file(first[2], 10)
        time.sleep(1.1)  # (the time the lock was taken: whole seconds)
        stalled = descendants(procs[0].pid)
        for pid in stalled:
            os.kill(pid, 19)  # SIGSTOP: the whole container stands still
        procs.append(container(later[0], host="later", **env))
        assert wait_file(later[2], 10)  # its heartbeat 3 s old: taken
        for pid in stalled:
            os.kill(pid, 18)  # SIGCONT
        out, _ = procs[1].communicate(timeout=15)
        time.sleep(1.0)
        assert procs[0].poll() is None
        first_out = stop(procs[0])
    finally:
        end(*procs)
    assert "FENCING: another Mosquitto beats beside this one" in out, out
    assert "it took the lock later and fences itself" in first_out, first_out


def _open_by(path: Path) -> list[str]:
    """The names of the processes (of this machine) that have `path` open."""
    out = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                out.append((fd_dir.parent / "comm").read_text().strip())
        except OSError:
            continue
    return out


def test_only_the_holder_processes_have_the_mosquitto_lock_open(tmp_path):
    """Every process that has the lock file open makes Gluster flush it when it exits, which
    hangs on a node cut off: the keeper, its probes and its sleeps must not have it open."""
    needs_root_unshare_flock()
    lock = tmp_path / "data" / ".haswarm" / "mosquitto.lock"
    script, _, running = mosquitto_entrypoint(tmp_path, "one", lock)
    proc = container(script, isolated=False)
    try:
        assert wait_file(running, 10)
        time.sleep(1.5)  # a few heartbeats
        holders = _open_by(lock)
        assert holders and set(holders) <= {"flock", "sleep"}, holders
    finally:
        end(proc)


def test_a_mosquitto_whose_volume_fails_is_fenced(tmp_path):
    import os

    needs_root_unshare_flock()
    lock = tmp_path / "data" / ".haswarm" / "mosquitto.lock"
    beat = Path(f"{lock}.beat")
    procs: list[subprocess.Popen] = []
    try:
        # writes fail (the volume lost its quorum): fenced at once, the container ends
        script, _, running = mosquitto_entrypoint(tmp_path, "one", lock)
        procs.append(container(script))
        assert wait_file(running, 10)
        beat.unlink()
        beat.mkdir()
        out, _ = procs[0].communicate(timeout=10)
        assert "FENCING: a write to the volume failed" in out
        # a write that hangs (a FIFO without a reader never opens): fenced after the deadline,
        # the broker killed although a stop would hang (its store's save to the hung volume)
        beat.rmdir()
        script, _, running = mosquitto_entrypoint(tmp_path, "two", lock, on_term="")
        procs.append(container(script))
        assert wait_file(running, 10)
        beat.unlink()
        os.mkfifo(beat)
        started = time.monotonic()
        out, _ = procs[1].communicate(timeout=15)
        assert "FENCING: a write to the volume hangs for more than 3 s" in out
        assert 3 <= time.monotonic() - started < 8
    finally:
        end(*procs)


def test_a_mosquitto_starts_soon_after_an_old_unclean_end(tmp_path):
    """The last holder's heartbeat is older than HANG + 3 s: it has surely stopped, once this
    keeper has seen it stand still for 3 s (an old heartbeat may be an old copy, read right
    after this node's brick restarted)."""
    needs_root_unshare_flock()
    lock = tmp_path / "data" / ".haswarm" / "mosquitto.lock"
    lock.parent.mkdir(parents=True)
    Path(f"{lock}.beat").write_text(f"container dead 2026-01-01T00:00:00 @{int(time.time()) - 7}\n")
    script, _, running = mosquitto_entrypoint(tmp_path, "one", lock)
    proc = container(script)
    try:
        started = time.monotonic()
        assert wait_file(running, 10)
        assert 2.5 <= time.monotonic() - started < 4.5
        assert "has not released" not in stop(proc)
    finally:
        end(proc)


# ---------------------------------------------------------------------------------------------
# A cut-off node: both keepers probe every node's glusterd each second and fence when they have
# not reached a majority for HASWARM_ISOLATED_AFTER s. Here the "node" is a network namespace:
# with its loopback down nothing answers (cut off); with it up, 127.0.0.x refuses at once, which
# counts as an answer for Home Assistant's keeper (Mosquitto's nc -z counts only a connection).

NODES = "127.0.0.2\n127.0.0.3\n127.0.0.4\n"


def nodes_env(where: Path, nodes: str = NODES) -> dict[str, str]:
    """The environment of a keeper whose node list (a file in `where`) holds `nodes`."""
    members = where / "members"
    members.write_text(nodes)
    return {"HASWARM_MEMBERS": str(members), "HASWARM_ISOLATED_AFTER": "1"}


def isolated_keeper(tmp_path: Path, lo_up: bool, isolated_after: str = "1",
                    host: str = "container") -> subprocess.Popen:
    """A keeper of `tmp_path`/lock (ready file beside it) in a PID and network namespace, on
    a host named `host` (a container's ID in the cluster)."""
    up = "ip link set lo up; " if lo_up else ""
    return subprocess.Popen(
        # (--mount-proc: the fence looks for Home Assistant processes in /proc; only this
        # namespace's are to be seen)
        ["unshare", "--pid", "--net", "--uts", "--fork", "--kill-child", "--mount-proc", "sh",
         "-c", f'hostname {host}; {up}exec "$0" "$@"', sys.executable, str(SCRIPT),
         str(tmp_path / "lock"), str(tmp_path / "ready")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **nodes_env(tmp_path),
             "HASWARM_ISOLATED_AFTER": isolated_after})


def fenced_as_cut_off(proc: subprocess.Popen, ready: Path) -> float:
    """Once `ready` exists (the lock is held), the seconds until the keeper ended; it must have
    fenced because no node answered."""
    try:
        assert wait_file(ready, 10)
        started = time.monotonic()
        out, _ = proc.communicate(timeout=10)
    finally:
        end(proc)
    assert "FENCING: this node reached 0 of 3 nodes in the last 1 s: it is cut off" in out
    assert re.search(r"last answers: 127\.0\.0\.2 [0-9.]+ s ago; 127\.0\.0\.3 ", out), out
    return time.monotonic() - started


def test_the_ha_keeper_fences_a_node_that_reaches_no_majority(tmp_path):
    needs_root_unshare_flock()
    assert fenced_as_cut_off(isolated_keeper(tmp_path, lo_up=False), tmp_path / "ready") < 4.0


def test_the_ha_keeper_stays_while_the_nodes_answer(tmp_path):
    needs_root_unshare_flock()
    proc = isolated_keeper(tmp_path, lo_up=True)
    try:
        assert wait_file(tmp_path / "ready", 10)
        time.sleep(3.0)
        assert proc.poll() is None  # still holding: refused connections are answers
    finally:
        end(proc)
    assert "FENCING" not in proc.stdout.read()


def test_the_ha_keeper_follows_the_node_list(tmp_path):
    """The list is read while the keeper runs (a node added or removed restarts nothing): three
    nodes that answer, then two more that cannot (no route): 3 of 5 is a majority, it stays;
    then a list of one that answers and four that do not: it fences, naming 1 of 5."""
    needs_root_unshare_flock()
    proc = isolated_keeper(tmp_path, lo_up=True)
    members = tmp_path / "members"
    try:
        assert wait_file(tmp_path / "ready", 10)
        members.write_text(NODES + "10.255.0.1\n10.255.0.2\n")
        time.sleep(5.0)
        assert proc.poll() is None
        members.write_text("127.0.0.2\n10.255.0.1\n10.255.0.2\n10.255.0.3\n10.255.0.4\n")
        out, _ = proc.communicate(timeout=10)
    finally:
        end(proc)
    assert "the node list changed: 127.0.0.2 127.0.0.3 127.0.0.4 -> 127.0.0.2 127.0.0.3 " \
           "127.0.0.4 10.255.0.1 10.255.0.2" in out
    assert "FENCING: this node reached 1 of 5 nodes" in out


def test_a_heartbeat_that_moves_keeps_a_forgotten_lock_from_being_taken(tmp_path):
    """The bricks forgot the holder's lock (each restarted since it was taken), here: two lock
    files with one heartbeat file. The second keeper gets its lock but takes it only once the
    holder's heartbeat has stood still for QUIET s: while it beats, never; once the holder is
    gone, within QUIET s."""
    needs_root_unshare_flock()
    first_dir, later_dir = tmp_path / "first", tmp_path / "later"
    first_dir.mkdir()
    later_dir.mkdir()
    (later_dir / "lock.beat").symlink_to(first_dir / "lock.beat")
    first, later = isolated_keeper(first_dir, lo_up=True, host="first"), None
    try:
        assert wait_file(first_dir / "ready", 10)
        later = isolated_keeper(later_dir, lo_up=True, host="later")
        assert not wait_file(later_dir / "ready", 6.0)
        end(first)
        gone = time.monotonic()
        assert wait_file(later_dir / "ready", 5)
        assert time.monotonic() - gone >= 1.5  # (its last beat: up to 1 s before the end)
    finally:
        end(first, later)
    assert "another Home Assistant holds the lock (?); it beats" in later.stdout.read()


def test_of_two_keepers_that_both_hold_the_lock_the_later_one_fences(tmp_path):
    """Should the lease fail as well (the holder stood still longer than QUIET s, as a stalled
    node), two keepers hold the lock: each finds the other's beats between its own; the one
    that took the lock later fences, the other runs on."""
    needs_root_unshare_flock()
    first_dir, later_dir = tmp_path / "first", tmp_path / "later"
    first_dir.mkdir()
    later_dir.mkdir()
    (later_dir / "lock.beat").symlink_to(first_dir / "lock.beat")
    # (isolated_after 5: the stalled one's own watchdog lets a 3.5 s stall pass)
    first = isolated_keeper(first_dir, lo_up=True, host="first", isolated_after="5")
    later = None
    try:
        assert wait_file(first_dir / "ready", 10)
        subprocess.run(["pkill", "-STOP", "-P", str(first.pid)], check=True)
        later = isolated_keeper(later_dir, lo_up=True, host="later")
        assert wait_file(later_dir / "ready", 10)
        subprocess.run(["pkill", "-CONT", "-P", str(first.pid)], check=True)
        out, _ = later.communicate(timeout=10)
        time.sleep(1.5)
        assert first.poll() is None
    finally:
        end(first, later)
    assert "FENCING: another keeper beats beside this one" in out, out
    # (the first one says "it took the lock later and fences itself" only if it saw the later
    # one's heartbeat change twice before that one fenced: a race, so not asserted)
    assert "FENCING" not in first.stdout.read()


def test_a_keeper_counts_another_only_once_it_has_beaten_twice():
    keeper = keeper_module()
    mine = "c1 pid 7 since 2026-12-05T10:00:05 beat 10:00:09\n"
    old = "c0 pid 9 since 2026-12-05T09:00:00 beat 10:00:04\n"  # the last holder's last beat
    others: set[str] = set()
    assert keeper.beside(old, None, others) is None  # read before this keeper's first beat
    assert keeper.beside(mine.replace("09\n", "10\n"), mine, others) is None  # its own
    assert keeper.beside(old, mine, others) is None  # once: maybe a late copy from a cache
    assert keeper.beside(old, mine, others) is None  # the same one again
    again = "c0 pid 9 since 2026-12-05T09:00:00 beat 10:00:11\n"
    assert keeper.beside(again, mine, others) == again  # it beats: it is alive
    keeper.SINCE = "2026-12-05T10:00:05"
    assert keeper.yields_to(again)  # that one took the lock sooner
    assert not keeper.yields_to("c2 pid 3 since 2026-12-05T11:00:00 beat 11:00:01\n")
    assert keeper.yields_to("garbage\n")


def test_the_ha_keeper_refuses_to_run_without_a_node_list(tmp_path, monkeypatch):
    monkeypatch.setenv("HASWARM_MEMBERS", str(tmp_path / "absent"))
    proc = start(tmp_path / "lock", tmp_path / "ready")
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode != 0
    assert f"no node list in {tmp_path / 'absent'}" in out
    assert not (tmp_path / "ready").exists()


def isolated_broker(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path, Path]:
    """Mosquitto's entrypoint as a container in a network namespace of its own (nothing
    answers); (process, its script, the file that says the broker runs, the lock)."""
    import shutil

    needs_root_unshare_flock()
    if not shutil.which("nc"):
        pytest.skip("needs nc (netcat-openbsd)")
    lock = tmp_path / "data" / ".haswarm" / "mosquitto.lock"
    script, _, running = mosquitto_entrypoint(tmp_path, "a", lock)
    return container(script, isolated=True), script, running, lock


def test_the_mosquitto_keeper_follows_the_node_list(tmp_path):
    proc, script, running, _ = isolated_broker(tmp_path)
    try:
        assert wait_file(running, 10)
        # (its namespace's loopback is down: nothing answers, but a node list of one that is
        # replaced within its grace keeps it; the new list is judged from then on)
        (script.parent / "members").write_text("10.255.0.1\n10.255.0.2\n10.255.0.3\n")
        out, _ = proc.communicate(timeout=15)
    finally:
        end(proc)
    assert "the node list changed: 127.0.0.2 127.0.0.3 127.0.0.4 -> 10.255.0.1 10.255.0.2 " \
           "10.255.0.3" in out
    assert "this node reached 0 of 3 nodes" in out
    assert "10.255.0.1 " in out.split("this node reached 0 of 3 nodes")[1]


def test_the_mosquitto_keeper_fences_a_node_that_reaches_no_majority(tmp_path):
    proc, _, running, lock = isolated_broker(tmp_path)
    assert fenced_as_cut_off(proc, running) < 5.0
    assert not Path(f"{lock}.beat").read_text().startswith("released")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for kid in children.get(todo.pop(), []):
            out.append(kid)
            todo.append(kid)
    return out


def held_up_keeper(tmp_path: Path, seconds: float) -> str:
    """An HA keeper holding the lock, all its processes stopped for `seconds` (a starved CPU, a
    stalled SD card: its probes stop too), then run on for 3.5 s; its output."""
    import os
    import signal

    needs_root_unshare_flock()
    proc = isolated_keeper(tmp_path, lo_up=True, isolated_after="2")
    try:
        assert wait_file(tmp_path / "ready", 10)
        frozen = descendants(proc.pid)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(seconds)
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        time.sleep(3.5)
    finally:
        end(proc)
    return proc.stdout.read()


def test_the_ha_keeper_held_up_briefly_does_not_take_its_stall_for_a_cut(tmp_path):
    """Stopped for 3 s, the keeper finds every probe stale when it runs again: no proof of a
    cut, and too short for the lock to have moved (ISOLATED_AFTER + 2 = 4 s here): it must not
    fence. (2 s to count as cut off: a busy machine may need more than 1 s to probe again.)"""
    assert "FENCING" not in held_up_keeper(tmp_path, 3.0)


def test_the_ha_keeper_held_up_longer_than_its_lock_may_last_fences(tmp_path):
    """Stopped for 6 s (> ISOLATED_AFTER + 2): the bricks may have released its lock to
    another node meanwhile, so it fences at once when it runs again."""
    out = held_up_keeper(tmp_path, 6.0)
    assert "FENCING: this keeper was held up for" in out
    assert "its lock may have moved to another node meanwhile" in out


def test_the_store_lives_in_the_container_and_follows_the_lock_through_the_volume(tmp_path):
    """The broker writes its store in its container; the entrypoint copies it in from the volume
    when it takes the lock, out after every change, and once more after a clean stop, before
    the next broker takes over. So a hanging volume never blocks the broker itself."""
    needs_root_unshare_flock()
    lock = tmp_path / "data" / ".haswarm" / "mosquitto.lock"
    volume_store = tmp_path / "data" / "mosquitto.db"
    volume_store.parent.mkdir(parents=True)
    volume_store.write_text("old\n")
    (a, _, a_running), (b, _, b_running) = (mosquitto_entrypoint(tmp_path, n, lock)
                                            for n in ("a", "b"))
    procs: list[subprocess.Popen] = []
    try:
        procs.append(container(a))
        assert wait_file(a_running, 10)
        deadline = time.monotonic() + 3
        while volume_store.read_text() != "a from old\n" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert volume_store.read_text() == "a from old\n"  # saved after the change
        procs.append(container(b))
        assert not wait_file(b_running, 1.0)
        stop(procs[0])
        assert volume_store.read_text() == "a-final\n"  # saved before the lock was released
        assert wait_file(b_running, 3)
        assert (tmp_path / "b-store" / "mosquitto.db").read_text() == "b from a-final\n"
    finally:
        end(*procs)


# ---------------------------------------------------------------------------------------------
# Home Assistant's connection to a broker that went silent (the keeper ends it)


def keeper_module():
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("haswarm_lock", str(SCRIPT))
    spec = importlib.util.spec_from_loader("haswarm_lock", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_the_mqtt_peers_come_from_the_kernels_table(tmp_path):
    table = tmp_path / "tcp"
    table.write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt\n"
        "   0: 0B00000A:A2C4 0500000A:075B 01 00000000:00000000 00:00000000 00000000\n"
        "   1: 0B00000A:A2C6 0600000A:075B 06 00000000:00000000 00:00000000 00000000\n"
        "   2: 0B00000A:A2C8 0700000A:0CEA 01 00000000:00000000 00:00000000 00000000\n")
    # established to 1883 only (10.0.0.6 is in TIME_WAIT, 10.0.0.7 is the database)
    assert keeper_module().mqtt_peers(1883, str(table)) == {"10.0.0.5"}


def test_the_keeper_ends_a_connection_as_ss_k_does():
    """The client end of a connection to a port is ended by SOCK_DESTROY: the process holding
    it sees the connection aborted at once (needs root, as CAP_NET_ADMIN)."""
    import socket

    if os.geteuid() != 0:
        pytest.skip("needs CAP_NET_ADMIN")
    lock = keeper_module()
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    try:
        assert "127.0.0.1" in lock.mqtt_peers(port)
        assert lock.end_connections("127.0.0.1", port) == 1
        client.settimeout(2)
        with pytest.raises(OSError):
            client.recv(1)
        assert "127.0.0.1" not in lock.mqtt_peers(port)
    finally:
        for s in (client, accepted, server):
            s.close()


def test_a_successor_is_another_address_of_the_name_where_a_broker_listens():
    """The keeper ends HA's connections to a silent broker only once another broker answers:
    an address of the broker's name, not the silent one, that accepts a connection."""
    import socket

    lock = keeper_module()
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        assert lock.successor("10.255.0.9", "localhost", port) == "127.0.0.1"
        assert lock.successor("127.0.0.1", "localhost", port) is None  # only the silent one
        assert lock.successor("10.255.0.9", "name.invalid", port) is None  # unresolved
    finally:
        server.close()
    assert lock.successor("10.255.0.9", "localhost", port) is None  # refused: a standby
    assert lock.successor.__defaults__[0] == "tasks.mosquitto"  # swarm's DNS, never the pin


def test_the_broker_name_is_pinned_in_the_hosts_file_and_moved_in_place(tmp_path):
    """HA's client resolves the broker's name in /etc/hosts first: the keeper pins it to the
    broker that answers, rewrites only its own line (the file is Docker's bind mount: rewritten
    in place, the same inode), and reads the pin back; a file it cannot write is said."""
    lock = keeper_module()
    hosts = tmp_path / "hosts"
    docker = "127.0.0.1\tlocalhost\n10.0.1.7\tabc123\n"
    hosts.write_text(docker)
    inode = hosts.stat().st_ino
    assert lock.pinned(hosts) is None
    lock.pin("10.0.1.20", "mosquitto", hosts)
    assert lock.pinned(hosts) == "10.0.1.20"
    lock.pin("10.0.1.9", "mosquitto", hosts)  # shorter: nothing of the old line is left
    assert lock.pinned(hosts) == "10.0.1.9"
    assert hosts.read_text() == docker + f"10.0.1.9\tmosquitto\t{lock.PIN_NOTE}\n"
    assert hosts.stat().st_ino == inode
    lock.pin("10.0.1.5", "mosquitto", tmp_path / "missing")  # said, not raised
    assert lock.pinned(tmp_path / "missing") is None


def test_the_keeper_reloads_the_mqtt_entry_as_its_user_and_logs_out():
    """HA's API as the keeper uses it (shapes read in HA 2026.2.3's auth/login_flow.py,
    auth/__init__.py, config/config_entries.py; checked on the lab): log in as the keeper's
    user, reload the loaded MQTT entry, revoke the refresh token; an entry not loaded is left."""
    import http.server
    import json
    import threading

    lock = keeper_module()
    calls, state = [], {"entry": "loaded", "password": "right"}

    class HA(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, code, body=None):
            raw = json.dumps(body).encode() if body is not None else b""
            self.send_response(code)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            calls.append(f"GET {self.path} {self.headers.get('Authorization')}")
            self.reply(200, [{"entry_id": "E1", "domain": "mqtt", "state": state["entry"]}])

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
            calls.append(f"POST {self.path}")
            if self.path == "/auth/login_flow":
                assert json.loads(body)["handler"] == ["homeassistant", None]
                return self.reply(200, {"type": "form", "flow_id": "F1"})
            if self.path == "/auth/login_flow/F1":
                ok = json.loads(body) == {"client_id": lock.CLIENT_ID, "username":
                                          "haswarm-keeper", "password": state["password"]}
                return self.reply(200, {"type": "create_entry", "result": "CODE"} if ok
                                  else {"type": "form", "errors": {"base": "invalid_auth"}})
            if self.path == "/auth/token":
                assert "code=CODE" in body
                return self.reply(200, {"access_token": "A", "refresh_token": "R"})
            if self.path == "/auth/revoke":
                assert body == "token=R"
                return self.reply(200)
            assert self.path == "/api/config/config_entries/entry/E1/reload"
            return self.reply(200, {"require_restart": False})

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HA)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    lock.HA_PORT = server.server_address[1]
    try:
        assert lock.reload_mqtt("right") == (True, "reloaded its MQTT entry (HTTP 200)")
        assert calls == ["POST /auth/login_flow", "POST /auth/login_flow/F1",
                         "POST /auth/token", "GET /api/config/config_entries/entry?domain=mqtt "
                         "Bearer A", "POST /api/config/config_entries/entry/E1/reload",
                         "POST /auth/revoke"]
        state["entry"] = "setup_in_progress"
        reloaded, said = lock.reload_mqtt("right", wait=0)
        assert not reloaded and "not loaded (setup_in_progress)" in said
        assert calls[-1] == "POST /auth/revoke"  # logged out again
        state["entry"] = "loaded"
        assert lock.reload_mqtt("right", still_down=lambda: False) == (
            True, "its MQTT client connected by itself")
        assert calls[-1] == "POST /auth/revoke"  # no reload: nothing to do
        assert calls[-1] == "POST /auth/revoke"  # logged out again
        state["password"] = "changed"
        with pytest.raises(ValueError, match="haswarm-keeper refused.*doit ha-onboard"):
            lock.reload_mqtt("right")
    finally:
        server.shutdown()


def test_the_holder_takes_its_lock_again_once_no_brick_holds_it(tmp_path, monkeypatch):
    """Here the "bricks" forget the lock as a restarted brick does: the test lets go of it under
    the holder (unlocks through the holder's own descriptor). The holder's next look finds it
    free and takes it again: another process is refused."""
    import fcntl

    keeper = keeper_module()
    monkeypatch.setattr(keeper, "MEND_EVERY", 0.2)
    lock = tmp_path / "lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert keeper.lock_is_free(str(lock)) is False  # held: another process is refused
    assert keeper.lock_is_free(str(lock)) is False  # (and the child's end let go of nothing)
    fcntl.lockf(fd, fcntl.LOCK_UN)  # forgotten
    assert keeper.lock_is_free(str(lock)) is True
    held, stop = [fd], threading.Event()
    mender = threading.Thread(target=keeper.mend_lock, args=(str(lock), held, stop), daemon=True)
    mender.start()
    try:
        deadline = time.monotonic() + 5
        while len(held) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(held) == 2
        assert keeper.lock_is_free(str(lock)) is False
    finally:
        stop.set()
        mender.join(5)
        for f in held:
            os.close(f)


def test_a_mosquitto_takes_its_lock_again_once_no_brick_holds_it(tmp_path):
    """Here the lock file is replaced under the holder (a new file: held by nobody), as the
    bricks forget a lock: within a few looks (every second) the holder holds the new one too."""
    needs_root_unshare_flock()
    lock = tmp_path / "data" / ".haswarm" / "mosquitto.lock"
    script, _, running = mosquitto_entrypoint(tmp_path, "one", lock)
    proc = container(script)
    try:
        assert wait_file(running, 10)
        lock.unlink()
        lock.touch()
        assert subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 0  # free
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            if subprocess.run(["flock", "-n", str(lock), "true"]).returncode != 0:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the holder did not take the lock again")
        out = stop(proc)
    finally:
        end(proc)
    assert "lock (each restarted since it was taken): taken again" in out, out
