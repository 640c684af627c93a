"""The doit graph: `doit list` opens no connection, every public task says what it does."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from tasks.config import LAB_CLUSTER_FILE, PROJECT_ROOT

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


# Runs `doit list` and prints, on stderr, every module the process imported.
MODULES = """
import sys
from doit.doit_cmd import DoitMain
from doit.cmd_base import DodoTaskLoader
code = DoitMain(DodoTaskLoader()).run(sys.argv[1:])
print("\\n".join(sorted(sys.modules)), file=sys.stderr)
sys.exit(code)
"""

# Needed only when a task runs: SSH and Docker clients, templates, the drill's probes, the lab's
# driver. Every module `doit list` imports costs it time (dodo.py loads all task creators).
ACTION_ONLY = ("docker", "fabric", "paramiko", "invoke", "jinja2", "requests", "lab.driver",
               "lab.faults", "tasks.watch", "tasks.failover", "tasks.markers",
               "tasks.mqtt_client", "tasks.facts_cluster")


@pytest.mark.parametrize("lab", [False, True], ids=["cluster", "lab"])
def test_list_imports_no_module_that_only_actions_need(tmp_path, lab):
    cfg = LAB_CLUSTER_FILE if lab else unreachable_cluster(tmp_path)
    r = subprocess.run([sys.executable, "-c", MODULES, "list", f"config={cfg}"],
                       cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    loaded = set(r.stderr.splitlines())
    assert "tasks.config" in loaded  # the dodo was loaded
    assert sorted(m for m in loaded for heavy in ACTION_ONLY
                  if m == heavy or m.startswith(heavy + ".")) == []
