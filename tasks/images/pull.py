"""Images: pulling one from its registry, by tag or by digest, and what a failed pull means.

The rule for a pull that fails (no registry answers, the tag or digest is not there, access
refused): the `images:<service>` task fails with the image, the registry, the reason and what to
do, and nothing is saved, so `preload-images` (which depends on the manifest, which depends on
every `images:<service>`) does not run and no node is changed. One exception: a reference pinned
by digest whose image is in the local engine *under that digest* (it was pulled from that
repository before) is used, since a digest names exactly one content. A tag is never taken from
the local engine instead of the registry: it may be stale, and would be deployed silently.

A digest is recorded for every pulled image (`<service>.json` and manifest.json: "digest"): the
one the registry answered with (for a multi-platform image, the digest of its index, which is
what pins it: `NAME@sha256:...`).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from typing import Any

from tasks.config import Cluster, Image
from tasks.images.base import normalize_ref
from tasks.images.core import (
    ImageError,
    Platform,
    _run,
    image_matches,
    local_image,
    verify_local,
)

_DIGEST_LINE = re.compile(r"^Digest: (sha256:[a-f0-9]{64})\s*$", re.MULTILINE)

# What docker says -> why the pull failed. First match wins: a refused connection mentions the
# URL of the manifest, so "unreachable" is tested before "not found".
_FAILURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("unreachable", ("connection refused", "no such host", "i/o timeout", "network is unreachable",
                     "no route to host", "tls handshake timeout", "context deadline exceeded",
                     "client.timeout exceeded", "connection reset by peer", "dial tcp",
                     "temporary failure in name resolution", ": eof")),
    ("insecure", ("server gave http response to https client",)),
    ("platform", ("no matching manifest for",)),
    ("not-found", ("manifest unknown", "not found", "name unknown", "unknown manifest")),
    ("denied", ("pull access denied", "unauthorized", "denied", "authentication required")),
)


def classify_pull_error(output: str) -> str:
    """Why `docker pull` failed, from its output: unreachable, insecure, platform, not-found,
    denied, or other."""
    low = output.lower()
    for kind, needles in _FAILURES:
        if any(n in low for n in needles):
            return kind
    return "other"


def pull_failure(service: str, img: Image, platform: Platform, kind: str, output: str) -> str:
    """The message of a failed pull: image, registry, reason, docker's words, what to do."""
    reg = img.registry
    what = (f"the digest {img.digest}" if img.digest else f"the tag {img.tag!r}")
    reasons = {
        "unreachable": f"the registry {reg} does not answer",
        "insecure": f"the registry {reg} answers in plain HTTP and Docker expects HTTPS",
        "platform": f"{img.pull_ref} has no image for {platform}",
        "not-found": f"{what} of {img.repository} does not exist in the registry {reg} "
                     "(or the repository does not)",
        "denied": f"the registry {reg} refused the pull (the repository does not exist there, "
                  "or it needs a login)",
        "other": f"docker pull from the registry {reg} failed",
    }
    todo = {
        "unreachable": f"start the registry or check its address, DNS, network or proxy "
                       f"(`docker pull {img.pull_ref}` on this machine must work). A tag is "
                       "never taken from the local engine instead: it may be stale. To use a "
                       "local copy when the registry is away, pin the image by digest "
                       f"({img.repository}@sha256:...)",
        "insecure": f"give {reg} a TLS certificate, or add it to \"insecure-registries\" in "
                    "/etc/docker/daemon.json (a loopback address such as 127.0.0.1:5000 needs "
                    "neither)",
        "platform": f"pin a version that is published for {platform}",
        "not-found": f"check which tags exist in {img.repository} and fix "
                     f"images.{service}.image in the cluster file",
        "denied": f"check the name, and log in on this machine: docker login {reg}",
        "other": "see docker's message above",
    }
    tail = "\n".join(f"  | {line}" for line in output.strip().splitlines()[-6:])
    how = f"{img.pull_ref}, " if img.pull_ref != img.image else ""
    return (f"{service}: cannot pull {img.image} ({how}{platform}): "
            f"{reasons[kind]}\n{tail}\n  what to do: {todo[kind]}\n"
            "  nothing was saved: preload-images does not run, the nodes are not changed")


def repo_digest(info: dict[str, Any], repository: str) -> str | None:
    """The digest the engine recorded for `repository` (RepoDigests), when it holds one only."""
    want = normalize_ref(repository)
    found = {d.split("@", 1)[1] for d in info.get("RepoDigests") or []
             if "@" in d and normalize_ref(d.split("@", 1)[0]) == want}
    return found.pop() if len(found) == 1 else None


def pulled_digest(output: str, info: dict[str, Any], img: Image) -> str | None:
    """The digest of what was pulled: the pinned one, else the one docker printed ("Digest:"),
    else the engine's record for the repository."""
    if img.digest:
        return img.digest
    m = _DIGEST_LINE.findall(output)
    return m[-1] if m else repo_digest(info, img.repository)


def local_fallback(img: Image, platform: Platform) -> dict[str, Any] | None:
    """The local image that may stand in for a failed pull: only for a reference pinned by
    digest, only the image the engine holds under that digest, only for the right platform."""
    if img.digest is None:
        return None
    info = local_image(img.pull_ref)
    return info if info is not None and image_matches(platform, info) else None


def pull_image(c: Cluster, service: str, img: Image,
               log: Callable[[str], None] = print) -> tuple[dict[str, Any], str | None, str]:
    """`docker pull --platform P` of `img` (by digest when pinned), tagged as the nodes will
    hold it (`img.node_ref`): its verified inspect dict, its digest, and how ("pulled", or
    "local" for a digest the engine held when the pull failed). ImageError when the pull fails
    (see the module's docstring)."""
    platform = Platform.parse(c.platform)
    ref = img.pull_ref
    t0 = time.monotonic()
    cmd = ["docker", "pull", "--platform", str(platform), ref]
    log(f"{service}: docker pull --platform {platform} {ref} (registry {img.registry})")
    try:
        res = subprocess.run(cmd, capture_output=True)
    except FileNotFoundError:
        raise ImageError(f"{service}: docker is not installed") from None
    output = (res.stdout + res.stderr).decode(errors="replace")
    how = "pulled"
    if res.returncode != 0:
        kind = classify_pull_error(output)
        info = local_fallback(img, platform)
        if info is None:
            raise ImageError(pull_failure(service, img, platform, kind, output))
        last = output.strip().splitlines()[-1] if output.strip() else kind
        log(f"{service}: the pull failed ({kind}: {last.strip()}); the local engine holds "
            f"{ref} ({info['Id'][:19]}): the same content by its digest, used")
        how = "local"
    info = verify_local(ref, platform)
    if img.node_ref != ref:
        _run(["docker", "tag", ref, img.node_ref], what=f"{service}: docker tag {ref}")
    digest = pulled_digest(output, info, img)
    if how == "pulled":
        pin = "" if img.digest or not digest else \
            f"; to pin it: image: \"{img.repository}:{img.tag}@{digest}\""
        log(f"{service}: pulled {ref} ({info['Id'][:19]}, {platform}, digest "
            f"{digest or 'none given'}) in {time.monotonic() - t0:.1f} s{pin}")
    return info, digest, how
