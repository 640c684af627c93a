"""What a drill (or a chaos run, or an outage) writes before the fault and reads back after it:
a row in Galera, a file on the Gluster mount, a retained MQTT message (`Markers`), the SQL that
writes and reads the rows, and the check that nothing was lost."""

from __future__ import annotations

import shlex
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tasks.config import Cluster
from tasks.errors import DrillError
from tasks.mqtt_client import MQTT_USER, MQTTSession, broker_address, mqtt_password

if TYPE_CHECKING:
    from tasks.remote import Remote
    from tasks.status import ClusterStatus

DB_NAME = "haswarm"
TABLE = "haswarm_drill"
TOPIC_PREFIX = "haswarm/drill"
DRILL_DIR = ".haswarm-drill"


def sql(r: Remote, node: str, container: str, statements: str, timeout: float = 20,
        step: str = "drill: sql") -> str:
    """Run SQL as root over the db container's unix socket (no password anywhere); rows
    tab-separated. RemoteError (naming `step`) when it fails or takes longer than `timeout`."""
    cmd = (f"timeout {timeout:g} docker exec -i {shlex.quote(container)} mariadb --batch "
           "--skip-column-names")
    return r.run(node, step, cmd, stdin=statements, timeout=timeout + 5).stdout


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
    """The row, the file and the retained message (see tasks/drill.py's docstring, step 2)."""
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
