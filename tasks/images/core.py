"""Images, the ground floor: platforms, the local Docker engine, QEMU emulation, errors."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.errors import HaswarmError

SERVICES = ("homeassistant", "mariadb", "mosquitto", "portainer", "portainer_agent")

# Local bootstrap of Debian bases (no registry needed).
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_REPOSITORY = "haswarm/debian"
# Where buildx comes from when the docker CLI has no buildx plugin (bookworm has none).
BUILDX_SUITE = "trixie"
BUILDX_PACKAGE = "docker-buildx"
BUILDX_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
BUILDER_ENV = "HASWARM_BUILDER"  # auto (default) | buildx | legacy
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
# Seconds for one Docker API read on a node while it loads (a Pi unpacks slowly).
LOAD_TIMEOUT = 900
CHUNK = 1 << 20


class ImageError(HaswarmError):
    """Something the user has to act on; str() says what and how."""


# ---------------------------------------------------------------------------------------------
# Platforms


@dataclass(frozen=True)
class Platform:
    """An OCI platform such as linux/arm/v7."""

    os: str
    arch: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        """'linux/arm/v7' -> Platform('linux', 'arm', 'v7')."""
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"{text!r} is not a platform such as linux/arm64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.arch, self.variant) if p)

    @property
    def debian_arch(self) -> str:
        """The Debian architecture (mmdebstrap --arch) of this platform."""
        key = (self.arch, self.variant)
        table = {("amd64", ""): "amd64", ("arm64", ""): "arm64", ("arm64", "v8"): "arm64",
                 ("arm", "v7"): "armhf", ("386", ""): "i386"}
        if key not in table:
            raise ImageError(f"no Debian architecture for {self}")
        return table[key]

    @property
    def binfmt(self) -> str:
        """The binfmt_misc entry (from qemu-user-static) that runs this platform's binaries."""
        return {"arm": "qemu-arm", "arm64": "qemu-aarch64", "amd64": "qemu-x86_64",
                "386": "qemu-i386"}.get(self.arch, f"qemu-{self.arch}")

    def matches(self, os_: str, arch: str, variant: str | None) -> bool:
        """Does an image recording (os, arch, variant) run as this platform?

        Strict on os and architecture; the variant must match, except that arm64 images may
        record 'v8' or nothing. An arm image without a variant is refused for arm/v7 (it may be
        an armv6 build)."""
        variant = variant or ""
        if (os_ or "linux") != self.os or arch != self.arch:
            return False
        if self.arch == "arm64":
            return variant in ("", "v8")
        return variant == self.variant

    def describe(self, info: dict[str, Any]) -> str:
        """'linux/arm/v7' for an image inspect dict (what it records)."""
        return str(Platform(info.get("Os") or "linux", info.get("Architecture") or "?",
                            info.get("Variant") or ""))


def image_matches(platform: Platform, info: dict[str, Any]) -> bool:
    """Does a `docker image inspect` entry record `platform`?"""
    return platform.matches(info.get("Os", ""), info.get("Architecture", ""), info.get("Variant"))


# ---------------------------------------------------------------------------------------------
# Small Docker CLI helpers (local engine)


def _run(cmd: list[str], *, what: str, env: dict[str, str] | None = None, capture: bool = True,
         cwd: Path | None = None, input_: bytes | None = None,
         hint: str = "") -> subprocess.CompletedProcess[bytes]:
    """Run a command; ImageError with the tail of its output when it fails."""
    try:
        res = subprocess.run(cmd, env={**os.environ, **(env or {})}, cwd=cwd, input=input_,
                             stdout=subprocess.PIPE if capture else None,
                             stderr=subprocess.PIPE if capture else None)
    except FileNotFoundError:
        raise ImageError(f"{what}: {cmd[0]} is not installed"
                         + (f" ({hint})" if hint else "")) from None
    if res.returncode != 0:
        out = ((res.stderr or b"") + (res.stdout or b"")).decode(errors="replace")
        tail = "\n".join(f"  | {line}" for line in out.strip().splitlines()[-15:])
        raise ImageError(f"{what} failed (exit {res.returncode}): {shlex.join(cmd)}"
                         + (f"\n{tail}" if tail else "") + (f"\n  what to do: {hint}" if hint
                                                            else ""))
    return res


def docker_available() -> bool:
    """Is a Docker engine answering the local docker CLI?"""
    try:
        return subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                              capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def local_image(ref: str) -> dict[str, Any] | None:
    """`docker image inspect ref` of the local engine, or None when there is no such image."""
    res = subprocess.run(["docker", "image", "inspect", ref], capture_output=True)
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace")
        if "No such image" in err or "no such image" in err:
            return None
        raise ImageError(f"docker image inspect {ref} failed: {err.strip()}")
    data = json.loads(res.stdout)
    return data[0] if data else None


