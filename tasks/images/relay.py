"""Images: the relay. What several nodes lack leaves the controller once: the first of them
loads the stream and passes the same bytes on to the next over SSH while it loads, and so on
(a chain whose hops all run at once, so N nodes take about the time of one). The direct preload
(preload.py) then runs as ever: it finds the relayed nodes complete ("nothing to do") and
sends straight from the controller to any node the chain missed.

A hop logs in to the next node with a key made for this run only. Its public half goes into the
next node's authorized_keys restricted (`restrict`, `from=` the previous node's address, a
forced command: this run's hop script); the next node's host key comes from the controller's
known_hosts, never learned on the way. A host on the LAN can neither feed a node an image nor
use the key elsewhere. The hop directories and authorized_keys lines go at the end whatever
happened (and any a cut-off run left are removed first).
"""

from __future__ import annotations

import secrets
import shlex
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tasks.config import Cluster, Node
from tasks.failures import _host_pattern
from tasks.images.base import tar_stream
from tasks.images.core import LOAD_TIMEOUT, ImageError
from tasks.images.layers import (
    STEP,
    NodeFacts,
    Plan,
    Wanted,
    _SavedImage,
    check_room,
    load_entries,
    node_facts,
    plan_node,
)
from tasks.ops import say

if TYPE_CHECKING:
    from tasks.remote import Remote

MARK = "haswarm-relay"  # names the hop directories and the authorized_keys lines of a run
HOP_DIR = "/var/tmp/" + MARK  # + "-RUN": root's, 0700


def common_facts(facts: list[NodeFacts]) -> NodeFacts:
    """What every one of `facts` holds: a tag, image or layer counts only when all have it."""
    first, *rest = facts
    out = NodeFacts()
    out.tags = {t: i for t, i in first.tags.items() if all(f.tags.get(t) == i for f in rest)}
    out.images = {i: e for i, e in first.images.items() if all(i in f.images for f in rest)}
    out.chains = set(first.chains).intersection(*(f.chains for f in rest))
    return out


def chain_of(plans: dict[str, Plan]) -> list[str]:
    """The nodes that need a load, in the order given (the chain); none when fewer than two
    (one node gets the direct stream: nothing to share)."""
    names = [n for n, p in plans.items() if p.load]
    return names if len(names) >= 2 else []


@dataclass(frozen=True)
class Hop:
    """One node of the chain: where its hop script lives, how the previous node logs in."""

    node: Node
    user: str
    port: int
    dir: str

    @property
    def script(self) -> str:
        return f"{self.dir}/hop.sh"

    def command(self) -> str:
        """The forced command of this node's relay key: its hop script, as root."""
        run = f"sh {self.script}"
        return run if self.user == "root" else f"sudo -n {run}"


def hop_script(hop: Hop, after: Hop | None) -> str:
    """The script a node runs with the image stream on stdin: `docker load` here and, when
    there is a next node, the same bytes passed on to it through SSH as they arrive. A next
    node that fails does not stop this one's load (tee goes on); its outcome is in next.status."""
    d = shlex.quote(hop.dir)
    head = ("#!/bin/sh\n# haswarm image relay (tasks/images/relay.py): load stdin into this "
            "node's Docker")
    if after is None:
        return f"{head}.\nexec docker load >{d}/load.out 2>&1\n"
    ssh = " ".join([
        "ssh", "-F", "/dev/null", "-i", f"{d}/key", "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={d}/known_hosts", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
        "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=12", "-p", str(after.port),
        shlex.quote(f"{after.user}@{after.node.address}"), "relay"])
    return (f"{head} and pass it on to {after.node.name}.\n"
            f"rm -f {d}/next && mkfifo {d}/next || exit 1\n"
            f"{ssh} <{d}/next >{d}/next.out 2>&1 &\n"
            f"tee --output-error=warn-nopipe {d}/next | docker load >{d}/load.out 2>&1\n"
            "st=$?\n"
            f"wait $!; echo $? >{d}/next.status\n"
            "exit $st\n")


