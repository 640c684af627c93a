"""The Galera bootstrap, automated: what the 2019 system left to four clicks in Portainer.

`converge(c)` reads facts (`gather`), `decide()` (pure) picks the steps, `plan()` (pure) turns
them into `Op`s (tasks/ops.py: each a `call` of the step's function below), and `apply_ops`
shows them (dry run) or runs them in order, each wait with progress and a timeout that names
what did not converge:

    fresh cluster (no db task Synced, no database volume with data, no seed):
      deploy-bootstrap  stack.bootstrap.yml: db-seed 1, db 0, homeassistant 0
      wait-seed         the seed is Synced in a Primary component (it created the cluster)
      scale-db          db to N (one per node)
      wait-db-seeded    N db tasks Synced, wsrep_cluster_size == N + 1
      remove-seed       db-seed to 0; wsrep_cluster_size == N
      deploy-steady     stack.yml: db N, homeassistant 1 (skipped when already deployed)
      wait-stack        every service running and healthy, N db Synced, cluster size N
      probe-ha          Home Assistant answers HTTP on some node (asked from here)

    an earlier bootstrap stopped half-way (the seed runs): continue at wait-seed or scale-db;
    db already runs Synced (a re-run): no bootstrap, deploy-steady only if stack.yml changed,
    wait-stack and probe-ha only if something changed or is not converged ("nothing to do");
    database volumes hold data but nothing runs (after `doit clean` without purge, or a full
    outage): deploy-steady; the db nodes recover the cluster from their own data (the image's
    recovery, see images/mariadb-galera). The seed is never started in these cases: a seed
    beside Synced nodes or beside nodes with data would create a second cluster, or copy an
    empty database over the user's data.

Galera state is read with `docker exec CONTAINER galera-status` on the node running the task: it
queries the server over its unix socket with socket authentication, so no password exists on any
command line or in any file written for it.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tasks import render
from tasks.config import Cluster, Node
from tasks.errors import StackError
from tasks.facts import GaleraMember, galera_command, parse_galera
from tasks.homeassistant import announce_image
from tasks.ops import Op, apply_ops, remote_task
from tasks.remote import Remote, RemoteError, progress
from tasks.secrets import secret_values
from tasks.stack import (
    DB_VOLUME,
    STEP_STACK,
    clean_stack,
    deploy,
    is_deployed,
    prune_objects,
    record_deploy,
    scale,
    unused_objects,
)
from tasks.stack_facts import StackState, expected_replicas, referenced_objects
from tasks.stack_observe import find_manager, observe, probe_http, wait_for

SEED = "db-seed"
DB = "db"
HA = "homeassistant"

# Seconds for each wait (a Pi is slower than the lab: a full SST by mariabackup takes minutes).
SEED_TIMEOUT = 300.0
DB_TIMEOUT = 900.0
SEED_REMOVAL_TIMEOUT = 180.0
STACK_TIMEOUT = 900.0  # Home Assistant's healthcheck allows a 300 s start
HA_PROBE_TIMEOUT = 180.0

BOOTSTRAP = ("deploy-bootstrap", "wait-seed", "scale-db", "wait-db-seeded", "remove-seed",
             "deploy-steady", "wait-stack", "probe-ha")
STEADY = ("deploy-steady", "wait-stack", "probe-ha")


# ---------------------------------------------------------------------------------------------
# Facts


Member = GaleraMember  # one running db / db-seed container (tasks/facts.py)


def parse_status_sections(node: str, text: str, services: dict[str, str]) -> list[Member]:
    """Output of several galera-status runs, each after a '== CONTAINER' line."""
    return parse_galera(text, services, node)


def members(r: Remote, c: Cluster, state: StackState) -> list[Member]:
    """galera-status of every running db and db-seed container (one SSH command per node)."""
    by_node: dict[str, dict[str, str]] = {}
    for ct in state.containers:
        if ct.service in (DB, SEED) and ct.state == "running":
            by_node.setdefault(ct.node, {})[ct.id] = ct.service
    if not by_node:
        return []

    def one(n: Node) -> list[Member]:
        ids = by_node[n.name]
        cmd = galera_command(list(ids))
        try:
            res = r.run(n, "galera: status", cmd, check=False, timeout=30)
        except RemoteError:
            return []
        return parse_status_sections(n.name, res.stdout, ids)

    got = r.on_all("galera: status", one, list(by_node))
    return [m for ms in got.values() for m in ms]


def data_volumes(r: Remote, c: Cluster) -> tuple[list[str], list[str]]:
    """(nodes whose database volume holds a MariaDB datadir, nodes that did not answer)."""
    volume = shlex.quote(f"{c.name}_{DB_VOLUME}")
    cmd = (f"m=$(docker volume inspect --format '{{{{.Mountpoint}}}}' {volume} 2>/dev/null) "
           "&& [ -d \"$m/mysql\" ] && echo data || echo none")

    def one(n: Node) -> str | None:
        try:
            return r.run(n, "galera: database volume", cmd).stdout.strip()
        except RemoteError:
            return None

    got = r.on_all("galera: database volume", one)
    return ([n for n, v in got.items() if v == "data"], [n for n, v in got.items() if v is None])


@dataclass
class GaleraFacts:
    """What the bootstrap decision needs."""

    seed_desired: int | None  # None: no such service
    db_desired: int | None
    members: list[Member] = field(default_factory=list)
    data_nodes: list[str] = field(default_factory=list)  # database volume holds data
    unknown_nodes: list[str] = field(default_factory=list)  # did not answer: data unknown
    deployed: bool = False  # stack.yml is the deployed one and its replica counts hold
    problems: list[str] = field(default_factory=list)  # why the steady stack is not there yet
    unused: list[str] = field(default_factory=list)  # "config NAME" stack.yml does not use

    def synced(self, service: str) -> list[Member]:
        """Synced members of `service`."""
        return [m for m in self.members if m.service == service and m.synced]

    def running(self, service: str) -> list[Member]:
        """Running containers of `service`, whatever their Galera state."""
        return [m for m in self.members if m.service == service]


def steady_problems(state: StackState, ms: list[Member], expected: dict[str, int], n: int
                    ) -> list[str]:
    """Why the stack is not at `expected` ({service: replicas}) with every db Synced in one
    cluster of that size; [] when it is."""
    problems = state.problems(expected, n)
    want = expected.get(DB, n)
    synced = [m for m in ms if m.service == DB and m.synced]
    if len(synced) != want:
        problems.append(f"db: {len(synced)} of {want} Synced")
    sizes = {m.cluster_size for m in ms}
    if ms and sizes != {want}:
        problems.append(f"galera: wsrep_cluster_size {sorted(sizes)}, want {want}")
    return problems


def steady_file(c: Cluster) -> Path:
    """The rendered steady stack file (db on every node, Home Assistant, no seed)."""
    return render.build_dir(c) / "stack.yml"


def gather(r: Remote, c: Cluster, manager: str) -> tuple[GaleraFacts, StackState]:
    """Read the facts `decide` and `plan` need (volumes only when no db task is Synced)."""
    n = len(c.nodes)
    state = observe(r, c, manager)
    ms = members(r, c, state)
    text = steady_file(c).read_text()
    facts = GaleraFacts(
        seed_desired=state.services[SEED].desired if SEED in state.services else None,
        db_desired=state.services[DB].desired if DB in state.services else None,
        members=ms,
        deployed=is_deployed(r, c, manager, text, state),
        problems=steady_problems(state, ms, expected_replicas(text, n), n),
        unused=unused_objects(r, c, manager, referenced_objects(c, text)))
    if not facts.synced(DB):
        facts.data_nodes, facts.unknown_nodes = data_volumes(r, c)
        facts.unknown_nodes = sorted(set(facts.unknown_nodes) | set(state.unreachable))
    return facts, state


# ---------------------------------------------------------------------------------------------
# The decision (pure)


@dataclass(frozen=True)
class Decision:
    """The plan: its kind, the steps in order, and why (printed for the user)."""

    kind: str  # bootstrap | resume | running | recover | refuse
    steps: tuple[str, ...]
    reason: str


def decide(f: GaleraFacts, n: int) -> Decision:
    """Pick the plan from the facts (`n` = number of nodes = db replicas)."""
    synced_db = f.synced(DB)
    seed_on = bool(f.running(SEED)) or bool(f.seed_desired)
    if synced_db:
        names = ", ".join(sorted(m.node for m in synced_db))
        size = max(m.cluster_size for m in synced_db)
        if seed_on:
            return Decision("resume", BOOTSTRAP[BOOTSTRAP.index("scale-db"):],
                            f"db runs Synced on {names} and db-seed still runs: an earlier "
                            "bootstrap stopped half-way; continuing it")
        return Decision("running", STEADY,
                        f"db already runs Synced on {names} (cluster size {size}): no bootstrap")
    if seed_on:
        return Decision("resume", BOOTSTRAP[BOOTSTRAP.index("wait-seed"):],
                        "db-seed runs but no db task is Synced yet: an earlier bootstrap stopped "
                        "half-way; continuing it")
    if f.data_nodes:
        return Decision("recover", STEADY,
                        f"no db task is Synced, but the database volumes on "
                        f"{', '.join(f.data_nodes)} hold data: starting the db nodes on their "
                        "own data (they recover the cluster; no seed)")
    if f.unknown_nodes:
        return Decision("refuse", (),
                        f"no db task is Synced and {', '.join(f.unknown_nodes)} did not answer: "
                        "cannot tell whether its database volume holds data. Starting a seed "
                        "now could copy an empty database over it. Bring the node(s) back (or "
                        "remove them from the cluster file) and run the task again")
    return Decision("bootstrap", BOOTSTRAP,
                    "fresh cluster (no db task Synced, no database volume with data): "
                    "bootstrapping Galera from a seed")


# ---------------------------------------------------------------------------------------------
# Steps: each is one Op of the plan, called with the Remote when applied


def _members_line(ms: Iterable[Member]) -> str:
    ms = list(ms)
    if not ms:
        return ""
    sizes = {m.cluster_size for m in ms if m.synced}
    size = f", cluster size {max(sizes)}" if sizes else ""
    ordered = sorted(ms, key=lambda m: (m.service == SEED, m.node))
    return f" | galera: {', '.join(m.describe() for m in ordered)}{size}"


def galera_wait(r: Remote, c: Cluster, manager: str, what: str, want_db: int | None,
                want_seed: int, size: int | None, timeout: float) -> None:
    """Wait until `want_db` db (None: any number, not looked at) and `want_seed` seed members
    run and are Synced, and every member looked at sees `size` (None: any)."""
    last: list[Member] = []

    def check(state: StackState) -> list[str]:
        ms = members(r, c, state)
        last[:] = ms
        if want_db is None:
            ms = [m for m in ms if m.service == SEED]
        problems = []
        for service, want in ((DB, want_db), (SEED, want_seed)):
            if want is None:
                continue
            running = [m for m in ms if m.service == service]
            synced = [m for m in running if m.synced]
            if len(synced) != want or len(running) != want:
                problems.append(f"{service}: {len(synced)} of {want} Synced "
                                f"({', '.join(m.describe() for m in running) or 'none'})")
        sizes = {m.cluster_size for m in ms}
        if size is not None and ms and sizes != {size}:
            problems.append(f"galera: wsrep_cluster_size {sorted(sizes)}, want {size}")
        return problems

    wait_for(r, c, manager, what, check, timeout, extra=lambda _: _members_line(last))


def deploy_bootstrap(r: Remote, c: Cluster, manager: str) -> None:
    """Deploy stack.bootstrap.yml (the seed), after looking again that no data can be lost."""
    facts, _ = gather(r, c, manager)
    if facts.synced(DB) or facts.data_nodes or facts.unknown_nodes:
        raise StackError("galera: refusing to start the seed: a db task is Synced or a "
                         "database volume holds data (or a node did not answer); run the "
                         "task again")
    deploy(r, c, manager, render.build_dir(c) / "stack.bootstrap.yml")


def wait_seed(r: Remote, c: Cluster, manager: str) -> None:
    """Wait for the seed alone: after an interrupted run db nodes may already be joining it."""
    galera_wait(r, c, manager, "galera: seed", want_db=None, want_seed=1, size=None,
                timeout=SEED_TIMEOUT)


def scale_db(r: Remote, c: Cluster, manager: str) -> None:
    """db to one task per node (unless the swarm already wants that)."""
    n = len(c.nodes)
    if observe(r, c, manager).desired(DB, n) != n:
        scale(r, c, manager, DB, n)


def wait_db_seeded(r: Remote, c: Cluster, manager: str) -> None:
    """Wait until every db task is Synced beside the seed."""
    n = len(c.nodes)
    galera_wait(r, c, manager, "galera: db nodes join", want_db=n, want_seed=1, size=n + 1,
                timeout=DB_TIMEOUT)


def remove_seed(r: Remote, c: Cluster, manager: str) -> None:
    """db-seed to 0; wait until the db nodes alone form the cluster."""
    n = len(c.nodes)
    if observe(r, c, manager).desired(SEED, n) != 0:
        scale(r, c, manager, SEED, 0)
    galera_wait(r, c, manager, "galera: seed removal", want_db=n, want_seed=0, size=n,
                timeout=SEED_REMOVAL_TIMEOUT)


def deploy_steady(r: Remote, c: Cluster, manager: str) -> None:
    """Deploy stack.yml and record it, unless it is the deployed one (looked at again now)."""
    text = steady_file(c).read_text()
    if is_deployed(r, c, manager, text, observe(r, c, manager)):
        progress(manager, "stack: stack.yml is the deployed one: not deploying")
        return
    announce_image(r, c, manager)
    deploy(r, c, manager, steady_file(c))
    record_deploy(r, c, manager, text)


def prune_unused(r: Remote, c: Cluster, manager: str) -> None:
    """Remove this stack's configs and secrets stack.yml does not use."""
    keep = referenced_objects(c, steady_file(c).read_text())
    for note in prune_objects(r, c, manager, keep):
        progress(manager, f"stack: {note}")


