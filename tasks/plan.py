"""`doit plan`: what `doit setup` would change on the nodes, read from the nodes themselves.

Every remote step of setup runs in setup's order with `dryrun`: it reads its facts and says, per
node, what it would do ("would ...") or "nothing to do". Nothing is changed on any node (the
controller renders its files and generates missing secrets first, as setup would). A step that
depends on an earlier step's change (the mount before the volume exists) says what it sees now.
A step that cannot read its facts (a node down, no swarm yet) says so and the plan goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from doit.exceptions import TaskFailed

from tasks import (
    avahi,
    depart,
    firewall,
    galera,
    gluster,
    guard,
    homeassistant,
    members,
    onboard,
    stack,
    swarm,
    vip,
)
from tasks.config import Cluster, current
from tasks.errors import HaswarmError
from tasks.images.preload import setup_preload

# The remote steps of each task of `doit setup` (dodo.py's SETUP gives their order), with the
# setup function each runs; it takes (cluster, remote, dryrun) and only reads with dryrun=True.
# The controller's tasks (preflight, secrets, render, images) change no node: none here.
REMOTE_STEPS: dict[str, list[tuple[str, Callable[..., Any]]]] = {
    "depart": [("depart", depart.setup)],
    "preload-images": [("preload-images", setup_preload)],
    "gluster": [("gluster:daemon", gluster.setup_daemon),
                ("gluster:replace", gluster.setup_replace),
                ("gluster:peers", gluster.setup_peers),
                ("gluster:bricks", gluster.setup_bricks),
                ("gluster:volume", gluster.setup_volume),
                ("gluster:mount", gluster.setup_mount),
                ("gluster:dirs", gluster.setup_dirs)],
    "firewall": [("firewall:script", firewall.setup_script),
                 ("firewall:rules", firewall.setup_rules)],
    "ha-files": [("ha-files", homeassistant.setup_files)],
    "avahi": [("avahi:hostname", avahi.setup_hostname), ("avahi:cron", avahi.setup_cron)],
    "members": [("members", members.setup_members)],
    "swarm": [("swarm", swarm.setup)],
    "leader-guard": [("leader-guard", guard.setup)],
    "stack-objects": [("stack-objects", stack.setup_objects)],
    "stack": [("stack", galera.converge)],
    "vip": [("vip", vip.setup)],
    "ha-onboard": [("ha-onboard", onboard.setup)],  # Home Assistant's API, not SSH
}
CONTROLLER_TASKS = ("lab-up", "preflight", "secrets", "render", "images")


def steps(order: list[str]) -> list[tuple[str, Callable[..., Any]]]:
    """The remote steps of setup's tasks `order`, in that order."""
    unknown = [t for t in order if t not in REMOTE_STEPS and t not in CONTROLLER_TASKS]
    assert not unknown, f"tasks/plan.py does not know setup's tasks {unknown}"
    return [step for task in order for step in REMOTE_STEPS.get(task, [])]


def plan(c: Cluster, order: list[str]) -> list[str]:
    """Run every remote step of setup's tasks `order` dry; return the steps that could not tell
    (with why)."""
    from tasks.remote import Remote, RemoteError

    unknown = []
    with Remote(c, shared=True) as r:
        for name, fn in steps(order):
            print(f"-- {name}", flush=True)
            try:
                fn(c, r, True)
            except (RemoteError, HaswarmError, OSError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                print(f"{name}: cannot tell: {first}", flush=True)
                unknown.append(f"{name}: {first}")
    return unknown


def plan_task(order: list[str]) -> dict[str, Any]:
    """The `plan` task: setup's tasks `order` (dodo.py's SETUP) run dry, remote steps only."""
    c = current()

    def action() -> TaskFailed | None:
        unknown = plan(c, order)
        if unknown:
            print(f"plan: {len(unknown)} step(s) could not read their facts; the others are "
                  "shown above", flush=True)
        return None

    return {"basename": "plan", "actions": [action], "task_dep": ["secrets", "render"],
            "uptodate": [False], "verbosity": 2,
            "doc": "Show what `doit setup` would change on each node, from the nodes' facts "
                   "(changes none)"}