def source_address(node: Node) -> str:
    """The address `node`'s hop connects from, for the next node's `from=`: its address, or
    what its host name resolves to here (sshd matches `from=` names only with UseDNS, off by
    default)."""
    import ipaddress
    import socket

    try:
        return str(ipaddress.ip_address(node.address))
    except ValueError:
        try:
            return socket.gethostbyname(node.address)
        except OSError:
            return node.address  # the hop's login fails; the direct preload follows


def known_hosts_line(c: Cluster, hop: Hop) -> str:
    """The lines of the controller's known_hosts for `hop`'s node (what the previous node
    trusts); ImageError when it lists none (then there is no safe hop to it)."""
    import paramiko

    pattern = _host_pattern(hop.node.address, hop.port)
    try:
        keys = paramiko.HostKeys(str(c.ssh.known_hosts)).lookup(pattern)
    except (OSError, paramiko.SSHException) as e:
        raise ImageError(f"cannot read {c.ssh.known_hosts}: {e}") from None
    if not keys:
        raise ImageError(f"{c.ssh.known_hosts} lists no host key for {pattern}")
    return "".join(f"{pattern} {t} {keys[t].get_base64()}\n" for t in keys)


def new_key() -> tuple[str, str]:
    """(private key in OpenSSH format, public key line) of a new Ed25519 key."""
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption())
    public = key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH)
    return private.decode(), public.decode()


def _authorized_keys(user: str) -> str:
    """Shell: $f := `user`'s authorized_keys (its .ssh made 0700 and theirs when missing)."""
    u = shlex.quote(user)
    return (f"h=$(getent passwd {u} | cut -d: -f6); [ -n \"$h\" ] || exit 3; "
            f"[ -d \"$h/.ssh\" ] || {{ mkdir -m 700 \"$h/.ssh\" && chown {u} \"$h/.ssh\"; }}; "
            "f=\"$h/.ssh/authorized_keys\"; ")


def cleanup_command(user: str) -> str:
    """Shell: every relay line out of `user`'s authorized_keys, every hop directory gone."""
    return (_authorized_keys(user)
            + f"if [ -f \"$f\" ] && grep -q ' {MARK}-' \"$f\"; then "
              f"t=$(mktemp \"$f.XXXXXX\") && {{ grep -v ' {MARK}-' \"$f\" >\"$t\"; "
              "cat \"$t\" >\"$f\"; rm -f \"$t\"; }; fi; "
            + f"rm -rf {HOP_DIR}-*")


def prepare_command(hop: Hop, script: str, before: Hop | None, after: Hop | None,
                    public: str, run: str, known_hosts: str) -> str:
    """Shell (as root) putting a node's part of the chain in place: its hop directory and
    script; the key and the next node's host key when it passes on (the private key arrives
    on stdin, never in a command line); the previous node's restricted key line."""
    d = shlex.quote(hop.dir)
    parts = [cleanup_command(hop.user), "set -e", "umask 077", f"mkdir -m 700 {d}",
             f"printf %s {shlex.quote(script)} >{d}/hop.sh"]
    if after is not None:
        parts += [f"printf %s {shlex.quote(known_hosts)} >{d}/known_hosts", f"cat >{d}/key"]
    if before is not None:
        line = (f'restrict,from="{source_address(before.node)}",command="{hop.command()}" '
                f"{public} {MARK}-{run}")
        parts += [_authorized_keys(hop.user).rstrip("; "),
                  "[ -e \"$f\" ] || install -m 600 -o " + shlex.quote(hop.user) + ' /dev/null "$f"',
                  f"printf '%s\\n' {shlex.quote(line)} >>\"$f\""]
    return "; ".join(parts)


class _Stream:
    """A tar stream as a file-like Source (remote_stream.stream reads it), counting bytes."""

    def __init__(self, blocks: Any):
        self.blocks, self.buf, self.sent = iter(blocks), b"", 0
        self.started, self.ended = time.monotonic(), 0.0  # ended: the last byte handed over

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self.buf) < size:
            block = next(self.blocks, None)
            if block is None:
                self.ended = self.ended or time.monotonic()
                break
            self.buf += block
        out, self.buf = (self.buf, b"") if size < 0 else (self.buf[:size], self.buf[size:])
        self.sent += len(out)
        return out


