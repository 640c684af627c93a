"""The stack: Docker configs and secrets, `docker stack deploy`, convergence, and removal.

The doit task `stack-objects` and the clean side of `stack` (whose setup, the Galera bootstrap
sequence that drives the deploy, is `converge` in tasks/galera.py, with the `stack` task):

    stack-objects  the configs and secrets the stack references as `external: true`, created
                   (missing ones only) from the rendered files and generated secrets, on a manager.
                   clean: every config and secret of this stack (`NAME_*`) removed.
    stack (clean)  `docker stack rm`, then wait until no container of the stack runs on any node
                   and its networks are gone; the database volumes are kept unless
                   `doit purge=yes clean`.

Facts come from the CLI on the nodes and are parsed by the pure `parse_*` functions below:
`docker service inspect` (desired replicas, update state, task template) and `docker inspect`
of the tasks that should run (made from the current template or not) on a manager, `docker ps`
on every node (the containers, their health, and so which node runs what). Configs and secrets
are created through the Docker API (content in the request body: never on a command line, never
in a file on the node); the stack file (names only, no secret) is uploaded to a root-only
temporary file for `docker stack deploy`.

A deploy is recorded in the swarm itself: a config `NAME_deployed-stack_<fingerprint>` holding
the stack file. A re-run whose stack file is the deployed one (and whose services still have the
file's replica counts) does not deploy again.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks import render, secrets
from tasks.config import Cluster, Node, purge_requested
from tasks.errors import HaswarmError
from tasks.remote import Failure, Kind, Remote, RemoteError, progress, redact

STEP_OBJECTS = "stack-objects"
STEP_STACK = "stack"
NAMESPACE = "com.docker.stack.namespace"
HASWARM_LABEL = "io.haswarm.stack"
MARKER_KEY = "deployed-stack"
DB_VOLUME = "db-data"
# An update in one of these states did not (or not yet) reach the new spec.
UPDATE_UNFINISHED = ("updating", "paused", "rollback_started", "rollback_paused",
                     "rollback_completed")
# ... and in one of these it will not get there by waiting: the update failed.
UPDATE_FAILED = ("paused", "rollback_paused", "rollback_completed")
POLL_INTERVAL = 1.5
REMOVE_TIMEOUT = 180.0  # stack rm: the db's stop grace period is 60 s
# Removed before the rest of the stack: clients of the database stop while it still answers.
STOP_FIRST = ("homeassistant",)


class StackError(HaswarmError):
    """The stack did not reach the wanted state; str() says which service, why, what to do."""


# ---------------------------------------------------------------------------------------------
# Parsing (pure)


def json_lines(text: str) -> list[dict[str, Any]]:
    """One JSON object per non-empty line (docker ... --format '{{json .}}')."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def short_name(stack: str, full: str) -> str:
    """'haswarm_db-seed' -> 'db-seed' (the service name in the stack file)."""
    return full[len(stack) + 1:] if full.startswith(f"{stack}_") else full


def template_fingerprint(template: dict[str, Any]) -> str:
    """What makes a task outdated when the service's task template changes: image, command,
    environment, configs, secrets, mounts, healthcheck, force-update counter. (Compared field by
    field: a task's stored spec lacks defaults the service spec shows, e.g. Runtime.)"""
    cs = template.get("ContainerSpec") or {}
    return json.dumps({
        "image": cs.get("Image"), "command": cs.get("Command"), "args": cs.get("Args"),
        "env": sorted(cs.get("Env") or []),
        "configs": sorted((x.get("ConfigName"), (x.get("File") or {}).get("Name"))
                          for x in cs.get("Configs") or []),
        "secrets": sorted((x.get("SecretName"), (x.get("File") or {}).get("Name"))
                          for x in cs.get("Secrets") or []),
        "mounts": sorted(json.dumps(m, sort_keys=True) for m in cs.get("Mounts") or []),
        "healthcheck": cs.get("Healthcheck"), "force": template.get("ForceUpdate", 0),
    }, sort_keys=True, default=str)


