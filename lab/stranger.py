"""A stranger on the lab's LAN: a host that is not a node (a guest's phone, a cheap IoT device),
as the attacker of the hardening tests. It is a network namespace with one veth on the lab bridge
and the address `.250` of the lab's subnet, nothing else: commands run in it with the host's
files and tools (`mount.glusterfs`, `nc`, `mosquitto_pub`), as a stranger with root on its own
machine would have them.

  with Stranger(lab) as s:
      s.run("nc -z -w 2 10.77.0.11 3306")     # CompletedProcess; never raises on failure
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from lab.base import NETNS_DIR, LabBase
from lab.proc import run

HOST_NUMBER = 250      # the stranger's address in the lab's /24


class Stranger:
    """A namespace on the lab bridge that is not a node; `up()`/`down()` or a `with` block."""

    def __init__(self, lab: LabBase) -> None:
        self.lab = lab
        self.name = f"{lab.bridge}-stranger"          # netns pin and veth: outside the nodes'
        self.veth = f"{lab.bridge}-str"[:15]          # name prefixes (never taken for a node)
        self.pin = NETNS_DIR / self.name
        self.address = str(lab.network.network_address + HOST_NUMBER)

    def up(self) -> Stranger:
        """Create the namespace and its link (the leftovers of an earlier run first)."""
        self.down()
        NETNS_DIR.mkdir(parents=True, exist_ok=True)
        self.pin.touch()
        run(["unshare", f"--net={self.pin}", "true"])
        mac = self.lab._mac(2, self.address)
        run(["ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0",
             "address", mac, "netns", self.name])
        run(["ip", "link", "set", self.veth, "master", self.lab.bridge, "up"])
        for argv in (["addr", "add", f"{self.address}/24", "dev", "eth0"],
                     ["link", "set", "lo", "up"], ["link", "set", "eth0", "up"]):
            run(["ip", "-n", self.name, *argv])
        return self

    def down(self) -> None:
        """Remove the link and the namespace (nothing if absent)."""
        if Path(f"/sys/class/net/{self.veth}").exists():
            run(["ip", "link", "del", self.veth], check=False)
        if self.pin.exists():
            run(["umount", "-l", str(self.pin)], check=False)
            self.pin.unlink(missing_ok=True)

    def run(self, cmd: str, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess:
        """`sh -c cmd` in the stranger's network namespace; stdout and stderr together."""
        return subprocess.run(["nsenter", f"--net={self.pin}", "sh", "-c", cmd], input=input,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def __enter__(self) -> Stranger:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

