"""tasks.images without Docker or SSH: platforms, FROM resolution, the what-to-send logic with
recorded node facts, the docker-load stream, and the task graph."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

import tasks.images as images
from tasks.config import ENV_VAR, LAB_CLUSTER_FILE, PROJECT_ROOT, load_cluster
from tasks.images import (
    NodeFacts,
    Platform,
    TarEntry,
    Wanted,
    base_refs,
    chain_ids,
    check_node,
    load_entries,
    parse_froms,
    plan_node,
    read_manifest,
    rewrite_froms,
    tar_stream,
)
from tasks.images.layers import DISK_FREE_CMD, DISK_SPARE
from tasks.remote import Remote, RemoteError, Result

ARM = Platform.parse("linux/arm/v7")
AMD = Platform.parse("linux/amd64")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Platforms


def test_platform_parse_and_names():
    assert (ARM.os, ARM.arch, ARM.variant) == ("linux", "arm", "v7")
    assert str(ARM) == "linux/arm/v7" and str(AMD) == "linux/amd64"
    assert ARM.debian_arch == "armhf" and Platform.parse("linux/arm64").debian_arch == "arm64"
    assert ARM.binfmt == "qemu-arm" and Platform.parse("linux/arm64").binfmt == "qemu-aarch64"
    with pytest.raises(ValueError):
        Platform.parse("arm")


@pytest.mark.parametrize(("platform", "recorded", "ok"), [
    ("linux/arm/v7", ("linux", "arm", "v7"), True),
    ("linux/arm/v7", ("linux", "arm", ""), False),  # may be armv6
    ("linux/arm/v7", ("linux", "amd64", ""), False),  # docker import --platform on 20.10
    ("linux/arm64", ("linux", "arm64", "v8"), True),
    ("linux/arm64", ("linux", "arm64", ""), True),
    ("linux/amd64", ("linux", "amd64", ""), True),
    ("linux/amd64", ("windows", "amd64", ""), False),
])
def test_platform_matches_what_an_image_records(platform, recorded, ok):
    info = {"Os": recorded[0], "Architecture": recorded[1], "Variant": recorded[2]}
    assert images.image_matches(Platform.parse(platform), info) is ok


# ---------------------------------------------------------------------------------------------
# FROM resolution


LITERAL = """\
# syntax=docker/dockerfile:1
FROM debian:bookworm
RUN apt-get update \\
 && apt-get install -y curl
