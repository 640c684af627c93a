"""`doit drill`: take a node down on purpose, measure the failover, bring it back, check that
nothing was lost.

    doit drill                       the node running Home Assistant, default fault
    doit drill --fault cut --node pi2
    doit drill --fault docker --yes  a real cluster: stop Docker on the node (no prompt)

Faults: `kill` (lab: every process of the node ends at once, as a power cut: peers' TCP
connections are reset), `cut` (lab: its link goes silently down: peers only time out), `docker`
(stop its Docker engine: `systemctl stop docker.socket docker`, in the lab `lab-service docker
stop`; the only fault on a real cluster, after a confirmation prompt unless `--yes`).

In order:
 1. the cluster must be healthy (`doit status` shows no problem);
 2. markers written before the fault: a row in Galera (`haswarm.haswarm_drill`, committed on the
    target node's db when it has one), a file on the Gluster mount (written through the target),
    a retained MQTT message (QoS 1, as the `homeassistant` user); then a wait longer than
    `mqtt.autosave_interval`, so the broker has saved it;
 3. the fault; then, polled at once and in parallel, seconds from the fault until: the swarm marks
    the node Down; a write commits on a surviving Galera node (Primary again: a commit needs a
    primary component); Home Assistant answers HTTP on another node; Mosquitto accepts an
    authenticated client (paho-mqtt) on another node; the VIP accepts one (if `vip.address`);
    the mDNS name resolves (from a survivor) to a live node and to the node where Mosquitto
    answers (if `mdns.restart_cron`);
 4. the node restored (lab: boot / heal; real: start Docker), then seconds until Gluster has
    healed (every brick online, 0 entries), Galera is Synced on every node (size N), and the
    whole status shows no problem;
 5. the markers read back: the row (and every row committed during the outage) on every db
    node, the file on every node's mount, the retained message from the broker.

`run_drill()` returns a `DrillResult` (figures in seconds, what was lost); the lab tests and
bench/failover.py use it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from doit.exceptions import TaskFailed

from tasks import status
from tasks.config import Cluster
from tasks.errors import DrillError
from tasks.remote import Remote, RemoteError, redact
from tasks.secrets import secret_values
from tasks.service import service
from tasks.status import ClusterStatus

if TYPE_CHECKING:  # the probing machinery is imported when a drill runs (`doit list` stays light)
    from tasks.watch import RunOn, WatchReport

FAULTS = ("kill", "cut", "docker")
# Seconds: how long to wait for each failover figure, for the restored node to converge, for
# the cluster to be healthy before the drill.
MEASURE_TIMEOUT = 180.0
CONVERGE_TIMEOUT = 600.0
READY_TIMEOUT = 300.0
RECHECK_TIMEOUT = 120.0  # s to wait for convergence again before the markers are read back
# Seconds of continuous probing before the fault, and after the cluster has converged again
# (swarm's late decisions, e.g. a healthy node declared Down by a new leader, come after).
WATCH_BEFORE = 3.0
WATCH_AFTER = 120.0

# Start/stop the Docker engine (systemd on a Pi, the lab's stand-in otherwise).
DOCKER_STOP = service("docker", "stop", units="docker.socket docker.service")
DOCKER_START = service("docker", "start", units="docker.socket docker.service")

# Errors of the background `docker stop` of a docker fault, by node.
STOP_ERRORS: dict[str, str] = {}

# ---------------------------------------------------------------------------------------------
# The result


@dataclass(kw_only=True)
class Outcome:
    """Figures (seconds; None: "did not happen within the timeout" or "not measured"), where
    each came from, and what was lost: common to a drill and a full outage."""

    figures: dict[str, float | None] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)  # figure -> node/address it came from
    rows_committed: int = 0
    lost: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing lost and the cluster converged again."""
        return not self.lost and self.figures.get("converged") is not None


