"""Images: make every image of the stack exist for the cluster's platform, then put it on the nodes.

    doit images            pull or build each image, check its platform, save BUILD/images/<svc>.tar
    doit base-image        the local Debian base the Dockerfiles start FROM (made when missing)
    doit buildx            fetch the buildx builder (Debian trixie's docker-buildx) into BUILD/tools
    doit preload-images    load what each node lacks, all nodes in parallel (preload-images:pi1 ...)

Building (`images:<service>`), in this order:
1. The context's executable `prepare` (if any) runs on this machine with the context as cwd
   (downloads wheels...; it must be idempotent). It gets HASWARM_PLATFORM=<platform>.
2. `FROM` resolution. Without a registry, `FROM debian:bookworm` must exist locally *for the
   target platform*, but one tag names one image in a classic Docker engine: the amd64
   `debian:bookworm` and an armhf one cannot share it. Measured on dockerd 20.10: the legacy
   builder with `--platform linux/arm/v7` silently builds FROM the amd64 image (and yields an
   amd64 image); BuildKit refuses the mismatch and goes to the registry; BuildKit's named
   contexts (`--build-context debian:bookworm=docker-image://...`) are refused by the engine's
   built-in BuildKit 0.8. So `base-image` makes (mmdebstrap + `docker load`, correct
   architecture/variant recorded) a per-platform tag such as `haswarm/debian:bookworm-armhf`, and
   the build uses a copy of the Dockerfile whose `FROM debian:bookworm` lines (or `ARG` defaults
   feeding a `FROM ${VAR}`) name that tag. A local `debian:bookworm` that already matches the
   platform is used as it is; an image the project cannot bootstrap is left to the builder (pull).
3. `docker buildx build --platform P --load` (docker driver) when buildx can be had, else the
   legacy builder (`DOCKER_BUILDKIT=0 docker build --platform P`); both build arm/v7 and arm64
   under QEMU (binfmt is checked and registered first). HASWARM_BUILDER=legacy|buildx forces one.
4. The image's recorded OS/architecture/variant must match the platform, then
   `docker save REPO:TAG` (tag kept) writes the tarball; `<service>.json` records the image ID
   and layers, and `images:manifest` gathers them into `manifest.json` for the preload.
Pulled images: `docker pull --platform P` (a matching local image is used when no registry
answers), then steps 4.

Up to date: a built image while its context files (as git sees them: tracked or untracked but not
ignored, so the `prepare` downloads do not count: they are a function of the tracked pins) and the
resolved base are unchanged and its pin/platform are the same; a pulled one while its pin and
platform are the same. Nothing here talks to Docker or SSH while tasks are loaded.

Preload: per node one `docker image inspect` over SSH gives the facts (tags, image IDs, layer
chains); only what is missing is sent: a tag whose image is there is just re-tagged; a missing
image goes as one `docker load` stream built on the fly from the saved tarballs (through the
remote layer's Docker client, nothing is copied to the node's disk first), leaving out every
layer the node already holds (the Debian base is sent once, not once per image). After loading,
the facts are read again: tag, image ID and platform must match. Nodes run in parallel threads
(`Remote.on_all`), one progress line each; a failed node is named with its reason after the
others finished. Up to date: each preload task stamps build/state/<task>.json (tasks.state) once
every node checked out, and runs again when manifest.json, the nodes or the platform change;
`doit -a preload-images` checks the nodes again (a node holding everything then prints
"pi1: 3 images already present, nothing sent").
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from doit.exceptions import TaskFailed
from doit.tools import config_changed

from tasks.config import PROJECT_ROOT, Cluster, Image, Node, current

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


class ImageError(Exception):
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


# ---------------------------------------------------------------------------------------------
# Dockerfile FROM lines


@dataclass(frozen=True)
class FromLine:
    """One FROM instruction: where it is and what it names."""

    index: int  # instruction number (0-based) among the Dockerfile's logical lines
    ref: str  # as written, e.g. 'debian:bookworm' or '${BASE}'
    resolved: str  # after substituting global ARG defaults
    variable: str | None  # 'BASE' when ref is exactly $BASE / ${BASE}
    platform_flag: str | None  # --platform=... when given (left alone)
    stage: str | None  # AS name


_ARG_RE = re.compile(r"^ARG\s+([A-Za-z_][A-Za-z0-9_]*)(?:=(\S*))?\s*$", re.I)
_FROM_RE = re.compile(r"^FROM\s+(?:--platform=(\S+)\s+)?(\S+)(?:\s+AS\s+(\S+))?\s*$", re.I)
_VAR_RE = re.compile(r"^\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))$")


def logical_lines(text: str) -> list[str]:
    """The Dockerfile's instructions: comments dropped, continuation lines joined."""
    out: list[str] = []
    cur = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not cur and (not line or line.startswith("#")):
            continue
        if cur and line.startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        if cur.strip():
            out.append(cur.strip())
        cur = ""
    if cur.strip():
        out.append(cur.strip())
    return out


def _strip_quotes(v: str) -> str:
    return v[1:-1] if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"" else v


def parse_froms(text: str) -> list[FromLine]:
    """Every FROM of a Dockerfile, with global ARG defaults substituted."""
    args: dict[str, str] = {}
    froms: list[FromLine] = []
    stages: set[str] = set()
    for i, line in enumerate(logical_lines(text)):
        m = _ARG_RE.match(line)
        if m and not froms:
            args[m[1]] = _strip_quotes(m[2] or "")
            continue
        m = _FROM_RE.match(line)
        if not m:
            continue
        ref = m[2]
        var = _VAR_RE.match(ref)
        variable = (var[1] or var[2]) if var else None

        def sub(mm: re.Match[str]) -> str:
            return args.get(mm[1] or mm[2], "")

        resolved = re.sub(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))", sub, ref)
        froms.append(FromLine(i, ref, resolved, variable, m[1], m[3]))
        if m[3]:
            stages.add(m[3].lower())
    # A FROM naming an earlier stage is not an image.
    return [f for f in froms if f.resolved.lower() not in stages]


def base_refs(text: str) -> list[str]:
    """The images a Dockerfile builds FROM for the target platform (no stages, no scratch, no
    `--platform=` lines), in order, without repeats."""
    refs = [f.resolved for f in parse_froms(text)
            if f.platform_flag is None and f.resolved and f.resolved != "scratch"]
    return list(dict.fromkeys(refs))