"""

WITH_ARG = """\
ARG BASE=debian:bookworm
FROM ${BASE} AS build
RUN echo build
FROM $BASE
COPY --from=build /x /x
"""

MULTI = """\
FROM --platform=$BUILDPLATFORM debian:bookworm AS tools
RUN echo native
FROM debian:bookworm AS build
RUN echo target
FROM build AS final-ish
FROM scratch
COPY --from=tools /t /t
"""


def test_base_refs_skip_stages_scratch_and_pinned_platform_lines():
    assert base_refs(LITERAL) == ["debian:bookworm"]
    assert base_refs(WITH_ARG) == ["debian:bookworm"]
    assert base_refs(MULTI) == ["debian:bookworm"]
    froms = parse_froms(MULTI)
    assert [f.platform_flag for f in froms][0] == "$BUILDPLATFORM"
    assert "build" not in [f.resolved for f in froms]


def test_rewrite_literal_from_keeps_everything_else():
    text, args = rewrite_froms(LITERAL, {"debian:bookworm": "haswarm/debian:bookworm-armhf"})
    assert args == {}
    assert text == LITERAL.replace("FROM debian:bookworm", "FROM haswarm/debian:bookworm-armhf")


def test_rewrite_arg_default_becomes_a_build_arg():
    text, args = rewrite_froms(WITH_ARG, {"debian:bookworm": "haswarm/debian:bookworm-armhf"})
    assert text is None
    assert args == {"BASE": "haswarm/debian:bookworm-armhf"}


def test_rewrite_leaves_buildplatform_stage_alone():
    text, _ = rewrite_froms(MULTI, {"debian:bookworm": "haswarm/debian:bookworm-armhf"})
    assert text is not None
    lines = text.splitlines()
    assert lines[0] == "FROM --platform=$BUILDPLATFORM debian:bookworm AS tools"
    assert lines[2] == "FROM haswarm/debian:bookworm-armhf AS build"
    assert "FROM build AS final-ish" in lines and "FROM scratch" in lines


def test_rewrite_with_identity_mapping_changes_nothing():
    assert rewrite_froms(LITERAL, {"debian:bookworm": "debian:bookworm"}) == (None, {})


@pytest.mark.parametrize("context", ["images/mariadb-galera", "lab/images/homeassistant",
                                     "lab/images/mosquitto"])
def test_project_dockerfiles_start_from_a_base_the_project_can_make(context):
    dockerfile = PROJECT_ROOT / context / "Dockerfile"
    if not dockerfile.exists():
        pytest.skip(f"{dockerfile} not written yet")
    refs = base_refs(dockerfile.read_text())
    assert refs, "no FROM found"
    for ref in refs:
        assert images.bootstrap_suite(ref) is not None, f"{ref} cannot be made without a registry"
    mapping = {r: images.base_tag(images.bootstrap_suite(r), ARM) for r in refs}
    text, args = rewrite_froms(dockerfile.read_text(), mapping)
    assert text is not None or args, "the base would not be replaced for arm/v7"


def test_bootstrap_suite_and_tags():
    assert images.bootstrap_suite("debian:bookworm") == "bookworm"
    assert images.bootstrap_suite("docker.io/library/debian:bookworm-slim") == "bookworm"
    assert images.bootstrap_suite("debian:latest") is None
    assert images.bootstrap_suite("eclipse-mosquitto:2.0.18") is None
    assert images.base_tag("bookworm", ARM) == "haswarm/debian:bookworm-armhf"
    assert images.base_tag("bookworm", AMD) == "haswarm/debian:bookworm-amd64"


# ---------------------------------------------------------------------------------------------
# QEMU / binfmt


def fake_binfmt(tmp_path: Path, entry: str | None) -> Path:
    d = tmp_path / "binfmt_misc"
    d.mkdir()
    (d / "status").write_text("enabled\n")
    if entry is not None:
        (d / "qemu-arm").write_text(entry)
    return d


def test_emulation_native_needs_nothing(tmp_path):
    assert images.ensure_emulation(AMD, native=AMD, binfmt_dir=tmp_path) == "native"
    assert images.ensure_emulation(ARM, native=Platform.parse("linux/arm64"),
                                   binfmt_dir=tmp_path).startswith("native")


def test_emulation_registered_with_fix_binary(tmp_path, monkeypatch):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    d = fake_binfmt(tmp_path, "enabled\ninterpreter /usr/libexec/qemu-binfmt/arm-binfmt-P\n"
                              "flags: PF\noffset 0\n")
    assert "qemu-arm" in images.ensure_emulation(ARM, native=AMD, binfmt_dir=d)


def test_emulation_without_f_flag_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    d = fake_binfmt(tmp_path, "enabled\ninterpreter /usr/bin/qemu-arm\nflags: \n")
    with pytest.raises(images.ImageError, match="F \\(fix-binary\\)"):
        images.ensure_emulation(ARM, native=AMD, binfmt_dir=d)


def test_emulation_missing_names_the_packages(tmp_path, monkeypatch):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.setattr(images.core.shutil, "which", lambda name: None)
    d = fake_binfmt(tmp_path, None)
    with pytest.raises(images.ImageError) as e:
        images.ensure_emulation(ARM, native=AMD, binfmt_dir=d)
    assert "qemu-user-static" in str(e.value) and "binfmt-support" in str(e.value)


# ---------------------------------------------------------------------------------------------
# What to send: plans from recorded node facts


def test_chain_ids():
    a, b = sha(b"a"), sha(b"b")
    assert chain_ids([a]) == [a]
    assert chain_ids([a, b]) == [a, sha(f"{a} {b}".encode())]


BASE_L, HA_L, DB_L = sha(b"debian"), sha(b"ha"), sha(b"db")


def wanted(tmp: Path = Path("/nonexistent")) -> list[Wanted]:
    return [
        Wanted("homeassistant", "haswarm-lab/homeassistant:2026.2.3", sha(b"cfg-ha"),
               "linux/amd64", (BASE_L, HA_L), tmp / "homeassistant.tar"),
        Wanted("mariadb", "haswarm/mariadb-galera:10.11-2", sha(b"cfg-db"), "linux/amd64",
               (BASE_L, DB_L), tmp / "mariadb.tar"),
    ]


def inspect(image_id: str, tags: list[str], layers: list[str],
            arch: str = "amd64") -> dict[str, Any]:
    return {"Id": image_id, "RepoTags": tags, "Architecture": arch, "Os": "linux",
            "RootFS": {"Type": "layers", "Layers": layers}}


def test_empty_node_gets_everything_with_the_shared_base_layer_once():
    plan = plan_node(wanted(), NodeFacts.from_inspect([]))
    assert [w.service for w in plan.load] == ["homeassistant", "mariadb"]
    assert plan.send_layers == [("homeassistant", 0), ("homeassistant", 1), ("mariadb", 1)]
    assert plan.shared_layers == 1 and plan.skipped_layers == 0
    assert not plan.present and not plan.retag


def test_node_with_the_base_gets_only_the_upper_layers():
    facts = NodeFacts.from_inspect([inspect(sha(b"cfg-base"), ["debian:bookworm"], [BASE_L])])
    plan = plan_node(wanted(), facts)
    assert plan.send_layers == [("homeassistant", 1), ("mariadb", 1)]
    assert plan.skipped_layers == 2 and plan.shared_layers == 0


def test_node_with_everything_gets_nothing():
    w = wanted()
    facts = NodeFacts.from_inspect([inspect(x.id, [x.ref], list(x.layers)) for x in w])
    plan = plan_node(w, facts)
    assert plan.nothing_to_do and len(plan.present) == 2
    assert check_node(w, facts) == []


def test_image_present_under_another_tag_is_only_retagged():
    w = wanted()
    facts = NodeFacts.from_inspect([inspect(w[0].id, [], list(w[0].layers)),
                                    inspect(w[1].id, [w[1].ref], list(w[1].layers))])
    plan = plan_node(w, facts)
    assert [x.service for x in plan.retag] == ["homeassistant"]
    assert not plan.load and [x.service for x in plan.present] == ["mariadb"]


def test_tag_pointing_at_another_image_is_replaced():
    w = wanted()
    old = inspect(sha(b"cfg-old"), [w[0].ref], [BASE_L, sha(b"old")])
    plan = plan_node(w, NodeFacts.from_inspect([old]))
    assert [x.service for x in plan.load] == ["homeassistant", "mariadb"]
    assert ("homeassistant", 0) not in plan.send_layers  # the base came with the old image
    assert "is sha256:" in check_node(w, NodeFacts.from_inspect([old]))[0]


def test_docker_hub_names_are_compared_normalized():
    w = [Wanted("mosquitto", "docker.io/library/eclipse-mosquitto:2.0.18", sha(b"m"),
                "linux/amd64", (BASE_L,), Path("/x"))]
    facts = NodeFacts.from_inspect([inspect(sha(b"m"), ["eclipse-mosquitto:2.0.18"], [BASE_L])])
    assert plan_node(w, facts).nothing_to_do


# The Ops of a plan (what `doit plan` prints as "would ..."), from recorded node facts
SIZES = {("homeassistant", 0): 30_000_000, ("homeassistant", 1): 400_000_000,
         ("mariadb", 0): 30_000_000, ("mariadb", 1): 120_000_000}
HA_REF, DB_REF = "haswarm-lab/homeassistant:2026.2.3", "haswarm/mariadb-galera:10.11-2"
HA_ID, DB_ID = sha(b"cfg-ha"), sha(b"cfg-db")

OPS_CASES = {
    "fresh node: both images in one stream, the shared base once": (
        [], [f"load 2 image(s): {HA_REF}, {DB_REF} (3 layer(s), 1 shared, 550 MB)"]),
    "converged node: nothing to do": (
        [inspect(HA_ID, [HA_REF], [BASE_L, HA_L]), inspect(DB_ID, [DB_REF], [BASE_L, DB_L])],
        []),
    "one image under another tag: retag only": (
        [inspect(HA_ID, ["old/name:1"], [BASE_L, HA_L]),
         inspect(DB_ID, [DB_REF], [BASE_L, DB_L])],
        [f"tag {HA_ID[:19]} as {HA_REF}"]),
    "the base layer is there: only the upper layers go": (
        [inspect(sha(b"cfg-base"), ["debian:bookworm"], [BASE_L])],
        [f"load 2 image(s): {HA_REF}, {DB_REF} (2 layer(s), 2 present already, 520 MB)"]),
    "one retag and one load": (
        [inspect(HA_ID, [], [BASE_L, HA_L])],
        [f"tag {HA_ID[:19]} as {HA_REF}",
         f"load 1 image(s): {DB_REF} (1 layer(s), 1 present already, 120 MB)"]),
}


@pytest.mark.parametrize(("entries", "whats"), OPS_CASES.values(), ids=OPS_CASES.keys())
def test_ops_of_a_plan(entries, whats):
    ops = images.preload_ops(plan_node(wanted(), NodeFacts.from_inspect(entries)), SIZES)
    assert [op.what for op in ops] == whats


def test_retag_is_a_docker_tag_and_the_load_calls_the_given_function():
    def load(r):
        return None

    facts = NodeFacts.from_inspect([inspect(HA_ID, [], [BASE_L, HA_L])])
    tag, stream = images.preload_ops(plan_node(wanted(), facts), SIZES, load)
    assert tag.cmd == f"docker tag {HA_ID} {HA_REF}" and tag.call is None
    assert stream.call is load and stream.cmd is None and stream.node is None


def test_check_node_reports_missing_and_wrong_platform():
    w = wanted()
    facts = NodeFacts.from_inspect([inspect(w[0].id, [w[0].ref], list(w[0].layers), "arm")])
    problems = check_node(w, facts)
    assert any("records linux/arm" in p for p in problems)
    assert any(p == f"{w[1].ref} is missing" for p in problems)


# ---------------------------------------------------------------------------------------------
# The docker load stream, from docker-save tarballs


def test_tar_stream_is_a_valid_tar(tmp_path):
    f = tmp_path / "big"
    f.write_bytes(os.urandom(70_001))
    data = b"".join(tar_stream([TarEntry.data("a/b.json", b"{}"), TarEntry.file("c/layer.tar", f)],
                               chunk=4096))
    assert len(data) % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert tf.getnames() == ["a/b.json", "c/layer.tar"]
        assert tf.extractfile("c/layer.tar").read() == f.read_bytes()


def write_saved(path: Path, ref: str, layers: list[bytes], arch: str = "amd64") -> Wanted:
    """A `docker save`-format tarball (dockerd 20.10 layout) of a fake image."""
    diff_ids = [sha(x) for x in layers]
    config = json.dumps({"architecture": arch, "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    image_id = sha(config)
    entries = [TarEntry.data(f"v1-{i}/layer.tar", x) for i, x in enumerate(layers)]
    entries += [TarEntry.data(f"{image_id[7:]}.json", config),
                TarEntry.data("manifest.json", json.dumps([{
                    "Config": f"{image_id[7:]}.json", "RepoTags": [ref],
                    "Layers": [f"v1-{i}/layer.tar" for i in range(len(layers))]}]).encode())]
    path.write_bytes(b"".join(tar_stream(entries)))
    return Wanted(path.stem, ref, image_id, "linux/amd64", tuple(diff_ids), path)


def saved_manifest(tmp_path: Path) -> Path:
    base = os.urandom(3000)
    ha = write_saved(tmp_path / "homeassistant.tar", "haswarm-lab/homeassistant:1",
                     [base, b"ha" * 700])
    db = write_saved(tmp_path / "mariadb.tar", "haswarm/mariadb-galera:1", [base, b"db" * 900])
    manifest = {w.service: {"image": w.ref, "id": w.id, "platform": w.platform,
                            "tar": w.tar.name, "layers": list(w.layers)} for w in (ha, db)}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def test_load_stream_holds_every_image_and_only_the_missing_layers(tmp_path):
    w = read_manifest(saved_manifest(tmp_path))
    facts = NodeFacts.from_inspect([inspect(sha(b"x"), ["debian:bookworm"], [w[0].layers[0]])])
    plan = plan_node(w, facts)
    saved = {x.service: images._SavedImage(x.tar) for x in plan.load}
    data = b"".join(tar_stream(load_entries(plan, saved)))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        manifest = json.loads(tf.extractfile("manifest.json").read())
        names = set(tf.getnames())
        assert [m["RepoTags"] for m in manifest] == [[x.ref] for x in w]
        for m, x in zip(manifest, w, strict=True):
            assert sha(tf.extractfile(m["Config"]).read()) == x.id  # same config: same ID
            layer_names = m["Layers"]
            assert layer_names[0] not in names  # the base layer: the node has it
            assert layer_names[1] in names
            assert sha(tf.extractfile(layer_names[1]).read()) == x.layers[1]
    full = b"".join(tar_stream(load_entries(plan, saved, omit_present=False)))
    with tarfile.open(fileobj=io.BytesIO(full)) as tf:
        assert sum(n.endswith("layer.tar") for n in tf.getnames()) == 3  # base once
    for s in saved.values():
        s.close()


# ---------------------------------------------------------------------------------------------
# preload() with a fake node engine behind the real Remote fan-out


class FakeEngine:
    """A node's Docker engine: images loaded from streams, inspect output for the facts."""

    def __init__(self, fail: str | None = None, free: int = 64 * 1024**3):
        self.images: dict[str, dict[str, Any]] = {}
        self.received = 0
        self.fail = fail
        self.free = free  # bytes free where it keeps images

    def inspect_json(self) -> str:
        return json.dumps(list(self.images.values()))

    def load(self, stream) -> list[Any]:
        data = b"".join(stream)
        self.received += len(data)
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            for m in json.loads(tf.extractfile("manifest.json").read()):
                config = tf.extractfile(m["Config"]).read()
                cfg = json.loads(config)
                self.images[sha(config)] = inspect(sha(config), m["RepoTags"],
                                                   cfg["rootfs"]["diff_ids"], cfg["architecture"])
        return []