@dataclass(kw_only=True)
class DrillResult(Outcome):
    """What a drill measured. Figures are seconds from the fault (restore figures: from the
    restore)."""

    fault: str
    node: str
    ran: list[str] = field(default_factory=list)  # services the node ran before the fault
    leader: bool = False  # the node was the swarm's raft leader (a new one must be elected)
    watch: WatchReport | None = None  # continuous probes and census (tasks/watch.py)

    def incidents(self) -> list[str]:
        """What the fault did not force: a container stopped on a node that stayed up (Home
        Assistant or Mosquitto moved off a healthy node, a Galera member restarted there), or
        two Home Assistants (or brokers) at once."""
        if self.watch is None:
            return []
        out = []
        for s in self.watch.stops:
            if s.node != self.node:
                out.append(f"{s.service} container {s.container} stopped at {s.t:.1f} s on "
                           f"{s.node}, which never failed")
        for o in self.watch.overlaps:
            out.append(f"{o.count} {o.service} ran at once for {o.end - o.start:.1f} s "
                       f"({', '.join(o.nodes)})")
        return out

    @property
    def ok(self) -> bool:
        """Nothing lost, converged again, and no incident (see `incidents`)."""
        return super().ok and not self.incidents()

    def report(self) -> str:
        """The figures as a few lines for people."""
        def fmt(key: str) -> str:
            v = self.figures.get(key, "n/a")
            if v == "n/a":
                return "not measured"
            return "never (timeout)" if v is None else f"{v:.1f} s"

        labels = [
            ("swarm_down", "swarm marks the node Down"),
            ("galera", "Galera commits a write on a survivor"),
            ("ha", "Home Assistant answers HTTP on another node"),
            ("mqtt", "Mosquitto accepts a login on another node"),
            ("vip", "VIP accepts an MQTT login"),
            ("mdns_live", "mDNS name resolves to a live node"),
            ("mdns_broker", "mDNS name resolves to the broker's node"),
        ]
        lines = [f"drill: {self.fault} {self.node} (it ran: {', '.join(self.ran) or 'nothing'}"
                 + ("; swarm leader" if self.leader else "") + ")",
                 "  seconds after the fault:"]
        for key, label in labels:
            if key in self.figures:
                where = f"  ({self.where[key]})" if key in self.where else ""
                lines.append(f"    {label:<46} {fmt(key)}{where}")
        lines.append("  seconds after the node was restored:")
        for key, label in (("restored", "node restored (boot/heal/start) took"),
                           ("heal", "Gluster healed (all bricks up, 0 entries)"),
                           ("galera_synced", "Galera Synced on every node"),
                           ("converged", "whole cluster converged (doit status clean)")):
            if key in self.figures:
                lines.append(f"    {label:<46} {fmt(key)}")
        if self.watch is not None:
            lines += self.watch.lines({"ha": "Home Assistant (HTTP)", "mqtt": "MQTT round trip",
                                       "galera": "Galera write"})
        lines += [f"  INCIDENT: {i}" for i in self.incidents()]
        if self.lost:
            lines.append("  LOST: " + "; ".join(self.lost))
        else:
            lines.append(f"  nothing lost: {self.rows_committed} Galera rows (1 before the fault, "
                         f"the rest committed during it), the file on Gluster, the retained MQTT "
                         "message")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Pieces


def choose_target(st: ClusterStatus, node: str | None) -> str:
    """The node to take down: `node`, else the one running Home Assistant."""
    if node:
        st.cluster.node(node)  # KeyError naming the nodes
        return node
    ha = st.ha_nodes()
    if not ha:
        raise DrillError("Home Assistant runs on no node: nothing to fail over "
                         "(see `doit status`)")
    return ha[0]


def check_fault(faults: Faults, fault: str) -> None:
    """Refuse faults this cluster cannot have."""
    if fault not in FAULTS:
        raise DrillError(f"unknown fault {fault!r}: choose one of {', '.join(FAULTS)}")
    if fault not in faults.kinds:
        raise DrillError(f"--fault {fault} needs the lab (it ends a simulated node); on a real "
                         "cluster use --fault docker (or pull the plug yourself and watch "
                         "`doit status`)")