def wait_stack(r: Remote, c: Cluster, manager: str) -> None:
    """Wait until stack.yml runs as written with every db Synced; then prune unused objects."""
    n = len(c.nodes)
    expected = expected_replicas(steady_file(c).read_text(), n)
    last: list[Member] = []

    def check(state: StackState) -> list[str]:
        last[:] = members(r, c, state)
        return steady_problems(state, last, expected, n)

    wait_for(r, c, manager, "stack", check, STACK_TIMEOUT, extra=lambda _: _members_line(last))
    prune_unused(r, c, manager)


def probe_ha(r: Remote, c: Cluster, manager: str) -> None:
    """Ask every node from here until one answers Home Assistant's HTTP port."""
    port = c.homeassistant.port
    node, status = probe_http(c, port, HA_PROBE_TIMEOUT)
    progress(node, f"homeassistant: answers HTTP {status} on port {port}")


# ---------------------------------------------------------------------------------------------
# The plan (pure) and converge


def plan(c: Cluster, manager: str, f: GaleraFacts, d: Decision) -> list[Op]:
    """The ops that carry out decision `d`, in order, each shown on `manager`.

    A bootstrap or resume runs `d.steps`. The steady plans (running, recover) run only what
    the facts ask for: deploy stack.yml when it is not the deployed one, wait for the stack
    and probe Home Assistant when either changed or something is not converged yet; a
    converged stack gives [] ("nothing to do"), or only the removal of unused objects."""
    n = len(c.nodes)
    steady = d.kind in ("running", "recover")
    now = f" (now: {'; '.join(f.problems)})" if steady and f.problems else ""

    def op(what: str, step: Callable[..., None]) -> Op:
        return Op(what, call=partial(step, c=c, manager=manager), node=manager)

    ops = {
        "deploy-bootstrap": op("deploy stack.bootstrap.yml (db-seed 1, db 0, homeassistant 0): "
                               "the seed creates the cluster", deploy_bootstrap),
        "wait-seed": op(f"wait until the seed is Synced in a Primary component "
                        f"(at most {SEED_TIMEOUT:g} s)", wait_seed),
        "scale-db": op(f"scale db to {n} (one per node)", scale_db),
        "wait-db-seeded": op(f"wait until {n} db tasks are Synced, cluster size {n + 1} "
                             f"(at most {DB_TIMEOUT:g} s)", wait_db_seeded),
        "remove-seed": op(f"scale db-seed to 0; wait until the cluster size is {n} "
                          f"(at most {SEED_REMOVAL_TIMEOUT:g} s)", remove_seed),
        "deploy-steady": op("deploy stack.yml (it is not the deployed one)", deploy_steady),
        "wait-stack": op(f"wait until every service runs and is healthy, {n} db Synced, "
                         f"cluster size {n}; then remove unused configs and secrets{now}",
                         wait_stack),
        "probe-ha": op(f"ask every node for Home Assistant on HTTP port "
                       f"{c.homeassistant.port} (from here)", probe_ha),
    }
    if not steady:
        return [ops[s] for s in d.steps]
    if f.deployed and not f.problems:
        return [op(f"remove {', '.join(f.unused)} (unused)", prune_unused)] if f.unused else []
    return [ops[s] for s in d.steps if s != "deploy-steady" or not f.deployed]


