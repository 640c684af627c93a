"""Facts read from the nodes: the command that reads each and its pure parser, in one place for
setup (tasks/galera.py, tasks/gluster.py ...), `doit status` and `doit drill`.

Several probes go to a node in one round trip: `probe_script` joins them with a header line per
probe, `parse_sections` splits the output again (both in tasks/fact_cache.py, which keeps each
probe's answer for the run), `gather` does both over SSH.

The facts `doit status` reads about every node and the whole cluster are in
tasks/facts_cluster.py; a subsystem's own facts sit beside it (gluster_facts.py, stack_facts.py),
each a command and a pure parser tested against recorded output (tests/unit/data/).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tasks.fact_cache import parse_sections, probe_script  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from tasks.config import Node
    from tasks.remote import Remote

def gather(r: Remote, node: Node, step: str, probes: dict[str, str]) -> dict[str, str]:
    """Run every probe on `node` in one command and return {probe: output} (a Remote keeps
    each probe's answer for the run's later readers: `Remote.read_probes`)."""
    return r.read_probes(node, step, probes, timeout=60)


# ---------------------------------------------------------------------------------------------
# Galera: `galera-status` (images/mariadb-galera) in each running db / db-seed container

GALERA_STATUS = "/usr/local/bin/galera-status"
SEED = "db-seed"


@dataclass(frozen=True)
class GaleraMember:
    """One running Galera container (db or db-seed) as `galera-status` describes it."""

    container: str
    service: str  # db | db-seed
    phase: str = ""  # the entrypoint's phase while the server is not up
    cluster_status: str = "none"  # Primary | non-Primary | Disconnected | none
    local_state: str = "none"  # Synced | Donor/Desynced | Joining ... | none
    cluster_size: int = 0
    seqno: int | None = None
    uuid: str = ""
    node: str = ""

    @property
    def synced(self) -> bool:
        """Synced in a Primary component: serving, with all the data."""
        return self.cluster_status == "Primary" and self.local_state == "Synced"

    def describe(self) -> str:
        """'pi2 Synced', 'seed@pi1 Donor/Desynced', 'pi3 joining' (progress lines)."""
        who = f"seed@{self.node}" if self.service == SEED else self.node
        if self.synced:
            return f"{who} Synced"
        state = self.local_state if self.local_state != "none" else self.phase or "starting"
        return f"{who} {state}"

    def state(self) -> str:
        """'Synced/Primary size 3', or the entrypoint's phase while the server is not up."""
        if self.local_state == "none":
            return self.phase or "starting"
        return f"{self.local_state}/{self.cluster_status} size {self.cluster_size}"


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text not in (None, "") else None
    except ValueError:
        return None


# The image's status listener (socat, one galera-status run per connection): STATUS_PORT in
# images/mariadb-galera/galera-lib.sh, which the stack does not override.
GALERA_STATUS_PORT = 4570


def galera_command(containers: list[str]) -> str:
    """`galera-status` of each container, each output after a '== CONTAINER' line.

    Read from the image's status listener on the container's loopback (nsenter into its network
    namespace, bash's /dev/tcp): a third of the CPU of a `docker exec`, which matters on a Pi
    and when every node is read at once. `docker exec` when the listener does not answer (the
    container is still starting, or the node has no bash or nsenter)."""
    listener = shlex.quote(f"exec 3<>/dev/tcp/127.0.0.1/{GALERA_STATUS_PORT} && cat <&3")
    parts = []
    for cid in containers:
        c = shlex.quote(cid)
        parts.append(
            f"echo '== {cid}'; "
            f"out=$(pid=$(docker inspect -f '{{{{.State.Pid}}}}' {c} 2>/dev/null) && "
            f"timeout 5 nsenter -t \"$pid\" -n bash -c {listener} 2>/dev/null); "
            f"case $out in *phase=*) printf '%s\\n' \"$out\" ;; "
            f"*) timeout 10 docker exec {c} {GALERA_STATUS} 2>/dev/null ;; esac")
    return "; ".join(parts)


def parse_galera(text: str, services: dict[str, str], node: str = "") -> list[GaleraMember]:
    """Several `galera-status` outputs, each after a '== CONTAINER' line -> members. A container
    that did not answer (exec failed) is a member with no state."""
    chunks: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("== "):
            chunks.append((line[3:].strip(), []))
        elif chunks:
            chunks[-1][1].append(line)
    out = []
    for cid, lines in chunks:
        kv = {}
        for line in lines:
            key, sep, value = line.strip().partition("=")
            if sep:
                kv[key] = value
        out.append(GaleraMember(container=cid, service=services.get(cid, ""),
                                phase=kv.get("phase", ""),
                                cluster_status=kv.get("cluster_status", "none"),
                                local_state=kv.get("local_state", "none").replace("_", " "),
                                cluster_size=_int(kv.get("cluster_size")) or 0,
                                seqno=_int(kv.get("seqno")), uuid=kv.get("uuid", ""),
                                node=node))
    return out
