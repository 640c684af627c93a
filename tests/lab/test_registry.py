"""The pull path through a real registry (issue 12, part 1): `docker-registry` on the controller
(lab/registry.py), the lab's images pushed to it, and a variant of config/lab.yml (written here)
that names them by the registry's address with no `build:`. `doit images` then *pulls* them
(by tag, by digest, by tag and digest), records the registry's digest in manifest.json, and
`preload-images` puts them on the nodes; a tag that does not exist, or a registry that does not
answer, fails naming the image and the registry, and no node changes (doit never runs the
preload after a failed images task). With the registry down, an image pinned by digest that the
controller holds under that digest stands in; a tag never does.

Nothing is deployed: the stack keeps running the lab's own images. The variant gets its own
build directory and doit database (the lab's `build/images` and `.doit.db` are not touched); the
registry's tags are removed from the controller and the nodes at the end. Costs: the first push
of the lab's images (compressing ~1 GB), a `docker save` of each pulled image, and one preload
that only re-tags (the nodes hold the same image IDs already when the stack is deployed).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from lab.registry import Registry
from tasks.config import LAB_CLUSTER_FILE, PROJECT_ROOT, Image
from tasks.images import stack_images
from tests.lab.conftest import Run, doit, sh

pytestmark = pytest.mark.lab

DODO = """\
import sys
sys.path.insert(0, {root!r})
from tasks.images import task_images, task_preload_images  # noqa: F401 (only these tasks)
DOIT_CONFIG = {{"verbosity": 2}}
"""


class Variant:
    """Cluster files naming the lab's images in the registry, sharing one build directory and
    doit database (`fresh()` gives another pair)."""

    def __init__(self, tmp: Path, reg: Registry, lab_refs: dict[str, str]):
        self.tmp, self.reg, self.lab_refs = tmp, reg, lab_refs
        self.dodo = tmp / "dodo.py"
        self.dodo.write_text(DODO.format(root=str(PROJECT_ROOT)))
        self.n = 0
        self.fresh()

    def fresh(self) -> None:
        if self.n:  # the saved images of the pair before are not used again (disk, in CI)
            for tar in (self.build / "images").glob("*.tar"):
                tar.unlink()
        self.n += 1
        self.build = self.tmp / f"build{self.n}"
        self.db = self.tmp / f"doit{self.n}.db"

    def ref(self, service: str, tag: str | None = None, digest: str | None = None,
            keep_tag: bool = True) -> str:
        repo, _, lab_tag = self.reg.ref(self.lab_refs[service]).rpartition(":")
        name = f"{repo}:{tag or lab_tag}" if keep_tag else repo
        return f"{name}@{digest}" if digest else name

    def run(self, refs: dict[str, str], *tasks: str) -> Run:
        data = yaml.safe_load(LAB_CLUSTER_FILE.read_text())
        data["build_dir"] = str(self.build)
        for key in ("key", "known_hosts"):
            data["ssh"][key] = str((LAB_CLUSTER_FILE.parent / data["ssh"][key]).resolve())
        data["images"] = {s: {"image": refs.get(s) or self.ref(s)} for s in self.lab_refs}
        cfg = self.tmp / f"cluster-{time.monotonic_ns()}.yml"
        cfg.write_text(yaml.safe_dump(data))
        started = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "doit", "run", "-f", str(self.dodo),
                            "--db-file", str(self.db), *tasks, f"config={cfg}"],
                           cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900,
                           stdin=subprocess.DEVNULL,
                           env={k: v for k, v in os.environ.items() if k != "HASWARM_CONFIG"})
        return Run(f"doit run {' '.join(tasks)} ({cfg.name})", p.stdout + p.stderr,
                   time.monotonic() - started, p.returncode == 0)

    def manifest(self) -> dict:
        return json.loads((self.build / "images" / "manifest.json").read_text())

    def record(self, service: str) -> dict:
        return json.loads((self.build / "images" / f"{service}.json").read_text())


@pytest.fixture(scope="module")
def lab_refs(lab, cluster) -> dict[str, str]:
    """The lab's images, in the controller's engine: `doit images` on the lab (up to date, so
    instant, once the session has deployed; it builds them otherwise)."""
    run = doit("images")
    if not run.ok:
        pytest.fail(f"{run.how} failed:\n{run.output[-4000:]}", pytrace=False)
    return {s: img.image for s, img in stack_images(cluster).items()}


@pytest.fixture(scope="module")
def registry(lab, lab_refs):
    """The registry with the lab's images pushed: (registry, {service: digest}). At the end it
    is stopped and its tags are removed from the controller and the nodes (untagged only)."""
    reg = Registry().start()  # its storage is kept: a later session pushes no layer again
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(len(lab_refs)) as pool:  # the engine compresses in parallel
            digests = dict(zip(lab_refs, pool.map(reg.push, lab_refs.values()), strict=True))
        print(f"\n[registry] {reg.address}: pushed {len(digests)} images in "
              f"{time.monotonic() - t0:.1f} s", flush=True)
        yield reg, digests
    finally:
        reg.stop()
        prefix = f"{reg.address}/"
        out = subprocess.run(["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}"],
                             capture_output=True, text=True).stdout.split()
        ours = [r for r in out if r.startswith(prefix)]
        if ours:  # untag only: the lab's own tags keep the images
            subprocess.run(["docker", "image", "rm", *ours], capture_output=True)
        for node in lab.names:
            sh(lab, node, "docker image ls --format '{{.Repository}}:{{.Tag}}' | grep -F "
               f"{shlex.quote(prefix)} | xargs -r docker image rm >/dev/null 2>&1; true",
               check=False)


@pytest.fixture(scope="module")
def variant(registry, lab_refs, tmp_path_factory) -> Variant:
    return Variant(tmp_path_factory.mktemp("registry"), registry[0], lab_refs)


def node_images(lab) -> dict[str, list[str]]:
    """Every image on every node: sorted 'REPO:TAG ID' lines (what 'unchanged' compares)."""
    return {n: sorted(sh(lab, n, "docker image ls -a --no-trunc --format "
                         "'{{.Repository}}:{{.Tag}} {{.ID}}'").splitlines()) for n in lab.names}


def test_images_are_pulled_by_tag_with_their_digest_then_preloaded(lab, registry, variant):
    reg, digests = registry
    run = variant.run({}, "images", "preload-images")
    assert re.search(r"^\.\s+preload-images", run.output, re.M)  # how doit shows a task run
    print(f"\n[registry] {run.how}: {run.seconds:.1f} s", flush=True)
    assert run.ok, run.output[-4000:]
    manifest = variant.manifest()
    for service, digest in digests.items():
        rec = manifest[service]
        assert rec["how"] == "pulled", rec
        assert rec["image"] == variant.ref(service)
        assert rec["digest"] == digest, (service, rec)
        assert f"{service}: pulled {variant.ref(service)}" in run.output
        assert f"digest {digest}" in run.output
    assert "building" not in run.output
    images_on = node_images(lab)
    for node in lab.names:
        tags = {line.split()[0]: line.split()[1] for line in images_on[node]}
        for service, rec in manifest.items():
            assert tags.get(rec["image"]) == rec["id"], (node, service)


def test_a_digest_pinned_reference_is_pulled_by_digest(lab, registry, variant):
    """NAME@sha256:... and NAME:TAG@sha256:...: pulled by digest, tagged NAME:sha256-<hex> for
    the nodes (a `docker load` cannot record a digest), digest and reference recorded."""
    reg, digests = registry
    refs = {"mosquitto": variant.ref("mosquitto", digest=digests["mosquitto"], keep_tag=False),
            "mariadb": variant.ref("mariadb", digest=digests["mariadb"])}
    run = variant.run(refs, "images", "preload-images")
    assert run.ok, run.output[-4000:]
    manifest = variant.manifest()
    for service, ref in refs.items():
        rec = manifest[service]
        img = Image(image=ref)
        node_ref = f"{img.repository}:{digests[service].replace(':', '-')}"
        assert (rec["how"], rec["digest"], rec["reference"], rec["image"]) == \
            ("pulled", digests[service], ref, node_ref), rec
        assert f"docker pull --platform linux/amd64 {img.repository}@{digests[service]}" \
            in run.output
        for node in lab.names:
            assert sh(lab, node, f"docker image inspect -f '{{{{.Id}}}}' {node_ref}").strip() \
                == rec["id"]
    assert manifest["homeassistant"]["image"] == variant.ref("homeassistant")  # by tag still


def test_a_tag_that_does_not_exist_fails_naming_it_and_changes_no_node(lab, registry, variant):
    reg, _ = registry
    before = node_images(lab)
    manifest = (variant.build / "images" / "manifest.json").read_text()
    missing = variant.ref("mosquitto", tag="9.9.9")
    run = variant.run({"mosquitto": missing}, "images", "preload-images")
    assert not run.ok
    assert f"mosquitto: cannot pull {missing}" in run.output
    assert f"does not exist in the registry {reg.address}" in run.output
    assert "what to do: check which tags exist" in run.output
    assert not re.search(r"^\.\s+preload-images", run.output, re.M)  # never started
    assert node_images(lab) == before
    assert (variant.build / "images" / "manifest.json").read_text() == manifest


def test_registry_down_a_tag_fails_and_a_held_digest_stands_in(lab, registry, variant):
    """Registry stopped: homeassistant by tag fails although the controller's engine holds that
    tag; mariadb and mosquitto pinned by digest come from the engine (it holds them under those
    digests since the push). `--continue` runs every images task, still no preload: no node
    changes."""
    reg, digests = registry
    before = node_images(lab)
    variant.fresh()  # nothing up to date: every images task runs
    reg.stop()
    try:
        refs = {s: variant.ref(s, digest=digests[s], keep_tag=s == "mariadb")
                for s in ("mariadb", "mosquitto")}
        run = variant.run(refs, "--continue", "images", "preload-images")
    finally:
        reg.start()
    assert not run.ok
    tagged = variant.ref("homeassistant")
    assert f"homeassistant: cannot pull {tagged}" in run.output
    assert f"the registry {reg.address} does not answer" in run.output
    assert "never taken from the local engine" in run.output
    for service in refs:
        assert (variant.record(service)["how"], variant.record(service)["digest"]) == \
            ("local", digests[service])
        assert f"{service}: the pull failed (unreachable" in run.output
    assert not (variant.build / "images" / "homeassistant.json").exists()
    assert not (variant.build / "images" / "manifest.json").exists()
    assert not re.search(r"^\.\s+preload-images", run.output, re.M)
    assert node_images(lab) == before
