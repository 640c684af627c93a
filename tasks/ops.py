"""The one way haswarm changes a node, as pyinfra does it: facts are read first (several probes
in one round trip: `gather`), a pure `plan_*` function turns them into `Op`s, and `apply_ops`
prints, dry-runs or applies them ("nothing to do" when the list is empty, so a converged re-run
says so). `remote_task` makes the doit task of one remote step: its setup and its clean side by
side; it runs every time (the nodes are the truth) and records its facts (tasks/state.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from doit.exceptions import TaskFailed

from tasks.clean_run import record_failure
from tasks.config import Cluster, Node
from tasks.connection import COMMAND_TIMEOUT
from tasks.errors import HaswarmError
from tasks.state import forget, mark_done

if TYPE_CHECKING:
    from doit.task import Task

    from tasks.remote import Remote


class StepError(HaswarmError):
    """A step cannot go on for a reason the user must resolve; str() says what and what to do."""


# ---------------------------------------------------------------------------------------------
# Operations: what a step will do on a node, shown before (dry run) or while it is done


@dataclass(frozen=True)
class Op:
    """One change: a shell command, a file written through `Remote.put`, a wait (`cmd` polled
    until it succeeds, for at most `wait` seconds) or a Python `call` made with the Remote when
    applied (for what is known only then: swarm's join token exists after `docker swarm init`).

    `node` names the node the op is for when one ordered list spans several nodes (swarm: init
    on one node, then the others join); None means the node given to `apply_ops`."""

    what: str  # for the user: "unmount /mnt/haswarm"
    cmd: str | None = None
    put: tuple[str, str] | None = None  # (remote path, content), written with mode and owner
    hint: str | None = None  # shown when `cmd` fails
    mode: int = 0o644  # of the file `put` writes
    owner: str | None = None  # "user:group" of that file; None: root's when new, else as it is
    timeout: float = COMMAND_TIMEOUT  # seconds `cmd` may take (its deadline; tasks.remote)
    wait: float | None = None  # seconds: poll `cmd` until it exits 0, else fail naming `what`
    call: Callable[[Remote], None] | None = None  # run with the Remote when applied
    # where it runs and is shown; None: the node given to apply_ops; a Node for one the cluster
    # file does not list (tasks/depart.py)
    node: str | Node | None = None


def apply_ops(r: Remote, node: Node, step: str, ops: list[Op], *, dryrun: bool = False) -> bool:
    """Run `ops` in order, each on its `node` (default: `node`), printing each; "nothing to do"
    when empty. With `dryrun`, only print what would be done. Returns whether there was
    anything to do."""
    from tasks.remote import progress

    if not ops:
        progress(node, f"{step}: nothing to do")
        return False
    for op in ops:
        target = op.node or node
        if dryrun:
            progress(target, f"{step}: would {op.what}")
            continue
        progress(target, f"{step}: {op.what}")
        if op.cmd is not None and op.wait is not None:
            _wait(r, target, step, op)
        elif op.cmd is not None:
            r.run(target, step, op.cmd, hint=op.hint, timeout=op.timeout)
        if op.put is not None:
            r.put(target, step, op.put[1], op.put[0], mode=op.mode, owner=op.owner)
        if op.call is not None:
            op.call(r)
    return True


def _wait(r: Remote, node: Node | str, step: str, op: Op) -> None:
    """Run `op.cmd` on `node` until it exits 0; after `op.wait` seconds, a RemoteError saying
    what did not happen, quoting the check's last output."""
    from tasks.remote import Failure, Kind, RemoteError, tail

    assert op.cmd is not None and op.wait is not None
    deadline = time.monotonic() + op.wait
    while not (res := r.run(node, step, op.cmd, check=False, timeout=op.wait, hint=op.hint)).ok:
        if time.monotonic() > deadline:
            n = r.cluster.node(node) if isinstance(node, str) else node
            raise RemoteError([Failure(
                node=n.name, address=n.address, step=step, kind=Kind.TIMEOUT,
                detail=f"not done after {op.wait:g} s: {op.what}", command=op.cmd,
                stderr=tail(res.stdout + res.stderr),
                hint=op.hint or "run the check by hand on the node to see what it waits for")])
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# Running steps on every node, as doit tasks


def say(node: Node | str, msg: str) -> None:
    """`tasks.remote.progress` (imported late: paramiko is slow to import at `doit list`)."""
    from tasks.remote import progress

    progress(node, msg)


def on_nodes(r: Remote, step: str, fn: Callable[[Node], Any],
             nodes: list[Node] | None = None) -> dict[str, Any]:
    """`Remote.on_all`, with StepErrors turned into the remote layer's per-node failures."""
    from tasks.remote import Failure, Kind, RemoteError

    def wrapped(node: Node) -> Any:
        try:
            return fn(node)
        except StepError as e:
            raise RemoteError([Failure(node=node.name, address=node.address, step=step,
                                       kind=Kind.ERROR, detail=e.message, hint=e.hint)]) from None

    return r.on_all(step, wrapped, nodes)


def put_on_nodes(r: Remote, step: str, path: str, text: str, *, dryrun: bool,
                 about: str = "") -> dict[str, Any]:
    """Make `path` (0644 root) hold `text` on every node, written only where it differs, each
    node saying what it did (`about`: added to "wrote PATH"). Returns the step's facts: the
    nodes changed."""

    def one(node: Node) -> bool:
        changed = r.put(node, step, text, path, mode=0o644, owner="root:root", dryrun=dryrun)
        say(node, f"{step}: {'would write' if dryrun else 'wrote'} {path}{about}" if changed
            else f"{step}: nothing to do")
        return changed

    return {"changed": sorted(n for n, ch in on_nodes(r, step, one).items() if ch)}


def run_step(c: Cluster, step: str, fn: Callable[..., dict[str, Any] | None]
             ) -> TaskFailed | None:
    """Run one setup step with an open Remote; on success record its facts (tasks.state)."""
    from tasks.remote import Remote, RemoteError

    started = time.monotonic()
    try:
        with Remote(c, shared=True) as r:
            facts = fn(c, r) or {}
    except (RemoteError, HaswarmError, OSError) as e:
        return TaskFailed(f"{step} failed:\n{e}")
    mark_done(c, step, facts)
    print(f"{step}: done in {time.monotonic() - started:.1f} s", flush=True)
    return None


def clean_step(c: Cluster, step: str, fn: Callable[[Cluster, Remote, bool], None],
               dryrun: bool, task: str | None = None) -> TaskFailed | None:
    """Run one clean step (only reading facts when `dryrun`); then forget the step's record.
    A failure is recorded for this clean run under `task` (the doit task; default: `step`):
    the steps it needs are then not cleaned (tasks/clean_run.py)."""
    from tasks.remote import Remote, RemoteError

    try:
        with Remote(c, shared=True) as r:
            fn(c, r, dryrun)
    except (RemoteError, HaswarmError, OSError) as e:
        return record_failure(task or step, f"{step} (clean) failed:\n{e}")
    except Exception as e:  # a bug: doit shows the traceback; the run still counts it
        record_failure(task or step, f"{step} (clean) failed: {type(e).__name__}: {e}")
        raise
    if not dryrun:
        forget(c, step)
    return None


def remote_task(c: Cluster, step: str, name: str | None, doc: str,
                setup: Callable[..., dict[str, Any] | None],
                clean: Callable[[Cluster, Remote, bool], None],
                file_dep: list[str] | None = None, task_dep: list[str] | None = None
                ) -> dict[str, Any]:
    """The doit task dict of one remote step: its setup action and its clean action side by
    side. It runs on every `doit setup`: the nodes are the truth, not doit's memory, so a node
    wiped or changed by hand is noticed; a converged node costs one read of its facts, and the
    step says "nothing to do". `setup(c, r, dryrun)` only reads and tells with dryrun."""

    def action() -> TaskFailed | None:
        return run_step(c, step, setup)

    def clean_action(dryrun: bool, task: Task) -> TaskFailed | None:
        return clean_step(c, step, clean, dryrun, task.name)  # doit passes `task`

    action.__doc__ = doc
    # doit prints "<task> - executing 'Python: function NAME'" for clean actions
    for f, real in ((action, setup), (clean_action, clean)):
        f.__qualname__ = f.__name__ = f"{real.__module__.rpartition('.')[2]}.{real.__name__}"
    task: dict[str, Any] = {
        "doc": doc,
        "actions": [action],
        "uptodate": [False],  # always ask the nodes (see above)
        "file_dep": list(file_dep or []),
        "task_dep": list(task_dep or []),
        "clean": [clean_action],
        "verbosity": 2,
    }
    if name is not None:
        task["name"] = name
    return task
