"""Availability as a household feels it: probed without gaps, not "the first answer".

A `Watch` runs in the background from before a fault until well after the cluster has
converged again. Every 0.5 s, each in its own thread:
- **probes**, what a user or a sensor sees:
  - `ha`: Home Assistant answers `GET /manifest.json` (cheap, unauthenticated) on some node;
  - `mqtt`: a login, a subscription and a QoS 1 publish that comes back, at the address sensors
    use (the VIP when configured, else whichever node answers);
  - `galera`: an INSERT commits through some db container (the tokens are kept: the drill
    checks afterwards that every committed row is on every node);
- **a census** of every node: the stack's running containers and the Home Assistant processes
  (`python3 -m homeassistant`; a container still waiting in its entrypoint does not count).

`Watch.stop()` returns a `WatchReport`: per probe the seconds unavailable, the longest gap, the
number of gaps and the first answer after the fault; per service the containers that started
during the watch (a restart on the same node or a move to another node) and every moment more
than one Home Assistant (or Mosquitto) ran at once. The analysis functions are pure: they take
samples and are tested without a cluster.
"""

from __future__ import annotations

import itertools
import shlex
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from tasks.config import Cluster
from tasks.markers import insert_sql
from tasks.mqtt_client import MQTTSession

INTERVAL = 0.5  # seconds between two samples of one probe, or of one node's census
CENSUS_TIMEOUT = 2.0  # seconds one node's census look may take
HA_PROCESS = "[p]ython3 -m homeassistant"  # the bracket keeps pgrep's own shell out
# Services whose second running copy is an incident: both write the same files on the volume.
SINGLETONS = ("homeassistant", "mosquitto")

# run_on(node, command, timeout) -> stdout, or None when the node cannot be asked
RunOn = Callable[[str, str, float], "str | None"]


# ---------------------------------------------------------------------------------------------
# Samples and their analysis (pure)


@dataclass(frozen=True)
class Sample:
    """One try of a probe: when it started (seconds from the watch's t0), whether it worked."""

    t: float
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class Census:
    """One look at one node: its running stack containers by service and how many containers
    run an HA process (an HA outside any container counts as one). `reachable` False: the node
    could not be asked (dead, cut, or no answer in time)."""

    t: float
    node: str
    reachable: bool
    containers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ha_running: int = 0
    done: float | None = None  # when the answer came back (None: at once)

    @property
    def answered(self) -> float:
        return self.t if self.done is None else self.done


def parse_census(text: str, stack: str) -> tuple[dict[str, tuple[str, ...]], int]:
    """The output of CENSUS_CMD: ({service: container ids}, containers running an HA process).

    A Home Assistant or Mosquitto container counts only while its program runs in it: a
    container that waits for the lock (a standby, or a second one swarm started) runs nothing
    yet."""
    containers: dict[str, list[str]] = {}
    running_in: dict[str, list[str]] = {"homeassistant": [], "mosquitto": []}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] in _PROCESS_TAGS:
            running_in[_PROCESS_TAGS[parts[0]]].append(parts[1][:12] if len(parts) > 1 else "")
        elif len(parts) >= 2 and parts[1].startswith(f"{stack}_"):
            containers.setdefault(parts[1].removeprefix(f"{stack}_"), []).append(parts[0][:12])
    for service, inside in running_in.items():
        if service in containers:
            active = [cid for cid in containers[service] if cid in inside]
            if active:
                containers[service] = active
            else:
                del containers[service]
    # Home Assistant runs in how many containers (a process that HA forks, seen by pgrep
    # between fork and exec with HA's command line, is no second Home Assistant)
    return {k: tuple(v) for k, v in containers.items()}, len(set(running_in["homeassistant"]))


# One line per HA or Mosquitto process, with the container it runs in (the 64-hex id in its
# cgroup path).
_PROCESS_TAGS = {"#ha": "homeassistant", "#mq": "mosquitto"}
_CGROUP_ID = "$(grep -o -m1 '[0-9a-f]\\{64\\}' /proc/$p/cgroup 2>/dev/null | head -n1)"
CENSUS_CMD = ("docker ps --format '{{.ID}} {{.Label \"com.docker.swarm.service.name\"}}' "
              f"2>/dev/null; for p in $(pgrep -f '{HA_PROCESS}'); do "
              f"echo \"#ha {_CGROUP_ID}\"; done; "
              f"for p in $(pgrep -x mosquitto); do echo \"#mq {_CGROUP_ID}\"; done")


