"""The Docker swarm: an odd count of managers (`Cluster.manager_names`: every node, but the
last one listed when there are 4, 6, ...), the dispatcher heartbeat from the cluster file.

Setup reads a *fact* from every node first (`docker info`: swarm state, node ID, cluster ID,
managers, heartbeat), a pure `plan` turns the facts into `Op`s (tasks/ops.py), and `apply_ops`
says or does them, in one ordered list over the nodes:

- no node in a swarm: `docker swarm init --advertise-addr ADDR` on the first node;
- the swarm's old entry of a node that came back re-flashed (same name and address, no swarm
  state: its old node ID is Down and no node has it any more) is demoted and removed from a
  healthy manager (`stale_ops`), BEFORE that node joins again: with 3 managers and one dead,
  2 of 3 reachable is a quorum; demoting the dead one first makes it 2 of 2, the join 3 of 3.
  Joining first would make 4 managers, the dead one and the joining one (until it has caught
  up) unreachable: 2 of 4 is no majority, and the dead entry would stay forever;
- every node not yet in it joins **as a manager** (the last one of an even count as a worker),
  one at a time (the join token is read when the join is applied, after init, and travels
  through the Docker API, never on a command line); a worker of this swarm that should manage
  is promoted, a manager that should not is demoted; then wait until all have their roles;
- `docker swarm update --dispatcher-heartbeat` only when the value differs.

A converged swarm gives no ops: "nothing to do". A node in a *different* swarm (its managers are
not this cluster's nodes), or one stuck joining, stops the task before anything is changed, with
what to do.

Clean mirrors it (`leave_plan`), keeping quorum all the way: the other managers are demoted one
by one from one manager (3 -> 2 -> 1 managers, each change with a majority), the workers leave,
the last manager leaves with `--force`. The facts are read first, so a second clean does nothing.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tasks.config import Cluster, Node
from tasks.ops import Op, StepError, apply_ops, remote_task
from tasks.remote import Failure, Kind, Remote, RemoteError, progress
from tasks.state import forget
from tasks.swarm_facts import (
    SWARM_PORT,
    SwarmFacts,
    advertise_address,
    host_part,
    read_facts,
    read_facts_reachable,
    read_members,
)

if TYPE_CHECKING:
    from tasks.facts_cluster import SwarmNode

STEP = "swarm"
# Stamps of steps whose objects live inside the swarm: leaving the swarm deletes them too.
INSIDE_SWARM = ("stack-objects", "stack")
# Seconds to wait for joined managers to show up Ready and Reachable.
MEMBERSHIP_TIMEOUT = 60.0
# Seconds to wait for a demoted manager to count as a worker (it leaves by force anyway).
DEMOTION_TIMEOUT = 30.0

LEAVE_CMD = "timeout 60 docker swarm leave --force"
LEAVE_DEADLINE = 75.0  # seconds: LEAVE_CMD's own limit and a margin


# ---------------------------------------------------------------------------------------------
# Decisions (pure: unit-tested with recorded facts)


def heartbeat_ns(c: Cluster) -> int:
    """The wanted dispatcher heartbeat in nanoseconds (the unit Docker reports)."""
    return int(round(c.swarm.dispatcher_heartbeat * 1e9))


def _duration(ns: int) -> str:
    """Nanoseconds -> a Go duration `docker swarm update` accepts ('1s', '1500ms')."""
    ms = ns // 1_000_000
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def plan(c: Cluster, facts: dict[str, SwarmFacts], addresses: dict[str, str],
         members: Sequence[SwarmNode] = ()) -> list[Op]:
    """The ops that bring the swarm to the wanted state, in order; [] when it is there.

    `addresses` maps node name -> advertised IP; `members` is the swarm's node list as the
    first manager sees it (`read_members`). With no manager of this swarm the first node inits
    it; old entries of re-flashed nodes are demoted and removed (`stale_ops`); every node in no
    swarm joins as a manager via a manager ("the leader" here), a worker is promoted, then all
    must become Ready managers; the heartbeat is set when it differs. Raises RemoteError, before
    anything is changed, for a node in another swarm or stuck (`_this_swarm`), and StepError for
    a swarm without quorum (`stale_ops`).
    """
    managers, workers = _this_swarm(c, facts, addresses)
    leader = managers[0] if managers else c.nodes[0].name
    ops = []
    if not managers:
        addr = addresses[leader]
        ops.append(Op(f"init (advertise {addr})", node=leader,
                      cmd=f"docker swarm init --advertise-addr {shlex.quote(addr)} "
                          f"--listen-addr 0.0.0.0:{SWARM_PORT}"))
    else:
        ops += stale_ops(c, facts, addresses, members, leader)
    wanted = c.manager_names
    # one at a time: each join is a raft membership change
    ops += [_join_op(c, n.name, leader, addresses, manager=n.name in wanted) for n in c.nodes
            if n.name != leader and facts[n.name].state == "inactive"]
    ops += [Op(f"promote {name} (a worker) to manager", node=leader,
               cmd=f"docker node promote {shlex.quote(facts[name].node_id)}")
            for name in workers if name in wanted]
    ops += [Op(f"demote {name} to a worker ({len(c.nodes)} nodes: {len(wanted)} managers keep "
               "the raft odd)", node=leader,
               cmd=f"docker node demote {shlex.quote(facts[name].node_id)}")
            for name in managers if name not in wanted]
    membership_changes = bool(ops)
    want, have = heartbeat_ns(c), facts[leader].heartbeat_ns
    if not managers or have != want:
        old = "to" if not managers else "unset ->" if have is None else f"{have / 1e9:g} s ->"
        ops.append(Op(f"set the dispatcher heartbeat {old} {want / 1e9:g} s", node=leader,
                      cmd=f"docker swarm update --dispatcher-heartbeat {_duration(want)}"))
    if membership_changes:
        others = [n for n in c.names if n not in wanted]
        ops.append(Op(f"wait until {', '.join(wanted)} are Ready managers"
                      + (f" and {', '.join(others)} a Ready worker" if others else ""),
                      node=leader,
                      cmd=managers_ready_check(c, addresses), wait=MEMBERSHIP_TIMEOUT,
                      hint="check the missing nodes' dockerd (`journalctl -u docker`) and that "
                           f"they reach each other on TCP {SWARM_PORT} and 7946"))
    return ops


def stale_entries(c: Cluster, facts: dict[str, SwarmFacts], addresses: dict[str, str],
                  members: Sequence[SwarmNode]) -> list[tuple[str, SwarmNode]]:
    """(cluster node, entry) for every entry of the swarm's node list that stands for a cluster
    node under an ID no node has any more: not Ready, its address (or, with none known, its
    hostname) the node's, and its ID not the one any node reports (a re-flashed node reports
    none, or a new one once it joined). `facts` holds every node: a node that is merely down
    fails the step before this, so its entry is never taken for a stale one."""
    live = {f.node_id for f in facts.values() if f.node_id}
    out = []
    for e in members:
        if e.id in live or e.state == "ready":
            continue
        raft_ip = host_part(e.manager_addr) if e.manager_addr else ""
        addr = "" if e.addr in ("", "0.0.0.0") else e.addr
        for n in c.nodes:
            ip = addresses[n.name]
            if addr == ip or raft_ip == ip or (not addr and not raft_ip and e.host == n.name):
                out.append((n.name, e))
                break
    return out


def departed_entries(c: Cluster, addresses: dict[str, str],
                     members: Sequence[SwarmNode]) -> list[SwarmNode]:
    """Entries of the swarm's node list that stand for no node of the cluster file (by address,
    raft address or hostname): a Pi replaced by another one under a new name and address, or
    removed from `nodes:`. A dead one leaves the swarm (`stale_ops`); one that still runs is
    refused (switch it off first: its own firewall keeps the new node out of Gluster too)."""
    ips, names = set(addresses.values()), set(c.names)
    return [e for e in members if e.addr not in ips and e.host not in names
            and not (e.manager_addr and host_part(e.manager_addr) in ips)]


def stale_ops(c: Cluster, facts: dict[str, SwarmFacts], addresses: dict[str, str],
              members: Sequence[SwarmNode], via: str) -> list[Op]:
    """Demote (a manager) and remove every stale entry (`stale_entries`), one at a time, from
    the manager `via`, BEFORE any join.

    Quorum, explicitly: a raft of M managers changes only while more than M/2 are reachable.
    With 3 managers and one dead, 2 of 3 are: demoting the dead one makes it 2 of 2, then the
    re-flashed node joins (3 of 3). Joining first would make 4 managers with 2 unreachable while
    it syncs (2 of 4 is no majority). With no quorum now (2 of 3 dead), nothing can be changed:
    StepError saying how to recover (`docker swarm init --force-new-cluster`)."""
    departed = departed_entries(c, addresses, members)
    running = [e for e in departed if e.state == "ready"]
    if running:
        raise StepError(
            f"{', '.join(f'{e.host} ({e.addr})' for e in running)} is in the swarm but not in "
            "the cluster file, and the swarm still sees it Ready: nothing was changed.\n  what "
            "to do: switch it off (or run `docker swarm leave --force` on it; just switched "
            "off: wait until `docker node ls` shows it Down), then run the task again; haswarm "
            "does not log in to a Pi the cluster file no longer lists")
    stale = stale_entries(c, facts, addresses, members)
    stale += [(e.host or e.addr, e) for e in departed]
    if not stale:
        return []
    raft = [e for e in members if e.in_raft]
    reachable = [e for e in raft if e.leader or e.reachability == "reachable"]
    gone = {e.id for _, e in stale if e.in_raft}
    if len(reachable) * 2 <= len(raft) or \
            len([e for e in reachable if e.id not in gone]) * 2 <= len(raft) - len(gone):
        raise StepError(
            f"the swarm's old entries of {', '.join(n for n, _ in stale)} must go first, but "
            f"only {len(reachable)} of its {len(raft)} managers are reachable: no quorum "
            "(more than half), the swarm can change nothing.\n  what to do: on a healthy "
            f"manager (e.g. {via}) run `docker swarm init --force-new-cluster --advertise-addr "
            f"{addresses[via]}` (keeps services, makes it the only manager), then run the task "
            "again")
    ops: list[Op] = []
    size = len(raft)
    for name, e in stale:
        ident = shlex.quote(e.id)
        if e.role == "manager" or e.in_raft:
            ops.append(Op(
                f"demote the swarm's old entry of {name} (ID {e.id[:12]}, {e.state}, manager "
                f"{e.reachability or 'not reachable'}): {size} -> {size - 1} managers, "
                f"{len(reachable)} reachable", cmd=f"docker node demote {ident}", node=via,
                hint="a swarm without quorum cannot demote: see `docker node ls` on the node"))
            ops.append(Op(
                f"wait until it has left the managers' raft (at most {DEMOTION_TIMEOUT:g} s)",
                cmd="[ -z \"$(docker node inspect --format '{{if .ManagerStatus}}m{{end}}' "
                    f"{ident})\" ]", wait=DEMOTION_TIMEOUT, node=via,
                hint="the swarm keeps a member only while a quorum stays reachable without it: "
                     "see `docker node ls`"))
            size -= 1
        ops.append(Op(f"remove the swarm's old entry of {name} (ID {e.id[:12]})",
                      cmd=f"docker node rm --force {ident}", node=via))
    return ops


def _this_swarm(c: Cluster, facts: dict[str, SwarmFacts], addresses: dict[str, str]
                ) -> tuple[list[str], list[str]]:
    """(managers, workers) of "this swarm": the one whose managers are mostly cluster nodes.

    A node in any other swarm, in a second swarm of cluster nodes, stuck (pending, locked,
    error), or a worker of a swarm with no manager answering, is a problem: RemoteError naming
    every such node and what to do, before anything is changed.
    """
    ours_ips = set(addresses.values())
    by_ip = {ip: name for name, ip in addresses.items()}
    problems: list[tuple[str, str]] = []

    def managers_named(f: SwarmFacts) -> str:
        return ", ".join(by_ip.get(m, m) for m in f.managers) or "unknown"

    def mostly_ours(managers: tuple[str, ...]) -> bool:
        """More than half of the managers are nodes of the cluster file (the others are Pis
        it no longer lists: they leave, `departed_entries`)."""
        return not managers or len(set(managers) & ours_ips) * 2 > len(set(managers))

    # Candidate swarms: cluster IDs of managers whose manager list holds mostly our nodes.
    candidates: dict[str, list[str]] = {}
    foreign: dict[str, SwarmFacts] = {}
    for n in c.nodes:
        f = facts[n.name]
        if f.state == "inactive":
            continue
        if f.state in ("pending", "error", "locked"):
            problems.append((n.name, _stuck_hint(n.name, f)))
            continue
        if f.manager and f.cluster_id and mostly_ours(f.managers):
            candidates.setdefault(f.cluster_id, []).append(n.name)
        elif f.manager or not mostly_ours(f.managers):
            foreign[n.name] = f

    cluster_id = next(iter(candidates), "")
    listing = "; ".join(f"{cid[:12]}: {', '.join(ns)}" for cid, ns in candidates.items())
    for cid, ns in candidates.items():
        if cid == cluster_id:
            continue
        for name in ns:
            problems.append((name, (
                f"{name} is a manager of a different swarm than "
                f"{', '.join(candidates[cluster_id])} "
                f"(swarms: {listing}). One cluster needs one swarm: on {name} run "
                f"`docker swarm leave --force` (this removes every service of that swarm "
                f"from it), then run the task again")))

    for name, f in foreign.items():
        where = f"cluster {f.cluster_id[:12]}, " if f.cluster_id else ""
        problems.append((name, (
            f"{name} is already in another swarm ({where}managers: {managers_named(f)}), not "
            f"one made of this cluster's nodes. haswarm does not take a node out of a swarm it "
            f"did not make: if that swarm is no longer needed, run `docker swarm leave --force` "
            f"on {name} (add `docker node rm` on that swarm's managers), or remove {name} from "
            f"the cluster file; then run the task again")))

    managers = [n for n in c.names if cluster_id and facts[n].active and facts[n].manager
                and facts[n].cluster_id == cluster_id]
    workers = [n for n in c.names if n not in foreign and facts[n].active
               and not facts[n].manager]
    if workers and not managers:
        # Workers of a swarm none of whose managers we can see: leave it to the user.
        problems += [(name, (
            f"{name} is a worker of a swarm whose managers ({managers_named(facts[name])}) "
            f"do not answer as managers: run `docker swarm leave --force` on {name} and run "
            f"the task again")) for name in workers]
    if problems:
        raise RemoteError([_problem(c, name, msg) for name, msg in problems])
    return managers, workers


def _stuck_hint(name: str, f: SwarmFacts) -> str:
    if f.state == "locked":
        return (f"{name}'s swarm is locked (autolock): unlock it with `docker swarm unlock` and "
                f"its unlock key, or leave it with `docker swarm leave --force`; then run the "
                "task again")
    detail = f": {f.error}" if f.error else ""
    return (f"{name} is stuck in swarm state {f.state!r}{detail} (a join that never completed). "
            f"Run `docker swarm leave --force` on {name} and run the task again")


def _problem(c: Cluster, name: str, msg: str) -> Failure:
    return Failure(node=name, address=c.node(name).address, step="swarm: check membership",
                   kind=Kind.ERROR, detail="nothing was changed on any node", hint=msg)


def managers_ready_check(c: Cluster, addresses: dict[str, str]) -> str:
    """A shell check for a manager: exits 0 when every node of `c.manager_names` is a Ready and
    reachable manager (the leader counts as reachable), matched by its raft address, and every
    other node a Ready worker, matched by its address; else it prints the nodes that are not,
    and the swarm's view."""
    node_ls = ("ids=$(timeout 10 docker node ls -q) && timeout 10 docker node inspect --format "
               "'{{.Status.State}}/{{with .ManagerStatus}}{{.Reachability}}@{{.Addr}}"
               "{{else}}worker@{{.Status.Addr}}{{end}}' $ids 2>&1")
    lines = [f"t=$({node_ls})", "ok=0"]
    for n in c.nodes:
        ip = addresses[n.name]
        if n.name in c.manager_names:
            want = f"ready/reachable@{f'[{ip}]' if ':' in ip else ip}:{SWARM_PORT}"
            role = "manager"
        else:
            want, role = f"ready/worker@{ip}", "worker"
        lines.append(f"echo \"$t\" | grep -qxF {shlex.quote(want)} || "
                     f"{{ echo {shlex.quote(f'{n.name} is not a Ready {role} yet')}; ok=1; }}")
    lines += ["[ $ok = 0 ] || printf 'the swarm sees (state/reachability@address):\\n%s\\n' \"$t\"",
              "exit $ok"]
    return "; ".join(lines)


