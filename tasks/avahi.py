"""Avahi (mDNS): one shared name for the cluster, handed to a live node.

Every node announces the same host name (`mdns.name`, e.g. hacluster.local); Avahi lets only one
hold it (the others rename themselves NAME-2, ...). With `mdns.restart_cron`, a cron entry
restarts Avahi every minute on every node, so within a minute after the holder dies a live node
takes the name over: sensors that find the MQTT broker by that name follow it.

    avahi:hostname  `host-name=NAME` in the [server] section of /etc/avahi/avahi-daemon.conf,
                    the original line kept beside it as a comment; Avahi restarted only when
                    the file changed.                  clean: the original line back, restart
    avahi:cron      /etc/cron.d/haswarm-avahi (0644 root) from the rendered file, or absent
                    when restart_cron is false.        clean: removed
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tasks import render
from tasks.config import Cluster, Node, current
from tasks.ops import Op, StepError, apply_ops, on_nodes, put_on_nodes, remote_task

if TYPE_CHECKING:
    from tasks.remote import Remote

AVAHI_CONF = "/etc/avahi/avahi-daemon.conf"
CRON_FILE = "/etc/cron.d/haswarm-avahi"
# Marks haswarm's host-name line; the rest of the marker line is the original line it replaced
# (empty when there was none). The line right below the marker is haswarm's.
MARKER = "#haswarm-original-line:"

_SECTION = re.compile(r"^\s*\[([^\]]*)\]\s*$")
_ACTIVE = re.compile(r"^\s*host-name\s*=")
_COMMENTED = re.compile(r"^\s*[#;]\s*host-name\s*=")


def _server_section(lines: list[str]) -> tuple[int, int] | None:
    """(first line after `[server]`, end index) or None when there is no [server] section."""
    start = None
    for i, line in enumerate(lines):
        m = _SECTION.match(line)
        if m and start is not None:
            return start, i
        if m and m[1].strip() == "server":
            start = i + 1
    return (start, len(lines)) if start is not None else None


def set_host_name(conf: str, name: str) -> str:
    """avahi-daemon.conf with `host-name=name` in [server]; idempotent. The line it replaces
    (an active host-name=, else a commented one) is kept in the marker comment above it."""
    lines = conf.splitlines()
    ours = f"host-name={name}"
    section = _server_section(lines)
    if section is None:
        lines += ["", "[server]", MARKER, ours]
        return "\n".join(lines) + "\n"
    start, end = section
    for i in range(start, end):
        if lines[i].startswith(MARKER):
            if i + 1 < len(lines) and _ACTIVE.match(lines[i + 1]):
                lines[i + 1] = ours
            else:
                lines.insert(i + 1, ours)
            return "\n".join(lines) + "\n"
    target = next((i for i in range(start, end) if _ACTIVE.match(lines[i])), None)
    if target is None:
        target = next((i for i in range(start, end) if _COMMENTED.match(lines[i])), None)
    if target is None:
        lines[start:start] = [MARKER, ours]
    else:
        lines[target:target + 1] = [f"{MARKER} {lines[target]}".rstrip(), ours]
    return "\n".join(lines) + "\n"


def restore_host_name(conf: str) -> str:
    """avahi-daemon.conf with haswarm's host-name line replaced by the original again (or
    dropped when there was none); unchanged when haswarm never touched it."""
    lines = conf.splitlines(keepends=True)
    out: list[str] = []
    skip_next = False
    for line in lines:
        if skip_next:
            skip_next = False
            if _ACTIVE.match(line):
                continue
        if line.startswith(MARKER):
            original = line.rstrip("\n")[len(MARKER):].strip()
            if original:
                out.append(original + "\n")
            skip_next = True
            continue
        out.append(line)
    return "".join(out)


def cron_text(c: Cluster) -> str | None:
    """Content of the cron file (rendered), None when `mdns.restart_cron` is off."""
    if not c.mdns.restart_cron:
        return None
    return (render.build_dir(c) / "avahi-restart.cron").read_text()


def _restart(c: Cluster) -> Op:
    return Op("restart avahi-daemon", c.mdns.restart_command,
              hint="mdns.restart_command in the cluster file restarts Avahi; see the daemon's "
              "log on the node (journalctl -u avahi-daemon)")


def plan_hostname(c: Cluster, conf: str | None, running: bool) -> list[Op]:
    """Write the conf when host-name differs; restart Avahi then (or when it is not running)."""
    if conf is None:
        raise StepError(f"{AVAHI_CONF} is missing.\n  what to do: install Avahi on the node "
                        "(apt-get install avahi-daemon) and re-run setup")
    ops = []
    new = set_host_name(conf, c.mdns.name)
    if new != conf:
        ops.append(Op(f"set host-name={c.mdns.name} in {AVAHI_CONF}", put=(AVAHI_CONF, new)))
    if ops or not running:
        ops.append(_restart(c))
    return ops


def plan_hostname_clean(c: Cluster, conf: str | None) -> list[Op]:
    """Put the original host-name line back and restart Avahi; nothing when it is back."""
    if conf is None:
        return []
    new = restore_host_name(conf)
    if new == conf:
        return []
    return [Op(f"restore the original host-name line in {AVAHI_CONF}", put=(AVAHI_CONF, new)),
            _restart(c)]


def _avahi_running(r: Remote, node: Node, step: str) -> bool:
    return r.run(node, step, "avahi-daemon --check 2>/dev/null", check=False).ok


def setup_hostname(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """The shared mDNS name in every node's avahi-daemon.conf; restart Avahi where it changed."""
    step = "avahi:hostname"

    def one(node: Node) -> bool:
        with r.reading():
            ops = plan_hostname(c, r.read(node, AVAHI_CONF, step), _avahi_running(r, node, step))
        return apply_ops(r, node, step, ops, dryrun=dryrun)

    return {"changed": sorted(n for n, ch in on_nodes(r, step, one).items() if ch)}