def gaps(samples: list[Sample], end: float) -> list[tuple[float, float]]:
    """The unavailable stretches: from the first failed try to the next try that worked (or
    `end`, when none did)."""
    out: list[tuple[float, float]] = []
    start: float | None = None
    for s in sorted(samples, key=lambda s: s.t):
        if not s.ok and start is None:
            start = s.t
        elif s.ok and start is not None:
            out.append((start, s.t))
            start = None
    if start is not None:
        out.append((start, end))
    return out


@dataclass
class Availability:
    """One probe over the whole watch."""

    key: str
    tries: int
    gaps: list[tuple[float, float]]
    window: float  # seconds watched
    first_answer: float | None  # seconds from the fault to the first answer after it (0: never
    # stopped answering; None: no fault mark, or it never answered again)

    @property
    def down(self) -> float:
        return sum(b - a for a, b in self.gaps)

    @property
    def longest(self) -> float:
        return max((b - a for a, b in self.gaps), default=0.0)

    @property
    def percent(self) -> float:
        return 100.0 * (1 - self.down / self.window) if self.window > 0 else 100.0


def availability(key: str, samples: list[Sample], end: float,
                 fault: float | None = None) -> Availability:
    """Summarise one probe's samples; `fault` (seconds from t0) marks the fault."""
    g = gaps(samples, end)
    first: float | None = None
    if fault is not None:
        after = [gap for gap in g if gap[1] > fault]
        if not after or after[0][0] > fault + 5 * INTERVAL:
            first = 0.0  # answering right through the fault (a later gap has other causes)
        elif after[0][1] < end or any(s.ok and s.t >= end for s in samples):
            first = after[0][1] - fault
    starts = [s.t for s in samples]
    window = (end - min(starts)) if starts else 0.0
    return Availability(key, len(samples), g, window, first)


@dataclass(frozen=True)
class Start:
    """A container of a service seen for the first time during the watch."""

    t: float
    service: str
    node: str
    container: str
    kind: str  # "restart" (its node ran the service before), "move" (another node did), "new"
    before: tuple[str, ...]  # nodes that ran the service just before


def starts(census: list[Census]) -> list[Start]:
    """Containers that started during the watch (those of the first look are the baseline)."""
    seen: set[str] = set()
    running: dict[str, dict[str, set[str]]] = {}  # service -> node -> container ids
    last: dict[str, tuple[str, ...]] = {}  # service -> the nodes that ran it most recently
    baseline_nodes: set[str] = set()
    out: list[Start] = []
    for c in sorted(census, key=lambda c: c.t):
        if not c.reachable:
            continue
        first_look = c.node not in baseline_nodes
        baseline_nodes.add(c.node)
        for service, ids in c.containers.items():
            for cid in ids:
                if cid in seen:
                    continue
                seen.add(cid)
                if first_look:
                    continue
                before = tuple(sorted(n for n, s in running.get(service, {}).items() if s)
                               ) or last.get(service, ())
                kind = ("restart" if c.node in before else "move" if before else "new")
                out.append(Start(c.t, service, c.node, cid, kind, before))
        for service in {*running, *c.containers}:
            running.setdefault(service, {})[c.node] = set(c.containers.get(service, ()))
            now = tuple(sorted(n for n, ids in running[service].items() if ids))
            if now:
                last[service] = now
    return out


@dataclass(frozen=True)
class Stop:
    """A container that was running on a node and is gone at the node's next look (the node
    itself still answering)."""

    t: float
    service: str
    node: str
    container: str