def leave_plan(c: Cluster, facts: dict[str, SwarmFacts], addresses: dict[str, str]
               ) -> tuple[list[Op], list[str]]:
    """The ops taking every node out of its swarm keeping a quorum at every step, and notes on
    the nodes left alone (`facts` holds the reachable nodes only).

    Per swarm made of cluster nodes (several after a half-failed setup), its first manager
    demotes the others one at a time (3 -> 2 -> 1 managers, each change with a majority); then
    every other node leaves; then that manager leaves with --force, ending its swarm. Nodes in
    a swarm whose managers are not all cluster nodes are left alone.
    """
    ours_ips = set(addresses.values())
    skipped: list[str] = []
    leave: list[str] = []
    groups: dict[str, list[str]] = {}
    for n in c.nodes:
        f = facts.get(n.name)
        if f is None or f.state == "inactive":
            continue
        if not set(f.managers) <= ours_ips:
            skipped.append(f"{n.name} is in another swarm (managers: {', '.join(f.managers)}): "
                           "left as it is")
        elif f.active and f.manager and f.cluster_id:
            groups.setdefault(f.cluster_id, []).append(n.name)
        else:
            leave.append(n.name)  # workers and stuck nodes: leaving changes no quorum
    ops: list[Op] = []
    for via, *others in groups.values():
        ops += [_demote_op(via, name, facts[name].node_id) for name in others]
        leave += others
    hint = "run `docker swarm leave --force` on the node by hand"
    ops += [Op("leave", LEAVE_CMD, node=name, hint=hint, timeout=LEAVE_DEADLINE)
            for name in sorted(leave, key=c.names.index)]
    ops += [Op("leave (last manager: the swarm ends)", LEAVE_CMD, node=via, hint=hint,
               timeout=LEAVE_DEADLINE)
            for via, *_ in groups.values()]
    return ops, skipped


