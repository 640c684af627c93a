"""Rules of the cluster file as plain functions of plain values: paths on the nodes, a cron-safe
command line (both raise ValueError, called from `tasks.config`'s validators), and the parts of
its cross-field checks that deal with nodes, addresses and ports (they return problems).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath


def matching(v: str, pattern: str, what: str) -> str:
    """`v` if it matches `pattern` whole; else the validation error "'v' is not WHAT"."""
    if not re.fullmatch(pattern, v):
        raise ValueError(f"{v!r} is not {what}")
    return v


# ---------------------------------------------------------------------------------------------
# Paths on the nodes (brick dir, mount point)

# Trees of the operating system: a brick or mount point there, or above one, would hide or (with
# `purge=yes clean`, which removes the bricks) destroy the system's files. /tmp and /run are
# emptied at boot. Nothing of haswarm goes inside these.
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
                "/run", "/sbin", "/sys", "/tmp", "/usr", "/var/lib/docker", "/var/lib/glusterd",
                "/var/run", "/var/tmp")
# Shared directories: haswarm's may sit below them, never be one of them or above one.
SYSTEM_DIRS = ("/", "/home", "/media", "/mnt", "/opt", "/root", "/srv", "/var", "/var/backups",
               "/var/cache", "/var/lib", "/var/local", "/var/log", "/var/mail", "/var/opt",
               "/var/spool")
_SAFE_PATH = r"/[A-Za-z0-9._/-]*"


def node_path(v: Path) -> Path:
    """`v` if it is a safe absolute path on a node for a directory of haswarm's own: letters,
    digits and `._-/` only (it goes into fstab, shell commands and the stack file), no `..`,
    not in, equal to or above a directory of the operating system (SYSTEM_TREES, SYSTEM_DIRS).
    """
    text = str(v)
    matching(text, _SAFE_PATH, "an absolute path of letters, digits and '._-/' (no spaces, "
                               "quotes or other characters)")
    if ".." in v.parts:
        raise ValueError(f"{text!r} must not contain '..'")
    p = PurePosixPath(text)
    own = "choose a directory of its own, e.g. below /srv or /mnt"
    for tree in SYSTEM_TREES:
        if p.is_relative_to(tree):
            where = "is" if text == tree else f"is inside {tree},"
            raise ValueError(f"{text!r} {where} a directory of the operating system: {own}")
    if text in SYSTEM_DIRS:
        raise ValueError(f"{text!r} is a directory shared with the operating system (`doit "
                         "purge=yes clean` removes the brick dir): choose a directory of its "
                         f"own below it, e.g. {text.rstrip('/')}/haswarm")
    for d in (*SYSTEM_TREES, *SYSTEM_DIRS):
        if PurePosixPath(d).is_relative_to(p):
            raise ValueError(f"{text!r} holds the system directory {d}: {own}")
    return v


# ---------------------------------------------------------------------------------------------
# Free text run by root


def cron_command(v: str) -> str:
    """`v` if it is one non-empty command line that cron runs as written: no newline or other
    control character, no `%` (cron turns it into a newline and feeds the rest as stdin)."""
    if not v.strip():
        raise ValueError("is empty: give the command that restarts Avahi")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in v):
        raise ValueError(f"{v!r} holds a newline or another control character: one line "
                         "only (it runs from cron, as root, on every node)")
    if "%" in v:
        raise ValueError(f"{v!r} holds '%', which cron turns into a newline: leave it out "
                         "(or put the command in a script and give the script's path)")
    return v


# ---------------------------------------------------------------------------------------------
# Nodes and addresses


def is_ip(address: str) -> bool:
    """`address` is an IP address (not a host name)."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _canonical(address: str) -> str:
    """One spelling per address: an IP in its compressed form, a host name in lower case."""
    if is_ip(address):
        return str(ipaddress.ip_address(address))
    return address.lower().rstrip(".")


