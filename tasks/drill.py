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

import shlex
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tasks.config import Cluster
from tasks.errors import HaswarmError
from tasks.service import service

if TYPE_CHECKING:
    from tasks.remote import Remote
    from tasks.status import ClusterStatus
    from tasks.watch import RunOn, WatchReport

FAULTS = ("kill", "cut", "docker")
DB_NAME = "haswarm"
TABLE = "haswarm_drill"
MQTT_USER = "homeassistant"
TOPIC_PREFIX = "haswarm/drill"
DRILL_DIR = ".haswarm-drill"
# Seconds: how long to wait for each failover figure, for the restored node to converge, for
# the cluster to be healthy before the drill.
MEASURE_TIMEOUT = 180.0
CONVERGE_TIMEOUT = 600.0
READY_TIMEOUT = 300.0
# Seconds between two polls of each probe.
POLL = 0.5
VIP_POLL = 0.2
MDNS_POLL = 1.0
# The cron restarts Avahi every minute: a name that has not moved after this never will.
MDNS_TIMEOUT = 150.0
# Seconds of continuous probing before the fault, and after the cluster has converged again
# (swarm's late decisions, e.g. a healthy node declared Down by a new leader, come after).
WATCH_BEFORE = 3.0
WATCH_AFTER = 120.0

# Start/stop the Docker engine (systemd on a Pi, the lab's stand-in otherwise).
DOCKER_STOP = service("docker", "stop", units="docker.socket docker.service")
DOCKER_START = service("docker", "start", units="docker.socket docker.service")


# Errors of the background `docker stop` of a docker fault, by node.
STOP_ERRORS: dict[str, str] = {}


class DrillError(HaswarmError):
    """The drill cannot start or go on; str() says why and what to do."""


# ---------------------------------------------------------------------------------------------
# MQTT (paho-mqtt, synchronous: the client's loop is driven here, no thread)


def _paho() -> Any:
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise DrillError("the drill needs paho-mqtt on this computer: pip install "
                         "'paho-mqtt>=2.0'") from None
    return mqtt


