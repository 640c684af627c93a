"""Images: preload onto the nodes, as every step changes a node (tasks/ops.py): per node facts,
the plan of what is missing (`plan_node`), its `Op`s (`preload_ops`: a `docker tag` per retag,
one `docker load` stream of only the missing layers), applied or dry-run by `apply_ops`."""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from doit.exceptions import TaskFailed

from tasks.config import Cluster, Node, current
from tasks.images.base import TarEntry, normalize_ref, tar_stream
from tasks.images.build import _rel, manifest_path, stack_images
from tasks.images.core import LOAD_TIMEOUT, ImageError, Platform, image_matches
from tasks.ops import Op, apply_ops, say

if TYPE_CHECKING:
    from doit.task import Task

    from tasks.remote import Remote

STEP = "preload-images"  # how its lines start: "pi1: preload-images: nothing to do"
# Room a node must keep free after its images are loaded: the database, logs and containers
# grow, and an engine whose disk is full stops writing (preflight and the preload check it).
DISK_SPARE = 512 * 1024**2
REMOVE_TIMEOUT = 300.0  # seconds for `docker image rm` of the stack's images on one node

# ---------------------------------------------------------------------------------------------
# Preload: facts, plan, stream


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The layer chain IDs of an image's diff IDs (how an engine names a layer with its
    parents): chain[0] = diff[0], chain[i] = sha256(chain[i-1] + ' ' + diff[i])."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else
                   "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


@dataclass(frozen=True)
class Wanted:
    """One image a node must hold (from manifest.json)."""

    service: str
    ref: str
    id: str
    platform: str
    layers: tuple[str, ...]
    tar: Path


@dataclass
class NodeFacts:
    """What a node's engine holds: tag -> image ID, image ID -> its inspect entry, and every
    layer chain ID of every image."""

    tags: dict[str, str] = field(default_factory=dict)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    chains: set[str] = field(default_factory=set)

    @classmethod
    def from_inspect(cls, entries: list[dict[str, Any]]) -> NodeFacts:
        facts = cls()
        for e in entries:
            facts.images[e["Id"]] = e
            for t in e.get("RepoTags") or []:
                facts.tags[normalize_ref(t)] = e["Id"]
            facts.chains.update(chain_ids(list((e.get("RootFS") or {}).get("Layers") or [])))
        return facts


@dataclass
class Plan:
    """What to do on one node: nothing for `present`, `docker tag` for `retag` (the image is
    there under another name), and one `docker load` for `load` carrying only the layers in
    `send_layers` ((service, index) pairs; the node has the others or gets them earlier in the
    same stream)."""

    present: list[Wanted] = field(default_factory=list)
    retag: list[Wanted] = field(default_factory=list)
    load: list[Wanted] = field(default_factory=list)
    send_layers: list[tuple[str, int]] = field(default_factory=list)
    skipped_layers: int = 0  # layers of loaded images the node holds already
    shared_layers: int = 0  # layers another image of the same stream brings

    @property
    def nothing_to_do(self) -> bool:
        return not self.retag and not self.load


def plan_node(wanted: list[Wanted], facts: NodeFacts) -> Plan:
    """Compare what a node has (facts) with what it needs (wanted): the cheapest way there."""
    plan = Plan()
    sending: set[str] = set()
    for w in wanted:
        ref = normalize_ref(w.ref)
        if facts.tags.get(ref) == w.id:
            plan.present.append(w)
        elif w.id in facts.images:
            plan.retag.append(w)
        else:
            plan.load.append(w)
            for i, chain in enumerate(chain_ids(list(w.layers))):
                if chain in facts.chains:
                    plan.skipped_layers += 1
                elif chain in sending:
                    plan.shared_layers += 1
                else:
                    plan.send_layers.append((w.service, i))
                    sending.add(chain)
    return plan


def check_node(wanted: list[Wanted], facts: NodeFacts) -> list[str]:
    """Problems left on a node after the preload (empty when every image is there, tagged and
    of the right platform)."""
    problems = []
    for w in wanted:
        got = facts.tags.get(normalize_ref(w.ref))
        if got is None:
            problems.append(f"{w.ref} is missing")
        elif got != w.id:
            problems.append(f"{w.ref} is {got[:19]}, not {w.id[:19]}")
        else:
            info = facts.images[got]
            plat = Platform.parse(w.platform)
            if not image_matches(plat, info):
                problems.append(f"{w.ref} records {plat.describe(info)}, not {w.platform}")
    return problems


