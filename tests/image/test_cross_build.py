"""An arm/v7 image cross-built under QEMU through `doit images`, run: it must print armv7l.

Goes through the same tasks as `doit images` (base-image -> images:<service>: FROM resolution to
the local armhf Debian base, buildx or the legacy builder, platform check, docker save) with a
throwaway cluster file whose images are one tiny Dockerfile `FROM debian:bookworm`.

Time: the armhf base is bootstrapped with mmdebstrap once per engine (74-150 s on 2 cores) and
kept as `haswarm/debian:bookworm-armhf`; later runs reuse it. Each build is a few seconds (the
fetch of buildx from Debian trixie ~4 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from doit.cmd_base import ModuleTaskLoader
from doit.doit_cmd import DoitMain

import tasks.images as images
from tasks.config import LAB_CLUSTER_FILE

ARM = images.Platform.parse("linux/arm/v7")
BASE = images.base_tag("bookworm", ARM)
TEST_REPO = "haswarm-test/cross-build"


def _why_skip() -> str | None:
    if shutil.which("docker") is None or not images.docker_available():
        return "no Docker engine answers the docker CLI"
    entry = images.BINFMT_DIR / ARM.binfmt
    registered = entry.exists() and entry.read_text().startswith("enabled")
    if not registered and not (shutil.which("qemu-arm-static") and os.geteuid() == 0):
        return ("no QEMU for arm: install qemu-user-static and binfmt-support "
                "(and run as root to register it)")
    if images.local_image(BASE) is None and shutil.which("mmdebstrap") is None:
        return f"no {BASE} and no mmdebstrap to make it"
    return None


pytestmark = [pytest.mark.lab, pytest.mark.skipif(_why_skip() is not None,
                                                  reason=str(_why_skip()))]


def _cluster_file(tmp: Path, tag: str) -> Path:
    ctx = tmp / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        "FROM debian:bookworm\nRUN uname -m > /arch\nCMD [\"cat\", \"/arch\"]\n")
    data = yaml.safe_load(LAB_CLUSTER_FILE.read_text())
    data["platform"] = "linux/arm/v7"
    data["build_dir"] = str(tmp / "build")  # absolute: stays out of the project
    data["images"] = {s: {"image": f"{TEST_REPO}:{tag}-{s}", "build": str(ctx)}
                      for s in ("homeassistant", "mariadb", "mosquitto")}
    for key in ("key", "known_hosts"):  # relative to the cluster file: keep the lab's
        data["ssh"][key] = str((LAB_CLUSTER_FILE.parent / data["ssh"][key]).resolve())
    path = tmp / "cluster.yml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("builder", ["buildx", "legacy"])
def test_arm_v7_image_built_under_qemu_prints_armv7l(tmp_path, monkeypatch, builder):
    monkeypatch.setenv(images.BUILDER_ENV, builder)
    cfg = _cluster_file(tmp_path, builder)
    ref = f"{TEST_REPO}:{builder}-homeassistant"
    t0 = time.monotonic()
    try:
        rc = DoitMain(ModuleTaskLoader(images)).run(
            ["--db-file", str(tmp_path / ".doit.db"), "images:homeassistant", f"config={cfg}"])
        built = time.monotonic() - t0
        assert rc == 0, "doit images:homeassistant failed (output above)"

        out = subprocess.run(["docker", "run", "--rm", "--platform", "linux/arm/v7", ref],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "armv7l"

        info = images.local_image(ref)
        assert info is not None
        assert (info["Architecture"], info.get("Variant")) == ("arm", "v7")
        record = json.loads((tmp_path / "build" / "images" / "homeassistant.json").read_text())
        assert record["id"] == info["Id"] and record["platform"] == "linux/arm/v7"
        assert (tmp_path / "build" / "images" / "homeassistant.tar").stat().st_size > 0
        base = json.loads((tmp_path / "build" / "images" / "base.json").read_text())
        assert base["bases"]["debian:bookworm"]["use"] == BASE
        print(f"{builder}: doit images:homeassistant (arm/v7) in {built:.1f} s")
    finally:
        subprocess.run(["docker", "image", "rm", ref], capture_output=True)