def fake_remote(c, engines: dict[str, FakeEngine]) -> Remote:
    r = Remote(c)  # opens nothing until used; run/docker are replaced

    def run(node, step, cmd, **kw):
        name = node if isinstance(node, str) else node.name
        e = engines[name]
        if e.fail:
            raise RemoteError([images_failure(c, name, e.fail)])
        if cmd == images.FACTS_CMD:
            return Result(e.inspect_json(), "", 0)
        if cmd == DISK_FREE_CMD:
            return Result(f"{e.free // 1024}\n", "", 0)
        if cmd.startswith("docker tag "):
            _, _, image_id, ref = cmd.split()
            e.images[image_id]["RepoTags"].append(ref)
            return Result("", "", 0)
        raise AssertionError(cmd)

    class Client:
        def __init__(self, e):
            self.images = type("Images", (), {"load": staticmethod(e.load)})()

    r.run = run  # type: ignore[method-assign]
    r.docker = lambda node, timeout=60: Client(engines[node.name])  # type: ignore[method-assign]
    return r


def direct_cluster():
    """The lab's cluster with the relay off: each node gets its stream from here (the relay
    has its own tests: test_relay.py)."""
    c = load_cluster(LAB_CLUSTER_FILE)
    return c.model_copy(update={"preload": c.preload.model_copy(update={"relay": False})})


