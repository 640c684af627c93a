"""stack/haswarm-lock.py.j2, the keeper that lets at most one Home Assistant run: two keepers on
one lock file (a local file here; the Gluster volume in the cluster)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tasks.render import TEMPLATES

SCRIPT = TEMPLATES / "haswarm-lock.py.j2"


def start(lock: Path, ready: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(lock), str(ready)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_file(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
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
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)
    assert "lock held after" in second.stdout.read()


def test_the_template_holds_no_jinja():
    text = SCRIPT.read_text()
    assert "{{" not in text and "{%" not in text and "{#" not in text


# ---------------------------------------------------------------------------------------------
# stack/mosquitto-entrypoint.sh.j2: the same for Mosquitto, in POSIX sh with flock. Each
# "container" is the rendered script in its own PID namespace (the keeper stops PID 1 when it
# fences), whose "image entrypoint" starts a fake broker that ends on SIGTERM as mosquitto does.


def mosquitto_entrypoint(tmp_path: Path, name: str, lock: Path) -> tuple[Path, Path, Path]:
    """(script, its ready file, the file its broker writes once it runs)."""
    import jinja2

    ready, running = tmp_path / f"{name}.ready", tmp_path / f"{name}.running"
    broker = tmp_path / f"{name}-image-entrypoint"
    broker.write_text(f"#!/bin/sh\ntrap 'exit 0' TERM\necho \"$@\" > {running}\n"
                      "while :; do sleep 0.1; done\n")
    broker.chmod(0o755)
    text = jinja2.Template((TEMPLATES / "mosquitto-entrypoint.sh.j2").read_text()).render(
        lock_file=str(lock), lock_ready=str(ready))
    assert "exec /docker-entrypoint.sh \"$@\"" in text
    script = tmp_path / f"{name}.sh"
    script.write_text(text.replace("exec /docker-entrypoint.sh", f"exec {broker}"))
    return script, ready, running


def container(script: Path) -> subprocess.Popen:
    return subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "sh", str(script),
                             "mosquitto", "-c", "conf"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HASWARM_LOCK_HANG": "3"})


def test_one_mosquitto_at_a_time_and_fenced_when_the_volume_fails(tmp_path):
    import os
    import shutil

    import pytest

    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("flock")):
        pytest.skip("needs root, unshare and flock")
    lock = tmp_path / "data" / ".haswarm" / "mosquitto.lock"
    one, ready1, running1 = mosquitto_entrypoint(tmp_path, "one", lock)
    two, ready2, running2 = mosquitto_entrypoint(tmp_path, "two", lock)
    first = container(one)
    second = None
    try:
        assert wait_file(running1, 10)
        assert running1.read_text().split() == ["mosquitto", "-c", "conf"]  # the command
        second = container(two)
        assert not wait_file(running2, 2.5)  # the first one holds the lock
        assert not ready2.exists()
        first.kill()  # the first container ends: its lock is released
        first.wait(5)
        assert wait_file(running2, 3)
        # The volume fails under the running broker: writes error -> fenced, container ends.
        beat = Path(f"{lock}.beat")
        beat.unlink()
        beat.mkdir()
        out, _ = second.communicate(timeout=10)
        assert "FENCING: writes to the volume fail" in out
        assert "waiting 0 s: another Mosquitto holds the lock (container" in out
        # A write that hangs (a FIFO without a reader never opens): fenced after the deadline.
        beat.rmdir()
        third_script, _, running3 = mosquitto_entrypoint(tmp_path, "three", lock)
        third = container(third_script)
        assert wait_file(running3, 10)
        beat.unlink()
        os.mkfifo(beat)
        started = time.monotonic()
        out, _ = third.communicate(timeout=15)
        assert "FENCING: a write to the volume hangs for more than 3 s" in out
        assert 3 <= time.monotonic() - started < 8
    finally:
        for p in (first, second, locals().get("third")):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)