class MQTTSession:
    """One authenticated MQTT 3.1.1 connection; raises OSError/TimeoutError when the broker
    does not accept it within `timeout`."""

    def __init__(self, host: str, port: int, user: str, password: str,
                 timeout: float = 2.0) -> None:
        mqtt = _paho()
        self.timeout = timeout
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"haswarm-drill-{uuid.uuid4().hex[:10]}",
                                  protocol=mqtt.MQTTv311, clean_session=True)
        self.client.username_pw_set(user, password)
        self.client.connect_timeout = timeout
        self.messages: dict[str, bytes] = {}
        self._rc: str | None = None

        def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
            self._rc = str(rc)

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            if msg.retain:
                self.messages[msg.topic] = msg.payload

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.connect(host, port, keepalive=15)
        self._until(lambda: self._rc is not None, timeout)
        if self._rc != "Success":
            self.close()
            raise OSError(f"MQTT broker {host}:{port} refused the login: {self._rc}")

    def _until(self, cond: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from the MQTT broker")
            rc = self.client.loop(timeout=0.05)
            if rc != 0 and not cond():
                raise OSError(f"MQTT connection lost ({rc})")

    def publish_retained(self, topic: str, payload: str) -> None:
        """Publish a retained message with QoS 1 and wait for the broker's PUBACK."""
        info = self.client.publish(topic, payload, qos=1, retain=True)
        self._until(info.is_published, self.timeout * 3)

    def read_retained(self, topic: str, timeout: float = 5.0) -> bytes | None:
        """The retained message of `topic`, None when the broker has none."""
        self.client.subscribe(topic, qos=1)
        try:
            self._until(lambda: topic in self.messages, timeout)
        except TimeoutError:
            return None
        return self.messages[topic]

    def close(self) -> None:
        """Disconnect (quietly when the connection is already gone)."""
        try:
            self.client.disconnect()
            self.client.loop(timeout=0.05)
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass


def mqtt_accepts(host: str, port: int, user: str, password: str, timeout: float = 1.5) -> bool:
    """Does the broker at host:port accept this login (CONNACK 0) within `timeout`?"""
    try:
        MQTTSession(host, port, user, password, timeout).close()
        return True
    except (OSError, TimeoutError):
        return False


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


def mqtt_password(c: Cluster) -> str:
    """The generated password of the `homeassistant` MQTT user (secrets/<name>/)."""
    from tasks import secrets

    try:
        return secrets.read(c, f"mqtt_{MQTT_USER}")
    except OSError:
        raise DrillError(f"no MQTT password in {secrets.directory(c)}: run `doit setup` "
                         "first") from None


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


def sql(r: Remote, node: str, container: str, statements: str, timeout: float = 20) -> str:
    """Run SQL as root over the db container's unix socket (no password anywhere); rows
    tab-separated. RemoteError when it fails or takes longer than `timeout`."""
    cmd = (f"timeout {timeout:g} docker exec -i {shlex.quote(container)} mariadb --batch "
           "--skip-column-names")
    return r.run(node, "drill: sql", cmd, stdin=statements, timeout=timeout + 5).stdout


def _q(value: str) -> str:
    """A SQL string literal (the values here are ours: hex tokens, node and fault names)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def insert_sql(token: str, node: str, fault: str, phase: str, create: bool = True) -> str:
    """Insert one row; with `create`, create the database and table first if needed (DDL runs
    in total order on every Galera node: not for the rows written during a fault)."""
    ddl = (f"CREATE DATABASE IF NOT EXISTS {DB_NAME};\n"
           f"CREATE TABLE IF NOT EXISTS {DB_NAME}.{TABLE} (id BIGINT AUTO_INCREMENT PRIMARY "
           "KEY, token VARCHAR(64) NOT NULL, node VARCHAR(64), fault VARCHAR(16), "
           "phase VARCHAR(16), created TIMESTAMP(3) DEFAULT CURRENT_TIMESTAMP(3), "
           "KEY (token)) ENGINE=InnoDB;\n") if create else ""
    return (ddl + f"INSERT INTO {DB_NAME}.{TABLE} (token, node, fault, phase) VALUES "
            f"({_q(token)}, {_q(node)}, {_q(fault)}, {_q(phase)});\n")


def select_sql(tokens: list[str]) -> str:
    """The tokens of `tokens` present in the table (causal read: wsrep_sync_wait)."""
    values = ", ".join(_q(t) for t in tokens)
    return (f"SET SESSION wsrep_sync_wait = 1;\n"
            f"SELECT token FROM {DB_NAME}.{TABLE} WHERE token IN ({values});\n")


def missing_rows(expected: list[str], output: str) -> list[str]:
    """Tokens of `expected` absent from a select_sql output."""
    have = {line.strip() for line in output.splitlines() if line.strip()}
    return [t for t in expected if t not in have]


@dataclass
class Markers:
    """What was written before the fault, to be read back after it."""

    token: str
    rows: list[str]  # tokens of committed rows
    file: str  # path on the Gluster mount
    topic: str
    payload: str
    published_at: float = 0.0  # time.monotonic()


def db_container(st: ClusterStatus, node: str) -> str | None:
    """The running db container on `node`, if any."""
    for ct in st.node(node).running("db"):
        return ct.id
    return None


def write_markers(r: Remote, c: Cluster, st: ClusterStatus, target: str, fault: str,
                  log: Callable[[str], None]) -> Markers:
    """The row, the file and the retained message (see the module docstring)."""
    token = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:12]}"
    m = Markers(token=token, rows=[token],
                file=f"{c.gluster.mount_point}/{DRILL_DIR}/{token}",
                topic=f"{TOPIC_PREFIX}/{token}", payload=f"haswarm drill {token}")
    # Galera: commit on the target when it runs a db (a commit is replicated before it returns)
    db_node = target if db_container(st, target) else next(
        (n.name for n in st.nodes if db_container(st, n.name)), None)
    if db_node is None:
        raise DrillError("no db container runs: cannot write the Galera marker")
    sql(r, db_node, db_container(st, db_node) or "", insert_sql(token, target, fault, "before"))
    log(f"wrote row {token} to {DB_NAME}.{TABLE} through {db_node}")
    # Gluster: through the target's mount, flushed
    d = shlex.quote(f"{c.gluster.mount_point}/{DRILL_DIR}")
    f = shlex.quote(m.file)
    r.run(target, "drill: gluster marker",
          f"mkdir -p {d} && printf '%s' {shlex.quote(m.payload)} > {f}.tmp && sync {f}.tmp "
          f"&& mv {f}.tmp {f} && sync {d}", timeout=30)
    log(f"wrote {m.file} through {target}'s mount")
    # MQTT: a retained message, through whichever node accepts the login
    host = broker_address(c, st)
    if host is None:
        raise DrillError("no MQTT broker accepts a login: cannot write the MQTT marker")
    session = MQTTSession(host, c.mqtt.port, MQTT_USER, mqtt_password(c))
    try:
        session.publish_retained(m.topic, m.payload)
    finally:
        session.close()
    m.published_at = time.monotonic()
    log(f"published a retained message on {m.topic} through {host}")
    return m


def broker_address(c: Cluster, st: ClusterStatus | None = None,
                   exclude: tuple[str, ...] = ()) -> str | None:
    """An address where the broker accepts the homeassistant login: the VIP first, then the
    nodes (host publish mode: only the node running it)."""
    password = mqtt_password(c)
    hosts = ([c.vip.address] if c.vip.address else []) + [
        n.address for n in c.nodes if n.name not in exclude]
    for host in hosts:
        if host and mqtt_accepts(host, c.mqtt.port, MQTT_USER, password):
            return host
    return None


# ---------------------------------------------------------------------------------------------
# Measuring: probes polled in parallel until each succeeds


@dataclass
class Probe:
    """One figure: `check()` returns a truthy description once the thing works again."""

    key: str
    check: Callable[[], str | bool | None]
    interval: float = POLL
    timeout: float | None = None  # give up sooner than the drill's measure timeout


def measure(probes: list[Probe], t0: float, timeout: float,
            log: Callable[[str], None]) -> tuple[dict[str, float | None], dict[str, str]]:
    """Run every probe in its own thread until it succeeds or `timeout` seconds after `t0`.
    Returns ({key: seconds from t0 or None}, {key: what the check returned})."""
    figures: dict[str, float | None] = {}
    where: dict[str, str] = {}
    lock = threading.Lock()

    def run(p: Probe) -> None:
        while True:
            try:
                got = p.check()
            except Exception as e:  # noqa: BLE001 - a failing probe is "not yet"
                got = None
                last = f"{type(e).__name__}: {e}"
            else:
                last = ""
            now = time.monotonic()
            if got:
                with lock:
                    figures[p.key] = now - t0
                    if isinstance(got, str):
                        where[p.key] = got
                log(f"{p.key}: {now - t0:.1f} s" + (f" ({got})" if isinstance(got, str) else ""))
                return
            limit = timeout if p.timeout is None else min(timeout, p.timeout)
            if now - t0 > limit:
                with lock:
                    figures[p.key] = None
                log(f"{p.key}: not within {limit:g} s" + (f" (last: {last})" if last else ""))
                return
            time.sleep(p.interval)

    with ThreadPoolExecutor(max_workers=max(1, len(probes))) as pool:
        list(pool.map(run, probes))
    return figures, where


def failover_probes(r: Remote, c: Cluster, st: ClusterStatus, target: str, fault: str,
                    markers: Markers, committed: list[str], names: bool = True) -> list[Probe]:
    """The probes of step 3 (see the module docstring)."""
    from tasks.stack import http_answer

    survivors = [n for n in c.nodes if n.name != target]
    password = mqtt_password(c)
    probes: list[Probe] = []

    observer = next((n.name for n in survivors if st.node(n.name).manager), None)
    swarm = st.node(target).swarm

    def swarm_down() -> str | None:
        assert observer is not None and swarm is not None
        state = r.run(observer, "drill: node state",
                      f"timeout 5 docker node inspect --format '{{{{.Status.State}}}}' "
                      f"{shlex.quote(swarm.id)}", check=False, timeout=10).stdout.strip()
        return f"seen from {observer}" if state == "down" else None

    if observer is not None and swarm is not None and swarm.id:
        probes.append(Probe("swarm_down", swarm_down))

    db_survivors = [(n.name, db_container(st, n.name)) for n in survivors
                    if db_container(st, n.name)]
    counter = iter(range(1, 10**6))

    def galera_write() -> str | None:
        for name, cid in db_survivors:
            token = f"{markers.token}-w{next(counter)}"
            try:
                sql(r, name, cid or "", insert_sql(token, target, fault, "during", False),
                    timeout=3)
            except Exception:  # noqa: BLE001 - blocked (no primary component yet) or refused
                continue
            committed.append(token)
            return name
        return None

    if db_survivors:
        probes.append(Probe("galera", galera_write))

    def ha() -> str | None:
        for n in survivors:
            status = http_answer(n.address, c.homeassistant.port, timeout=1.0)
            if status is not None and status < 500:
                return n.name
        return None

    probes.append(Probe("ha", ha))

    def broker() -> str | None:
        for n in survivors:
            if mqtt_accepts(n.address, c.mqtt.port, MQTT_USER, password, timeout=1.0):
                return n.name
        return None

    probes.append(Probe("mqtt", broker))

    if c.vip.address:
        vip = c.vip.address

        def vip_ok() -> str | None:
            return vip if mqtt_accepts(vip, c.mqtt.port, MQTT_USER, password, timeout=0.5) \
                else None

        probes.append(Probe("vip", vip_ok, VIP_POLL))

    if names and c.mdns.restart_cron and survivors and st.node(target).running("mosquitto"):
        name = f"{c.mdns.name}.local"
        asker = survivors[0].name
        live = {n.address: n.name for n in survivors}

        def resolved() -> str:
            out = r.run(asker, "drill: mdns", f"timeout 3 avahi-resolve -4 -n {name}",
                        check=False, timeout=10).stdout.split()
            return out[1] if len(out) >= 2 else ""

        def mdns_live() -> str | None:
            addr = resolved()
            return f"{addr} ({live[addr]})" if addr in live else None

        def mdns_broker() -> str | None:
            addr = resolved()
            if addr in live and mqtt_accepts(addr, c.mqtt.port, MQTT_USER, password, 1.0):
                return f"{addr} ({live[addr]})"
            return None

        probes.append(Probe("mdns_live", mdns_live, MDNS_POLL, MDNS_TIMEOUT))
        probes.append(Probe("mdns_broker", mdns_broker, MDNS_POLL, MDNS_TIMEOUT))
    return probes


def start_watch(c: Cluster, faults: Faults, log: Callable[[str], None]) -> Any:
    """Continuous probes and census (tasks/watch.py), looking into nodes as `faults` can."""
    from tasks import watch

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
            from tasks.remote import Remote, RemoteError

            try:
                with Remote(self.c) as r:
                    r.run(node, "drill: stop docker", DOCKER_STOP, timeout=180)
            except RemoteError as e:  # reported by run_drill after the join
                STOP_ERRORS[node] = str(e)

        thread = threading.Thread(target=stop, name="drill-stop-docker", daemon=True)
        thread.start()
        return thread

    def restore(self, kind: str, node: str) -> None:
        from tasks.remote import Remote

        with Remote(self.c) as r:
            r.run(node, "drill: start docker", DOCKER_START, timeout=180)

    def run_on(self) -> RunOn:
        from tasks.remote import Remote
        from tasks.watch import remote_runner

        r = Remote(self.c)
        r.redact(*_secret_values(self.c))
        return remote_runner(r)


# ---------------------------------------------------------------------------------------------
# Converging and verifying


def converge(c: Cluster, t_restore: float, timeout: float,
             log: Callable[[str], None]) -> tuple[dict[str, float | None], ClusterStatus | None]:
    """Poll `doit status` until clean; the first moments Gluster had healed and Galera was
    Synced everywhere, and the whole status clean (seconds from `t_restore`)."""
    from tasks import status

    figures: dict[str, float | None] = {"heal": None, "galera_synced": None, "converged": None}
    n = len(c.nodes)
    last: list[str] = []
    st = None
    while time.monotonic() - t_restore < timeout:
        st = status.gather(c)
        now = time.monotonic() - t_restore
        bricks = [x.brick for x in st.nodes]
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


def verify(r: Remote, c: Cluster, st: ClusterStatus, m: Markers, rows: list[str]) -> list[str]:
    """Read every marker back; what is missing (empty: nothing lost)."""
    lost: list[str] = []
    for n in st.nodes:
        cid = db_container(st, n.name)
        if cid is None:
            lost.append(f"{n.name}: no db container to read the rows from")
            continue
        try:
            missing = missing_rows(rows, sql(r, n.name, cid, select_sql(rows)))
        except Exception as e:  # noqa: BLE001 - reported as a loss: it could not be read
            lost.append(f"{n.name}: rows not readable ({e})")
            continue
        if missing:
            lost.append(f"{n.name}: {len(missing)} of {len(rows)} committed rows missing "
                        f"({', '.join(missing[:3])}...)")
    for n in c.nodes:
        res = r.run(n, "drill: read gluster marker",
                    f"timeout 10 cat {shlex.quote(m.file)}", check=False, timeout=20)
        if res.stdout != m.payload:
            lost.append(f"{n.name}: {m.file} " + ("differs" if res.ok else "unreadable: "
                                                  + (res.stderr.strip()[:120] or "missing")))
    host = broker_address(c)
    if host is None:
        lost.append("no MQTT broker accepts a login: retained message not checked")
    else:
        session = MQTTSession(host, c.mqtt.port, MQTT_USER, mqtt_password(c))
        try:
            got = session.read_retained(m.topic)
        finally:
            session.close()
        if got is None:
            lost.append(f"retained MQTT message {m.topic} is gone (broker at {host})")
        elif got.decode(errors="replace") != m.payload:
            lost.append(f"retained MQTT message {m.topic} differs")
    return lost


def cleanup(r: Remote, c: Cluster, m: Markers) -> None:
    """Remove the file and the retained message (the rows stay: a log of the drills)."""
    r.run(c.nodes[0], "drill: cleanup", f"rm -f {shlex.quote(m.file)}", check=False, timeout=20)
    host = broker_address(c)
    if host:
        session = MQTTSession(host, c.mqtt.port, MQTT_USER, mqtt_password(c))
        try:
            session.publish_retained(m.topic, "")  # an empty retained message deletes it
        finally:
            session.close()


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
    from tasks import status
    from tasks.remote import Remote

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
                         ran=sorted({ct.service for ct in tn.containers
                                     if ct.service != "homeassistant"
                                     or target in st.ha_nodes()}),
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
    done, final = converge(c, t_restore, converge_timeout, say)
    result.figures.update(done)
    if watch_after > 0:
        say(f"probing {watch_after:g} s more (late moves and restarts count too)")
        time.sleep(watch_after)
    result.watch = watcher.stop()
    rows = [markers.token, *committed, *result.watch.committed]
    result.rows_committed = len(rows)
    if final is None:
        final = status.gather(c)
    with Remote(c) as r:
        r.redact(*_secret_values(c))
        result.lost = verify(r, c, final, markers, rows)
        if not result.lost:
            cleanup(r, c, markers)
    if tn.running("mosquitto") == [] and "mqtt" in result.figures:
        result.notes.append(f"Mosquitto did not run on {target}: its figures show how long it "
                            "was unreachable for other reasons (0 if never)")
    if done["converged"] is None:
        result.notes.append(f"the cluster did not converge within {converge_timeout:g} s after "
                            "the restore: see `doit status`")
    return result


def _secret_values(c: Cluster) -> list[str]:
    from tasks.stack import secret_values

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
        from doit.exceptions import TaskFailed

        from tasks.remote import RemoteError, redact

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