def images_failure(c, name, why):
    from tasks.remote import Failure, Kind
    n = c.node(name)
    return Failure(n.name, n.address, "images: inspect", Kind.UNREACHABLE, why, "power it on")


def test_preload_sends_what_is_missing_then_nothing(tmp_path, capsys):
    c = direct_cluster()
    manifest = saved_manifest(tmp_path)
    engines = {n: FakeEngine() for n in c.names}
    first = images.preload(c, manifest, remote=fake_remote(c, engines))
    assert all(r.loaded == 2 and r.bytes_sent > 0 for r in first.values())
    assert all(e.received == first[n].bytes_sent for n, e in engines.items())
    second = images.preload(c, manifest, remote=fake_remote(c, engines))
    assert all(r.bytes_sent == 0 and r.present == 2 for r in second.values())
    out = capsys.readouterr().out
    for n in c.names:
        assert f"{n}: preload-images: nothing to do" in out


def test_preload_dry_run_says_what_it_would_load_and_sends_nothing(tmp_path, capsys):
    c = direct_cluster()
    manifest = saved_manifest(tmp_path)
    engines = {n: FakeEngine() for n in c.names}
    reports = images.preload(c, manifest, remote=fake_remote(c, engines), dryrun=True)
    assert all(r.bytes_sent == 0 and r.loaded == 0 for r in reports.values())
    assert all(not e.images for e in engines.values())
    out = capsys.readouterr().out.splitlines()
    assert sorted(out) == [
        f"{n}: preload-images: would load 2 image(s): haswarm-lab/homeassistant:1, "
        "haswarm/mariadb-galera:1 (3 layer(s), 1 shared, 0 MB)" for n in c.names]


