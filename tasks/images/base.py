"""Images: FROM lines and the local Debian bases they resolve to (mmdebstrap, `docker load`),
and tar streams for `docker load` without temporary files."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from tasks.images.core import (
    BASE_REPOSITORY,
    CHUNK,
    DEBIAN_MIRROR,
    ImageError,
    Platform,
    _run,
    daemon_platform,
    ensure_emulation,
    image_matches,
    local_image,
)

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
    import tarfile  # here: loading the doit tasks does not need it

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


