"""The facts one `doit` run has read from the nodes, so that a converged re-run reads each fact
once, and all of them up front: one command per node, every node at once.

- A step reads its facts inside `with r.reading():` (tasks.remote). Each command run there is a
  read: its result is kept for the rest of the run and serves every later step that reads the
  same command on the same node, until a command runs outside such a block (a change, a wait,
  a poll). Then every kept result is dropped: a step always applies and waits on live reads.
- A run is preflight's: it begins there and ends with preflight's teardown, after doit's last
  task (`FactCache.begin`, `end`); a read serves MAX_AGE seconds at most.
- At the end the commands read are written down (`build/state/reads.json`, per command line:
  `doit setup` and `doit clean` read different things). The next run's preflight runs them on
  each node in one command, all at once, beside its checks (`batch_script`,
  `parse_batch`); its steps then find their facts read a second earlier from the nodes
  themselves. The file says which commands to run, never what they answered: a node rebooted,
  wiped or changed by hand is seen as it is.

Only the shared Remote of a doit run (the steps of `doit setup`) keeps results; `doit status`,
the drill, and steps called outside a run (tests) read live.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tasks.failures import Result

T = TypeVar("T")

# Seconds a kept read serves at most (a converged re-run needs about one).
MAX_AGE = 10.0
# Seconds one command of a batch may take; one that takes longer is left to its step, which
# runs it live with its own deadline.
BATCH_COMMAND_TIMEOUT = 10
# Seconds a node may take for the whole batch: past it, the node hangs (preflight says so).
READ_AHEAD_TIMEOUT = BATCH_COMMAND_TIMEOUT + 5
# Commands of one batch that run one after another: glusterd serves one volume transaction at
# a time (two at once: "Another transaction is in progress"); `peer status` and `volume info`
# are answered from its memory and run with the others. A result saying the lock was taken
# anyway is not kept: the step asks again.
_SERIAL = re.compile(r"\bgluster\b.*\bvolume (status|heal)\b")
_BUSY = ("Another transaction is in progress", "Locking failed")

_local = threading.local()


# ---------------------------------------------------------------------------------------------
# Several probes in one command (tasks.facts.gather, Remote.read_probes)

_SECTION = "@@haswarm-fact@@"


def probe_script(probes: dict[str, str]) -> str:
    """One shell script printing every probe's output under its own header line."""
    return "; ".join(f"echo {_SECTION}{key}; {{ {cmd}\n}} 2>&1" for key, cmd in probes.items())


def parse_sections(stdout: str) -> dict[str, str]:
    """Split the output of `probe_script` back into {probe: output}."""
    out: dict[str, str] = {}
    key = None
    lines: list[str] = []
    for line in stdout.splitlines(keepends=True):
        if line.startswith(_SECTION):
            if key is not None:
                out[key] = "".join(lines)
            key, lines = line[len(_SECTION):].strip(), []
        elif key is not None:
            lines.append(line)
    if key is not None:
        out[key] = "".join(lines)
    return out


# ---------------------------------------------------------------------------------------------
# The reading scope: which commands are reads


@contextmanager
def reading() -> Iterator[None]:
    """Within this block (in this thread and the threads `Remote.on_all` starts from it) every
    command is a read whose result may serve the rest of the run."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def in_reading() -> bool:
    """Whether the current thread runs inside `reading()`."""
    return getattr(_local, "depth", 0) > 0


def carry(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` wrapped to run in another thread with the caller's reading scope."""
    depth = getattr(_local, "depth", 0)

    def wrapped(*args: Any) -> T:
        _local.depth = depth
        try:
            return fn(*args)
        finally:
            _local.depth = 0

    return wrapped


# ---------------------------------------------------------------------------------------------
# The results kept for the run