@dataclass(frozen=True)
class Service:
    """A service of the stack as the swarm knows it."""

    name: str  # short name, as in the stack file
    desired: int | None  # replicas; None for a global service
    update_state: str = ""
    update_message: str = ""
    has_healthcheck: bool = False
    id: str = ""
    template: str = ""  # template_fingerprint of its task template


def parse_services(text: str, stack: str) -> dict[str, Service]:
    """`docker service inspect --format '{{json .}}' ID...` -> {short name: Service}."""
    out = {}
    for d in json_lines(text):
        spec = d.get("Spec") or {}
        mode = spec.get("Mode") or {}
        desired = (mode.get("Replicated") or {}).get("Replicas", 0) if "Global" not in mode \
            else None
        update = d.get("UpdateStatus") or {}
        template = spec.get("TaskTemplate") or {}
        hc = ((template.get("ContainerSpec") or {}).get("Healthcheck") or {}).get("Test") or []
        name = short_name(stack, spec.get("Name", ""))
        out[name] = Service(name=name, desired=desired, update_state=update.get("State", ""),
                            update_message=update.get("Message", ""),
                            has_healthcheck=bool(hc) and hc != ["NONE"], id=d.get("ID", ""),
                            template=template_fingerprint(template))
    return out


@dataclass(frozen=True)
class Task:
    """One swarm task (`docker stack ps` / `docker service ps`)."""

    id: str
    service: str  # short name
    slot: str
    node: str  # the node's hostname as the swarm reports it
    desired_state: str
    current_state: str  # "Running", "Starting", "Failed", ...
    since: str  # "2 minutes ago"
    error: str
    up_to_date: bool = True  # created from the service's current task template


def parse_tasks(text: str, stack: str) -> list[Task]:
    """`docker stack ps --no-trunc --format '{{json .}}'` (or service ps) -> tasks."""
    tasks = []
    for d in json_lines(text):
        name = d.get("Name", "").strip().removeprefix("\\_").strip()
        base, _, slot = name.rpartition(".")
        state, _, since = (d.get("CurrentState") or "").partition(" ")
        tasks.append(Task(id=d.get("ID", ""), service=short_name(stack, base or name), slot=slot,
                          node=d.get("Node", ""), desired_state=d.get("DesiredState", ""),
                          current_state=state, since=since,
                          error=(d.get("Error") or "").strip().strip('"')))
    return tasks


def parse_task_inspect(text: str, services: dict[str, Service]) -> list[Task]:
    """`docker inspect --format '{{json .}}' TASK...` (on a manager) -> tasks, each marked
    up to date or not against its service's current task template."""
    by_id = {svc.id: svc for svc in services.values()}
    tasks = []
    for d in json_lines(text):
        svc = by_id.get(d.get("ServiceID", ""))
        if svc is None:
            continue
        status = d.get("Status") or {}
        tasks.append(Task(
            id=d.get("ID", ""), service=svc.name, slot=str(d.get("Slot") or ""),
            node=d.get("NodeID", ""), desired_state=str(d.get("DesiredState", "")).capitalize(),
            current_state=str(status.get("State", "")).capitalize(), since="",
            error=status.get("Err", "") or "",
            up_to_date=template_fingerprint(d.get("Spec") or {}) == svc.template))
    return tasks


CONTAINER_FORMAT = ('{{.ID}}\t{{.Label "com.docker.swarm.service.name"}}\t'
                    '{{.Label "com.docker.swarm.task.id"}}\t{{.State}}\t{{.Status}}')


@dataclass(frozen=True)
class Container:
    """A container of the stack on one node (`docker ps`)."""

    node: str  # cluster node name (the node we asked)
    id: str
    service: str  # short name
    task_id: str
    state: str  # running, exited, created...
    health: str  # healthy | unhealthy | starting | "" (no healthcheck)

    @property
    def ready(self) -> bool:
        """Running, and healthy if it has a healthcheck."""
        return self.state == "running" and self.health in ("healthy", "")


