"""The nodes' firewall: the cluster's internal ports answer only the nodes.

A home LAN carries guests' phones and rarely patched IoT devices. Without this, any of them
reaches glusterd and the bricks (and so can mount the volume that holds Home Assistant's tokens
and the database password), swarm's gossip, and the overlay's VXLAN port, where it can inject
packets into the backend network. Each node gets an iptables chain, jumped to first from INPUT,
that lets these ports answer only the node addresses and the node's own containers; SSH, Home
Assistant, MQTT, mDNS and VRRP stay open (their own logins and checks guard them).

    firewall:script  /usr/local/sbin/haswarm-firewall (rendered, 0755) and
                     /etc/cron.d/haswarm-firewall (loads it at boot)   clean: removed
    firewall:rules   the chain loaded (atomically, iptables-restore) when its rules' id
                     differs from the rendered one, or the jump is missing
                                                   clean: jump and chain removed
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import shlex
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tasks import render
from tasks.config import Cluster, Node, current
from tasks.ops import Op, apply_ops, on_nodes, remote_task, say

if TYPE_CHECKING:
    from tasks.remote import Remote

CHAIN = "HASWARM-IN"
SCRIPT = "/usr/local/sbin/haswarm-firewall"
CRON_FILE = "/etc/cron.d/haswarm-firewall"
# swarm management (2377) and gossip (7946), glusterd (24007, 24008); bricks take ports from
# 49152 up (glusterd.vol's base-port .. max-port); the overlay's VXLAN (4789), gossip (7946).
TCP_PORTS = "2377,7946,24007,24008"
BRICK_PORTS = "49152:60999"
UDP_PORTS = "4789,7946"
# The node's own containers reach its ports through these (Home Assistant's and Mosquitto's lock
# keepers probe every node's glusterd, their own included).
TRUSTED_INTERFACES = ("lo", "docker0", "docker_gwbridge", "br-+")


def context(c: Cluster) -> dict[str, Any]:
    """The template's context: the rules' parts and an id that changes when they do."""
    v4, v6 = [], []
    for n in c.nodes:
        try:
            (v6 if ipaddress.ip_address(n.address).version == 6 else v4).append(n.address)
        except ValueError:
            v4.append(n.address)            # a host name: iptables resolves it when loading
    parts = {"node_v4": v4, "node_v6": v6, "tcp_ports": TCP_PORTS, "brick_ports": BRICK_PORTS,
             "udp_ports": UDP_PORTS, "trusted_interfaces": list(TRUSTED_INTERFACES),
             "chain": CHAIN}
    rules_id = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return {**parts, "name": c.name, "node_addresses": [n.address for n in c.nodes],
            "rules_id": rules_id}


def script_text(c: Cluster) -> str:
    """The rules' script, rendered from stack/haswarm-firewall.sh.j2."""
    return render.environment().get_template("haswarm-firewall.sh.j2").render(**context(c))


def cron_text() -> str:
    """The cron file that loads the rules at boot (they live in the kernel only)."""
    return ("# Written by haswarm (tasks/firewall.py): the cluster's firewall rules at boot.\n"
            "SHELL=/bin/sh\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
            f"@reboot root {SCRIPT} >/dev/null 2>&1\n")


FACTS_COMMAND = (f"iptables -w -S {CHAIN} 2>/dev/null | sed -n 's/.*haswarm-rules \\([0-9a-f]*\\).*"
                 "/rules=\\1/p'; "
                 f"iptables -w -C INPUT -j {CHAIN} 2>/dev/null && echo jump=yes || echo jump=no; "
                 f"[ -e {shlex.quote(SCRIPT)} ] && echo script=yes || echo script=no")


def parse_facts(text: str) -> tuple[str | None, bool, bool]:
    """(the loaded rules' id or None, whether INPUT jumps to the chain, whether the script is
    there) from FACTS_COMMAND."""
    kv = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return kv.get("rules") or None, kv.get("jump") == "yes", kv.get("script") == "yes"