# ---------------------------------------------------------------------------------------------
# Changes made with values known only when applied (the Ops' `call`)


def _join_op(c: Cluster, name: str, leader: str, addresses: dict[str, str], *,
             manager: bool = True) -> Op:
    """`name` joins as a manager (or a worker) via `leader`, with the join token read when
    applied (the swarm may not exist before then)."""
    role = "manager" if manager else "worker"

    def join(r: Remote) -> None:
        token = r.run(leader, "swarm: join token", f"docker swarm join-token -q {role}"
                      ).stdout.strip()
        r.redact(token)
        _join(r, c.node(name), addresses[name], addresses[leader], token)

    return Op(f"join as {role} via {leader}", call=join, node=name)


def _join(r: Remote, node: Node, addr: str, leader_addr: str, token: str) -> None:
    """`docker swarm join` as a manager through the Docker API (the token stays off any
    command line, where `ps` on the node would show it)."""
    import docker

    client = r.docker(node)
    try:
        client.swarm.join(remote_addrs=[f"{leader_addr}:{SWARM_PORT}"], join_token=token,
                          listen_addr=f"0.0.0.0:{SWARM_PORT}", advertise_addr=addr)
    except docker.errors.APIError as e:
        explanation = str(getattr(e, "explanation", "") or e)
        raise RemoteError([Failure(
            node=node.name, address=node.address, step="swarm: join", kind=Kind.COMMAND,
            detail=explanation.replace(token, "***"),
            hint=(f"{node.name} must reach {leader_addr} on TCP {SWARM_PORT} (swarm control), "
                  "TCP/UDP 7946 (gossip) and UDP 4789 (overlay): check firewalls; if the node "
                  "is half-joined, run `docker swarm leave --force` on it and run the task "
                  "again"),
        )]) from None


