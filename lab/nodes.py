"""The Pi simulation: one node's life on the host. Its network namespace (pinned in /run/netns),
veth and cgroups, its start (`nsenter ... unshare ... tini -- lab/node-init.sh`), power cut
(`kill`), link loss and back (`cut`, `heal`), and the cleanup of a node that is not running.
`NodesMixin` is the part of `Lab` that does this.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from lab.base import CGROUP_FS, NETNS_DIR, NODE_CONTROLLERS, NODE_PATH, SCRIPTS_DIR, LabBase
from lab.proc import LabError, adopt, reap, rmdir_tree, run, start_time, wait_gone, write_text
from tasks.config import Node


class NodesMixin(LabBase):
    """The nodes' processes, namespaces and cgroups (the part of `Lab` that simulates Pis)."""

    # -- state -----------------------------------------------------------------------------

    def pid(self, name: str) -> int | None:
        """Host pid of the node's tini (PID 1 of its PID namespace), None if it is not running."""
        self.node(name)
        try:
            rec = json.loads(self._pidfile(name).read_text())
            if start_time(rec["tini"]) == rec["start"]:
                return rec["tini"]
        except (OSError, ValueError, KeyError):
            pass
        # No or stale pid file: the process that is PID 1 of a namespace in the node's cgroup.
        for pid in self._cgroup_pids(name, recursive=False):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("NSpid:") and line.split()[-1] == "1" and len(line.split()) > 2:
                    return pid
        return None

    def link(self, name: str) -> str:
        """'up', 'down' (cut) or 'absent' for the host end of the node's veth."""
        try:
            flags = int(Path(f"/sys/class/net/{self.veth(name)}/flags").read_text(), 16)
        except OSError:
            return "absent"
        return "up" if flags & 1 else "down"

    def memory(self, name: str) -> int:
        """Memory of the node in bytes: its cgroup's usage minus inactive page cache (the
        "working set", as `docker stats` counts it); includes the node's containers."""
        base = CGROUP_FS / "memory" / self.tag / name
        try:
            usage = int((base / "memory.usage_in_bytes").read_text())
            stat = dict(line.split() for line in (base / "memory.stat").read_text().splitlines())
        except OSError:
            raise LabError(f"node {name} has no memory cgroup: is it running? "
                           f"(doit lab-boot --node {name})") from None
        return max(0, usage - int(stat.get("total_inactive_file", 0)))

    # -- lifecycle -------------------------------------------------------------------------

    def kill(self, name: str) -> bool:
        """Power cut: SIGKILL the node's tini, so every process of the node dies at once; then
        remove its netns, veth and cgroups so it can boot again. Its disk is kept.
        False if it was not running."""
        self.node(name)
        with self._lock():
            pid = self.pid(name)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if not self._wait_gone(name, pid, 10):
                    raise LabError(f"{name}: its processes did not end within 10 s of SIGKILL; "
                                   "see `ps` for processes in D state, then `doit lab-down`")
            self._cleanup_node(name)
            return pid is not None

    def cut(self, name: str) -> None:
        """Silent link loss: the host end of the node's veth goes down. The node keeps running
        and peers see timeouts, not resets (as a pulled cable or a dead switch port)."""
        self._require_running(name)
        self._set_link(name, up=False)

    def heal(self, name: str) -> None:
        """Undo cut: the node's link is up again."""
        self._require_running(name)
        self._set_link(name, up=True)

    def freeze(self, name: str) -> int:
        """A hung node, neither dead nor cut: SIGSTOP every process of it (its containers
        included). Its kernel still answers (TCP handshakes, pings); nothing of it runs.
        Returns how many processes were stopped."""
        self._require_running(name)
        stopped: set[int] = set()
        for _ in range(5):  # again for any process forked meanwhile
            new = [p for p in self._cgroup_pids(name) if p not in stopped]
            if not new:
                break
            for p in new:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGSTOP)
            stopped.update(new)
        return len(stopped)

    def thaw(self, name: str) -> None:
        """Undo freeze: SIGCONT every process of the node."""
        self._require_running(name)
        for p in self._cgroup_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)

    # -- internals: one node ---------------------------------------------------------------

    def _require_running(self, name: str) -> int:
        self.node(name)
        pid = self.pid(name)
        if pid is None:
            raise LabError(f"node {name} is not running: start it with "
                           f"`doit lab-boot --node {name}` (or `doit lab-up`)")
        return pid

    def _set_link(self, name: str, up: bool) -> None:
        run(["ip", "link", "set", self.veth(name), "up" if up else "down"])

    def _prepare_node_dir(self, node: Node) -> Path:
        d = self.node_dir(node.name)
        d.mkdir(parents=True, exist_ok=True)
        key = d / "ssh_host_ed25519_key"
        if not key.exists() or not key.with_suffix(".pub").exists():
            key.unlink(missing_ok=True)
            key.with_suffix(".pub").unlink(missing_ok=True)
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{node.name}",
                 "-f", str(key)])
        return d

    def _wipe_disk(self, name: str) -> list[str]:
        """Everything a re-flash loses, deleted from the disk of a node that is not running:
        the overlay uppers of /etc, /var, /usr/local (sshd config, machine-id, /var/lib/glusterd,
        /etc/cron.d, /etc/keepalived, /etc/fstab, the first-boot mark), /root, /srv (the brick),
        /mnt, the Docker data root (images, volumes, swarm state) and the SSH host key pair.
        Only console.log stays (the host's record of the node). Returns what was removed."""
        if self.pid(name) is not None:
            raise LabError(f"{name} is running: kill it first (doit lab-kill --node {name})")
        d = self.node_dir(name).resolve()
        mounted = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
                   if len(line.split()) > 1 and Path(line.split()[1]).is_relative_to(d)]
        if mounted:  # never delete through a mount into another file system
            raise LabError(f"{name}: {', '.join(mounted)} is mounted on the host; unmount it, "
                           "then wipe again")
        removed = []
        for p in sorted(d.iterdir()) if d.is_dir() else []:
            if p.name == "console.log":
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p.name)
        return removed

    def _cgroup_pids(self, name: str, recursive: bool = True) -> list[int]:
        pids: list[int] = []
        for c in NODE_CONTROLLERS:
            base = CGROUP_FS / c / self.tag / name
            dirs = [base] if not recursive else [Path(p) for p, _, _ in os.walk(base)]
            for d in dirs:
                with contextlib.suppress(OSError):
                    pids += [int(x) for x in (d / "cgroup.procs").read_text().split()]
        return sorted(set(pids))

    def _wait_gone(self, name: str | None, pid: int, timeout: float) -> bool:
        """Wait until process pid (a node's tini, or the controller dockerd) has ended and, for
        a node, everything in its cgroups too."""
        if name is None:
            return wait_gone(pid, timeout)
        end = time.monotonic() + timeout
        while True:
            if start_time(pid) is None:
                reap(self._unshare_of(name))
                if not any(start_time(p) is not None for p in self._cgroup_pids(name)):
                    return True
            if time.monotonic() > end:
                return False
            time.sleep(0.02)

    def _unshare_of(self, name: str) -> int | None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return json.loads(self._pidfile(name).read_text())["unshare"]
        return None

    def _cleanup_node(self, name: str) -> None:
        """Remove the host-side pieces of a node that is not running: leftover processes in its
        cgroups, veth, netns, cgroups, pid file. Its disk stays."""
        for pid in self._cgroup_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + 10
        while any(start_time(p) is not None for p in self._cgroup_pids(name)):
            if time.monotonic() > end:
                raise LabError(f"{name}: processes in its cgroup {self.cgroup(name)} survive "
                               "SIGKILL (D state?); see `ps`, then retry `doit lab-down`")
            time.sleep(0.05)
        reap(self._unshare_of(name))
        if Path(f"/sys/class/net/{self.veth(name)}").exists():
            run(["ip", "link", "del", self.veth(name)], check=False)
        self._delete_netns(name)
        for hierarchy in CGROUP_FS.iterdir():
            rmdir_tree(hierarchy / self.tag / name)
        self._pidfile(name).unlink(missing_ok=True)

    def _start_node(self, node: Node) -> None:
        name = node.name
        self._cleanup_node(name)     # stale pieces of an earlier crash (not the disk)
        d = self._prepare_node_dir(node)
        ns, veth = self.netns(name), self.veth(name)
        self._create_netns(name)
        try:
            run(["ip", "link", "add", veth, "address", self._mac(1, node.address), "type", "veth",
                 "peer", "name", "eth0", "address", self._mac(0, node.address), "netns", ns])
            run(["ip", "link", "set", veth, "master", self.bridge, "up"])
            for argv in (["addr", "add", f"{node.address}/24", "dev", "eth0"],
                         ["link", "set", "lo", "up"], ["link", "set", "eth0", "up"],
                         ["route", "add", "default", "via", str(self.gateway)]):
                run(["ip", "-n", ns, *argv])
            procs = []
            for c in NODE_CONTROLLERS:
                cg = CGROUP_FS / c / self.tag / name
                cg.mkdir(parents=True, exist_ok=True)
                procs.append(str(cg / "cgroup.procs"))
            pub = self.key.with_name(self.key.name + ".pub").read_text().strip()
            env = {"PATH": NODE_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb",
                   "LAB_NODE": name, "LAB_ADDRESS": node.address, "LAB_NODE_DIR": str(d),
                   "LAB_STATE_DIR": str(self.state_dir), "LAB_SCRIPTS": str(SCRIPTS_DIR),
                   "LAB_CGROUP": self.cgroup(name), "LAB_AUTHORIZED_KEY": pub}
            argv = ["sh", "-c", 'for f in "$1" "$2"; do echo $$ > "$f"; done; shift 2; exec "$@"',
                    "lab-spawn", *procs,
                    "nsenter", f"--net={NETNS_DIR / ns}",
                    "unshare", "--mount", "--uts", "--pid", "--fork", "--mount-proc",
                    "--propagation", "private",
                    "tini", "-s", "--", str(SCRIPTS_DIR / "node-init.sh")]
            with open(d / "console.log", "ab") as console:
                p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console,
                                     stderr=subprocess.STDOUT, env=env, cwd="/",
                                     start_new_session=True, close_fds=True)
            adopt(p)
            tini = self._find_tini(p, name)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text(self._pidfile(name), json.dumps({
                "tini": tini, "start": start_time(tini), "unshare": p.pid,
                "booted": time.time()}))
        except BaseException:
            with contextlib.suppress(LabError):
                self._cleanup_node(name)
            raise

    def _find_tini(self, p: subprocess.Popen, name: str) -> int:
        """The host pid of the node's tini: the child unshare forks (PID 1 of the new ns)."""
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if p.poll() is not None:
                raise LabError(f"{name}: the node ended while starting (exit {p.returncode}); "
                               f"see {self.node_dir(name) / 'console.log'}:\n"
                               f"{self._console_tail(name)}")
            with contextlib.suppress(OSError):
                kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
                if kids and Path(f"/proc/{kids[0]}/comm").read_text().strip() == "tini":
                    return int(kids[0])
            time.sleep(0.01)
        raise LabError(f"{name}: tini did not start within 10 s; see "
                       f"{self.node_dir(name) / 'console.log'}")

    def _console_tail(self, name: str, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            text = (self.node_dir(name) / "console.log").read_text(errors="replace")
            return "\n".join("    " + x for x in text.splitlines()[-lines:])
        return "    (no console.log)"

    # -- internals: namespaces and cgroups on the host -------------------------------------

    def _remove_cgroup_root(self) -> None:
        for hierarchy in CGROUP_FS.iterdir():
            rmdir_tree(hierarchy / self.tag)

    def _create_netns(self, name: str) -> None:
        """/run/netns/PREFIX-NAME, pinned by a bind mount. Not `ip netns add`: that also turns
        /run/netns into a (shared) mount point, which would outlive the lab."""
        if not NETNS_DIR.exists():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            NETNS_DIR.mkdir(parents=True)
            (self.run_dir / "created-run-netns").touch()
        pin = NETNS_DIR / self.netns(name)
        pin.touch()
        run(["unshare", f"--net={pin}", "true"])

    def _delete_netns(self, name: str) -> None:
        pin = NETNS_DIR / self.netns(name)
        if os.path.ismount(pin):
            run(["umount", "-l", str(pin)])
        pin.unlink(missing_ok=True)

    def _release_netns_dir(self) -> None:
        """Remove /run/netns if this lab created it and it is empty (unmounting it first if
        something, e.g. `ip netns add`, made it a mount point meanwhile)."""
        marker = self.run_dir / "created-run-netns"
        if not marker.exists():
            return
        if NETNS_DIR.exists() and not any(NETNS_DIR.iterdir()):
            while os.path.ismount(NETNS_DIR):
                if run(["umount", str(NETNS_DIR)], check=False).returncode != 0:
                    break
            with contextlib.suppress(OSError):
                NETNS_DIR.rmdir()
        if not NETNS_DIR.exists():
            marker.unlink()

    def _all_node_names(self) -> list[str]:
        """Configured nodes plus any other node this lab left (a node removed from lab.yml)."""
        names = list(self.names)
        with contextlib.suppress(OSError):
            for d in (CGROUP_FS / "memory" / self.tag).iterdir():
                if d.is_dir() and d.name not in names:
                    names.append(d.name)
        with contextlib.suppress(OSError):
            for f in NETNS_DIR.iterdir():
                rest = f.name.removeprefix(self.netns_prefix)
                if f.name.startswith(self.netns_prefix) and rest not in names:
                    names.append(rest)
        return names
