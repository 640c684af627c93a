"""The local lab: the nodes of config/lab.yml as simulated Raspberry Pis on this machine.

Each node is a set of Linux namespaces on a lab bridge, booted by `lab/node-init.sh` the way a Pi
boots (sshd, dbus, avahi-daemon, dockerd, glusterd, cron), so haswarm deploys to it over real SSH
exactly as to a real cluster:

  host                                   node pi1 (same for pi2, pi3, ...)
  ----                                   ---------------------------------
  bridge hswlab0 10.77.0.1/24  <-veth->  eth0 10.77.0.11/24, default route via 10.77.0.1
  iptables FORWARD ACCEPT in/out hswlab0 (Docker's FORWARD policy is DROP)
  /run/netns/hswlab-pi1                  network namespace
  cgroups /haswarm-lab/pi1 (memory,      nsenter --net=... unshare --mount --uts --pid --fork
  pids; dockerd --cgroup-parent)           --mount-proc --propagation private tini -s -- node-init
  .lab/nodes/pi1/                        overlay uppers of /etc, /var, /usr/local; /root, /srv,
                                           /mnt, /var/lib/docker bound in; tmpfs /run and /tmp

Python API (tests use it; doit tasks below wrap it):
  lab = Lab(load_cluster(LAB_CLUSTER_FILE))
  lab.up()            start every node that is not running (heal cut links), wait until sshd,
                      dockerd and glusterd answer on every node; idempotent
  lab.down(purge=False)  stop every node (SIGTERM: services stop in order; SIGKILL after a
                      timeout) and remove every host-side piece; purge also removes node disks
  lab.kill(name)      power cut: SIGKILL the node's tini (PID 1 of its PID namespace) so every
                      process dies at once; its netns/veth/cgroups go, its disk stays
  lab.cut(name)       silent link loss: the host side of its veth goes down (peers time out)
  lab.heal(name)      link back up
  lab.freeze(name)    a hung node: SIGSTOP all its processes (the kernel still answers TCP)
  lab.thaw(name)      SIGCONT them again
  lab.boot(name)      start a killed node again (as after a reboot: disk kept, services started)
  lab.wipe(name)      a dead Pi re-flashed: power cut, disk wiped (Docker data root, glusterd
                      state, brick, cron, keepalived, /etc changes, SSH host key), first boot as
                      a bare OS with a new host key; known_hosts keeps the old one (the user
                      trusts the new key as on a Pi)
  lab.status() / lab.is_up() / lab.memory(name) / lab.exec(name, cmd) / lab.ssh(name, cmd)
  lab.ensure_controller_engine()  a Docker engine on the host for building images
  instance_lab("x")   a second, independent lab (own bridge, subnet, names, .lab/instance-x)

State lives in <project>/.lab (git-ignored): nodes/NAME (node disks and console.log), run/
(pid files), ssh/ (controller key pair, known_hosts with every node's host key, an ssh config:
`ssh -F .lab/ssh/config pi1`), controller/ (a lab-started dockerd, if any). Nothing is written to
the host's /root/.ssh, /etc or Docker state.

`Lab` is composed of parts of one job each: lab/base.py (names, state directory, host check,
lock), lab/nodes.py (the Pi simulation: a node's namespaces, cgroups, start, kill, cut, heal),
lab/network.py (bridge, FORWARD rule, a lab dockerd's iptables undone), lab/access.py (SSH keys,
known_hosts, exec, ssh, wait_ready), lab/engine.py (the controller's Docker engine) and
lab/proc.py (small process helpers, LabError). This module puts them together: up, down, boot,
status, and instance_lab.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from lab.access import AccessMixin
from lab.base import STATE_DIR
from lab.engine import EngineMixin
from lab.network import NetworkMixin
from lab.proc import LabError, run, write_text
from tasks.config import LAB_CLUSTER_FILE

# What other modules import from here (LabError is defined in lab/proc.py, STATE_DIR in base.py).
__all__ = ["STATE_DIR", "Lab", "LabError", "instance_lab"]


class Lab(AccessMixin, NetworkMixin, EngineMixin):
    """The lab described by a cluster (normally config/lab.yml). See the module docstring."""

    # -- state -----------------------------------------------------------------------------

    def is_up(self) -> bool:
        """Every node running with its link up (no SSH: see wait_ready for that)."""
        return self._bridge_present() and all(
            self.pid(n) is not None and self.link(n) == "up" for n in self.names)

    def status(self) -> dict:
        """The lab as a dict: bridge, forward rule, controller engine and per node
        {address, state (running|cut|down), pid, link, memory (bytes or None)}."""
        nodes = {}
        for n in self.nodes:
            pid = self.pid(n.name)
            link = self.link(n.name)
            state = "down" if pid is None else ("running" if link == "up" else "cut")
            mem = None
            if pid is not None:
                with contextlib.suppress(LabError):
                    mem = self.memory(n.name)
            nodes[n.name] = {"address": n.address, "state": state, "pid": pid, "link": link,
                             "memory": mem}
        return {
            "bridge": {"name": self.bridge, "address": f"{self.gateway}/24",
                       "present": self._bridge_present()},
            "forward_rule": self._forward_rule_present(),
            "controller_engine": self._controller_engine_state(),
            "nodes": nodes,
        }

    # -- lifecycle -------------------------------------------------------------------------

    def up(self, timeout: float = 90) -> dict[str, list[str]]:
        """Start every node that is not running, thaw frozen ones, heal cut links, start boot
        services someone stopped on a running node, then wait until sshd, dockerd and glusterd
        answer on every node (over SSH on the nodes it started or healed). Returns
        {'started': nodes, 'healed': nodes, 'running': nodes that were fine, 'services':
        ['pi1:docker', ...] started on running nodes}."""
        self.check_host()
        with self._lock():
            self._ensure_ssh_keys()
            self._ensure_bridge()
            done: dict[str, list[str]] = {"started": [], "healed": [], "running": [],
                                          "services": []}
            for n in self.nodes:
                self._prepare_node_dir(n)
            self._write_known_hosts()
            for n in self.nodes:
                if self.pid(n.name) is not None:
                    self.thaw(n.name)  # a frozen node runs again (nothing if it was not)
                    if self.link(n.name) != "up":
                        self._set_link(n.name, up=True)
                        done["healed"].append(n.name)
                    else:
                        done["running"].append(n.name)
                else:
                    self._start_node(n)
                    done["started"].append(n.name)
        # Nodes that were running are checked from inside; the first SSH connection of the run
        # (preflight) proves their sshd and host key. New or healed nodes answer over SSH here.
        for name, services in self.wait_ready(timeout=timeout, inside=done["running"]).items():
            done["services"].extend(f"{name}:{svc}" for svc in services)
        return done

    def down(self, purge: bool = False, timeout: float = 30) -> list[str]:
        """Stop every node and remove every host-side piece of the lab: processes, netns,
        veths, bridge, iptables rule, cgroups, /run/netns (if the lab created it) and a
        lab-started controller dockerd. Node disks stay unless purge (then .lab/nodes, .lab/run
        and the known_hosts go; the controller key pair in .lab/ssh is kept).
        Returns the nodes that were running."""
        self.check_host(services=False)
        with self._lock():
            running = {n: p for n in self._all_node_names() if (p := self.pid(n)) is not None}
            for pid in running.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for name, pid in running.items():
                if not self._wait_gone(name, pid, max(0.1, deadline - time.monotonic())):
                    self.log(f"{name}: did not stop within {timeout:.0f} s, killing it")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            for name in self._all_node_names():
                self._cleanup_node(name)
            self._remove_bridge()
            self._remove_forward_rule()
            self._remove_cgroup_root()
            self._release_netns_dir()
            self.stop_controller_engine()
            if purge:
                shutil.rmtree(self.state_dir / "nodes", ignore_errors=True)
                shutil.rmtree(self.run_dir, ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    self.known_hosts.unlink()
            return list(running)

    def boot(self, name: str, timeout: float = 60) -> bool:
        """Start a node that is down, as after a reboot (disk kept, services started, link up),
        and wait until it answers over SSH. A running node only gets its link back up.
        False if it was already running."""
        node = self.node(name)
        self.check_host()
        with self._lock():
            if self.pid(name) is not None:
                if self.link(name) != "up":
                    self._set_link(name, up=True)
                return False
            self._ensure_ssh_keys()
            self._ensure_bridge()
            self._prepare_node_dir(node)
            self._write_known_hosts()
            self._start_node(node)
        self.wait_ready([name], timeout=timeout)
        return True

    def wipe(self, name: str, timeout: float = 90) -> str:
        """A dead Pi that comes back re-flashed (same name and address): a power cut, then
        everything on its disk but console.log deleted (`_wipe_disk`: Docker's data root with
        the swarm state, /var/lib/glusterd, the brick, cron, keepalived, fstab, /root, the SSH
        host key), then a first boot as on a fresh SD card (node-init.sh provisions it again:
        machine-id, sshd config, a new host key). known_hosts is NOT updated: haswarm refuses
        the node until the user trusts its new key (README "Replace a dead Pi"), so readiness
        is checked inside the node. Returns the new key's fingerprint (`ssh-keygen -lf`)."""
        node = self.node(name)
        self.check_host()
        self.kill(name)
        with self._lock():
            if self.pid(name) is not None:
                raise LabError(f"{name} was started again meanwhile: not wiping a running node")
            removed = self._wipe_disk(name)
            self.log(f"{name}: wiped {', '.join(removed) or 'nothing (no disk yet)'}")
            self._ensure_ssh_keys()
            self._ensure_bridge()
            self._start_node(node)  # its _prepare_node_dir makes the new host key
        self.wait_booted(name, timeout=timeout)
        pub = self.node_dir(name) / "ssh_host_ed25519_key.pub"
        return run(["ssh-keygen", "-lf", str(pub)]).stdout.strip()


