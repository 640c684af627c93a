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

from tasks.config import Cluster, Node
from tasks.errors import HaswarmError
from tasks.state import forget, mark_done

if TYPE_CHECKING:
    from tasks.remote import Remote


class StepError(HaswarmError):
    """A step cannot go on for a reason the user must resolve; str() says what and what to do."""


# ---------------------------------------------------------------------------------------------
# Operations: what a step will do on a node, shown before (dry run) or while it is done


@dataclass(frozen=True)
class Op:
    """One change on one node: a shell command, or a file written through `Remote.put`."""

    what: str  # for the user: "unmount /mnt/haswarm"
    cmd: str | None = None
    put: tuple[str, str] | None = None  # (remote path, content), written with mode and owner
    hint: str | None = None  # shown when `cmd` fails
    mode: int = 0o644  # of the file `put` writes
    owner: str | None = None  # "user:group" of that file; None: root's when new, else as it is
    timeout: float | None = None  # seconds `cmd` may take; None: as long as it runs


def apply_ops(r: Remote, node: Node, step: str, ops: list[Op], *, dryrun: bool = False) -> bool:
    """Run `ops` on `node` in order, printing each; "nothing to do" when empty. With `dryrun`,
    only print what would be done. Returns whether there was anything to do."""
    from tasks.remote import progress

    if not ops:
        progress(node, f"{step}: nothing to do")
        return False
    for op in ops:
        if dryrun:
            progress(node, f"{step}: would {op.what}")
            continue
        progress(node, f"{step}: {op.what}")
        if op.cmd is not None:
            r.run(node, step, op.cmd, hint=op.hint, timeout=op.timeout)
        if op.put is not None:
            r.put(node, step, op.put[1], op.put[0], mode=op.mode, owner=op.owner)
    return True


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


def run_step(c: Cluster, step: str, fn: Callable[..., dict[str, Any] | None]
             ) -> TaskFailed | None:
    """Run one setup step with an open Remote; on success record its facts (tasks.state)."""
    from tasks.remote import Remote, RemoteError

    started = time.monotonic()
    try:
        with Remote(c) as r:
            facts = fn(c, r) or {}
    except (RemoteError, HaswarmError, OSError) as e:
        return TaskFailed(f"{step} failed:\n{e}")
    mark_done(c, step, facts)
    print(f"{step}: done in {time.monotonic() - started:.1f} s", flush=True)
    return None


def clean_step(c: Cluster, step: str, fn: Callable[[Cluster, Remote, bool], None],
               dryrun: bool) -> TaskFailed | None:
    """Run one clean step (only reading facts when `dryrun`); then forget the step's record."""
    from tasks.remote import Remote, RemoteError

    try:
        with Remote(c) as r:
            fn(c, r, dryrun)
    except (RemoteError, HaswarmError, OSError) as e:
        return TaskFailed(f"{step} (clean) failed:\n{e}")
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

    def clean_action(dryrun: bool) -> TaskFailed | None:
        return clean_step(c, step, clean, dryrun)

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