def test_preload_retags_and_loads_then_reports_sizes_and_times(tmp_path, capsys):
    c = direct_cluster()
    manifest = saved_manifest(tmp_path)
    w = read_manifest(manifest)
    engines = {n: FakeEngine() for n in c.names}
    for e in engines.values():  # homeassistant is there untagged, with its layers
        e.images[w[0].id] = inspect(w[0].id, [], list(w[0].layers))
    reports = images.preload(c, manifest, remote=fake_remote(c, engines))
    assert all((r.retagged, r.loaded, r.layers_sent, r.layers_skipped) == (1, 1, 1, 1)
               for r in reports.values())
    assert all(check_node(w, NodeFacts.from_inspect(list(e.images.values()))) == []
               for e in engines.values())
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("pi1: ")]
    assert lines[:2] == [f"pi1: preload-images: tag {w[0].id[:19]} as haswarm-lab/homeassistant:1",
                         "pi1: preload-images: load 1 image(s): haswarm/mariadb-galera:1 "
                         "(1 layer(s), 1 present already, 0 MB)"]
    assert lines[2].startswith("pi1: preload-images: loaded 1, retagged 1, 0 MB sent in ")
    assert lines[2].endswith("; all 2 images present (linux/amd64)") and len(lines) == 3


def test_preload_failure_names_the_node_and_others_finish(tmp_path):
    c = direct_cluster()
    manifest = saved_manifest(tmp_path)
    engines = {n: FakeEngine() for n in c.names}
    engines["pi2"].fail = "no answer from 10.77.0.12 port 22 within 5 s"
    with pytest.raises(RemoteError) as e:
        images.preload(c, manifest, remote=fake_remote(c, engines))
    assert e.value.nodes == ["pi2"] and "no answer" in str(e.value)
    assert len(engines["pi1"].images) == 2 and len(engines["pi3"].images) == 2


