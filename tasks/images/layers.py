"""Images: what a node holds and what it lacks. Its facts (one `docker image inspect` of every
image: `node_facts`), the images it must hold (`read_manifest`), the pure plan between the two
(`plan_node`: present, to retag, to load, and which layers to send), the check of its disk
(`check_room`) and the members of one `docker load` stream carrying only the missing layers
(`load_entries`, read from the saved tarballs). The direct preload (preload.py) and the relay
(relay.py) both build on these."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tasks.config import Cluster, Node
from tasks.images.base import TarEntry, normalize_ref
from tasks.images.build import manifest_path, stack_images
from tasks.images.core import ImageError, Platform, image_matches

STEP = "preload-images"  # how its lines start: "pi1: preload-images: nothing to do"
# Room a node must keep free after its images are loaded: the database, logs and containers
# grow, and an engine whose disk is full stops writing (preflight and the preload check it).
DISK_SPARE = 512 * 1024**2



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
