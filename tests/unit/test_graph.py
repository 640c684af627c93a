"""The doit graph: `doit list` opens no connection, every public task says what it does."""

from __future__ import annotations

import subprocess
import sys
import time

import yaml

from tasks.config import PROJECT_ROOT

# Runs `doit list` in a process where any network connection raises.
NO_NETWORK = """
import socket, sys
def refuse(self, *a, **k):
    raise SystemExit("doit list tried to open a connection to %r" % (a,))
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
from doit.doit_cmd import DoitMain
from doit.cmd_base import DodoTaskLoader
sys.exit(DoitMain(DodoTaskLoader()).run(sys.argv[1:]))
"""


def unreachable_cluster(tmp_path):
    data = yaml.safe_load((PROJECT_ROOT / "config" / "cluster.example.yml").read_text())
    for i, node in enumerate(data["nodes"]):
        node["address"] = f"pi{i + 1}.invalid"  # RFC 2606: never resolves, never answers
    p = tmp_path / "cluster.yml"
    p.write_text(yaml.safe_dump(data))
    return p


def doit_list(tmp_path, *args):
    cfg = unreachable_cluster(tmp_path)
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-c", NO_NETWORK, "list", f"config={cfg}", *args],
                       cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    return r, time.monotonic() - start


def test_list_opens_no_connection_and_documents_every_task(tmp_path):
    r, seconds = doit_list(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line.split(None, 1) for line in r.stdout.splitlines() if line.strip()]
    names = {row[0] for row in rows}
    assert {"setup", "render", "secrets"} <= names
    for row in rows:
        assert len(row) == 2 and row[1].strip(), f"task {row[0]} has no docstring"
    print(f"doit list: {seconds:.2f} s for {len(rows)} tasks")


def test_no_task_is_named_after_a_doit_command():
    """`doit clean`, `doit list` ... are commands: a task with such a name is unreachable."""
    r = subprocess.run([sys.executable, "-m", "doit", "list", "--all", "--quiet"],
                       cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    commands = {"clean", "list", "info", "run", "forget", "ignore", "help", "auto", "dumpdb",
                "strace", "reset-dep", "tabcompletion"}
    assert not commands & {line.split(":")[0].strip() for line in r.stdout.splitlines()}
