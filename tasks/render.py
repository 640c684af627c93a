"""Rendering: cluster model -> every file the cluster needs, in the build directory.

Each output is one doit subtask (`render:stack.yml`, ...). Its context is computed here, in Python;
templates in `stack/` only place values. A subtask re-runs when its template changes or when the
values it uses change (`config_changed` on its context), so editing one value of the cluster file
re-renders only the files that use it.

Docker configs and secrets are created outside the stack under names that carry a fingerprint of
their content (`haswarm_mosquitto_conf_1a2b3c4d5e`): a changed file is a new object, and
`docker stack deploy` then updates only the services that use it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from doit.tools import config_changed

from tasks import secrets
from tasks.config import PROJECT_ROOT, Cluster
from tasks.members import MEMBERS_DIR, MEMBERS_FILE

if TYPE_CHECKING:
    import jinja2

TEMPLATES = PROJECT_ROOT / "stack"
DB_NAME = "homeassistant"
DB_USER = "homeassistant"
HA_PURGE_KEEP_DAYS = 10
HA_DB_WAIT_SECONDS = 300
# How long the entrypoint waits for Home Assistant's own run lock (/config/.ha_run.lock, HA
# 2025.x+) once it holds ours: a predecessor's is normally released with ours, at most moments
# later.
HA_RUN_LOCK_WAIT_SECONDS = 60
LEADER_GUARD_INTERVAL = 5  # seconds between two looks of the leader guard
# Inside the HA container, on the shared volume: who holds it runs Home Assistant (one at most).
HA_LOCK_FILE = "/config/.haswarm/homeassistant.lock"
HA_LOCK_READY = "/tmp/haswarm-lock.ready"  # in the container: written once the lock is held
# The same for Mosquitto (its container's ready file has the same path).
MQTT_LOCK_FILE = "/mosquitto/data/.haswarm/mosquitto.lock"
# Mosquitto's store: the broker writes it in its container; the entrypoint copies it to the volume.
MQTT_STORE = {"local_store": "/mosquitto/store", "volume_store": "/mosquitto/data/mosquitto.db"}
# Mosquitto 2.x password hashes: PBKDF2-SHA512, 101 iterations, 12-byte salt ($7$ format).
_MQTT_ITERATIONS = 101
# The healthcheck's mosquitto_sub options (login and password): a Docker secret mounted as
# /run/secrets/mosquitto_sub, which mosquitto_sub reads with XDG_CONFIG_HOME=/run/secrets, so
# the password is on no command line (`ps` shows every argv on the node).
HEALTHCHECK_OPTIONS = "mosquitto/healthcheck-options"


def build_dir(c: Cluster) -> Path:
    return (PROJECT_ROOT / c.build_dir).resolve()


def volume_paths(c: Cluster) -> dict[str, str]:
    """Where each service keeps its state on the replicated Gluster mount."""
    m = c.gluster.mount_point
    return {"homeassistant": str(m / "homeassistant"),
            "mosquitto_data": str(m / "mosquitto" / "data"),
            "portainer": str(m / "portainer")}


# ---------------------------------------------------------------------------------------------
# Docker objects: key in the stack file -> file holding the content


def config_sources(c: Cluster) -> dict[str, Path]:
    b = build_dir(c)
    return {"mosquitto_conf": b / "mosquitto" / "mosquitto.conf",
            "mosquitto_acl": b / "mosquitto" / "acl",
            "galera_cnf": b / "galera.cnf",
            "ha_entrypoint": b / "homeassistant" / "haswarm-entrypoint.sh",
            "ha_lock": b / "homeassistant" / "haswarm-lock.py",
            "mqtt_entrypoint": b / "mosquitto" / "haswarm-entrypoint.sh"}


def secret_sources(c: Cluster) -> dict[str, Path]:
    out = {name: secrets.path(c, name) for name in secrets.names(c)}
    out["mosquitto_passwd"] = build_dir(c) / "mosquitto" / "passwd"
    out["mqtt_healthcheck_options"] = build_dir(c) / HEALTHCHECK_OPTIONS
    return out


def object_name(c: Cluster, key: str, source: Path) -> str:
    """The Docker object name for `key`: stack name, key and a fingerprint of the content."""
    fp = hashlib.sha256(b"haswarm:" + source.read_bytes()).hexdigest()[:10]
    return f"{c.name}_{key}_{fp}"


def docker_objects(c: Cluster) -> dict[str, dict[str, tuple[str, Path]]]:
    """{'configs': {key: (name, path)}, 'secrets': {...}} as the stack file names them."""
    return {kind: {key: (object_name(c, key, p), p) for key, p in sources.items()}
            for kind, sources in (("configs", config_sources(c)), ("secrets", secret_sources(c)))}


# ---------------------------------------------------------------------------------------------
# Contexts: everything a template uses, computed here


def mosquitto_password_line(user: str, password: str) -> str:
    """One line of a Mosquitto 2.x password file, as `mosquitto_passwd` writes it.

    The salt is derived from the password (HMAC), so re-rendering gives the same file and the
    Docker secret's name stays the same while the password does."""
    salt = hmac.new(password.encode(), b"haswarm-mosquitto:" + user.encode(),
                    hashlib.sha256).digest()[:12]
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _MQTT_ITERATIONS)
    return (f"{user}:$7${_MQTT_ITERATIONS}${base64.b64encode(salt).decode()}"
            f"${base64.b64encode(dk).decode()}")


