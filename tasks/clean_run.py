"""One `doit clean` run: which clean steps failed, which steps a failure keeps from running,
and the `doit clean` command that enforces both (pyproject.toml, [tool.doit.plugins.command]).

doit's own `clean` runs the clean actions dependents first (setup's order reversed), but it
only prints a failed action and goes on, and exits 0. Here a failed clean step is recorded
(`record_failure`, by doit task name: tasks.ops.clean_step does it), and the clean of a task X is
refused, without connecting to any node, when a task that needs X in setup (has X in its
task_dep, transitively) failed to clean in this run: the swarm is not left, nor the volume
unmounted, while the stack is still there. The command exits 1, with a one-line summary, when
a clean step failed.

doit finds the command in the pyproject.toml of the directory it runs in (the project's, where
dodo.py is); `tasks` must be importable then (install.sh: `pip install -e .`). Imports doit
only: `doit help` loads every command.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

from doit.cmd_clean import Clean as DoitClean
from doit.exceptions import TaskFailed

# This run's record (one `doit clean` per process; the command resets it when it starts).
FAILED: dict[str, str] = {}  # task name -> why its clean failed (the message doit prints)
REFUSED: dict[str, str] = {}  # task name -> the failed task that kept its clean from running


def reset() -> None:
    """Forget the record of an earlier clean run."""
    FAILED.clear()
    REFUSED.clear()


def record_failure(task: str, message: str) -> TaskFailed:
    """Record that the clean of `task` failed; returns the TaskFailed (saying `message`) for
    doit to print."""
    FAILED.setdefault(task, message)
    return TaskFailed(message)


def needed_by(deps: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    """{task: every task that needs it, directly or through others} from {task: the tasks it
    needs (task_dep, setup_tasks)}."""
    direct: dict[str, set[str]] = {}
    for task, needs in deps.items():
        for dep in needs:
            direct.setdefault(dep, set()).add(task)
    out: dict[str, set[str]] = {}
    for task in direct:
        seen: set[str] = set()
        todo = list(direct[task])
        while todo:
            t = todo.pop()
            if t not in seen:
                seen.add(t)
                todo.extend(direct.get(t, ()))
        out[task] = seen
    return out


def refusal(task: str, dependents: Iterable[str]) -> str | None:
    """None when the clean of `task` may run; else (recorded) why not: a task among
    `dependents` (those that need `task`) failed to clean in this run."""
    failed = sorted(set(dependents) & FAILED.keys())
    if not failed:
        return None
    REFUSED[task] = failed[0]
    return (f"{task} (clean): not run: the clean of {failed[0]}, which needs {task}, failed "
            "(its error is above). Fix that, then run `doit clean` again")


def summary() -> str:
    """One line: what failed and how many steps it kept from running ("" when none failed)."""
    if not FAILED:
        return ""
    n = len(REFUSED)
    kept = f" ({n} step{'s' if n > 1 else ''} they need not run)" if n else ""
    return (f"doit clean: failed: {', '.join(FAILED)}{kept}; see above, fix it, then run "
            "`doit clean` again")


class Clean(DoitClean):
    """doit's `clean` (same order and options), which does not clean a task whose dependents
    failed to clean and exits 1 when a clean step failed."""

    def clean_tasks(self, tasks: list[Any], dryrun: bool, cleanforget: bool) -> None:
        """Clean `tasks` in order, each once, refusing those a failure keeps from running."""
        reset()
        dependents = needed_by({t.name: [*t.task_dep, *t.setup_tasks] for t in self.task_list})
        done: set[str] = set()
        for task in tasks:
            if task.name in done:
                continue
            done.add(task.name)
            has_work = task.clean_actions or task.targets  # not a mere group of subtasks
            if has_work and (why := refusal(task.name, dependents.get(task.name, ()))):
                self.outstream.write(why + "\n")
                continue
            task.clean(self.outstream, dryrun)
            if cleanforget and not dryrun and task.name not in FAILED:
                self.dep_manager.remove(task.name)
        self.dep_manager.close()

    def _execute(self, dryrun: bool, cleandep: bool, cleanall: bool, cleanforget: bool,
                 pos_args: list[str] | None = None) -> int:
        """doit's clean; 1 (and the summary on stderr) when a step failed, else 0."""
        super()._execute(dryrun, cleandep, cleanall, cleanforget, pos_args)
        if line := summary():
            sys.stderr.write(line + "\n")
            return 1
        return 0