def stops(census: list[Census]) -> list[Stop]:
    """Containers that stopped on a node that stayed reachable."""
    last: dict[str, Census] = {}
    out: list[Stop] = []
    for c in sorted(census, key=lambda c: c.t):
        if not c.reachable:
            continue
        prev = last.get(c.node)
        if prev is not None:
            for service, ids in prev.containers.items():
                for cid in ids:
                    if cid not in c.containers.get(service, ()):
                        out.append(Stop(c.t, service, c.node, cid))
        last[c.node] = c
    return out


@dataclass(frozen=True)
class Overlap:
    """A stretch during which `count` copies of a singleton service ran at once."""

    service: str
    start: float
    end: float
    count: int
    nodes: tuple[str, ...]


def overlaps(census: list[Census], end: float) -> list[Overlap]:
    """Stretches during which more than one Home Assistant (containers running an HA process)
    or more than one running container of another singleton ran across the cluster, as far
    as the looks prove it.

    A node is known to run a copy from the moment its first look showing it came back to the
    start of its last look showing it (a look happens somewhere between its start and its
    answer); a copy seen by one look only proves nothing about any other moment. So a clean
    hand-over that completes between two looks is no overlap, and any overlap longer than a
    look's interval plus its round trip is seen. A node that cannot be asked counts as running
    nothing (a lab node that is killed runs nothing; on a real cluster an unreachable node is
    unknown, which this cannot see). `end` closes a stretch still open when the watch ended."""
    out: list[Overlap] = []
    for service in SINGLETONS:
        # (from, to, copies, node): one stretch of consecutive looks of a node that saw copies
        known: list[tuple[float, float, int, str]] = []
        for node in sorted({c.node for c in census}):
            looks = sorted((c for c in census if c.node == node), key=lambda c: c.t)
            for seen, group in itertools.groupby(looks, key=lambda c: _copies(c, service) > 0):
                if not seen:
                    continue
                run = list(group)
                first, last = run[0], run[-1]
                most = max(_copies(x, service) for x in run)
                if most > 1:  # two copies on one node: each look proves it on its own
                    known.append((first.t, last.answered, most, node))
                elif first.answered <= last.t:
                    known.append((first.answered, last.t, 1, node))
        out += _stretches(service, known, end)
    return out


def _copies(c: Census, service: str) -> int:
    if not c.reachable:
        return 0
    return c.ha_running if service == "homeassistant" else len(c.containers.get(service, ()))


def _stretches(service: str, known: list[tuple[float, float, int, str]],
               end: float) -> list[Overlap]:
    """Where the known stretches add up to more than one copy."""
    marks = sorted({x for a, b, _, _ in known for x in (a, b)})
    # every mark and every span between two marks, in time order: (from, to)
    pieces = [(m, m) for m in marks] + [(a, b) for a, b in itertools.pairwise(marks)]
    pieces.sort(key=lambda p: (p[0], p[1]))
    out: list[Overlap] = []
    open_: Overlap | None = None
    for lo, hi in pieces:
        mid = (lo + hi) / 2
        live = [(k, n) for a, b, k, n in known if a <= mid <= b]
        total = sum(k for k, _ in live)
        if total > 1:
            nodes = {n for _, n in live}
            if open_ is None:
                open_ = Overlap(service, lo, min(hi, end), total, tuple(sorted(nodes)))
            else:
                open_ = Overlap(service, open_.start, min(hi, end), max(open_.count, total),
                                tuple(sorted({*open_.nodes, *nodes})))
        elif open_ is not None:
            out.append(open_)
            open_ = None
    if open_ is not None:
        out.append(open_)
    return out


