"""The lab's doit tasks: lab-engine, lab-up, lab-down, lab-kill, lab-cut, lab-heal, lab-boot,
lab-wipe, lab-status.

Imported by dodo.py only (no module of tasks/ imports the lab). Task creators are cheap: the
lab is touched only when a task runs. `HASWARM_LAB_INSTANCE=NAME` (and `HASWARM_LAB_NODES=N`)
makes them act on an independent second lab (see lab.driver.instance_lab).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tasks.config import LAB_CLUSTER_FILE

if TYPE_CHECKING:
    from lab.driver import Lab

# ---------------------------------------------------------------------------------------------
# doit task creators (the lead wires them into dodo.py). They do no work when loaded: every
# action imports the lab driver, loads config/lab.yml and talks to the lab only when it runs.


def _lab() -> Lab:
    """The lab the tasks act on: the cluster file in use when it is a lab's (`lab: true`: a
    variant of config/lab.yml, e.g. with a node replaced), else config/lab.yml; or with
    HASWARM_LAB_INSTANCE=NAME (and optionally HASWARM_LAB_NODES=N) an independent second lab
    (see instance_lab)."""
    from lab.driver import Lab, instance_lab
    from tasks.config import ConfigError, current, load_cluster
    instance = os.environ.get("HASWARM_LAB_INSTANCE", "")
    if instance:
        count = int(os.environ.get("HASWARM_LAB_NODES", "3"))
        return instance_lab(instance, count, log=print)
    try:
        c = current()
    except ConfigError:  # a broken cluster file of the user's must not stop `doit lab-down`
        c = None
    return Lab(c if c is not None and c.lab else load_cluster(LAB_CLUSTER_FILE), log=print)


def _action(fn: Callable[..., str | None]) -> Callable[..., object]:
    """Wrap an action: print its summary; a LabError (or a bad config) fails the task with
    its message instead of a traceback. (Imports happen when it runs: creators stay cheap.)"""

    @functools.wraps(fn)  # doit passes params by the wrapped function's parameter names
    def run(**kwargs: object) -> object:
        from doit.exceptions import TaskFailed

        from lab.driver import LabError
        from tasks.config import ConfigError
        try:
            msg = fn(**kwargs)
        except (LabError, ConfigError) as e:
            return TaskFailed(str(e), report=True)
        if msg:
            print(msg)
        return None

    return run


def _node_param() -> dict:
    return {"name": "node", "long": "node", "short": "n", "type": str, "default": "",
            "help": "the lab node, e.g. pi1 (see config/lab.yml)"}


def _need_node(lab: Lab, node: str) -> str:
    from lab.driver import LabError

    if not node:
        raise LabError(f"name the node: --node NAME (nodes: {', '.join(lab.names)})")
    lab.node(node)
    return node


def _do_up() -> str:
    lab = _lab()
    t0 = time.monotonic()
    done = lab.up()
    took = time.monotonic() - t0
    nodes = ", ".join(f"{n.name} {n.address}" for n in lab.nodes)
    if not done["started"] and not done["healed"] and not done["services"]:
        return f"lab: all {len(lab.nodes)} nodes already running ({nodes}); nothing to do " \
               f"({took:.1f} s)"
    parts = []
    if done["started"]:
        parts.append(f"started {', '.join(done['started'])}")
    if done["healed"]:
        parts.append(f"link restored for {', '.join(done['healed'])}")
    if done["services"]:
        parts.append(f"started stopped services {', '.join(done['services'])}")
    if done["running"]:
        parts.append(f"already running {', '.join(done['running'])}")
    return (f"lab up in {took:.1f} s: {'; '.join(parts)}\n  nodes: {nodes}\n"
            f"  ssh: ssh -F {lab.ssh_config} {lab.names[0]}")


def _do_down(purge: bool = False) -> str:
    lab = _lab()
    t0 = time.monotonic()
    stopped = lab.down(purge=purge)
    took = time.monotonic() - t0
    what = f"stopped {', '.join(stopped)}" if stopped else "no node was running"
    nodes = lab.state_dir / "nodes"
    kept = (f"node disks removed ({nodes}); the controller key in {lab.ssh_dir} is kept"
            if purge else f"node disks kept in {nodes} (--purge removes them)")
    return f"lab down in {took:.1f} s: {what}; {kept}"


def _do_kill(node: str = "") -> str:
    lab = _lab()
    _need_node(lab, node)
    if lab.kill(node):
        return f"{node} killed (every process at once); bring it back: doit lab-boot --node {node}"
    return f"{node} was not running"


def _do_cut(node: str = "") -> str:
    lab = _lab()
    lab.cut(_need_node(lab, node))
    return f"{node}: link cut (silent); restore it: doit lab-heal --node {node}"


def _do_heal(node: str = "") -> str:
    lab = _lab()
    lab.heal(_need_node(lab, node))
    return f"{node}: link restored"


def _do_boot(node: str = "") -> str:
    lab = _lab()
    _need_node(lab, node)
    t0 = time.monotonic()
    if lab.boot(node):
        return f"{node} booted in {time.monotonic() - t0:.1f} s"
    return f"{node} is already running (link up)"


def _do_wipe(node: str = "") -> str:
    lab = _lab()
    n = lab.node(_need_node(lab, node))
    t0 = time.monotonic()
    fingerprint = lab.wipe(node)
    kh = lab.known_hosts
    return (f"{node} wiped and booted as a bare OS in {time.monotonic() - t0:.1f} s (a re-flashed "
            f"Pi: no Docker images, swarm, glusterd or brick state; a new SSH host key)\n"
            f"  its new host key: {fingerprint}\n"
            f"  {kh} still lists its OLD key: haswarm refuses {node} until you trust the new "
            f"one (README \"Replace a dead Pi\"):\n"
            f"    ssh-keygen -f {kh} -R {n.address}\n"
            f"    ssh-keyscan -t ed25519 {n.address} >> {kh}\n"
            f"  then: doit setup")


def _do_status() -> str:
    lab = _lab()
    st = lab.status()
    br = st["bridge"]
    lines = [f"bridge {br['name']} {br['address']}: {'present' if br['present'] else 'absent'}; "
             f"forward rule: {'present' if st['forward_rule'] else 'absent'}; "
             f"controller engine: {st['controller_engine'] or 'none'}"]
    for name, n in st["nodes"].items():
        mem = f"{n['memory'] / 2**20:.0f} MiB" if n["memory"] is not None else "-"
        lines.append(f"  {name:<10} {n['address']:<15} {n['state']:<8} pid {n['pid'] or '-':<8}"
                     f" memory {mem}")
    return "\n".join(lines)


def _do_engine() -> str:
    return f"docker: {_lab().ensure_controller_engine()}"


def task_lab_engine():
    """A Docker engine on this machine for building images (the lab starts one if none answers)."""
    return {"basename": "lab-engine", "actions": [_action(_do_engine)], "verbosity": 2}


def task_lab_up():
    """Start the local lab (the nodes of config/lab.yml) and wait until every node answers."""
    return {"basename": "lab-up", "actions": [_action(_do_up)], "verbosity": 2}


def task_lab_down():
    """Stop the local lab and remove its host pieces (--purge: also the node disks)."""
    return {"basename": "lab-down", "actions": [_action(_do_down)], "verbosity": 2,
            "params": [{"name": "purge", "long": "purge", "type": bool, "default": False,
                        "help": "also remove the node disks (.lab/nodes)"}]}


def task_lab_kill():
    """Kill a lab node at once, like a power cut (--node NAME)."""
    return {"basename": "lab-kill", "actions": [_action(_do_kill)], "verbosity": 2,
            "params": [_node_param()]}


def task_lab_cut():
    """Cut a lab node's network link silently (--node NAME); lab-heal restores it."""
    return {"basename": "lab-cut", "actions": [_action(_do_cut)], "verbosity": 2,
            "params": [_node_param()]}


def task_lab_heal():
    """Restore the network link of a cut lab node (--node NAME)."""
    return {"basename": "lab-heal", "actions": [_action(_do_heal)], "verbosity": 2,
            "params": [_node_param()]}


def task_lab_boot():
    """Boot a killed lab node again, disk kept, as after a reboot (--node NAME)."""
    return {"basename": "lab-boot", "actions": [_action(_do_boot)], "verbosity": 2,
            "params": [_node_param()]}


def task_lab_wipe():
    """Re-flash a lab node (--node NAME): wiped disk, bare first boot, a new SSH host key."""
    return {"basename": "lab-wipe", "actions": [_action(_do_wipe)], "verbosity": 2,
            "params": [_node_param()]}


def task_lab_status():
    """Show the lab: bridge, and per node state, pid and memory."""
    return {"basename": "lab-status", "actions": [_action(_do_status)], "verbosity": 2}
