"""`doit preflight`: is every node ready for haswarm? Reads facts, changes nothing.

For every node at once: SSH works (host key checked), a Docker engine answers, its architecture
matches the cluster's `platform`, Docker's disk has room, its clock agrees with this
computer's, and the brick dir is not on the root file system (unless `gluster.brick_on_root_fs`
accepts it: a check that needs the node, so it is here and not in the cluster file's validation).
Prints one table; fails naming each node that is not ready and why.
"""

from __future__ import annotations

import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from doit.exceptions import TaskFailed

from tasks.config import Cluster
from tasks.fact_cache import SHARED, load_plan, run_key
from tasks.images.layers import DISK_SPARE, expected_images
from tasks.remote import Remote, RemoteError, key_values
from tasks.state import stamp

# Free space needed where Docker keeps images, when the size of an image the node lacks is not
# known yet (not built or pulled: a first `doit setup`): the stack's images unpacked (Home
# Assistant alone is ~1.5 GB, MariaDB/Galera ~400 MB, Mosquitto small). Once manifest.json knows
# them, a node needs the images it lacks plus DISK_SPARE: a converged node needs only the spare.
MIN_DISK_FREE = 2 * 1024**3
# Galera, Gluster and swarm's TLS certificates need clocks that agree; 5 s is far inside what
# they tolerate and far outside what NTP leaves.
MAX_CLOCK_SKEW = 5.0
# Seconds a node may take to answer the fact-gathering commands once connected.
COMMAND_TIMEOUT = 20.0

# platform -> (Docker's GOARCH, uname -m values that fit). A Pi 4 with 32-bit Raspberry Pi OS
# may run a 64-bit kernel (uname aarch64) under a 32-bit Docker (arch arm): Docker's view counts.
ARCH = {
    "linux/arm/v7": ("arm", ("armv7l", "aarch64")),
    "linux/arm64": ("arm64", ("aarch64",)),
    "linux/amd64": ("amd64", ("x86_64",)),
}
PLATFORM_FOR_DOCKER_ARCH = {"arm": "linux/arm/v7", "arm64": "linux/arm64", "amd64": "linux/amd64"}

# One round trip collects every fact but the clock (with `brick_fs_probe`). POSIX sh; read-only.
_FACTS = r"""
printf 'machine=%s\n' "$(uname -m)"
root=
if ! command -v docker >/dev/null 2>&1; then
  echo 'docker_error=docker: command not found'
elif v=$(docker version --format '{{.Server.Version}} {{.Server.Os}}/{{.Server.Arch}}' 2>&1); then
  printf 'docker=%s\n' "$v"
  info=$(docker info --format '{{.DockerRootDir}} {{.ID}}' 2>/dev/null)
  root=${info%% *}
  printf 'engine_id=%s\n' "${info#* }"
  printf 'image_ids=%s\n' "$(docker image ls -q --no-trunc 2>/dev/null | sort -u | tr '\n' ' ')"
else
  printf 'docker_error=%s\n' "$(printf '%s' "$v" | grep -v '^Client' | tr '\n' ' ')"
fi
d=${root:-/var/lib/docker}
[ -d "$d" ] || d=/
df -Pk "$d" | awk -v d="$d" 'NR==2 {print "disk_free_kb=" $4; print "disk_path=" d}'
"""


def brick_fs_probe(c: Cluster) -> str:
    """Prints `brick_fs=MOUNT`: the mount point of the file system that holds (or will hold:
    its nearest existing parent) the brick dir."""
    b = shlex.quote(str(c.gluster.brick_dir))
    return (f"b={b}; while [ ! -e \"$b\" ]; do b=$(dirname \"$b\"); done; "
            "df -P \"$b\" | awk 'NR==2 {print \"brick_fs=\" $6}'\n")


