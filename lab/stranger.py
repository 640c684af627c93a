"""A stranger on the lab's LAN: a host that is not a node (a guest's phone, a cheap IoT device),
as the attacker of the hardening tests. It is a network namespace with one veth on the lab bridge
and the address `.250` of the lab's subnet, nothing else: commands run in it with the host's
files and tools (`mount.glusterfs`, `nc`, `mosquitto_pub`), as a stranger with root on its own
machine would have them.

  with Stranger(lab) as s:
      s.run("nc -z -w 2 10.77.0.11 3306")     # CompletedProcess; never raises on failure
"""

from __future__ import annotations

import ipaddress
import struct
import subprocess
import sys
from pathlib import Path

from lab.base import NETNS_DIR, LabBase
from lab.proc import run

HOST_NUMBER = 250      # the stranger's address in the lab's /24


class Stranger:
    """A namespace on the lab bridge that is not a node; `up()`/`down()` or a `with` block.
    `role` and `host` make another such host (a sensor: `Stranger(lab, "sensor", 251)`)."""

    def __init__(self, lab: LabBase, role: str = "stranger", host: int = HOST_NUMBER) -> None:
        self.lab = lab
        self.name = f"{lab.bridge}-{role}"            # netns pin and veth: outside the nodes'
        self.veth = f"{lab.bridge}-{role[:3]}"[:15]   # name prefixes (never taken for a node)
        self.pin = NETNS_DIR / self.name
        self.address = str(lab.network.network_address + host)

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




def vrrp_advert(router_id: int, priority: int, address: str) -> bytes:
    """A VRRPv2 advertisement (RFC 3768) for one virtual address, no authentication."""
    body = struct.pack("!BBBBBBH", 0x21, router_id, priority, 1, 0, 1, 0) \
        + ipaddress.IPv4Address(address).packed + bytes(8)
    total = sum(struct.unpack(f"!{len(body) // 2}H", body))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return body[:6] + struct.pack("!H", ~total & 0xFFFF) + body[8:]


# Sends adverts from inside the stranger's namespace: Python run there with the packet on stdin.
_SEND = """
import socket, sys, time
packet, peers, seconds = sys.stdin.buffer.read(), sys.argv[1].split(","), float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 112)  # IP protocol 112: VRRP
s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 255)   # VRRP wants TTL 255
end = time.monotonic() + seconds
while time.monotonic() < end:
    for peer in peers:
        s.sendto(packet, (peer, 0))
    time.sleep(0.5)
"""


def announce_vip(stranger: Stranger, router_id: int, address: str, peers: list[str],
                 seconds: float) -> subprocess.CompletedProcess:
    """Claim `address` from the stranger: VRRP adverts with the highest priority (255, the
    address owner's) to every peer, every 0.5 s for `seconds`. The address itself is never
    configured on the stranger (no ARP), so only the nodes' reaction is tested."""
    return subprocess.run(["nsenter", f"--net={stranger.pin}", sys.executable, "-c", _SEND,
                           ",".join(peers), str(seconds)],
                          input=vrrp_advert(router_id, 255, address), capture_output=True,
                          timeout=seconds + 30)
