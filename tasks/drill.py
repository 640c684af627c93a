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

import os
import shlex
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tasks.config import Cluster
from tasks.service import service

if TYPE_CHECKING:
    from tasks.lab import Lab
    from tasks.remote import Remote
    from tasks.status import ClusterStatus
    from tasks.watch import WatchReport

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


class DrillError(Exception):
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
    ha = st.where("homeassistant")
    if not ha:
        raise DrillError("Home Assistant runs on no node: nothing to fail over "
                         "(see `doit status`)")
    return ha[0]


def check_fault(c: Cluster, fault: str) -> None:
    """Refuse faults this cluster cannot have."""
    if fault not in FAULTS:
        raise DrillError(f"unknown fault {fault!r}: choose one of {', '.join(FAULTS)}")
    if fault in ("kill", "cut") and not c.lab:
        raise DrillError(f"--fault {fault} needs the lab (it ends a simulated node); on a real "
                         "cluster use --fault docker (or pull the plug yourself and watch "
                         "`doit status`)")


def lab_for(c: Cluster) -> Lab:
    """The lab this cluster file describes (an instance lab with HASWARM_LAB_INSTANCE)."""
    from tasks.lab import Lab, instance_lab

    instance = os.environ.get("HASWARM_LAB_INSTANCE", "")
    if instance:
        return instance_lab(instance, len(c.nodes))
    return Lab(c)


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


def start_watch(c: Cluster, lab: Lab | None, log: Callable[[str], None]) -> Any:
    """Continuous probes and census (tasks/watch.py), through the lab or over SSH."""
    from tasks import watch
    from tasks.remote import Remote

    if lab is not None:
        run_on = watch.lab_runner(lab)
    else:
        r = Remote(c)
        r.redact(*_secret_values(c))
        run_on = watch.remote_runner(r)
    return watch.Watch(c, run_on, mqtt_user=MQTT_USER, mqtt_password=mqtt_password(c),
                       log=log).start()


# ---------------------------------------------------------------------------------------------
# Fault and restore


def inject(c: Cluster, fault: str, target: str, lab: Lab | None
           ) -> tuple[float, threading.Thread | None]:
    """Take `target` down; returns the moment of the fault (time.monotonic()) and, for the
    docker fault, the thread still stopping the engine (containers stop gracefully, up to their
    stop grace periods: the probes run meanwhile; join it before the restore)."""
    from tasks.remote import Remote

    if fault in ("kill", "cut"):
        assert lab is not None
        t0 = time.monotonic()
        if fault == "kill":
            lab.kill(target)
        else:
            lab.cut(target)
        return t0, None

    def stop() -> None:
        from tasks.remote import RemoteError

        try:
            with Remote(c) as r:
                r.run(target, "drill: stop docker", DOCKER_STOP, timeout=180)
        except RemoteError as e:  # reported by run_drill after the join
            STOP_ERRORS[target] = str(e)

    t0 = time.monotonic()
    thread = threading.Thread(target=stop, name="drill-stop-docker", daemon=True)
    thread.start()
    return t0, thread


def restore(c: Cluster, fault: str, target: str, lab: Lab | None) -> None:
    """Bring `target` back (lab: boot / heal; docker: start the engine)."""
    from tasks.remote import Remote

    if fault == "kill":
        assert lab is not None
        lab.boot(target)
    elif fault == "cut":
        assert lab is not None
        lab.heal(target)
    else:
        with Remote(c) as r:
            r.run(target, "drill: start docker", DOCKER_START, timeout=180)


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
              confirm: Callable[[str], bool] | None = None,
              log: Callable[[str], None] | None = None,
              measure_timeout: float = MEASURE_TIMEOUT,
              converge_timeout: float = CONVERGE_TIMEOUT,
              ready_timeout: float = READY_TIMEOUT, names: bool = True,
              during: Callable[[str], None] | None = None,
              watch_after: float = WATCH_AFTER) -> DrillResult:
    """The whole drill (see the module docstring). `confirm(question)` is asked before a fault
    on a real cluster (None: refuse unless it is the lab). `names`: also measure the mDNS name
    (up to a minute or more). `during(target)` is called once the failover figures are in,
    before the node is restored (tests look at the degraded cluster there). `watch_after`:
    seconds of continuous probing after the cluster has converged again. Raises DrillError
    when it cannot start; once the fault is injected, the node is always restored."""
    from tasks import status
    from tasks.remote import Remote

    say = log or (lambda msg: print(f"drill: {msg}", flush=True))
    fault = fault or ("kill" if c.lab else "docker")
    check_fault(c, fault)
    lab = lab_for(c) if c.lab else None
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
                         ran=sorted({ct.service for ct in tn.containers}),
                         leader=bool(tn.swarm and tn.swarm.leader))
    if not c.lab:
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
    watcher = start_watch(c, lab, say)
    time.sleep(WATCH_BEFORE)
    say(f"fault: {fault} {target}")
    t0, stopping = inject(c, fault, target, lab)
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
        restore(c, fault, target, lab)
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


