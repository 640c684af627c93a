"""The VIP: a virtual IPv4 address (keepalived, VRRP) that follows Mosquitto within seconds.

Sensors that cannot follow a moved broker by name (ESPHome and Tasmota keep a resolved address
until they reboot) point at `vip.address`. Every node runs keepalived with the same VRRP
instance; a check script finds out whether Mosquitto answers *on this node*, and adds weight to
the node's priority when it does, so the node running Mosquitto holds the address. After that
node dies, the others elect a holder within ~3 advert intervals (1 s each); once swarm has
started Mosquitto elsewhere, that node's check succeeds and it takes the address over (preempt).
The Avahi name (tasks/avahi.py) stays as it is, beside it.

    keepalived.conf   /etc/keepalived/keepalived.conf on every node, rendered per node from
                      stack/keepalived.conf.j2: unicast adverts to the other nodes' addresses
                      (multicast with vip.unicast: false), advert_int 1, priority 100 - index,
                      check weight +50.
    check script      /etc/keepalived/haswarm-mqtt-check (0755 root). Host publish mode: a
                      listener on the MQTT port on this node (docker-proxy: only the node running
                      the task has one), else an MQTT CONNECT to the node's own address answered
                      by a CONNACK. Ingress mode (every node answers on the port): a running,
                      not unhealthy Mosquitto container of the stack on this node.
    keepalived        systemd (a Pi): `systemctl enable keepalived`, started or reloaded. No
                      systemd (the lab): started directly (`keepalived -n ... &`, pid file
                      /run/keepalived.pid, log /var/log/haswarm-keepalived.log) and
                      /etc/cron.d/haswarm-keepalived starts it at boot (and every minute if it
                      is not running).

clean: keepalived stopped (and disabled under systemd), the three files removed; only a
keepalived.conf that haswarm wrote (marker line) is touched. With no `vip.address` in the
cluster file, setup does the same (no VIP wanted: none left behind).

As every step (tasks/ops.py): one command reads a node's facts (`facts_command`, parsed by
`parse_facts`), a pure plan turns them into Ops (`plan_setup`, `plan_remove`), `apply_ops`
does them, or only says them in a dry run ("nothing to do" on a converged node).

The task checks at the end that exactly one node holds the address and that an MQTT client
gets a CONNACK through it from this computer.
"""

from __future__ import annotations

import hashlib
import ipaddress
import shlex
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tasks.config import Cluster, Node
from tasks.config_rules import vip_problems
from tasks.errors import HaswarmError
from tasks.ops import Op, StepError, apply_ops, on_nodes, say
from tasks.remote import key_values
from tasks.service import SYSTEMD

if TYPE_CHECKING:
    from tasks.remote import Remote

CONF = "/etc/keepalived/keepalived.conf"
CHECK = "/etc/keepalived/haswarm-mqtt-check"
CRON = "/etc/cron.d/haswarm-keepalived"
PIDFILE = "/run/keepalived.pid"
VRRP_PIDFILE = "/run/keepalived_vrrp.pid"
LOG = "/var/log/haswarm-keepalived.log"
OWNER = "root:root"  # of the three files
MARKER = "# haswarm: keepalived for the cluster VIP (written by `doit vip`)"
TEMPLATE = "keepalived.conf.j2"
WEIGHT = 50
BASE_PRIORITY = 100
ADVERT_INT = 1
# Seconds to wait at the end of setup for one holder that answers MQTT.
SETTLE_TIMEOUT = 30.0
# Bumped when the check script or the start commands change (re-runs the step).
CHECK_VERSION = 1

KEEPALIVED_ARGS = (f"--dont-fork --vrrp --no-syslog --log-console -f {CONF} -p {PIDFILE} "
                   f"-r {VRRP_PIDFILE}")
RUNNING = (f"{{ [ -e {PIDFILE} ] && kill -0 \"$(cat {PIDFILE})\" 2>/dev/null; }}")
# Start directly, in its own session, output to the log (no systemd).
START_DIRECT = f"setsid keepalived {KEEPALIVED_ARGS} </dev/null >>{LOG} 2>&1 &"


