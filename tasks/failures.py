"""What a remote step reports: a command's result, and per node failures that name the node, the
step, the command, the exit code, the tail of stderr (secrets scrubbed) and what to do next.
`tasks.remote` raises them; everything else reads them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tasks.config import Node

# Lines of stderr quoted in an error, and the width each is cut to.
STDERR_TAIL_LINES = 15
STDERR_LINE_WIDTH = 300
HIDDEN = "(command hidden: it carries a secret)"
_REDACTED = "***"


# ---------------------------------------------------------------------------------------------
# Results and errors


@dataclass(frozen=True)
class Result:
    """What a command printed and how it exited."""

    stdout: str
    stderr: str
    exit_code: int

    @property
    def ok(self) -> bool:
        return self.exit_code == 0



def key_values(text: str) -> dict[str, str]:
    """`key=value` lines of a command's output -> dict (other lines are ignored)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep:
            out[key] = value
    return out


class Kind:
    """What went wrong, coarsely (`Failure.kind`)."""

    UNREACHABLE = "unreachable"
    AUTH = "authentication failed"
    HOST_KEY = "host key not trusted"
    SUDO = "sudo refused"
    COMMAND = "command failed"
    TIMEOUT = "command timed out"
    ERROR = "error"


@dataclass(frozen=True)
class Failure:
    """One node's failure in one step. `str()` is a block of text for the user."""

    node: str
    address: str
    step: str
    kind: str
    detail: str
    hint: str
    command: str | None = None
    exit_code: int | None = None
    stderr: str = ""

    def __str__(self) -> str:
        lines = [f"{self.node} ({self.address}) failed at {self.step!r}: {self.kind}"]
        if self.detail:
            lines.append(f"  {self.detail}")
        if self.command is not None and self.kind in (Kind.COMMAND, Kind.TIMEOUT, Kind.SUDO):
            lines.append(f"  command: {self.command}")
        if self.stderr:
            lines.append("  stderr:")
            lines += [f"    | {line}" for line in self.stderr.splitlines()]
        if self.hint:
            lines.append(f"  what to do: {self.hint}")
        return "\n".join(lines)


class RemoteError(Exception):
    """One or more nodes failed; `failures` holds one entry per failed node (and step)."""

    def __init__(self, failures: Sequence[Failure]):
        self.failures = list(failures)
        super().__init__(self._message())

    def __reduce__(self) -> tuple[type[RemoteError], tuple[list[Failure]]]:
        return (RemoteError, (self.failures,))  # survives pickling (doit -n N runs processes)

    @property
    def nodes(self) -> list[str]:
        """Names of the failed nodes, without repeats, in order."""
        return list(dict.fromkeys(f.node for f in self.failures))

    def _message(self) -> str:
        blocks = [str(f) for f in self.failures]
        if len(self.nodes) > 1:
            blocks.insert(0, f"{len(self.nodes)} nodes failed: {', '.join(self.nodes)}")
        return "\n\n".join(blocks)

    def __str__(self) -> str:
        return self._message()


# ---------------------------------------------------------------------------------------------
# Small helpers


_print_lock = threading.Lock()


def progress(node: Node | str, msg: str) -> None:
    """Print one progress line such as "pi2: loading image 3/5" (flushed, whole lines)."""
    name = node if isinstance(node, str) else node.name
    with _print_lock:
        print(f"{name}: {msg}", flush=True)


def tail(text: str, lines: int = STDERR_TAIL_LINES, width: int = STDERR_LINE_WIDTH) -> str:
    """The last `lines` non-empty lines of `text`, each cut to `width` characters."""
    kept = [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(line if len(line) <= width else line[: width - 3] + "..." for line in kept)


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret value (and every line of a multi-line one) replaced by ***."""
    pieces: set[str] = set()
    for s in secrets:
        if not s:
            continue
        pieces.add(s.strip())
        pieces.update(line.strip() for line in s.splitlines())
    # Longest first, so a secret containing another is replaced whole; very short pieces
    # (blank lines, "1") would shred ordinary text and reveal little.
    for piece in sorted((p for p in pieces if len(p) >= 4), key=len, reverse=True):
        text = text.replace(piece, _REDACTED)
    return text


def _host_pattern(address: str, port: int) -> str:
    """How known_hosts (and ssh-keygen -R) name a host: `addr`, or `[addr]:port` off port 22."""
    return address if port == 22 else f"[{address}]:{port}"


def _sudo_problem(res: Result) -> str | None:
    """Why sudo refused to run the command, if it did."""
    err = res.stderr
    if res.exit_code == 127 and "sudo" in err and "not found" in err:
        return "sudo is not installed"
    for marker in ("a password is required", "a terminal is required", "no tty present"):
        if "sudo:" in err and marker in err:
            return "sudo wants a password (haswarm runs sudo non-interactively: sudo -n)"
    if "is not in the sudoers file" in err or "is not allowed to execute" in err:
        return "the user may not use sudo"
    return None