def test_preload_refuses_a_node_without_room_and_others_finish(tmp_path):
    """A node whose disk cannot take the images plus DISK_SPARE is named with the numbers and
    gets nothing; the one just big enough loads."""
    c = direct_cluster()
    manifest = saved_manifest(tmp_path)
    engines = {n: FakeEngine() for n in c.names}
    engines["pi1"].free = DISK_SPARE  # no room for the images on top of the spare
    engines["pi3"].free = DISK_SPARE + 10**6
    with pytest.raises(RemoteError) as e:
        images.preload(c, manifest, remote=fake_remote(c, engines))
    assert e.value.nodes == ["pi1"]
    assert ("not enough disk for haswarm-lab/homeassistant:1, haswarm/mariadb-galera:1: "
            "0.5 GiB free where Docker keeps images, 0.5 GiB needed") in str(e.value)
    assert engines["pi1"].received == 0 and not engines["pi1"].images
    assert len(engines["pi2"].images) == 2 and len(engines["pi3"].images) == 2


def test_preload_refuses_a_manifest_for_another_platform(tmp_path):
    c = load_cluster(LAB_CLUSTER_FILE)
    path = saved_manifest(tmp_path)
    data = json.loads(path.read_text())
    data["mariadb"]["platform"] = "linux/arm/v7"
    path.write_text(json.dumps(data))
    with pytest.raises(images.ImageError, match="linux/arm/v7"):
        images.preload(c, path, remote=fake_remote(c, {}))


