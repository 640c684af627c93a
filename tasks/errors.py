"""One error base for everything the user must act on: a message and what to do next.

`str(error)` is what the user reads: the message, then "  what to do: ..." on its own line when
there is a hint. A message written the old way, with that line inside it, is split once here, so
the hint can still be read apart (`tasks.ops.on_nodes` puts it in the remote layer's failure).

`DrillError` is here, not in tasks/drill.py, because the drill's parts raise it too (tasks/
mqtt_client.py, tasks/markers.py) and tasks/drill.py imports them. `StackError` likewise: tasks/
stack.py, tasks/stack_observe.py and tasks/galera.py raise it.
"""

from __future__ import annotations

HINT_PREFIX = "\n  what to do: "


class HaswarmError(Exception):
    """Something the user has to act on: `message`, and `hint` (what to do next; may be "")."""

    def __init__(self, message: str, hint: str = "") -> None:
        if not hint and HINT_PREFIX in message:
            message, _, hint = message.partition(HINT_PREFIX)
        self.message, self.hint = message, hint
        super().__init__(message + (HINT_PREFIX + hint if hint else ""))


class DrillError(HaswarmError):
    """The drill cannot start or go on; str() says why and what to do."""


class StackError(HaswarmError):
    """The stack did not reach the wanted state; str() says which service, why, what to do."""