class VIPError(HaswarmError):
    """The VIP cannot be set up as asked; str() says why and what to do."""


# ---------------------------------------------------------------------------------------------
# What goes on a node (pure)


def node_ip(node: Node) -> str:
    """The node's IPv4 address (a host name in the cluster file is resolved here)."""
    try:
        return str(ipaddress.IPv4Address(node.address))
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(node.address, None, socket.AF_INET)[0][4][0]
    except (socket.gaierror, IndexError) as e:
        raise VIPError(f"{node.name}: cannot resolve {node.address!r} to an IPv4 address "
                       f"({e}); keepalived needs the nodes' IP addresses") from None


def validate(c: Cluster, ips: dict[str, str]) -> None:
    """The VIP must not be a node's own address and must fit the nodes' network (the cluster
    file's check again, now with host names resolved: `ips`)."""
    vip = c.vip.address
    if vip is None:
        return
    problems = vip_problems(vip, c.vip.prefix_length, ips)
    if problems:
        raise VIPError("vip.address " + "; ".join(problems))


def context(c: Cluster, node: Node, ips: dict[str, str]) -> dict[str, Any]:
    """Values for stack/keepalived.conf.j2 on `node` (`ips`: node name -> IPv4)."""
    index = c.names.index(node.name)
    return {
        "marker": MARKER,
        "name": c.name,
        "node": node.name,
        "router_name": f"{c.name}-{node.name}",
        "instance": f"{c.name.replace('-', '_')}_vip",
        "vip": c.vip.address,
        "interface": c.vip.interface,
        "router_id": c.vip.router_id,
        "priority": BASE_PRIORITY - index,
        "weight": WEIGHT,
        "advert_int": ADVERT_INT,
        "unicast": c.vip.unicast,
        "address": ips[node.name],
        "peers": [ips[n.name] for n in c.nodes if n.name != node.name],
        "check_script": CHECK,
        # the ingress check asks the Docker engine: every 2 s, the port check every second
        "check_interval": 1 if c.swarm.publish_mode == "host" else 2,
        "check_timeout": 2,
        "check_fall": 2,
    }


def render_conf(c: Cluster, node: Node, ips: dict[str, str]) -> str:
    """keepalived.conf for `node`."""
    from tasks.render import environment

    return environment().get_template(TEMPLATE).render(**context(c, node, ips))


# CONNECT, MQTT 3.1.1, clean session, keep-alive 10 s, client id "haswarm-vip-check", no login:
# any CONNACK (even "not authorized") proves a broker answers.
_CONNECT = r"\x10\x1d\x00\x04MQTT\x04\x02\x00\x0a\x00\x11haswarm-vip-check"


def check_script(c: Cluster, node: Node, ips: dict[str, str]) -> str:
    """The vrrp_script for `node` (bash; exit 0 when Mosquitto answers on this node)."""
    port = c.mqtt.port
    if c.swarm.publish_mode == "host":
        body = f"""\
# Host publish mode: the broker runs here when a mosquitto process runs on this node (a
# waiting standby container runs none, though Docker listens on port {port} for it too).
pgrep -x mosquitto >/dev/null || exit 1
# A listener (docker-proxy) is then enough and costs the broker nothing (no connection, no log).
if ss -Hltn 'sport = :{port}' 2>/dev/null | grep -q .; then
    exit 0
fi
# No userland proxy (userland-proxy: false): ask the broker itself for a CONNACK.
exec 3<>/dev/tcp/{ips[node.name]}/{port} || exit 1
printf '{_CONNECT}' >&3
[ "$(timeout 1 head -c 1 <&3 | od -An -tx1 | tr -d ' \\n')" = 20 ]
"""
    else:
        service = shlex.quote(f"label=com.docker.swarm.service.name={c.name}_mosquitto")
        body = f"""\
# Ingress publish mode: every node answers on port {port}; the VIP belongs on the node whose
# Mosquitto container runs (and is not unhealthy).
status=$(docker ps --filter {service} --format '{{{{.Status}}}}' 2>/dev/null) || exit 1
[ -n "$status" ] || exit 1
case $status in *unhealthy*) exit 1 ;; esac
exit 0
"""
    return ("#!/bin/bash\n"
            f"# haswarm (tasks/vip.py): does Mosquitto answer on {node.name}? keepalived's\n"
            "# vrrp_script: exit 0 adds weight to this node's VRRP priority.\n" + body)


