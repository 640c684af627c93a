"""The lab itself (lab/driver.py, lab/node-init.sh, lab/lab-service.sh).

Two labs are used:
- the shared lab of config/lab.yml (the `lab` fixture of tests/conftest.py) for everything that
  leaves it as it was: SSH with host keys, services, reachability, private /etc, identities;
- a private lab for this module (`private`, nodes pl1..pl3 on their own bridge and subnet, state
  in .lab/instance-<name>, see lab.driver.instance_lab) for what ends nodes or the lab: kill ->
  boot, cut -> heal, a swarm + Gluster smoke check, and last `test_down_leaves_nothing`, which
  takes the private lab down (with --purge) and checks that no netns, veth, bridge, iptables
  rule, cgroup, mount or process of it is left. Other people keep using the shared lab while
  this runs; a test never kills, cuts or stops a shared node.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

import lab.driver as labmod
import lab.tasks as labtasks
from lab.driver import Lab, LabError, instance_lab

pytestmark = pytest.mark.lab

SERVICES = ("sshd", "docker", "glusterd", "avahi-daemon", "cron", "dbus")


def _connect(address: str, port: int, timeout: float) -> str:
    """'open', 'refused', 'timeout' or 'unreachable' for a TCP connect from the host."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return "open"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except OSError:
        return "unreachable"


# ---------------------------------------------------------------------------------------------
# Task creators: cheap at load time (doit list)


@pytest.mark.parametrize("creator", [n for n in dir(labtasks) if n.startswith("task_lab_")])
def test_task_creators_are_cheap(creator: str) -> None:
    fn = getattr(labtasks, creator)
    t0 = time.monotonic()
    task = fn()
    assert time.monotonic() - t0 < 0.05
    assert fn.__doc__ and len(fn.__doc__.strip().splitlines()) == 1
    assert task["basename"] == creator.removeprefix("task_").replace("_", "-")
    params = {p["name"] for p in task.get("params", [])}
    if creator in ("task_lab_kill", "task_lab_cut", "task_lab_heal", "task_lab_boot",
                   "task_lab_wipe"):
        assert params == {"node"}
    if creator == "task_lab_down":
        assert params == {"purge"}


# ---------------------------------------------------------------------------------------------
# The shared lab (left as found)


