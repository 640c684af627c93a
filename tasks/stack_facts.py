"""The stack's facts, pure: the parsers of what the Docker CLI prints about the stack's services,
tasks and containers (`parse_*`), their data classes (`Service`, `Task`, `Container`, the
snapshot `StackState`), and what a stack file asks for (`expected_replicas`, the object names it
references, its deploy marker's name). Nothing here talks to a node; tasks/stack_observe.py asks
the nodes and feeds these.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

import yaml

from tasks.config import Cluster

NAMESPACE = "com.docker.stack.namespace"
MARKER_KEY = "deployed-stack"
# An update in one of these states did not (or not yet) reach the new spec.
UPDATE_UNFINISHED = ("updating", "paused", "rollback_started", "rollback_paused",
                     "rollback_completed")
# ... and in one of these it will not get there by waiting: the update failed.
UPDATE_FAILED = ("paused", "rollback_paused", "rollback_completed")


# ---------------------------------------------------------------------------------------------
# Parsing


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
    """`docker inspect --type task --format '{{json .}}' TASK...` (on a manager) -> tasks, each
    marked up to date or not against its service's current task template."""
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


def _load_stack(stack_text: str) -> dict[str, Any]:
    """The rendered stack file as data (libyaml's parser when PyYAML has it: ~10x faster)."""
    return yaml.load(stack_text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}


def expected_replicas(stack_text: str, node_count: int) -> dict[str, int]:
    """{service: replicas} the stack file asks for (global services: one per node)."""
    data = _load_stack(stack_text)
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
# Names: what selects the stack, what a stack file references


def label_filter(c: Cluster) -> str:
    """The `--filter` argument (shell-quoted) that selects this stack's services, containers and
    networks."""
    return shlex.quote(f"label={NAMESPACE}={c.name}")


def marker_name(c: Cluster, stack_text: str) -> str:
    """The config recording that this stack file is deployed."""
    fp = hashlib.sha256(b"haswarm:" + stack_text.encode()).hexdigest()[:10]
    return f"{c.name}_{MARKER_KEY}_{fp}"


def referenced_objects(c: Cluster, stack_text: str) -> set[str]:
    """Every object name the stack file uses, plus its deploy marker."""
    data = _load_stack(stack_text)
    names = {marker_name(c, stack_text)}
    for kind in ("configs", "secrets"):
        for spec in (data.get(kind) or {}).values():
            if isinstance(spec, dict) and spec.get("name"):
                names.add(spec["name"])
    return names