def cron_text() -> str:
    """/etc/cron.d/haswarm-keepalived for nodes without systemd (the lab)."""
    start = f"{RUNNING} || {START_DIRECT}"
    return ("# Written by haswarm (tasks/vip.py): keepalived on a node without systemd.\n"
            "SHELL=/bin/sh\n"
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
            f"@reboot root {start}\n"
            f"* * * * * root {start}\n")


def start_command(changed: bool) -> str:
    """Start keepalived (or make it re-read a changed config): systemd, else directly."""
    direct = (f"if {RUNNING}; then "
              + (f"kill -HUP \"$(cat {PIDFILE})\"; " if changed else "true; ")
              + f"else {START_DIRECT} fi")
    systemd = ("systemctl enable keepalived >/dev/null 2>&1; "
               + ("systemctl reload-or-restart keepalived" if changed
                  else "systemctl is-active -q keepalived || systemctl restart keepalived"))
    return (f"if {SYSTEMD}; then {systemd}; else {direct}; fi; "
            "for i in $(seq 50); do "
            f"{{ {RUNNING} || pidof keepalived >/dev/null; }} && exit 0; sleep 0.1; done; "
            f"echo 'keepalived did not start; see {LOG} or journalctl -u keepalived' >&2; exit 1")


STOP = (f"if {SYSTEMD}; then systemctl disable --now keepalived >/dev/null 2>&1 || true; fi; "
        f"if {RUNNING}; then pid=$(cat {PIDFILE}); kill -TERM \"$pid\"; "
        "for i in $(seq 100); do kill -0 \"$pid\" 2>/dev/null || break; sleep 0.1; done; fi; "
        f"rm -f {PIDFILE} {VRRP_PIDFILE}")


def drop_address(address: str) -> str:
    """Remove `address` from every interface of the node that has it (errors ignored)."""
    q = shlex.quote(f"{address}/32")
    return (f"ip -o -4 addr show to {q} | awk '{{print $2}}' | "
            f"while read -r dev; do ip addr del {q} dev \"$dev\"; done; true")


# ---------------------------------------------------------------------------------------------
# Facts: one read per node


def facts_command(interface: str) -> str:
    """Prints key=value lines: keepalived installed, systemd, keepalived running, whose
    keepalived.conf (haswarm | other | none), whether `interface` exists, and for each of CONF,
    CHECK and CRON `PATH=MODE USER GROUP SHA256` (or `PATH=missing`)."""
    return (
        "echo installed=$(command -v keepalived >/dev/null && echo yes || echo no); "
        f"echo systemd=$({SYSTEMD} && echo yes || echo no); "
        f"echo running=$({{ {RUNNING} || pidof keepalived >/dev/null; }} && echo yes || echo no); "
        f"echo conf=$([ -e {CONF} ] && {{ head -n 1 {CONF} | grep -qxF {shlex.quote(MARKER)} "
        "&& echo haswarm || echo other; } || echo none); "
        f"echo interface=$(ip link show dev {shlex.quote(interface)} >/dev/null 2>&1 "
        "&& echo yes || echo no); "
        f"for f in {CONF} {CHECK} {CRON}; do if [ -e \"$f\" ]; then "
        "echo \"$f=$(stat -L -c '%a %U %G' -- \"$f\") $(sha256sum < \"$f\" | cut -d' ' -f1)\"; "
        "else echo \"$f=missing\"; fi; done"
    )


@dataclass(frozen=True)
class VIPFacts:
    """What a node has now (the output of `facts_command`, parsed by `parse_facts`)."""

    installed: bool  # keepalived is installed
    systemd: bool
    running: bool  # keepalived runs
    conf: str  # who wrote keepalived.conf: "haswarm" (the marker line), "other" or "none"
    interface: bool  # vip.interface exists
    # CONF, CHECK and CRON when present: path -> "MODE USER GROUP SHA256" ("644 root root 3a7f...")
    files: dict[str, str] = field(default_factory=dict)