def parse_containers(node: str, text: str, stack: str) -> list[Container]:
    """`docker ps --format CONTAINER_FORMAT` output of one node -> containers."""
    out = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 5:
            continue
        cid, service, task, state, status = parts
        m = re.search(r"\((healthy|unhealthy|health: starting)\)", status)
        health = "" if not m else ("starting" if m[1] == "health: starting" else m[1])
        out.append(Container(node=node, id=cid, service=short_name(stack, service), task_id=task,
                             state=state, health=health))
    return out


def expected_replicas(stack_text: str, node_count: int) -> dict[str, int]:
    """{service: replicas} the stack file asks for (global services: one per node)."""
    data = yaml.safe_load(stack_text) or {}
    out = {}
    for name, svc in (data.get("services") or {}).items():
        deploy = (svc or {}).get("deploy") or {}
        out[name] = node_count if deploy.get("mode") == "global" else int(
            deploy.get("replicas", 1))
    return out


@dataclass
class StackState:
    """A snapshot of the stack: services, the tasks meant to run, containers on each node."""

    services: dict[str, Service] = field(default_factory=dict)
    tasks: list[Task] = field(default_factory=list)  # desired state Running
    containers: list[Container] = field(default_factory=list)  # running ones, every node
    unreachable: list[str] = field(default_factory=list)

    def current(self, service: str) -> list[Container]:
        """Running containers of the tasks that should run for `service` and were made from
        its current spec (during a rolling update the old ones do not count)."""
        wanted = {t.id for t in self.tasks if t.service == service and t.up_to_date}
        return [ct for ct in self.containers if ct.service == service and ct.task_id in wanted]

    def ready(self, service: str) -> list[Container]:
        """Current containers of `service` that run and are healthy."""
        return [ct for ct in self.current(service) if ct.ready]

    def desired(self, service: str, node_count: int) -> int:
        """Replicas the swarm wants for `service` (global: one per node; 0 if absent)."""
        svc = self.services.get(service)
        if svc is None:
            return 0
        return node_count if svc.desired is None else svc.desired

    def summary(self, node_count: int) -> str:
        """'db 2/3 [pi1,pi2] (starting, updating), homeassistant 0/1 (preparing), ...'."""
        parts = []
        for name in sorted(self.services):
            ready = self.ready(name)
            current = self.current(name)
            want = self.desired(name, node_count)
            notes = sorted({ct.health or ct.state for ct in current if not ct.ready})
            if not notes and len(current) < want:
                notes = sorted({t.current_state.lower() for t in self.tasks
                                if t.service == name and t.up_to_date
                                and t.current_state != "Running"})
            svc = self.services[name]
            if svc.update_state in UPDATE_UNFINISHED:
                notes.append(svc.update_state.replace("_", " "))
            where = ",".join(sorted(ct.node for ct in ready))
            parts.append(f"{name} {len(ready)}/{want}" + (f" [{where}]" if where else "")
                         + (f" ({', '.join(notes)})" if notes else ""))
        return ", ".join(parts) or "no services"

    def failed_updates(self) -> list[str]:
        """Services whose last update failed (paused or rolled back): waiting will not help."""
        return sorted(n for n, svc in self.services.items() if svc.update_state in UPDATE_FAILED)

    def problems(self, expected: dict[str, int], node_count: int) -> list[str]:
        """Why the stack is not converged to `expected` ({service: replicas}); [] when it is."""
        out = []
        for name, want in sorted(expected.items()):
            svc = self.services.get(name)
            if svc is None:
                out.append(f"{name}: no such service")
                continue
            have = self.desired(name, node_count)
            if have != want:
                out.append(f"{name}: the swarm wants {have} replicas, the stack file {want}")
            ready = len(self.ready(name))
            if ready != want:
                out.append(f"{name}: {ready} of {want} running and healthy")
            if svc.update_state in UPDATE_UNFINISHED:
                out.append(f"{name}: update {svc.update_state}: {svc.update_message}")
        return out


