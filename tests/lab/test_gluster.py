"""Gluster and Home Assistant's files on the lab, end to end: setup from bare nodes, replication,
a second run that changes nothing, the user's configuration.yaml kept, doit's bookkeeping, clean
(exact mirror), purge, and setup again.

The tests run in file order and share the lab's state. The module starts by purging whatever a
previous run left, and ends with the volume set up and mounted (the stack tests need it).
Timings are printed (`pytest -s`).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.driver import Lab
from tasks import gluster, homeassistant, ops, render, stack
from tasks.config import LAB_CLUSTER_FILE, PROJECT_ROOT, Cluster, load_cluster
from tasks.remote import Remote

pytestmark = pytest.mark.lab

SETUP = [("gluster-daemon", gluster.setup_daemon), ("gluster-replace", gluster.setup_replace),
         ("gluster-peers", gluster.setup_peers),
         ("gluster-bricks", gluster.setup_bricks), ("gluster-volume", gluster.setup_volume),
         ("gluster-mount", gluster.setup_mount), ("gluster-dirs", gluster.setup_dirs)]
CLEAN = [("ha-files", homeassistant.clean_files),
         ("gluster-dirs", gluster.clean_dirs), ("gluster-mount", gluster.clean_mount),
         ("gluster-volume", gluster.clean_volume), ("gluster-bricks", gluster.clean_bricks),
         ("gluster-peers", gluster.clean_peers), ("gluster-replace", gluster.clean_replace),
         ("gluster-daemon", gluster.clean_daemon)]
NAMES = ["pi1", "pi2", "pi3"]
BRICK = "/srv/gluster/haswarm"
MOUNT = "/mnt/haswarm"
HA = f"{MOUNT}/homeassistant"


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gluster")


@pytest.fixture(scope="module")
def cluster(workdir: Path) -> Cluster:
    """The lab cluster with its build dir (rendered inputs, stamps) in tmp; inputs rendered."""
    c = load_cluster(LAB_CLUSTER_FILE).model_copy(update={"build_dir": workdir / "build"})
    for out in render.outputs(c):
        if out.late_context is None:  # fstab lines, cron file, HA files: no secrets needed
            render.write(render.build_dir(c) / out.target, render.render(c, out), out.mode)
    return c


def on(lab: Lab, name: str, cmd: str, check: bool = True) -> str:
    return lab.exec(name, cmd, check=check, timeout=60).stdout


def run(c: Cluster, steps: list[tuple[str, Callable[..., Any]]], *, clean: bool = False,
        purge: bool = False, monkeypatch: pytest.MonkeyPatch | None = None) -> float:
    """Run setup (or clean) steps in order as doit would; fail on the first failed step."""
    if monkeypatch is not None:
        monkeypatch.setattr(gluster, "purge_requested", lambda: purge)
    started = time.monotonic()
    for step, fn in steps:
        res = ops.clean_step(c, step, fn, False) if clean else ops.run_step(c, step, fn)
        assert res is None, str(res)
    return time.monotonic() - started


def timing(what: str, seconds: float) -> None:
    print(f"\nlab: {what}: {seconds:.2f} s")


# ---------------------------------------------------------------------------------------------
# The tests, in order


FSTAB_BEFORE: dict[str, str] = {}


def test_setup_from_bare_nodes(lab: Lab, cluster: Cluster,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    # a stack left running on the lab (by a developer, or an earlier session) holds the mount:
    # take it down first, as `doit clean` would (dependents first)
    with Remote(cluster) as r:
        stack.remove(cluster, r)
    timing("purge (whatever a previous run left)",
           run(cluster, CLEAN, clean=True, purge=True, monkeypatch=monkeypatch))
    for n in NAMES:
        FSTAB_BEFORE[n] = on(lab, n, "cat /etc/fstab")
        assert not on(lab, n, f"ls -d {BRICK} 2>/dev/null || true").strip()
    took = run(cluster, SETUP)
    timing("gluster setup from bare nodes", took)

    info = on(lab, "pi1", "gluster --mode=script volume info haswarm")
    assert "Type: Replicate" in info
    assert "Number of Bricks: 1 x 3 = 3" in info
    assert "network.ping-timeout: 5" in info
    assert "cluster.server-quorum-type: server" in info
    for n in NAMES:
        fstab = on(lab, n, "cat /etc/fstab")
        ours = [line for line in fstab.splitlines() if " glusterfs " in line]
        assert len(ours) == 1 and ours[0].startswith(f"localhost:/haswarm {MOUNT} glusterfs ")
        options = ours[0].split()[3].split(",")
        assert "_netdev" in options
        others = ":".join(x.address for x in cluster.nodes if x.name != n)
        assert f"backup-volfile-servers={others}" in options
        assert fstab.startswith(FSTAB_BEFORE[n])  # the node's own lines untouched
        assert lab.exec(n, f"mountpoint -q {MOUNT}", check=False).returncode == 0
    data = on(lab, "pi2", f"stat -c '%u:%g %a' {MOUNT}/mosquitto/data")
    assert data.strip() == "1883:1883 750"
    assert on(lab, "pi3", f"stat -c '%u:%g' {HA}").strip() == "0:0"


def test_a_file_written_on_pi1_is_in_every_brick(lab: Lab, cluster: Cluster) -> None:
    on(lab, "pi1", f"mkdir -p {MOUNT}/test && echo replicated > {MOUNT}/test/hello.txt")
    for n in NAMES:
        assert on(lab, n, f"cat {BRICK}/test/hello.txt").strip() == "replicated"
    # and the other way round through another node's mount
    on(lab, "pi3", f"echo back > {MOUNT}/test/from-pi3.txt")
    assert on(lab, "pi2", f"cat {MOUNT}/test/from-pi3.txt").strip() == "back"


def test_second_run_changes_nothing(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    took = run(cluster, SETUP)
    out = capsys.readouterr().out
    node_lines = [line for line in out.splitlines() if line.startswith("pi")]
    assert node_lines and all(line.endswith(": nothing to do") for line in node_lines), out
    with capsys.disabled():
        timing("gluster re-run on the converged cluster (every step checks the nodes)", took)


def kill_fuse_client(lab: Lab, node: str) -> None:
    """Kill the node's glusterfs FUSE client of the mount (the mount started it): the mount
    stays in /proc/mounts but every access fails "Transport endpoint is not connected"."""
    pid = on(lab, node, f"pgrep -x glusterfs -a | grep -- '--volfile-id=/haswarm {MOUNT}$' "
                        "| cut -d' ' -f1").split()
    assert len(pid) == 1, pid
    on(lab, node, f"kill -9 {pid[0]}")
    deadline = time.monotonic() + 10
    while lab.exec(node, f"stat {MOUNT}", check=False).returncode == 0:
        assert time.monotonic() < deadline, "the mount still answers"
        time.sleep(0.2)


def test_a_dead_mount_is_remounted(lab: Lab, cluster: Cluster,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    kill_fuse_client(lab, "pi2")
    capsys.readouterr()
    run(cluster, [("gluster-mount", gluster.setup_mount)])
    out = capsys.readouterr().out
    assert "pi2: gluster:mount: detach the dead mount on /mnt/haswarm (umount -l)" in out
    assert "pi1: gluster:mount: nothing to do" in out
    assert on(lab, "pi2", f"cat {MOUNT}/test/hello.txt").strip() == "replicated"
    assert on(lab, "pi2", f"grep -c ' {MOUNT} ' /proc/mounts").strip() == "1"


def test_ha_files_keep_the_users_edits(lab: Lab, cluster: Cluster,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    run(cluster, [("ha-files", homeassistant.setup_files)])
    package = f"{HA}/{homeassistant.PACKAGE}"
    rendered_pkg = (render.build_dir(cluster) / "homeassistant/packages/haswarm/haswarm.yaml")
    assert on(lab, "pi3", f"cat {package}") == rendered_pkg.read_text()
    conf = on(lab, "pi2", f"cat {HA}/configuration.yaml")
    assert "packages: !include_dir_named packages" in conf

    # the user edits configuration.yaml, someone edits haswarm's own file
    on(lab, "pi2", "printf 'automation: !include automations.yaml\\n' "
                       f">> {HA}/configuration.yaml && echo '# edited' >> {package}")
    edited = on(lab, "pi1", f"cat {HA}/configuration.yaml")
    capsys.readouterr()
    run(cluster, [("ha-files", homeassistant.setup_files)])
    out = capsys.readouterr().out
    assert "write packages/haswarm/haswarm.yaml" in out
    assert "configuration.yaml" not in out
    assert on(lab, "pi1", f"cat {HA}/configuration.yaml") == edited
    assert on(lab, "pi1", f"cat {package}") == rendered_pkg.read_text()

    # a configuration.yaml that does not load the packages: kept, and a warning
    on(lab, "pi1", f"cp {HA}/configuration.yaml /tmp/conf.keep && "
                       f"printf 'default_config:\\n' > {HA}/configuration.yaml")
    capsys.readouterr()
    run(cluster, [("ha-files", homeassistant.setup_files)])
    out = capsys.readouterr().out
    assert "does not load packages/" in out
    assert on(lab, "pi1", f"cat {HA}/configuration.yaml") == "default_config:\n"
    on(lab, "pi1", f"cp /tmp/conf.keep {HA}/configuration.yaml")

    capsys.readouterr()
    run(cluster, [("ha-files", homeassistant.setup_files)])
    assert capsys.readouterr().out.count("nothing to do") == 1


def test_doit_converged_run_opens_no_connection(cluster: Cluster, workdir: Path) -> None:
    """Through doit: the steps stamp themselves; a second run is up to date (no SSH at all),
    `clean -n` only tells."""
    data = yaml.safe_load(LAB_CLUSTER_FILE.read_text())
    data.update(build_dir=str(render.build_dir(cluster)), secrets_dir=str(workdir / "secrets"))
    data["ssh"].update(key=str(cluster.ssh.key), known_hosts=str(cluster.ssh.known_hosts))
    (workdir / "cluster.yml").write_text(yaml.safe_dump(data))
    (workdir / "dodo.py").write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(PROJECT_ROOT)!r})
        from tasks.render import task_render  # noqa: F401
        from tasks.secrets import task_secrets  # noqa: F401
        from tasks.gluster import task_gluster  # noqa: F401
        from tasks.homeassistant import task_ha_files  # noqa: F401
        DOIT_CONFIG = {{"dep_file": {str(workdir / "doit.db")!r}, "backend": "json",
                       "verbosity": 2}}
    """))

    def doit(*args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "doit", "-f", str(workdir / "dodo.py"),
                              *args, f"config={workdir / 'cluster.yml'}"],
                             capture_output=True, text=True, timeout=120, cwd=workdir)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    first = doit("gluster", "ha-files")
    assert "nothing to do" in first
    started = time.monotonic()
    second = doit("gluster", "ha-files")
    timing("doit gluster ha-files on the converged cluster", time.monotonic() - started)
    # every step asks the nodes again (they are the truth, not doit's stamps) and changes
    # nothing: each says so
    for step in ("gluster:daemon", "gluster:bricks", "gluster:volume", "gluster:mount",
                 "gluster:dirs", "ha-files"):
        assert f"{step}: nothing to do" in second, (step, second)
    assert " would " not in second

    dry = doit("clean", "-n", "gluster", "ha-files")
    assert "would unmount /mnt/haswarm" in dry and "would delete volume haswarm" in dry
    assert "gluster volume" not in dry  # nothing ran
    stamps = Path(render.build_dir(cluster)) / "state"
    assert (stamps / "gluster-volume.json").exists()  # a dry run forgets nothing
    third = doit("gluster")
    assert "gluster:mount: nothing to do" in third and "gluster:volume: nothing to do" in third


