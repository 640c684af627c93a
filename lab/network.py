"""Host networking of the lab: the bridge the nodes' veths hang on (with the bridge's address,
the nodes' gateway), the iptables FORWARD rule that lets traffic cross it (Docker's FORWARD policy
is DROP), and undoing what a lab-started dockerd added to iptables. `NetworkMixin` is the part of
`Lab` that does this.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from lab.base import LabBase
from lab.proc import run


class NetworkMixin(LabBase):
    """The lab's bridge and FORWARD rule on the host."""

    def _bridge_present(self) -> bool:
        return Path(f"/sys/class/net/{self.bridge}/bridge").exists()

    def _ensure_bridge(self) -> None:
        if not self._bridge_present():
            run(["ip", "link", "add", self.bridge, "address", self._mac(0, str(self.gateway)),
                 "type", "bridge"])
        addrs = run(["ip", "-o", "-4", "addr", "show", "dev", self.bridge]).stdout
        if f" {self.gateway}/24 " not in addrs:
            run(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])
        if not self._forward_rule_present():
            run(["iptables", "-w", "-I", "FORWARD", "1", *self._forward_rule()])

    def _forward_rule(self) -> list[str]:
        return ["-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT", "-m", "comment",
                "--comment", self.tag]

    def _forward_rule_present(self) -> bool:
        return run(["iptables", "-w", "-C", "FORWARD", *self._forward_rule()],
                   check=False).returncode == 0

    def _remove_forward_rule(self) -> None:
        while self._forward_rule_present():
            run(["iptables", "-w", "-D", "FORWARD", *self._forward_rule()])

    def _remove_bridge(self) -> None:
        if Path(f"/sys/class/net/{self.bridge}").exists():
            run(["ip", "link", "del", self.bridge])


def iptables_rules() -> dict[str, list[str]]:
    """`iptables -S` of the filter and nat tables."""
    return {t: run(["iptables", "-w", "-t", t, "-S"], check=False).stdout.splitlines()
            for t in ("filter", "nat")}


def undo_docker_iptables(before: dict[str, list[str]]) -> None:
    """Remove the chains and rules a (lab-started) dockerd added since `before`, and put back a
    policy it changed (Docker sets FORWARD to DROP). Rules of others are left alone."""
    for table, old_lines in before.items():
        old = set(old_lines)
        now = iptables_rules()[table]
        new_chains = [x.split()[1] for x in now if x.startswith("-N ") and x not in old]
        for line in reversed(now):
            if line.startswith("-A ") and line not in old and "docker" in line.lower():
                run(["iptables", "-w", "-t", table, "-D", *shlex.split(line)[1:]], check=False)
        for chain in new_chains:
            run(["iptables", "-w", "-t", table, "-F", chain], check=False)
        for chain in new_chains:
            run(["iptables", "-w", "-t", table, "-X", chain], check=False)
        for line in old_lines:
            if line.startswith("-P ") and line not in now:
                run(["iptables", "-w", "-t", table, *shlex.split(line)], check=False)
