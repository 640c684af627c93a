"""The nodes' firewall (tasks/firewall.py): the rendered rules, the facts' parser and the plans."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tasks import firewall
from tasks.config import LAB_CLUSTER_FILE, Cluster, load_cluster


@pytest.fixture(scope="module")
def c() -> Cluster:
    return load_cluster(LAB_CLUSTER_FILE)


def test_rules_let_only_the_nodes_and_local_containers_reach_internal_ports(c):
    text = firewall.script_text(c)
    v4 = text.split("rules_v4() {", 1)[1].split("\n}\n", 1)[0]
    returns = [line for line in v4.splitlines() if line.endswith("-j RETURN")]
    assert [r.split()[3] for r in returns] == ["lo", "docker0", "docker_gwbridge", "br-+",
                                               "10.77.0.11", "10.77.0.12", "10.77.0.13"]
    drops = [line for line in v4.splitlines() if line.endswith("-j DROP")]
    assert "2377,7946,24007,24008" in drops[0] and "49152:60999" in drops[1]
    assert "4789,7946" in drops[2] and drops[2].split()[3] == "udp"
    # The loaded rules carry the id that setup compares.
    assert f'haswarm-rules {firewall.context(c)["rules_id"]}' in v4


def test_rules_id_follows_the_nodes(c):
    more = c.model_copy(update={"nodes": [*c.nodes, c.nodes[0].model_copy(
        update={"name": "pi4", "address": "10.77.0.14"})]})
    assert firewall.context(more)["rules_id"] != firewall.context(c)["rules_id"]
    assert firewall.context(c)["rules_id"] == firewall.context(load_cluster(LAB_CLUSTER_FILE))[
        "rules_id"]


def test_parse_facts():
    assert firewall.parse_facts("rules=eb6afc066eb02b2f\njump=yes\nscript=yes\n") == (
        "eb6afc066eb02b2f", True, True)
    assert firewall.parse_facts("jump=no\nscript=no\n") == (None, False, False)


def test_plan_rules_is_a_noop_when_loaded_and_jumped_to(c):
    want = firewall.context(c)["rules_id"]
    assert firewall.plan_rules(c, want, True) == []
    for loaded, jump, why in ((None, False, "not loaded"), ("0" * 16, True, "changed"),
                              (want, False, "not jumped to")):
        (op,) = firewall.plan_rules(c, loaded, jump)
        assert why in op.what and op.cmd == firewall.SCRIPT


def test_plan_rules_clean():
    assert firewall.plan_rules_clean(None, False, False) == []
    remove, files = firewall.plan_rules_clean("x", True, True)
    assert remove.cmd == f"{firewall.SCRIPT} remove" and firewall.CRON_FILE in files.cmd
    (only,) = firewall.plan_rules_clean(None, True, False)   # script gone, jump left
    assert "iptables -w -D INPUT -j HASWARM-IN" in only.cmd


@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("iptables") is None,
                    reason="needs unshare and iptables")
def test_script_loads_twice_to_the_same_rules_and_removes_them(c, tmp_path):
    """The real script in a throw-away network namespace (root only)."""
    script = tmp_path / "fw"
    script.write_text(firewall.script_text(c))
    script.chmod(0o755)
    probe = (f"{script}; {script}; iptables -S INPUT | grep -c HASWARM; "
             f"{firewall.FACTS_COMMAND}; {script} remove; {firewall.FACTS_COMMAND}")
    p = subprocess.run(["unshare", "--net", "sh", "-c", probe], capture_output=True, text=True)
    if p.returncode != 0 and "Operation not permitted" in p.stderr:
        pytest.skip("needs root")
    lines = p.stdout.split()
    assert lines == ["1", f"rules={firewall.context(c)['rules_id']}", "jump=yes", "script=no",
                     "jump=no", "script=no"], \
        p.stdout + p.stderr
