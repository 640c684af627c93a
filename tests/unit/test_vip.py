"""The VIP step as data: a node's facts (the text `vip.facts_command` prints) -> the Ops the plan
makes, by their `what`. The facts command itself runs here against files in a temporary
directory; setup() and remove() run against a stand-in Remote."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any

import pytest

from tasks import vip
from tasks.config import LAB_CLUSTER_FILE, VIP, Cluster, load_cluster
from tasks.ops import StepError
from tasks.vip import CHECK, CONF, CRON

IPS = {"pi1": "10.77.0.11", "pi2": "10.77.0.12", "pi3": "10.77.0.13"}


@pytest.fixture(scope="module")
def cv() -> Cluster:
    """The lab cluster with a VIP."""
    c = load_cluster(LAB_CLUSTER_FILE)
    return c.model_copy(update={"vip": VIP(address="10.77.0.100")})


# `facts_command` on a Debian host with keepalived installed, no systemd, none of haswarm's
# files (recorded on the development host: "running" is the lab's keepalived, seen by pidof).
FRESH_HOST = """\
installed=yes
systemd=no
running=yes
conf=none
interface=yes
/etc/keepalived/keepalived.conf=missing
/etc/keepalived/haswarm-mqtt-check=missing
/etc/cron.d/haswarm-keepalived=missing
"""


def test_parse_recorded_facts():
    assert vip.parse_facts(FRESH_HOST) == vip.VIPFacts(
        installed=True, systemd=False, running=True, conf="none", interface=True, files={})


def wanted(c: Cluster, node_name: str) -> dict[str, tuple[int, str]]:
    """path -> (mode, text) of what haswarm writes on the node."""
    node = next(n for n in c.nodes if n.name == node_name)
    return {CONF: (0o644, vip.render_conf(c, node, IPS)),
            CHECK: (0o755, vip.check_script(c, node, IPS)),
            CRON: (0o644, vip.cron_text())}


def facts_text(c: Cluster, node_name: str, files: dict[str, Any], **kv: str) -> str:
    """What `facts_command` prints on a converged node without systemd, changed by `kv`
    (installed=, systemd=, running=, conf=, interface=) and `files`: path -> None (missing)
    or (mode, text), text None for what haswarm writes."""
    base = {"installed": "yes", "systemd": "no", "running": "yes", "conf": "haswarm",
            "interface": "yes", **kv}
    lines = [f"{k}={v}" for k, v in base.items()]
    for path, (mode, text) in wanted(c, node_name).items():
        got = files.get(path, (mode, text))
        if got is None:
            lines.append(f"{path}=missing")
        else:
            lines.append(f"{path}={vip.file_state(got[1] or text, got[0])}")
    return "\n".join(lines) + "\n"


NOTHING = {CONF: None, CHECK: None, CRON: None}
START = "start keepalived"
RELOAD = "reload keepalived"

# name, facts (kv), files, expected Ops by `what`
SETUP_CASES = [
    ("fresh node", {"conf": "none", "running": "no"}, NOTHING,
     [f"write {CONF}", f"write {CHECK}", f"write {CRON}", START]),
    ("fresh node with systemd: no cron entry", {"conf": "none", "running": "no", "systemd": "yes"},
     NOTHING, [f"write {CONF}", f"write {CHECK}", START]),
    ("converged", {}, {}, []),
    ("converged with systemd", {"systemd": "yes"}, {CRON: None}, []),
    ("check script changed", {}, {CHECK: (0o755, "#!/bin/bash\nexit 0\n")},
     [f"write {CHECK}", RELOAD]),
    ("check script not executable", {}, {CHECK: (0o644, None)}, [f"write {CHECK}", RELOAD]),
    ("keepalived not running", {"running": "no"}, {}, [START]),
    ("keepalived.conf changed, keepalived not running", {"running": "no"},
     {CONF: (0o644, vip.MARKER + "\n# older\n")}, [f"write {CONF}", START]),
]


@pytest.mark.parametrize("name,kv,files,expected", SETUP_CASES, ids=[c[0] for c in SETUP_CASES])
def test_plan_setup(cv, name, kv, files, expected):
    node = cv.nodes[1]
    facts = vip.parse_facts(facts_text(cv, node.name, files, **kv))
    ops = vip.plan_setup(cv, node, facts, IPS)
    assert [op.what for op in ops] == expected


def test_plan_setup_puts_with_mode_and_owner_and_starts_with_the_right_command(cv):
    node = cv.nodes[0]
    facts = vip.parse_facts(facts_text(cv, node.name, NOTHING, conf="none", running="no"))
    ops = vip.plan_setup(cv, node, facts, IPS)
    files = wanted(cv, node.name)
    assert [(op.put, op.mode, op.owner) for op in ops[:3]] == [
        ((path, text), mode, "root:root") for path, (mode, text) in files.items()]
    assert ops[3].cmd == vip.start_command(True) and ops[3].timeout == 60
    started = vip.plan_setup(cv, node, vip.parse_facts(facts_text(cv, node.name, {},
                                                                  running="no")), IPS)
    assert started[0].cmd == vip.start_command(False)


ERROR_CASES = [
    ("foreign keepalived.conf", {"conf": "other"}, "exists and was not written by haswarm"),
    ("no interface", {"interface": "no"}, "no network interface 'eth0' (vip.interface)"),
    ("keepalived not installed", {"installed": "no"}, "apt-get install keepalived"),
]


@pytest.mark.parametrize("name,kv,message", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_plan_setup_refuses(cv, name, kv, message):
    facts = vip.parse_facts(facts_text(cv, "pi1", {}, **kv))
    with pytest.raises(StepError) as e:
        vip.plan_setup(cv, cv.nodes[0], facts, IPS)
    assert message in e.value.message
    assert e.value.message == "; ".join(vip.plan_problems(facts, "eth0"))


DROP = "drop the address 10.77.0.100"
REMOVE_CASES = [
    ("haswarm's files", {}, {}, ["stop keepalived", f"remove {CONF}, {CHECK}, {CRON}", DROP]),
    ("haswarm's files, keepalived stopped", {"running": "no"}, {},
     ["stop keepalived", f"remove {CONF}, {CHECK}, {CRON}", DROP]),
    ("foreign keepalived.conf: haswarm's other files go", {"conf": "other"}, {},
     [f"remove {CHECK}, {CRON}"]),
    ("foreign keepalived.conf only", {"conf": "other"}, {CHECK: None, CRON: None}, []),
    ("nothing of haswarm's", {"conf": "none"}, NOTHING, []),
    ("a cron entry left, keepalived stopped", {"conf": "none", "running": "no"},
     {CONF: None, CHECK: None}, [f"remove {CRON}", DROP]),
    ("a check script left, a keepalived running", {"conf": "none"}, {CONF: None, CRON: None},
     ["stop keepalived", f"remove {CHECK}", DROP]),
]


@pytest.mark.parametrize("name,kv,files,expected", REMOVE_CASES, ids=[c[0] for c in REMOVE_CASES])
def test_plan_remove(cv, name, kv, files, expected):
    facts = vip.parse_facts(facts_text(cv, "pi1", files, **kv))
    assert [op.what for op in vip.plan_remove(cv, cv.nodes[0], facts)] == expected


def test_plan_remove_without_a_vip_address_drops_none(cv):
    c = cv.model_copy(update={"vip": VIP()})
    facts = vip.parse_facts(facts_text(cv, "pi1", {}))
    assert [op.what for op in vip.plan_remove(c, c.nodes[0], facts)] == [
        "stop keepalived", f"remove {CONF}, {CHECK}, {CRON}"]


# ---------------------------------------------------------------------------------------------
# the facts command, run here against files in a temporary directory


@pytest.mark.skipif(any(shutil.which(t) is None for t in ("ip", "stat", "sha256sum")),
                    reason="ip, stat or sha256sum not installed")
def test_facts_command_reads_files_as_the_plan_compares_them(cv, tmp_path):
    paths = {p: tmp_path / p.rsplit("/", 1)[1] for p in (CONF, CHECK, CRON)}

    def run(interface: str) -> vip.VIPFacts:
        cmd = vip.facts_command(interface)
        for real, fake in paths.items():
            cmd = cmd.replace(real, str(fake))
        out = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True,
                             check=True).stdout
        for real, fake in paths.items():
            out = out.replace(str(fake), real)
        return vip.parse_facts(out)

    assert run("lo").files == {} and run("lo").conf == "none" and run("lo").interface
    assert not run("hsw-nosuch0").interface
    files = wanted(cv, "pi1")
    for path in (CONF, CHECK):
        mode, text = files[path]
        paths[path].write_text(text)
        paths[path].chmod(mode)
    facts = run("lo")
    assert facts.conf == "haswarm" and set(facts.files) == {CONF, CHECK}
    for path in (CONF, CHECK):
        mode, text = files[path]
        want, got = vip.file_state(text, mode), facts.files[path]
        if os.geteuid() == 0:  # the files are root's, as on a node
            assert got == want
        else:  # mode and sha256 (the owner is this user)
            assert got.split()[::3] == want.split()[::3]
    paths[CONF].write_text("# the user's own keepalived\n")
    assert run("lo").conf == "other"


# ---------------------------------------------------------------------------------------------
# setup() and remove() against a stand-in Remote: facts -> plan -> apply_ops, per node


class FakeRemote:
    """Answers the facts command with a node's text; records what else is run or put."""
    reading = staticmethod(nullcontext)  # every read is live here

    def __init__(self, c: Cluster, facts: dict[str, str]) -> None:
        self.c, self.facts = c, facts
        self.calls: list[tuple[str, ...]] = []

    def on_all(self, step: str, fn: Any, nodes: Any = None) -> dict[str, Any]:
        return {n.name: fn(n) for n in nodes or self.c.nodes}

    def run(self, node: Any, step: str, cmd: str, **kw: Any) -> SimpleNamespace:
        if step == "vip: facts":
            return SimpleNamespace(stdout=self.facts[node.name], ok=True)
        self.calls.append((node.name, "run", cmd))
        return SimpleNamespace(stdout="", ok=True)

    def put(self, node: Any, step: str, data: str, path: str, **kw: Any) -> bool:
        self.calls.append((node.name, "put", path, f"{kw['mode']:o}", kw["owner"]))
        return True