def converge(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """Bring stack and Galera to the steady state (see the module docstring); return its facts.
    Raises StackError / RemoteError naming what did not converge. With `dryrun`, say what it
    would do."""
    r.redact(*secret_values(c))
    with r.reading():
        manager = find_manager(r, c)
        assert manager is not None
        facts, _ = gather(r, c, manager)
    d = decide(facts, len(c.nodes))
    progress(manager, f"galera: {d.reason}")
    if d.kind == "refuse":
        raise StackError(f"galera: {d.reason}")
    apply_ops(r, c.node(manager), STEP_STACK, plan(c, manager, facts, d), dryrun=dryrun)
    return {} if dryrun else {"decision": d.kind, "steps": list(d.steps)}


def stack_task(c: Cluster, after: Iterable[str] = ()) -> dict[str, Any]:
    """The `stack` task dict: deploy (Galera bootstrap when fresh), converge, Home Assistant up."""
    base = render.build_dir(c)
    task = remote_task(c, STEP_STACK, None,
                       "Deploy the stack (bootstraps Galera when fresh); wait until all "
                       "services run", converge, clean_stack,
                       file_dep=[str(base / "stack.yml"), str(base / "stack.bootstrap.yml")],
                       task_dep=["stack-objects", "swarm", *after])
    return {**task, "basename": "stack"}