# ---------------------------------------------------------------------------------------------
# The task graph: no Docker, no SSH while loading


def test_context_files_leave_out_what_gitignore_excludes(tmp_path):
    ctx = tmp_path / "ctx"
    (ctx / "wheels").mkdir(parents=True)
    (ctx / "Dockerfile").write_text("FROM debian:bookworm\n")
    (ctx / "prepare").write_text("#!/bin/sh\n")
    (ctx / ".gitignore").write_text("/wheels/\n")
    (ctx / "wheels" / "x.whl").write_text("x")
    names = {p.name for p in images.context_files(ctx)}  # not a git work tree: fallback
    assert names == {"Dockerfile", "prepare", ".gitignore"}
    subprocess.run(["git", "init", "-q", str(ctx)], check=True)
    assert {p.name for p in images.context_files(ctx)} == names


def test_task_creators_touch_neither_docker_nor_ssh(tmp_path, monkeypatch):
    data = yaml.safe_load(LAB_CLUSTER_FILE.read_text())
    data["images"]["mosquitto"] = {"image": "eclipse-mosquitto:2.0.18"}  # a pulled one
    data["build_dir"] = str(tmp_path / "build")
    for key in ("key", "known_hosts"):
        data["ssh"][key] = str((LAB_CLUSTER_FILE.parent / data["ssh"][key]).resolve())
    cfg = tmp_path / "cluster.yml"
    cfg.write_text(yaml.safe_dump(data))
    monkeypatch.setenv(ENV_VAR, str(cfg))
    real_run, real_popen = subprocess.run, subprocess.Popen

    def guard(real):
        def wrapped(cmd, *a, **k):
            assert Path(cmd[0]).name not in ("docker", "ssh", "docker-buildx", "mmdebstrap"), cmd
            return real(cmd, *a, **k)
        return wrapped

    monkeypatch.setattr(subprocess, "run", guard(real_run))
    monkeypatch.setattr(subprocess, "Popen", guard(real_popen))
    tasks = {t.get("basename", "") + (":" + t["name"] if t.get("name") else ""): t
             for t in images.task_images()}
    assert set(tasks) == {"images", "images:homeassistant", "images:mariadb",
                          "images:mosquitto", "images:manifest"}
    db = tasks["images:mariadb"]
    out = tmp_path / "build" / "images"
    assert db["targets"] == [str(out / "mariadb.tar"), str(out / "mariadb.json")]
    assert str(out / "base.json") in db["file_dep"]
    if (PROJECT_ROOT / "images/mariadb-galera/Dockerfile").exists():
        assert str(PROJECT_ROOT / "images/mariadb-galera/Dockerfile") in db["file_dep"]
    assert tasks["images:mosquitto"]["file_dep"] == []  # pulled: the pin decides
    assert tasks["images:mosquitto"]["uptodate"]
    assert tasks["images:manifest"]["targets"] == [str(out / "manifest.json")]
    preload = {t["basename"]: t for t in images.task_preload_images()}
    assert set(preload) == {"preload-images", "preload-images:pi1", "preload-images:pi2",
                            "preload-images:pi3"}
    assert all(t["file_dep"] == [str(out / "manifest.json")] for t in preload.values())
    assert all(t["uptodate"] == [False] for t in preload.values())  # the nodes are asked
    assert images.task_base_image()["basename"] == "base-image"
    assert images.task_buildx()["targets"] == [tmp_path / "build" / "tools" / "docker-buildx"]