@dataclass
class Facts:
    """What preflight learned about one node (None: could not be found out)."""

    node: str
    address: str
    ssh_error: str | None = None
    ssh_hint: str | None = None
    machine: str | None = None
    docker_version: str | None = None
    docker_arch: str | None = None
    docker_error: str | None = None
    engine_id: str | None = None
    disk_free: int | None = None
    disk_path: str | None = None
    image_ids: frozenset[str] | None = None  # the images its engine holds
    brick_fs: str | None = None  # mount point of the file system holding the brick dir
    clock_skew: float | None = None
    clock_error: float = 0.0
    read_ahead: int = 0  # facts read for the later steps (tasks/fact_cache.py)
    problems: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Gathering


def parse_facts(facts: Facts, stdout: str) -> Facts:
    """Fill `facts` from the output of the fact-gathering script."""
    values = key_values(stdout)
    facts.machine = values.get("machine") or None
    if "docker" in values:
        version, _, os_arch = values["docker"].strip().partition(" ")
        facts.docker_version = version or None
        facts.docker_arch = os_arch.partition("/")[2] or None
    facts.docker_error = (values.get("docker_error") or "").strip() or None
    facts.engine_id = (values.get("engine_id") or "").strip() or None
    if values.get("disk_free_kb", "").isdigit():
        facts.disk_free = int(values["disk_free_kb"]) * 1024
    facts.disk_path = values.get("disk_path") or None
    if "image_ids" in values:
        facts.image_ids = frozenset(values["image_ids"].split())
    facts.brick_fs = values.get("brick_fs") or None
    return facts


def gather(r: Remote, reads: dict[str, list[str]] | None = None) -> dict[str, Facts]:
    """Facts of every node, in parallel. Never raises for a node's problem: it is recorded.
    `reads`: {"name@address": commands} to read up front on each node that answers, for the
    steps after preflight (tasks/fact_cache.py)."""
    script = _FACTS + brick_fs_probe(r.cluster)

    def one(n):  # noqa: ANN001, ANN202 - a Node
        f = Facts(n.name, n.address)

        def unreachable(e: RemoteError, doing: str = "") -> Facts:
            failure = e.failures[0]
            f.ssh_error = f"{failure.kind}: {doing}{failure.detail}"
            f.ssh_hint = failure.hint
            return f

        try:
            r.connect(n, "preflight: connect")
        except RemoteError as e:
            return unreachable(e)
        # What the steps will read (tasks/fact_cache.py), read beside the checks: the checks
        # only read (`read_live`), so they drop nothing it keeps.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
            ahead = pool.submit(r.prefetch, n, (reads or {}).get(f"{n.name}@{n.address}", []))
            try:
                res = r.read_live(n, "preflight: facts", script, timeout=COMMAND_TIMEOUT)
            except RemoteError as e:
                return unreachable(e)
            parse_facts(f, res.stdout)
            try:
                f.clock_skew, f.clock_error = r.clock_offset(n, "preflight: clock")
            except RemoteError:
                pass  # judged as "could not read the node's clock"
            try:
                f.read_ahead = ahead.result()
            except RemoteError as e:
                # it answered its checks but hangs now (a frozen FUSE mount, a wedged dockerd)
                return unreachable(e, "reading its facts: ")
        return f

    return r.on_all("preflight", one)


# ---------------------------------------------------------------------------------------------
# Judging


def disk_needed(f: Facts, images: dict[str, tuple[str, int] | None]) -> tuple[int, str]:
    """Bytes node `f` needs free for the stack's images, and why: the saved size of each image
    (`images`: service -> (ID, size), None when not known yet) it lacks, plus DISK_SPARE; at
    least MIN_DISK_FREE while an image it may lack has no known size."""
    held = f.image_ids or frozenset()
    lacking = [known for known in images.values() if known is None or known[0] not in held]
    need = DISK_SPARE + sum(known[1] for known in lacking if known is not None)
    if not images or any(known is None for known in lacking):
        return max(need, MIN_DISK_FREE), "needed for the images"
    if not lacking:
        return need, "needed to spare (every image is there already)"
    return need, (f"needed ({_size(need - DISK_SPARE)} for the {len(lacking)} image(s) it lacks "
                  f"+ {_size(DISK_SPARE)} to spare)")