def _demote_op(via: str, name: str, node_id: str) -> Op:
    """`name` demoted to worker on `via`, then waited for. A failed demotion (a swarm without
    quorum cannot demote) is reported and does not stop clean: the node leaves by force."""

    def demote(r: Remote) -> None:
        res = r.run(via, "swarm: demote", f"docker node demote {shlex.quote(node_id)}",
                    check=False, timeout=60)
        if not res.ok:
            progress(name, f"swarm: demotion failed ({res.stderr.strip()[:200]}); "
                           "it leaves by force instead")
            return
        still_manager = ("docker node inspect --format '{{if .ManagerStatus}}manager{{end}}' "
                         + shlex.quote(node_id))
        deadline = time.monotonic() + DEMOTION_TIMEOUT
        while time.monotonic() < deadline and r.run(via, "swarm: demote", still_manager,
                                                     check=False).stdout.strip():
            time.sleep(0.5)

    return Op(f"demote to worker (via {via})", call=demote, node=name)


# ---------------------------------------------------------------------------------------------
# Setup and clean: facts -> plan -> apply


def setup(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """Bring the swarm to the wanted state; return its facts (cluster ID, managers). Raises
    RemoteError. With `dryrun` only read the facts and say what would change."""
    addresses = {n.name: advertise_address(n) for n in c.nodes}
    with r.reading():
        facts = read_facts(r)
        try:
            managers, _ = _this_swarm(c, facts, addresses)
        except RemoteError:
            managers = []  # `plan` raises it again, naming every node
        members = read_members(r, managers[0]) if managers else []
    changed = apply_ops(r, c.nodes[0], STEP, plan(c, facts, addresses, members), dryrun=dryrun)
    if dryrun:
        return {}
    if changed:
        facts = read_facts(r)
    managers = [n for n in c.names if facts[n].active and facts[n].manager]
    workers = [n for n in c.names if facts[n].active and not facts[n].manager]
    first = facts[managers[0]]
    heartbeat = f"dispatcher heartbeat {(first.heartbeat_ns or 0) / 1e9:g} s"
    roles = f"{len(managers)} managers ({', '.join(managers)})" + (
        f", worker {', '.join(workers)}" if workers else "")
    progress(managers[0], f"swarm: {roles}, {heartbeat}" if changed
             else f"swarm: managers already as wanted: {roles}, {heartbeat}")
    return {"cluster_id": first.cluster_id, "managers": managers}


def teardown(c: Cluster, r: Remote, dryrun: bool = False) -> list[str]:
    """Take every node out of this swarm, keeping quorum; returns messages for the user. With
    `dryrun` only read the facts and say what would be done.

    Unreachable nodes are reported (they still believe they are in the swarm) but do not stop
    the others from leaving.
    """
    addresses = {n.name: advertise_address(n) for n in c.nodes}
    facts, failures = read_facts_reachable(r)
    notes = [f"{f.node}: unreachable ({f.detail}); it may still believe it is in the swarm: "
             "once it is back, run `doit clean` again (or `docker swarm leave --force` on it)"
             for f in failures]
    ops, skipped = leave_plan(c, facts, addresses)
    notes += skipped
    if not ops:
        notes.append("swarm: no node is in this swarm: nothing to remove")
        return notes
    apply_ops(r, c.nodes[0], STEP, ops, dryrun=dryrun)
    if dryrun:
        return notes
    left, _ = read_facts_reachable(r, [c.node(op.node) for op in ops
                                       if op.cmd == LEAVE_CMD and op.node])
    stuck = [n for n, f in left.items() if f.state != "inactive"]
    if stuck:
        raise RemoteError([Failure(
            node=n, address=c.node(n).address, step="swarm: leave", kind=Kind.ERROR,
            detail=f"still in swarm state {left[n].state!r} after leaving",
            hint=f"run `docker swarm leave --force` on {n} by hand") for n in stuck])
    notes.append(f"swarm: {len(left)} node(s) left the swarm")
    return notes


# ---------------------------------------------------------------------------------------------
# doit


def clean(c: Cluster, r: Remote, dryrun: bool) -> None:
    """Every node leaves the swarm (`teardown`); the steps inside it are forgotten too."""
    for note in teardown(c, r, dryrun=dryrun):
        print(note, flush=True)
    if not dryrun:
        for step in INSIDE_SWARM:
            forget(c, step)


def swarm_task(c: Cluster, after: Sequence[str] = ()) -> dict[str, Any]:
    """The `swarm` task dict; `after` names tasks that must run first (gluster, avahi,
    preload-images)."""

    def form(cl: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
        try:
            return setup(cl, r, dryrun)
        except ValueError as e:  # an address that is no IP and does not resolve
            raise StepError(str(e)) from None

    form.__name__ = "setup"
    task = remote_task(c, STEP, None,
                       "Form the Docker swarm (all nodes managers; dispatcher heartbeat)",
                       form, clean, task_dep=list(after))
    return {**task, "basename": "swarm"}
