"""The stack: Docker configs and secrets, `docker stack deploy`, convergence, and removal.

The doit task `stack-objects` and the clean side of `stack` (whose setup, the Galera bootstrap
sequence that drives the deploy, is `converge` in tasks/galera.py, with the `stack` task):

    stack-objects  the configs and secrets the stack references as `external: true`, created
                   (missing ones only) from the rendered files and generated secrets, on a manager.
                   clean: every config and secret of this stack (`NAME_*`) removed.
    stack (clean)  `docker stack rm`, then wait until no container of the stack is left on any
                   node and its networks are gone: the containers that no longer run (exited,
                   created, dead: also those from a node's life before a reboot, which
                   `docker stack rm` leaves) are removed, the running ones waited for; the
                   database volumes are kept unless `doit purge=yes clean`.

Facts come from the CLI on the nodes and are parsed by the pure `parse_*` functions:
`docker service inspect` (desired replicas, update state, task template) and `docker inspect`
of the tasks that should run (made from the current template or not) on a manager, `docker ps`
on every node (the containers, their health, and so which node runs what). Configs and secrets
are created through the Docker API (content in the request body: never on a command line, never
in a file on the node), as the `Op`s (tasks/ops.py) of a pure `plan_objects` from the names that
exist; the stack file (names only, no secret) reaches `docker stack deploy` on its stdin, never
as a file on the node.

A deploy is recorded in the swarm itself: a config `NAME_deployed-stack_<fingerprint>` holding
the stack file. A re-run whose stack file is the deployed one (and whose services still have the
file's replica counts) does not deploy again.

The parsers and the stack's data classes are in tasks/stack_facts.py; asking the nodes about the
running stack and waiting for it to converge (`observe`, `wait_for`) in tasks/stack_observe.py.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from tasks import render
from tasks.config import Cluster, Node, purge_requested
from tasks.errors import StackError
from tasks.ops import Op, apply_ops
from tasks.remote import Failure, Kind, Remote, RemoteError, progress
from tasks.secrets import secret_values
from tasks.stack_facts import MARKER_KEY, StackState, expected_replicas, label_filter, marker_name
from tasks.stack_observe import containers_everywhere, find_manager

STEP_OBJECTS = "stack-objects"
STEP_STACK = "stack"
HASWARM_LABEL = "io.haswarm.stack"
DB_VOLUME = "db-data"
REMOVE_TIMEOUT = 180.0  # stack rm: the db's stop grace period is 60 s
DEPLOY_TIMEOUT = 300.0  # seconds `docker stack deploy` may take (the command's deadline)
VOLUME_REMOVE_TIMEOUT = 300.0  # `docker volume rm` of a database volume (purge) on an SD card
OBJECT_KINDS = ("config", "secret")
STEP_WAIT = "stack: wait for removal"
# A container of the stack in one of these states no longer runs: `docker stack rm` leaves it
# behind when its node was down then, or when it is from the node's life before a reboot.
STALE = ("created", "exited", "dead")
CONTAINER_LINE = 'container {{.ID}} {{.State}} {{.Label "com.docker.swarm.service.name"}}'
# Removed before the rest of the stack: clients of the database stop while it still answers.
STOP_FIRST = ("homeassistant",)


# ---------------------------------------------------------------------------------------------
# Changes


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


def read_object_names(r: Remote, manager: str) -> dict[str, set[str]]:
    """The facts of `stack-objects`: the names of the configs and secrets in the swarm, by kind
    ('config', 'secret'), read on `manager`."""
    return {kind: _object_names(r, manager, kind) for kind in OBJECT_KINDS}


def plan_objects(c: Cluster, existing: Mapping[str, set[str]], manager: str) -> list[Op]:
    """The ops creating the configs and secrets the stack references that are not in `existing`
    (names by kind, `read_object_names`), on `manager`: configs first, each kind by key; [] when
    all exist. Pure but for the rendered files (their fingerprints are in the names): a content
    is read only when its op is applied, so no op holds a secret."""
    ops = []
    for kind, objects in render.docker_objects(c).items():
        singular = kind[:-1]  # configs -> config
        for key, (name, source) in sorted(objects.items()):
            if name not in existing.get(singular, set()):
                ops.append(_create_op(manager, singular, name, source,
                                      {HASWARM_LABEL: c.name, "io.haswarm.key": key}))
    return ops


def _create_op(manager: str, kind: str, name: str, source: Path, labels: dict[str, str]) -> Op:
    """The op creating config or secret `name` from the file `source` (read when applied)."""

    def create(r: Remote) -> None:
        _create_object(r, manager, kind, name, source.read_bytes(), labels)

    return Op(f"create {kind} {name}", node=manager, call=create)


def deploy(r: Remote, c: Cluster, manager: str, stack_file: Path) -> None:
    """`docker stack deploy --prune` of `stack_file` on `manager`. The file goes through the
    command's stdin (`-c -`): it is never written on the node, so no local user there can
    put another in its place (it names the objects but holds no secret)."""
    progress(manager, f"stack: docker stack deploy {stack_file.name} {c.name}")
    r.run(manager, "stack: deploy",
          f"docker stack deploy --resolve-image never --prune -c - {shlex.quote(c.name)}",
          stdin=stack_file.read_text(), timeout=DEPLOY_TIMEOUT,
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


def unused_objects(r: Remote, c: Cluster, manager: str, keep: set[str]) -> list[str]:
    """This stack's configs and secrets (`NAME_*`) not in `keep`, as 'config NAME' lines."""
    return [f"{kind} {name}" for kind in ("config", "secret")
            for name in sorted(_object_names(r, manager, kind))
            if name.startswith(f"{c.name}_") and name not in keep]


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
# Removal