def test_clean_is_the_exact_mirror(lab: Lab, cluster: Cluster,
                                   monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    kill_fuse_client(lab, "pi3")  # a dead mount is detached lazily
    capsys.readouterr()
    took = run(cluster, CLEAN, clean=True, monkeypatch=monkeypatch)
    assert "pi3: gluster:mount (clean): unmount the dead mount" in capsys.readouterr().out
    with capsys.disabled():
        timing("clean (volume, mounts, fstab, peers; bricks kept)", took)
    assert "No volumes present" in on(lab, "pi1", "gluster --mode=script volume list 2>&1")
    for n in NAMES:
        assert on(lab, n, "gluster --mode=script peer status").startswith("Number of Peers: 0")
        assert on(lab, n, "cat /etc/fstab") == FSTAB_BEFORE[n]
        assert "glusterfs" not in on(lab, n, "cat /proc/mounts")
        assert lab.exec(n, f"test -e {MOUNT}", check=False).returncode != 0  # dir removed too
        # user data kept on every brick
        assert on(lab, n, f"cat {BRICK}/test/hello.txt").strip() == "replicated"
        assert on(lab, n, f"cat {BRICK}/homeassistant/configuration.yaml")
    # haswarm's own file (and the password file the container writes) went with the package
    assert lab.exec("pi1", f"test -e {BRICK}/homeassistant/packages/haswarm",
                    check=False).returncode != 0

    capsys.readouterr()
    run(cluster, CLEAN, clean=True, monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    acted = (": unmount", ": stop volume", ": delete volume", ": detach", ": remove ")
    assert not [line for line in out.splitlines() if any(a in line for a in acted)], out
    for needle in ("gluster:mount (clean): nothing to do", "gluster:volume (clean): nothing to do",
                   "gluster:peers (clean): nothing to do"):
        assert needle in out


def test_purge_removes_the_bricks_and_setup_works_again(lab: Lab, cluster: Cluster,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    took = run(cluster, CLEAN, clean=True, purge=True, monkeypatch=monkeypatch)
    for n in NAMES:
        assert lab.exec(n, f"test -e {BRICK}", check=False).returncode != 0
    # setup again: the lab is left set up for the tests that follow (stack)
    again = run(cluster, [*SETUP, ("ha-files", homeassistant.setup_files)])
    with capsys.disabled():
        timing("purge of a cleaned cluster", took)
        timing("setup again after purge (gluster + ha-files)", again)
    assert "Type: Replicate" in on(lab, "pi2", "gluster --mode=script volume info haswarm")
    for n in NAMES:
        assert lab.exec(n, f"mountpoint -q {MOUNT}", check=False).returncode == 0
    assert on(lab, "pi3", f"ls {HA}").split() == ["configuration.yaml", "packages"]
