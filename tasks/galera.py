"""The Galera bootstrap, automated: what the 2019 system left to four clicks in Portainer.

`converge(c)` reads facts, `decide()` (pure, unit-tested) picks a plan, and the plan's steps run
in order, each waiting with progress and a timeout that names what did not converge:

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
    db already runs Synced (a re-run): no bootstrap, deploy-steady only if stack.yml changed;
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
from typing import Any

from tasks import render
from tasks.config import Cluster, Node
from tasks.errors import StackError
from tasks.facts import GaleraMember, galera_command, parse_galera
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

    def synced(self, service: str) -> list[Member]:
        """Synced members of `service`."""
        return [m for m in self.members if m.service == service and m.synced]

    def running(self, service: str) -> list[Member]:
        """Running containers of `service`, whatever their Galera state."""
        return [m for m in self.members if m.service == service]


def gather(r: Remote, c: Cluster, manager: str) -> tuple[GaleraFacts, StackState]:
    """Read the facts `decide` needs (volumes only when no db task is Synced)."""
    state = observe(r, c, manager)
    ms = members(r, c, state)
    facts = GaleraFacts(
        seed_desired=state.services[SEED].desired if SEED in state.services else None,
        db_desired=state.services[DB].desired if DB in state.services else None,
        members=ms)
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
# Steps


def _members_line(ms: Iterable[Member]) -> str:
    ms = list(ms)
    if not ms:
        return ""
    sizes = {m.cluster_size for m in ms if m.synced}
    size = f", cluster size {max(sizes)}" if sizes else ""
    ordered = sorted(ms, key=lambda m: (m.service == SEED, m.node))
    return f" | galera: {', '.join(m.describe() for m in ordered)}{size}"


class _Run:
    """One converge run: the connection, the manager, the cluster, and the step functions."""

    def __init__(self, r: Remote, c: Cluster, manager: str):
        self.r, self.c, self.manager = r, c, manager
        self.n = len(c.nodes)
        self.steady = render.build_dir(c) / "stack.yml"
        self.bootstrap = render.build_dir(c) / "stack.bootstrap.yml"
        self.last_members: list[Member] = []

    def galera_wait(self, what: str, want_db: int | None, want_seed: int, size: int | None,
                    timeout: float) -> None:
        """Wait until `want_db` db (None: any number, not looked at) and `want_seed` seed
        members run and are Synced, and every member looked at sees `size` (None: any)."""

        def check(state: StackState) -> list[str]:
            ms = members(self.r, self.c, state)
            self.last_members = ms
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

        wait_for(self.r, self.c, self.manager, what, check, timeout,
                 extra=lambda _: _members_line(self.last_members))

    # -- the steps ----------------------------------------------------------------------------

    def deploy_bootstrap(self) -> None:
        facts, _ = gather(self.r, self.c, self.manager)  # look again right before seeding
        if facts.synced(DB) or facts.data_nodes or facts.unknown_nodes:
            raise StackError("galera: refusing to start the seed: a db task is Synced or a "
                             "database volume holds data (or a node did not answer); run the "
                             "task again")
        deploy(self.r, self.c, self.manager, self.bootstrap)

    def wait_seed(self) -> None:
        # Only the seed: after an interrupted run db nodes may already be joining it.
        self.galera_wait("galera: seed", want_db=None, want_seed=1, size=None,
                         timeout=SEED_TIMEOUT)

    def scale_db(self) -> None:
        state = observe(self.r, self.c, self.manager)
        if state.desired(DB, self.n) != self.n:
            scale(self.r, self.c, self.manager, DB, self.n)

    def wait_db_seeded(self) -> None:
        self.galera_wait("galera: db nodes join", want_db=self.n, want_seed=1, size=self.n + 1,
                         timeout=DB_TIMEOUT)

    def remove_seed(self) -> None:
        state = observe(self.r, self.c, self.manager)
        if state.desired(SEED, self.n) != 0:
            scale(self.r, self.c, self.manager, SEED, 0)
        self.galera_wait("galera: seed removal", want_db=self.n, want_seed=0, size=self.n,
                         timeout=SEED_REMOVAL_TIMEOUT)

    def describe(self, d: Decision) -> None:
        """What `d` would do, said without doing it (a dry run)."""
        if d.kind != "running":
            progress(self.manager, f"stack: would run {', '.join(d.steps)}")
            return
        state = observe(self.r, self.c, self.manager)
        text = self.steady.read_text()
        deployed = is_deployed(self.r, self.c, self.manager, text, state)
        if not deployed:
            progress(self.manager, "stack: would deploy stack.yml (it changed)")
        problems = state.problems(expected_replicas(text, self.n), self.n)
        for p in problems:
            progress(self.manager, f"stack: would wait for: {p}")
        if deployed and not problems:
            progress(self.manager, "stack: nothing to do")

    def deploy_steady(self) -> None:
        text = self.steady.read_text()
        state = observe(self.r, self.c, self.manager)
        if is_deployed(self.r, self.c, self.manager, text, state):
            progress(self.manager, "stack: stack.yml is the deployed one: not deploying")
            return
        deploy(self.r, self.c, self.manager, self.steady)
        record_deploy(self.r, self.c, self.manager, text)

    def wait_stack(self) -> None:
        text = self.steady.read_text()
        expected = expected_replicas(text, self.n)

        def check(state: StackState) -> list[str]:
            problems = state.problems(expected, self.n)
            ms = members(self.r, self.c, state)
            self.last_members = ms
            synced = [m for m in ms if m.service == DB and m.synced]
            if len(synced) != expected.get(DB, self.n):
                problems.append(f"db: {len(synced)} of {expected.get(DB, self.n)} Synced")
            sizes = {m.cluster_size for m in ms}
            if ms and sizes != {expected.get(DB, self.n)}:
                problems.append(f"galera: wsrep_cluster_size {sorted(sizes)}, want "
                                f"{expected.get(DB, self.n)}")
            return problems

        wait_for(self.r, self.c, self.manager, "stack", check, STACK_TIMEOUT,
                 extra=lambda _: _members_line(self.last_members))
        notes = prune_objects(self.r, self.c, self.manager, referenced_objects(self.c, text))
        for note in notes:
            progress(self.manager, f"stack: {note}")

    def probe_ha(self) -> None:
        port = self.c.homeassistant.port
        node, status = probe_http(self.c, port, HA_PROBE_TIMEOUT)
        progress(node, f"homeassistant: answers HTTP {status} on port {port}")


# Each step name of a Decision and the _Run method that does it.
STEP_ACTIONS: dict[str, Callable[[_Run], None]] = {
    "deploy-bootstrap": _Run.deploy_bootstrap,
    "wait-seed": _Run.wait_seed,
    "scale-db": _Run.scale_db,
    "wait-db-seeded": _Run.wait_db_seeded,
    "remove-seed": _Run.remove_seed,
    "deploy-steady": _Run.deploy_steady,
    "wait-stack": _Run.wait_stack,
    "probe-ha": _Run.probe_ha,
}


def converge(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """Bring stack and Galera to the steady state (see the module docstring); return its facts.
    Raises StackError / RemoteError naming what did not converge. With `dryrun`, say what it
    would do."""
    r.redact(*secret_values(c))
    manager = find_manager(r, c)
    assert manager is not None
    facts, _ = gather(r, c, manager)
    d = decide(facts, len(c.nodes))
    progress(manager, f"galera: {d.reason}")
    if d.kind == "refuse":
        raise StackError(f"galera: {d.reason}")
    run = _Run(r, c, manager)
    if dryrun:
        run.describe(d)
        return {}
    for step in d.steps:
        STEP_ACTIONS[step](run)
    return {"decision": d.kind, "steps": list(d.steps)}


def stack_task(c: Cluster, after: Iterable[str] = ()) -> dict[str, Any]:
    """The `stack` task dict: deploy (Galera bootstrap when fresh), converge, Home Assistant up."""
    from tasks.ops import remote_task

    base = render.build_dir(c)
    task = remote_task(c, STEP_STACK, None,
                       "Deploy the stack (bootstraps Galera when fresh); wait until all "
                       "services run", converge, clean_stack,
                       file_dep=[str(base / "stack.yml"), str(base / "stack.bootstrap.yml")],
                       task_dep=["stack-objects", "swarm", *after])
    return {**task, "basename": "stack"}