# Discovery configs a device user may publish: read-only entities (HA shows them; nothing in
# HA acts on them), never switches, locks, covers... whose commands HA would send somewhere.
DEVICE_DISCOVERY = ("sensor", "binary_sensor")


def mqtt_acl(c: Cluster) -> list[tuple[str, list[tuple[str, str]]]]:
    """Mosquitto's ACL: [(user, [(access, topic pattern), ...]), ...]; a topic not listed for a
    user is denied to it.

    - `homeassistant`: everything (it is the hub: states, commands, discovery).
    - every other user of `mqtt.users` (devices, e.g. `sensors`): its own tree `USER/#` (set
      the devices' topic prefix to it, e.g. ESPHome `topic_prefix: sensors/kitchen`), the
      discovery configs of sensors and binary sensors (`homeassistant/sensor/...`,
      `homeassistant/binary_sensor/...`, with or without a node id) and HA's status topic
      (`homeassistant/status`, to announce again when HA restarts). Nothing else: no
      switch, light or lock discovery, no other user's topics, no `$SYS`.
    - the stack's healthcheck user: reading `$SYS/broker/uptime` only.
    """
    acl: list[tuple[str, list[tuple[str, str]]]] = []
    for user in c.mqtt.users:
        if user == "homeassistant":
            acl.append((user, [("readwrite", "#")]))
            continue
        rules = [("readwrite", f"{user}/#")]
        rules += [("write", f"homeassistant/{component}/{levels}config")
                  for component in DEVICE_DISCOVERY for levels in ("+/", "+/+/")]
        rules.append(("read", "homeassistant/status"))
        acl.append((user, rules))
    acl.append((secrets.HEALTHCHECK_MQTT_USER, [("read", "$SYS/broker/uptime")]))
    return acl


# Seconds without reaching a majority of the nodes after which HA's lock keeper takes its node
# for cut off and fences Home Assistant (stack/haswarm-lock.py.j2); fenced at the latest
# ISOLATED_AFTER + 1.5 s after a cut (a probe's timeout, the watchdog's period).
ISOLATED_AFTER = 3


def lock_hang(c: Cluster) -> int:
    """Seconds a write to Mosquitto's lock file may hang before its keeper fences the broker,
    when the image cannot probe the nodes (no nc): longer than a peer's death usually delays
    writes (the volume's ping timeout)."""
    return c.gluster.ping_timeout + 3


def lock_hang_probed(c: Cluster) -> int:
    """The same for a keeper that probes the nodes (HA's always; Mosquitto's with nc): a cut is
    caught by the probes, so this only stops a frozen mount. Long: Gluster declares a cut peer's
    brick dead only once the client stops sending to it, and writes waited 9 s in a lab cut with
    ping_timeout 5 (a healthy node fenced at ping + 3 then)."""
    return 2 * c.gluster.ping_timeout + 10


