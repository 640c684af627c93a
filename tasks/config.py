"""The cluster file: which one is used, its model, and every validation rule.

Data flows one way: cluster YAML -> `Cluster` (validated here) -> rendered files -> remote steps.
Nothing in this module opens a connection; a bad file fails here, before any node is touched.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import os
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tasks.config_errors import ConfigError, describe
from tasks.config_rules import (
    cron_command,
    is_ip,
    matching,
    node_path,
    nodes_listed_twice,
    port_clashes,
    vip_problems,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
USER_CLUSTER_FILE = PROJECT_ROOT / "config" / "cluster.yml"
LAB_CLUSTER_FILE = PROJECT_ROOT / "config" / "lab.yml"
ENV_VAR = "HASWARM_CONFIG"

PLATFORMS = ("linux/arm/v7", "linux/arm64", "linux/amd64")
# Home Assistant dropped 32-bit ARM after this release (year, month).
HA_LAST_ARMV7 = (2025, 11)

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
_SIZE = re.compile(r"^[1-9][0-9]*[KMG]$")
_IMAGE = re.compile(
    r"^(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*(?::[0-9]+(?=/))?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[a-f0-9]{64}))?$"
)
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# The model


class SSH(_Strict):
    user: str = Field("root", description="login user; sudo is used when it is not root")
    port: int = Field(22, ge=1, le=65535)
    key: Path | None = Field(None, description="private key file (relative to the cluster file)")

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        return matching(v, r"[a-z_][a-z0-9_.-]{0,31}", "a valid login name (lower-case "
                                                         "letters, digits, '_', '.', '-')")


class SSHDefaults(SSH):
    known_hosts: Path = Field(
        Path("~/.ssh/known_hosts"),
        description="host keys checked on every connection (relative to the cluster file)",
    )
    connect_timeout: float = Field(5, gt=0, le=120)


class Node(_Strict):
    name: str
    address: str
    ssh: SSH | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(
                f"{v!r} is not a valid node name (lower-case letters, digits and '-', "
                "1-32 characters, as a Docker node label)"
            )
        return v

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
            return v
        except ValueError:
            pass
        if _HOSTNAME.match(v) and not re.fullmatch(r"[0-9.]+", v):
            return v
        raise ValueError(f"{v!r} is neither an IP address nor a valid host name")


class Image(_Strict):
    image: str = Field(description="pinned image reference: NAME:TAG (never latest), "
                                   "NAME@sha256:DIGEST or NAME:TAG@sha256:DIGEST")
    build: Path | None = Field(
        None, description="build context (relative to the project root); built instead of pulled"
    )

    @field_validator("image")
    @classmethod
    def _pinned(cls, v: str) -> str:
        name, at, digest = v.partition("@")
        if at and not _DIGEST.fullmatch(digest):
            raise ValueError(
                f"{v!r} has a malformed digest {digest!r}: a digest is 'sha256:' and 64 "
                f"lower-case hexadecimal digits, as `docker image inspect --format "
                f"'{{{{.RepoDigests}}}}' {name}` shows it")
        m = _IMAGE.match(v)
        if not m:
            raise ValueError(f"{v!r} is not a valid image reference")
        if not m["tag"] and not m["digest"]:
            raise ValueError(f"{v!r} has no tag: pin a version, e.g. {v}:1.2.3, or a digest, "
                             f"{v}@sha256:...")
        if m["tag"] == "latest" and not m["digest"]:
            raise ValueError(f"{v!r} is tagged 'latest': pin a version (or a digest) so every "
                             "node runs the same")
        return v

    @model_validator(mode="after")
    def _built_has_no_digest(self) -> Image:
        if self.build is not None and self.digest is not None:
            raise ValueError(f"{self.image!r} is built here (build: {self.build}): no registry "
                             "gave it a digest; name it NAME:TAG")
        return self

    @property
    def repository(self) -> str:
        return _IMAGE.match(self.image)["repo"]  # type: ignore[index]

    @property
    def tag(self) -> str | None:  # None for NAME@sha256:...
        return _IMAGE.match(self.image)["tag"]  # type: ignore[index]

    @property
    def digest(self) -> str | None:  # 'sha256:...', None for NAME:TAG
        return _IMAGE.match(self.image)["digest"]  # type: ignore[index]

    @property
    def registry(self) -> str:
        """host[:port] of its registry: the name's first part when it has a '.' or ':' or is
        'localhost' (as Docker reads it), else docker.io."""
        first, sep, _ = self.repository.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            return first
        return "docker.io"

    @property
    def pull_ref(self) -> str:
        """What `docker pull` gets: NAME@DIGEST when pinned (a digest wins over a tag)."""
        return f"{self.repository}@{self.digest}" if self.digest else self.image

    @property
    def node_ref(self) -> str:
        """The tag on the nodes and in the stack file: the reference, or NAME:sha256-<hex> for
        one pinned by digest (`docker load` can only tag: an engine records digests only when
        it pulls; and swarm never pulls a newer image over a tag no registry holds)."""
        if self.digest:
            return f"{self.repository}:{self.digest.replace(':', '-')}"
        return self.image


class Images(_Strict):
    homeassistant: Image
    mariadb: Image
    mosquitto: Image
    portainer: Image | None = None
    portainer_agent: Image | None = None


class Preload(_Strict):
    relay: bool = Field(True, description="nodes pass images on over SSH (tasks/images/relay.py)")


class Gluster(_Strict):
    volume: str = "haswarm"
    brick_dir: Path = Path("/srv/gluster/haswarm")
    mount_point: Path = Path("/mnt/haswarm")
    ping_timeout: int = Field(5, ge=1, le=1800, description="seconds to drop a silent peer")
    brick_on_root_fs: bool = Field(
        False, description="accept brick_dir on the root file system (the SD card); preflight "
                           "refuses it otherwise")

    @field_validator("brick_dir", "mount_point")
    @classmethod
    def _path(cls, v: Path) -> Path:
        return node_path(v)

    @field_validator("volume")
    @classmethod
    def _volume(cls, v: str) -> str:
        return matching(v, r"[A-Za-z0-9_-]{1,64}", "a valid Gluster volume name")


class Swarm(_Strict):
    # A new raft leader gives every node 6 heartbeats to re-register before it declares the node
    # Down and moves its tasks; an agent that lost its leader retries after up to 8 s
    # (swarmkit's maxSessionFailureBackoff). Below 2 s, healthy nodes are declared Down after a
    # leader change: their db tasks restart and HA moves (measured: 1 s did it in 3 of 5 leader
    # kills). Dead nodes are noticed after ~3 heartbeats.
    dispatcher_heartbeat: float = Field(2, le=60, description="seconds")
    publish_mode: Literal["ingress", "host"] = "ingress"
    restart_delay: float = Field(0, ge=0, le=300, description="seconds")
    leader_guard: bool = False  # keep the raft leader off HA's node (tasks/guard.py; see there)

    @field_validator("dispatcher_heartbeat")
    @classmethod
    def _heartbeat(cls, v: float) -> float:
        if v < 2:
            raise ValueError(
                f"{v:g} s is too short: use 2 or more. After a leader change swarm waits only 6 "
                "heartbeats for each node to re-register, a node can take 8 s, and a node "
                "declared Down has its containers restarted although it is healthy")
        return v


class HomeAssistant(_Strict):
    time_zone: str = "UTC"
    port: int = Field(8123, ge=1, le=65535)
    # A waiting HA container on every node; the volume lock's holder runs HA: a failover needs no
    # swarm scheduling. Default: on with publish_mode host (ingress would reach waiting ones too).
    standby: bool | None = None
    onboard: bool = True  # setup onboards HA, adds MQTT (tasks/onboard.py); false: left to you
    token_file: Path | None = None  # an HA admin's long-lived token; default: ha-onboard's own

    @field_validator("time_zone")
    @classmethod
    def _tz(cls, v: str) -> str:
        return matching(v, r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*",
                        "a time zone name such as Europe/Berlin")


# Mosquitto user the stack's healthcheck logs in as (reserved: not one of mqtt.users).
HEALTHCHECK_MQTT_USER = "haswarm-healthcheck"


class MQTT(_Strict):
    port: int = Field(1883, ge=1, le=65535)
    users: list[str] = Field(default_factory=lambda: ["homeassistant"], min_length=1)
    autosave_interval: int = Field(10, ge=1, le=3600, description="seconds")
    # A waiting Mosquitto container on every node; the one holding the volume's lock runs the
    # broker (its store is on the volume: never two). Default: as homeassistant.standby.
    standby: bool | None = None

    @field_validator("users")
    @classmethod
    def _users(cls, v: list[str]) -> list[str]:
        for user in v:
            matching(user, r"[A-Za-z0-9_-]{1,64}", "a valid MQTT user name")
        if len(set(v)) != len(v):
            raise ValueError("MQTT user names must be unique")
        if HEALTHCHECK_MQTT_USER in v:
            raise ValueError(f"{HEALTHCHECK_MQTT_USER!r} is reserved: the stack's healthcheck "
                             "logs in as it")
        if "homeassistant" not in v:
            raise ValueError("the user 'homeassistant' is required (Home Assistant connects as it)")
        return v


class MDNS(_Strict):
    name: str = "hacluster"
    restart_cron: bool = True
    restart_command: str = Field("systemctl restart avahi-daemon",
                                 description="one shell command line, run by root from cron")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r} is not a valid mDNS host name (without .local)")
        return v

    @field_validator("restart_command")
    @classmethod
    def _command(cls, v: str) -> str:
        return cron_command(v)


class Galera(_Strict):
    buffer_pool: str = Field("64M", description="innodb_buffer_pool_size")
    gcache: str = Field("32M", description="gcache.size")
    sst_method: Literal["mariabackup", "rsync"] = "mariabackup"

    @field_validator("buffer_pool", "gcache")
    @classmethod
    def _size(cls, v: str) -> str:
        if not _SIZE.match(v):
            raise ValueError(f"{v!r} is not a size such as 64M or 1G")
        return v


class Portainer(_Strict):
    enabled: bool = False
    port: int = Field(9443, ge=1, le=65535, description="published HTTPS port (no HTTP)")


class Firewall(_Strict):
    """The nodes' firewall (tasks/firewall.py)."""

    enabled: bool = Field(True, description="swarm, Gluster and VXLAN ports only for the nodes")