def start_watch(c: Cluster, faults: Faults, log: Callable[[str], None]) -> Any:
    """Continuous probes and census (tasks/watch.py), looking into nodes as `faults` can."""
    from tasks import watch
    from tasks.mqtt_client import MQTT_USER, mqtt_password

    return watch.Watch(c, faults.run_on(), mqtt_user=MQTT_USER,
                       mqtt_password=mqtt_password(c), log=log).start()


# ---------------------------------------------------------------------------------------------
# Fault and restore


class Faults(Protocol):
    """How a drill takes a node down and brings it back, and how it looks into the nodes:
    `DockerFaults` on a real cluster, `lab.faults.LabFaults` in the lab (kill, cut too)."""

    kinds: tuple[str, ...]

    def inject(self, kind: str, node: str) -> threading.Thread | None:
        """Take `node` down; a thread still at work (join it before `restore`), if any."""

    def restore(self, kind: str, node: str) -> None:
        """Bring `node` back."""

    def run_on(self) -> RunOn:
        """How the watch runs a command on a node (see tasks/watch.py)."""


class DockerFaults:
    """A real cluster: the one fault is stopping a node's Docker engine, over SSH."""

    kinds: tuple[str, ...] = ("docker",)

    def __init__(self, c: Cluster) -> None:
        self.c = c

    def inject(self, kind: str, node: str) -> threading.Thread | None:
        """Stop the engine in the background: its containers stop gracefully, up to their stop
        grace periods, while the probes run."""
        def stop() -> None:
            try:
                with Remote(self.c) as r:
                    r.run(node, "drill: stop docker", DOCKER_STOP, timeout=180)
            except RemoteError as e:  # reported by run_drill after the join
                STOP_ERRORS[node] = str(e)

        thread = threading.Thread(target=stop, name="drill-stop-docker", daemon=True)
        thread.start()
        return thread

    def restore(self, kind: str, node: str) -> None:
        with Remote(self.c) as r:
            r.run(node, "drill: start docker", DOCKER_START, timeout=180)

    def run_on(self) -> RunOn:
        from tasks.watch import remote_runner

        r = Remote(self.c)
        r.redact(*_secret_values(self.c))
        return remote_runner(r)


# ---------------------------------------------------------------------------------------------
# Converging

# Seconds a brick may run without a port (glusterd lost its sign-in) before the drill restarts it.
PORT_LOST_REPAIR = 20.0


def _repair_bricks(c: Cluster, st: ClusterStatus, log: Callable[[str], None],
                   notes: list[str] | None) -> None:
    from tasks.gluster import restart_bricks
    from tasks.ops import StepError

    by = next((x for x in st.nodes if x.reachable), None)
    if by is None:
        return
    try:
        with Remote(c) as r:
            fixed = restart_bricks(c, r, c.node(by.name), "drill: brick repair")
    except (RemoteError, StepError) as e:
        log(f"restarting a brick that has no port failed: {e}")
        return
    if fixed:
        msg = (f"brick(s) {', '.join(fixed)} ran without a port for {PORT_LOST_REPAIR:g} s "
               "after the restore: restarted, as `doit setup` does")
        log(msg)
        if notes is not None:
            notes.append(msg)