@dataclass
class Relayed:
    """What `relay` did: the nodes' facts when it changed nothing (the direct preload reuses
    them), the chain it streamed through and the bytes that left this computer."""

    facts: dict[str, NodeFacts] = field(default_factory=dict)
    chain: list[str] = field(default_factory=list)
    sent: int = 0
    upload: float = 0.0  # seconds until the last byte left this computer


def relay(r: Remote, c: Cluster, targets: list[Node], wanted: list[Wanted],
          dryrun: bool = False) -> Relayed:
    """Load what several of `targets` lack through the chain (see above). Never raises for a
    node: any problem is said, and the direct preload that follows sends what is missing."""
    from tasks.remote import RemoteError
    from tasks.remote_stream import stream

    try:
        with r.reading():
            facts = r.on_all(f"{STEP}: inspect", lambda n: node_facts(r, n), targets)
    except RemoteError:
        return Relayed()  # the direct preload names the node that did not answer
    chain = chain_of({n.name: plan_node(wanted, facts[n.name]) for n in targets})
    if not chain:
        return Relayed(facts)
    plan = plan_node(wanted, common_facts([facts[n] for n in chain]))
    saved = {w.service: _SavedImage(w.tar) for w in plan.load}
    try:
        size = sum(saved[svc].layer_size(i) for svc, i in plan.send_layers)
        names = ", ".join(w.ref for w in plan.load)
        if dryrun:
            say(chain[0], f"{STEP}: would relay {names} ({size / 1e6:.0f} MB sent once) "
                f"through {' -> '.join(chain)}")
            return Relayed(facts)
        for name in list(chain):
            try:
                check_room(r, c.node(name), plan, size)
            except ImageError:
                chain.remove(name)  # the direct preload says why
        if len(chain) < 2:
            return Relayed()
        source = _run_chain(r, c, chain, plan, saved, size, names, stream)
        return Relayed({}, chain, source.sent,
                       (source.ended or time.monotonic()) - source.started)
    finally:
        for s in saved.values():
            s.close()


def _run_chain(r: Remote, c: Cluster, chain: list[str], plan: Plan,
               saved: dict[str, _SavedImage], size: int, names: str, stream: Any) -> _Stream:
    """Put the hops in place, stream into the first, remove the hops; what was streamed."""
    from tasks.remote import RemoteError

    run = secrets.token_hex(6)
    hops = [Hop(n, c.ssh_for(n).user, c.ssh_for(n).port, f"{HOP_DIR}-{run}")
            for n in (c.node(x) for x in chain)]
    private, public = new_key()
    t0 = time.monotonic()
    source = _Stream(tar_stream(load_entries(plan, saved)))
    try:
        known = [known_hosts_line(c, hop) for hop in hops[1:]] + [""]

        def prepare(i: int) -> None:
            hop = hops[i]
            before = hops[i - 1] if i else None
            after = hops[i + 1] if i + 1 < len(hops) else None
            r.run(hop.node, f"{STEP}: relay", prepare_command(
                hop, hop_script(hop, after), before, after, public, run, known[i]),
                stdin=private if after else None, secret=True)

        r.on_all(f"{STEP}: relay", lambda n: prepare(chain.index(n.name)), chain)
        say(chain[0], f"{STEP}: relaying {names} ({size / 1e6:.0f} MB, sent once) through "
            f"{' -> '.join(chain)}")
        stream(r, chain[0], f"{STEP}: relay", f"sh {hops[0].script}", source=source,
               timeout=LOAD_TIMEOUT)
        say(chain[0], f"{STEP}: relayed {source.sent / 1e6:.0f} MB through "
            f"{len(chain)} nodes in {time.monotonic() - t0:.1f} s")
    except (RemoteError, ImageError) as e:
        first = (f"{e.failures[0].node}: {e.failures[0].step}: {e.failures[0].detail}"
                 if isinstance(e, RemoteError) and e.failures else str(e))
        say(chain[0], f"{STEP}: the relay did not complete ({first}); the nodes it missed "
            "get the images straight from here")
    finally:
        try:
            r.on_all(f"{STEP}: relay cleanup",
                     lambda n: r.run(n, f"{STEP}: relay cleanup",
                                     cleanup_command(c.ssh_for(n).user), check=False), chain)
        except RemoteError:
            pass  # a node gone now: its lines go with the next run's cleanup
    return source
