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