# ---------------------------------------------------------------------------------------------
# Full outage (lab): every node down, then back, with no operator action


@dataclass(kw_only=True)
class OutageResult(Outcome):
    """What a full outage measured: seconds from the first node's return (boot started)."""

    kill_plan: list[tuple[float, str]]
    boot_plan: list[tuple[float, str]]

    def report(self) -> str:
        """The figures as a few lines for people."""
        def plan(p: list[tuple[float, str]]) -> str:
            return ", ".join(f"{n}@{t:g}s" for t, n in p)

        def fmt(key: str) -> str:
            v = self.figures.get(key)
            return "never (timeout)" if v is None else f"{v:.1f} s"

        lines = [f"outage: killed {plan(self.kill_plan)}; booted {plan(self.boot_plan)}",
                 "  seconds after the first node came back:"]
        for key, label in (("galera", "Galera commits a write"),
                           ("mqtt", "Mosquitto accepts a login"),
                           ("ha", "Home Assistant answers HTTP"),
                           ("converged", "whole cluster converged (doit status clean)")):
            where = f"  ({self.where[key]})" if key in self.where else ""
            lines.append(f"    {label:<46} {fmt(key)}{where}")
        lines.append(("  LOST: " + "; ".join(self.lost)) if self.lost else
                     f"  nothing lost: {self.rows_committed} Galera rows, the file on Gluster, "
                     "the retained MQTT message")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _write_rows(r: Remote, st: ClusterStatus, nodes: list[str], prefix: str, count: int,
                phase: str, timeout: float = 60) -> list[str]:
    """Commit `count` rows through the db containers of `nodes` in turn (retrying while no
    primary component accepts them); their tokens."""
    tokens: list[str] = []
    deadline = time.monotonic() + timeout
    i = 0
    while len(tokens) < count and time.monotonic() < deadline:
        node = nodes[i % len(nodes)]
        cid = db_container(st, node)
        i += 1
        if cid is None:
            continue
        token = f"{prefix}-{phase}-{len(tokens)}"
        try:
            sql(r, node, cid, insert_sql(token, node, "outage", phase, False), timeout=5)
        except Exception:  # noqa: BLE001 - not Primary (yet): try again / another node
            time.sleep(0.5)
            continue
        tokens.append(token)
    return tokens