def rewrite_froms(text: str, mapping: dict[str, str]) -> tuple[str | None, dict[str, str]]:
    """Apply `mapping` (base ref -> local tag) to a Dockerfile.

    Returns (new Dockerfile text or None when no literal FROM changed, build args): a literal
    `FROM debian:bookworm` is rewritten in the text; a `FROM ${VAR}` whose global ARG default is
    a mapped ref gets `--build-arg VAR=tag` instead (the text stays as it is). `--platform=`
    lines are left alone (they name another platform on purpose)."""
    froms = parse_froms(text)
    build_args: dict[str, str] = {}
    literal: dict[int, tuple[str, str]] = {}
    for f in froms:
        if f.platform_flag is not None or f.resolved not in mapping:
            continue
        if mapping[f.resolved] == f.resolved:
            continue
        if f.variable:
            build_args[f.variable] = mapping[f.resolved]
        elif "$" not in f.ref:
            literal[f.index] = (f.ref, mapping[f.resolved])
    if not literal:
        return None, build_args
    # Rewrite on the raw text: find each FROM instruction again by counting logical lines.
    out: list[str] = []
    index = -1
    cont = False
    for raw in text.splitlines(keepends=True):
        line = raw.strip()
        starts = not cont and line and not line.startswith("#")
        if starts:
            index += 1
        if starts and index in literal:
            old, new = literal[index]
            raw = re.sub(rf"(?i)^(\s*FROM\s+(?:--platform=\S+\s+)?){re.escape(old)}(?=\s|$)",
                         lambda m, new=new: m[1] + new, raw, count=1)
        if not (cont and line.startswith("#")):
            cont = line.endswith("\\")
        out.append(raw)
    return "".join(out), build_args


# ---------------------------------------------------------------------------------------------
# Base images: Debian made locally with mmdebstrap


def normalize_ref(ref: str) -> str:
    """'docker.io/library/debian:bookworm' -> 'debian:bookworm' (how the engine shows tags)."""
    for prefix in ("docker.io/library/", "index.docker.io/library/", "docker.io/", "library/"):
        if ref.startswith(prefix):
            return ref[len(prefix):]
    return ref


def bootstrap_suite(ref: str) -> str | None:
    """The Debian suite `ref` names when the project can make it locally (debian:<codename>
    and debian:<codename>-slim), else None."""
    m = re.fullmatch(r"debian:([a-z]+)(?:-slim)?", normalize_ref(ref))
    if not m or m[1] in ("latest", "stable", "testing", "unstable", "sid"):
        return None
    return m[1]


def base_tag(suite: str, platform: Platform) -> str:
    """The local tag of a bootstrapped base, one per platform: haswarm/debian:bookworm-armhf."""
    return f"{BASE_REPOSITORY}:{suite}-{platform.debian_arch}"


@dataclass(frozen=True)
class BaseChoice:
    """How a Dockerfile's FROM ref is satisfied for the target platform."""

    ref: str
    use: str  # the tag the build uses (== ref when no rewrite is needed)
    id: str | None  # image ID (None: left to the builder, which pulls)
    how: str  # 'local', 'bootstrapped', 'pull'

    def as_dict(self) -> dict[str, Any]:
        return {"use": self.use, "id": self.id, "how": self.how}


def ensure_base(ref: str, platform: Platform, cache_dir: Path,
                log: Callable[[str], None] = print) -> BaseChoice:
    """Satisfy `FROM ref` for `platform` with local images only (when the project can).

    1. the local `ref` already records the platform: used as it is;
    2. a Debian ref: `haswarm/debian:<suite>-<arch>` (made from a cached mmdebstrap rootfs in
       `cache_dir`, bootstrapped when that is missing too);
    3. anything else: left to the builder (it pulls)."""
    info = local_image(ref)
    if info and image_matches(platform, info):
        return BaseChoice(ref, ref, info["Id"], "local")
    suite = bootstrap_suite(ref)
    if suite is None:
        return BaseChoice(ref, ref, None, "pull")
    tag = base_tag(suite, platform)
    info = local_image(tag)
    if info and image_matches(platform, info):
        return BaseChoice(ref, tag, info["Id"], "local")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / ".lock"):
        info = local_image(tag)  # another process may have made it meanwhile
        if not (info and image_matches(platform, info)):
            rootfs = cache_dir / f"debian-{suite}-{platform.debian_arch}.rootfs.tar"
            if not rootfs.exists():
                bootstrap_rootfs(suite, platform, rootfs, log=log)
            t0 = time.monotonic()
            image_id = load_rootfs(rootfs, tag, platform, suite)
            log(f"base: loaded {tag} ({image_id[:19]}) in {time.monotonic() - t0:.1f} s")
            info = local_image(tag)
        if not info or not image_matches(platform, info):
            got = platform.describe(info) if info else "nothing"
            raise ImageError(f"{tag} should record {platform} but records {got}")
    return BaseChoice(ref, tag, info["Id"], "bootstrapped")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def bootstrap_rootfs(suite: str, platform: Platform, out: Path,
                     log: Callable[[str], None] = print) -> None:
    """mmdebstrap a minbase Debian `suite` for `platform` into the tarball `out` (as root).

    A foreign architecture runs its maintainer scripts under QEMU (armhf: 74 s on an idle
    2-core machine, 150-475 s measured while other builds ran). The mirror is named explicitly
    (without it the security suite once failed)."""
    if shutil.which("mmdebstrap") is None:
        raise ImageError(f"cannot make debian:{suite} for {platform} without a registry: "
                         "install mmdebstrap (apt install mmdebstrap)")
    native = daemon_platform() if shutil.which("docker") else Platform("linux", "amd64")
    # --format: the output name ends in .part, which would make mmdebstrap pick a directory.
    cmd = ["mmdebstrap", "--variant=minbase", "--format=tar", f"--arch={platform.debian_arch}",
           "--aptopt=Acquire::Retries \"3\"", "--aptopt=APT::Sandbox::User \"root\"",
           "--dpkgopt=force-unsafe-io"]
    if platform.arch != native.arch:
        log(f"base: emulation for {platform}: {ensure_emulation(platform, native=native)}")
        if shutil.which("arch-test") is None:
            # mmdebstrap's own check needs the arch-test package; binfmt was checked above.
            cmd.append("--skip=check/qemu")
    tmp = out.with_name(out.name + ".part")
    cmd += [suite, str(tmp), f"deb {DEBIAN_MIRROR} {suite} main"]
    took = "1-3 min under QEMU, more on a busy machine" if platform.arch != native.arch else "~20 s"
    log(f"base: bootstrapping Debian {suite} {platform.debian_arch} (mmdebstrap, {took})")
    t0 = time.monotonic()
    try:
        _run(cmd, what=f"mmdebstrap {suite} {platform.debian_arch}", capture=False,
             hint="mmdebstrap needs root (or unprivileged user namespaces) and Debian's mirror")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    log(f"base: rootfs {out.name} ({out.stat().st_size / 1e6:.0f} MB) in "
        f"{time.monotonic() - t0:.0f} s")