def converge(c: Cluster, t_restore: float, timeout: float, log: Callable[[str], None],
             notes: list[str] | None = None,
             ) -> tuple[dict[str, float | None], ClusterStatus | None]:
    """Poll `doit status` until clean; the first moments Gluster had healed and Galera was
    Synced everywhere, and the whole status clean (seconds from `t_restore`).

    A brick that runs without a port for PORT_LOST_REPAIR s is restarted as `doit setup` would
    (glusterd never does it by itself), and the repair is added to `notes`."""
    figures: dict[str, float | None] = {"heal": None, "galera_synced": None, "converged": None}
    n = len(c.nodes)
    last: list[str] = []
    st = None
    port_lost_since: float | None = None
    while time.monotonic() - t_restore < timeout:
        st = status.gather(c)
        now = time.monotonic() - t_restore
        bricks = [x.brick for x in st.nodes]
        if not any(x.brick is not None and x.brick.port_lost for x in st.nodes):
            port_lost_since = None
        elif port_lost_since is None:
            port_lost_since = now
        elif now - port_lost_since >= PORT_LOST_REPAIR:
            _repair_bricks(c, st, log, notes)
            port_lost_since = None
        if figures["heal"] is None and st.gluster_known and all(
                b is not None and b.online and b.exact and b.heal_pending == 0
                for b in bricks):
            figures["heal"] = now
            log(f"Gluster healed: {now:.1f} s after the restore")
        ms = st.galera_members()
        if figures["galera_synced"] is None and len(ms) == n and all(
                m.synced and m.cluster_size == n for m in ms):
            figures["galera_synced"] = now
            log(f"Galera: {n} Synced, size {n}: {now:.1f} s after the restore")
        problems = st.problems()
        if not problems and figures["heal"] is not None and figures["galera_synced"] is not None:
            figures["converged"] = now
            log(f"converged: {now:.1f} s after the restore")
            return figures, st
        if problems != last:
            log(f"waiting ({now:.0f} s): " + "; ".join(problems))
            last = problems
        time.sleep(2)
    return figures, st


# ---------------------------------------------------------------------------------------------
# The drill


def run_drill(c: Cluster, fault: str = "", node: str | None = None, *,
              faults: Faults | None = None,
              confirm: Callable[[str], bool] | None = None,
              log: Callable[[str], None] | None = None,
              measure_timeout: float = MEASURE_TIMEOUT,
              converge_timeout: float = CONVERGE_TIMEOUT,
              ready_timeout: float = READY_TIMEOUT, names: bool = True,
              during: Callable[[str], None] | None = None,
              watch_after: float = WATCH_AFTER) -> DrillResult:
    """The whole drill (see the module docstring). `faults`: how to take the node down (default:
    `DockerFaults`; the lab passes its own). `confirm(question)` is asked before a fault
    on a real cluster (None: refuse unless it is the lab). `names`: also measure the mDNS name
    (up to a minute or more). `during(target)` is called once the failover figures are in,
    before the node is restored (tests look at the degraded cluster there). `watch_after`:
    seconds of continuous probing after the cluster has converged again. Raises DrillError
    when it cannot start; once the fault is injected, the node is always restored."""
    from tasks.failover import failover_probes, measure
    from tasks.markers import cleanup, verify, write_markers
    from tasks.mqtt_client import mqtt_password

    say = log or (lambda msg: print(f"drill: {msg}", flush=True))
    faults = faults or DockerFaults(c)
    fault = fault or faults.kinds[0]
    check_fault(faults, fault)
    password = mqtt_password(c)  # fails early without secrets
    del password

    say("checking that the cluster is healthy first")
    try:
        st = status.wait_converged(c, ready_timeout, log=say)
    except TimeoutError as e:
        raise DrillError(f"the cluster is not healthy, not starting a drill: {e}") from None
    target = choose_target(st, node)
    tn = st.node(target)
    result = DrillResult(fault=fault, node=target,
                         ran=sorted(st.runs(target)),
                         leader=bool(tn.swarm and tn.swarm.leader))
    if fault == "docker" and not c.lab:
        question = (f"stop Docker on {target} ({tn.address}), which runs "
                    f"{', '.join(result.ran) or 'nothing'}? Home Assistant is unavailable until "
                    "it has moved")
        if confirm is None or not confirm(question):
            raise DrillError("not confirmed: nothing was changed")

    with Remote(c) as r:
        r.redact(*_secret_values(c))
        markers = write_markers(r, c, st, target, fault, say)
    wait = c.mqtt.autosave_interval + 2 - (time.monotonic() - markers.published_at)
    if wait > 0:
        say(f"waiting {wait:.0f} s (longer than mqtt.autosave_interval "
            f"{c.mqtt.autosave_interval} s: the broker saves the retained message)")
        time.sleep(wait)

    committed: list[str] = []
    watcher = start_watch(c, faults, say)
    time.sleep(WATCH_BEFORE)
    say(f"fault: {fault} {target}")
    t0 = time.monotonic()
    stopping = faults.inject(fault, target)
    watcher.mark_fault(t0)
    try:
        with Remote(c) as r:
            r.redact(*_secret_values(c))
            probes = failover_probes(r, c, st, target, fault, markers, committed, names)
            figures, where = measure(probes, t0, measure_timeout, say)
        if during is not None:
            during(target)
    finally:
        if stopping is not None:
            stopping.join(240)
            if target in STOP_ERRORS:
                result.notes.append(f"stopping Docker failed: {STOP_ERRORS.pop(target)}")
        say(f"restoring {target}")
        t_restore = time.monotonic()
        faults.restore(fault, target)
        result.figures["restored"] = time.monotonic() - t_restore
    result.figures.update(figures)
    result.where.update(where)
    done, final = converge(c, t_restore, converge_timeout, say, result.notes)
    result.figures.update(done)
    if watch_after > 0:
        say(f"probing {watch_after:g} s more (late moves and restarts count too)")
        time.sleep(watch_after)
    result.watch = watcher.stop()
    rows = [markers.token, *committed, *result.watch.committed]
    result.rows_committed = len(rows)
    if final is None or watch_after > 0:  # a container may have been replaced meanwhile
        try:  # read the rows through the db containers that run now
            final = status.wait_converged(c, RECHECK_TIMEOUT)
        except TimeoutError:
            final = status.gather(c)
    with Remote(c) as r:
        r.redact(*_secret_values(c))
        result.lost = verify(r, c, final, markers, rows)
        if not result.lost:
            cleanup(r, c, markers)
    if "mosquitto" not in result.ran and "mqtt" in result.figures:
        result.notes.append(f"Mosquitto did not run on {target}: its figures show how long it "
                            "was unreachable for other reasons (0 if never)")
    if done["converged"] is None:
        result.notes.append(f"the cluster did not converge within {converge_timeout:g} s after "
                            "the restore: see `doit status`")
    return result