def parse_facts(text: str) -> VIPFacts:
    """The output of `facts_command` -> VIPFacts."""
    kv = key_values(text)
    return VIPFacts(installed=kv.get("installed") == "yes", systemd=kv.get("systemd") == "yes",
                    running=kv.get("running") == "yes", conf=kv.get("conf", "none"),
                    interface=kv.get("interface") == "yes",
                    files={p: kv[p] for p in (CONF, CHECK, CRON)
                           if kv.get(p, "missing") != "missing"})


def read_facts(r: Remote, node: Node, interface: str) -> VIPFacts:
    """`node`'s VIPFacts, in one round trip."""
    return parse_facts(r.run(node, "vip: facts", facts_command(interface)).stdout)


# ---------------------------------------------------------------------------------------------
# Plans (pure): facts -> the Ops that bring a node where it should be


def plan_problems(facts: VIPFacts, iface: str) -> list[str]:
    """Why setup cannot go on on a node (empty: it can)."""
    problems = []
    if not facts.installed:
        problems.append("keepalived is not installed: apt-get install keepalived")
    if facts.conf == "other":
        problems.append(f"{CONF} exists and was not written by haswarm: move it away (or merge "
                        "it by hand and drop the VIP from the cluster file)")
    if not facts.interface:
        problems.append(f"no network interface {iface!r} (vip.interface): see `ip -br link`")
    return problems


def file_state(text: str, mode: int) -> str:
    """What `VIPFacts.files` says of a file holding `text` with `mode`, owned by OWNER."""
    return f"{mode:o} {OWNER.replace(':', ' ')} {hashlib.sha256(text.encode()).hexdigest()}"


def plan_setup(c: Cluster, node: Node, facts: VIPFacts, ips: dict[str, str]) -> list[Op]:
    """Write the files that differ (the cron entry only without systemd), then start keepalived
    or make it re-read them; nothing on a converged node. StepError when the node cannot
    have the VIP."""
    problems = plan_problems(facts, c.vip.interface)
    if problems:
        raise StepError("; ".join(problems))
    wanted = [(CONF, render_conf(c, node, ips), 0o644), (CHECK, check_script(c, node, ips), 0o755)]
    if not facts.systemd:
        wanted.append((CRON, cron_text(), 0o644))
    ops = [Op(f"write {path}", put=(path, text), mode=mode, owner=OWNER)
           for path, text, mode in wanted if facts.files.get(path) != file_state(text, mode)]
    if ops or not facts.running:
        ops.append(Op("reload keepalived" if ops and facts.running else "start keepalived",
                      start_command(changed=bool(ops)), timeout=60,
                      hint=f"see {LOG} (or journalctl -u keepalived) on the node; "
                           f"`keepalived -t -f {CONF}` checks the config"))
    return ops


def plan_remove(c: Cluster, node: Node, facts: VIPFacts) -> list[Op]:
    """Stop keepalived, remove haswarm's files and drop the VIP from the node's interfaces.
    Someone else's keepalived.conf (and their keepalived) is left alone; haswarm's other files
    still go."""
    ours = facts.conf == "haswarm"
    files = [p for p in (CONF, CHECK, CRON) if p in facts.files and (p != CONF or ours)]
    if not files:
        return []
    remove_files = Op(f"remove {', '.join(files)}", "rm -f " + " ".join(files))
    if facts.conf == "other":
        return [remove_files]
    ops = []
    if facts.running or ours:
        ops.append(Op("stop keepalived", STOP, timeout=60))
    ops.append(remove_files)
    if c.vip.address:
        ops.append(Op(f"drop the address {c.vip.address}", drop_address(c.vip.address)))
    return ops


# ---------------------------------------------------------------------------------------------
# Steps