def load_rootfs(rootfs: Path, tag: str, platform: Platform, suite: str) -> str:
    """Load a rootfs tarball as a one-layer image `tag` recording `platform`; its image ID.

    Instead of `docker import` (dockerd 20.10 records amd64 for `--platform linux/arm/v7`) the
    engine gets a `docker save`-format stream with a hand-made config: architecture and variant
    are right from the start and the ID is stable for the same rootfs."""
    digest = hashlib.sha256()
    with open(rootfs, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    diff_id = "sha256:" + digest.hexdigest()
    created = datetime.fromtimestamp(rootfs.stat().st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    config: dict[str, Any] = {
        "architecture": platform.arch, "os": platform.os,
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["bash"]},
        "created": created,
        "history": [{"created": created,
                     "created_by": f"mmdebstrap --variant=minbase --arch={platform.debian_arch} "
                                   f"{suite} {DEBIAN_MIRROR}"}],
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    if platform.variant:
        config["variant"] = platform.variant
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    image_id = hashlib.sha256(config_bytes).hexdigest()
    layer = f"{digest.hexdigest()}/layer.tar"
    manifest = json.dumps([{"Config": f"{image_id}.json", "RepoTags": [tag],
                            "Layers": [layer]}]).encode()
    entries = [TarEntry.file(layer, rootfs), TarEntry.data(f"{image_id}.json", config_bytes),
               TarEntry.data("manifest.json", manifest)]
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(["docker", "load"], stdin=subprocess.PIPE, stdout=output,
                                stderr=subprocess.STDOUT)
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # the engine gave up: its message says why
            for block in tar_stream(entries):
                proc.stdin.write(block)
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        proc.wait()
        output.seek(0)
        said = output.read().decode(errors="replace").strip()
    if proc.returncode != 0:
        raise ImageError(f"docker load of {rootfs.name} as {tag} failed: {said}")
    return "sha256:" + image_id


# ---------------------------------------------------------------------------------------------
# tar streams (docker load input) without temporary files


@dataclass(frozen=True)
class TarEntry:
    """A regular file of a tar stream: name, size and how to open its content."""

    name: str
    size: int
    open: Callable[[], IO[bytes]]

    @classmethod
    def data(cls, name: str, content: bytes) -> TarEntry:
        return cls(name, len(content), lambda: io.BytesIO(content))

    @classmethod
    def file(cls, name: str, path: Path) -> TarEntry:
        return cls(name, path.stat().st_size, lambda: open(path, "rb"))


def tar_stream(entries: Iterable[TarEntry], chunk: int = CHUNK) -> Iterator[bytes]:
    """The bytes of an uncompressed tar archive holding `entries`, produced as it is read."""
    for e in entries:
        info = tarfile.TarInfo(e.name)
        info.size = e.size
        info.mode = 0o644
        info.mtime = 0
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        remaining = e.size
        with e.open() as f:
            while remaining:
                block = f.read(min(chunk, remaining))
                if not block:
                    raise ImageError(f"{e.name} ended {remaining} bytes early")
                remaining -= len(block)
                yield block
        if e.size % 512:
            yield b"\0" * (512 - e.size % 512)
    yield b"\0" * 1024


# ---------------------------------------------------------------------------------------------
# buildx


def fetch_buildx(dest: Path, log: Callable[[str], None] = print) -> Path:
    """Fetch Debian trixie's docker-buildx package with apt and put its binary at `dest`.

    The host's apt configuration is not changed: `apt-get update`/`download` run with a
    temporary source list, list directory and cache (Debian bookworm has no buildx package)."""
    for tool, pkg in (("apt-get", "apt"), ("dpkg-deb", "dpkg")):
        if shutil.which(tool) is None:
            raise ImageError(f"fetching buildx needs {tool} (package {pkg}): this is not Debian")
    if not BUILDX_KEYRING.exists():
        raise ImageError(f"fetching buildx needs {BUILDX_KEYRING} (package "
                         "debian-archive-keyring)")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="haswarm-buildx-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "lists" / "partial").mkdir(parents=True)
        (tmp / "cache" / "archives" / "partial").mkdir(parents=True)
        sources = tmp / "sources.list"
        sources.write_text(f"deb [signed-by={BUILDX_KEYRING}] {DEBIAN_MIRROR} {BUILDX_SUITE} "
                           "main\n")
        opts = ["-o", f"Dir::Etc::sourcelist={sources}", "-o", "Dir::Etc::sourceparts=-",
                "-o", f"Dir::State::Lists={tmp / 'lists'}", "-o", f"Dir::Cache={tmp / 'cache'}",
                "-o", "APT::Sandbox::User=root", "-o", "Acquire::Retries=3", "-qq"]
        _run(["apt-get", "update", *opts], what=f"apt-get update ({BUILDX_SUITE} only)",
             hint=f"{DEBIAN_MIRROR} must be reachable")
        _run(["apt-get", "download", *opts, BUILDX_PACKAGE], cwd=tmp,
             what=f"apt-get download {BUILDX_PACKAGE} ({BUILDX_SUITE})")
        debs = sorted(tmp.glob(f"{BUILDX_PACKAGE}_*.deb"))
        if not debs:
            raise ImageError(f"apt-get download left no {BUILDX_PACKAGE} package")
        _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "x")], what="unpacking docker-buildx")
        binary = tmp / "x" / "usr" / "libexec" / "docker" / "cli-plugins" / "docker-buildx"
        if not binary.exists():
            raise ImageError(f"{debs[0].name} holds no usr/libexec/docker/cli-plugins/"
                             "docker-buildx")
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        shutil.copy2(binary, part)
        part.chmod(0o755)
        os.replace(part, dest)
        log(f"buildx: {debs[0].name} -> {dest} ({time.monotonic() - t0:.1f} s)")
    return dest


