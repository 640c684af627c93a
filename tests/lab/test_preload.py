"""preload-images against the lab's nodes over real SSH: only what is missing is sent, every
node ends up with every image (right tag, ID and platform), a second run sends 0 bytes, and a
node that fails is named while the others finish.

Fixtures `lab` (tests/conftest.py) and `cluster` (tests/lab/conftest.py). Uses a small manifest
made here (the local Debian base plus a one-file image built on it, so
the shared-layer logic is exercised); when `doit images` has saved the stack (build/images/
manifest.json), the real manifest is preloaded too.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from doit.cmd_base import ModuleTaskLoader
from doit.doit_cmd import DoitMain

import tasks.images as images
from tasks.config import LAB_CLUSTER_FILE, Cluster, Node
from tasks.remote import Remote, RemoteError

pytestmark = pytest.mark.lab

BASE_TAG = "haswarm-test/preload-base:1"
APP_TAG = "haswarm-test/preload-app:1"


def _docker(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory, lab, cluster) -> Iterator[Path]:
    """Two images on the controller's engine: the Debian base and an image with one small
    layer on top of it; saved, with a manifest. Their tags are removed afterwards from the
    controller and the nodes (the lab is left as it was found)."""
    if not images.docker_available():
        pytest.skip("no Docker engine on the controller")
    d = tmp_path_factory.mktemp("preload")
    platform = images.Platform.parse(cluster.platform)
    base = images.ensure_base("debian:bookworm", platform, d / "base")
    _docker("tag", base.use, BASE_TAG)
    ctx = d / "ctx"
    ctx.mkdir()
    (ctx / "hello").write_text(f"preload test {time.time()}\n")  # a new layer every session
    (ctx / "Dockerfile").write_text(f"FROM {BASE_TAG}\nCOPY hello /hello\n")
    subprocess.run(["docker", "build", "-q", "--platform", cluster.platform, "-t", APP_TAG,
                    str(ctx)], check=True, capture_output=True, env={"DOCKER_BUILDKIT": "0",
                                                                      "PATH": "/usr/bin:/bin"})
    manifest = {}
    for service, tag in (("base", BASE_TAG), ("app", APP_TAG)):
        info = images.verify_local(tag, platform)
        _docker("save", "-o", str(d / f"{service}.tar"), tag)
        manifest[service] = {"image": tag, "id": info["Id"], "platform": cluster.platform,
                             "tar": f"{service}.tar", "layers": info["RootFS"]["Layers"]}
    path = d / "images" / "manifest.json"
    path.parent.mkdir()
    for service in manifest:
        (d / f"{service}.tar").rename(path.parent / f"{service}.tar")
    path.write_text(json.dumps(manifest, indent=2))
    yield path
    subprocess.run(["docker", "image", "rm", APP_TAG, BASE_TAG], capture_output=True)
    _remove_on_nodes(cluster, [APP_TAG, BASE_TAG])


def _remove_on_nodes(c: Cluster, refs: list[str]) -> None:
    """Untag/remove the test images on every lab node (never on the controller)."""
    assert c.lab
    with Remote(c) as r:
        r.run_all("test: remove images",
                  f"docker image rm {' '.join(shlex.quote(x) for x in refs)} >/dev/null 2>&1; "
                  "true")


def _facts(c: Cluster) -> dict[str, images.NodeFacts]:
    with Remote(c) as r:
        return {n: images.node_facts(r, n) for n in c.names}


def test_preload_puts_every_image_on_every_node_then_sends_nothing(lab, cluster,
                                                                   small_manifest, capsys):
    wanted = images.read_manifest(small_manifest)
    _remove_on_nodes(cluster, [APP_TAG, BASE_TAG])

    t0 = time.monotonic()
    first = images.preload(cluster, small_manifest)  # through the relay (the default)
    first_s = time.monotonic() - t0
    head, *rest = cluster.names
    assert all(rep.relayed for rep in first.values()), first
    sizes = sum(p.stat().st_size for p in small_manifest.parent.glob("*.tar"))
    assert 0 < first[head].bytes_sent <= sizes, "the images left the controller once"
    assert all(first[n].bytes_sent == 0 and first[n].loaded == 0 for n in rest), first
    with Remote(cluster) as r:  # nothing of the relay is left on any node
        left = r.run_all("test: relay leftovers", "ls -d /var/tmp/haswarm-relay-* 2>/dev/null; "
                         "grep -c haswarm-relay /root/.ssh/authorized_keys; true")
    assert {n: x.stdout.split() for n, x in left.items()} == {n: ["0"] for n in cluster.names}
    facts = _facts(cluster)
    for name in cluster.names:
        assert images.check_node(wanted, facts[name]) == [], name
        for w in wanted:
            info = facts[name].images[facts[name].tags[w.ref]]
            assert (info["Os"], info["Architecture"]) == ("linux", "amd64")

    t0 = time.monotonic()
    second = images.preload(cluster, small_manifest)
    second_s = time.monotonic() - t0
    assert {n: r.bytes_sent for n, r in second.items()} == {n: 0 for n in cluster.names}
    out = capsys.readouterr().out
    for name in cluster.names:
        assert f"{name}: preload-images: nothing to do" in out
    with capsys.disabled():
        print(f"\npreload of 2 images to {len(cluster.nodes)} nodes: {first_s:.1f} s "
              f"({sum(r.bytes_sent for r in first.values()) / 1e6:.0f} MB); second run "
              f"{second_s:.2f} s, 0 bytes")
    assert second_s < 5


def test_the_base_layer_is_not_resent_for_an_image_built_on_it(lab, cluster, small_manifest):
    """Only the app's own layer travels when the node already holds the base (each node's
    own stream: the relay off)."""
    _remove_on_nodes(cluster, [APP_TAG])
    direct = cluster.model_copy(update={
        "preload": cluster.preload.model_copy(update={"relay": False})})
    reports = images.preload(direct, small_manifest)
    assert all(rep.loaded == 1 and not rep.relayed for rep in reports.values()), reports
    app_tar = small_manifest.parent / "app.tar"
    for rep in reports.values():
        if rep.loaded:  # the app image went (its base layer stayed behind)
            assert rep.layers_skipped >= 1 and rep.bytes_sent < app_tar.stat().st_size / 4


def test_a_failing_node_is_named_and_the_others_finish(lab, cluster, small_manifest):
    _remove_on_nodes(cluster, [APP_TAG])
    ghost = Node(name="pi9", address="10.77.0.99")  # on the lab bridge, nobody answers
    c = cluster.model_copy(update={
        "nodes": [*cluster.nodes, ghost],
        "ssh": cluster.ssh.model_copy(update={"connect_timeout": 1}),
    })
    with pytest.raises(RemoteError) as e:
        images.preload(c, small_manifest)
    assert e.value.nodes == ["pi9"]
    assert "pi9 (10.77.0.99)" in str(e.value)
    facts = _facts(cluster)
    wanted = images.read_manifest(small_manifest)
    assert all(images.check_node(wanted, facts[n]) == [] for n in cluster.names)


def test_a_node_without_room_is_refused_before_a_byte_is_sent(lab, cluster, small_manifest,
                                                              monkeypatch):
    """The node's real free space (df of its DockerRootDir) against what the load needs: with
    the spare raised past any disk, every node lacking the app image is refused, named, with
    the numbers, and is left without it; a node that lacks nothing is not asked."""
    import importlib

    pre = importlib.import_module("tasks.images.layers")  # where check_room reads it

    _remove_on_nodes(cluster, [APP_TAG])
    monkeypatch.setattr(pre, "DISK_SPARE", 2**60)
    with pytest.raises(RemoteError) as e:
        images.preload(cluster, small_manifest)
    assert e.value.nodes == cluster.names
    text = str(e.value)
    assert f"not enough disk for {APP_TAG}:" in text
    assert "GiB free where Docker keeps images" in text
    facts = _facts(cluster)
    assert all(APP_TAG not in facts[n].tags for n in cluster.names)
    monkeypatch.undo()
    images.preload(cluster, small_manifest)
    monkeypatch.setattr(pre, "DISK_SPARE", 2**60)
    assert all(r.bytes_sent == 0 for r in images.preload(cluster, small_manifest).values())


def test_doit_preload_images_then_up_to_date_without_ssh(lab, cluster, small_manifest, tmp_path):
    """Through doit: the task preloads, stamps, and a second `doit preload-images` is up to
    date from files alone."""
    data = yaml.safe_load(LAB_CLUSTER_FILE.read_text())
    data["build_dir"] = str(tmp_path / "build")
    for key in ("key", "known_hosts"):
        data["ssh"][key] = str((LAB_CLUSTER_FILE.parent / data["ssh"][key]).resolve())
    cfg = tmp_path / "cluster.yml"
    cfg.write_text(yaml.safe_dump(data))
    out = tmp_path / "build" / "images"
    out.mkdir(parents=True)
    for f in small_manifest.parent.iterdir():
        (out / f.name).symlink_to(f)
    db = str(tmp_path / ".doit.db")
    _remove_on_nodes(cluster, [APP_TAG])

    def doit(command: str, *args: str) -> int:
        # Only the preload tasks: manifest.json is a plain file here, not made by
        # images:manifest (that would build the real stack).
        loader = ModuleTaskLoader({"task_preload_images": images.task_preload_images})
        return DoitMain(loader).run([command, "--db-file", db, *args, f"config={cfg}"])

    assert doit("run", "preload-images") == 0
    stamp = tmp_path / "build" / "state" / "preload-images.json"
    assert stamp.exists()
    t0 = time.monotonic()
    assert doit("run", "preload-images") == 0
    assert time.monotonic() - t0 < 2
    facts = _facts(cluster)
    wanted = images.read_manifest(small_manifest)
    assert all(images.check_node(wanted, facts[n]) == [] for n in cluster.names)

    # `doit clean` keeps the nodes' images; `purge=yes` removes the stack's images from the node
    # (those no container uses), as before setup, and forgets the stamp
    before = _stack_images_on(cluster, "pi3")
    assert not doit("clean", "preload-images:pi3")  # clean returns None when done
    assert _stack_images_on(cluster, "pi3") == before  # a plain clean keeps them
    in_use = _images_in_use(cluster, "pi3")
    try:
        assert not doit("clean", "preload-images:pi3", "purge=yes", "yes=1")
        assert _stack_images_on(cluster, "pi3") == before & in_use
        assert not (tmp_path / "build" / "state" / "preload-images-pi3.json").exists()
    finally:  # put the real images back where the stack may need them
        from tasks import state

        for step in ("preload-images", *(f"preload-images-{n}" for n in cluster.names)):
            state.forget(cluster, step)  # the real build dir's stamps: setup checks again
        if (before - in_use) and images.manifest_path(cluster).exists():
            images.preload(cluster, images.manifest_path(cluster), ["pi3"])


def _stack_images_on(c: Cluster, node: str) -> set[str]:
    refs = {img.image for img in images.stack_images(c).values()}
    with Remote(c) as r:
        out = r.run(node, "test: images", "docker images --format '{{.Repository}}:{{.Tag}}'")
    return refs & set(out.stdout.split())


def _images_in_use(c: Cluster, node: str) -> set[str]:
    with Remote(c) as r:
        out = r.run(node, "test: containers", "docker ps -a --format '{{.Image}}'")
    return set(out.stdout.split())


def test_the_real_manifest(lab, cluster):
    """The stack's own images (built here when missing: `doit setup` later finds them done)."""
    from tests.lab.conftest import doit as doit_cli

    run = doit_cli("images")
    assert run.ok, run.output[-4000:]
    manifest = images.manifest_path(cluster)
    wanted = images.read_manifest(manifest)
    assert all(w.tar.exists() and w.platform == cluster.platform for w in wanted)
    images.preload(cluster, manifest)
    again = images.preload(cluster, manifest)
    assert all(r.bytes_sent == 0 for r in again.values())
    facts = _facts(cluster)
    assert all(images.check_node(wanted, facts[n]) == [] for n in cluster.names)
