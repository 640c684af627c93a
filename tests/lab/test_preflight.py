"""`doit preflight`: verdict and table logic on made-up facts, then real SSH (loopback sshd, and
the lab when its fixture exists)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from doit.exceptions import TaskFailed

from tasks import preflight as pf
from tasks.config import LAB_CLUSTER_FILE, SSH, Cluster, load_cluster
from tasks.preflight import MIN_DISK_FREE, Facts, judge, parse_facts, report, table

# The loopback sshd helpers live in test_remote.py; load them by path (any pytest import mode).
_spec = importlib.util.spec_from_file_location("_haswarm_remote_helpers",
                                               Path(__file__).with_name("test_remote.py"))
assert _spec and _spec.loader
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)


@pytest.fixture
def cluster() -> Cluster:
    return load_cluster(LAB_CLUSTER_FILE)  # platform linux/amd64, pi1..pi3


def _arm(c: Cluster, platform: str) -> Cluster:
    return c.model_copy(update={"platform": platform})


def good(c: Cluster, **changes: object) -> dict[str, Facts]:
    """Facts of a healthy amd64 cluster, with `changes` ({node: {field: value}}) applied."""
    out = {}
    for i, n in enumerate(c.nodes):
        f = Facts(n.name, n.address, machine="x86_64", docker_version="28.2.2",
                  docker_arch="amd64", engine_id=f"engine-{i}", disk_free=20 * 1024**3,
                  disk_path="/var/lib/docker", clock_skew=0.02, clock_error=0.01)
        for key, value in dict(changes.get(n.name, {})).items():  # type: ignore[call-overload]
            setattr(f, key, value)
        out[n.name] = f
    return out


# ---------------------------------------------------------------------------------------------
# Verdicts


def test_all_good(cluster: Cluster) -> None:
    facts = judge(cluster, good(cluster))
    assert all(not f.problems for f in facts.values())
    assert report(cluster, facts) is None
    lines = table(cluster, facts).splitlines()
    assert lines[0].split() == ["node", "address", "ssh", "docker", "arch", "disk", "free",
                                "clock", "skew", "verdict"]
    assert lines[1].split() == ["pi1", "10.77.0.11", "ok", "28.2.2", "x86_64", "(amd64)", "20.0",
                                "GiB", "+0.02", "s", "ok"]


def test_each_bad_node_named_with_its_reason(cluster: Cluster) -> None:
    facts = judge(cluster, good(
        cluster,
        pi1={"disk_free": 900 * 1024**2},
        pi3={"ssh_error": "unreachable: no answer from 10.77.0.13 port 22 within 5 s",
             "ssh_hint": "check that pi3 is powered on"},
    ))
    msg = report(cluster, facts)
    assert msg is not None
    assert msg.splitlines()[0] == "preflight: 2 of 3 nodes not ready: pi1, pi3"
    assert "pi1 (10.77.0.11):\n    - disk: only 900 MiB free in /var/lib/docker" in msg
    assert "pi3 (10.77.0.13):\n    - ssh: unreachable: no answer" in msg
    assert "check that pi3 is powered on" in msg and "pi2" not in msg.split("\n", 1)[1]
    rows = {line.split()[0]: line for line in table(cluster, facts).splitlines()[1:]}
    assert rows["pi3"].split()[2:8] == ["FAIL", "-", "-", "-", "-", "NOT"]
    assert rows["pi3"].endswith("NOT READY: unreachable")
    assert rows["pi1"].endswith("NOT READY: disk") and rows["pi2"].endswith("ok")


def test_architecture(cluster: Cluster) -> None:
    # A Pi 4 with 32-bit Raspberry Pi OS: 64-bit kernel, 32-bit Docker: fits linux/arm/v7.
    arm7 = _arm(cluster, "linux/arm/v7")
    pi4_32 = {"machine": "aarch64", "docker_arch": "arm"}
    assert report(arm7, judge(arm7, good(arm7, pi1=pi4_32, pi2=pi4_32, pi3=pi4_32))) is None
    # 64-bit Docker on a cluster declared arm/v7: say which platform fits.
    facts = judge(arm7, good(arm7, pi1=pi4_32, pi2=pi4_32,
                             pi3={"machine": "aarch64", "docker_arch": "arm64"}))
    (p,) = facts["pi3"].problems
    assert p.startswith("arch: Docker runs as arm64 (CPU aarch64), but the cluster file says "
                        "platform: linux/arm/v7")
    assert "set platform: linux/arm64" in p
    # 32-bit Docker on a cluster declared arm64: also suggest a 64-bit OS.
    arm64 = _arm(cluster, "linux/arm64")
    facts = judge(arm64, good(arm64, pi1=pi4_32))
    assert "install a 64-bit OS" in facts["pi1"].problems[0]
    # No Docker answer: judge by uname.
    facts = judge(arm64, good(arm64, pi2={"docker_arch": None, "docker_version": None,
                                          "docker_error": "docker: command not found",
                                          "machine": "armv6l"}))
    kinds = [p.split(":")[0] for p in facts["pi2"].problems]
    assert kinds == ["docker", "arch"] and "Docker is not installed" in facts["pi2"].problems[0]
    assert "the CPU is armv6l" in facts["pi2"].problems[1]


def test_docker_not_running(cluster: Cluster) -> None:
    err = "Cannot connect to the Docker daemon at unix:///var/run/docker.sock."
    facts = judge(cluster, good(cluster, pi2={"docker_version": None, "docker_arch": None,
                                              "docker_error": err}))
    assert facts["pi2"].problems == [f"docker: the engine does not answer ({err}): "
                                     "systemctl start docker"]
    assert "FAIL" in table(cluster, facts).splitlines()[2]


def test_disk_threshold(cluster: Cluster) -> None:
    facts = judge(cluster, good(cluster, pi1={"disk_free": MIN_DISK_FREE},
                                pi2={"disk_free": MIN_DISK_FREE - 1},
                                pi3={"disk_free": None}))
    assert facts["pi1"].problems == []
    assert "needed for the images" in facts["pi2"].problems[0]
    assert facts["pi3"].problems == ["disk: could not read free space (df)"]


def test_disk_need_counts_only_the_images_a_node_lacks(cluster: Cluster) -> None:
    """With the images' sizes known (manifest.json), a node holding them all needs only the
    spare (a converged Pi with 1 GiB free is ready); one lacking an image needs its size too;
    an image not built or pulled yet keeps the MIN_DISK_FREE estimate."""
    mib = 1024**2
    images = {"homeassistant": ("sha256:ha", 900 * mib), "mariadb": ("sha256:db", 300 * mib)}
    facts = judge(cluster, good(cluster,
                                pi1={"disk_free": 1024 * mib,
                                     "image_ids": frozenset({"sha256:ha", "sha256:db"})},
                                pi2={"disk_free": 1024 * mib,
                                     "image_ids": frozenset({"sha256:db"})},
                                pi3={"disk_free": 1500 * mib, "image_ids": frozenset()}), images)
    assert facts["pi1"].problems == []
    assert facts["pi2"].problems == [
        "disk: only 1.0 GiB free in /var/lib/docker, 1.4 GiB needed (900 MiB for the 1 "
        "image(s) it lacks + 512 MiB to spare): free some space (`docker image prune` removes "
        "untagged images; not -a: it would remove the stack's preloaded images) or use a "
        "bigger SD card/SSD"]
    assert facts["pi3"].problems[0].startswith("disk: only 1.5 GiB free in /var/lib/docker, "
                                               "1.7 GiB needed (1.2 GiB for the 2 image(s)")
    unknown = judge(cluster, good(cluster, pi1={"disk_free": 1024 * mib,
                                                "image_ids": frozenset({"sha256:ha"})}),
                    {"homeassistant": ("sha256:ha", 900 * mib), "mariadb": None})
    assert "2.0 GiB needed for the images" in unknown["pi1"].problems[0]


def test_expected_images_reads_the_manifest_for_the_configured_refs(cluster: Cluster,
                                                                    tmp_path: Path) -> None:
    import json

    from tasks.images.build import stack_images
    from tasks.images.layers import expected_images

    c = cluster.model_copy(update={"build_dir": tmp_path})
    assert set(expected_images(c).values()) == {None}, "no manifest yet: nothing known"
    imgs = stack_images(c)
    records = {s: {"image": img.node_ref, "id": f"sha256:{s}", "size": 7}
               for s, img in imgs.items()}
    records["homeassistant"]["image"] = "someone/else:1"  # a stale record: another version
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "manifest.json").write_text(json.dumps(records))
    got = expected_images(c)
    assert got["homeassistant"] is None
    assert got["mariadb"] == ("sha256:mariadb", 7)


def test_clock(cluster: Cluster) -> None:
    facts = judge(cluster, good(cluster, pi1={"clock_skew": 7.3},
                                pi2={"clock_skew": -5.4, "clock_error": 0.5},
                                pi3={"clock_skew": None}))
    assert facts["pi1"].problems[0].startswith("clock: 7.3 s ahead of this computer's")
    assert facts["pi2"].problems == [], "within the measurement's uncertainty"
    assert "could not read" in facts["pi3"].problems[0]
    facts = judge(cluster, good(cluster, pi2={"clock_skew": -60.0}))
    assert "60.0 s behind" in facts["pi2"].problems[0]
    assert "+7.30 s" in table(cluster, judge(cluster, good(cluster, pi1={"clock_skew": 7.3})))


def test_same_engine_twice(cluster: Cluster) -> None:
    facts = judge(cluster, good(cluster, pi3={"engine_id": "engine-0"}))
    assert "same Docker engine ID as pi3" in facts["pi1"].problems[0]
    assert "same Docker engine ID as pi1" in facts["pi3"].problems[0]
    assert facts["pi2"].problems == []


def test_parse_facts() -> None:
    ok = ("machine=aarch64\ndocker=20.10.24+dfsg1 linux/arm64\n"
          "engine_id=ABCD:EFGH\ndisk_free_kb=2097152\ndisk_path=/srv/docker\n"
          "image_ids=sha256:aa sha256:bb \n")
    f = parse_facts(Facts("pi1", "a"), ok)
    assert f.image_ids == {"sha256:aa", "sha256:bb"}
    assert (f.machine, f.docker_version, f.docker_arch) == ("aarch64", "20.10.24+dfsg1", "arm64")
    assert (f.engine_id, f.disk_free, f.disk_path) == ("ABCD:EFGH", 2 * 1024**3, "/srv/docker")
    assert f.docker_error is None
    down = ("machine=armv7l\ndocker_error=Cannot connect to the Docker daemon at "
            "unix:///var/run/docker.sock. Is the docker daemon running? \n"
            "disk_free_kb=123\ndisk_path=/\n")
    f = parse_facts(Facts("pi2", "a"), down)
    assert f.docker_version is None and f.docker_error and f.docker_error.startswith("Cannot")
    assert f.image_ids is None


def test_task_does_no_work_at_load_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.config

    def boom() -> Cluster:
        raise AssertionError("loaded the cluster at task-load time")

    monkeypatch.setattr(tasks.config, "current", boom)
    task = pf.task_preflight()
    assert task["basename"] == "preflight" and task["actions"] == [pf._run]
    assert pf.task_preflight.__doc__ and "\n" not in pf.task_preflight.__doc__.strip()


def test_invalid_cluster_file_fails_the_action(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    bad = tmp_path / "cluster.yml"
    bad.write_text("platform: linux/arm/v5\n")
    monkeypatch.setenv("HASWARM_CONFIG", str(bad))
    result = pf._run()
    assert isinstance(result, TaskFailed) and "invalid cluster file" in str(result)


# ---------------------------------------------------------------------------------------------
# Real SSH on loopback: three "nodes" that are in truth this machine


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if os.geteuid() != 0 or not os.path.exists(_helpers.SSHD):
        pytest.skip("needs root and openssh-server (sshd)")
    server = _helpers.LoopbackSSH(tmp_path_factory.mktemp("sshd"), _helpers.LOOPBACK)
    yield server
    server.stop()


def _host_docker() -> bool:
    return bool(shutil.which("docker")) and subprocess.run(
        ["docker", "version"], capture_output=True).returncode == 0


def test_loopback_gathers_facts_and_sees_one_machine(sshd: object,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    c = sshd.cluster()  # type: ignore[attr-defined]
    t0 = time.monotonic()
    result = pf.preflight(c)
    took = time.monotonic() - t0
    out = capsys.readouterr().out
    assert took < 10
    assert [line.split()[0] for line in out.splitlines()[1:4]] == ["pi1", "pi2", "pi3"]
    assert all(" ok " in line for line in out.splitlines()[1:4]), out  # the ssh column
    assert "x86_64" in out
    if _host_docker():
        # All three addresses reach the same Docker engine: preflight must notice.
        assert isinstance(result, TaskFailed)
        assert "same Docker engine ID" in str(result)
        assert "- disk:" not in str(result) and "- clock:" not in str(result)


def test_loopback_unreachable_node_fails_fast(sshd: object) -> None:
    c = sshd.cluster()  # type: ignore[attr-defined]
    silent = _helpers.SilentHost()
    try:
        nodes = [n.model_copy(update={"address": silent.address,
                                      "ssh": SSH(port=silent.port)}) if n.name == "pi2" else n
                 for n in c.nodes]
        t0 = time.monotonic()
        result = pf.preflight(c.model_copy(update={"nodes": nodes}))
        took = time.monotonic() - t0
    finally:
        silent.close()
    assert isinstance(result, TaskFailed)
    assert "pi2 (127.0.0.99):\n    - ssh: unreachable: no answer" in str(result)
    assert took < c.ssh.connect_timeout + 3, f"took {took:.1f} s"


# ---------------------------------------------------------------------------------------------
# The lab (the `lab` fixture of tests/conftest.py: leaves it as it found it)


@pytest.mark.lab
def test_lab_preflight_passes(lab: object, capsys: pytest.CaptureFixture[str]) -> None:
    c = load_cluster(LAB_CLUSTER_FILE)
    t0 = time.monotonic()
    result = pf.preflight(c)
    took = time.monotonic() - t0
    out = capsys.readouterr().out
    assert result is None, f"{out}\n{result}"
    assert "all 3 nodes ready" in out
    with capsys.disabled():
        print(f"\n{out}lab: preflight took {took:.2f} s")


@pytest.mark.lab
def test_lab_unreachable_node_named_within_10_s(lab: object,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    c = load_cluster(LAB_CLUSTER_FILE)
    assert _helpers._lab_route_ok("10.77.0.99"), "10.77.0.99 must be on the lab bridge"
    nodes = [n.model_copy(update={"address": "10.77.0.99"}) if n.name == "pi2" else n
             for n in c.nodes]
    t0 = time.monotonic()
    result = pf.preflight(c.model_copy(update={"nodes": nodes}))
    took = time.monotonic() - t0
    assert isinstance(result, TaskFailed)
    msg = result.message
    assert msg.splitlines()[0] == "preflight: 1 of 3 nodes not ready: pi2"
    assert "pi2 (10.77.0.99)" in msg and "unreachable" in msg
    assert took < 10, f"took {took:.1f} s"
    with capsys.disabled():
        print(f"\nlab: preflight with pi2 unreachable failed after {took:.2f} s\n{msg}")


@pytest.mark.lab
def test_private_lab_faults(capsys: pytest.CaptureFixture[str]) -> None:
    """On a private lab (never the shared one): a silently cut link, a stopped Docker engine and
    a killed node are each named, with the reason, within connect_timeout + a few seconds."""
    from lab.driver import LabError, instance_lab

    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    priv = instance_lab(f"pf{os.getpid() % 10000}", 3)
    try:
        priv.check_host()
    except LabError as e:
        shutil.rmtree(priv.state_dir, ignore_errors=True)
        pytest.skip(f"this machine cannot run the lab: {e}")
    a, b, c3 = priv.names
    figures = {}
    try:
        priv.up()
        c = priv.cluster
        assert pf.preflight(c) is None
        priv.cut(a)
        priv.exec(b, "lab-service docker stop")
        t0 = time.monotonic()
        result = pf.preflight(c)
        figures["cut + docker stopped"] = took = time.monotonic() - t0
        assert isinstance(result, TaskFailed)
        msg = result.message
        assert msg.splitlines()[0] == f"preflight: 2 of 3 nodes not ready: {a}, {b}"
        assert f"- ssh: unreachable: no answer from {c.node(a).address} port 22" in msg
        assert f"{b} ({c.node(b).address}):\n    - docker: the engine does not answer" in msg
        assert took < c.ssh.connect_timeout + 3, f"took {took:.1f} s"
        priv.heal(a)
        priv.exec(b, "lab-service docker start")
        priv.kill(c3)
        t0 = time.monotonic()
        result = pf.preflight(c)
        figures["node killed"] = time.monotonic() - t0
        assert isinstance(result, TaskFailed)
        assert result.message.splitlines()[0] == f"preflight: 1 of 3 nodes not ready: {c3}"
        assert figures["node killed"] < 10
    finally:
        priv.down(purge=True)
        shutil.rmtree(priv.state_dir, ignore_errors=True)
    with capsys.disabled():
        print("\nprivate lab: preflight failed after "
              + ", ".join(f"{k}: {v:.2f} s" for k, v in figures.items()))