class VIP(_Strict):
    """A keepalived (VRRP) virtual IPv4 address that follows Mosquitto (tasks/vip.py)."""

    address: str | None = Field(
        None, description="virtual IPv4 address for sensors (MQTT); none: no VIP, no keepalived")
    interface: str = Field("eth0", description="network interface of the nodes that carries it")
    router_id: int = Field(51, ge=1, le=255,
                           description="VRRP virtual_router_id, unique among routers on the LAN")
    unicast: bool = Field(True, description="adverts to the node addresses (false: multicast)")
    prefix_length: int = Field(24, ge=8, le=30, description="the LAN's prefix length: the VIP "
                               "and every node address given as an IP lie in one such network")

    @field_validator("address")
    @classmethod
    def _ipv4(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            ip = ipaddress.IPv4Address(v)
        except ValueError:
            raise ValueError(f"{v!r} is not an IPv4 address such as 192.168.1.250") from None
        if ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_link_local:
            raise ValueError(f"{v!r} cannot be a virtual address on the LAN")
        return v

    @field_validator("interface")
    @classmethod
    def _interface(cls, v: str) -> str:
        return matching(v, r"[A-Za-z0-9_.@-]{1,15}",
                        "a network interface name such as eth0 or wlan0")


class Cluster(_Strict):
    name: str = Field("haswarm", description="stack name; prefixes every swarm object")
    platform: str
    allow_two_nodes: bool = False
    ssh: SSHDefaults = Field(default_factory=SSHDefaults)
    nodes: list[Node]
    images: Images
    preload: Preload = Field(default_factory=Preload)
    gluster: Gluster = Field(default_factory=Gluster)
    swarm: Swarm = Field(default_factory=Swarm)
    homeassistant: HomeAssistant = Field(default_factory=HomeAssistant)
    mqtt: MQTT = Field(default_factory=MQTT)
    mdns: MDNS = Field(default_factory=MDNS)
    galera: Galera = Field(default_factory=Galera)
    portainer: Portainer = Field(default_factory=Portainer)
    vip: VIP = Field(default_factory=VIP)
    firewall: Firewall = Field(default_factory=Firewall)
    build_dir: Path = Field(Path("build"), description="rendered files (relative to project root)")
    secrets_dir: Path = Field(Path("secrets"), description="generated secrets (relative to root)")
    lab: bool = Field(False, description="this cluster is the local lab (see lab/driver.py)")

    def ssh_for(self, node: Node) -> SSH:
        """The SSH settings for one node: its own keys override the cluster-wide ones."""
        own = node.ssh.model_dump(include=node.ssh.model_fields_set) if node.ssh else {}
        base = self.ssh.model_dump(include={"user", "port", "key"})
        return SSH(**(base | own))

    def node(self, name: str) -> Node:
        """The node called `name` (KeyError naming the known ones otherwise)."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r} in the cluster (nodes: {', '.join(self.names)})")

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    @property
    def manager_names(self) -> list[str]:
        """The swarm's managers: every node, but the last one listed when there are an even
        number of them, four or more (that one is a worker). An odd raft: 4 managers survive one
        dead like 3, but a 2/2 split of 4 stops both halves where 3 + a worker keep a quorum."""
        n = len(self.nodes)
        return self.names if n % 2 or n < 4 else self.names[:-1]

    @property
    def ha_standby(self) -> bool:
        """A Home Assistant container waits on every node (see HomeAssistant.standby)."""
        if self.homeassistant.standby is None:
            return self.swarm.publish_mode == "host"
        return self.homeassistant.standby

    @property
    def mqtt_standby(self) -> bool:
        """A Mosquitto container waits on every node (see MQTT.standby)."""
        if self.mqtt.standby is None:
            return self.swarm.publish_mode == "host"
        return self.mqtt.standby

    @field_validator("name")
    @classmethod
    def _stack_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r} is not a valid stack name")
        return v

    @field_validator("platform")
    @classmethod
    def _platform(cls, v: str) -> str:
        if v not in PLATFORMS:
            close = difflib.get_close_matches(v, PLATFORMS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{v!r} is not supported{hint}; choose one of {', '.join(PLATFORMS)}")
        return v


# ---------------------------------------------------------------------------------------------
# Rules that span several fields: reported with the YAML path of the offending value


def _cross_checks(c: Cluster) -> list[tuple[str, str]]:
    """Every problem across fields of a cluster whose values are each valid, as (YAML path,
    problem) pairs; [] when there is none."""
    problems: list[tuple[str, str]] = []
    n = len(c.nodes)
    if n < 2 or (n == 2 and not c.allow_two_nodes):
        problems.append((
            "nodes",
            f"{n} node(s) given, at least 3 are needed: a replica 3 volume, a Galera quorum and "
            "3 swarm managers each survive one lost node. Two nodes work only with "
            "'allow_two_nodes: true', which gives up that protection.",
        ))
    problems += nodes_listed_twice([(n.name, n.address) for n in c.nodes])
    published = [("homeassistant.port", c.homeassistant.port), ("mqtt.port", c.mqtt.port)]
    if c.portainer.enabled:
        published.append(("portainer.port", c.portainer.port))
    problems += port_clashes(published, {c.ssh_for(n).port for n in c.nodes})
    if c.vip.address is not None:
        literal = {n.name: n.address for n in c.nodes if is_ip(n.address)}
        problems += [("vip.address", p) for p in vip_problems(c.vip.address,
                                                              c.vip.prefix_length, literal)]
    if c.platform == "linux/arm/v7":
        version = _calver(c.images.homeassistant.tag or "")
        if version and version[:2] > HA_LAST_ARMV7:
            problems.append((
                "images.homeassistant.image",
                f"{c.images.homeassistant.image!r} does not exist for linux/arm/v7: Home Assistant "
                "publishes no 32-bit ARM images after 2025.11. Pin 2025.11.x or older, or run a "
                "64-bit OS on the Pis and set platform: linux/arm64.",
            ))
    for field_name, standby, what in (("homeassistant.standby", c.homeassistant.standby,
                                       "Home Assistant"),
                                      ("mqtt.standby", c.mqtt.standby, "Mosquitto")):
        if standby and c.swarm.publish_mode != "host":
            problems.append((
                field_name,
                "needs swarm.publish_mode: host. With the routing mesh (ingress) every node's "
                f"port would lead to any {what} container, also to the waiting ones.",
            ))
    brick, mount = PurePosixPath(c.gluster.brick_dir), PurePosixPath(c.gluster.mount_point)
    if brick.is_relative_to(mount) or mount.is_relative_to(brick):
        problems.append(("gluster.mount_point",
                         f"{str(mount)!r} and gluster.brick_dir {str(brick)!r} overlap: keep "
                         "them apart (neither inside the other): the bricks are Gluster's "
                         "private store, the mount point is where the volume is used"))
    if c.portainer.enabled and not (c.images.portainer and c.images.portainer_agent):
        problems.append(("images.portainer",
                         "portainer.enabled is true: images.portainer and images.portainer_agent "
                         "must be pinned"))
    return problems


def _calver(tag: str) -> tuple[int, int, int] | None:
    m = re.match(r"^(\d{4})\.(\d{1,2})(?:\.(\d+))?", tag)
    return (int(m[1]), int(m[2]), int(m[3] or 0)) if m else None


def two_node_warning(c: Cluster) -> str | None:
    """What a two-node cluster gives up, printed when the user opts in."""
    if len(c.nodes) != 2:
        return None
    return ("warning: 2 nodes: Gluster runs replica 2 (split-brain possible, manual repair), "
            "Galera and swarm lose quorum when either node dies: the survivor stops writing.")


# ---------------------------------------------------------------------------------------------
# Loading


def cluster_file(override: str | None = None) -> Path:
    """The cluster file in effect: `doit config=PATH`, else $HASWARM_CONFIG, else
    config/cluster.yml when it exists, else the lab (config/lab.yml)."""
    chosen = override or os.environ.get(ENV_VAR)
    if chosen:
        return Path(chosen).expanduser().resolve()
    return USER_CLUSTER_FILE if USER_CLUSTER_FILE.exists() else LAB_CLUSTER_FILE


def load_cluster(path: Path | str) -> Cluster:
    """Read, parse and validate a cluster file; raise ConfigError naming file and YAML path."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(path, [("", f"cannot read: {e.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(path, [(where, f"YAML syntax error: {problem}")]) from None
    if not isinstance(data, dict):
        raise ConfigError(path, [("", "expected a mapping of settings at the top level")])
    try:
        cluster = Cluster.model_validate(data)
    except ValidationError as e:
        raise ConfigError(path, [describe(err, Cluster) for err in e.errors()]) from None
    problems = _cross_checks(cluster)
    if problems:
        raise ConfigError(path, problems)
    return _resolve_paths(cluster, path.parent)


def _resolve_paths(c: Cluster, base: Path) -> Cluster:
    """Make SSH key and known_hosts paths absolute (relative to the cluster file)."""

    def fix(p: Path | None) -> Path | None:
        if p is None:
            return None
        p = p.expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    ssh = c.ssh.model_copy(update={"key": fix(c.ssh.key), "known_hosts": fix(c.ssh.known_hosts)})
    nodes = [n.model_copy(update={"ssh": n.ssh.model_copy(update={"key": fix(n.ssh.key)})})
             if n.ssh and n.ssh.key else n for n in c.nodes]
    return c.model_copy(update={"ssh": ssh, "nodes": nodes})


def current() -> Cluster:
    """The cluster of this doit run: `doit config=PATH ...`, else see `cluster_file()`.

    Loaded once per file version (one process may run doit for several cluster files)."""
    from doit import get_var

    path = cluster_file(get_var("config"))
    try:
        st = path.stat()
        version = (st.st_mtime_ns, st.st_size)
    except OSError:
        version = (0, 0)  # load_cluster reports the file as unreadable
    return _load_cached(path, version)


@functools.lru_cache(maxsize=8)
def _load_cached(path: Path, version: tuple[int, int]) -> Cluster:
    return load_cluster(path)


def purge_requested() -> bool:
    """`doit purge=yes clean`: also remove user data (bricks, database volumes, HA config)."""
    from doit import get_var

    return str(get_var("purge", "")).lower() in {"1", "yes", "true"}


def purge_refused(c: Cluster, argv: list[str], ask: Callable[[str], str] | None) -> str | None:
    """Before a purge, the user confirms it by typing the stack's name (`ask`: input, None when
    there is no terminal), or with `yes=1` (scripts). None: go on (no purge asked, confirmed,
    or a dry run `-n`); else why nothing is done."""
    from doit import get_var

    if not purge_requested() or str(get_var("yes", "")).lower() in {"1", "yes", "true"} \
            or "-n" in argv or "--dry-run" in argv:
        return None
    what = (f"purge=yes removes the user data of stack {c.name!r} (cluster file "
            f"{cluster_file(get_var('config'))}): the Gluster bricks (Home Assistant's config, "
            "Mosquitto's store), the database volumes and the saved and preloaded images")
    if ask is None:
        return f"{what}.\n  Nothing was done: add yes=1 to confirm (no terminal to ask on)."
    if ask(f"{what}.\nType the stack's name ({c.name}) to go on: ").strip() == c.name:
        return None
    return "purge not confirmed: nothing was done"
