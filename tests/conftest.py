"""Shared pytest fixtures.

`lab`: the local lab of config/lab.yml (see lab/driver.py), up for the whole session. If no node
of it was running when the session started, the fixture brings it up and takes it down at the
end; if the lab (or part of it) was already running (someone is using it), the missing nodes
are started and the lab is left running afterwards. Tests that use it skip when this machine
cannot run the lab (not root, missing packages).

Tests must leave the lab as they found it (other people and sessions may be using it): faults
that end nodes belong on a private lab (`lab.driver.instance_lab`, see tests/lab/test_lab.py).
"""

from __future__ import annotations

import os

import pytest

# Set by .ci/run: a lab or image test that skips there (no engine, no QEMU, cgroup v2, a missing
# package) hides a broken install step behind a green run, so it fails instead.
NO_SKIP_ENV = "HASWARM_NO_SKIP"


def _strict() -> bool:
    return os.environ.get(NO_SKIP_ENV) == "1"


def _as_failure(report, what: str) -> None:
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"{what} skipped with {NO_SKIP_ENV}=1 (CI): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _strict() and report.skipped and item.get_closest_marker("lab") \
            and not hasattr(report, "wasxfail"):
        _as_failure(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _strict() and report.skipped and collector.path.parent.name in ("image", "lab"):
        _as_failure(report, str(collector.path))


@pytest.fixture(autouse=True)
def _fresh_doit_vars():
    """doit keeps `name=value` command-line variables in a module global; a test that runs doit
    in-process (e.g. with `config=PATH`) must not leak them into the next test's `get_var`."""
    from doit.doit_cmd import reset_vars

    reset_vars()
    yield
    reset_vars()


@pytest.fixture(autouse=True)
def _no_run_left_open():
    """A test that calls preflight itself (not through doit, whose teardown ends the run) must
    not leave the next test's steps reading what it read (tasks/fact_cache.py)."""
    yield
    from tasks.fact_cache import SHARED

    if SHARED.active:
        SHARED.end()


@pytest.fixture(scope="session")
def lab():
    from lab.driver import Lab, LabError
    from tasks.config import LAB_CLUSTER_FILE, load_cluster

    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    lab = Lab(load_cluster(LAB_CLUSTER_FILE))
    try:
        lab.check_host()
    except LabError as e:
        pytest.skip(f"this machine cannot run the lab: {e}")
    was_running = [n for n in lab.names if lab.pid(n) is not None]
    try:
        lab.up()
    except LabError as e:
        pytest.fail(f"lab-up failed:\n{e}", pytrace=False)
    yield lab
    if not was_running:
        lab.down()


# The end-to-end modules share one lab: run them in the order the cluster is built, so a module
# that tears a layer down (gluster purges, swarm re-forms) runs before the layers above it are
# deployed, and the fault tests run last on the deployed cluster.
LAB_ORDER = ["test_lab", "test_remote", "test_preflight", "test_preload", "test_gluster",
             "test_avahi", "test_swarm", "test_stack", "test_onboard", "test_backup",
             "test_hardening", "test_registry", "test_failover", "test_sensor", "test_chaos",
             "test_outage", "test_replace", "test_frozen", "test_cycle"]


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> tuple[int, int]:
        path = item.path
        if path.parent.name != "lab":
            return (0, 0)  # unit and image tests first: they do not touch the lab
        stem = path.stem
        return (1, LAB_ORDER.index(stem) if stem in LAB_ORDER else len(LAB_ORDER))

    items.sort(key=rank)  # stable: the order inside a module is kept


# Free disk after each image and lab module (and at the start): the suite holds several GB
# (engine, node disks, saved images, a registry), and a CI machine's free space varies, so a
# failure from a full disk must show in the log where the space went.
def _free_gib() -> float:
    import shutil

    return shutil.disk_usage(os.environ.get("TMPDIR", "/tmp")).free / 1024**3


def pytest_report_header(config):
    return f"disk: {_free_gib():.1f} GiB free at the start"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    if item.path.parent.name in ("image", "lab") and (nextitem is None
                                                     or nextitem.path != item.path):
        freed = _drop_saved_images(item.config)
        tr = item.config.pluginmanager.get_plugin("terminalreporter")
        last_image_module = (item.path.parent.name == "image" and nextitem is not None
                             and nextitem.path.parent.name != "image")
        trim = os.environ.get(TRIM_ENV) == "1"
        trimmed = _trim_engine() if last_image_module and trim else ""
        if trim and item.path.parent.name == "lab":
            trimmed += _link_node_layers()
        if tr is not None:
            tr.write_line(f"\n[disk] after {item.path.stem}: {_free_gib():.1f} GiB free"
                          + (f" ({freed / 1024**3:.1f} GiB of its saved images removed)"
                             if freed > 2**20 else "") + trimmed)


def _drop_saved_images(config) -> int:
    """Remove the image tarballs a finished module left in pytest's temporary dirs (no fixture
    outlives its module with one: the session fixtures hold none). Returns the bytes freed."""
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None:
        return 0
    freed = 0
    for path in factory.getbasetemp().rglob("*.tar*"):
        if path.is_file() and (path.suffix == ".tar" or ".tar.part" in path.name):
            freed += path.stat().st_size
            path.unlink()
    return freed


# Set by .ci/run. A CI machine's free disk varies: one had too little for the lab's node disks
# (its preload failed with "no space left on device"). When the image tests are done, the engine
# holds ~3 GB that no later test uses: the images built only for them (another platform's, under
# QEMU, and haswarm-lab-test/*) and the build cache of intermediate stages (Home Assistant's
# compilers and wheels). The lab's own images stay, and so do the cache records they share: its
# `doit images` then still finds every layer cached (same image IDs, seconds, measured). Not done
# on a developer's machine, where the emulated image is kept for the next run (~7.5 min to build).
TRIM_ENV = "HASWARM_TRIM_ENGINE"


def _trim_engine() -> str:
    """Remove the image tests' own images and the unshared build cache; what it freed, said."""
    import json
    import subprocess

    from tasks import images

    def docker(*args: str) -> str:
        return subprocess.run(["docker", *args], capture_output=True, text=True,
                              timeout=300).stdout

    before = _free_gib()
    native = str(images.daemon_platform())
    refs = [r for r in docker("image", "ls", "--format", "{{.Repository}}:{{.Tag}}").split()
            if not r.endswith(":<none>")]
    drop = []
    for ref in refs:
        info = images.local_image(ref) or {}
        platform = f"{info.get('Os')}/{info.get('Architecture')}"
        if ref.startswith("haswarm-lab-test/") or not native.startswith(platform):
            drop.append(ref)
    if drop:
        docker("image", "rm", *drop)
    # A record is pruned only once no other record builds on it: a pass per level of stages.
    for _ in range(5):
        records = json.loads(docker("system", "df", "-v", "--format", "{{json .BuildCache}}")
                             or "[]")
        unshared = [r["ID"] for r in records or []
                    if r.get("Shared") == "false" and r.get("InUse") == "false"]
        if not unshared:
            break
        for rid in unshared:  # the daemon takes one id filter per call
            docker("builder", "prune", "-f", "--filter", f"id={rid}")
    return (f" (engine trimmed by {_free_gib() - before:.1f} GiB: {len(drop)} test-only "
            "images, the unshared build cache)")


# The three lab nodes are directories of one disk, so each holds its own copy of every image
# (~1.2 GB each). Their image layers never change once loaded (a container writes to a layer of
# its own; overlayfs copies a file up before changing it), so the identical files of the nodes'
# layers can share one inode, as a copy-on-write disk would let them. Done after a lab module
# that took 1 GiB or more (a preload, a node wiped and loaded again), with TRIM_ENV only.
_free_when_linked: float | None = None  # GiB free right after the last link


def _link_node_layers() -> str:
    """Hardlink identical files among the lab nodes' image layers (util-linux `hardlink`,
    mode, owner, time and xattrs respected); what it freed, said."""
    import shutil
    import subprocess
    import time

    from lab.base import STATE_DIR

    global _free_when_linked
    free = _free_gib()
    if _free_when_linked is not None and free > _free_when_linked - 1.0:
        return ""
    layers = []
    pattern = "nodes/*/docker/image/overlay2/layerdb/sha256/*/cache-id"
    for cache_id in sorted(STATE_DIR.glob(pattern)):  # .../docker/image/overlay2/layerdb/...
        diff = cache_id.parents[5] / "overlay2" / cache_id.read_text().strip() / "diff"
        if diff.is_dir():
            layers.append(str(diff))
    if not layers or shutil.which("hardlink") is None:
        return ""
    t0 = time.monotonic()
    subprocess.run(["hardlink", "--quiet", "--respect-xattrs", *layers], capture_output=True,
                   timeout=600)
    _free_when_linked = _free_gib()
    return (f" (the nodes' image layers linked: {_free_when_linked - free:.1f} GiB freed in "
            f"{time.monotonic() - t0:.0f} s)")

