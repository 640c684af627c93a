"""Images: preload onto the nodes, as every step changes a node (tasks/ops.py): per node facts,
the plan of what is missing (`plan_node`), its `Op`s (`preload_ops`: a `docker tag` per retag,
one `docker load` stream of only the missing layers), applied or dry-run by `apply_ops`."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from doit.exceptions import TaskFailed

from tasks.config import Cluster, Node, current
from tasks.images.base import TarEntry, tar_stream
from tasks.images.build import _rel, manifest_path, stack_images
from tasks.images.core import LOAD_TIMEOUT, ImageError
from tasks.images.layers import (
    STEP,
    NodeFacts,
    Plan,
    Wanted,
    _SavedImage,
    check_node,
    check_room,
    load_entries,
    node_facts,
    plan_node,
    read_manifest,
)
from tasks.ops import Op, apply_ops, say

if TYPE_CHECKING:
    from doit.task import Task

    from tasks.remote import Remote

REMOVE_TIMEOUT = 300.0  # seconds for `docker image rm` of the stack's images on one node


@dataclass
class NodeReport:
    """The outcome of preloading one node."""

    node: str
    present: int = 0
    retagged: int = 0
    loaded: int = 0
    layers_sent: int = 0
    layers_skipped: int = 0
    bytes_sent: int = 0
    upload_seconds: float = 0.0  # until the last byte was handed to SSH (then the node unpacks)
    seconds: float = 0.0
    retried_full: bool = False
    relayed: bool = False  # in the relay's chain (tasks/images/relay.py) before its own check

def preload_ops(plan: Plan, layer_sizes: dict[tuple[str, int], int],
                load: Callable[[Remote], None] | None = None) -> list[Op]:
    """The Ops of a node's `plan`: a `docker tag` per image there under another name, then one
    `call` (`load`) streaming every missing image in one `docker load`; nothing for what is
    present. `layer_sizes` gives the bytes of each (service, layer index) to send."""
    ops = [Op(f"tag {w.id[:19]} as {w.ref}", f"docker tag {w.id} {shlex.quote(w.ref)}")
           for w in plan.retag]
    if plan.load:
        notes = [f"{len(plan.send_layers)} layer(s)"]
        if plan.skipped_layers:
            notes.append(f"{plan.skipped_layers} present already")
        if plan.shared_layers:
            notes.append(f"{plan.shared_layers} shared")
        size = sum(layer_sizes[x] for x in plan.send_layers)
        ops.append(Op(f"load {len(plan.load)} image(s): {', '.join(w.ref for w in plan.load)} "
                      f"({', '.join(notes)}, {size / 1e6:.0f} MB)", call=load))
    return ops


def preload_node(remote: Any, node: Node, wanted: list[Wanted], dryrun: bool = False,
                 facts: NodeFacts | None = None) -> NodeReport:
    """Put every wanted image on `node`, sending only what it lacks (facts, `plan_node`,
    `preload_ops`, `apply_ops`); verify afterwards. With `dryrun`, only say what it would do.
    `facts`: the node's, when just read (else read now)."""
    t0 = time.monotonic()
    facts = facts or node_facts(remote, node)
    plan = plan_node(wanted, facts)
    rep = NodeReport(node.name, present=len(plan.present))
    if plan.nothing_to_do and (problems := check_node(wanted, facts)):
        raise ImageError("; ".join(problems))
    saved = {w.service: _SavedImage(w.tar) for w in plan.load}
    try:
        sizes = {(svc, i): saved[svc].layer_size(i) for svc, i in plan.send_layers}
        if plan.load:
            check_room(remote, node, plan, sum(sizes.values()))
        ops = preload_ops(plan, sizes, lambda r: _load_plan(r, node, plan, saved, rep))
        changed = apply_ops(remote, node, STEP, ops, dryrun=dryrun)
    finally:
        for s in saved.values():
            s.close()
    if not changed or dryrun:
        rep.seconds = time.monotonic() - t0
        return rep
    rep.retagged = len(plan.retag)
    problems = check_node(wanted, node_facts(remote, node))
    if problems:
        raise ImageError("after loading: " + "; ".join(problems))
    rep.seconds = time.monotonic() - t0
    done = [f"loaded {rep.loaded}"] + ([f"retagged {rep.retagged}"] if rep.retagged else [])
    say(node, f"{STEP}: {', '.join(done)}, {rep.bytes_sent / 1e6:.0f} MB sent in "
        f"{rep.seconds:.1f} s (upload {rep.upload_seconds:.1f} s); all {len(wanted)} images "
        f"present ({wanted[0].platform})")
    return rep