# ---------------------------------------------------------------------------------------------
# Facts from the nodes


def find_manager(r: Remote, c: Cluster, required: bool = True) -> str | None:
    """The first node (in cluster order) that answers and is a swarm manager."""
    for n in c.nodes:
        try:
            res = r.run(n, "stack: find a manager",
                        "docker info --format '{{.Swarm.ControlAvailable}}'", check=False)
        except RemoteError:
            continue
        if res.ok and res.stdout.strip() == "true":
            return n.name
    if required:
        raise StackError("no node answers as a swarm manager: run `doit swarm` first (and check "
                         "that the nodes are up)")
    return None


def _label_filter(c: Cluster) -> str:
    return shlex.quote(f"label={NAMESPACE}={c.name}")


def observe(r: Remote, c: Cluster, manager: str) -> StackState:
    """Read the stack's services, tasks and containers (containers from every node at once)."""
    services = parse_services(r.run(
        manager, "stack: services",
        f"ids=$(docker service ls -q --filter {_label_filter(c)}); "
        "[ -z \"$ids\" ] || docker service inspect --format '{{json .}}' $ids").stdout, c.name)
    tasks = []
    if services:
        res = r.run(manager, "stack: tasks",
                    f"ids=$(docker stack ps -q --no-trunc --filter desired-state=running "
                    f"{shlex.quote(c.name)} 2>/dev/null); "
                    "[ -z \"$ids\" ] || docker inspect --format '{{json .}}' $ids", check=False)
        tasks = parse_task_inspect(res.stdout, services) if res.ok else []
    containers, unreachable = containers_everywhere(r, c)
    return StackState(services=services, tasks=tasks, containers=containers,
                      unreachable=unreachable)


def containers_everywhere(r: Remote, c: Cluster) -> tuple[list[Container], list[str]]:
    """The stack's running containers on every node that answers; and the names of those that
    do not answer."""
    cmd = f"docker ps --filter {_label_filter(c)} --format {shlex.quote(CONTAINER_FORMAT)}"

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
# Changes


def secret_values(c: Cluster) -> list[str]:
    """Every generated secret value (to scrub from anything shown)."""
    out = []
    for name in secrets.names(c):
        try:
            out.append(secrets.read(c, name))
        except OSError:
            pass
    return out


def _object_names(r: Remote, manager: str, kind: str) -> set[str]:
    out = r.run(manager, f"stack: list {kind}s", f"docker {kind} ls --format '{{{{.Name}}}}'"
                ).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def _create_object(r: Remote, manager: str, kind: str, name: str, data: bytes,
                   labels: dict[str, str]) -> None:
    """Create a config or secret through the Docker API on `manager`: the content travels in
    the request body over the SSH channel, never on a command line nor in a file on the node
    (and fast: piping it through the command's stdin costs 10 ms per byte in invoke)."""
    import docker

    client = r.docker(manager)
    collection = client.configs if kind == "config" else client.secrets
    try:
        collection.create(name=name, data=data, labels=labels)
    except docker.errors.APIError as e:
        if e.status_code == 409:  # created meanwhile (AlreadyExists): fine
            return
        node = r.cluster.node(manager)
        raise RemoteError([Failure(
            node=manager, address=node.address, step=f"stack: create {kind}", kind=Kind.COMMAND,
            detail=f"{kind} {name}: {getattr(e, 'explanation', '') or e}",
            hint="check that the node is a healthy swarm manager (`docker node ls`)")]) from None