def client_drop(c: Cluster) -> int:
    """Seconds after which the bricks drop a silent client and release its locks
    (tasks.gluster_plans.server_keepalive): after a cut-off node's keeper has fenced HA
    (ISOLATED_AFTER + 1.5 s), with a margin."""
    return max(c.gluster.ping_timeout + 2, ISOLATED_AFTER + 4)


def lock_settle(c: Cluster) -> int:
    """Seconds a new Mosquitto lock holder waits when the last one did not release the lock: a
    flock moves off a cut node after ~ping_timeout + 1 s, its broker is fenced by lock_hang + 1 s
    at the latest (see stack/mosquitto-entrypoint.sh.j2)."""
    return lock_hang(c) - c.gluster.ping_timeout + 2


def stack_context(c: Cluster, *, bootstrap: bool) -> dict[str, Any]:
    """Values for stack.yml. `bootstrap` renders the first-deploy variant (seed only)."""
    n = len(c.nodes)
    replicas = ({"db_seed": 1, "db": 0, "homeassistant": 0} if bootstrap
                else {"db_seed": 0, "db": n, "homeassistant": n if c.ha_standby else 1})
    replicas["mosquitto"] = n if c.mqtt_standby else 1
    images = {k: v.node_ref for k, v in c.images if v is not None}  # as preloaded
    return {
        "name": c.name,
        "images": images,
        "time_zone": c.homeassistant.time_zone,
        "ha_port": c.homeassistant.port,
        "mqtt_port": c.mqtt.port,
        "portainer": c.portainer.enabled,
        "portainer_port": c.portainer.port,
        "publish_mode": c.swarm.publish_mode,
        "host_publish": c.swarm.publish_mode == "host",
        "restart_delay": _seconds(c.swarm.restart_delay),
        "members_dir": MEMBERS_DIR,
        "members_file": MEMBERS_FILE,
        "replicas": replicas,
        "ha_standby": c.ha_standby,
        "mqtt_standby": c.mqtt_standby,
        "lock_ready": HA_LOCK_READY,
        "lock_hang": lock_hang(c),
        "lock_hang_probed": lock_hang_probed(c),
        "isolated_after": ISOLATED_AFTER,
        "lock_settle": lock_settle(c),
        "client_drop": client_drop(c),
        "keeper_login": secrets.HA_KEEPER_LOGIN,
        "db_name": DB_NAME,
        "db_user": DB_USER,
        "paths": volume_paths(c),
    }


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _stack_objects(c: Cluster) -> dict[str, dict[str, str]]:
    return {kind: {k: name for k, (name, _) in objs.items()}
            for kind, objs in docker_objects(c).items()}


# ---------------------------------------------------------------------------------------------
# The outputs


@dataclass(frozen=True)
class Output:
    """One rendered file: template, static context, and files whose content it also reads."""

    target: str  # relative to the build directory; also the subtask name
    template: str
    context: dict[str, Any]
    reads: list[Path] = field(default_factory=list)
    late_context: Callable[[], dict[str, Any]] | None = None  # needs files made by other tasks
    mode: int = 0o644