def remove(c: Cluster, r: Remote, dryrun: bool = False, purge: bool = False,
           timeout: float = REMOVE_TIMEOUT) -> list[str]:
    """Stop Home Assistant (STOP_FIRST), `docker stack rm`, then wait until no container of the
    stack is left on any node and its networks are gone (removing the containers that no longer
    run, `_wait_removed`); with `purge` also remove the database volumes. Idempotent."""
    notes: list[str] = []
    volume = f"{c.name}_{DB_VOLUME}"
    r.redact(*secret_values(c))
    manager = find_manager(r, c, required=False)
    if manager:
        names = r.run(manager, "stack: services",
                      f"docker service ls --filter {label_filter(c)} "
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
    if dryrun:
        r.on_all(STEP_WAIT, lambda n: _leftovers(r, c, n, dryrun=True))
    else:
        _wait_removed(r, c, timeout)
    volumes = _volumes(r, c, volume)
    holders = sorted(n for n, present in volumes.items() if present)
    if purge and holders:
        if dryrun:
            notes.append(f"would remove the database volume {volume} on "
                         f"{', '.join(holders)} (purge)")
        else:
            r.run_all("stack: remove database volume",
                      f"docker volume rm {shlex.quote(volume)}", holders,
                      timeout=VOLUME_REMOVE_TIMEOUT)
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


def stale_containers(lines: Iterable[str]) -> list[str]:
    """The ids of the containers to remove, from one node's `_leftovers_cmd` lines ('container
    ID STATE SERVICE'; 'network NAME' lines are skipped): those that no longer run (STALE).
    A running container (or one restarting, paused, being removed) is waited for instead."""
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "container" and parts[2] in STALE:
            out.append(parts[1])
    return out


def _leftovers_cmd(c: Cluster) -> str:
    """Lists what of the stack is on a node: 'container ID STATE SERVICE' and 'network NAME'
    lines (exited containers too: they would hold the database volume)."""
    return (f"docker ps -a --filter {label_filter(c)} --format {shlex.quote(CONTAINER_LINE)}; "
            f"docker network ls --filter {label_filter(c)} --format 'network {{{{.Name}}}}'")


def _described(lines: Iterable[str], ids: Collection[str] | None = None) -> str:
    """'haswarm_db running, haswarm_mosquitto exited': the containers of `lines` (only those of
    `ids`, when given)."""
    out = []
    for parts in (line.split() for line in lines):
        if len(parts) >= 3 and parts[0] == "container" and (ids is None or parts[1] in ids):
            out.append(f"{parts[3] if len(parts) > 3 else parts[1]} {parts[2]}")
    return ", ".join(out)


def _leftovers(r: Remote, c: Cluster, n: Node, dryrun: bool = False) -> list[str]:
    """What of the stack is left on node `n` (`_leftovers_cmd` lines; [] when `n` does not
    answer), once the containers that no longer run are removed: `docker rm -v`, their anonymous
    volumes with them as when the swarm removes a task (never a named volume such as the
    database's). With `dryrun`, only says which it would remove."""
    try:
        lines = [x for x in r.run(n, STEP_WAIT, _leftovers_cmd(c)).stdout.splitlines()
                 if x.strip()]
        stale = stale_containers(lines)
        if dryrun and stale:
            progress(n, f"stack: would remove the stack's containers that no longer run: "
                        f"{_described(lines, stale)}")
        if dryrun or not stale:
            return lines
        res = r.run(n, "stack: remove stale containers",
                    "docker rm -v " + " ".join(shlex.quote(x) for x in stale), check=False)
    except RemoteError:
        return []
    gone = set(res.stdout.split()) & set(stale)
    if gone:
        progress(n, f"stack: removed the stack's containers that no longer ran: "
                    f"{_described(lines, gone)}")
    return [x for x in lines if not (x.startswith("container ") and x.split()[1] in gone)]


def _what_is_left(node: str, lines: list[str]) -> str:
    """'pi3: 1 containers (haswarm_db running), 0 networks' from `_leftovers` lines."""
    containers = sum(x.startswith("container ") for x in lines)
    networks = sum(x.startswith("network ") for x in lines)
    which = f" ({_described(lines)})" if containers else ""
    return f"{node}: {containers} containers{which}, {networks} networks"


def _wait_removed(r: Remote, c: Cluster, timeout: float) -> None:
    """Until no container of the stack is left on any node and no network of it. A container
    that no longer runs (left by `docker stack rm` when its node was down, or from the node's
    life before a reboot) is removed at once (`_leftovers`); a running one is waited for (the
    database may take its 60 s stop grace period)."""
    started = time.monotonic()
    deadline = started + timeout
    last = ""
    while True:
        found = r.on_all(STEP_WAIT, lambda n: _leftovers(r, c, n))
        left = {name: lines for name, lines in found.items() if lines}
        if not left:
            return
        line = "; ".join(_what_is_left(n, v) for n, v in left.items())
        if line != last:
            progress("stack", f"removal ({time.monotonic() - started:.0f} s): waiting for {line}")
            last = line
        if time.monotonic() > deadline:
            raise StackError(f"stack {c.name}: still present {timeout:g} s after `docker stack "
                             f"rm`: {line}. Look at `docker ps` on those nodes; run `doit clean` "
                             "again once they are gone")
        time.sleep(1)


def remove_objects(c: Cluster, r: Remote, dryrun: bool = False) -> list[str]:
    """Remove every config and secret of this stack (names `NAME_*`). Idempotent."""
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
    with r.reading():
        manager = find_manager(r, c)
        assert manager is not None
        existing = read_object_names(r, manager)
    ops = plan_objects(c, existing, manager)
    if ops or dryrun:  # a dry run says "nothing to do"; a converged run counts below
        # the step as the user has always read it: "stack-objects: would create secret X",
        # "stack: create secret X"
        apply_ops(r, c.node(manager), STEP_OBJECTS if dryrun else "stack", ops, dryrun=dryrun)
    if dryrun:
        return {}
    progress(manager, f"stack-objects: {len(ops)} created, {len(names) - len(ops)} present")
    return {"objects": names}


def clean_objects(c: Cluster, r: Remote, dryrun: bool) -> None:
    """Every config and secret of this stack removed (`remove_objects`)."""
    for note in remove_objects(c, r, dryrun=dryrun):
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
    for note in remove(c, r, dryrun=dryrun, purge=purge_requested()):
        print(note, flush=True)