def nodes_listed_twice(nodes: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One node listed twice among `nodes` ((name, address) in the file's order): the same
    name, the same address (however spelled), or one entry's address naming another entry's
    node (`pi1`, `pi1.local`: the same Pi by its name and by its IP). Host names that resolve
    to a listed IP are caught by preflight (the same Docker engine ID twice). Returns (YAML
    path, problem) pairs."""
    problems: list[tuple[str, str]] = []
    seen_names: dict[str, int] = {}
    seen_addrs: dict[str, int] = {}
    for i, (name, address) in enumerate(nodes):
        if name in seen_names:
            first = seen_names[name]
            problems.append((f"nodes[{i}].name",
                             f"duplicate node name {name!r} (also nodes[{first}])"))
        seen_names.setdefault(name, i)
        addr = _canonical(address)
        if addr in seen_addrs:
            first = seen_addrs[addr]
            problems.append((f"nodes[{i}].address",
                             f"duplicate address {address!r} (also nodes[{first}])"))
        seen_addrs.setdefault(addr, i)
    for i, (_, address) in enumerate(nodes):
        if is_ip(address):
            continue
        label = _canonical(address).split(".")[0]
        for j, (other, other_address) in enumerate(nodes):
            if j != i and other == label:
                problems.append((f"nodes[{i}].address",
                                 f"{address!r} names the node {other!r} (nodes[{j}], at "
                                 f"{other_address}): the same node listed twice? List each "
                                 "node once"))
    return problems


def vip_problems(vip: str, prefix_length: int, addresses: dict[str, str]) -> list[str]:
    """Why `vip` cannot be the cluster's virtual address, given the nodes' IP `addresses`
    (node name -> IP; host names left out): a node's own address, the network's own or
    broadcast address, or a network that is not the nodes'."""
    net = ipaddress.ip_network(f"{vip}/{prefix_length}", strict=False)
    ip = ipaddress.ip_address(vip)
    problems = []
    if ip in (net.network_address, net.broadcast_address):
        problems.append(f"{vip} is the {'network' if ip == net.network_address else 'broadcast'}"
                        f" address of {net} (vip.prefix_length {prefix_length}): choose a host "
                        "address")
    for name, address in addresses.items():
        if ipaddress.ip_address(address) == ip:
            problems.append(f"{vip} is {name}'s own address: choose a free address in the same "
                            "network (outside your router's DHCP range)")
        elif ipaddress.ip_address(address) not in net:
            problems.append(f"{vip} is not in the nodes' network: {name} is at {address}, "
                            f"outside {net} (vip.prefix_length {prefix_length}); sensors on "
                            "the LAN could not reach it")
    return problems


# ---------------------------------------------------------------------------------------------
# Published ports

# Ports the nodes' own daemons listen on: a service published there would not start.
NODE_PORTS = {2377: "swarm's control plane", 7946: "swarm's gossip", 24007: "glusterd",
              24008: "glusterd"}
GLUSTER_BRICK_PORTS = range(49152, 61000)  # glusterd gives its bricks ports from here


def port_clashes(published: list[tuple[str, int]],
                 ssh_ports: Iterable[int]) -> list[tuple[str, str]]:
    """Two services published on one port, or a service on a port of the nodes' daemons
    (`published`: (YAML path, port) in the file's order; `ssh_ports`: every node's)."""
    taken = dict(NODE_PORTS) | {port: "SSH" for port in ssh_ports}
    problems: list[tuple[str, str]] = []
    first: dict[int, str] = {}
    for where, port in published:
        if port in first:
            problems.append((where, f"port {port} is also {first[port]}: two services cannot "
                                    "be published on one port"))
        elif port in taken:
            problems.append((where, f"port {port} is used by {taken[port]} on the nodes"))
        elif port in GLUSTER_BRICK_PORTS:
            bricks = f"{GLUSTER_BRICK_PORTS.start}-{GLUSTER_BRICK_PORTS.stop - 1}"
            problems.append((where, f"port {port} is in the range glusterd gives its bricks "
                                    f"({bricks})"))
        first.setdefault(port, where)
    return problems