def _buildx_works(cmd: list[str]) -> bool:
    try:
        res = subprocess.run([*cmd, "version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0 and b"buildx" in res.stdout


def buildx_command(tools_dir: Path, *, fetch: bool = True,
                   log: Callable[[str], None] = print) -> list[str] | None:
    """The command that runs buildx (`docker buildx`, or the fetched binary standalone), or
    None for the legacy builder (HASWARM_BUILDER=legacy, or buildx unavailable: noted).

    The fetched binary stays in the project's build directory and runs standalone: the user's
    `docker build` is not switched to BuildKit behind their back. To use it as `docker buildx`,
    copy it to ~/.docker/cli-plugins/docker-buildx."""
    choice = os.environ.get(BUILDER_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "buildx", "legacy"):
        raise ImageError(f"{BUILDER_ENV}={choice!r}: use auto, buildx or legacy")
    if choice == "legacy":
        return None
    if _buildx_works(["docker", "buildx"]):
        return ["docker", "buildx"]
    local = tools_dir / "docker-buildx"
    if local.exists() and _buildx_works([str(local)]):
        return [str(local)]
    if fetch:
        try:
            fetch_buildx(local, log=log)
            if _buildx_works([str(local)]):
                return [str(local)]
            raise ImageError(f"{local} does not run")
        except ImageError as e:
            if choice == "buildx":
                raise
            log(f"buildx unavailable, using the legacy builder (DOCKER_BUILDKIT=0): {e}")
            return None
    if choice == "buildx":
        raise ImageError("buildx is not available (run `doit buildx`)")
    return None


# ---------------------------------------------------------------------------------------------
# The images of a cluster, paths


def stack_images(c: Cluster) -> dict[str, Image]:
    """service -> Image for every image the stack runs (portainer only when enabled)."""
    out: dict[str, Image] = {}
    for service in SERVICES:
        img = getattr(c.images, service)
        if img is None or (service.startswith("portainer") and not c.portainer.enabled):
            continue
        out[service] = img
    return out


def images_dir(c: Cluster) -> Path:
    """BUILD_DIR/images: tarballs, records, manifest.json, base.json."""
    return (PROJECT_ROOT / c.build_dir / "images").resolve()


def manifest_path(c: Cluster) -> Path:
    """The manifest the preload reads: service -> {image, id, platform, tar, layers}."""
    return images_dir(c) / "manifest.json"


def tools_dir(c: Cluster) -> Path:
    """Where fetched tools (docker-buildx) live."""
    return (PROJECT_ROOT / c.build_dir / "tools").resolve()


def context_dir(img: Image) -> Path:
    """The absolute build context of an image with `build`."""
    assert img.build is not None
    return (PROJECT_ROOT / img.build).resolve()


def context_files(ctx: Path) -> list[Path]:
    """The files of a build context that make the image: what git sees there (tracked, or
    untracked but not ignored), so downloads `prepare` writes to git-ignored directories do
    not count. Outside a git work tree: every file but those under a directory named in the
    context's .gitignore. Cheap: one `git ls-files`, no Docker."""
    if not ctx.is_dir():
        return []
    try:
        res = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard", "--",
                              "."], cwd=ctx, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        res = None
    if res is not None and res.returncode == 0:
        names = [n for n in res.stdout.decode().split("\0") if n]
        return sorted(p for p in (ctx / n for n in names) if p.is_file())
    ignored: set[str] = set()
    gi = ctx / ".gitignore"
    if gi.exists():
        for line in gi.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                ignored.add(line.strip("/"))
    files: list[Path] = []
    for root, dirs, names in os.walk(ctx):
        rel = Path(root).relative_to(ctx)
        dirs[:] = [d for d in dirs if str(rel / d) not in ignored and d not in ignored]
        files += [Path(root) / n for n in names if n not in ignored]
    return sorted(files)


# ---------------------------------------------------------------------------------------------
# Actions: base, build, pull, verify, save, manifest


def _rel(path: Path) -> str:
    """`path` relative to the project root when it is below it (for messages)."""
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


def _write_if_changed(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def resolve_bases(c: Cluster, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Make the base of every build context exist locally for the platform (base.json)."""
    platform = Platform.parse(c.platform)
    refs: list[str] = []
    if any(img.build is not None for img in stack_images(c).values()):
        ensure_engine(c, log)
    for service, img in stack_images(c).items():
        if img.build is None:
            continue
        dockerfile = context_dir(img) / "Dockerfile"
        if not dockerfile.exists():
            log(f"base: {service}: no {dockerfile} yet (the build will fail)")
            continue
        refs += base_refs(dockerfile.read_text())
    bases: dict[str, Any] = {}
    for ref in dict.fromkeys(refs):
        choice = ensure_base(ref, platform, images_dir(c) / "base", log=log)
        bases[ref] = choice.as_dict()
        what = {"local": "local image", "bootstrapped": "bootstrapped",
                "pull": "not local: the builder pulls it"}[choice.how]
        log(f"base: FROM {ref} for {platform}: {choice.use} ({what})")
    data = {"platform": str(platform), "bases": bases}
    _write_if_changed(images_dir(c) / "base.json", data)
    return data


def local_bases(text: str, platform: Platform, cache_dir: Path,
                log: Callable[[str], None] = print) -> dict[str, str]:
    """FROM ref -> the image that satisfies it for `platform`, for every base a Dockerfile's text
    names: a local image, a Debian base bootstrapped into the engine when missing (rootfs cached
    in `cache_dir`), or the ref itself when only a registry can give it (the builder pulls)."""
    return {ref: ensure_base(ref, platform, cache_dir, log=log).use
            for ref in dict.fromkeys(base_refs(text))}


def build_context(ctx: Path, tag: str, platform: Platform, mapping: dict[str, str],
                  work_dir: Path, tools: Path, *, name: str | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the context `ctx` as `tag` for `platform`, its FROM refs replaced as `mapping` says
    (the rewritten Dockerfile goes to `work_dir/<name>.Dockerfile`), with buildx when it answers
    (fetched into `tools` when missing) else the legacy builder; the verified inspect dict.

    The one build path of the project: `doit images` and the image tests both come here, so a
    test never depends on a base image that only an earlier run left in the engine."""
    name = name or ctx.name
    dockerfile = ctx / "Dockerfile"
    if not dockerfile.exists():
        raise ImageError(f"{name}: {dockerfile} does not exist")
    new_text, build_args = rewrite_froms(dockerfile.read_text(), mapping)
    file_args: list[str] = []
    if new_text is not None:
        generated = work_dir / f"{name}.Dockerfile"
        generated.parent.mkdir(parents=True, exist_ok=True)
        generated.write_text(new_text)
        file_args = ["-f", str(generated)]
    arg_args = [a for k, v in build_args.items() for a in ("--build-arg", f"{k}={v}")]
    if new_text is not None or build_args:
        log(f"{name}: FROM resolved locally: "
            + ", ".join(f"{r} -> {u}" for r, u in mapping.items() if r != u))
    native = daemon_platform()
    if native.arch != platform.arch:
        log(f"{name}: emulation for {platform}: {ensure_emulation(platform, native=native)}")
    bx = buildx_command(tools, log=log)
    t0 = time.monotonic()
    if bx is not None:
        cmd = [*bx, "build", "--platform", str(platform), "--load", "--progress", "plain",
               "-t", tag, *file_args, *arg_args, str(ctx)]
        env: dict[str, str] = {}
        builder = "buildx"
    else:
        cmd = ["docker", "build", "--platform", str(platform), "-t", tag, *file_args,
               *arg_args, str(ctx)]
        env = {"DOCKER_BUILDKIT": "0"}
        builder = "legacy builder"
    log(f"{name}: building {tag} for {platform} with {builder}: {shlex.join(cmd)}")
    _run(cmd, env=env, capture=False, what=f"{name}: build of {tag}")
    info = verify_local(tag, platform)
    log(f"{name}: built {tag} ({info['Id'][:19]}, {platform}) with {builder} in "
        f"{time.monotonic() - t0:.1f} s")
    return info


def run_prepare(ctx: Path, platform: Platform, name: str,
                log: Callable[[str], None] = print) -> bool:
    """Run the context's executable `prepare` (fetches what the build copies in), if it has one;
    whether it had one."""
    prepare = ctx / "prepare"
    if not (prepare.exists() and os.access(prepare, os.X_OK)):
        return False
    log(f"{name}: running {_rel(prepare)}")
    _run([str(prepare)], cwd=ctx, capture=False, what=f"{name}: prepare",
         env={"HASWARM_PLATFORM": str(platform)})
    return True


def build_image(c: Cluster, service: str, img: Image,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """prepare + build `img` for the cluster platform on the bases base.json chose; the
    verified inspect dict."""
    platform = Platform.parse(c.platform)
    ctx = context_dir(img)
    if not (ctx / "Dockerfile").exists():
        raise ImageError(f"{service}: {ctx / 'Dockerfile'} does not exist")
    run_prepare(ctx, platform, service, log=log)
    base_file = images_dir(c) / "base.json"
    bases = json.loads(base_file.read_text())["bases"] if base_file.exists() else {}
    mapping = {ref: b["use"] for ref, b in bases.items()}
    return build_context(ctx, img.image, platform, mapping, images_dir(c), tools_dir(c),
                         name=service, log=log)


def pull_image(c: Cluster, service: str, img: Image,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """`docker pull --platform` (a matching local image is kept when no registry answers)."""
    platform = Platform.parse(c.platform)
    t0 = time.monotonic()
    try:
        _run(["docker", "pull", "--platform", str(platform), img.image],
             what=f"{service}: docker pull {img.image}",
             hint="the registry must be reachable (or the image present locally)")
    except ImageError as e:
        info = local_image(img.image)
        if info and image_matches(platform, info):
            log(f"{service}: pull failed, using the local {img.image} ({info['Id'][:19]}): "
                f"{str(e).splitlines()[-1].strip()}")
            return info
        raise
    info = verify_local(img.image, platform)
    log(f"{service}: pulled {img.image} ({info['Id'][:19]}, {platform}) in "
        f"{time.monotonic() - t0:.1f} s")
    return info


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


def save_image(c: Cluster, service: str, img: Image, info: dict[str, Any],
               how: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`docker save REPO:TAG` (the tag is kept) to BUILD/images/<service>.tar + its record."""
    out = images_dir(c)
    out.mkdir(parents=True, exist_ok=True)
    tar = out / f"{service}.tar"
    part = tar.with_name(tar.name + ".part")
    t0 = time.monotonic()
    try:
        _run(["docker", "save", "-o", str(part), img.image], what=f"docker save {img.image}")
        os.replace(part, tar)
    finally:
        part.unlink(missing_ok=True)
    record = {"image": img.image, "id": info["Id"], "platform": c.platform, "tar": tar.name,
              "layers": list(info.get("RootFS", {}).get("Layers") or []), "how": how,
              "size": tar.stat().st_size}
    _write_if_changed(out / f"{service}.json", record)
    log(f"{service}: saved {_rel(tar)} ({record['size'] / 1e6:.0f} MB) in "
        f"{time.monotonic() - t0:.1f} s")
    return record


def ensure_engine(c: Cluster, log: Callable[[str], None] = print) -> None:
    """A Docker engine must answer on this machine (for the lab, `doit lab-engine` starts one
    first: dodo.py makes the image tasks depend on it)."""
    if docker_available():
        return
    raise ImageError("no Docker engine answers the docker CLI on this machine: install Docker "
                     "(apt install docker.io) and start it, or set DOCKER_HOST"
                     + (" (for the lab: doit lab-engine)" if c.lab else ""))


def make_image(c: Cluster, service: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build or pull one service's image, verify its platform, save it: its record."""
    ensure_engine(c, log)
    img = stack_images(c)[service]
    if img.build is not None:
        info = build_image(c, service, img, log=log)
        how = "built"
    else:
        info = pull_image(c, service, img, log=log)
        how = "pulled"
    return save_image(c, service, img, info, how, log=log)


def write_manifest(c: Cluster) -> dict[str, Any]:
    """Gather every service's record into manifest.json."""
    out = images_dir(c)
    manifest = {s: json.loads((out / f"{s}.json").read_text()) for s in stack_images(c)}
    _write_if_changed(manifest_path(c), manifest)
    return manifest


def step(fn: Callable[..., Any], *args: Any) -> TaskFailed | None:
    """A doit python-action: fn(*args); an ImageError/RemoteError becomes a TaskFailed with the
    user message (no traceback). Used as `(step, [fn, *args])`: module-level functions only, so
    tasks stay picklable for `doit -n N`."""
    from tasks.remote import RemoteError

    try:
        fn(*args)
    except (ImageError, RemoteError) as e:
        return TaskFailed(str(e))
    return None


def fetch_buildx_action(dest: Path) -> TaskFailed | None:
    """doit action of `buildx`: fetch the binary unless `docker buildx` works already."""
    if _buildx_works(["docker", "buildx"]):
        print("buildx: `docker buildx` is installed already")
        return None
    try:
        fetch_buildx(dest)
    except ImageError as e:
        return TaskFailed(f"{e}\n(the images are then built with the legacy builder)")
    return None


# ---------------------------------------------------------------------------------------------
# Preload: facts, plan, stream


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The layer chain IDs of an image's diff IDs (how an engine names a layer with its
    parents): chain[0] = diff[0], chain[i] = sha256(chain[i-1] + ' ' + diff[i])."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else
                   "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


@dataclass(frozen=True)
class Wanted:
    """One image a node must hold (from manifest.json)."""

    service: str
    ref: str
    id: str
    platform: str
    layers: tuple[str, ...]
    tar: Path


@dataclass
class NodeFacts:
    """What a node's engine holds: tag -> image ID, image ID -> its inspect entry, and every
    layer chain ID of every image."""

    tags: dict[str, str] = field(default_factory=dict)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    chains: set[str] = field(default_factory=set)

    @classmethod
    def from_inspect(cls, entries: list[dict[str, Any]]) -> NodeFacts:
        facts = cls()
        for e in entries:
            facts.images[e["Id"]] = e
            for t in e.get("RepoTags") or []:
                facts.tags[normalize_ref(t)] = e["Id"]
            facts.chains.update(chain_ids(list((e.get("RootFS") or {}).get("Layers") or [])))
        return facts


@dataclass
class Plan:
    """What to do on one node: nothing for `present`, `docker tag` for `retag` (the image is
    there under another name), and one `docker load` for `load` carrying only the layers in
    `send_layers` ((service, index) pairs; the node has the others or gets them earlier in the
    same stream)."""

    present: list[Wanted] = field(default_factory=list)
    retag: list[Wanted] = field(default_factory=list)
    load: list[Wanted] = field(default_factory=list)
    send_layers: list[tuple[str, int]] = field(default_factory=list)
    skipped_layers: int = 0  # layers of loaded images the node holds already
    shared_layers: int = 0  # layers another image of the same stream brings

    @property
    def nothing_to_do(self) -> bool:
        return not self.retag and not self.load


def plan_node(wanted: list[Wanted], facts: NodeFacts) -> Plan:
    """Compare what a node has (facts) with what it needs (wanted): the cheapest way there."""
    plan = Plan()
    sending: set[str] = set()
    for w in wanted:
        ref = normalize_ref(w.ref)
        if facts.tags.get(ref) == w.id:
            plan.present.append(w)
        elif w.id in facts.images:
            plan.retag.append(w)
        else:
            plan.load.append(w)
            for i, chain in enumerate(chain_ids(list(w.layers))):
                if chain in facts.chains:
                    plan.skipped_layers += 1
                elif chain in sending:
                    plan.shared_layers += 1
                else:
                    plan.send_layers.append((w.service, i))
                    sending.add(chain)
    return plan


def check_node(wanted: list[Wanted], facts: NodeFacts) -> list[str]:
    """Problems left on a node after the preload (empty when every image is there, tagged and
    of the right platform)."""
    problems = []
    for w in wanted:
        got = facts.tags.get(normalize_ref(w.ref))
        if got is None:
            problems.append(f"{w.ref} is missing")
        elif got != w.id:
            problems.append(f"{w.ref} is {got[:19]}, not {w.id[:19]}")
        else:
            info = facts.images[got]
            plat = Platform.parse(w.platform)
            if not image_matches(plat, info):
                problems.append(f"{w.ref} records {plat.describe(info)}, not {w.platform}")
    return problems


def read_manifest(path: Path) -> list[Wanted]:
    """The images of manifest.json (tar paths relative to the manifest's directory)."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror}); run `doit images` first") from None
    return [Wanted(service, r["image"], r["id"], r["platform"], tuple(r.get("layers") or ()),
                   (path.parent / r["tar"]).resolve()) for service, r in data.items()]


class _SavedImage:
    """One `docker save` tarball: its manifest entry, config and layer members."""

    def __init__(self, path: Path):
        self.path = path
        self.tf = tarfile.open(path)
        members = {m.name.lstrip("./"): m for m in self.tf.getmembers()}
        self.members = members
        manifest = json.loads(self._read("manifest.json"))
        if len(manifest) != 1:
            raise ImageError(f"{path}: expected one image, found {len(manifest)}")
        self.config_name = manifest[0]["Config"]
        self.config = self._read(self.config_name)
        self.layer_names: list[str] = manifest[0]["Layers"]
        self.diff_ids: list[str] = json.loads(self.config)["rootfs"]["diff_ids"]

    def _read(self, name: str) -> bytes:
        f = self.tf.extractfile(self.members[name.lstrip("./")])
        if f is None:
            raise ImageError(f"{self.path}: {name} is not a file")
        return f.read()

    def layer_entry(self, index: int, name: str) -> TarEntry:
        member = self.members[self.layer_names[index].lstrip("./")]
        path, offset, size = self.path, member.offset_data, member.size

        def opener() -> IO[bytes]:
            fh = open(path, "rb")
            fh.seek(offset)
            return _Window(fh, size)

        return TarEntry(name, size, opener)

    def close(self) -> None:
        self.tf.close()


class _Window(io.RawIOBase):
    """A read-only window [offset, offset+size) of an open file (the file is already there)."""

    def __init__(self, fh: IO[bytes], size: int):
        self.fh, self.left = fh, size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.fh.read(n)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.fh.close()
        super().close()


def load_entries(plan: Plan, saved: dict[str, _SavedImage],
                 omit_present: bool = True) -> list[TarEntry]:
    """The members of one `docker load` stream for `plan.load`: configs, a manifest naming
    every image with its tag, and the layer tars (only `plan.send_layers` when `omit_present`;
    the engine skips reading a layer whose chain it already has)."""
    wanted_layers = set(plan.send_layers)
    entries: list[TarEntry] = []
    manifest = []
    written: set[str] = set()
    for w in plan.load:
        s = saved[w.service]
        if s.diff_ids != list(w.layers) and w.layers:
            raise ImageError(f"{s.path} does not hold {w.ref} {w.id[:19]} (rebuild: doit images)")
        names = []
        for i, chain in enumerate(chain_ids(s.diff_ids)):
            name = f"{chain.split(':', 1)[1]}/layer.tar"
            names.append(name)
            if name in written:
                continue
            if omit_present and (w.service, i) not in wanted_layers:
                continue
            entries.append(s.layer_entry(i, name))
            written.add(name)
        config_name = f"{w.id.split(':', 1)[1]}.json"
        if config_name not in written:
            entries.append(TarEntry.data(config_name, s.config))
            written.add(config_name)
        manifest.append({"Config": config_name, "RepoTags": [w.ref], "Layers": names})
    entries.append(TarEntry.data("manifest.json", json.dumps(manifest).encode()))
    return entries


@dataclass
class NodeReport:
    """The outcome of preloading one node."""

    node: str
    present: int = 0
    retagged: int = 0
    loaded: int = 0
    layers_sent: int = 0
    layers_skipped: int = 0
    bytes_sent: int = 0
    upload_seconds: float = 0.0  # until the last byte was handed to SSH (then the node unpacks)
    seconds: float = 0.0
    retried_full: bool = False


# One SSH round trip: every image's inspect entry (a failing engine fails the command).
FACTS_CMD = ("ids=$(docker image ls -a -q --no-trunc) || exit $?; "
             "ids=$(printf '%s\\n' $ids | sort -u); "
             "if [ -z \"$ids\" ]; then echo '[]'; else docker image inspect $ids; fi")


def node_facts(remote: Any, node: Node | str) -> NodeFacts:
    """The node's image facts (one SSH command)."""
    res = remote.run(node, "images: inspect", FACTS_CMD,
                     hint="is Docker installed and running on the node (docker info)?")
    try:
        return NodeFacts.from_inspect(json.loads(res.stdout))
    except (ValueError, KeyError) as e:
        raise ImageError(f"unexpected `docker image inspect` output on {node}: {e}") from None


def preload_node(remote: Any, node: Node, wanted: list[Wanted],
                 say: Callable[[str, str], None]) -> NodeReport:
    """Put every wanted image on `node`, sending only what it lacks; verify afterwards."""
    t0 = time.monotonic()
    rep = NodeReport(node.name)
    facts = node_facts(remote, node)
    plan = plan_node(wanted, facts)
    rep.present = len(plan.present)
    if plan.nothing_to_do:
        problems = check_node(wanted, facts)
        if problems:
            raise ImageError("; ".join(problems))
        rep.seconds = time.monotonic() - t0
        say(node.name, f"{len(wanted)} images already present, nothing sent")
        return rep
    for w in plan.retag:
        remote.run(node, "images: tag", f"docker tag {w.id} {shlex.quote(w.ref)}")
        rep.retagged += 1
    if plan.load:
        saved = {w.service: _SavedImage(w.tar) for w in plan.load}
        try:
            entries = load_entries(plan, saved)
            size = sum(e.size for e in entries)
            rep.layers_sent, rep.layers_skipped = len(plan.send_layers), plan.skipped_layers
            notes = [f"{rep.layers_sent} layer(s)"]
            if plan.skipped_layers:
                notes.append(f"{plan.skipped_layers} present already")
            if plan.shared_layers:
                notes.append(f"{plan.shared_layers} shared")
            say(node.name, f"sending {len(plan.load)} image(s): "
                f"{', '.join(w.ref for w in plan.load)} ({', '.join(notes)}, "
                f"{size / 1e6:.0f} MB)")
            try:
                _load(remote, node, entries, rep)
            except ImageError as e:
                if not plan.skipped_layers:  # nothing was left out: a retry would not help
                    raise
                say(node.name, f"load without the layers it has failed ({e}); sending the "
                    "complete images")
                rep.retried_full = True
                _load(remote, node, load_entries(plan, saved, False), rep)
            rep.loaded = len(plan.load)
        finally:
            for s in saved.values():
                s.close()
    facts = node_facts(remote, node)
    problems = check_node(wanted, facts)
    if problems:
        raise ImageError("after loading: " + "; ".join(problems))
    rep.seconds = time.monotonic() - t0
    done = [f"loaded {rep.loaded}"] + ([f"retagged {rep.retagged}"] if rep.retagged else [])
    say(node.name, f"{', '.join(done)}, {rep.bytes_sent / 1e6:.0f} MB sent in "
        f"{rep.seconds:.1f} s (upload {rep.upload_seconds:.1f} s); all {len(wanted)} images "
        f"present ({wanted[0].platform})")
    return rep


def _load(remote: Any, node: Node, entries: list[TarEntry], rep: NodeReport) -> None:
    """Stream a tar of `entries` into the node engine's `docker load` (through the remote
    layer's Docker client: no copy of the tarball lands on the node's disk first); counts the
    bytes and the upload time into `rep`."""
    import docker.errors

    t0 = time.monotonic()

    def body() -> Iterator[bytes]:
        for block in tar_stream(entries):
            rep.bytes_sent += len(block)
            yield block
        rep.upload_seconds += time.monotonic() - t0

    client = remote.docker(node, timeout=LOAD_TIMEOUT)
    try:
        client.images.load(body())
    except (docker.errors.APIError, docker.errors.DockerException) as e:
        raise ImageError(f"docker load: {e}") from None


def preload(c: Cluster, manifest: Path, nodes: Iterable[str] | None = None,
            remote: Any = None) -> dict[str, NodeReport]:
    """Preload every manifest image onto `nodes` (default: all) in parallel.

    Every node runs to its end; failed nodes are raised together as one RemoteError naming
    each node and its reason. Returns node -> NodeReport."""
    from tasks.remote import Failure, Kind, Remote, RemoteError, progress

    wanted = read_manifest(manifest)
    for w in wanted:
        if w.platform != c.platform:
            raise ImageError(f"{manifest}: {w.ref} is for {w.platform}, the cluster runs "
                             f"{c.platform}: run `doit images`")
        if not w.tar.exists():
            raise ImageError(f"{w.tar} is missing: run `doit images`")
    targets = list(nodes) if nodes is not None else c.names

    def one(r: Any) -> dict[str, NodeReport]:
        def fn(n: Node) -> NodeReport:
            try:
                return preload_node(r, n, wanted, progress)
            except ImageError as e:
                raise RemoteError([Failure(
                    node=n.name, address=n.address, step="images: preload", kind=Kind.ERROR,
                    detail=str(e), hint="fix the cause named above, then run "
                    "`doit -a preload-images` again")]) from None
        return r.on_all("images: preload", fn, targets)

    if remote is not None:
        return one(remote)
    with Remote(c) as r:
        return one(r)


def preload_action(nodes: list[str] | None, step: str) -> TaskFailed | None:
    """doit action: preload `nodes` (None: all) and stamp the step when every node is done."""
    from tasks import state
    from tasks.remote import RemoteError

    c = current()
    try:
        reports = preload(c, manifest_path(c), nodes)
    except (ImageError, RemoteError) as e:
        return TaskFailed(str(e))
    state.mark_done(c, step, {n: {"bytes_sent": r.bytes_sent, "loaded": r.loaded}
                              for n, r in reports.items()})
    return None


def clean_saved(paths: list[str], dryrun: bool = False) -> None:
    """Clean action of the image tasks. The saved files are the controller's build cache (a Home
    Assistant build takes minutes): a plain `doit clean` keeps them, `doit purge=yes clean`
    removes them. With `clean -n`, only says which."""
    from tasks.config import purge_requested

    present = [Path(p) for p in paths if Path(p).exists()]
    if not present:
        return
    names = ", ".join(_rel(p) for p in present)
    if not purge_requested():
        print(f"{'would keep' if dryrun else 'kept'} {names} (build cache; "
              "`doit purge=yes clean` removes it)")
        return
    if dryrun:
        print(f"would remove {names}")
        return
    for p in present:
        p.unlink()
    print(f"removed {names}")


def clean_preload(nodes: list[str] | None, step_name: str,
                  dryrun: bool = False) -> TaskFailed | None:
    """Clean action of preload-images: forget the stamp; with `purge=yes` also remove the
    stack's images from the nodes (those no container uses any more), as before setup. With
    `clean -n`, asks the nodes (read-only) and says which images would go."""
    from tasks import state
    from tasks.config import purge_requested
    from tasks.remote import Remote, RemoteError

    c = current()
    if not dryrun:
        state.forget(c, step_name)
    if not purge_requested():
        print(f"{step_name} (clean): images {'would be ' if dryrun else ''}kept on the nodes "
              "(`purge=yes` removes them)")
        return None
    refs = " ".join(shlex.quote(img.image) for img in stack_images(c).values())
    # an image a container still uses stays (a plain `docker image rm` refuses it): said, not
    # an error; `doit purge=yes clean` removes the stack before this task
    if dryrun:
        cmd = (f"for ref in {refs}; do docker image inspect \"$ref\" >/dev/null 2>&1 || "
               "continue; if [ -n \"$(docker ps -aq --filter ancestor=$ref)\" ]; then "
               "echo \"would keep $ref (a container uses it now)\"; "
               "else echo \"would remove $ref\"; fi; done")
    else:
        cmd = (f"for ref in {refs}; do docker image inspect \"$ref\" >/dev/null 2>&1 || "
               "continue; if docker image rm \"$ref\" >/dev/null 2>&1; then "
               "echo \"removed $ref\"; else echo \"kept $ref (a container uses it)\"; fi; done")
    try:
        with Remote(c) as r:
            out = r.run_all("images: remove preloaded", cmd, nodes)
    except RemoteError as e:
        return TaskFailed(str(e))
    for node, res in out.items():
        print(f"{node}: {step_name} (clean): "
              + (", ".join(res.stdout.splitlines()) if res.stdout.strip() else "nothing to do"))
    return None


# ---------------------------------------------------------------------------------------------
# Task creators (no Docker, no SSH here: `doit list` stays instant)


def task_buildx() -> dict[str, Any]:
    """Fetch buildx (Debian trixie's docker-buildx) into BUILD/tools when docker lacks it."""
    c = current()
    dest = tools_dir(c) / "docker-buildx"
    return {"actions": [(fetch_buildx_action, [dest])], "targets": [dest], "uptodate": [True],
            "clean": [(clean_saved, [[str(dest)]])], "verbosity": 2}


def task_base_image() -> dict[str, Any]:
    """Make the base images the Dockerfiles build FROM exist locally for the platform."""
    c = current()
    return {
        "basename": "base-image",
        "actions": [(step, [resolve_bases, c])],
        "targets": [images_dir(c) / "base.json"],
        "clean": [(clean_saved, [[str(images_dir(c) / "base.json")]])],
        "verbosity": 2,
    }


def task_images() -> Iterator[dict[str, Any]]:
    """Pull or build every image of the stack for the platform and save it (BUILD/images)."""
    c = current()
    out = images_dir(c)
    yield {"basename": "images", "name": None,
           "doc": "Pull or build every image of the stack for the platform, save it to "
                  "BUILD/images."}
    for service, img in stack_images(c).items():
        if img.build is not None:
            ctx = context_dir(img)
            deps = [*context_files(ctx), out / "base.json"]
            doc = f"Build {img.image} from {img.build} for {c.platform}, save {service}.tar."
        else:
            deps = []
            doc = f"Pull {img.image} for {c.platform}, save {service}.tar."
        yield {
            "basename": "images",
            "name": service,
            "doc": doc,
            "actions": [(step, [make_image, c, service])],
            "file_dep": [str(p) for p in deps],
            "targets": [str(out / f"{service}.tar"), str(out / f"{service}.json")],
            "uptodate": [config_changed({"image": img.image, "platform": c.platform,
                                         "build": str(img.build) if img.build else None})],
            "clean": [(clean_saved, [[str(out / f"{service}.tar"), str(out / f"{service}.json")]])],
            "verbosity": 2,
        }
    yield {
        "basename": "images",
        "name": "manifest",
        "doc": "Gather the saved images into manifest.json (read by preload-images).",
        "actions": [(step, [write_manifest, c])],
        "file_dep": [str(out / f"{s}.json") for s in stack_images(c)],
        "targets": [str(manifest_path(c))],
        "clean": [(clean_saved, [[str(manifest_path(c))]])],
    }


def task_preload_images() -> Iterator[dict[str, Any]]:
    """Put every image on every node (only what each lacks), nodes in parallel.

    `preload-images` does all nodes at once (threads); `preload-images:pi1` one node. These are
    plain tasks named with a colon rather than doit subtasks, because doit runs a group's
    subtasks one after the other. Up to date (stamp files, no SSH) while manifest.json and the
    nodes are unchanged; `doit -a preload-images` checks the nodes again."""
    from tasks import state

    c = current()
    manifest = manifest_path(c)
    nodes = {n.name: n.address for n in c.nodes}
    steps = [("preload-images", None, f"Put every image on every node ({', '.join(nodes)}) "
              "in parallel, sending only what each lacks.")]
    steps += [(f"preload-images:{name}", [name], f"Put every image on {name} ({addr}).")
              for name, addr in nodes.items()]
    for basename, only, doc in steps:
        step = basename.replace(":", "-")
        yield {
            "basename": basename,
            "doc": doc,
            "actions": [(preload_action, [only, step])],
            "file_dep": [str(manifest)],
            "targets": [str(state.stamp(c, step))],
            "uptodate": [config_changed({"platform": c.platform, "nodes": nodes, "only": only})],
            "clean": [(clean_preload, [only, step])],
            "verbosity": 2,
        }