def verify_local(ref: str, platform: Platform) -> dict[str, Any]:
    """The local image `ref`, which must record `platform` (ImageError otherwise)."""
    info = local_image(ref)
    if info is None:
        raise ImageError(f"{ref} is not in the local Docker engine after the build/pull")
    if not image_matches(platform, info):
        raise ImageError(
            f"{ref} records {platform.describe(info)}, not {platform}: a node would refuse it "
            "(\"unsupported platform\"). A FROM image of the wrong platform is the usual cause "
            "(the legacy builder takes a local base whatever its platform)")
    return info


def daemon_platform() -> Platform:
    """The platform the local Docker engine runs natively."""
    out = _run(["docker", "version", "--format", "{{.Server.Os}}/{{.Server.Arch}}"],
               what="asking the Docker engine its platform",
               hint="is the Docker engine running (docker info)?").stdout.decode().strip()
    p = Platform.parse(out)
    return Platform(p.os, p.arch, "v7") if p.arch == "arm" else p


def _daemon_is_local() -> bool:
    host = os.environ.get("DOCKER_HOST", "")
    return not host or host.startswith("unix://")


# ---------------------------------------------------------------------------------------------
# QEMU user emulation (binfmt_misc)


def ensure_emulation(target: Platform, *, native: Platform | None = None,
                     binfmt_dir: Path = BINFMT_DIR) -> str:
    """Make sure the local engine can run `target` binaries; returns how (for the log).

    Foreign platforms need QEMU registered with binfmt_misc with the F flag (the interpreter is
    opened at registration, so it also works inside build containers). Mounts binfmt_misc and
    enables the qemu-user-static entry when needed; ImageError naming the missing package when
    that is impossible."""
    native = native or daemon_platform()
    if native.arch == target.arch:
        return "native"
    if native.arch == "arm64" and target.arch == "arm":
        return "native (an arm64 kernel runs 32-bit arm)"
    if not _daemon_is_local():
        return f"not checked: the Docker engine is remote ({os.environ.get('DOCKER_HOST')})"
    name = target.binfmt
    entry = binfmt_dir / name
    if not (binfmt_dir / "status").exists():
        if os.geteuid() != 0:
            raise ImageError(f"binfmt_misc is not mounted at {binfmt_dir}; as root run "
                             f"`mount -t binfmt_misc binfmt_misc {binfmt_dir}`")
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt_dir)],
             what="mounting binfmt_misc",
             hint="the kernel needs CONFIG_BINFMT_MISC to emulate other architectures")
    state = _binfmt_state(entry)
    if state is None or not state[0]:
        if shutil.which("update-binfmts") is None:
            raise ImageError(f"{target} needs QEMU user emulation ({name}), and update-binfmts "
                             "is missing: install the packages qemu-user-static and "
                             "binfmt-support (apt install qemu-user-static binfmt-support)")
        if not Path("/usr/share/binfmts", name).exists() and state is None:
            raise ImageError(f"{target} needs QEMU user emulation: no {name} binfmt definition "
                             "(/usr/share/binfmts/{name}); install the package qemu-user-static "
                             "(apt install qemu-user-static)")
        if os.geteuid() != 0:
            raise ImageError(f"{name} is not registered with binfmt_misc; as root run "
                             f"`update-binfmts --enable {name}`")
        _run(["update-binfmts", "--enable", name], what=f"registering {name} with binfmt_misc",
             hint="install qemu-user-static and binfmt-support")
        state = _binfmt_state(entry)
    if state is None or not state[0]:
        raise ImageError(f"{name} is still not enabled in {binfmt_dir} after update-binfmts; "
                         "check `update-binfmts --display " + name + "`")
    if "F" not in state[1]:
        raise ImageError(
            f"{name} is registered without the F (fix-binary) flag, so build containers cannot "
            f"find its interpreter: re-register it with F (Debian's qemu-user-static does: "
            f"`update-binfmts --disable {name} && echo -1 > {entry} && "
            f"update-binfmts --enable {name}`)")
    return f"QEMU ({name}, flags {state[1]})"


def _binfmt_state(entry: Path) -> tuple[bool, str] | None:
    """(enabled, flags) of a binfmt_misc entry, None when it is not registered."""
    try:
        text = entry.read_text()
    except OSError:
        return None
    lines = text.splitlines()
    flags = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("flags:")),
                 "")
    return (bool(lines) and lines[0].strip() == "enabled", flags)