def setup(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """keepalived with the VIP on every node; then one holder that answers MQTT."""
    if c.vip.address is None:
        say(c.nodes[0], "vip: no vip.address in the cluster file: "
                        + ("haswarm's keepalived must be absent" if dryrun
                           else "removing haswarm's keepalived (if any)"))
        remove(c, r, dryrun=dryrun)
        return {"vip": None}
    ips = {n.name: node_ip(n) for n in c.nodes}
    validate(c, ips)

    def one(node: Node) -> bool:
        with r.reading():
            facts = read_facts(r, node, c.vip.interface)
        ops = plan_setup(c, node, facts, ips)
        apply_ops(r, node, "vip", ops, dryrun=dryrun)
        return any(op.put is not None for op in ops)

    changed = on_nodes(r, "vip", one)
    if dryrun:
        return {}
    holder = wait_holder(c, r, SETTLE_TIMEOUT)
    say(holder, f"vip: {c.vip.address} held by {holder}; MQTT answers through it")
    return {"vip": c.vip.address, "holder": holder,
            "changed": sorted(n for n, ch in changed.items() if ch)}


def holders(c: Cluster, r: Remote) -> list[str]:
    """Nodes that have the VIP on their interface (unreachable ones are not asked)."""
    from tasks.remote import RemoteError

    vip = shlex.quote(f"{c.vip.address}/32")

    def one(node: Node) -> bool:
        try:
            return bool(r.run(node, "vip: holder", f"ip -o -4 addr show to {vip}",
                              check=False, timeout=15).stdout.strip())
        except RemoteError:
            return False

    return [name for name, has in r.on_all("vip: holder", one).items() if has]


def wait_holder(c: Cluster, r: Remote, timeout: float) -> str:
    """Wait until exactly one node holds the VIP and an MQTT client gets a CONNACK through
    it from here; its name. VIPError after `timeout`."""
    from tasks.mqtt_probe import mqtt_connack

    assert c.vip.address is not None
    deadline = time.monotonic() + timeout
    while True:
        held = holders(c, r)
        answer = mqtt_connack(c.vip.address, c.mqtt.port) if len(held) == 1 else None
        if len(held) == 1 and answer is not None:
            return held[0]
        if time.monotonic() > deadline:
            what = (f"held by {', '.join(held)}" if held else "held by no node")
            raise VIPError(
                f"vip {c.vip.address}: {what}" + (
                    f"; no MQTT answer through it on port {c.mqtt.port} from this computer"
                    if len(held) == 1 else "")
                + f" after {timeout:g} s. Look at {LOG} (or journalctl -u keepalived) on the "
                "nodes; is Mosquitto running (`doit status`)? Is this computer on the same "
                "network as the VIP?")
        time.sleep(1)


def remove(c: Cluster, r: Remote, dryrun: bool) -> None:
    """Stop keepalived and remove haswarm's files on every node that answers."""

    def one(node: Node) -> None:
        with r.reading():
            facts = read_facts(r, node, c.vip.interface)
        if facts.conf == "other":
            say(node, f"vip: {CONF} is not haswarm's: left alone")
        apply_ops(r, node, "vip", plan_remove(c, node, facts), dryrun=dryrun)

    on_nodes(r, "vip (clean)", one)


# ---------------------------------------------------------------------------------------------
# doit


def task_vip() -> dict[str, Any]:
    """VIP (keepalived, VRRP) that follows Mosquitto; no-op without vip.address."""
    from tasks.config import current
    from tasks.ops import remote_task
    from tasks.render import TEMPLATES

    c = current()

    def run_setup(cl: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
        try:
            return setup(cl, r, dryrun)
        except VIPError as e:
            raise StepError(str(e)) from None

    run_setup.__name__ = "setup"
    remove.__name__ = "remove"
    doc = (f"VIP {c.vip.address} on {c.vip.interface} follows Mosquitto (keepalived)"
           if c.vip.address else "VIP: none configured (vip.address); removes haswarm's "
           "keepalived if present")
    task = remote_task(c, "vip", None, doc, run_setup, remove,
                       file_dep=[str(TEMPLATES / TEMPLATE)], task_dep=["stack"])
    task["doc"] = doc
    return task
