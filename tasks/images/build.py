"""Images: buildx, building or pulling every image of the cluster, checking its platform,
saving it (BUILD/images) and the manifest the preload reads."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed

from tasks.config import PROJECT_ROOT, Cluster, Image
from tasks.images.base import base_refs, ensure_base, rewrite_froms
from tasks.images.core import (
    BUILDER_ENV,
    BUILDX_KEYRING,
    BUILDX_PACKAGE,
    BUILDX_SUITE,
    DEBIAN_MIRROR,
    SERVICES,
    ImageError,
    Platform,
    _run,
    daemon_platform,
    docker_available,
    ensure_emulation,
    verify_local,
)
from tasks.images.pull import pull_image

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


def context_hash(ctx: Path, *, docs: bool = True) -> str:
    """12 hex digits of sha256 over the context's files (`context_files`: names and contents);
    `docs=False` leaves README.md out, as it changes no image."""
    import hashlib

    h = hashlib.sha256()
    for path in context_files(ctx):
        if docs or path.name != "README.md":
            h.update(str(path.relative_to(ctx)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


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


def save_image(c: Cluster, service: str, img: Image, info: dict[str, Any],
               how: str, log: Callable[[str], None] = print,
               digest: str | None = None) -> dict[str, Any]:
    """`docker save` of the image as the nodes will hold it (`img.node_ref`, the tag is kept) to
    BUILD/images/<service>.tar + its record (with the registry's digest of a pulled image, and
    the configured reference when the nodes' tag differs from it)."""
    out = images_dir(c)
    out.mkdir(parents=True, exist_ok=True)
    tar = out / f"{service}.tar"
    part = tar.with_name(tar.name + ".part")
    ref = img.node_ref
    t0 = time.monotonic()
    try:
        _run(["docker", "save", "-o", str(part), ref], what=f"docker save {ref}")
        os.replace(part, tar)
    finally:
        part.unlink(missing_ok=True)
    record = {"image": ref, "id": info["Id"], "platform": c.platform, "tar": tar.name,
              "layers": list(info.get("RootFS", {}).get("Layers") or []), "how": how,
              "size": tar.stat().st_size}
    if img.build is None:
        record["digest"] = digest
    if ref != img.image:
        record["reference"] = img.image
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
        return save_image(c, service, img, build_image(c, service, img, log=log), "built",
                          log=log)
    info, digest, how = pull_image(c, service, img, log=log)
    return save_image(c, service, img, info, how, log=log, digest=digest)


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