def judge(c: Cluster, facts: dict[str, Facts],
          images: dict[str, tuple[str, int] | None] | None = None) -> dict[str, Facts]:
    """Fill every node's `problems` (empty: ready). `images`: the stack's images as
    `expected_images` knows them (None: none known, the disk check asks MIN_DISK_FREE).
    Returns `facts`."""
    want_docker_arch, want_machines = ARCH[c.platform]
    for f in facts.values():
        f.problems = []
        if f.ssh_error:
            f.problems.append(f"ssh: {f.ssh_error}" + (f" -> {f.ssh_hint}" if f.ssh_hint else ""))
            continue
        if f.docker_error or not f.docker_version:
            f.problems.append(_docker_problem(f.docker_error or "no answer"))
        if f.docker_arch:
            if f.docker_arch != want_docker_arch:
                f.problems.append(_arch_problem(c, f.docker_arch, f.machine))
        elif f.machine not in want_machines:
            f.problems.append(f"arch: the CPU is {f.machine or 'unknown'}, but the cluster file "
                              f"says platform: {c.platform} (which runs on "
                              f"{' or '.join(want_machines)})")
        need, why = disk_needed(f, images or {})
        if f.disk_free is None:
            f.problems.append("disk: could not read free space (df)")
        elif f.disk_free < need:
            f.problems.append(f"disk: only {_size(f.disk_free)} free in {f.disk_path}, "
                              f"{_size(need)} {why}: free some space (`docker image prune` "
                              "removes untagged images; not -a: it would remove the stack's "
                              "preloaded images) or use a bigger SD card/SSD")
        if f.brick_fs == "/" and not c.gluster.brick_on_root_fs:
            f.problems.append(
                f"brick: {c.gluster.brick_dir} is on the root file system (on a Pi: the SD "
                "card, which the volume's writes wear out and can fill up): mount a disk of "
                "its own there (e.g. a USB SSD), choose another gluster.brick_dir, or accept "
                "it with gluster.brick_on_root_fs: true in the cluster file")
        if f.clock_skew is None:
            f.problems.append("clock: could not read the node's clock (date +%s.%N)")
        elif abs(f.clock_skew) - f.clock_error > MAX_CLOCK_SKEW:
            way = "ahead of" if f.clock_skew > 0 else "behind"
            f.problems.append(f"clock: {abs(f.clock_skew):.1f} s {way} this computer's (at most "
                              f"{MAX_CLOCK_SKEW:g} s allowed): turn on time sync on the node "
                              "(timedatectl set-ntp true) and check this computer's clock too")
    by_engine: dict[str, list[str]] = {}
    for f in facts.values():
        if f.engine_id:
            by_engine.setdefault(f.engine_id, []).append(f.node)
    for names in by_engine.values():
        for name in names if len(names) > 1 else []:
            others = ", ".join(n for n in names if n != name)
            facts[name].problems.append(
                f"docker: same Docker engine ID as {others}: the same Pi listed twice, or a "
                "cloned SD card (remove /var/lib/docker/engine-id and restart Docker on clones)")
    return facts


def _docker_problem(error: str) -> str:
    if "command not found" in error:
        return ("docker: Docker is not installed: install it (e.g. apt install docker.io, or "
                "Docker's convenience script)")
    if "Cannot connect to the Docker daemon" in error or "docker.sock" in error:
        return f"docker: the engine does not answer ({error}): systemctl start docker"
    return f"docker: {error}"