def instance_lab(instance: str, count: int = 3, log: Callable[[str], None] | None = None) -> Lab:
    """A second lab on this machine, independent of the lab of config/lab.yml: nodes
    INSTANCE1..INSTANCE<count> on their own bridge and /24 (10.77.K.0, K from the name, a
    subnet no other lab bridge uses), state in .lab/instance-INSTANCE (cluster.yml, ssh/, nodes/).
    For destructive tests that must not disturb people using the lab, and for CI runs in
    parallel. Remove it with .down(purge=True) and the directory."""
    import yaml

    from tasks.config import load_cluster
    state = STATE_DIR / f"instance-{instance}"
    state.mkdir(parents=True, exist_ok=True)
    cluster_file = state / "cluster.yml"
    if not cluster_file.exists():
        used = set()
        for dev in Path("/sys/class/net").iterdir():
            if dev.name.startswith("hswlab"):
                out = run(["ip", "-o", "-4", "addr", "show", "dev", dev.name], check=False).stdout
                used |= {w.split(".")[2] for w in out.split() if w.startswith("10.77.")}
        k = 1 + zlib.crc32(instance.encode()) % 250
        while str(k) in used:
            k = 1 + k % 250
        data = yaml.safe_load(LAB_CLUSTER_FILE.read_text())
        data["nodes"] = [{"name": f"{instance}{i}", "address": f"10.77.{k}.{10 + i}"}
                         for i in range(1, count + 1)]
        data["ssh"] = {**data.get("ssh", {}), "key": "ssh/id_ed25519",
                       "known_hosts": "ssh/known_hosts"}
        data["allow_two_nodes"] = count == 2
        write_text(cluster_file, yaml.safe_dump(data, sort_keys=False))
    return Lab(load_cluster(cluster_file), state_dir=state, instance=instance, log=log)