def run_outage(c: Cluster, kill_plan: list[tuple[float, str]] | None = None,
               boot_plan: list[tuple[float, str]] | None = None, *,
               log: Callable[[str], None] | None = None, rows: int = 10,
               measure_timeout: float = 600.0, converge_timeout: float = CONVERGE_TIMEOUT,
               ready_timeout: float = READY_TIMEOUT) -> OutageResult:
    """Lab only: kill every node (`kill_plan`: (seconds from the first kill, node); default:
    all at once), boot them (`boot_plan`: (seconds from the first boot, node); default: all
    at once, in cluster order), measure from the first boot until Galera commits, Mosquitto
    accepts a login and Home Assistant answers, wait until converged, read every marker back.
    Between staggered kills, rows are committed on the nodes still alive (while they form a
    primary component): the last to die hold rows the first lack."""
    from tasks import status
    from tasks.remote import Remote

    say = log or (lambda msg: print(f"outage: {msg}", flush=True))
    if not c.lab:
        raise DrillError("a full outage is a lab drill: it kills every node")
    lab = lab_for(c)
    names = c.names
    kill_plan = kill_plan or [(0.0, n) for n in names]
    boot_plan = boot_plan or [(0.0, n) for n in names]
    result = OutageResult(kill_plan=kill_plan, boot_plan=boot_plan)
    say("checking that the cluster is healthy first")
    try:
        st = status.wait_converged(c, ready_timeout, log=say)
    except TimeoutError as e:
        raise DrillError(f"the cluster is not healthy, not starting: {e}") from None
    with Remote(c) as r:
        r.redact(*_secret_values(c))
        markers = write_markers(r, c, st, names[0], "outage", say)
        committed = [markers.token, *_write_rows(r, st, names, markers.token, rows, "before")]
    wait = c.mqtt.autosave_interval + 2 - (time.monotonic() - markers.published_at)
    if wait > 0:
        say(f"waiting {wait:.0f} s (longer than mqtt.autosave_interval)")
        time.sleep(wait)

    groups: dict[float, list[str]] = {}
    for delay, node in sorted(kill_plan):
        groups.setdefault(delay, []).append(node)
    alive = list(names)
    t_kill = time.monotonic()
    try:
        for delay, group in groups.items():
            if t_kill + delay > time.monotonic() and len(alive) > 1:
                # rows only the nodes still alive will have (while they are a primary component)
                budget = max(1.0, min(30.0, t_kill + delay - time.monotonic()))
                with Remote(c) as r:
                    r.redact(*_secret_values(c))
                    got = _write_rows(r, st, alive, markers.token, 3, f"before-{group[0]}",
                                      timeout=budget)
                committed += got
                say(f"committed {len(got)} rows on {', '.join(alive)}")
            time.sleep(max(0.0, t_kill + delay - time.monotonic()))
            pids = [p for p in (lab.pid(n) for n in group) if p is not None]
            for pid in pids:  # the whole group dies at the same instant
                os.kill(pid, signal.SIGKILL)
            for n in group:
                lab.kill(n)  # reaps and removes the node's netns, veth, cgroups
                alive.remove(n)
            say(f"killed {', '.join(group)} at {time.monotonic() - t_kill:.1f} s")
    finally:
        t_return = time.monotonic()

        def boot_all() -> None:
            waves: dict[float, list[str]] = {}
            for delay, node in sorted(boot_plan):
                waves.setdefault(delay, []).append(node)
            for delay, wave in waves.items():
                time.sleep(max(0.0, t_return + delay - time.monotonic()))
                say(f"booting {', '.join(wave)} at {time.monotonic() - t_return:.1f} s")
                # nodes due at the same moment boot in parallel (each waits for its own services)
                with ThreadPoolExecutor(max_workers=len(wave)) as pool:
                    list(pool.map(lab.boot, wave))
            for n in names:  # a node the plan missed comes back too
                if lab.pid(n) is None:
                    lab.boot(n)

        booter = threading.Thread(target=boot_all, name="outage-boot")
        booter.start()
    try:
        from tasks.stack import http_answer

        password = mqtt_password(c)

        def ha() -> str | None:
            for n in c.nodes:
                code = http_answer(n.address, c.homeassistant.port, timeout=1.0)
                if code is not None and code < 500:
                    return n.name
            return None

        def broker() -> str | None:
            for n in c.nodes:
                if mqtt_accepts(n.address, c.mqtt.port, MQTT_USER, password, timeout=1.0):
                    return n.name
            return None

        after: list[str] = []

        def galera() -> str | None:
            fresh = status.gather(c)
            with Remote(c) as r:
                got = _write_rows(r, fresh, [n.name for n in fresh.nodes if n.reachable],
                                  markers.token, 1, "after", timeout=5)
            after.extend(got)
            return "committed" if got else None

        figures, where = measure(
            [Probe("galera", galera, 2.0), Probe("mqtt", broker, 1.0), Probe("ha", ha, 1.0)],
            t_return, measure_timeout, say)
        committed += after
        result.figures.update(figures)
        result.where.update(where)
    finally:
        booter.join()
    done, final = converge(c, t_return, converge_timeout, say)
    result.figures["converged"] = done["converged"]
    result.rows_committed = len(committed)
    final = final or status.gather(c)
    with Remote(c) as r:
        r.redact(*_secret_values(c))
        result.lost = verify(r, c, final, markers, committed)
        if not result.lost:
            cleanup(r, c, markers)
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


def task_drill() -> dict[str, Any]:
    """Take a node down on purpose; measure failover; restore; check nothing was lost."""
    from tasks.config import current

    c = current()

    def action(fault: str = "", node: str = "", yes: bool = False,
               after: float = WATCH_AFTER) -> Any:
        from doit.exceptions import TaskFailed

        from tasks.lab import LabError
        from tasks.remote import RemoteError, redact

        try:
            result = run_drill(c, fault, node or None,
                               confirm=(lambda q: True) if yes else _confirm,
                               watch_after=after)
        except (DrillError, RemoteError, LabError, KeyError, TimeoutError) as e:
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