def ensure_objects(r: Remote, c: Cluster, manager: str, dryrun: bool = False) -> list[str]:
    """Create the configs and secrets the stack references that do not exist yet. Returns the
    names created (with `dryrun`: that would be; nothing is created)."""
    created = []
    for kind, objects in render.docker_objects(c).items():
        singular = kind[:-1]  # configs -> config
        existing = _object_names(r, manager, singular)
        for key, (name, source) in sorted(objects.items()):
            if name in existing:
                continue
            if dryrun:
                progress(manager, f"stack-objects: would create {singular} {name}")
                created.append(name)
                continue
            progress(manager, f"stack: create {singular} {name}")
            _create_object(r, manager, singular, name, source.read_bytes(),
                           {HASWARM_LABEL: c.name, "io.haswarm.key": key})
            created.append(name)
    return created


def marker_name(c: Cluster, stack_text: str) -> str:
    """The config recording that this stack file is deployed."""
    fp = hashlib.sha256(b"haswarm:" + stack_text.encode()).hexdigest()[:10]
    return f"{c.name}_{MARKER_KEY}_{fp}"


def referenced_objects(c: Cluster, stack_text: str) -> set[str]:
    """Every object name the stack file uses, plus its deploy marker."""
    data = yaml.safe_load(stack_text) or {}
    names = {marker_name(c, stack_text)}
    for kind in ("configs", "secrets"):
        for spec in (data.get(kind) or {}).values():
            if isinstance(spec, dict) and spec.get("name"):
                names.add(spec["name"])
    return names


def deploy(r: Remote, c: Cluster, manager: str, stack_file: Path) -> None:
    """`docker stack deploy --prune` of `stack_file` on `manager` (uploaded to a root-only
    temporary file, removed afterwards; it names the objects but holds no secret)."""
    progress(manager, f"stack: docker stack deploy {stack_file.name} {c.name}")
    text = stack_file.read_text()
    remote = f"/tmp/.haswarm-{c.name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}.yml"
    r.put(manager, "stack: upload stack file", text, remote, mode=0o600)
    q = shlex.quote(remote)
    r.run(manager, "stack: deploy",
          f"trap 'rm -f -- {q}' EXIT; docker stack deploy --resolve-image never --prune "
          f"-c {q} {shlex.quote(c.name)}", timeout=300,
          hint=f"check the stack file with `docker stack config -c {stack_file}`; the images "
               "must be on every node (doit preload-images)")


def record_deploy(r: Remote, c: Cluster, manager: str, stack_text: str) -> None:
    """Create the marker config of a deployed stack file (content: the file, no secrets)."""
    name = marker_name(c, stack_text)
    if name not in _object_names(r, manager, "config"):
        _create_object(r, manager, "config", name, stack_text.encode(),
                       {HASWARM_LABEL: c.name, "io.haswarm.key": MARKER_KEY})


def is_deployed(r: Remote, c: Cluster, manager: str, stack_text: str, state: StackState) -> bool:
    """This stack file was deployed last, no update of it failed, and the services still have
    its replica counts."""
    if state.failed_updates() or marker_name(c, stack_text) not in _object_names(
            r, manager, "config"):
        return False
    want = expected_replicas(stack_text, len(c.nodes))
    return all(name in state.services and state.desired(name, len(c.nodes)) == n
               for name, n in want.items())


def scale(r: Remote, c: Cluster, manager: str, service: str, replicas: int) -> None:
    """`docker service scale` without waiting (the caller waits on its own terms)."""
    progress(manager, f"stack: scale {service} to {replicas}")
    r.run(manager, f"stack: scale {service}",
          f"docker service scale --detach {shlex.quote(f'{c.name}_{service}')}={replicas}")