def outputs(c: Cluster) -> list[Output]:
    """Every file `doit render` writes for this cluster."""
    outs = [
        Output("mosquitto/mosquitto.conf", "mosquitto.conf.j2",
               {"autosave_interval": c.mqtt.autosave_interval, **MQTT_STORE}),
        Output("mosquitto/acl", "mosquitto-acl.j2", {"acl": mqtt_acl(c)}),
        Output("galera.cnf", "galera.cnf.j2",
               {"buffer_pool": c.galera.buffer_pool, "gcache": c.galera.gcache,
                "sst_method": c.galera.sst_method}),
        Output("homeassistant/packages/haswarm/haswarm.yaml", "homeassistant-package.yaml.j2",
               {"purge_keep_days": HA_PURGE_KEEP_DAYS}),
        Output("homeassistant/configuration.yaml", "configuration.yaml.j2",
               {"time_zone": c.homeassistant.time_zone}),
        Output("homeassistant/haswarm-entrypoint.sh", "haswarm-entrypoint.sh.j2",
               {"db_wait_seconds": HA_DB_WAIT_SECONDS, "lock_file": HA_LOCK_FILE,
                "run_lock_wait_seconds": HA_RUN_LOCK_WAIT_SECONDS,
                "lock_ready": HA_LOCK_READY}, mode=0o755),
        Output("homeassistant/haswarm-lock.py", "haswarm-lock.py.j2", {}, mode=0o755),
        Output("mosquitto/haswarm-entrypoint.sh", "mosquitto-entrypoint.sh.j2",
               {"lock_file": MQTT_LOCK_FILE, "lock_ready": HA_LOCK_READY, **MQTT_STORE},
               mode=0o755),
    ]
    if c.swarm.leader_guard:
        outs.append(Output("leader-guard.sh", "leader-guard.sh.j2",
                           {"name": c.name, "interval": LEADER_GUARD_INTERVAL,
                            "managers": " ".join(c.manager_names),
                            "window": 60 - LEADER_GUARD_INTERVAL}, mode=0o755))
        outs.append(Output("leader-guard.cron", "leader-guard.cron.j2", {}))
    if c.mdns.restart_cron:
        outs.append(Output("avahi-restart.cron", "avahi-restart.cron.j2",
                           {"mdns_name": c.mdns.name, "restart_command": c.mdns.restart_command}))
    for node in c.nodes:
        others = [n.address for n in c.nodes if n.name != node.name]
        outs.append(Output(f"nodes/{node.name}/fstab", "fstab.j2",
                           {"volume": c.gluster.volume, "mount_point": str(c.gluster.mount_point),
                            "backup_servers": ":".join(others)}))

    users = secrets.mqtt_users(c)
    outs.append(Output(
        "mosquitto/passwd", "mosquitto-passwd.j2", {"users": users},
        reads=[secrets.path(c, f"mqtt_{u}") for u in users],
        late_context=lambda: {"lines": [mosquitto_password_line(u, secrets.read(c, f"mqtt_{u}"))
                                        for u in users]},
        mode=0o600,
    ))
    hc = secrets.HEALTHCHECK_MQTT_USER
    outs.append(Output(
        HEALTHCHECK_OPTIONS, "mosquitto-client-options.j2", {"user": hc},
        reads=[secrets.path(c, f"mqtt_{hc}")],
        late_context=lambda: {"password": secrets.read(c, f"mqtt_{hc}")},
        mode=0o600,
    ))
    objects_inputs = [*config_sources(c).values(), *secret_sources(c).values()]
    for target, bootstrap in (("stack.yml", False), ("stack.bootstrap.yml", True)):
        outs.append(Output(target, "stack.yml.j2", stack_context(c, bootstrap=bootstrap),
                           reads=objects_inputs, late_context=lambda: _stack_objects(c)))
    return outs


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _as_written(target: Path, task: object, values: dict[str, Any]) -> bool:
    """The target still holds what this task wrote last (doit keeps its hash): a run killed
    after rendering for another cluster file, or an edit by hand, renders it again."""
    try:
        return values.get("sha256") == _sha256(target.read_bytes())
    except OSError:
        return False


def environment() -> jinja2.Environment:
    """The template environment (jinja2 imported here, so `doit list` stays fast)."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(c: Cluster, out: Output) -> str:
    """The text of one output (reads secrets / other outputs when it needs them)."""
    context = dict(out.context)
    if out.late_context:
        context |= out.late_context()
    return environment().get_template(out.template).render(**context)


def write(path: Path, text: str, mode: int) -> None:
    """Write atomically with `mode` from the start (no window where a secret is world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def task_render():
    """Render the stack file and every config file into the build directory."""
    from tasks.config import current

    c = current()
    base = build_dir(c)
    for out in outputs(c):
        target = base / out.target

        def action(out: Output = out, target: Path = target) -> dict[str, str]:
            text = render(c, out)
            write(target, text, out.mode)
            print(f"render: wrote {target}")
            return {"sha256": _sha256(text.encode())}

        yield {
            "name": out.target,
            "doc": f"render {out.target}",
            "actions": [action],
            "file_dep": [str(TEMPLATES / out.template), *map(str, out.reads)],
            "targets": [str(target)],
            "uptodate": [config_changed(json.dumps(out.context, sort_keys=True)),
                         partial(_as_written, target)],
            "clean": True,
            "verbosity": 2,
        }