def read_manifest(path: Path) -> list[Wanted]:
    """The images of manifest.json (tar paths relative to the manifest's directory)."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror}); run `doit images` first") from None
    return [Wanted(service, r["image"], r["id"], r["platform"], tuple(r.get("layers") or ()),
                   (path.parent / r["tar"]).resolve()) for service, r in data.items()]


def expected_images(c: Cluster) -> dict[str, tuple[str, int] | None]:
    """service -> (image ID, saved size) of every image the stack runs, from manifest.json;
    None for an image it does not record as configured (not built or pulled yet)."""
    try:
        records = json.loads(manifest_path(c).read_text())
    except (OSError, ValueError):
        records = {}
    out: dict[str, tuple[str, int] | None] = {}
    for service, img in stack_images(c).items():
        r = records.get(service) or {}
        known = r.get("image") == img.node_ref and r.get("id") and r.get("size")
        out[service] = (r["id"], int(r["size"])) if known else None
    return out


class _SavedImage:
    """One `docker save` tarball: its manifest entry, config and layer members."""

    def __init__(self, path: Path):
        import tarfile  # here: loading the doit tasks does not need it

        self.path = path
        self.tf = tarfile.open(path)
        members = {m.name.lstrip("./"): m for m in self.tf.getmembers()}
        self.members = members
        manifest = json.loads(self._read("manifest.json"))
        if len(manifest) != 1:
            raise ImageError(f"{path}: expected one image, found {len(manifest)}")
        self.config_name = manifest[0]["Config"]
        self.config = self._read(self.config_name)
        self.layer_names: list[str] = manifest[0]["Layers"]
        self.diff_ids: list[str] = json.loads(self.config)["rootfs"]["diff_ids"]

    def _read(self, name: str) -> bytes:
        f = self.tf.extractfile(self.members[name.lstrip("./")])
        if f is None:
            raise ImageError(f"{self.path}: {name} is not a file")
        return f.read()

    def layer_entry(self, index: int, name: str) -> TarEntry:
        member = self.members[self.layer_names[index].lstrip("./")]
        path, offset, size = self.path, member.offset_data, member.size

        def opener() -> IO[bytes]:
            fh = open(path, "rb")
            fh.seek(offset)
            return _Window(fh, size)

        return TarEntry(name, size, opener)

    def layer_size(self, index: int) -> int:
        """Bytes of layer `index` in the tarball (what sending it costs)."""
        return self.members[self.layer_names[index].lstrip("./")].size

    def close(self) -> None:
        self.tf.close()


class _Window(io.RawIOBase):
    """A read-only window [offset, offset+size) of an open file (the file is already there)."""

    def __init__(self, fh: IO[bytes], size: int):
        self.fh, self.left = fh, size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.fh.read(n)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.fh.close()
        super().close()


def load_entries(plan: Plan, saved: dict[str, _SavedImage],
                 omit_present: bool = True) -> list[TarEntry]:
    """The members of one `docker load` stream for `plan.load`: configs, a manifest naming
    every image with its tag, and the layer tars (only `plan.send_layers` when `omit_present`;
    the engine skips reading a layer whose chain it already has)."""
    wanted_layers = set(plan.send_layers)
    entries: list[TarEntry] = []
    manifest = []
    written: set[str] = set()
    for w in plan.load:
        s = saved[w.service]
        if s.diff_ids != list(w.layers) and w.layers:
            raise ImageError(f"{s.path} does not hold {w.ref} {w.id[:19]} (rebuild: doit images)")
        names = []
        for i, chain in enumerate(chain_ids(s.diff_ids)):
            name = f"{chain.split(':', 1)[1]}/layer.tar"
            names.append(name)
            if name in written:
                continue
            if omit_present and (w.service, i) not in wanted_layers:
                continue
            entries.append(s.layer_entry(i, name))
            written.add(name)
        config_name = f"{w.id.split(':', 1)[1]}.json"
        if config_name not in written:
            entries.append(TarEntry.data(config_name, s.config))
            written.add(config_name)
        manifest.append({"Config": config_name, "RepoTags": [w.ref], "Layers": names})
    entries.append(TarEntry.data("manifest.json", json.dumps(manifest).encode()))
    return entries


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


# One SSH round trip: every image's inspect entry (a failing engine fails the command).
FACTS_CMD = ("ids=$(docker image ls -a -q --no-trunc) || exit $?; "
             "ids=$(printf '%s\\n' $ids | sort -u); "
             "if [ -z \"$ids\" ]; then echo '[]'; else docker image inspect $ids; fi")


def node_facts(remote: Any, node: Node | str) -> NodeFacts:
    """The node's image facts (one SSH command)."""
    res = remote.run(node, "images: inspect", FACTS_CMD,
                     hint="is Docker installed and running on the node (docker info)?")
    try:
        return NodeFacts.from_inspect(json.loads(res.stdout))
    except (ValueError, KeyError) as e:
        raise ImageError(f"unexpected `docker image inspect` output on {node}: {e}") from None


# Free KiB where the node's engine keeps images (its DockerRootDir). In KiB: mawk (Debian's
# awk) prints a product past 2^31 as 4.67752e+10.
DISK_FREE_CMD = ("d=$(docker info --format '{{.DockerRootDir}}' 2>/dev/null); "
                 "df -Pk \"${d:-/var/lib/docker}\" | awk 'NR==2 {print $4}'")


def check_room(remote: Any, node: Node, plan: Plan, size: int) -> None:
    """Raise ImageError, before a byte is sent, when the node's disk cannot take the `size`
    bytes of `plan.load` and keep DISK_SPARE free (a load that fills the disk fails half-way
    and leaves the engine unable to write)."""
    out = remote.run(node, "images: disk free", DISK_FREE_CMD, check=False).stdout.strip()
    if not out.isdigit():
        return  # unknown: the load itself will tell
    free = int(out) * 1024
    if free >= size + DISK_SPARE:
        return
    gib = 1024**3
    raise ImageError(
        f"not enough disk for {', '.join(w.ref for w in plan.load)}: {free / gib:.1f} GiB "
        f"free where Docker keeps images, {(size + DISK_SPARE) / gib:.1f} GiB needed "
        f"({size / gib:.1f} GiB to load + {DISK_SPARE / gib:.1f} GiB to spare); free some "
        "space on the node (`docker image prune` removes untagged images; images of other "
        "programs: `docker image ls`) or use a bigger SD card/SSD")


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


