"""End to end on the shared lab: `doit status`, the VIP, and the failover drill (`run_drill`).

CI runs four drills, each probed continuously (tasks/watch.py: every 0.5 s until 45 s after the
cluster converged again): a `kill` of a node running a db task but not Home Assistant (HA must
not notice: 0 s unavailable, not restarted), a `kill` of the swarm leader, a `kill` of the node
running Home Assistant (back within the limit), and a silent `cut` of another node (the one
running Mosquitto when that is another node, so the broker and the VIP move too). Each checks
that nothing committed before the fault is lost (Galera rows, every row the probe committed, a
Gluster file, a retained MQTT message older than the autosave interval), that the node rejoins
by itself (Gluster heals to 0 entries, Galera Synced with every node), that two Home Assistants
never ran at once (a census of every node every 0.5 s), and prints the figures (`pytest -s`).
The full fault matrix is bench/availability.py.

The module leaves the lab as it found it: every node booted, links up, the cluster converged.
When config/lab.yml has no `vip.address`, the module sets up a test VIP (10.77.0.100) itself and
removes it again at the end.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from lab.faults import LabFaults
from tasks import drill, status, vip
from tasks.config import Cluster
from tasks.remote import Remote

from .conftest import with_test_vip

pytestmark = pytest.mark.lab

# Failover goals (issue): HA answers <= 15 s after a kill, <= 25 s after a link cut. The tests
# allow head room for a loaded CI machine; bench/failover.py reports the real figures.
KILL_HA_LIMIT = 30.0
LEADER_HA_LIMIT = 90.0  # the leader's death: an election (10-19 s) and the grace before Down


def say(msg: str) -> None:
    print(f"  [failover] {msg}", flush=True)


@pytest.fixture(scope="module")
def cv(lab, cluster, deployed) -> Iterator[Cluster]:
    """The lab cluster with a VIP (conftest.with_test_vip)."""
    yield from with_test_vip(lab, cluster, say)


def test_status_is_clean_and_fast(cv):
    st = status.gather(cv)
    print("\n" + status.table(st))
    assert st.problems() == []
    assert st.seconds < 10
    holders = [n.name for n in st.nodes if n.vip]
    assert holders == st.mqtt_nodes()  # the VIP sits where Mosquitto runs


def test_vip_answers_mqtt_from_this_computer(cv):
    """docker exec-free: a TCP connect to VIP:1883 from the host gets a CONNACK."""
    from tasks.mqtt_client import MQTT_USER, mqtt_accepts, mqtt_password

    assert status.mqtt_connack(cv.vip.address, cv.mqtt.port) is not None
    assert mqtt_accepts(cv.vip.address, cv.mqtt.port, MQTT_USER, mqtt_password(cv))


def test_vip_setup_again_changes_nothing(cv, capsys):
    with Remote(cv) as r:
        facts = vip.setup(cv, r)
    assert facts["changed"] == []
    assert "nothing to do" in capsys.readouterr().out


def test_a_stranger_announcing_the_vip_does_not_take_it(lab, cv):
    """A LAN host sends VRRP adverts with the owner's priority (255) for the VIP to every node
    for 8 s: keepalived drops them (not from a peer), so the node holding the VIP keeps it all
    along and sensors keep reaching Mosquitto through it."""
    from concurrent.futures import ThreadPoolExecutor

    from lab.stranger import Stranger, announce_vip
    from tasks.mqtt_client import MQTT_USER, mqtt_accepts, mqtt_password

    def holders() -> list[str]:
        return [n for n in lab.names if f" {cv.vip.address}/" in lab.exec(
            n, "ip -o -4 addr show", check=False).stdout]

    before = holders()
    assert len(before) == 1
    with Stranger(lab) as s, ThreadPoolExecutor(1) as pool:
        sending = pool.submit(announce_vip, s, cv.vip.router_id, cv.vip.address,
                              [n.address for n in cv.nodes], 8)
        looks = []
        while not sending.done():
            looks.append(holders())
            time.sleep(0.5)
        assert sending.result().returncode == 0, sending.result().stderr
    assert len(looks) > 5 and all(look == before for look in looks), \
        f"the VIP held by {before} moved: {looks}"
    assert mqtt_accepts(cv.vip.address, cv.mqtt.port, MQTT_USER, mqtt_password(cv))


# Seconds of continuous probing after the cluster converged again (the drill's default is 120;
# bench/availability.py runs the full matrix with it).
AFTER = 45.0


def roles(st: status.ClusterStatus) -> dict[str, object]:
    """Who runs what now: the leader, HA's node, the broker's node."""
    leader = next((n.name for n in st.nodes if n.swarm and n.swarm.leader), None)
    return {"leader": leader, "ha": st.ha_nodes()[0],
            "mqtt": st.mqtt_nodes()[0]}


def check_always(result: drill.DrillResult) -> None:
    """What every drill must show: nothing lost, converged, never two Home Assistants."""
    print("\n" + result.report())
    assert not result.lost, result.lost
    assert result.figures["converged"] is not None
    assert result.watch is not None
    assert [o for o in result.watch.overlaps if o.service == "homeassistant"] == [], \
        result.watch.overlaps


def test_kill_a_node_running_db_but_not_home_assistant(cv, lab):
    """Home Assistant must not notice: not a second unavailable, not restarted, not moved."""
    st = status.wait_converged(cv, 600, log=say)
    who = roles(st)
    others = [n for n in cv.names if n != who["ha"]]
    # prefer a node that is neither the leader nor the broker's (the plainest case)
    others.sort(key=lambda n: (n == who["leader"], n == who["mqtt"]))
    target = others[0]
    result = drill.run_drill(cv, "kill", target, faults=LabFaults(cv, lab), names=False,
                             log=say, watch_after=AFTER)
    check_always(result)
    assert result.watch is not None and "homeassistant" not in result.ran
    if result.leader:
        pytest.xfail("the node was the swarm leader too: see test_kill_the_leader_...")
    assert result.watch.started("homeassistant") == []
    assert result.watch.probes["ha"].down == 0.0, result.watch.probes["ha"].gaps
    assert result.incidents() == []


def test_kill_the_leader(cv, lab):
    """The leader's death: never two Home Assistants, nothing lost; when the leader did not run
    HA, HA should stay where it is (not yet always: a new leader may declare a healthy node
    Down when its agent re-registers late, measured in bench/availability.py)."""
    st = status.wait_converged(cv, 600, log=say)
    leader = roles(st)["leader"]
    assert leader is not None
    result = drill.run_drill(cv, "kill", str(leader), faults=LabFaults(cv, lab), names=False,
                             log=say, watch_after=AFTER)
    check_always(result)
    assert result.watch is not None
    ha = result.watch.probes["ha"]
    if "homeassistant" in result.ran:
        assert ha.first_answer is not None and ha.first_answer < LEADER_HA_LIMIT
    elif result.incidents():
        pytest.xfail("a healthy node was declared Down by the new leader: "
                     + "; ".join(result.incidents()))


def test_kill_the_node_running_home_assistant(cv, lab):
    seen: dict[str, object] = {}

    def during(target: str) -> None:
        st = status.gather(cv)  # `doit status` with the node down
        seen["status"], seen["table"] = st, status.table(st)

    result = drill.run_drill(cv, "kill", faults=LabFaults(cv, lab), names=False, log=say,
                             during=during,
                             watch_after=AFTER)
    check_always(result)
    st = seen["status"]
    assert isinstance(st, status.ClusterStatus)
    print(seen["table"])
    down = st.node(result.node)
    assert not down.reachable and f"{result.node} does not answer" in " ".join(st.problems())
    assert st.seconds < cv.ssh.connect_timeout + 10  # a dead node costs one connect timeout
    assert "homeassistant" in result.ran
    assert result.figures["heal"] is not None and result.figures["galera_synced"] is not None
    assert result.watch is not None
    ha = result.watch.probes["ha"]
    limit = LEADER_HA_LIMIT if result.leader else KILL_HA_LIMIT
    assert ha.first_answer is not None and ha.down < limit, ha.gaps
    assert [s.node for s in result.watch.started("homeassistant")] != []  # it moved
    assert result.figures["galera"] is not None
    if "mosquitto" in result.ran:
        assert result.figures["vip"] is not None


def test_cut_another_node(cv, lab):
    st = status.wait_converged(cv, 600, log=say)
    ha = st.ha_nodes()[0]
    broker = st.mqtt_nodes()[0]
    target = broker if broker != ha else next(n for n in cv.names if n != ha)
    result = drill.run_drill(cv, "cut", target, faults=LabFaults(cv, lab), names=False,
                             log=say, watch_after=AFTER)
    check_always(result)
    assert result.figures["heal"] is not None and result.figures["galera_synced"] is not None
    assert result.figures["mqtt"] is not None and result.figures["vip"] is not None


def test_bricks_restarted_in_turn_never_two_home_assistants_or_brokers(cv, lab):
    """A brick that restarts forgets every lock and Gluster never takes one again on it: once
    every brick has restarted (rolling reboots, a Gluster upgrade), the locks are held nowhere
    while HA and Mosquitto run (before: a second HA 0.2 s later, and a second broker). Now the
    waiting keepers see the holders' heartbeats and do not take the free locks, and the holders
    take them again. Census every 0.5 s: never two of either, neither restarted, HA answers."""
    st = status.wait_converged(cv, 600, log=say)
    ha, broker = st.ha_nodes()[0], st.mqtt_nodes()[0]
    watch = drill.start_watch(cv, LabFaults(cv, lab), say)
    try:
        time.sleep(3)
        watch.mark_fault()
        # the holders' own nodes last: their mounts keep the lock longest
        for node in sorted(cv.names, key=lambda n: (n == broker, n == ha)):
            say(f"{node}: its brick restarted")
            lab.exec(node, f"kill -9 $(pgrep -x glusterfsd); sleep 1; gluster --mode=script "
                           f"volume start {cv.gluster.volume} force >/dev/null")
            time.sleep(6)
        time.sleep(10)  # (the holders look every second)
    finally:
        report = watch.stop()
    print("\n".join(report.lines()))
    assert report.overlaps == [], report.overlaps
    assert report.started("homeassistant") == [] and report.started("mosquitto") == []
    assert report.probes["ha"].down == 0.0, report.probes["ha"].gaps
    logs = {n: lab.exec(n, f"for c in $(docker ps -q -f name={cv.name}_homeassistant -f "
                           f"name={cv.name}_mosquitto); do docker logs --since 3m $c 2>&1; done",
                        check=False).stdout for n in (ha, broker)}
    assert "Home Assistant's lock (each restarted since it was taken): taken again" in logs[ha]
    assert "Mosquitto's lock (each restarted since it was taken): taken again" in logs[broker]


def test_drill_refuses_a_real_cluster_fault_without_the_lab(cv):
    real = cv.model_copy(update={"lab": False})
    with pytest.raises(drill.DrillError, match="needs the lab"):
        drill.run_drill(real, "kill")
    started = time.monotonic()
    with pytest.raises(drill.DrillError, match="not confirmed"):
        drill.run_drill(real, "docker", confirm=lambda q: False, log=say)
    assert time.monotonic() - started < 60
    assert status.gather(cv).problems() == []  # nothing was touched
