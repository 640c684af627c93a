"""Images: make every image of the stack exist for the cluster's platform, then put it on the nodes.

    doit images            pull or build each image, check its platform, save BUILD/images/<svc>.tar
    doit base-image        the local Debian base the Dockerfiles start FROM (made when missing)
    doit buildx            fetch the buildx builder (Debian trixie's docker-buildx) into BUILD/tools
    doit preload-images    load what each node lacks, all nodes in parallel (preload-images:pi1 ...)

Building (`images:<service>`), in this order:
1. The context's executable `prepare` (if any) runs on this machine with the context as cwd
   (downloads wheels...; it must be idempotent). It gets HASWARM_PLATFORM=<platform>.
2. `FROM` resolution. Without a registry, `FROM debian:bookworm` must exist locally *for the
   target platform*, but one tag names one image in a classic Docker engine: the amd64
   `debian:bookworm` and an armhf one cannot share it. Measured on dockerd 20.10: the legacy
   builder with `--platform linux/arm/v7` silently builds FROM the amd64 image (and yields an
   amd64 image); BuildKit refuses the mismatch and goes to the registry; BuildKit's named
   contexts (`--build-context debian:bookworm=docker-image://...`) are refused by the engine's
   built-in BuildKit 0.8. So `base-image` makes (mmdebstrap + `docker load`, correct
   architecture/variant recorded) a per-platform tag such as `haswarm/debian:bookworm-armhf`, and
   the build uses a copy of the Dockerfile whose `FROM debian:bookworm` lines (or `ARG` defaults
   feeding a `FROM ${VAR}`) name that tag. A local `debian:bookworm` that already matches the
   platform is used as it is; an image the project cannot bootstrap is left to the builder (pull).
3. `docker buildx build --platform P --load` (docker driver) when buildx can be had, else the
   legacy builder (`DOCKER_BUILDKIT=0 docker build --platform P`); both build arm/v7 and arm64
   under QEMU (binfmt is checked and registered first). HASWARM_BUILDER=legacy|buildx forces one.
4. The image's recorded OS/architecture/variant must match the platform, then
   `docker save REPO:TAG` (tag kept) writes the tarball; `<service>.json` records the image ID
   and layers, and `images:manifest` gathers them into `manifest.json` for the preload.
Pulled images (`pull.py`): `docker pull --platform P` of NAME:TAG, or of NAME@DIGEST for a
reference pinned by digest (then tagged NAME:sha256-<hex>, the tag the nodes and the stack use:
`docker load` cannot record a digest); then step 4, the registry's digest recorded in
`<service>.json` and manifest.json ("digest"). A pull that fails (registry down, tag or digest not
there, access refused) fails `images:<service>` naming the image, the registry and what to do;
nothing is saved, and since `preload-images` depends on manifest.json, made from every
`images:<service>`, doit never preloads after it: no node changes. The local engine stands in
only for a reference pinned by digest whose image it holds under that digest (the same content by
definition), never for a tag (a stale local tag would be deployed silently).

Up to date: a built image while its context files (as git sees them: tracked or untracked but not
ignored, so the `prepare` downloads do not count: they are a function of the tracked pins) and the
resolved base are unchanged and its pin/platform are the same; a pulled one while its pin and
platform are the same. Nothing here talks to Docker or SSH while tasks are loaded.

Preload: per node one `docker image inspect` over SSH gives the facts (tags, image IDs, layer
chains); only what is missing is sent: a tag whose image is there is just re-tagged; a missing
image goes as one `docker load` stream built on the fly from the saved tarballs (through the
remote layer's Docker client, nothing is copied to the node's disk first), leaving out every
layer the node already holds (the Debian base is sent once, not once per image). After loading,
the facts are read again: tag, image ID and platform must match. Nodes run in parallel threads
(`Remote.on_all`), one progress line each; a failed node is named with its reason after the
others finished. The preload tasks run on every `doit setup` (a wiped node gets its images
again); a node holding everything prints "pi1: preload-images: nothing to do". As every step
that changes a node (tasks/ops.py), the plan becomes `Op`s (`preload_ops`: a `docker tag` per
retag, one `call` for the load stream) that `apply_ops` applies or, in `doit plan`, only tells
("pi1: preload-images: would load 2 image(s): ... (3 layer(s), 1 shared, 120 MB)").

Before that, when two nodes or more lack the same images, the relay (relay.py, `preload.relay`
in the cluster file, on by default) sends them once, to the first of those nodes, which loads
them and passes the same bytes on to the next over SSH as they arrive, and so on: the
controller's link (a Pi's 100 Mbit, often) carries the image set once, not once per node. The
per-node pass above then finds those nodes complete, and sends what the chain missed.

The package, one job per module:
    core.py     platforms, the local Docker engine, QEMU emulation (binfmt), ImageError
    base.py     FROM lines, the local Debian bases (mmdebstrap + docker load), tar streams
    build.py    buildx, build, platform check, save, manifest
    pull.py     pull by tag or digest, why a pull failed, the local stand-in rule
    layers.py   a node's image facts, the plan of what it lacks, the tar of only those layers
    relay.py    what several nodes lack sent once, passed from node to node over SSH
    preload.py  per node: its Ops, one docker load stream; preload(): the relay, then each node
    here        the doit task creators (no Docker, no SSH at load time: `doit list` is instant)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from doit.tools import config_changed

from tasks.config import current
from tasks.images.base import (
    BaseChoice,
    FromLine,
    TarEntry,
    base_refs,
    base_tag,
    bootstrap_suite,
    ensure_base,
    normalize_ref,
    parse_froms,
    rewrite_froms,
    tar_stream,
)
from tasks.images.build import (
    build_context,
    build_image,
    buildx_command,
    context_dir,
    context_files,
    context_hash,
    fetch_buildx,
    fetch_buildx_action,
    images_dir,
    local_bases,
    make_image,
    manifest_path,
    resolve_bases,
    run_prepare,
    save_image,
    stack_images,
    step,
    tools_dir,
    write_manifest,
)
from tasks.images.core import (
    BINFMT_DIR,
    BUILDER_ENV,
    SERVICES,
    ImageError,
    Platform,
    daemon_platform,
    docker_available,
    ensure_emulation,
    image_matches,
    local_image,
    verify_local,
)
from tasks.images.layers import (
    FACTS_CMD,
    NodeFacts,
    Plan,
    Wanted,
    _SavedImage,
    chain_ids,
    check_node,
    load_entries,
    node_facts,
    plan_node,
    read_manifest,
)
from tasks.images.preload import (
    clean_preload,
    clean_saved,
    preload,
    preload_action,
    preload_node,
    preload_ops,
)
from tasks.images.pull import (
    classify_pull_error,
    local_fallback,
    pull_failure,
    pull_image,
    pulled_digest,
    repo_digest,
)

__all__ = [
    "BINFMT_DIR", "BUILDER_ENV", "FACTS_CMD", "SERVICES", "BaseChoice", "FromLine",
    "ImageError", "NodeFacts", "Plan", "Platform", "TarEntry", "Wanted", "_SavedImage",
    "base_refs", "base_tag", "classify_pull_error", "local_fallback", "pull_failure",
    "pulled_digest", "repo_digest", "bootstrap_suite", "build_context", "build_image",
    "buildx_command", "chain_ids", "check_node", "context_dir", "context_files", "context_hash",
    "daemon_platform", "docker_available", "ensure_base", "ensure_emulation", "fetch_buildx",
    "image_matches", "images_dir", "load_entries", "local_bases", "local_image",
    "make_image", "manifest_path", "node_facts", "normalize_ref", "parse_froms", "plan_node",
    "preload", "preload_node", "preload_ops", "pull_image", "read_manifest", "resolve_bases",
    "rewrite_froms", "run_prepare", "save_image", "stack_images", "tar_stream", "tools_dir",
    "verify_local", "write_manifest",
    "task_buildx", "task_base_image", "task_images", "task_preload_images",
]


# ---------------------------------------------------------------------------------------------
# Task creators (no Docker, no SSH here: `doit list` stays instant)


def task_buildx() -> dict[str, Any]:
    """Fetch buildx (Debian trixie's docker-buildx) into BUILD/tools when docker lacks it."""
    c = current()
    dest = tools_dir(c) / "docker-buildx"
    return {"actions": [(fetch_buildx_action, [dest])], "targets": [dest], "uptodate": [True],
            "clean": [(clean_saved, [[str(dest)]])], "verbosity": 2}


def task_base_image() -> dict[str, Any]:
    """Make the base images the Dockerfiles build FROM exist locally for the platform."""
    c = current()
    return {
        "basename": "base-image",
        "actions": [(step, [resolve_bases, c])],
        "targets": [images_dir(c) / "base.json"],
        "clean": [(clean_saved, [[str(images_dir(c) / "base.json")]])],
        "verbosity": 2,
    }


def task_images() -> Iterator[dict[str, Any]]:
    """Pull or build every image of the stack for the platform and save it (BUILD/images)."""
    c = current()
    out = images_dir(c)
    yield {"basename": "images", "name": None,
           "doc": "Pull or build every image of the stack for the platform, save it to "
                  "BUILD/images."}
    for service, img in stack_images(c).items():
        if img.build is not None:
            ctx = context_dir(img)
            deps = [*context_files(ctx), out / "base.json"]
            doc = f"Build {img.image} from {img.build} for {c.platform}, save {service}.tar."
        else:
            deps = []
            doc = f"Pull {img.image} for {c.platform}, save {service}.tar."
        yield {
            "basename": "images",
            "name": service,
            "doc": doc,
            "actions": [(step, [make_image, c, service])],
            "file_dep": [str(p) for p in deps],
            "targets": [str(out / f"{service}.tar"), str(out / f"{service}.json")],
            "uptodate": [config_changed({"image": img.image, "platform": c.platform,
                                         "build": str(img.build) if img.build else None})],
            "clean": [(clean_saved, [[str(out / f"{service}.tar"), str(out / f"{service}.json")]])],
            "verbosity": 2,
        }
    yield {
        "basename": "images",
        "name": "manifest",
        "doc": "Gather the saved images into manifest.json (read by preload-images).",
        "actions": [(step, [write_manifest, c])],
        "file_dep": [str(out / f"{s}.json") for s in stack_images(c)],
        "targets": [str(manifest_path(c))],
        "clean": [(clean_saved, [[str(manifest_path(c))]])],
    }


def task_preload_images() -> Iterator[dict[str, Any]]:
    """Put every image on every node (only what each lacks), nodes in parallel.

    `preload-images` does all nodes at once (threads); `preload-images:pi1` one node. These are
    plain tasks named with a colon rather than doit subtasks, because doit runs a group's
    subtasks one after the other. They run on every `doit setup`: each node is asked what it
    has (one `docker image inspect`), so a wiped node gets its images again."""
    c = current()
    manifest = manifest_path(c)
    nodes = {n.name: n.address for n in c.nodes}
    steps = [("preload-images", None, f"Put every image on every node ({', '.join(nodes)}) "
              "in parallel, sending only what each lacks.")]
    steps += [(f"preload-images:{name}", [name], f"Put every image on {name} ({addr}).")
              for name, addr in nodes.items()]
    for basename, only, doc in steps:
        step = basename.replace(":", "-")
        yield {
            "basename": basename,
            "doc": doc,
            "actions": [(preload_action, [only, step])],
            "file_dep": [str(manifest)],
            "uptodate": [False],  # the nodes are the truth (see above)
            "clean": [(clean_preload, [only, step])],
            "verbosity": 2,
        }
