"""Reaching the nodes: the controller's SSH key pair, the ssh config and known_hosts (every
node's host key, made before it boots), `ssh` (real SSH, strict host key checking), `exec`
(nsenter into a node, no SSH) and `wait_ready` (sshd, dockerd and glusterd answer).
`AccessMixin` is the part of `Lab` that does this.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from lab.base import CGROUP_FS, NODE_CONTROLLERS, NODE_PATH
from lab.nodes import NodesMixin
from lab.proc import LabError, run, show, tcp_open, write_text

# Run over SSH by wait_ready: (re)start stopped boot services of a booted node, then wait until
# dockerd (its API's /_ping) and glusterd (a CLI request) answer, TRIES x 0.1 s at most.
READY_SCRIPT = r"""
booted() { [ -e /run/haswarm-lab/booted ]; }
# A node that has finished booting runs its boot services: start any that was stopped.
if booted; then
    for s in sshd dbus docker glusterd avahi-daemon cron; do
        lab-service $s status >/dev/null 2>&1 || { lab-service $s start >&2 && echo "started $s"; }
    done
fi
for i in $(seq TRIES); do
    if curl -sf --max-time 2 --unix-socket /run/docker.sock http://docker/_ping >/dev/null \
        && GLUSTERD_ANSWERS; then
        echo "ready $(hostname)"; exit 0
    fi
    if booted; then     # booted, and a service is down: it failed to start, do not wait
        for s in docker glusterd; do
            if ! lab-service $s status >/dev/null 2>&1; then
                echo "$(hostname): $s failed to start; /var/log/haswarm-lab/$s.log ends:" >&2
                tail -n 3 /var/log/haswarm-lab/$s.log | sed 's/^/    /' >&2
                exit 1
            fi
        done
    fi
    sleep 0.1
done
echo "$(hostname): $(lab-service docker status); $(lab-service glusterd status)" >&2
exit 1
"""


def ready_script(tries: int, running: bool = False) -> str:
    """READY_SCRIPT waiting `tries` x 0.1 s. On a node that was `running` already, glusterd
    running is enough (gluster:daemon asks it); a new one is waited for until it answers."""
    answers = "true" if running else "gluster --mode=script pool list >/dev/null 2>&1"
    return READY_SCRIPT.replace("TRIES", str(tries)).replace("GLUSTERD_ANSWERS", answers)


def known_hosts_with(existing: str, wanted: dict[str, str]) -> str:
    """known_hosts text: `existing` as it is, plus the line of each address of `wanted`
    ({address: line}) that no line lists yet. A node known_hosts lists already keeps its line,
    even when the node's key changed: trusting a new key is the user's decision (a re-flashed
    node: README "Replace a dead Pi")."""
    listed: set[str] = set()
    for line in existing.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        hosts = fields[1] if fields[0].startswith("@") and len(fields) > 1 else fields[0]
        listed.update(hosts.split(","))
    out = existing if not existing or existing.endswith("\n") else existing + "\n"
    return out + "".join(line for addr, line in wanted.items() if addr not in listed)


def host_key_hint(known_hosts: str, address: str) -> str:
    """What to do when a node's host key is not the one known_hosts lists (as on a Pi)."""
    return (f"its SSH host key is not the one {known_hosts} lists (re-flashed, e.g. by "
            f"`doit lab-wipe`?). Check the new key (`ssh-keygen -lf` on the node's "
            f"ssh_host_ed25519_key.pub) and trust it as on a Pi (README \"Replace a dead Pi\"): "
            f"`ssh-keygen -f {known_hosts} -R {address}` and `ssh-keyscan -t ed25519 {address} "
            f">> {known_hosts}`")