def test_ssh_hostname_and_host_key(lab: Lab) -> None:
    """Every node answers SSH at its address as itself; its host key is the one in
    known_hosts (paramiko with RejectPolicy, and OpenSSH with StrictHostKeyChecking)."""
    import paramiko

    for node in lab.nodes:
        client = paramiko.SSHClient()
        client.load_host_keys(str(lab.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(node.address, username="root", key_filename=str(lab.key),
                       look_for_keys=False, allow_agent=False, timeout=5)
        try:
            _, out, _ = client.exec_command("hostname")
            assert out.read().decode().strip() == node.name
        finally:
            client.close()
        assert lab.ssh(node.name, "hostname").stdout.strip() == node.name
    # a wrong host key is refused
    bad = lab.state_dir / "ssh" / f"known_hosts.bad-{os.getpid()}"
    try:
        keys = lab.known_hosts.read_text().splitlines()
        bad.write_text("\n".join(f"{k.split()[0]} {_other_key(lab, i)}" for i, k in
                                 enumerate(keys)) + "\n")
        r = subprocess.run(["ssh", "-F", str(lab.ssh_config), "-o",
                            f"UserKnownHostsFile={bad}", lab.nodes[0].address, "true"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 255 and "host key" in r.stderr.lower(), r.stderr
    finally:
        bad.unlink(missing_ok=True)
    assert not Path("/root/.ssh/known_hosts").exists() or "10.77.0." not in \
        Path("/root/.ssh/known_hosts").read_text()


def _other_key(lab: Lab, i: int) -> str:
    """Another node's host key (type and base64), to forge a wrong known_hosts entry."""
    other = lab.nodes[(i + 1) % len(lab.nodes)].name
    return " ".join((lab.node_dir(other) / "ssh_host_ed25519_key.pub").read_text().split()[:2])


def test_services_running(lab: Lab) -> None:
    script = "; ".join(f"lab-service {s} status" for s in SERVICES) + \
        "; docker info --format '{{.ServerVersion}} {{.Driver}} {{.DockerRootDir}}'" \
        "; gluster --mode=script pool list >/dev/null && echo gluster-ok" \
        "; pgrep -x cron >/dev/null && echo cron-ok; cat /etc/resolv.conf"
    for node in lab.nodes:
        out = lab.ssh(node.name, script).stdout
        for s in SERVICES:
            assert f"{s} is running" in out, f"{node.name}: {out}"
        assert re.search(r"^20\.10\.\S+ overlay2 /var/lib/docker$", out, re.M), out
        assert "gluster-ok" in out and "cron-ok" in out
        assert "nameserver 127.0.0.1" in out and "timeout:1 attempts:1" in out


def test_nodes_reach_each_other(lab: Lab) -> None:
    """Every node reaches every other one over the bridge (sshd and glusterd ports)."""
    for node in lab.nodes:
        checks = " && ".join(
            f"timeout 3 bash -c '</dev/tcp/{o.address}/{port}'"
            for o in lab.nodes if o is not node for port in (22, 24007))
        lab.exec(node.name, checks)


def test_private_state(lab: Lab) -> None:
    """/etc, /var/lib, /srv, /mnt, /root are private to each node; /run is a private tmpfs."""
    tag = f"haswarm-lab-test-{uuid.uuid4().hex[:8]}"
    first, others = lab.nodes[0], lab.nodes[1:]
    paths = [f"/etc/{tag}", f"/var/lib/{tag}", f"/srv/{tag}", f"/mnt/{tag}", f"/root/{tag}"]
    try:
        lab.ssh(first.name, " && ".join(f"echo {first.name} > {p}" for p in paths))
        assert lab.exec(first.name, f"cat /etc/{tag}").stdout.strip() == first.name
        for p in paths:
            assert not Path(p).exists(), f"{p} leaked to the host"
        for o in others:
            out = lab.exec(o.name, " ; ".join(f"test -e {p} && echo LEAK {p}" for p in paths),
                           check=False).stdout
            assert "LEAK" not in out, f"{o.name}: {out}"
        # the node's private state is in its own directory on the host
        assert (lab.node_dir(first.name) / "upper" / "etc" / tag).exists()
        assert lab.exec(first.name, "stat -f -c %T /run").stdout.strip() == "tmpfs"
    finally:
        lab.exec(first.name, "rm -f " + " ".join(paths), check=False)


def test_identities_are_unique(lab: Lab) -> None:
    """What a cloned SD card would share: machine-id, SSH host key, Docker engine ID,
    Gluster UUID. Each node has its own."""
    script = ("cat /etc/machine-id; ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub; "
              "docker info --format '{{.ID}}'; grep UUID /var/lib/glusterd/glusterd.info")
    seen = [lab.exec(n.name, script).stdout for n in lab.nodes]
    for i in range(4):
        values = [s.splitlines()[i] for s in seen]
        assert len(set(values)) == len(values), values
    host_id = Path("/etc/machine-id").read_text().strip()
    assert all(s.splitlines()[0] != host_id for s in seen)


def test_lab_service_and_mdns_restart_command(lab: Lab) -> None:
    """The systemctl stand-in: usage errors, status codes, and the Avahi restart that
    config/lab.yml's cron runs (mdns.restart_command)."""
    node = lab.nodes[-1].name
    assert lab.exec(node, "lab-service nope start", check=False).returncode == 2
    assert lab.exec(node, "lab-service docker", check=False).returncode == 2
    assert lab.exec(node, "lab-service docker stat", check=False).returncode == 2
    cmd = lab.cluster.mdns.restart_command
    before = lab.exec(node, "lab-service avahi-daemon status").stdout
    lab.ssh(node, cmd)
    after = lab.exec(node, "lab-service avahi-daemon status").stdout
    assert "is running" in before and "is running" in after and before != after
    # two at once (a person and the cron job) are serialized: one daemon owns the name after
    lab.ssh(node, f"{cmd} & {cmd} & wait")
    assert lab.exec(node, "pgrep -c -x -P 1 avahi-daemon").stdout.strip() == "1"


def test_memory_and_status(lab: Lab) -> None:
    st = lab.status()
    assert st["bridge"]["present"] and st["forward_rule"]
    for name, n in st["nodes"].items():
        assert n["state"] == "running" and n["link"] == "up", (name, n)
        assert 10 * 2**20 < lab.memory(name) < 4 * 2**30


# ---------------------------------------------------------------------------------------------
# A private lab for what ends nodes


@pytest.fixture(scope="module")
def private():
    """A private lab of 3 nodes, taken down with --purge at the end even if a test failed."""
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    instance = f"pl{os.getpid() % 10000}"
    before = _snapshot(instance)
    priv = instance_lab(instance, 3)
    try:
        priv.check_host()
    except LabError as e:
        shutil.rmtree(priv.state_dir, ignore_errors=True)
        pytest.skip(f"this machine cannot run the lab: {e}")
    priv.before = before  # type: ignore[attr-defined]
    t0 = time.monotonic()
    try:
        priv.up()
        priv.cold_up = time.monotonic() - t0  # type: ignore[attr-defined]
        yield priv
    finally:
        priv.down(purge=True)
        shutil.rmtree(priv.state_dir, ignore_errors=True)


def test_up_again_does_nothing(private: Lab) -> None:
    t0 = time.monotonic()
    done = private.up()
    took = time.monotonic() - t0
    assert done == {"started": [], "healed": [], "running": private.names, "services": []}
    assert took < 10, f"lab-up with everything running took {took:.1f} s"
    print(f"\nprivate lab: cold up {private.cold_up:.1f} s, up again {took:.1f} s")


def test_up_starts_stopped_services(private: Lab) -> None:
    node = private.names[-1]
    private.ssh(node, "lab-service docker stop && lab-service cron stop")
    done = private.up()
    assert sorted(done["services"]) == [f"{node}:cron", f"{node}:docker"]
    assert "is running" in private.ssh(node, "lab-service docker status").stdout


def test_kill_then_boot_keeps_disk(private: Lab) -> None:
    a, b = private.nodes[0], private.nodes[1]
    private.ssh(a.name, "echo kept > /var/lib/lab-marker && echo gone > /run/lab-marker"
                        " && docker volume create lab-keep >/dev/null")
    t0 = time.monotonic()
    assert private.kill(a.name) is True
    took_kill = time.monotonic() - t0
    assert took_kill < 5, f"kill took {took_kill:.1f} s"
    assert private.status()["nodes"][a.name]["state"] == "down"
    assert private.pid(a.name) is None and not private._cgroup_pids(a.name)
    assert _connect(a.address, 22, 1.5) in ("timeout", "unreachable")
    # a peer sees it as gone too (no reset: nobody answers for that address any more)
    r = private.exec(b.name, f"timeout 2 bash -c '</dev/tcp/{a.address}/22'", check=False)
    assert r.returncode != 0 and "refused" not in r.stderr
    with pytest.raises(LabError, match="not running"):
        private.exec(a.name, "true")
    assert private.kill(a.name) is False
    t0 = time.monotonic()
    assert private.boot(a.name) is True
    took_boot = time.monotonic() - t0
    out = private.ssh(a.name, "cat /var/lib/lab-marker; test -e /run/lab-marker || echo run-fresh;"
                              " docker volume ls -q; lab-service docker status").stdout
    assert "kept" in out and "run-fresh" in out and "lab-keep" in out and "is running" in out
    assert private.exec(a.name, "hostname").stdout.strip() == a.name
    assert private.boot(a.name) is False
    print(f"\nkill {took_kill:.2f} s, boot {took_boot:.2f} s")


def test_cut_is_silent_then_heal(private: Lab) -> None:
    a, b = private.nodes[1], private.nodes[2]
    private.cut(a.name)
    try:
        assert private.status()["nodes"][a.name]["state"] == "cut"
        assert _connect(a.address, 22, 1.5) == "timeout"
        r = private.exec(b.name, f"timeout 2 bash -c '</dev/tcp/{a.address}/22'; echo rc=$?",
                         check=False)
        assert "rc=124" in r.stdout, r        # timed out: no reset, no refusal
        # the cut node itself is alive and cannot reach anyone either
        r = private.exec(a.name, f"timeout 2 bash -c '</dev/tcp/{b.address}/22'; echo rc=$?",
                         check=False)
        assert "rc=124" in r.stdout, r
        assert private.is_up() is False
    finally:
        private.heal(a.name)
    assert private.ssh(a.name, "hostname").stdout.strip() == a.name
    assert private.is_up()


def test_stack_smoke(private: Lab) -> None:
    """The lab can host the stack: swarm init/leave, a Gluster replica 3 volume mounted with
    FUSE (then all of it removed again)."""
    n1, n2, n3 = private.nodes
    out = private.ssh(n1.name, f"docker swarm init --advertise-addr {n1.address} >/dev/null && "
                               "docker info --format '{{.Swarm.LocalNodeState}}' && "
                               "docker swarm leave --force >/dev/null && "
                               "docker info --format '{{.Swarm.LocalNodeState}}'").stdout
    assert out.split() == ["active", "inactive"], out
    vol, brick, mnt = "labsmoke", "/srv/gluster/labsmoke", "/mnt/labsmoke"
    g = "gluster --mode=script"
    private.ssh(n1.name, f"{g} peer probe {n2.address} && {g} peer probe {n3.address}")
    for n in private.nodes:
        private.ssh(n.name, f"mkdir -p {brick}")
    # peers must be connected before a volume can span them
    for _ in range(50):
        if private.ssh(n1.name, f"{g} pool list").stdout.count("Connected") == 3:
            break
        time.sleep(0.2)
    bricks = " ".join(f"{n.address}:{brick}" for n in private.nodes)
    private.ssh(n1.name, f"{g} volume create {vol} replica 3 {bricks} force && "
                         f"{g} volume start {vol}")
    private.ssh(n1.name, f"mkdir -p {mnt} && mount -t glusterfs "
                         f"-o backup-volfile-servers={n2.address}:{n3.address} "
                         f"{n1.address}:/{vol} {mnt} && echo hello > {mnt}/f && "
                         f"grep -q fuse.glusterfs /proc/mounts")
    assert private.ssh(n3.name, f"cat {brick}/f").stdout.strip() == "hello"
    private.ssh(n1.name, f"umount {mnt} && rmdir {mnt} && {g} volume stop {vol} && "
                         f"{g} volume delete {vol} && {g} peer detach {n2.address} && "
                         f"{g} peer detach {n3.address}")
    for n in private.nodes:
        private.ssh(n.name, "rm -rf /srv/gluster")
    assert "localhost" in private.ssh(n1.name, f"{g} pool list").stdout


def test_down_leaves_nothing(private: Lab) -> None:
    """Runs last in this module: the private lab goes down with --purge; nothing of it stays."""
    up = _snapshot(private.instance)
    assert up["netns"] and up["links"] and up["rules"] and up["cgroups"] and up["procs"]
    t0 = time.monotonic()
    stopped = private.down(purge=True)
    took = time.monotonic() - t0
    assert sorted(stopped) == sorted(private.names)
    after = _snapshot(private.instance)
    assert after == private.before, {k: (private.before[k], after[k]) for k in after
                                     if after[k] != private.before[k]}
    for k in ("netns", "links", "rules", "cgroups", "mounts", "procs"):
        assert not after[k], (k, after[k])
    assert not (private.state_dir / "nodes").exists()
    # the netns objects themselves are gone, not just their names
    live = subprocess.run(["lsns", "-t", "net", "-n", "-o", "NS"], capture_output=True,
                          text=True).stdout.split()
    assert not set(up["netns_ids"]) & set(live)
    print(f"\nprivate lab: down {took:.1f} s")


def _snapshot(instance: str) -> dict:
    """Everything of lab `instance` visible on the host."""
    lab_names = (f"hswlab{instance}", f"hsw{instance}-")
    tag = f"haswarm-lab-{instance}"
    state = str(labmod.STATE_DIR / f"instance-{instance}")
    netns = sorted(p.name for p in Path("/run/netns").glob(f"hswlab{instance}-*")) \
        if Path("/run/netns").exists() else []
    netns_ids = []
    for name in netns:
        with_id = os.stat(f"/run/netns/{name}")
        netns_ids.append(str(with_id.st_ino))
    links = sorted(d.name for d in Path("/sys/class/net").iterdir()
                   if d.name.startswith(lab_names))
    rules = [r for r in subprocess.run(["iptables", "-w", "-S"], capture_output=True,
                                       text=True).stdout.splitlines() if tag in r]
    cgroups = sorted(str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{tag}"))
    mounts = [m for m in Path("/proc/self/mountinfo").read_text().splitlines()
              if state in m or f"/run/netns/hswlab{instance}-" in m]
    procs = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cg = (p / "cgroup").read_text()
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"/{tag}/" in cg or state in cmd:
            procs.append(f"{p.name} {cmd[:80]}")
    return {"netns": netns, "netns_ids": netns_ids, "links": links, "rules": rules,
            "cgroups": cgroups, "mounts": mounts, "procs": procs,
            "run_netns": Path("/run/netns").exists()}
