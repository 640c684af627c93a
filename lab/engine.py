"""The controller's Docker engine (this machine's, for building images): the one that answers
on /var/run/docker.sock, else a dockerd the lab starts (data root .lab/controller/docker) and
stops again at lab-down, removing what it left on the host (exec root, /run/docker, docker0,
its iptables chains and rules). `EngineMixin` is the part of `Lab` that does this.
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

from lab.base import CONTROLLER_SOCKET, LabBase
from lab.network import iptables_rules, undo_docker_iptables
from lab.proc import LabError, adopt, docker_answers, run, start_time, wait_gone, write_text


class EngineMixin(LabBase):
    """A Docker engine on the controller for the image tasks."""

    def ensure_controller_engine(self, timeout: float = 60) -> str:
        """A Docker engine on this machine (the controller) for building images: the one that
        answers on /var/run/docker.sock, else a dockerd started for the lab (data root
        .lab/controller/docker, stopped by lab-down). Returns the DOCKER_HOST URL."""
        url = f"unix://{CONTROLLER_SOCKET}"
        if docker_answers(CONTROLLER_SOCKET):
            return url
        if shutil.which("dockerd") is None:
            raise LabError("no Docker engine answers on /var/run/docker.sock and dockerd is not "
                           "installed: apt-get install docker.io")
        with self._lock():
            if docker_answers(CONTROLLER_SOCKET):
                return url
            d = self.controller_dir
            d.mkdir(parents=True, exist_ok=True)
            exec_root = Path("/run") / f"{self.tag}-dockerd"
            had_docker0 = Path("/sys/class/net/docker0").exists()
            had_run_docker = Path("/run/docker").exists()
            rules_before = iptables_rules()
            logf = open(d / "dockerd.log", "ab")
            # its own config file and identity key: nothing in the host's /etc/docker
            (d / "daemon.json").write_text(json.dumps({"deprecated-key-path":
                                                       str(d / "key.json")}) + "\n")
            argv = ["dockerd", "-H", url, "--config-file", str(d / "daemon.json"),
                    "--data-root", str(d / "docker"), "--exec-root", str(exec_root),
                    "--pidfile", str(d / "dockerd.pid")]
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                 start_new_session=True, close_fds=True)
            logf.close()
            adopt(p)
            write_text(d / "started.json", json.dumps({
                "pid": p.pid, "start": None, "exec_root": str(exec_root),
                "had_docker0": had_docker0, "had_run_docker": had_run_docker,
                "iptables_before": rules_before}))
            end = time.monotonic() + timeout
            while not docker_answers(CONTROLLER_SOCKET):
                if p.poll() is not None or time.monotonic() > end:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
                    raise LabError(f"the lab's dockerd did not answer on {CONTROLLER_SOCKET} "
                                   f"within {timeout:.0f} s; see {d / 'dockerd.log'}")
                time.sleep(0.1)
            rec = json.loads((d / "started.json").read_text())
            rec["start"] = start_time(p.pid)
            write_text(d / "started.json", json.dumps(rec))
            self.log(f"started a Docker engine for the lab on {CONTROLLER_SOCKET} "
                     f"(data root {d / 'docker'}); lab-down stops it")
            return url

    def stop_controller_engine(self, timeout: float = 30) -> bool:
        """Stop the controller dockerd if (and only if) the lab started it."""
        marker = self.controller_dir / "started.json"
        try:
            rec = json.loads(marker.read_text())
        except (OSError, ValueError):
            return False
        pid = rec.get("pid")
        if pid and rec.get("start") is not None and start_time(pid) == rec["start"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not wait_gone(pid, timeout):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_gone(pid, 5)
        # what that dockerd left on the host: its exec root, /run/docker (plugin sockets dir),
        # the docker0 bridge and its iptables chains and rules (and FORWARD policy DROP)
        shutil.rmtree(rec.get("exec_root") or "/nonexistent", ignore_errors=True)
        if not rec.get("had_run_docker") and Path("/run/docker").exists():
            for d, _, _ in sorted(os.walk("/run/docker"), key=lambda t: -t[0].count("/")):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
        if not rec.get("had_docker0") and Path("/sys/class/net/docker0").exists():
            run(["ip", "link", "del", "docker0"], check=False)
        if "iptables_before" in rec:
            undo_docker_iptables(rec["iptables_before"])
        marker.unlink(missing_ok=True)
        self.log("stopped the lab's Docker engine")
        return True

    def _controller_engine_state(self) -> str | None:
        marker = self.controller_dir / "started.json"
        if marker.exists():
            return "lab"
        return "host" if docker_answers(CONTROLLER_SOCKET, timeout=0.5) else None
