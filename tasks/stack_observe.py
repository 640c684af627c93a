"""The live stack, asked from the nodes: a swarm manager (`find_manager`), a snapshot of the
services, tasks and containers (`observe`), the last task errors and healthcheck outputs; and
waiting on it: `wait_for` polls until a check passes (or says what did not converge),
`probe_http` until Home Assistant answers. The parsing is in tasks/stack_facts.py.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable

from tasks.config import Cluster, Node
from tasks.errors import StackError
from tasks.remote import Remote, RemoteError, progress, redact
from tasks.secrets import secret_values
from tasks.stack_facts import (
    CONTAINER_FORMAT,
    Container,
    StackState,
    label_filter,
    parse_containers,
    parse_services,
    parse_task_inspect,
    parse_tasks,
)

POLL_INTERVAL = 1.5


# ---------------------------------------------------------------------------------------------
# Facts from the nodes


def find_manager(r: Remote, c: Cluster, required: bool = True) -> str | None:
    """The first node (in cluster order) that answers and is a swarm manager (its `docker info`
    as the swarm step reads it)."""
    from tasks.swarm_facts import INFO_CMD, parse_swarm_info

    for n in c.nodes:
        try:
            res = r.run(n, "stack: find a manager", INFO_CMD, check=False)
        except RemoteError:
            continue
        if res.ok and parse_swarm_info(res.stdout).manager:
            return n.name
    if required:
        raise StackError("no node answers as a swarm manager: run `doit swarm` first (and check "
                         "that the nodes are up)")
    return None


def observe(r: Remote, c: Cluster, manager: str) -> StackState:
    """Read the stack's services, tasks and containers (containers from every node at once)."""
    services = parse_services(r.run(
        manager, "stack: services",
        f"ids=$(docker service ls -q --filter {label_filter(c)}); "
        "[ -z \"$ids\" ] || docker service inspect --format '{{json .}}' $ids").stdout, c.name)
    tasks = []
    if services:
        res = r.run(manager, "stack: tasks",
                    f"ids=$(docker stack ps -q --no-trunc --filter desired-state=running "
                    f"{shlex.quote(c.name)} 2>/dev/null); "
                    "[ -z \"$ids\" ] || docker inspect --type task --format '{{json .}}' $ids",
                    check=False)
        tasks = parse_task_inspect(res.stdout, services) if res.ok else []
    containers, unreachable = containers_everywhere(r, c)
    return StackState(services=services, tasks=tasks, containers=containers,
                      unreachable=unreachable)


def containers_everywhere(r: Remote, c: Cluster) -> tuple[list[Container], list[str]]:
    """The stack's running containers on every node that answers; and the names of those that
    do not answer."""
    cmd = f"docker ps --filter {label_filter(c)} --format {shlex.quote(CONTAINER_FORMAT)}"

    def one(n: Node) -> list[Container] | None:
        try:
            return parse_containers(n.name, r.run(n, "stack: containers", cmd).stdout, c.name)
        except RemoteError:
            return None

    got = r.on_all("stack: containers", one)
    found = [ct for cts in got.values() if cts for ct in cts]
    return found, [name for name, cts in got.items() if cts is None]


def last_errors(r: Remote, c: Cluster, manager: str, service: str, limit: int = 3) -> list[str]:
    """The most recent task errors of a service (`docker service ps --no-trunc`)."""
    res = r.run(manager, "stack: task history",
                f"docker service ps {shlex.quote(f'{c.name}_{service}')} --no-trunc "
                "--format '{{json .}}'", check=False)
    if not res.ok:
        return []
    tasks = parse_tasks(res.stdout, c.name)
    return [f"{t.node}: {t.current_state} {t.since}: {t.error}" for t in tasks if t.error][:limit]


def health_output(r: Remote, container: Container) -> str:
    """The last healthcheck output of a container (its last line), or ''."""
    res = r.run(container.node, "stack: health",
                f"docker inspect --format '{{{{json .State.Health}}}}' {container.id}",
                check=False)
    try:
        log = (json.loads(res.stdout or "null") or {}).get("Log") or []
    except json.JSONDecodeError:
        return ""
    if not log:
        return ""
    lines = [x for x in (log[-1].get("Output") or "").strip().splitlines() if x.strip()]
    return lines[-1][:300] if lines else ""