def _secret_values(c: Cluster) -> list[str]:
    return secret_values(c)


# ---------------------------------------------------------------------------------------------
# doit


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise DrillError(f"{question}\nstdin is not a terminal: pass --yes to confirm")
    answer = input(f"{question} [y/N] ").strip().lower()
    return answer in ("y", "yes")


def drill_task(c: Cluster, make_faults: Callable[[Cluster], Faults] | None = None
               ) -> dict[str, Any]:
    """The `doit drill` task dict; `make_faults` gives the faults this cluster can have (dodo.py
    passes the lab's for the lab; default: `DockerFaults`)."""

    def action(fault: str = "", node: str = "", yes: bool = False,
               after: float = WATCH_AFTER) -> Any:
        faults = (make_faults or DockerFaults)(c)
        try:
            result = run_drill(c, fault, node or None, faults=faults,
                               confirm=(lambda q: True) if yes else _confirm,
                               watch_after=after)
        except (DrillError, RemoteError, KeyError, TimeoutError, OSError) as e:
            return TaskFailed(redact(f"drill: {e}", _secret_values(c)))
        print(result.report(), flush=True)
        if not result.ok:
            return TaskFailed("drill: something was lost, the cluster did not converge, "
                              "or Home Assistant was disturbed by another node's fault "
                              "(see above)")
        return None

    return {
        "actions": [action],
        "params": [
            {"name": "fault", "long": "fault", "short": "f", "type": str, "default": "",
             "help": "kill | cut (lab only) | docker (stop the Docker engine); default: kill "
                     "in the lab, docker on a real cluster"},
            {"name": "node", "long": "node", "short": "n", "type": str, "default": "",
             "help": "the node to take down (default: the one running Home Assistant)"},
            {"name": "yes", "long": "yes", "type": bool, "default": False,
             "help": "do not ask before stopping Docker on a real cluster"},
            {"name": "after", "long": "after", "type": float, "default": WATCH_AFTER,
             "help": "seconds of continuous probing once the cluster has converged again"},
        ],
        "uptodate": [False],
        "verbosity": 2,
    }