def clean_hostname(c: Cluster, r: Remote, dryrun: bool) -> None:
    """Every node's original host-name line back (Avahi restarted where it changed)."""
    step = "avahi:hostname (clean)"

    def one(node: Node) -> None:
        apply_ops(r, node, step, plan_hostname_clean(c, r.read(node, AVAHI_CONF, step)),
                  dryrun=dryrun)

    on_nodes(r, step, one)


def setup_cron(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """/etc/cron.d/haswarm-avahi on every node (when restart_cron), else make sure it is gone."""
    step = "avahi:cron"
    text = cron_text(c)
    if text is not None:
        return put_on_nodes(r, step, CRON_FILE, text, dryrun=dryrun)
    q = shlex.quote(CRON_FILE)

    def one(node: Node) -> bool:
        with r.reading():
            exists = r.run(node, step, f"[ -e {q} ]", check=False).ok
        ops = [Op(f"remove {CRON_FILE} (mdns.restart_cron is off)", f"rm -f {q}")] \
            if exists else []
        return apply_ops(r, node, step, ops, dryrun=dryrun)

    return {"changed": sorted(n for n, ch in on_nodes(r, step, one).items() if ch)}


def clean_cron(c: Cluster, r: Remote, dryrun: bool) -> None:
    """Remove the cron file from every node."""
    step = "avahi:cron (clean)"
    q = shlex.quote(CRON_FILE)

    def one(node: Node) -> None:
        exists = r.run(node, step, f"[ -e {q} ]", check=False).ok
        apply_ops(r, node, step, [Op(f"remove {CRON_FILE}", f"rm -f {q}")] if exists else [],
                  dryrun=dryrun)

    on_nodes(r, step, one)


def task_avahi() -> Iterator[dict[str, Any]]:
    """mDNS: the shared name NAME.local on every node, Avahi restarted every minute by cron."""
    c = current()
    m = c.mdns
    yield remote_task(c, "avahi-hostname", "hostname",
                      f"avahi host-name={m.name} on every node (original line kept)",
                      setup_hostname, clean_hostname, task_dep=["gluster"])
    cron = render.build_dir(c) / "avahi-restart.cron"
    yield remote_task(c, "avahi-cron", "cron",
                      f"{CRON_FILE} on every node" if m.restart_cron
                      else f"{CRON_FILE} absent (mdns.restart_cron is off)",
                      setup_cron, clean_cron,
                      file_dep=[str(cron)] if m.restart_cron else [],
                      task_dep=["avahi:hostname"])