def prune_objects(r: Remote, c: Cluster, manager: str, keep: set[str],
                  adjective: str = "unused ") -> list[str]:
    """Remove this stack's configs and secrets (`NAME_*`) not in `keep`; returns notes."""
    notes = []
    for kind in ("config", "secret"):
        for name in sorted(_object_names(r, manager, kind)):
            if not name.startswith(f"{c.name}_") or name in keep:
                continue
            res = r.run(manager, f"stack: remove {kind}", f"docker {kind} rm {shlex.quote(name)}",
                        check=False)
            if res.ok:
                progress(manager, f"stack: removed {adjective}{kind} {name}")
            elif "in use" in res.stderr:
                notes.append(f"{kind} {name} is still in use; it is removed by a later run")
            elif "not found" not in res.stderr:
                notes.append(f"{kind} {name}: not removed: {res.stderr.strip()[:200]}")
    return notes


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


# ---------------------------------------------------------------------------------------------
# Removal


def remove(c: Cluster, dryrun: bool = False, purge: bool = False,
           timeout: float = REMOVE_TIMEOUT) -> list[str]:
    """Stop Home Assistant (STOP_FIRST), `docker stack rm`, then wait until no container of the
    stack is left on any node and its networks are gone; with `purge` also remove the database
    volumes. Idempotent."""
    notes: list[str] = []
    volume = f"{c.name}_{DB_VOLUME}"
    with Remote(c) as r:
        r.redact(*secret_values(c))
        manager = find_manager(r, c, required=False)
        if manager:
            names = r.run(manager, "stack: services",
                          f"docker service ls --filter {_label_filter(c)} "
                          "--format '{{.Name}}'").stdout.split()
            first = [s for s in STOP_FIRST if f"{c.name}_{s}" in names]
            if names and dryrun:
                notes.append(f"would stop {', '.join(first) or 'nothing'} first, then run "
                             f"`docker stack rm {c.name}` (services: "
                             f"{', '.join(sorted(names))}) and wait for its containers")
            elif names:
                _stop_first(r, c, manager, first)
                progress(manager, f"stack: docker stack rm {c.name}")
                r.run(manager, "stack: remove", f"docker stack rm {shlex.quote(c.name)}")
            else:
                notes.append(f"stack {c.name}: no services")
        else:
            notes.append("stack: no swarm manager answers: no stack to remove")
        if not dryrun:
            _wait_removed(r, c, timeout)
        volumes = _volumes(r, c, volume)
        holders = sorted(n for n, present in volumes.items() if present)
        if purge and holders:
            if dryrun:
                notes.append(f"would remove the database volume {volume} on "
                             f"{', '.join(holders)} (purge)")
            else:
                r.run_all("stack: remove database volume",
                          f"docker volume rm {shlex.quote(volume)}", holders)
                notes.append(f"removed the database volume {volume} on {', '.join(holders)}")
        elif holders:
            notes.append(f"kept the database volume {volume} on {', '.join(holders)} (user "
                         "data; `doit purge=yes clean` removes it)")
    return notes


