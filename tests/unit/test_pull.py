"""The pull path without Docker: references by tag and by digest in the cluster file, why a pull
failed and what the message says, when a local image may stand in (a digest only), the digest
recorded in the image's record, and doit's graph: no preload after a failed images task."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from doit.cmd_base import ModuleTaskLoader
from doit.doit_cmd import DoitMain

import tasks.images as images
import tasks.images.build as build
import tasks.images.pull as pull
from tasks.config import LAB_CLUSTER_FILE, ConfigError, Image, load_cluster
from tasks.images import ImageError, Platform

AMD = Platform.parse("linux/amd64")
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
REG = "127.0.0.1:5077"
MOSQ = f"{REG}/haswarm-lab/mosquitto"

# What `docker pull` (docker.io 20.10, distribution registry 2.8) says.
REFUSED = (f'Error response from daemon: Get "http://{REG}/v2/": dial tcp {REG}: connect: '
           "connection refused")
NO_TAG = (f"Error response from daemon: manifest for {MOSQ}:9.9.9 not found: manifest unknown: "
          "manifest unknown")
NO_DIGEST = (f"Error response from daemon: manifest for {MOSQ}@{D2} not found: manifest "
             "unknown: manifest unknown")
NO_HOST = ('Error response from daemon: Get "https://registry.invalid/v2/": dial tcp: lookup '
           "registry.invalid on 10.0.0.1:53: no such host")
HUB_DENIED = ("Error response from daemon: pull access denied for nosuch/thing, repository does "
              "not exist or may require 'docker login': denied: requested access to the "
              "resource is denied")
HTTP = ('Error response from daemon: Get "https://10.0.0.5:5000/v2/": http: server gave HTTP '
        "response to HTTPS client")
PLATFORM = ("no matching manifest for linux/arm/v7 in the manifest list entries")
PULLED = (f"2.0.11: Pulling from haswarm-lab/mosquitto\nDigest: {D1}\n"
          f"Status: Downloaded newer image for {MOSQ}:2.0.11\n{MOSQ}:2.0.11\n")


# ---------------------------------------------------------------------------------------------
# References in the cluster file


@pytest.mark.parametrize("ref, repo, tag, digest, registry, pull_ref, node_ref", [
    ("eclipse-mosquitto:2.0.20", "eclipse-mosquitto", "2.0.20", None, "docker.io",
     "eclipse-mosquitto:2.0.20", "eclipse-mosquitto:2.0.20"),
    (f"{MOSQ}:2.0.11", MOSQ, "2.0.11", None, REG, f"{MOSQ}:2.0.11", f"{MOSQ}:2.0.11"),
    (f"{MOSQ}@{D1}", MOSQ, None, D1, REG, f"{MOSQ}@{D1}", f"{MOSQ}:sha256-{'1' * 64}"),
    (f"{MOSQ}:2.0.11@{D1}", MOSQ, "2.0.11", D1, REG, f"{MOSQ}@{D1}",
     f"{MOSQ}:sha256-{'1' * 64}"),
    ("localhost/x:1", "localhost/x", "1", None, "localhost", "localhost/x:1", "localhost/x:1"),
    ("ghcr.io/home-assistant/home-assistant:2025.11.3", "ghcr.io/home-assistant/home-assistant",
     "2025.11.3", None, "ghcr.io", "ghcr.io/home-assistant/home-assistant:2025.11.3",
     "ghcr.io/home-assistant/home-assistant:2025.11.3"),
    ("portainer/agent:2.21.5", "portainer/agent", "2.21.5", None, "docker.io",
     "portainer/agent:2.21.5", "portainer/agent:2.21.5"),
])
def test_reference_parts(ref, repo, tag, digest, registry, pull_ref, node_ref):
    img = Image(image=ref)
    assert (img.repository, img.tag, img.digest, img.registry, img.pull_ref, img.node_ref) == \
        (repo, tag, digest, registry, pull_ref, node_ref)


def _lab_data(tmp_path: Path, **images_: dict[str, Any]) -> dict[str, Any]:
    data = yaml.safe_load(LAB_CLUSTER_FILE.read_text())
    data["build_dir"] = str(tmp_path / "build")
    for key in ("key", "known_hosts"):
        data["ssh"][key] = str((LAB_CLUSTER_FILE.parent / data["ssh"][key]).resolve())
    data["images"].update(images_)
    return data


def _config_error(tmp_path: Path, **images_: dict[str, Any]) -> str:
    cfg = tmp_path / "cluster.yml"
    cfg.write_text(yaml.safe_dump(_lab_data(tmp_path, **images_)))
    with pytest.raises(ConfigError) as e:
        load_cluster(cfg)
    return str(e.value)


@pytest.mark.parametrize("ref", [f"{MOSQ}@{D1}", f"{MOSQ}:2.0.11@{D1}", f"{MOSQ}:latest@{D1}"])
def test_digest_references_are_accepted(tmp_path, ref):
    cfg = tmp_path / "cluster.yml"
    cfg.write_text(yaml.safe_dump(_lab_data(tmp_path, mosquitto={"image": ref})))
    assert load_cluster(cfg).images.mosquitto.digest == D1


@pytest.mark.parametrize("ref, bad", [
    (f"{MOSQ}@sha256:abc", "'sha256:abc'"),
    (f"{MOSQ}:2@sha256:" + "A" * 64, "'sha256:" + "A" * 64 + "'"),
    (f"{MOSQ}@md5:" + "1" * 32, "'md5:" + "1" * 32 + "'"),
    (f"{MOSQ}:2@", "''"),
])
def test_a_malformed_digest_is_named_with_the_expected_form(tmp_path, ref, bad):
    msg = _config_error(tmp_path, mosquitto={"image": ref})
    assert f"images.mosquitto.image: {ref!r} has a malformed digest {bad}" in msg
    assert "'sha256:' and 64 lower-case hexadecimal digits" in msg


def test_a_built_image_cannot_be_pinned_by_digest(tmp_path):
    msg = _config_error(tmp_path, mosquitto={"image": f"{MOSQ}:2@{D1}",
                                             "build": "lab/images/mosquitto"})
    assert "images.mosquitto: " in msg and "is built here" in msg and "NAME:TAG" in msg


def test_digest_only_home_assistant_passes_the_armv7_version_check(tmp_path):
    data = _lab_data(tmp_path, homeassistant={
        "image": f"ghcr.io/home-assistant/home-assistant@{D1}"})
    data["platform"] = "linux/arm/v7"
    cfg = tmp_path / "cluster.yml"
    cfg.write_text(yaml.safe_dump(data))
    assert load_cluster(cfg).images.homeassistant.tag is None


def test_the_stack_names_a_digest_pinned_image_by_the_tag_the_nodes_hold(tmp_path):
    from tasks.render import stack_context

    cfg = tmp_path / "cluster.yml"
    cfg.write_text(yaml.safe_dump(_lab_data(tmp_path, mosquitto={"image": f"{MOSQ}@{D1}"})))
    ctx = stack_context(load_cluster(cfg), bootstrap=False)
    assert ctx["images"]["mosquitto"] == f"{MOSQ}:sha256-{'1' * 64}"
    assert ctx["images"]["mariadb"] == "haswarm/mariadb-galera:10.11-4"  # unchanged


# ---------------------------------------------------------------------------------------------
# Why a pull failed, and the message


@pytest.mark.parametrize("output, kind", [
    (REFUSED, "unreachable"), (NO_HOST, "unreachable"), (NO_TAG, "not-found"),
    (NO_DIGEST, "not-found"), (HUB_DENIED, "denied"), (HTTP, "insecure"),
    (PLATFORM, "platform"), ("something else entirely", "other"),
])
def test_classify_pull_error(output, kind):
    assert images.classify_pull_error(output) == kind


def test_a_missing_tag_names_image_registry_tag_and_what_to_do():
    img = Image(image=f"{MOSQ}:9.9.9")
    msg = images.pull_failure("mosquitto", img, AMD, "not-found", NO_TAG)
    assert msg.startswith(f"mosquitto: cannot pull {MOSQ}:9.9.9 ")
    assert f"the tag '9.9.9' of {MOSQ} does not exist in the registry {REG}" in msg
    assert "  | " + NO_TAG in msg  # docker's own words
    assert "what to do: check which tags exist" in msg and "images.mosquitto.image" in msg
    assert "preload-images does not run, the nodes are not changed" in msg


def test_an_unreachable_registry_names_it_and_says_a_tag_is_never_taken_locally():
    img = Image(image=f"{MOSQ}:2.0.11")
    msg = images.pull_failure("mosquitto", img, AMD, "unreachable", REFUSED)
    assert f"cannot pull {MOSQ}:2.0.11" in msg
    assert f"the registry {REG} does not answer" in msg
    assert "start the registry" in msg and "never taken from the local engine" in msg
    assert f"{MOSQ}@sha256:..." in msg


def test_a_missing_digest_is_named():
    img = Image(image=f"{MOSQ}@{D2}")
    msg = images.pull_failure("mosquitto", img, AMD, "not-found", NO_DIGEST)
    assert f"the digest {D2} of {MOSQ} does not exist in the registry {REG}" in msg


def test_the_digest_recorded():
    tagged = Image(image=f"{MOSQ}:2.0.11")
    info = {"RepoDigests": [f"{MOSQ}@{D2}", f"other/name@{D1}"]}
    assert images.pulled_digest(PULLED, info, tagged) == D1  # what the registry answered
    assert images.pulled_digest("", info, tagged) == D2  # the engine's record
    both = {"RepoDigests": [f"{MOSQ}@{D1}", f"{MOSQ}@{D2}"]}
    assert images.pulled_digest("", both, tagged) is None  # ambiguous: not guessed
    assert images.pulled_digest("", {}, Image(image=f"{MOSQ}@{D2}")) == D2  # the pin
    hub = {"RepoDigests": [f"eclipse-mosquitto@{D1}"]}
    assert images.repo_digest(hub, "docker.io/library/eclipse-mosquitto") == D1


# ---------------------------------------------------------------------------------------------
# pull_image's decisions, with a fake docker


class FakeDocker:
    """`docker pull` answers `answer` (returncode, output); the engine holds `local` (ref ->
    inspect dict); `docker tag` and `docker save` are recorded."""

    def __init__(self, monkeypatch, answer: tuple[int, str], local: dict[str, dict[str, Any]]):
        self.answer, self.local, self.calls = answer, local, []
        monkeypatch.setattr(pull.subprocess, "run", self.run)  # only docker pull may run
        monkeypatch.setattr(pull, "local_image", self.inspect)
        monkeypatch.setattr(pull, "verify_local", self.verify)
        monkeypatch.setattr(pull, "_run", self.cli)
        monkeypatch.setattr(build, "_run", self.cli)
        monkeypatch.setattr(build, "ensure_engine", lambda c, log: None)

    def run(self, cmd, **kw):
        assert cmd[:2] == ["docker", "pull"], cmd
        self.calls.append(cmd)
        code, out = self.answer
        return subprocess.CompletedProcess(cmd, code, out.encode() if code == 0 else b"",
                                           b"" if code == 0 else out.encode())

    def inspect(self, ref):
        self.calls.append(["inspect", ref])
        return self.local.get(ref)

    def verify(self, ref, platform):
        info = self.local.get(ref)
        if info is None:
            raise ImageError(f"{ref} is not in the local Docker engine")
        return info

    def cli(self, cmd, **kw):
        self.calls.append(cmd)
        if cmd[:2] == ["docker", "tag"]:
            self.local[cmd[3]] = self.local[cmd[2]]
        if cmd[:2] == ["docker", "save"]:
            Path(cmd[3]).write_bytes(b"tar")
        return subprocess.CompletedProcess(cmd, 0, b"", b"")


def _cluster(tmp_path: Path, ref: str):
    cfg = tmp_path / "cluster.yml"
    cfg.write_text(yaml.safe_dump(_lab_data(tmp_path, mosquitto={"image": ref})))
    return load_cluster(cfg)


def _info(id_: str = "sha256:" + "9" * 64, arch: str = "amd64", digests=()) -> dict[str, Any]:
    return {"Id": id_, "Os": "linux", "Architecture": arch, "RepoDigests": list(digests),
            "RootFS": {"Layers": ["sha256:" + "7" * 64]}}


def test_a_pulled_tag_is_saved_with_its_digest(tmp_path, monkeypatch):
    c = _cluster(tmp_path, f"{MOSQ}:2.0.11")
    fake = FakeDocker(monkeypatch, (0, PULLED), {f"{MOSQ}:2.0.11": _info()})
    record = images.make_image(c, "mosquitto", log=lambda s: None)
    assert ["docker", "pull", "--platform", "linux/amd64", f"{MOSQ}:2.0.11"] in fake.calls
    assert record["how"] == "pulled" and record["digest"] == D1
    assert record["image"] == f"{MOSQ}:2.0.11" and "reference" not in record
    saved = json.loads((tmp_path / "build" / "images" / "mosquitto.json").read_text())
    assert saved == record


def test_a_digest_is_pulled_by_digest_and_tagged_for_the_nodes(tmp_path, monkeypatch):
    c = _cluster(tmp_path, f"{MOSQ}:2.0.11@{D1}")
    fake = FakeDocker(monkeypatch, (0, PULLED), {f"{MOSQ}@{D1}": _info(digests=[f"{MOSQ}@{D1}"])})
    record = images.make_image(c, "mosquitto", log=lambda s: None)
    node_ref = f"{MOSQ}:sha256-{'1' * 64}"
    assert ["docker", "pull", "--platform", "linux/amd64", f"{MOSQ}@{D1}"] in fake.calls
    assert ["docker", "tag", f"{MOSQ}@{D1}", node_ref] in fake.calls
    assert any(cmd[:2] == ["docker", "save"] and cmd[-1] == node_ref for cmd in fake.calls)
    assert record == {**record, "image": node_ref, "reference": f"{MOSQ}:2.0.11@{D1}",
                      "digest": D1, "how": "pulled"}


@pytest.mark.parametrize("output", [REFUSED, NO_TAG])
def test_a_tag_is_never_taken_from_the_local_engine(tmp_path, monkeypatch, output):
    """The engine holds a matching image under the tag (e.g. pushed or pulled earlier): it may
    be stale, so a failed pull fails the task."""
    c = _cluster(tmp_path, f"{MOSQ}:2.0.11")
    fake = FakeDocker(monkeypatch, (1, output), {f"{MOSQ}:2.0.11": _info()})
    with pytest.raises(ImageError) as e:
        images.make_image(c, "mosquitto", log=lambda s: None)
    assert f"cannot pull {MOSQ}:2.0.11" in str(e.value) and REG in str(e.value)
    assert not any(cmd[:2] == ["docker", "save"] for cmd in fake.calls)
    assert not (tmp_path / "build" / "images" / "mosquitto.json").exists()


def test_a_digest_held_locally_stands_in_for_an_unreachable_registry(tmp_path, monkeypatch):
    c = _cluster(tmp_path, f"{MOSQ}@{D1}")
    notes: list[str] = []
    FakeDocker(monkeypatch, (1, REFUSED), {f"{MOSQ}@{D1}": _info(digests=[f"{MOSQ}@{D1}"])})
    record = images.make_image(c, "mosquitto", log=notes.append)
    assert record["how"] == "local" and record["digest"] == D1
    assert any("the same content by its digest" in n and "unreachable" in n for n in notes)


@pytest.mark.parametrize("local", [{}, {f"{MOSQ}@{D1}": _info(arch="arm64")}])
def test_a_digest_not_held_locally_for_the_platform_fails(tmp_path, monkeypatch, local):
    c = _cluster(tmp_path, f"{MOSQ}@{D1}")
    FakeDocker(monkeypatch, (1, REFUSED), local)
    with pytest.raises(ImageError) as e:
        images.make_image(c, "mosquitto", log=lambda s: None)
    assert f"the registry {REG} does not answer" in str(e.value)


def test_the_local_fallback_is_never_asked_for_a_tag(monkeypatch):
    monkeypatch.setattr(pull, "local_image", lambda ref: pytest.fail(f"asked for {ref}"))
    assert images.local_fallback(Image(image=f"{MOSQ}:2.0.11"), AMD) is None


# ---------------------------------------------------------------------------------------------
# doit's graph: preload-images never runs after a failed images task


def _run_doit(tmp_path: Path, monkeypatch, fail: str | None, *args: str,
              mosquitto: str = "1") -> tuple[int, list]:
    data = _lab_data(tmp_path, **{s: {"image": f"{REG}/haswarm-lab/{s}:1"}
                                  for s in ("homeassistant", "mariadb")},
                     mosquitto={"image": f"{REG}/haswarm-lab/mosquitto:{mosquitto}"})
    cfg = tmp_path / "cluster.yml"
    cfg.write_text(yaml.safe_dump(data))
    preloaded: list = []

    def fake_make(c, service, log=print):
        if service == fail:
            raise ImageError(f"{service}: cannot pull (test)")
        out = images.images_dir(c)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{service}.tar").write_bytes(b"tar")
        (out / f"{service}.json").write_text(json.dumps({"image": service}))

    monkeypatch.setattr(images, "make_image", fake_make)
    monkeypatch.setattr(images, "preload_action", lambda only, step: preloaded.append(only))
    loader = ModuleTaskLoader({"task_images": images.task_images,
                               "task_preload_images": images.task_preload_images})
    code = DoitMain(loader).run(["run", "--db-file", str(tmp_path / "doit.db"), *args,
                                 f"config={cfg}"])
    return code, preloaded


def test_preload_runs_after_images_that_all_succeeded(tmp_path, monkeypatch):
    code, preloaded = _run_doit(tmp_path, monkeypatch, None, "preload-images")
    assert code == 0 and preloaded == [None]


@pytest.mark.parametrize("args", [["preload-images"], ["images", "preload-images"],
                                  ["--continue", "images", "preload-images"],
                                  ["preload-images:pi1"]])
def test_no_preload_after_a_failed_images_task(tmp_path, monkeypatch, args):
    code, preloaded = _run_doit(tmp_path, monkeypatch, "mosquitto", *args)
    assert code != 0 and preloaded == []
    assert not (tmp_path / "build" / "images" / "manifest.json").exists()


def test_no_preload_after_a_failed_images_task_even_with_an_earlier_manifest(tmp_path,
                                                                           monkeypatch):
    """A manifest of an earlier good run is there: the preload still waits for the images."""
    assert _run_doit(tmp_path, monkeypatch, None, "preload-images") == (0, [None])
    manifest = (tmp_path / "build" / "images" / "manifest.json").read_text()
    code, preloaded = _run_doit(tmp_path, monkeypatch, "mosquitto", "preload-images",
                                mosquitto="9.9.9")
    assert code != 0 and preloaded == []
    assert (tmp_path / "build" / "images" / "manifest.json").read_text() == manifest
