"""Small host helpers of the lab: running a command, a process's start time, writing a file
atomically, asking a TCP port or a Docker socket, and the Popen handles of the processes the lab
started (reaped when they end). `LabError` is the lab's one error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

# Popen handles of the nodes (and the controller dockerd) this process started, so their
# host-side parent (`unshare`) is reaped when a node ends (pid -> Popen).
_CHILDREN: dict[int, subprocess.Popen] = {}
_CHILDREN_LOCK = threading.Lock()


class LabError(Exception):
    """A lab operation that failed; str() names the node and says what to do."""


def run(argv: Sequence[str], check: bool = True, timeout: float = 60,
        input: str | None = None) -> subprocess.CompletedProcess:
    """Run a host command, output captured as text; LabError if it is missing, too slow or
    (with `check`) fails."""
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                           input=input, stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError:
        raise LabError(f"{argv[0]} is not installed (needed by the lab)") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"`{shlex.join(argv)}` did not finish within {timeout:.0f} s") from None
    if check and r.returncode != 0:
        raise LabError(f"`{shlex.join(argv)}` failed (exit {r.returncode}): "
                       f"{(r.stderr or r.stdout).strip()}")
    return r


def start_time(pid: int) -> int | None:
    """Start time of a live (non-zombie) process in clock ticks, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def write_text(path: Path, text: str, mode: int = 0o644) -> None:
    """Write `path` atomically (a temporary file renamed over it) with `mode`."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)


def tcp_open(address: str, port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connection to address:port opens within `timeout`."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def docker_answers(sock_path: str, timeout: float = 2) -> bool:
    """True if a Docker engine answers /_ping on the unix socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(sock_path)
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return s.recv(64).split(b" ")[1:2] == [b"200"]
    except (OSError, IndexError):
        return False


def adopt(p: subprocess.Popen) -> None:
    """Remember a process the lab started, so `reap` can wait for it once it ends."""
    with _CHILDREN_LOCK:
        _CHILDREN[p.pid] = p


def reap(pid: int | None) -> None:
    """Wait for (at most 5 s) and forget a process `adopt`ed by this process, if it is one."""
    if pid is None:
        return
    with _CHILDREN_LOCK:
        p = _CHILDREN.get(pid)
    if p is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)
            with _CHILDREN_LOCK:
                _CHILDREN.pop(pid, None)


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until process `pid` has ended (then reap it); False after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        if start_time(pid) is None:
            reap(pid)
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.02)


def rmdir_tree(path: Path, timeout: float = 10) -> None:
    """Remove a cgroup directory and its children (bottom-up); a cgroup whose last task just
    exited can be busy for a moment."""
    if not path.exists():
        return
    end = time.monotonic() + timeout
    for d, _, _ in sorted(os.walk(path), key=lambda t: -t[0].count("/")):
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > end:
                    raise LabError(f"cannot remove cgroup {d}: {e.strerror} "
                                   f"(processes left: {Path(d, 'cgroup.procs').read_text()!r})"
                                   ) from None
                time.sleep(0.05)


def show(cmd: str | Sequence[str]) -> str:
    """A command as the user would type it."""
    return cmd if isinstance(cmd, str) else shlex.join(cmd)