def _stop_first(r: Remote, c: Cluster, manager: str, services: list[str],
                timeout: float = 90.0) -> None:
    """Scale the database's clients to 0 and wait until their containers are gone, so they
    shut down while the database still answers (Home Assistant's recorder flushes its last
    rows; stopped together with Galera it hangs until killed after its grace period)."""
    for service in services:
        scale(r, c, manager, service, 0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running, _ = containers_everywhere(r, c)
        if not any(ct.service in services for ct in running):
            return
        time.sleep(1)


def _volumes(r: Remote, c: Cluster, volume: str) -> dict[str, bool]:
    def one(n: Node) -> bool | None:
        try:
            return r.run(n, "stack: volumes", f"docker volume inspect {shlex.quote(volume)}",
                         check=False).ok
        except RemoteError:
            return None

    got = r.on_all("stack: volumes", one)
    return {k: v for k, v in got.items() if v is not None}


def _wait_removed(r: Remote, c: Cluster, timeout: float) -> None:
    """Until no container of the stack is left on any node (exited ones too: they would hold
    the database volume) and no network of it."""
    cmd = (f"docker ps -aq --filter {_label_filter(c)} | sed 's/^/container /'; "
           f"docker network ls --filter {_label_filter(c)} --format 'network {{{{.Name}}}}'")
    started = time.monotonic()
    deadline = started + timeout
    last = ""
    while True:
        left: dict[str, list[str]] = {}

        def one(n: Node) -> list[str]:
            try:
                return r.run(n, "stack: wait for removal", cmd).stdout.split("\n")
            except RemoteError:
                return []

        for name, lines in r.on_all("stack: wait for removal", one).items():
            items = [x for x in lines if x.strip()]
            if items:
                left[name] = items
        if not left:
            return
        line = "; ".join(f"{n}: {sum(x.startswith('container') for x in v)} containers, "
                         f"{sum(x.startswith('network') for x in v)} networks"
                         for n, v in left.items())
        if line != last:
            progress("stack", f"removal ({time.monotonic() - started:.0f} s): waiting for {line}")
            last = line
        if time.monotonic() > deadline:
            raise StackError(f"stack {c.name}: still present {timeout:g} s after `docker stack "
                             f"rm`: {line}. Look at `docker ps` on those nodes; run `doit clean` "
                             "again once they are gone")
        time.sleep(1)


def remove_objects(c: Cluster, dryrun: bool = False) -> list[str]:
    """Remove every config and secret of this stack (names `NAME_*`). Idempotent."""
    with Remote(c) as r:
        manager = find_manager(r, c, required=False)
        if manager is None:
            return ["stack-objects: no swarm manager answers: no configs or secrets to remove"]
        names = {kind: sorted(n for n in _object_names(r, manager, kind)
                              if n.startswith(f"{c.name}_")) for kind in ("config", "secret")}
        if dryrun:
            return [f"would remove {kind} {n}" for kind, ns in names.items() for n in ns] or \
                ["stack-objects: nothing to remove"]
        notes = prune_objects(r, c, manager, keep=set(), adjective="")
        count = sum(len(v) for v in names.values())
        notes.append(f"stack-objects: removed {count} configs/secrets" if count
                     else "stack-objects: nothing to remove")
        return notes


# ---------------------------------------------------------------------------------------------
# doit


def setup_objects(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """The configs and secrets the stack uses: the missing ones created (never changed: a new
    content is a new name)."""
    r.redact(*secret_values(c))
    names = sorted(name for objs in render.docker_objects(c).values() for name, _ in objs.values())
    manager = find_manager(r, c)
    assert manager is not None
    made = ensure_objects(r, c, manager, dryrun=dryrun)
    if dryrun:
        if not made:
            progress(manager, "stack-objects: nothing to do")
        return {}
    progress(manager, f"stack-objects: {len(made)} created, {len(names) - len(made)} present")
    return {"objects": names}


def clean_objects(c: Cluster, r: Remote, dryrun: bool) -> None:
    """Every config and secret of this stack removed (`remove_objects`)."""
    for note in remove_objects(c, dryrun=dryrun):
        print(note, flush=True)


def objects_task(c: Cluster, after: Iterable[str] = ()) -> dict[str, Any]:
    """The `stack-objects` task dict."""
    from tasks.ops import remote_task

    # Paths only: the creator must not read files (they may not be rendered yet).
    sources = sorted({str(p) for p in [*render.config_sources(c).values(),
                                       *render.secret_sources(c).values()]})
    task = remote_task(c, STEP_OBJECTS, None,
                       "Create the Docker configs and secrets the stack uses (missing ones only)",
                       setup_objects, clean_objects, file_dep=sources,
                       task_dep=["swarm", *after])
    return {**task, "basename": "stack-objects"}


def clean_stack(c: Cluster, r: Remote, dryrun: bool) -> None:
    """`docker stack rm`, then wait until the containers are gone (`remove`); the database
    volumes are kept unless `purge=yes`."""
    for note in remove(c, dryrun=dryrun, purge=purge_requested()):
        print(note, flush=True)