def test_setup_converged_changes_nothing(cv, monkeypatch, capsys):
    monkeypatch.setattr(vip, "wait_holder", lambda c, r, timeout: "pi2")
    r = FakeRemote(cv, {n.name: facts_text(cv, n.name, {}) for n in cv.nodes})
    assert vip.setup(cv, r) == {"vip": "10.77.0.100", "holder": "pi2", "changed": []}
    assert r.calls == []
    out = capsys.readouterr().out
    assert out.count("vip: nothing to do") == 3
    assert "pi2: vip: 10.77.0.100 held by pi2; MQTT answers through it" in out


def test_setup_writes_and_starts_on_a_fresh_node(cv, monkeypatch, capsys):
    monkeypatch.setattr(vip, "wait_holder", lambda c, r, timeout: "pi1")
    texts = {n.name: facts_text(cv, n.name, {}) for n in cv.nodes}
    texts["pi3"] = facts_text(cv, "pi3", NOTHING, conf="none", running="no")
    texts["pi2"] = facts_text(cv, "pi2", {}, running="no")
    r = FakeRemote(cv, texts)
    assert vip.setup(cv, r)["changed"] == ["pi3"]
    assert [call[:3] for call in r.calls] == [
        ("pi2", "run", vip.start_command(False)),
        ("pi3", "put", CONF), ("pi3", "put", CHECK), ("pi3", "put", CRON),
        ("pi3", "run", vip.start_command(True))]
    assert [call[3:] for call in r.calls if call[1] == "put"] == [
        ("644", "root:root"), ("755", "root:root"), ("644", "root:root")]
    out = capsys.readouterr().out
    assert f"pi3: vip: write {CHECK}" in out and "pi2: vip: start keepalived" in out


