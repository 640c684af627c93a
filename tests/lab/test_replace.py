"""Replace a dead Pi (issue "Day two", case 1; README "Replace a dead Pi"), end to end on the
shared lab: pi3 comes back re-flashed under the same name and address (`lab.wipe`: power cut,
its disk wiped: Docker data root with the swarm state, /var/lib/glusterd, the brick, cron,
keepalived, /etc changes; a first boot with a new SSH host key). The user trusts the new key as
the README says and runs `doit setup`; that alone must bring the node back:

- swarm: 3 Ready managers, no Down entry left (the old one demoted and removed before the join);
- Gluster: every peer connected, pi3's glusterd under its OLD UUID, heal info 0 entries, a file
  written before the wipe on pi3's brick;
- Galera: pi3's db Synced in a cluster of 3 (by SST), with a row written before the wipe;
- Mosquitto: a retained message published before the wipe is still there;
- a second `doit setup` has nothing to do.

Prints the time from the wipe until the cluster has converged (`pytest -s`). The module leaves
the lab converged (its finalizer trusts pi3's key and runs setup if a step above failed).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from lab.driver import Lab
from tasks import status
from tasks.config import LAB_CLUSTER_FILE, load_cluster
from tasks.remote import Remote, RemoteError

from .conftest import Tools, doit
from .test_backup import publish_retained, retained, write_row
from .test_stack import TEST_DB, service_versions

pytestmark = pytest.mark.lab

NODE = "pi3"
DIR = ".haswarm-replace-test"  # on the volume
# Every remote step of setup that must have nothing to do on the converged cluster.
QUIET = ("preload-images", "gluster:daemon", "gluster:replace", "gluster:peers",
         "gluster:bricks", "gluster:volume", "gluster:mount", "gluster:dirs", "swarm", "stack")


def say(msg: str) -> None:
    print(f"  [replace] {msg}", flush=True)


def fingerprint(key_line: str) -> str:
    """`ssh-keygen -lf` of one public key or known_hosts line: 'SHA256:...'."""
    with tempfile.NamedTemporaryFile("w", suffix=".pub") as f:
        f.write(key_line.strip() + "\n")
        f.flush()
        out = subprocess.run(["ssh-keygen", "-lf", f.name], capture_output=True, text=True,
                             check=True).stdout
    return out.split()[1]


def trust_new_key(lab, node: str) -> str:
    """What README "Replace a dead Pi" tells the user: drop the old key, add the node's new
    one (after comparing its fingerprint with the node's console). Returns the fingerprint."""
    kh, addr = str(lab.known_hosts), lab.node(node).address
    subprocess.run(["ssh-keygen", "-f", kh, "-R", addr], capture_output=True, check=True)
    scan = subprocess.run(["ssh-keyscan", "-t", "ed25519", addr], capture_output=True,
                          text=True, check=True, timeout=30).stdout
    with open(kh, "a") as f:
        f.write(scan)
    return fingerprint(scan)


def node_key(lab, node: str) -> str:
    return fingerprint((lab.node_dir(node) / "ssh_host_ed25519_key.pub").read_text())


def plant_data(c, tools, what: str) -> tuple[str, str]:
    """A row in Galera (through a db not on pi3), a file on the volume and a retained message,
    all holding a new token; returns (token, topic)."""
    token, mp = uuid.uuid4().hex, c.gluster.mount_point
    topic = f"haswarm/test/{what}-{token[:8]}"
    node, cid = next((n, i) for n, i in tools.containers("db").items() if n != NODE)
    write_row(tools, node, cid, token)
    tools.sh("pi1", f"mkdir -p {mp}/{DIR} && echo {token} > {mp}/{DIR}/{token}")
    publish_retained(c, topic, token)
    time.sleep(c.mqtt.autosave_interval + 2)  # in Mosquitto's store on the volume
    return token, topic


def remove_data(c, tools, topic: str) -> None:
    tools.sh("pi1", f"rm -rf {c.gluster.mount_point}/{DIR}")
    publish_retained(c, topic, "")


@pytest.fixture(scope="module")
def ready(lab, cluster, deployed):
    status.wait_converged(cluster, 600, log=say)
    yield cluster
    # A failure above may leave pi3 wiped, untrusted or half set up: trust its key (a no-op
    # when known_hosts has it), set up again if needed, and wait until all is well.
    listed = subprocess.run(["ssh-keygen", "-F", lab.node(NODE).address, "-f",
                             str(lab.known_hosts)], capture_output=True, text=True).stdout
    if lab.pid(NODE) is not None and node_key(lab, NODE) not in (
            fingerprint(line) for line in listed.splitlines() if line and line[0] != "#"):
        trust_new_key(lab, NODE)
    try:
        status.wait_converged(cluster, 60, log=say)
    except TimeoutError:
        doit("setup")
        status.wait_converged(cluster, 900, log=say)


def test_a_reflashed_pi_comes_back_with_doit_setup_alone(lab, ready, tools, capsys):
    c = ready
    brick = str(c.gluster.brick_dir)
    token, topic = plant_data(c, tools, "replace")
    pool = tools.sh("pi1", "gluster --mode=script pool list")
    old_uuid = next(line.split()[0] for line in pool.splitlines()
                    if lab.node(NODE).address in line.split())
    old_key = node_key(lab, NODE)

    say(f"wiping {NODE} (old glusterd UUID {old_uuid}, old host key {old_key})")
    t_wipe = time.monotonic()
    new_key = lab.wipe(NODE).split()[1]
    say(f"{NODE} booted bare in {time.monotonic() - t_wipe:.1f} s, new host key {new_key}")
    assert new_key != old_key
    bare = tools.sh(NODE, "docker info --format '{{.Swarm.LocalNodeState}}'; "
                          "docker image ls -q | wc -l; "
                          f"ls -A {brick} 2>/dev/null | wc -l; "
                          "sed -n 's/^UUID=//p' /var/lib/glusterd/glusterd.info").split()
    assert bare[:3] == ["inactive", "0", "0"] and bare[3] != old_uuid, bare

    # haswarm refuses the changed key until the user trusts it (never silently)
    with Remote(c) as r, pytest.raises(RemoteError, match="CHANGED"):
        r.run(NODE, "test: host key", "true")
    assert trust_new_key(lab, NODE) == new_key  # the fingerprint its console shows

    setup = tools.setup()
    assert setup.ok, setup.output[-6000:]
    t_setup = time.monotonic() - t_wipe
    st = status.wait_converged(c, 900, log=say)
    t_converged = time.monotonic() - t_wipe
    out = setup.output
    for needle in (f"{NODE}: gluster:replace: write /var/lib/glusterd/glusterd.info: "
                   f"UUID={old_uuid}", "reset-brick", "gluster:replace: healed",
                   f"demote the swarm's old entry of {NODE}", f"{NODE}: swarm: join as manager"):
        assert needle in out, needle
    assert "deploy stack.bootstrap.yml" not in out and "no bootstrap" in out

    # swarm: three Ready managers, nothing Down
    nodes = tools.sh("pi1", "docker node ls --format '{{.Hostname}} {{.Status}} "
                            "{{.ManagerStatus}}'").split("\n")
    nodes = sorted(line for line in nodes if line.strip())
    assert len(nodes) == 3 and all(re.fullmatch(r"pi\d Ready (Leader|Reachable)", n)
                                   for n in nodes), nodes
    # Gluster: every peer connected, pi3 under its old UUID, nothing to heal, the file on
    # pi3's own brick
    for n in lab.names:
        peers = tools.sh(n, "gluster --mode=script peer status")
        assert peers.count("State: Peer in Cluster (Connected)") == 2, (n, peers)
    assert tools.sh(NODE, "sed -n 's/^UUID=//p' /var/lib/glusterd/glusterd.info").strip() \
        == old_uuid
    check_data_back(c, tools, NODE, token, topic)
    assert not st.problems()

    # a second setup has nothing to do
    before = service_versions(tools, c)
    again = tools.setup()
    assert again.ok, again.output[-4000:]
    for step in QUIET:
        assert f": {step}: nothing to do" in again.output, step
    assert " would " not in again.output and "no bootstrap" in again.output
    assert service_versions(tools, c) == before

    remove_data(c, tools, topic)
    with capsys.disabled():
        print(f"\n[replace] {NODE} wiped -> `doit setup` done {t_setup:.1f} s -> converged "
              f"{t_converged:.1f} s after the wipe (setup itself {setup.seconds:.1f} s; "
              f"second setup {again.seconds:.1f} s)")


# -- case 2: a different Pi, under a new name and address -----------------------------------

NEW, NEW_ADDRESS = "pi4", "10.77.0.14"


def replaced_cluster_file() -> Path:
    """lab.yml with pi3 replaced by pi4 at a new address (beside it: the same key paths)."""
    data = yaml.safe_load(LAB_CLUSTER_FILE.read_text())
    data["nodes"] = [n if n["name"] != NODE else {"name": NEW, "address": NEW_ADDRESS}
                     for n in data["nodes"]]
    path = LAB_CLUSTER_FILE.with_name(".test-replaced-lab.yml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def forget_node(lab, name: str) -> None:
    """Power `name` off and remove its disk and its known_hosts entry."""
    lab.kill(name)
    shutil.rmtree(lab.node_dir(name), ignore_errors=True)
    subprocess.run(["ssh-keygen", "-f", str(lab.known_hosts), "-R", lab.node(name).address],
                   capture_output=True)


def check_moved(c, tools, gone: str, gone_addr: str, new: str, token: str, topic: str) -> None:
    """The cluster runs on `c`'s nodes, `new` in the place of `gone`: three Ready managers and
    no entry of `gone`; the volume's bricks on c's nodes, `gone` out of the pool, nothing to
    heal, the test file on `new`'s brick; `new`'s db Synced in a Galera of 3 with the row; the
    retained message."""
    brick = str(c.gluster.brick_dir)
    nodes = sorted(x for x in tools.sh("pi1", "docker node ls --format '{{.Hostname}} "
                                              "{{.Status}} {{.ManagerStatus}}'").split("\n") if x)
    assert [x.split()[0] for x in nodes] == sorted(c.names), (gone, nodes)
    assert all(re.fullmatch(r"pi\d Ready (Leader|Reachable)", x) for x in nodes), nodes
    info = tools.sh("pi1", f"gluster --mode=script volume info {c.gluster.volume}")
    assert sorted(re.findall(r"Brick\d+: (\S+)", info)) == sorted(
        f"{n.address}:{brick}" for n in c.nodes), info
    pool = tools.sh("pi1", "gluster --mode=script pool list")
    assert gone_addr not in pool and pool.count("Connected") == 3, pool
    check_data_back(c, tools, new, token, topic)


def check_data_back(c, tools, node: str, token: str, topic: str) -> None:
    """Nothing left to heal, the test file on `node`'s own brick, `node`'s db Synced in a
    Galera of all of c's nodes with the row written before, and the retained message."""
    size = len(c.nodes)
    heal = tools.sh("pi1", f"gluster --mode=script volume heal {c.gluster.volume} info")
    assert heal.count("Number of entries: 0") == size, heal
    assert tools.sh(node, f"cat {c.gluster.brick_dir}/{DIR}/{token}").strip() == token
    cid = tools.containers("db")[node]
    state = tools.sql(node, cid, "SHOW GLOBAL STATUS WHERE Variable_name IN "
                                 "('wsrep_local_state_comment', 'wsrep_cluster_size');")
    assert dict(line.split("\t") for line in state.splitlines()) == {
        "wsrep_cluster_size": str(size), "wsrep_local_state_comment": "Synced"}, state
    assert tools.sql(node, cid, f"SELECT v FROM {TEST_DB}.t WHERE v = '{token}';").split() \
        == [token]
    assert retained(c, topic) == [token]


def test_a_dead_pi_replaced_by_another_pi_under_a_new_name(lab, ready, tools, capsys):
    """pi3 dies; the user edits `nodes:` (pi3 -> pi4 at a new address) and runs `doit setup`:
    pi3's brick moves to pi4 and heals, pi3 leaves the swarm and the pool, pi4 joins and gets
    Galera by SST. Then the other way, with the leaving Pi still running (pi3 re-flashed takes
    the place of pi4, which `depart` drains, takes out and cleans first); this also leaves the
    lab as it was."""
    c = ready
    token, topic = plant_data(c, tools, "moved")

    cfg = replaced_cluster_file()
    c4 = load_cluster(cfg)
    lab4 = Lab(c4)
    tools4 = Tools(lab4, c4)
    forget_node(lab4, NEW)  # a bare Pi, whatever an earlier run left
    moved = back = None
    try:
        say(f"{NODE} dies; the cluster file lists {NEW} ({NEW_ADDRESS}) in its place")
        lab.kill(NODE)
        t0 = time.monotonic()
        moved = doit(f"config={cfg}", "setup")  # lab-up boots pi4 as a bare Pi first
        assert moved.ok, moved.output[-6000:]
        status.wait_converged(c4, 900, log=say)
        t_moved = time.monotonic() - t0
        out = moved.output
        for needle in (f"move brick {lab.node(NODE).address}:", f"detach {lab.node(NODE).address}",
                       f"demote the swarm's old entry of {NODE}", f"{NEW}: swarm: join as manager"):
            assert needle in out, needle
        check_moved(c4, tools4, NODE, lab.node(NODE).address, NEW, token, topic)
        again = doit(f"config={cfg}", "setup")
        assert again.ok, again.output[-4000:]
        for step in QUIET:
            assert f": {step}: nothing to do" in again.output, [
                line for line in again.output.splitlines() if f": {step}:" in line]
    finally:
        # The way back is the other case: the Pi that leaves the cluster file (pi4) still runs
        # (unless the way there failed: then it is switched off first).
        swap = moved is not None and moved.ok
        say(f"back: {NODE} re-flashed takes {NEW}'s place" + (
            f" ({NEW} still running)" if swap else ""))
        lab.wipe(NODE)
        trust_new_key(lab, NODE)
        if not swap:
            forget_node(lab4, NEW)
        t1 = time.monotonic()
        back = doit("setup")
        cfg.unlink()
    try:
        assert back.ok, back.output[-6000:]
        status.wait_converged(c, 900, log=say)
        t_back = time.monotonic() - t1
        check_moved(c, tools, NEW, NEW_ADDRESS, NODE, token, topic)
        if swap:  # taken out first by `depart`, then cleaned: nothing of the cluster left on it
            for needle in (f"depart: {NEW} ({NEW_ADDRESS}) left the cluster file and still "
                           "answers", f"drain {NEW}", f"remove brick {NEW_ADDRESS}:",
                           f"{NEW} leaves the swarm", f"add brick {lab.node(NODE).address}:"):
                assert needle in back.output, needle
            left = tools4.sh(NEW, "docker info --format '{{.Swarm.LocalNodeState}}'; "
                                  "docker ps -q | wc -l; "
                                  f"grep -c ' {c.gluster.mount_point} ' /proc/mounts; "
                                  "grep -c haswarm /etc/fstab; "
                                  "gluster --mode=script pool list | grep -c Connected",
                             check=False).split()
            assert left == ["inactive", "0", "0", "0", "1"], left
            # converged for good: once it left auth.allow naming pi4 instead of pi3
            again = doit("setup")
            assert again.ok, again.output[-4000:]
            for step in QUIET:
                assert f": {step}: nothing to do" in again.output, [
                    line for line in again.output.splitlines() if f": {step}:" in line]
    finally:
        forget_node(lab4, NEW)  # gone for good
    remove_data(c, tools, topic)
    with capsys.disabled():
        print(f"\n[replace] {NODE} dead -> {NEW} in its place: converged {t_moved:.1f} s after "
              f"`doit setup` started (setup {moved.seconds:.1f} s); back to {NODE} re-flashed, "
              f"{NEW} still running: converged {t_back:.1f} s (setup {back.seconds:.1f} s)")