def plan_rules(c: Cluster, loaded: str | None, jump: bool) -> list[Op]:
    """Load the rules when another set (or none) is loaded, or INPUT does not jump to them."""
    want = context(c)["rules_id"]
    if loaded == want and jump:
        return []
    why = "not loaded" if loaded is None else "changed" if loaded != want else "not jumped to"
    return [Op(f"load the firewall rules ({why}): chain {CHAIN}", shlex.quote(SCRIPT),
               hint=f"run {SCRIPT} on the node to see iptables' message")]


def plan_rules_clean(loaded: str | None, jump: bool, script_present: bool) -> list[Op]:
    """Remove the jump and the chain (with the script while it is there), then the files."""
    ops = []
    if loaded is not None or jump:
        cmd = f"{shlex.quote(SCRIPT)} remove" if script_present else \
            (f"while iptables -w -D INPUT -j {CHAIN} 2>/dev/null; do :; done; "
             f"iptables -w -F {CHAIN} 2>/dev/null; iptables -w -X {CHAIN} 2>/dev/null; true")
        ops.append(Op(f"remove the firewall chain {CHAIN}", cmd))
    if script_present:
        ops.append(Op(f"remove {SCRIPT} and {CRON_FILE}",
                      f"rm -f {shlex.quote(SCRIPT)} {shlex.quote(CRON_FILE)}"))
    return ops


def _facts(r: Remote, node: Node, step: str) -> tuple[str | None, bool, bool]:
    return parse_facts(r.run(node, step, FACTS_COMMAND, check=False).stdout)


def setup_script(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """The rules' script and its boot-time cron file on every node (firewall.enabled)."""
    step = "firewall:script"
    if not c.firewall.enabled:
        print(f"{step}: firewall.enabled is false (firewall:rules removes it)", flush=True)
        return {"changed": []}
    script = script_text(c)

    def one(node: Node) -> bool:
        changed = [path for path, text, mode in ((SCRIPT, script, 0o755),
                                                 (CRON_FILE, cron_text(), 0o644))
                   if r.put(node, step, text, path, mode=mode, owner="root:root", dryrun=dryrun)]
        say(node, f"{step}: {'would write' if dryrun else 'wrote'} {', '.join(changed)}"
            if changed else f"{step}: nothing to do")
        return bool(changed)

    return {"changed": sorted(n for n, ch in on_nodes(r, step, one).items() if ch)}


def setup_rules(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """The chain loaded on every node where its rules differ or are missing; removed
    everywhere when firewall.enabled is false."""
    step = "firewall:rules"

    def one(node: Node) -> bool:
        with r.reading():
            loaded, jump, script = _facts(r, node, step)
        ops = plan_rules(c, loaded, jump) if c.firewall.enabled else \
            plan_rules_clean(loaded, jump, script)
        return apply_ops(r, node, step, ops, dryrun=dryrun)

    return {"changed": sorted(n for n, ch in on_nodes(r, step, one).items() if ch)}


def clean_rules(c: Cluster, r: Remote, dryrun: bool) -> None:
    """Every node's chain, jump, script and cron file removed."""
    step = "firewall:rules (clean)"

    def one(node: Node) -> None:
        apply_ops(r, node, step, plan_rules_clean(*_facts(r, node, step)), dryrun=dryrun)

    on_nodes(r, step, one)


def clean_script(c: Cluster, r: Remote, dryrun: bool) -> None:
    """Nothing of its own: `firewall:rules`' clean removes the files with the chain (the
    script is what removes the chain, so it goes last)."""


def task_firewall() -> Iterator[dict[str, Any]]:
    """The nodes' firewall: the cluster's internal ports answer only the nodes."""
    c = current()
    yield remote_task(c, "firewall-script", "script",
                      f"{SCRIPT} and its boot-time cron file on every node",
                      setup_script, clean_script)
    yield remote_task(c, "firewall-rules", "rules",
                      f"chain {CHAIN}: swarm, Gluster and VXLAN ports only for the nodes",
                      setup_rules, clean_rules, task_dep=["firewall:script"])