def test_setup_dry_run_only_says(cv, monkeypatch, capsys):
    monkeypatch.setattr(vip, "wait_holder", lambda *a: pytest.fail("no wait in a dry run"))
    r = FakeRemote(cv, {n.name: facts_text(cv, n.name, NOTHING, conf="none", running="no")
                        for n in cv.nodes})
    assert vip.setup(cv, r, dryrun=True) == {}
    assert r.calls == []
    assert f"pi1: vip: would write {CONF}" in capsys.readouterr().out


def test_remove_runs_the_plan_and_leaves_a_foreign_conf(cv, capsys):
    texts = {n.name: facts_text(cv, n.name, NOTHING, conf="none", running="no")
             for n in cv.nodes}
    texts["pi1"] = facts_text(cv, "pi1", {})
    texts["pi2"] = facts_text(cv, "pi2", {}, conf="other")
    r = FakeRemote(cv, texts)
    vip.remove(cv, r, dryrun=False)
    assert r.calls == [("pi1", "run", vip.STOP),
                       ("pi1", "run", f"rm -f {CONF} {CHECK} {CRON}"),
                       ("pi1", "run", vip.drop_address("10.77.0.100")),
                       ("pi2", "run", f"rm -f {CHECK} {CRON}")]
    out = capsys.readouterr().out
    assert f"pi2: vip: {CONF} is not haswarm's: left alone" in out
    assert "pi3: vip: nothing to do" in out


def test_setup_without_a_vip_address_removes(cv, capsys):
    c = cv.model_copy(update={"vip": VIP()})
    r = FakeRemote(c, {n.name: facts_text(cv, n.name, {}) for n in c.nodes})
    assert vip.setup(c, r) == {"vip": None}
    assert [call[2] for call in r.calls if call[0] == "pi1"] == [
        vip.STOP, f"rm -f {CONF} {CHECK} {CRON}"]


def test_unicast_adverts_only_from_the_peers(cv):
    """A LAN host announcing a higher priority cannot take the VIP: keepalived drops adverts
    whose source is not one of the peers (issue 14)."""
    conf = vip.render_conf(cv, cv.nodes[0], IPS)
    assert "check_unicast_src" in conf
    peers = conf.split("unicast_peer {", 1)[1].split("}", 1)[0].split()
    assert peers == ["10.77.0.12", "10.77.0.13"]


def test_validate_with_resolved_addresses(cv):
    vip.validate(cv, IPS)
    with pytest.raises(vip.VIPError, match="10.77.0.100 is pi2's own address"):
        vip.validate(cv, {**IPS, "pi2": "10.77.0.100"})
    with pytest.raises(vip.VIPError, match="pi3 is at 10.78.0.13, outside 10.77.0.0/24"):
        vip.validate(cv, {**IPS, "pi3": "10.78.0.13"})