# ---------------------------------------------------------------------------------------------
# Waiting


def wait_for(r: Remote, c: Cluster, manager: str, what: str,
             check: Callable[[StackState], list[str]], timeout: float,
             extra: Callable[[StackState], str] | None = None) -> StackState:
    """Poll the stack until `check(state)` returns no problems; print a progress line whenever
    the summary changes. On timeout raise StackError naming what did not converge, with the last
    task errors and healthcheck outputs."""
    started = time.monotonic()
    last = ""
    while True:
        state = observe(r, c, manager)
        problems = check(state)
        line = state.summary(len(c.nodes))
        if extra:
            line += extra(state)
        if line != last:
            progress(manager, f"{what} ({time.monotonic() - started:.0f} s): {line}")
            last = line
        if not problems:
            return state
        failed = [p for p in problems if p.split(":", 1)[0] in state.failed_updates()]
        if failed:  # a rolled back / paused update does not converge by waiting
            raise StackError(diagnose(r, c, manager, state, what, problems,
                                      time.monotonic() - started, failed=True))
        if time.monotonic() - started > timeout:
            raise StackError(diagnose(r, c, manager, state, what, problems, timeout))
        time.sleep(POLL_INTERVAL)


def diagnose(r: Remote, c: Cluster, manager: str, state: StackState, what: str,
             problems: list[str], timeout: float, failed: bool = False) -> str:
    """The timeout message: every problem, and per service its last errors and health output."""
    lines = [f"{what}: an update failed (after {timeout:.0f} s); fix the cause and run the task "
             "again:" if failed else f"{what}: not converged after {timeout:g} s:"]
    lines += [f"  - {p}" for p in problems]
    for name in sorted(n for n, svc in state.services.items()
                       if svc.update_state == "rollback_completed"):
        lines.append(f"  {name}: its new version failed and swarm rolled it back: it runs what "
                     "ran before this setup. Read why below (or in its logs), fix the image or "
                     "set the previous tag in the cluster file, then run `doit setup` again")
    services = sorted({p.split(":", 1)[0] for p in problems if p.split(":", 1)[0] in
                       state.services})
    for name in services:
        for err in last_errors(r, c, manager, name):
            lines.append(f"  {name}: last task error: {err}")
        for ct in state.current(name):
            if not ct.ready:
                out = health_output(r, ct)
                lines.append(f"  {name} on {ct.node}: {ct.health or ct.state}"
                             + (f": {out}" if out else ""))
    if state.unreachable:
        lines.append(f"  unreachable: {', '.join(state.unreachable)}")
    lines.append(f"  look closer: `docker service ps --no-trunc {c.name}_SERVICE` and "
                 f"`docker service logs {c.name}_SERVICE` on {manager}")
    return redact("\n".join(lines), secret_values(c))


def http_answer(address: str, port: int, timeout: float = 3.0) -> int | None:
    """The HTTP status of GET / on address:port, None when nothing answers."""
    import urllib.error  # here: loading the doit tasks does not need an HTTP client
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to the node
    try:
        with opener.open(f"http://{address}:{port}/", timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (OSError, ValueError):
        return None


def probe_http(c: Cluster, port: int, timeout: float, what: str = "homeassistant"
               ) -> tuple[str, int]:
    """Ask every node from here until one answers HTTP below 500 on `port` (with host publish
    mode only the node running the service answers). Returns (node, status)."""
    deadline = time.monotonic() + timeout
    while True:
        for n in c.nodes:
            status = http_answer(n.address, port)
            if status is not None and status < 500:
                return n.name, status
        if time.monotonic() > deadline:
            raise StackError(
                f"{what}: no node answers HTTP on port {port} after {timeout:g} s (asked "
                f"{', '.join(f'{n.name} {n.address}' for n in c.nodes)} from this machine); "
                f"see `docker service logs {c.name}_{what}` on a manager")
        time.sleep(2)

