"""Home Assistant's files on the Gluster volume: only what haswarm owns, the user's stay theirs.

    packages/haswarm/haswarm.yaml  haswarm's package (recorder on Galera): rewritten on every
                                   setup when its content differs; removed by clean together with
                                   packages/haswarm/secrets.yaml (the password the container
                                   writes there at start)
    configuration.yaml             created once, when absent; never overwritten nor removed. When
                                   it does not load packages/ (`packages: !include_dir_named
                                   packages`), setup warns: the recorder package is then unused.

Everything is written through one node's mount of the volume (the first node where it is mounted
and answers): every node sees the same files.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks import render
from tasks.config import Cluster, current
from tasks.facts import gather
from tasks.gluster import mounted_node
from tasks.ops import Op, StepError, apply_ops, remote_task, say

if TYPE_CHECKING:
    from tasks.remote import Remote

PACKAGE = "packages/haswarm/haswarm.yaml"
PACKAGE_SECRETS = "packages/haswarm/secrets.yaml"
CONFIGURATION = "configuration.yaml"

# `packages: !include_dir_named packages` (or packages/haswarm), or haswarm's file included by
# name under `packages:`. `!include_dir_merge_named` is NOT equivalent: it would read the keys of
# haswarm.yaml (`recorder:`) as package names.
_LOADS_PACKAGES = re.compile(
    r"""^[ \t]*packages:[ \t]*!include_dir_named[ \t]+(["']?)\.?/?packages(/haswarm)?/?\1"""
    r"""[ \t]*(\#.*)?$""", re.MULTILINE)
_INCLUDES_PACKAGE = re.compile(
    r"""^[ \t]*[A-Za-z0-9_]+:[ \t]*!include[ \t]+(["']?)\.?/?packages/haswarm/haswarm\.yaml\1"""
    r"""[ \t]*(\#.*)?$""", re.MULTILINE)


def loads_haswarm_package(configuration: str) -> bool:
    """Whether configuration.yaml loads packages/haswarm/haswarm.yaml (commented lines don't)."""
    return bool(_LOADS_PACKAGES.search(configuration) or _INCLUDES_PACKAGE.search(configuration))


def config_dir(c: Cluster) -> str:
    """Home Assistant's /config on the mounted volume."""
    return render.volume_paths(c)["homeassistant"]


def announce_image(r: Remote, c: Cluster, node: str) -> None:
    """Write the image Home Assistant is about to be deployed with beside its lock on the volume
    (`.haswarm/homeassistant.image`, through `node`'s mount): during the rolling update, waiting
    containers of the old image leave a free lock to one of the new image for a while, so an
    upgrade starts Home Assistant once (stack/haswarm-lock.py.j2)."""
    assert c.images.homeassistant is not None
    ref = c.images.homeassistant.node_ref
    d = f"{config_dir(c)}/{render.HA_LOCK_FILE.rsplit('/', 2)[1]}"
    tmp, final = f"{d}/homeassistant.image.new", f"{d}/homeassistant.image"
    r.run(node, "stack: announce Home Assistant's image",
          f"mkdir -p {shlex.quote(d)} && printf '%s\\n' {shlex.quote(ref)} > {shlex.quote(tmp)} "
          f"&& mv -f {shlex.quote(tmp)} {shlex.quote(final)}")


def rendered(c: Cluster, name: str) -> Path:
    """A rendered Home Assistant file in the build directory (tasks.render writes it)."""
    return render.build_dir(c) / "homeassistant" / name


@dataclass(frozen=True)
class HAFacts:
    """What the volume holds now."""

    package_sha256: str | None  # None: absent
    configuration: str | None  # None: absent


def plan_files(c: Cluster, package: str, configuration: str, facts: HAFacts
               ) -> tuple[list[Op], list[str]]:
    """(operations, warnings): haswarm's package when it differs, configuration.yaml when
    absent; a warning when an existing configuration.yaml does not load the package."""
    base = config_dir(c)
    ops = []
    warnings = []
    if facts.package_sha256 != hashlib.sha256(package.encode()).hexdigest():
        ops.append(Op(f"write {PACKAGE}", put=(f"{base}/{PACKAGE}", package)))
    if facts.configuration is None:
        ops.append(Op(f"create {CONFIGURATION} (absent; yours from now on)",
                      put=(f"{base}/{CONFIGURATION}", configuration)))
    elif not loads_haswarm_package(facts.configuration):
        warnings.append(
            f"warning: {base}/{CONFIGURATION} does not load packages/ (no "
            "`packages: !include_dir_named packages` under `homeassistant:`): the recorder "
            f"settings in {PACKAGE} are not used and Home Assistant keeps its history in SQLite "
            "on the network volume. Add that line under `homeassistant:`.")
    return ops, warnings


def _probes(c: Cluster) -> dict[str, str]:
    base = config_dir(c)
    pkg = shlex.quote(f"{base}/{PACKAGE}")
    conf = shlex.quote(f"{base}/{CONFIGURATION}")
    return {
        "package": f"if [ -f {pkg} ]; then sha256sum < {pkg} | cut -d' ' -f1; fi",
        "configuration": f"if [ -f {conf} ]; then echo present; cat {conf}; fi",
    }


def _facts(sections: dict[str, str]) -> HAFacts:
    conf = sections.get("configuration", "")
    return HAFacts(
        package_sha256=sections.get("package", "").strip() or None,
        configuration=conf.split("\n", 1)[1] if conf.startswith("present\n") else None,
    )


def setup_files(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """Write haswarm's package (when it differs) and configuration.yaml (when absent)."""
    step = "ha-files"
    with r.reading():
        node = mounted_node(c, r, step)
    if node is None and dryrun:
        say(c.nodes[0], f"{step}: would write Home Assistant's files once the volume is mounted")
        return {}
    if node is None:
        raise StepError(f"the volume is mounted on no node at {c.gluster.mount_point}: "
                        "Home Assistant's files cannot be written.\n  what to do: run "
                        "`doit gluster` first")
    with r.reading():
        facts = _facts(gather(r, node, step, _probes(c)))
    ops, warnings = plan_files(c, rendered(c, "packages/haswarm/haswarm.yaml").read_text(),
                               rendered(c, CONFIGURATION).read_text(), facts)
    apply_ops(r, node, step, ops, dryrun=dryrun)
    for w in warnings:
        say(node, f"{step}: {w}")
    return {"via": node.name, "warnings": warnings}


def plan_clean(c: Cluster, present: set[str]) -> list[Op]:
    """Remove haswarm's package (and the password file the container wrote beside it); keep
    configuration.yaml and everything else of the user's."""
    base = config_dir(c)
    ops = []
    for rel in (PACKAGE, PACKAGE_SECRETS):
        if rel in present:
            ops.append(Op(f"remove {rel}", f"rm -f {shlex.quote(f'{base}/{rel}')}"))
    if "packages/haswarm" in present:
        d = shlex.quote(f"{base}/packages/haswarm")
        p = shlex.quote(f"{base}/packages")
        ops.append(Op("remove packages/haswarm/ (and packages/ when empty)",
                      f"rmdir {d} 2>/dev/null; rmdir {p} 2>/dev/null; true"))
    return ops


def clean_files(c: Cluster, r: Remote, dryrun: bool) -> None:
    """Remove haswarm's own files from Home Assistant's config (through one node's mount)."""
    step = "ha-files (clean)"
    node = mounted_node(c, r, step)
    if node is None:
        say(c.nodes[0], f"{step}: the volume is mounted nowhere: nothing to do")
        return
    base = config_dir(c)
    rels = [PACKAGE, PACKAGE_SECRETS, "packages/haswarm"]
    listing = " ".join(shlex.quote(f"{base}/{rel}") for rel in rels)
    out = r.run(node, step, f"for f in {listing}; do [ -e \"$f\" ] && echo \"$f\"; done; true")
    present = {rel for rel in rels if f"{base}/{rel}" in out.stdout.splitlines()}
    apply_ops(r, node, step, plan_clean(c, present), dryrun=dryrun)
    say(node, f"{step}: {base}/{CONFIGURATION} and the rest of the config kept (user data)")


def task_ha_files() -> dict[str, Any]:
    """Home Assistant's files on the volume: haswarm's package; configuration.yaml if absent."""
    c = current()
    task = remote_task(
        c, "ha-files", None, task_ha_files.__doc__ or "", setup_files, clean_files,
        file_dep=[str(rendered(c, "packages/haswarm/haswarm.yaml")),
                  str(rendered(c, CONFIGURATION))],
        task_dep=["gluster"])
    task["basename"] = "ha-files"
    return task
