"""A real Docker registry on the controller, for the pull path's lab test (test_registry.py).

Debian packages the distribution registry as `docker-registry` (install.sh installs it; its
system service is never started). `Registry.start()` runs `docker-registry serve` as a process
of ours, with its own config and storage under .lab/registry, listening on 127.0.0.1 only: the
Docker engine talks plain HTTP to a loopback registry without any configuration. `stop()` ends
that process by its PID (and nothing else); `push()` tags a local image into the registry and
pushes it, returning the digest the registry gave it.

    with Registry() as reg:                      # 127.0.0.1:5077, or a free port when taken
        digest = reg.push("haswarm-lab/mosquitto:2.0.21")
        reg.ref("haswarm-lab/mosquitto:2.0.21")  # '127.0.0.1:5077/haswarm-lab/mosquitto:2.0.21'
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from lab.base import STATE_DIR
from lab.proc import LabError, start_time

REGISTRY_DIR = STATE_DIR / "registry"
DEFAULT_PORT = 5077
BINARY = "docker-registry"
_PUSHED = re.compile(r"digest: (sha256:[a-f0-9]{64})")


def free_port(preferred: int = DEFAULT_PORT) -> int:
    """`preferred` when nothing listens on 127.0.0.1 there, else a port the kernel picks."""
    for port in (preferred, 0):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the registry does
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise LabError("no free TCP port on 127.0.0.1")


class Registry:
    """One `docker-registry serve` process of ours (see the module's docstring)."""

    def __init__(self, port: int | None = None, root: Path = REGISTRY_DIR):
        self.root = root
        self.port = port
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        """host:port, the first part of the image names it serves."""
        assert self.port is not None, "start() first"
        return f"127.0.0.1:{self.port}"

    def ref(self, local: str) -> str:
        """The name of a local image (REPO:TAG, Docker Hub's short form) in this registry."""
        return f"{self.address}/{local}"

    # -- the process --------------------------------------------------------------------------

    def start(self, fresh: bool = False, timeout: float = 20) -> Registry:
        """Start serving (`fresh`: with empty storage); returns when /v2/ answers."""
        if shutil.which(BINARY) is None:
            raise LabError(f"{BINARY} is not installed (apt install docker-registry; "
                           "install.sh does)")
        self.stop()  # one left behind by an earlier run of ours (pid file)
        if fresh:
            shutil.rmtree(self.root / "data", ignore_errors=True)
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        config = self.root / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log: {level: warn, accesslog: {disabled: true}}\n"
            f"storage: {{filesystem: {{rootdirectory: {self.root / 'data'}}}, "
            "delete: {enabled: true}}\n"
            f"http: {{addr: '{self.address}', secret: {secrets.token_hex(16)}}}\n")
        log = open(self.root / "registry.log", "ab")
        try:
            self.proc = subprocess.Popen([BINARY, "serve", str(config)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        finally:
            log.close()
        (self.root / "pid").write_text(f"{self.proc.pid} {start_time(self.proc.pid)}\n")
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.root / "registry.log").read_text(errors="replace")[-1500:]
                self.stop()
                raise LabError(f"{BINARY} did not answer on {self.address} within "
                               f"{timeout:.0f} s; its log ({self.root / 'registry.log'}):\n{tail}")
            time.sleep(0.1)
        return self

    def answers(self) -> bool:
        """Does GET /v2/ answer 200?"""
        if self.port is None:
            return False
        try:
            with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, timeout: float = 10) -> None:
        """End the registry process this helper started (its PID, checked against its start
        time so a reused PID is never signalled); nothing else is touched."""
        pid_file = self.root / "pid"
        pid, started = None, None
        if self.proc is not None:
            pid = self.proc.pid
        elif pid_file.exists():
            fields = pid_file.read_text().split()
            if len(fields) == 2 and fields[1] != "None":
                pid, started = int(fields[0]), int(fields[1])
        if pid is not None and (self.proc is not None or start_time(pid) == started):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while self._alive(pid, started) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._alive(pid, started):
                os.kill(pid, signal.SIGKILL)
            if self.proc is not None:
                self.proc.wait(timeout=timeout)
        self.proc = None
        pid_file.unlink(missing_ok=True)

    def _alive(self, pid: int, started: int | None) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return start_time(pid) == started

    def __enter__(self) -> Registry:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- images -------------------------------------------------------------------------------

    def push(self, local: str, name: str | None = None) -> str:
        """Tag the local image `local` as ADDRESS/`name` (default: the same REPO:TAG) and push
        it; the digest the registry gave it."""
        target = self.ref(name or local)
        _docker("tag", local, target)
        out = _docker("push", target, timeout=600)
        m = _PUSHED.findall(out)
        if m:
            return m[-1]
        info = json.loads(_docker("image", "inspect", target))[0]
        repo = target.rsplit(":", 1)[0]
        for d in info.get("RepoDigests") or []:
            if d.startswith(repo + "@"):
                return d.split("@", 1)[1]
        raise LabError(f"docker push {target} gave no digest:\n{out}")

    def tags(self, repository: str) -> list[str]:
        """The tags of REPO in the registry ([] when it has none)."""
        try:
            with urllib.request.urlopen(f"http://{self.address}/v2/{repository}/tags/list",
                                        timeout=5) as r:
                return sorted(json.loads(r.read()).get("tags") or [])
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return []
            raise


def _docker(*args: str, timeout: float = 120) -> str:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise LabError(f"docker {' '.join(args)} failed (exit {r.returncode}): "
                       f"{(r.stderr or r.stdout).strip()}")
    return r.stdout