class FactCache:
    """Results of reads, by (node key, command), valid during one run until it changes
    something, and for MAX_AGE seconds at most.

    A run is `begin`-ning (preflight) to `end` (preflight's teardown, once doit has run every
    task); outside one nothing is kept (steps called on their own, tests). `changed()` starts a
    new epoch and drops every result; a read started in an older epoch is not kept (a change may
    have happened while it ran). `asked` lists, per node, each command read (kept or not) in
    first-read order: what the next run of the same command line reads up front."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._epoch = 0
        self._results: dict[tuple[Any, str], tuple[Result, float]] = {}
        self._record: tuple[Path, str] | None = None
        self.active = False
        self.asked: dict[str, dict[str, None]] = {}

    def begin(self, record: Path | None = None, key: str = "") -> None:
        """A run begins: reads are kept from now on, and noted for `record` (under command line
        `key`) when it ends."""
        with self._lock:
            self.active, self._record, self.asked = True, (record, key) if record else None, {}
            self._epoch += 1
            self._results.clear()

    def end(self) -> None:
        """The run ended: nothing kept any more; what it read is written to the record."""
        with self._lock:
            self.active, record, asked = False, self._record, self.asked
            self._record, self.asked = None, {}
            self._epoch += 1
            self._results.clear()
        if record and asked:
            save_plan(record[0], record[1], {who: list(cmds) for who, cmds in asked.items()})

    def lookup(self, key: Any, cmd: str, who: str) -> tuple[Result | None, int]:
        """The kept result of `cmd` on `key` (or None) and the epoch to pass to `keep`; the
        read is noted under `who` (the node's "name@address") for the next run."""
        with self._lock:
            if not self.active:
                return None, -1
            self.asked.setdefault(who, {})[cmd] = None
            res, at = self._results.get((key, cmd), (None, 0.0))
            fresh = res is not None and time.monotonic() - at <= MAX_AGE
            return (res if fresh else None), self._epoch

    def keep(self, key: Any, cmd: str, res: Result, epoch: int) -> None:
        """Keep `res`, read in `epoch`, unless something changed since."""
        with self._lock:
            if self.active and epoch == self._epoch:
                self._results[(key, cmd)] = (res, time.monotonic())

    def changed(self) -> None:
        """Something may have changed on a node: every kept result is dropped."""
        with self._lock:
            self._epoch += 1
            self._results.clear()

    def epoch(self) -> int:
        with self._lock:
            return self._epoch

    def read(self, key: Any, who: str, cmd: str, execute: Callable[[], Result]) -> Result:
        """The kept result of `cmd`, else `execute()`'s, kept."""
        res, epoch = self.lookup(key, cmd, who)
        if res is None:
            res = execute()
            self.keep(key, cmd, res, epoch)
        return res

    def read_probes(self, key: Any, who: str, probes: dict[str, str],
                    execute: Callable[[str], str]) -> dict[str, str]:
        """{probe: output}: each probe kept or read (the missing ones in one `execute` of their
        `probe_script`, whose output it returns), and kept."""
        epoch = self.epoch()
        out: dict[str, str] = {}
        for name, cmd in probes.items():
            res, _ = self.lookup(key, cmd, who)
            if res is not None:
                out[name] = res.stdout + res.stderr
        missing = {name: cmd for name, cmd in probes.items() if name not in out}
        if missing:
            got = parse_sections(execute(probe_script(missing)))
            for name, cmd in missing.items():
                out[name] = got.get(name, "")
                self.keep(key, cmd, Result(out[name], "", 0), epoch)
        return {name: out[name] for name in probes}

    def read_ahead(self, key: Any, cmds: list[str], execute: Callable[[str], Result]) -> int:
        """Run `cmds` at once (`batch_script`, one `execute`) and keep each answer; returns
        how many were kept."""
        epoch = self.epoch()
        script, nonce = batch_script(cmds)
        got = parse_batch(cmds, execute(script).stdout, nonce)
        for cmd, res in got.items():
            self.keep(key, cmd, res, epoch)
        return len(got)


SHARED = FactCache()


# ---------------------------------------------------------------------------------------------
# Reading up front: the batch of one node (pure)


def batch_script(cmds: list[str], nonce: str | None = None) -> tuple[str, str]:
    """A shell script running every command of `cmds` at once (the gluster ones one after the
    other), each in a subshell with no stdin, all within BATCH_COMMAND_TIMEOUT, then printing
    each one's exit code, stdout and stderr between marker lines. Returns (script, nonce).

    Each command costs one fork beyond its own processes (no `timeout`, `sh -c` or `cat` of its
    own): the batch runs on every node at once, and on the lab they all share the host's CPUs.
    A command still running at the deadline is killed with the others (`timeout` signals its
    whole process group) and prints nothing: its step runs it live."""
    nonce = nonce or secrets.token_hex(6)
    mark = f"@@haswarm-read-{nonce}"
    serial = [i for i, c in enumerate(cmds) if _SERIAL.search(c)]
    parallel = [i for i, c in enumerate(cmds) if not _SERIAL.search(c)]

    def one(i: int) -> str:
        f = f'"$d/{i}'
        return (f'(eval "$c{i}") >{f}.o" 2>{f}.e" </dev/null; rc=$?; '
                f"printf '\\n%s {i} e@@\\n' \"$m\" >{f}.x\"; "
                f"printf '\\n%s {i} %s o@@\\n' \"$m\" $rc >{f}.h\"")

    jobs = [f"{{ {one(i)}; }} &" for i in parallel]
    if serial:
        jobs.append("{ " + "; ".join(one(i) for i in serial) + "; } &")
    inner = ('d=$1 m=$2; ' + " ".join(f"c{i}={shlex.quote(c)};" for i, c in enumerate(cmds))
             + " " + " ".join(jobs) + " wait")
    show = (f"set --; for i in {' '.join(str(i) for i in range(len(cmds)))}; do "
            '[ -e "$d/$i.h" ] && set -- "$@" "$d/$i.h" "$d/$i.o" "$d/$i.x" "$d/$i.e"; done; '
            '[ $# -eq 0 ] || cat -- "$@"; '
            f"printf '\\n{mark} end@@\\n'")
    script = ("d=$(mktemp -d /tmp/.haswarm-read.XXXXXXXX) || exit 1; "
              "trap 'rm -rf \"$d\"' EXIT; "
              f"timeout -k 1 {BATCH_COMMAND_TIMEOUT} sh -c {shlex.quote(inner)} sh \"$d\" "
              f"{mark}; {show}")
    return script, nonce


def parse_batch(cmds: list[str], out: str, nonce: str) -> dict[str, Result]:
    """{command: Result} from a batch's output; a command that timed out or printed no exit
    code is left out (its step reads it live)."""
    mark = re.compile(rf"\n@@haswarm-read-{re.escape(nonce)} ([^@\n]*)@@\n")
    found = list(mark.finditer(out))
    if not found or found[-1].group(1) != "end":
        return {}
    parts: dict[tuple[int, str], tuple[str, str]] = {}
    for m, nxt in zip(found, found[1:], strict=False):
        fields = m.group(1).split()
        if len(fields) == 3:
            parts[(int(fields[0]), fields[2])] = (fields[1], out[m.end():nxt.start()])
        elif len(fields) == 2:
            parts[(int(fields[0]), fields[1])] = ("", out[m.end():nxt.start()])
    results = {}
    for i, cmd in enumerate(cmds):
        rc, stdout = parts.get((i, "o"), ("", ""))
        _, stderr = parts.get((i, "e"), ("", ""))
        if not rc.isdigit() or int(rc) in (124, 137):  # no exit code, or `timeout` ended it
            continue
        if any(b in stdout or b in stderr for b in _BUSY):
            continue
        results[cmd] = Result(stdout=stdout, stderr=stderr, exit_code=int(rc))
    return results


# ---------------------------------------------------------------------------------------------
# What the last run of the same command line read (build/state/reads.json)


def run_key(argv: list[str] | None = None) -> str:
    """The doit command line without options: 'setup', 'clean', 'config=x.yml setup'..."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(a for a in args if not a.startswith("-")) or "(default)"


def load_plan(path: Path, key: str) -> dict[str, list[str]]:
    """{node id: commands} the last run of command line `key` read; {} when none is known."""
    try:
        data = json.loads(path.read_text())
        plan = data.get(key) or {}
        return {str(n): [str(c) for c in cmds] for n, cmds in plan.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def save_plan(path: Path, key: str, plan: dict[str, list[str]]) -> None:
    """Record what command line `key` read (other command lines' records kept)."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[key] = plan
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