def _arch_problem(c: Cluster, docker_arch: str, machine: str | None) -> str:
    seen = f"Docker runs as {docker_arch}" + (f" (CPU {machine})" if machine else "")
    fits = PLATFORM_FOR_DOCKER_ARCH.get(docker_arch)
    fix = (f"set platform: {fits} in the cluster file (all nodes must agree)" if fits
           else "this architecture is not supported (Pi 2 or newer is needed)")
    if c.platform == "linux/arm64" and docker_arch == "arm":
        fix += ", or install a 64-bit OS on the Pi"
    return f"arch: {seen}, but the cluster file says platform: {c.platform}: {fix}"


# ---------------------------------------------------------------------------------------------
# Presenting


def _size(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


def _short(problem: str) -> str:
    """The verdict column: the problem's kind and first clause."""
    head = problem.split(" -> ")[0]
    return head if len(head) <= 60 else head[:57] + "..."


def table(c: Cluster, facts: dict[str, Facts]) -> str:
    """One line per node: node, address, ssh, docker, arch, disk free, clock skew, verdict."""
    rows = [("node", "address", "ssh", "docker", "arch", "disk free", "clock skew", "verdict")]
    for n in c.nodes:
        f = facts.get(n.name) or Facts(n.name, n.address, ssh_error="not checked")
        if f.ssh_error:
            rows.append((f.node, f.address, "FAIL", "-", "-", "-", "-",
                         "NOT READY: " + f.ssh_error.split(":")[0]))
            continue
        arch = f.machine or "?"
        if f.docker_arch:
            arch += f" ({f.docker_arch})"
        verdict = "ok" if not f.problems else "NOT READY: " + "; ".join(
            p.split(":")[0] for p in f.problems)
        rows.append((
            f.node, f.address, "ok",
            f.docker_version or "FAIL",
            arch,
            _size(f.disk_free) if f.disk_free is not None else "?",
            f"{round(f.clock_skew, 2) + 0.0:+.2f} s" if f.clock_skew is not None else "?",
            verdict,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def report(c: Cluster, facts: dict[str, Facts]) -> str | None:
    """None when every node is ready; else the failure message naming each bad node and why."""
    bad = [facts[n.name] for n in c.nodes if facts[n.name].problems]
    if not bad:
        return None
    lines = [f"preflight: {len(bad)} of {len(c.nodes)} nodes not ready: "
             + ", ".join(f.node for f in bad)]
    for f in bad:
        lines.append(f"  {f.node} ({f.address}):")
        lines += [f"    - {p}" for p in f.problems]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The task


def preflight(c: Cluster) -> TaskFailed | None:
    """Check every node of `c`, print the table, and return TaskFailed if any is not ready."""
    from tasks.connection import close_shared

    t0 = time.monotonic()
    close_shared()  # a check of reachability opens its connections anew; the later steps keep them
    reads = stamp(c, "reads")  # what the last run of this command line read (fact_cache)
    key = run_key()
    SHARED.begin(reads, key)  # the run's reads are kept from here to the task's teardown
    with Remote(c, shared=True) as r:
        facts = judge(c, gather(r, load_plan(reads, key)), expected_images(c))
    print(table(c, facts), flush=True)
    message = report(c, facts)
    took = time.monotonic() - t0
    if message:
        return TaskFailed(message)
    ahead = sum(f.read_ahead for f in facts.values())
    print(f"preflight: all {len(c.nodes)} nodes ready ({took:.1f} s"
          + (f"; {ahead} facts read for the next steps)" if ahead else ")"), flush=True)
    return None


def _run() -> TaskFailed | None:
    from tasks.config import ConfigError, current

    try:
        c = current()
    except ConfigError as e:
        return TaskFailed(f"preflight: invalid cluster file\n{e}")
    return preflight(c)


def task_preflight() -> dict[str, object]:
    """Check every node (SSH, Docker, architecture, disk, clock) without changing anything."""
    return {"basename": "preflight", "actions": [_run], "uptodate": [False], "verbosity": 2,
            # once doit has run every task: the run's reads end (and are noted for the next)
            "teardown": [SHARED.end]}
