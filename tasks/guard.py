"""The leader guard: keep the swarm's raft leader off the node running Home Assistant.

When the leader dies, swarm reschedules nothing until the other managers have elected a new one
(etcd-raft picks 10-19 s; Docker does not let it be tuned) and that one has waited out its
grace for the dead node. When the leader also ran Home Assistant, HA's failover takes that long
(measured ~30 s against ~7 s from a node that was not the leader). The guard moves leadership
away before any fault: a script run every minute by cron on every node, looking every few
seconds, demotes a leader that runs Home Assistant (leadership passes to another manager at
once) and promotes it back (stack/leader-guard.sh.j2 says exactly when it acts).

    leader-guard  /usr/local/sbin/haswarm-leader-guard (0755) and /etc/cron.d/haswarm-leader-guard
                  (0644) from the rendered files, or both absent when swarm.leader_guard is
                  false.                                clean: both removed
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

from tasks import render
from tasks.config import Cluster, Node, current
from tasks.ops import Op, apply_ops, on_nodes, remote_task

if TYPE_CHECKING:
    from tasks.remote import Remote

SCRIPT = "/usr/local/sbin/haswarm-leader-guard"
CRON_FILE = "/etc/cron.d/haswarm-leader-guard"


def files(c: Cluster) -> dict[str, tuple[str, int]]:
    """{path on the node: (content, mode)} of what the guard installs (empty when off)."""
    if not c.swarm.leader_guard:
        return {}
    b = render.build_dir(c)
    return {SCRIPT: ((b / "leader-guard.sh").read_text(), 0o755),
            CRON_FILE: ((b / "leader-guard.cron").read_text(), 0o644)}


def _present(r: Remote, node: Node, step: str) -> list[str]:
    paths = " ".join(shlex.quote(p) for p in (SCRIPT, CRON_FILE))
    out = r.run(node, step, f"for f in {paths}; do [ -e \"$f\" ] && echo \"$f\"; done; true")
    return out.stdout.split()


def plan_remove(present: list[str], why: str) -> list[Op]:
    """Remove what is present (the cron file first: no new run starts)."""
    order = [p for p in (CRON_FILE, SCRIPT) if p in present]
    return [Op(f"remove {p}{why}", f"rm -f {shlex.quote(p)}") for p in order]


def setup(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """Install the script and its cron entry on every node (or remove them when off)."""
    step = "leader-guard"
    wanted = files(c)

    def one(node: Node) -> bool:
        from tasks.remote import progress

        if not wanted:
            with r.reading():
                present = _present(r, node, step)
            return apply_ops(r, node, step, plan_remove(present,
                                                        " (swarm.leader_guard is off)"),
                             dryrun=dryrun)
        changed = False
        for path in (SCRIPT, CRON_FILE):  # the script before the cron entry that runs it
            text, mode = wanted[path]
            if r.put(node, step, text, path, mode=mode, owner="root:root", dryrun=dryrun):
                progress(node, f"{step}: {'would write' if dryrun else 'wrote'} {path}")
                changed = True
        if not changed:
            progress(node, f"{step}: nothing to do")
        return changed

    return {"changed": sorted(n for n, ch in on_nodes(r, step, one).items() if ch)}


def clean(c: Cluster, r: Remote, dryrun: bool) -> None:
    """Remove the cron entry and the script from every node."""
    step = "leader-guard (clean)"

    def one(node: Node) -> None:
        apply_ops(r, node, step, plan_remove(_present(r, node, step), ""), dryrun=dryrun)

    on_nodes(r, step, one)


def task_leader_guard() -> dict[str, Any]:
    """Keep the swarm leader off Home Assistant's node (a cron-run guard on every node)."""
    c = current()
    b = render.build_dir(c)
    deps = [str(b / "leader-guard.sh"), str(b / "leader-guard.cron")] \
        if c.swarm.leader_guard else []
    task = remote_task(c, "leader-guard", None,
                       f"{SCRIPT} and {CRON_FILE} on every node" if c.swarm.leader_guard
                       else f"{CRON_FILE} absent (swarm.leader_guard is off)",
                       setup, clean,
                       file_dep=deps, task_dep=["swarm"])
    return {**task, "basename": "leader-guard"}