def _load_plan(remote: Any, node: Node, plan: Plan, saved: dict[str, _SavedImage],
               rep: NodeReport) -> None:
    """The load Op's call: one `docker load` stream of `plan.load` without the layers the node
    holds; when the engine refuses it, once more with the complete images."""
    rep.layers_sent, rep.layers_skipped = len(plan.send_layers), plan.skipped_layers
    try:
        _load(remote, node, load_entries(plan, saved), rep)
    except ImageError as e:
        if not plan.skipped_layers:  # nothing was left out: a retry would not help
            raise
        say(node, f"{STEP}: load without the layers it has failed ({e}); sending the "
            "complete images")
        rep.retried_full = True
        _load(remote, node, load_entries(plan, saved, False), rep)
    rep.loaded = len(plan.load)


def _load(remote: Any, node: Node, entries: list[TarEntry], rep: NodeReport) -> None:
    """Stream a tar of `entries` into the node engine's `docker load` (through the remote
    layer's Docker client: no copy of the tarball lands on the node's disk first); counts the
    bytes and the upload time into `rep`."""
    import docker.errors

    t0 = time.monotonic()

    def body() -> Iterator[bytes]:
        for block in tar_stream(entries):
            rep.bytes_sent += len(block)
            yield block
        rep.upload_seconds += time.monotonic() - t0

    client = remote.docker(node, timeout=LOAD_TIMEOUT)
    try:
        client.images.load(body())
    except (docker.errors.APIError, docker.errors.DockerException) as e:
        raise ImageError(f"docker load: {e}") from None


def preload(c: Cluster, manifest: Path, nodes: Iterable[str] | None = None,
            remote: Any = None, dryrun: bool = False) -> dict[str, NodeReport]:
    """Preload every manifest image onto `nodes` (default: all) in parallel: first through the
    nodes' relay (tasks/images/relay.py) when several lack the same images and the cluster
    file allows it, then straight from here to each node for whatever it still lacks.

    Every node runs to its end; failed nodes are raised together as one RemoteError naming
    each node and its reason. Returns node -> NodeReport (the relay's bytes are the first
    relaying node's `bytes_sent`)."""
    from tasks.remote import Failure, Kind, Remote, RemoteError

    wanted = read_manifest(manifest)
    for w in wanted:
        if w.platform != c.platform:
            raise ImageError(f"{manifest}: {w.ref} is for {w.platform}, the cluster runs "
                             f"{c.platform}: run `doit images`")
        if not w.tar.exists():
            raise ImageError(f"{w.tar} is missing: run `doit images`")
    targets = list(nodes) if nodes is not None else c.names

    def one(r: Any) -> dict[str, NodeReport]:
        from tasks.images.relay import Relayed, relay

        done = Relayed()
        if c.preload.relay and len(targets) > 1:
            done = relay(r, c, [c.node(t) for t in targets], wanted, dryrun)

        def fn(n: Node) -> NodeReport:
            try:
                rep = preload_node(r, n, wanted, dryrun, done.facts.get(n.name))
                rep.relayed = n.name in done.chain
                if done.chain and n.name == done.chain[0]:
                    rep.bytes_sent += done.sent
                    rep.upload_seconds += done.upload
                return rep
            except ImageError as e:
                raise RemoteError([Failure(
                    node=n.name, address=n.address, step="images: preload", kind=Kind.ERROR,
                    detail=str(e), hint="fix the cause named above, then run "
                    "`doit preload-images` again")]) from None
        return r.on_all("images: preload", fn, targets)

    if remote is not None:
        return one(remote)
    with Remote(c, shared=True) as r:
        return one(r)