@dataclass
class WatchReport:
    """What a watch saw: availability per probe, container starts, overlaps."""

    window: float
    fault: float | None
    probes: dict[str, Availability]
    starts: list[Start]
    overlaps: list[Overlap]
    committed: list[str]  # tokens of the Galera rows the `galera` probe committed
    stops: list[Stop] = field(default_factory=list)

    def started(self, service: str) -> list[Start]:
        return [s for s in self.starts if s.service == service]

    def lines(self, names: dict[str, str] | None = None) -> list[str]:
        """A table for people."""
        names = names or {}
        out = [f"  probed every {INTERVAL:g} s for {self.window:.0f} s"
               + (f" (fault at {self.fault:.0f} s)" if self.fault is not None else "") + ":",
               f"    {'':<22} {'unavailable':>11} {'longest':>8} {'gaps':>5} {'first answer':>13}"
               f" {'avail.':>8}"]
        for key, a in self.probes.items():
            first = ("-" if a.first_answer is None and self.fault is None else
                     "never" if a.first_answer is None else f"{a.first_answer:.1f} s")
            out.append(f"    {names.get(key, key):<22} {a.down:>9.1f} s {a.longest:>6.1f} s "
                       f"{len(a.gaps):>5} {first:>13} {a.percent:>7.2f}%")
        for s in self.starts:
            out.append(f"    {s.t:6.1f} s  {s.service} {s.kind}: new container {s.container} on "
                       f"{s.node}" + (f" (ran on {', '.join(s.before)})" if s.before else ""))
        for o in self.overlaps:
            out.append(f"    {o.start:6.1f} s  TWO {o.service.upper()}S: {o.count} ran at once "
                       f"for {o.end - o.start:.1f} s on {', '.join(o.nodes)}")
        if not self.starts:
            out.append("    no container started or moved")
        return out


# ---------------------------------------------------------------------------------------------
# The probes


