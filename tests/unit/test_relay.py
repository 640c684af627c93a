"""The preload's relay (tasks/images/relay.py): the chain's pure parts, its hop scripts run for
real in a shell (with stand-ins for docker, ssh and getent), and preload() relaying through
fake node engines. The lab test (tests/lab/test_preload.py) runs it over real SSH."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import tasks.images as images
import tasks.images.relay as relay_module
import tasks.remote_stream
from tasks.config import LAB_CLUSTER_FILE, load_cluster
from tasks.images.layers import NodeFacts, plan_node, read_manifest
from tasks.images.relay import (
    MARK,
    Hop,
    chain_of,
    cleanup_command,
    common_facts,
    hop_script,
    prepare_command,
)
from tests.unit.test_images import FakeEngine, fake_remote, inspect, saved_manifest

# ---------------------------------------------------------------------------------------------
# The chain


def test_common_facts_keep_only_what_every_node_holds() -> None:
    a = NodeFacts.from_inspect([inspect("sha256:a", ["x:1"], ["sha256:l1", "sha256:l2"])])
    b = NodeFacts.from_inspect([inspect("sha256:a", ["x:1"], ["sha256:l1", "sha256:l2"]),
                                inspect("sha256:b", ["y:1"], ["sha256:l1"])])
    c = NodeFacts.from_inspect([inspect("sha256:c", ["y:1"], ["sha256:l1"])])
    both = common_facts([a, b])
    assert both.tags == {"x:1": "sha256:a"}
    assert set(both.images) == {"sha256:a"} and both.chains == a.chains
    all3 = common_facts([a, b, c])
    assert all3.tags == {} and all3.images == {} and all3.chains == {"sha256:l1"}


def test_the_chain_is_the_nodes_that_lack_something_in_order_when_two_or_more(
        tmp_path: Path) -> None:
    wanted = read_manifest(saved_manifest(tmp_path))
    empty = plan_node(wanted, NodeFacts())
    full = plan_node(wanted, NodeFacts.from_inspect(
        [inspect(w.id, [w.ref], list(w.layers)) for w in wanted]))
    assert chain_of({"pi1": empty, "pi2": full, "pi3": empty}) == ["pi1", "pi3"]
    assert chain_of({"pi1": full, "pi2": empty, "pi3": full}) == []  # one: straight from here
    assert chain_of({"pi1": full, "pi2": full}) == []


# ---------------------------------------------------------------------------------------------
# The hop scripts, run in a shell: each "node" is a directory named by its address; `ssh` runs
# the next directory's hop.sh there, `docker load` stores what it read in ./loaded


FAKE_DOCKER = """#!/bin/sh
[ -e fail ] && exit 1
cat > loaded
"""
FAKE_SSH = """#!/bin/sh
for a; do target=$prev; prev=$a; done
addr=${target#*@}
[ -e "$ROOT/$addr/unreachable" ] && { echo "ssh: connect to host $addr: refused" >&2; exit 255; }
cd "$ROOT/$addr" && exec sh hop.sh
"""


def chain_dirs(tmp_path: Path, addresses: list[str]) -> tuple[list[Hop], dict[str, str]]:
    c = load_cluster(LAB_CLUSTER_FILE)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("docker", FAKE_DOCKER), ("ssh", FAKE_SSH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    hops = []
    for i, addr in enumerate(addresses):
        node = c.nodes[i].model_copy(update={"address": addr})
        hops.append(Hop(node, "root", 22, str(tmp_path / addr)))
        (tmp_path / addr).mkdir()
    for i, hop in enumerate(hops):
        after = hops[i + 1] if i + 1 < len(hops) else None
        Path(hop.script).write_text(hop_script(hop, after))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ROOT": str(tmp_path)}
    return hops, env


def run_head(hops: list[Hop], env: dict[str, str], data: bytes) -> int:
    return subprocess.run(["sh", hops[0].script], input=data, cwd=hops[0].dir, env=env,
                          timeout=30).returncode


DATA = os.urandom(3 * 1024 * 1024 + 17)  # bigger than a pipe's buffer


def test_every_node_of_the_chain_loads_the_same_bytes(tmp_path: Path) -> None:
    hops, env = chain_dirs(tmp_path, ["10.77.0.11", "10.77.0.12", "10.77.0.13"])
    assert run_head(hops, env, DATA) == 0
    for hop in hops:
        assert (Path(hop.dir) / "loaded").read_bytes() == DATA
    assert [(Path(h.dir) / "next.status").read_text().strip() for h in hops[:2]] == ["0", "0"]
    assert not (Path(hops[2].dir) / "next").exists(), "the last node passes nothing on"


def test_a_node_whose_load_fails_still_passes_the_stream_on(tmp_path: Path) -> None:
    hops, env = chain_dirs(tmp_path, ["10.77.0.11", "10.77.0.12", "10.77.0.13"])
    (Path(hops[1].dir) / "fail").touch()
    assert run_head(hops, env, DATA) == 0, "the first node's own load is what it reports"
    assert (Path(hops[0].dir) / "loaded").read_bytes() == DATA
    assert (Path(hops[2].dir) / "loaded").read_bytes() == DATA
    assert (Path(hops[0].dir) / "next.status").read_text().strip() == "1"


def test_a_next_node_that_cannot_be_reached_does_not_stop_the_load(tmp_path: Path) -> None:
    hops, env = chain_dirs(tmp_path, ["10.77.0.11", "10.77.0.12"])
    (Path(hops[1].dir) / "unreachable").touch()
    assert run_head(hops, env, DATA) == 0
    assert (Path(hops[0].dir) / "loaded").read_bytes() == DATA
    assert (Path(hops[0].dir) / "next.status").read_text().strip() == "255"
    assert "refused" in (Path(hops[0].dir) / "next.out").read_text()


# ---------------------------------------------------------------------------------------------
# Putting a node's part in place and removing it


def test_the_key_line_is_restricted_to_the_previous_node_and_the_hop_script() -> None:
    c = load_cluster(LAB_CLUSTER_FILE)
    a, b = (Hop(c.node(n), "pi", 22, f"/var/tmp/{MARK}-r1") for n in ("pi1", "pi2"))
    cmd = prepare_command(b, "SCRIPT", a, None, "ssh-ed25519 AAAAKEY", "r1", "")
    assert (f'restrict,from="10.77.0.11",command="sudo -n sh /var/tmp/{MARK}-r1/hop.sh" '
            f"ssh-ed25519 AAAAKEY {MARK}-r1") in cmd
    assert "cat >" not in cmd, "the last node gets no key"
    head = prepare_command(a, "SCRIPT", None, b, "ssh-ed25519 AAAAKEY", "r1", "KNOWN")
    assert "authorized_keys\"\"" not in head and "restrict" not in head
    assert f"cat >/var/tmp/{MARK}-r1/key" in head, "the private key comes on stdin"


def test_cleanup_removes_only_the_relay_lines(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    keys = home / ".ssh" / "authorized_keys"
    keys.write_text(f"ssh-ed25519 AAAAmine me@laptop\nrestrict ssh-ed25519 AAAAx {MARK}-abc\n"
                    "ssh-rsa AAAAother other\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "getent").write_text(f"#!/bin/sh\necho \"$2:x:0:0::{home}:/bin/sh\"\n")
    (bin_dir / "getent").chmod(0o755)
    cmd = cleanup_command("someone").replace(f"rm -rf /var/tmp/{MARK}-*", "true")
    subprocess.run(["sh", "-c", cmd], check=True, timeout=10,
                   env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert keys.read_text() == "ssh-ed25519 AAAAmine me@laptop\nssh-rsa AAAAother other\n"
    assert list((home / ".ssh").iterdir()) == [keys]


# ---------------------------------------------------------------------------------------------
# preload() relaying through fake engines


def relaying_remote(c, engines: dict[str, FakeEngine], monkeypatch: pytest.MonkeyPatch,
                    reach: list[str] | None = None):
    """fake_remote, plus the relay's commands; the stream into the first node "loads" on every
    node of the chain (or only on `reach`)."""
    r = fake_remote(c, engines)
    direct = r.run
    prepared: list[str] = []

    def run(node, step, cmd, **kw):
        name = node if isinstance(node, str) else node.name
        if "/hop.sh" in cmd and "printf %s" in cmd:  # a node's part put in place
            prepared.append(name)
            return _ok()
        if MARK in cmd:  # the cleanup
            return _ok()
        return direct(node, step, cmd, **kw)

    def stream(r_, node, step, cmd, *, source, timeout, **kw):
        data = b""
        while block := source.read(1 << 20):
            data += block
        for name in (reach if reach is not None else prepared):
            engines[name].load([data])
        return _ok()

    r.run = run  # type: ignore[method-assign]
    monkeypatch.setattr(tasks.remote_stream, "stream", stream)
    monkeypatch.setattr(relay_module, "known_hosts_line", lambda c, hop: "KNOWN\n")
    return r, prepared


def _ok():
    from tasks.remote import Result

    return Result("", "", 0)


def test_preload_relays_once_through_the_nodes_then_sends_nothing(tmp_path, capsys, monkeypatch):
    c = load_cluster(LAB_CLUSTER_FILE)
    manifest = saved_manifest(tmp_path)
    engines = {n: FakeEngine() for n in c.names}
    r, prepared = relaying_remote(c, engines, monkeypatch)
    first = images.preload(c, manifest, remote=r)
    assert sorted(prepared) == c.names
    stream_bytes = engines["pi1"].received
    assert all(e.received == stream_bytes for e in engines.values())
    assert first["pi1"].bytes_sent == stream_bytes > 0, "the relay's bytes count on pi1"
    assert first["pi2"].bytes_sent == first["pi3"].bytes_sent == 0
    assert all(len(e.images) == 2 for e in engines.values())
    out = capsys.readouterr().out
    assert "pi1: preload-images: relaying haswarm-lab/homeassistant:1, haswarm/mariadb-galera:1" \
        in out and "through pi1 -> pi2 -> pi3" in out
    r, prepared = relaying_remote(c, engines, monkeypatch)
    second = images.preload(c, manifest, remote=r)
    assert prepared == [] and all(x.bytes_sent == 0 for x in second.values())


def test_a_node_the_relay_missed_gets_the_images_straight_from_here(tmp_path, capsys,
                                                                   monkeypatch):
    c = load_cluster(LAB_CLUSTER_FILE)
    manifest = saved_manifest(tmp_path)
    engines = {n: FakeEngine() for n in c.names}
    r, _ = relaying_remote(c, engines, monkeypatch, reach=["pi1", "pi2"])
    reports = images.preload(c, manifest, remote=r)
    assert all(len(e.images) == 2 for e in engines.values())
    assert reports["pi3"].loaded == 2 and reports["pi3"].bytes_sent > 0
    assert reports["pi2"].bytes_sent == 0


def test_with_the_relay_off_every_node_gets_its_own_stream(tmp_path, monkeypatch):
    c = load_cluster(LAB_CLUSTER_FILE)
    c = c.model_copy(update={"preload": c.preload.model_copy(update={"relay": False})})
    engines = {n: FakeEngine() for n in c.names}
    r, prepared = relaying_remote(c, engines, monkeypatch)
    reports = images.preload(c, saved_manifest(tmp_path), remote=r)
    assert prepared == [] and all(x.bytes_sent > 0 for x in reports.values())