def preload_action(nodes: list[str] | None, step: str) -> TaskFailed | None:
    """doit action: preload `nodes` (None: all) and stamp the step when every node is done."""
    from tasks import state
    from tasks.remote import RemoteError

    c = current()
    try:
        reports = preload(c, manifest_path(c), nodes)
    except (ImageError, RemoteError) as e:
        return TaskFailed(str(e))
    state.mark_done(c, step, {n: {"bytes_sent": r.bytes_sent, "loaded": r.loaded}
                              for n, r in reports.items()})
    return None


def setup_preload(c: Cluster, r: Any, dryrun: bool = False) -> dict[str, Any]:
    """Every image of the manifest on every node (the step as `doit plan` runs it)."""
    reports = preload(c, manifest_path(c), remote=r, dryrun=dryrun)
    return {n: {"bytes_sent": x.bytes_sent, "loaded": x.loaded} for n, x in reports.items()}


def clean_saved(paths: list[str], dryrun: bool = False) -> None:
    """Clean action of the image tasks. The saved files are the controller's build cache (a Home
    Assistant build takes minutes): a plain `doit clean` keeps them, `doit purge=yes clean`
    removes them. With `clean -n`, only says which."""
    from tasks.config import purge_requested

    present = [Path(p) for p in paths if Path(p).exists()]
    if not present:
        return
    names = ", ".join(_rel(p) for p in present)
    if not purge_requested():
        print(f"{'would keep' if dryrun else 'kept'} {names} (build cache; "
              "`doit purge=yes clean` removes it)")
        return
    if dryrun:
        print(f"would remove {names}")
        return
    for p in present:
        p.unlink()
    print(f"removed {names}")


def clean_preload(nodes: list[str] | None, step_name: str, task: Task,
                  dryrun: bool = False) -> TaskFailed | None:
    """Clean action of preload-images: forget the stamp; with `purge=yes` also remove the
    stack's images from the nodes (those no container uses any more), as before setup. With
    `clean -n`, asks the nodes (read-only) and says which images would go. doit passes `task`
    (a failure is recorded under its name: tasks/clean_run.py)."""
    from tasks import state
    from tasks.clean_run import record_failure
    from tasks.config import purge_requested
    from tasks.remote import Remote, RemoteError

    c = current()
    if not dryrun:
        state.forget(c, step_name)
    if not purge_requested():
        print(f"{step_name} (clean): images {'would be ' if dryrun else ''}kept on the nodes "
              "(`purge=yes` removes them)")
        return None
    refs = " ".join(shlex.quote(img.node_ref) for img in stack_images(c).values())
    # an image a container still uses stays (a plain `docker image rm` refuses it): said, not
    # an error; `doit purge=yes clean` removes the stack before this task
    if dryrun:
        cmd = (f"for ref in {refs}; do docker image inspect \"$ref\" >/dev/null 2>&1 || "
               "continue; if [ -n \"$(docker ps -aq --filter ancestor=$ref)\" ]; then "
               "echo \"would keep $ref (a container uses it now)\"; "
               "else echo \"would remove $ref\"; fi; done")
    else:
        cmd = (f"for ref in {refs}; do docker image inspect \"$ref\" >/dev/null 2>&1 || "
               "continue; if docker image rm \"$ref\" >/dev/null 2>&1; then "
               "echo \"removed $ref\"; else echo \"kept $ref (a container uses it)\"; fi; done")
    try:
        with Remote(c) as r:
            # removing images of hundreds of MB from an SD card takes a while
            out = r.run_all("images: remove preloaded", cmd, nodes, timeout=REMOVE_TIMEOUT)
    except RemoteError as e:
        return record_failure(task.name, str(e))
    for node, res in out.items():
        print(f"{node}: {step_name} (clean): "
              + (", ".join(res.stdout.splitlines()) if res.stdout.strip() else "nothing to do"))
    return None