class AccessMixin(NodesMixin):
    """SSH keys and known_hosts of the lab, and running commands on its nodes."""

    # -- reaching the nodes ----------------------------------------------------------------

    def exec(self, name: str, cmd: str | Sequence[str], check: bool = True, timeout: float = 120,
             input: str | None = None) -> subprocess.CompletedProcess:
        """Run a command inside a node without SSH (nsenter into its mount, UTS, net and PID
        namespaces, placed in its cgroups). A string runs with /bin/sh -c. Output is captured
        as text; with check, a non-zero exit raises LabError."""
        pid = self._require_running(name)
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        procs = [str(CGROUP_FS / c / self.tag / name / "cgroup.procs") for c in NODE_CONTROLLERS]
        full = ["sh", "-c", 'for f in "$1" "$2"; do echo $$ > "$f"; done; shift 2; exec "$@"',
                "lab-exec", *procs,
                "nsenter", "-t", str(pid), "-m", "-u", "-n", "-p", "--", *argv]
        env = {"PATH": NODE_PATH, "HOME": "/root", "LANG": "C.UTF-8", "USER": "root"}
        p = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env, cwd="/", start_new_session=True,
                             stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL)
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            # the command runs as nsenter's child, in nsenter's process group: end them all
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.communicate(timeout=5)
            raise LabError(f"{name}: `{show(cmd)}` did not finish within {timeout:.0f} s "
                           "(a daemon started by exec must not keep stdout/stderr open)") from None
        r = subprocess.CompletedProcess(full, p.returncode, out, err)
        if check and r.returncode != 0:
            raise LabError(f"{name}: `{show(cmd)}` failed (exit {r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()}")
        return r

    def ssh_argv(self, name: str) -> list[str]:
        """argv prefix for OpenSSH to the node as haswarm connects: the lab key, host key
        checked against known_hosts, nothing read from or written to ~/.ssh."""
        node = self.node(name)
        return ["ssh", "-F", str(self.ssh_config), f"{self.cluster.ssh_for(node).user}@"
                f"{node.address}"]

    def ssh(self, name: str, cmd: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a command on the node over real SSH (strict host key checking)."""
        try:
            r = subprocess.run([*self.ssh_argv(name), cmd], capture_output=True, text=True,
                               timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise LabError(f"{name}: ssh `{cmd}` did not finish within {timeout:.0f} s") \
                from None
        if check and r.returncode != 0:
            raise LabError(f"{name}: ssh `{cmd}` failed (exit {r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()}")
        return r

    def wait_ready(self, names: Sequence[str] | None = None, timeout: float = 90,
                   inside: Sequence[str] = ()) -> dict[str, list[str]]:
        """Wait until sshd, dockerd and glusterd answer over SSH on the nodes (default all).
        On a node that has finished booting, a boot service that is not running (someone
        stopped it) is started first. Returns {node: [services it had to start]}.
        The nodes named in `inside` are checked from inside (`exec`: ~0.1 s instead of an SSH
        handshake), for nodes that were running already; sshd must still listen on port 22.
        Raises LabError naming every node that did not answer, with where to look."""
        names = list(names or self.names)
        deadline = time.monotonic() + timeout

        def one(name: str) -> str | None:
            node = self.node(name)
            while not tcp_open(node.address, 22):
                if self.pid(name) is None:
                    return (f"{name}: the node died while booting; see "
                            f"{self.node_dir(name) / 'console.log'}:\n"
                            f"{self._console_tail(name)}")
                if time.monotonic() > deadline:
                    return f"{name}: sshd does not answer on {node.address}:22"
                time.sleep(0.05)
            left = max(1, int(deadline - time.monotonic()))
            script = ready_script(left * 10, running=name in inside)
            try:
                if name in inside:
                    r = self.exec(name, script, check=False, timeout=left + 10)
                else:
                    r = self.ssh(name, script, check=False, timeout=left + 10)
            except LabError as e:
                return str(e)
            if r.returncode != 0 and ("Host key verification failed" in r.stderr
                                      or "IDENTIFICATION HAS CHANGED" in r.stderr):
                return f"{name}: {host_key_hint(str(self.known_hosts), node.address)}"
            if r.returncode != 0:
                return (f"{name}: not ready over SSH: {(r.stderr or r.stdout).strip()}\n"
                        f"  logs: {self.node_dir(name)}/upper/var/log/haswarm-lab/ and "
                        f"{self.node_dir(name)}/console.log")
            lines = r.stdout.splitlines()
            if f"ready {name}" not in lines:
                return (f"{name}: {node.address} answered as {r.stdout.strip()!r}: another "
                        "host uses this address?")
            started[name] = [x.split()[1] for x in lines if x.startswith("started ")]
            return None

        started: dict[str, list[str]] = {}
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            problems = [p for p in pool.map(one, names) if p]
        if problems:
            raise LabError("\n".join(problems) + "\nTry `doit lab-boot --node NAME` or "
                           "`doit lab-down` then `doit lab-up`.")
        return {n: v for n, v in started.items() if v}

    def wait_booted(self, name: str, timeout: float = 90) -> None:
        """Wait until the node has booted and sshd (port 22), dockerd and glusterd answer,
        checked inside the node (`exec`), not over SSH: for a node whose new host key is not
        trusted (yet). LabError naming what did not come up."""
        node = self.node(name)
        deadline = time.monotonic() + timeout
        while not tcp_open(node.address, 22):
            if self.pid(name) is None:
                raise LabError(f"{name}: the node died while booting; see "
                               f"{self.node_dir(name) / 'console.log'}:\n"
                               f"{self._console_tail(name)}")
            if time.monotonic() > deadline:
                raise LabError(f"{name}: sshd does not answer on {node.address}:22 after "
                               f"{timeout:.0f} s; see {self.node_dir(name) / 'console.log'}")
            time.sleep(0.05)
        left = max(1, int(deadline - time.monotonic()))
        r = self.exec(name, ready_script(left * 10), check=False, timeout=left + 10)
        if r.returncode != 0 or f"ready {name}" not in r.stdout.splitlines():
            raise LabError(f"{name}: not ready: {(r.stderr or r.stdout).strip()}\n"
                           f"  logs: {self.node_dir(name)}/upper/var/log/haswarm-lab/ and "
                           f"{self.node_dir(name)}/console.log")

    # -- SSH keys and known_hosts ----------------------------------------------------------

    def _ensure_ssh_keys(self) -> None:
        self.ssh_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.key.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "haswarm-lab-controller",
                 "-f", str(self.key)])
        hosts = " ".join(n.address for n in self.nodes)
        user = self.cluster.ssh.user
        write_text(self.ssh_config, (
            "# haswarm lab: ssh -F .lab/ssh/config pi1 (written by lab-up)\n"
            + "".join(f"Host {n.name}\n  HostName {n.address}\n" for n in self.nodes)
            + f"Host {' '.join(self.names)} {hosts}\n"
            f"  User {user}\n"
            f"  IdentityFile {self.key}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.known_hosts}\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n"
            "  BatchMode yes\n"
            f"  ConnectTimeout {int(self.cluster.ssh.connect_timeout)}\n"
            "  LogLevel ERROR\n"))

    def _write_known_hosts(self) -> None:
        """Add every node's host key to known_hosts, unless it lists the node already: the
        user's trust decisions stay (`known_hosts_with`)."""
        wanted = {}
        for n in self.nodes:
            pub = (self.node_dir(n.name) / "ssh_host_ed25519_key.pub").read_text().split()
            wanted[n.address] = f"{n.address},{n.name} {pub[0]} {pub[1]}\n"
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        existing = self.known_hosts.read_text() if self.known_hosts.exists() else ""
        text = known_hosts_with(existing, wanted)
        if text != existing:
            write_text(self.known_hosts, text)