def test_builder_falls_back_to_legacy_when_buildx_cannot_be_had(tmp_path, monkeypatch):
    notes: list[str] = []
    monkeypatch.setattr(images.build, "_buildx_works", lambda cmd: False)

    def no_fetch(dest, log=print):
        raise images.ImageError("apt-get update (trixie only) failed")

    monkeypatch.setattr(images.build, "fetch_buildx", no_fetch)
    monkeypatch.delenv(images.BUILDER_ENV, raising=False)
    assert images.buildx_command(tmp_path, log=notes.append) is None
    assert "legacy builder" in notes[0] and "trixie" in notes[0]
    monkeypatch.setenv(images.BUILDER_ENV, "buildx")
    with pytest.raises(images.ImageError, match="trixie"):
        images.buildx_command(tmp_path, log=notes.append)
    monkeypatch.setenv(images.BUILDER_ENV, "legacy")
    assert images.buildx_command(tmp_path) is None


def test_builder_prefers_the_docker_plugin_then_the_fetched_binary(tmp_path, monkeypatch):
    monkeypatch.delenv(images.BUILDER_ENV, raising=False)
    monkeypatch.setattr(images.build, "_buildx_works", lambda cmd: cmd == ["docker", "buildx"])
    assert images.buildx_command(tmp_path, fetch=False) == ["docker", "buildx"]
    (tmp_path / "docker-buildx").write_text("")
    monkeypatch.setattr(images.build, "_buildx_works", lambda cmd: cmd != ["docker", "buildx"])
    assert images.buildx_command(tmp_path, fetch=False) == [str(tmp_path / "docker-buildx")]


# The Galera image's tag must change with what builds it: swarm rolls a service over only when
# its image reference changes, so an image rebuilt under the old tag never reaches the running
# containers (seen: the buffer pool cap built and preloaded, the db still on the old image).
GALERA_BUILD = ("haswarm/mariadb-galera:10.11-4", "ce1a87bd96bb")
GALERA_CONTEXT = PROJECT_ROOT / "images" / "mariadb-galera"


def test_the_galera_tag_changes_with_its_build_context():
    tag, recorded = GALERA_BUILD
    for name in ("lab.yml", "cluster.example.yml"):
        text = (PROJECT_ROOT / "config" / name).read_text()
        assert f'"{tag}"' in text, f"config/{name} must build {tag}"
    assert images.context_hash(GALERA_CONTEXT, docs=False) == recorded, (
        "images/mariadb-galera changed: bump its tag's revision (10.11-N) in config/lab.yml and "
        "config/cluster.example.yml, then set GALERA_BUILD in this file to the new tag and "
        f"{images.context_hash(GALERA_CONTEXT, docs=False)!r}")
