"""Fixtures of the image tests.

`project_build`: builds a context the way `doit images` does (tasks.images.build_context): every
`FROM` resolved to a local base first, a Debian base bootstrapped into the engine with mmdebstrap
when it is missing, buildx or the legacy builder as `HASWARM_BUILDER` says. So an image test
works on an engine that starts empty and never depends on an image an earlier run left behind.
The bootstrapped rootfs is cached where the lab's `doit images` keeps it (build/images/base), so
the first run pays the bootstrap once (~20-40 s natively) for both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tasks import images
from tasks.config import LAB_CLUSTER_FILE, load_cluster


def entrypoint_lines(logs: str, name: str, lines: int) -> str:
    """The Galera entrypoint's own lines (not mariadbd's) in one container's logs, the last
    `lines` of them under a `--- name` header (for failure reports)."""
    mine = [ln for ln in logs.splitlines() if " galera: " in ln]
    return f"--- {name}\n" + "\n".join(mine[-lines:])


@pytest.fixture(scope="session")
def project_build(tmp_path_factory) -> Callable[[Path, str], float]:
    """build(context, tag) -> seconds: the context built for the engine's own platform (its
    `prepare`, if any, is the caller's to run first)."""
    if not images.docker_available():
        pytest.skip("no Docker engine answers the docker CLI")
    lab = load_cluster(LAB_CLUSTER_FILE)
    cache = images.images_dir(lab) / "base"
    tools = images.tools_dir(lab)
    work = tmp_path_factory.mktemp("dockerfiles")
    platform = images.daemon_platform()

    def build(ctx: Path, tag: str) -> float:
        t0 = time.monotonic()
        text = (ctx / "Dockerfile").read_text()
        mapping = images.local_bases(text, platform, cache)
        unresolved = [ref for ref, use in mapping.items() if ref == use
                      and images.local_image(ref) is None]
        assert not unresolved, f"{ctx}: FROM {unresolved} would need a registry"
        images.build_context(ctx, tag, platform, mapping, work, tools)
        return time.monotonic() - t0

    return build