def http_ok(address: str, port: int, timeout: float) -> bool:
    """GET /manifest.json answers below 500."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{address}:{port}/manifest.json", timeout=timeout) as resp:
            return int(resp.status) < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (OSError, ValueError):
        return False


def mqtt_round_trip(host: str, port: int, user: str, password: str, timeout: float) -> bool:
    """Log in, subscribe, publish with QoS 1 and get the message back within `timeout`."""
    topic = f"haswarm/watch/{uuid.uuid4().hex[:12]}"
    try:
        session = MQTTSession(host, port, user, password, timeout)
    except (OSError, TimeoutError):
        return False
    got: list[bytes] = []
    try:
        session.client.on_message = lambda client, userdata, msg: got.append(msg.payload)
        session.client.subscribe(topic, qos=1)
        session.client.publish(topic, b"ping", qos=1)
        session._until(lambda: bool(got), timeout)
        return True
    except (OSError, TimeoutError):
        return False
    finally:
        session.close()


class Watch:
    """Probes and census in background threads; `stop()` returns the report."""

    def __init__(self, c: Cluster, run_on: RunOn, *, mqtt_user: str, mqtt_password: str,
                 log: Callable[[str], None] | None = None, galera: bool = True) -> None:
        self.c = c
        self.run_on = run_on
        self.mqtt_user, self.mqtt_password = mqtt_user, mqtt_password
        self.log = log or (lambda msg: None)
        self.galera = galera
        self.t0 = time.monotonic()
        self.fault: float | None = None
        self.samples: dict[str, list[Sample]] = {"ha": [], "mqtt": [], "galera": []}
        if not galera:
            del self.samples["galera"]
        self.census: list[Census] = []
        self.committed: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._token = f"watch-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self._n = 0
        self._last_good: dict[str, str] = {}

    # -- life ----------------------------------------------------------------------------
    def start(self) -> Watch:
        self.t0 = time.monotonic()
        jobs: list[tuple[str, Callable[[], None]]] = [
            (f"census-{n.name}", lambda n=n.name: self._census_loop(n)) for n in self.c.nodes]
        jobs += [(f"probe-{k}", lambda k=k: self._probe_loop(k)) for k in self.samples]
        for name, fn in jobs:
            t = threading.Thread(target=fn, name=f"watch-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def mark_fault(self, at: float | None = None) -> None:
        """The moment of the fault (time.monotonic(); default now)."""
        self.fault = (at if at is not None else time.monotonic()) - self.t0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def stop(self) -> WatchReport:
        self._stop.set()
        for t in self._threads:
            t.join(15)
        end = self.now()
        with self._lock:
            probes = {k: availability(k, list(v), end, self.fault)
                      for k, v in self.samples.items()}
            census = list(self.census)
        return WatchReport(window=end, fault=self.fault, probes=probes, starts=starts(census),
                           overlaps=overlaps(census, end), committed=list(self.committed),
                           stops=stops(census))

    # -- loops ---------------------------------------------------------------------------
    def _every(self, fn: Callable[[float], None]) -> None:
        while not self._stop.is_set():
            t = self.now()
            fn(t)
            self._stop.wait(max(0.0, INTERVAL - (self.now() - t)))

    def _census_loop(self, node: str) -> None:
        def look(t: float) -> None:
            out = self.run_on(node, CENSUS_CMD, CENSUS_TIMEOUT)
            done = self.now()
            if out is None:
                c = Census(t, node, False, done=done)
            else:
                containers, ha = parse_census(out, self.c.name)
                c = Census(t, node, True, containers, ha, done=done)
            with self._lock:
                self.census.append(c)

        self._every(look)

    def _census_seen(self, timeout: float = CENSUS_TIMEOUT + 1) -> None:
        """Wait until every node's census has looked once (at most `timeout` s): the galera
        probe writes through the db containers it found. A probe before that found none and
        counted a gap that was the watch's own start (every rolling upgrade showed it)."""
        names = {n.name for n in self.c.nodes}
        deadline = self.now() + timeout
        while not self._stop.is_set() and self.now() < deadline:
            with self._lock:
                if names <= {c.node for c in self.census}:
                    return
            time.sleep(0.05)

    def _probe_loop(self, key: str) -> None:
        check = {"ha": self._ha, "mqtt": self._mqtt, "galera": self._galera}[key]
        if key == "galera":
            self._census_seen()

        def once(t: float) -> None:
            try:
                where = check()
            except Exception as e:  # noqa: BLE001 - a failing probe is a failed try
                where = None
                self.log(f"{key}: {type(e).__name__}: {e}")
            with self._lock:
                self.samples[key].append(Sample(t, where is not None, where or ""))

        self._every(once)

    def _order(self, key: str, names: list[str]) -> list[str]:
        last = self._last_good.get(key)
        return ([last] if last in names else []) + [n for n in names if n != last]

    def _ha(self) -> str | None:
        addr = {n.name: n.address for n in self.c.nodes}
        for name in self._order("ha", list(addr)):
            if http_ok(addr[name], self.c.homeassistant.port, 1.0):
                self._last_good["ha"] = name
                return name
        return None

    def _mqtt(self) -> str | None:
        if self.c.vip.address:  # the sensors' address: only there
            ok = mqtt_round_trip(self.c.vip.address, self.c.mqtt.port, self.mqtt_user,
                                 self.mqtt_password, 1.5)
            return self.c.vip.address if ok else None
        addr = {n.name: n.address for n in self.c.nodes}
        for name in self._order("mqtt", list(addr)):
            if mqtt_round_trip(addr[name], self.c.mqtt.port, self.mqtt_user,
                               self.mqtt_password, 1.5):
                self._last_good["mqtt"] = name
                return name
        return None

    def db_containers(self) -> dict[str, str]:
        """{node: its db container} from each node's latest census."""
        latest: dict[str, Census] = {}
        with self._lock:
            for c in self.census:
                latest[c.node] = c
        return {n: c.containers["db"][0] for n, c in latest.items()
                if c.reachable and c.containers.get("db")}

    def _galera(self) -> str | None:
        dbs = self.db_containers()
        for node in self._order("galera", sorted(dbs)):
            self._n += 1
            token = f"{self._token}-{self._n}"
            sql = insert_sql(token, node, "watch", "watch", create=not self.committed)
            out = self.run_on(node, f"timeout 2 docker exec -i {dbs[node]} mariadb --batch "
                                    f"-e {shlex.quote(sql)} && echo committed", 3.0)
            if out is not None and "committed" in out:
                with self._lock:
                    self.committed.append(token)
                self._last_good["galera"] = node
                return node
        return None


def remote_runner(r: object) -> RunOn:
    """run_on over SSH (a real cluster)."""
    def run_on(node: str, cmd: str, timeout: float) -> str | None:
        try:
            res = r.run(node, "watch", cmd, check=False, timeout=timeout)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - unreachable
            return None
        return res.stdout if res.ok else None

    return run_on
