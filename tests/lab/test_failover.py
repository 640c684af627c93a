"""End to end on the shared lab: `doit status`, the VIP, and the failover drill (`run_drill`).

CI runs three drills, one per node: `kill` of the node running Home Assistant, a silent `cut` of
another node (the one running Mosquitto when that is another node, so the broker and the VIP
move too), then a `cut` of the third node (Home Assistant's node when it moved there). Each
checks that nothing committed before the fault is lost (Galera rows, a Gluster file, a retained
MQTT message older than the autosave interval), that the node rejoins by itself (Gluster heals
to 0 entries, Galera Synced with every node) and prints the figures (`pytest -s`). The full 3x2
matrix is bench/failover.py.

The module leaves the lab as it found it: every node booted, links up, the cluster converged.
When config/lab.yml has no `vip.address`, the module sets up a test VIP (10.77.0.100) itself and
removes it again at the end.
"""

from __future__ import annotations

import time

import pytest

from tasks import drill, status, vip
from tasks.config import VIP, Cluster
from tasks.remote import Remote

pytestmark = pytest.mark.lab

TEST_VIP = "10.77.0.100"
# Failover goals (issue): HA answers <= 15 s after a kill, <= 25 s after a link cut. The tests
# allow head room for a loaded CI machine; bench/failover.py reports the real figures.
KILL_HA_LIMIT = 30.0
CUT_HA_LIMIT = 45.0
# Nodes the drills above took down, in order (each test faults a node not faulted yet).
FAULTED: list[str] = []


def say(msg: str) -> None:
    print(f"  [failover] {msg}", flush=True)


@pytest.fixture(scope="module")
def cv(lab, cluster, deployed) -> Cluster:
    """The lab cluster with a VIP (the lab's own when configured, else a test one set up here
    and removed at the end). The lab is converged again when the module ends."""
    own = cluster.vip.address is None
    c = cluster.model_copy(update={"vip": VIP(address=TEST_VIP)}) if own else cluster
    status.wait_converged(cluster, 600, log=say)
    if own:
        with Remote(c) as r:
            vip.setup(c, r)
    yield c
    lab.up()  # boot killed nodes, heal cut links (nothing if all is well)
    try:
        status.wait_converged(c, 600, log=say)
    finally:
        if own:
            with Remote(c) as r:
                vip.remove(c, r, dryrun=False)


def test_status_is_clean_and_fast(cv):
    st = status.gather(cv)
    print("\n" + status.table(st))
    assert st.problems() == []
    assert st.seconds < 10
    holders = [n.name for n in st.nodes if n.vip]
    assert holders == st.where("mosquitto")  # the VIP sits where Mosquitto runs


def test_vip_answers_mqtt_from_this_computer(cv):
    """docker exec-free: a TCP connect to VIP:1883 from the host gets a CONNACK."""
    from tasks.drill import MQTT_USER, mqtt_accepts, mqtt_password

    assert status.mqtt_connack(cv.vip.address, cv.mqtt.port) is not None
    assert mqtt_accepts(cv.vip.address, cv.mqtt.port, MQTT_USER, mqtt_password(cv))


def test_vip_setup_again_changes_nothing(cv, capsys):
    with Remote(cv) as r:
        facts = vip.setup(cv, r)
    assert facts["changed"] == []
    assert "nothing to do" in capsys.readouterr().out


def test_kill_the_node_running_home_assistant(cv):
    seen: dict[str, object] = {}

    def during(target: str) -> None:
        st = status.gather(cv)  # `doit status` with the node down
        seen["status"], seen["table"] = st, status.table(st)

    result = drill.run_drill(cv, "kill", names=False, log=say, during=during)
    FAULTED.append(result.node)
    print("\n" + result.report())
    st = seen["status"]
    assert isinstance(st, status.ClusterStatus)
    print(seen["table"])
    down = st.node(result.node)
    assert not down.reachable and f"{result.node} does not answer" in " ".join(st.problems())
    assert st.seconds < cv.ssh.connect_timeout + 10  # a dead node costs one connect timeout
    assert "homeassistant" in result.ran
    assert not result.lost, result.lost
    assert result.figures["converged"] is not None
    assert result.figures["heal"] is not None and result.figures["galera_synced"] is not None
    assert result.figures["ha"] is not None and result.figures["ha"] < KILL_HA_LIMIT
    assert result.figures["galera"] is not None
    assert result.figures["mqtt"] is not None
    if "mosquitto" in result.ran:
        assert result.figures["vip"] is not None


def test_cut_another_node(cv):
    st = status.wait_converged(cv, 600, log=say)
    ha = st.where("homeassistant")[0]
    broker = st.where("mosquitto")[0]
    target = broker if broker != ha else next(n for n in cv.names if n != ha)
    result = drill.run_drill(cv, "cut", target, names=False, log=say)
    FAULTED.append(result.node)
    print("\n" + result.report())
    assert not result.lost, result.lost
    assert result.figures["converged"] is not None
    assert result.figures["heal"] is not None and result.figures["galera_synced"] is not None
    assert result.figures["ha"] is not None and result.figures["ha"] < CUT_HA_LIMIT
    assert result.figures["mqtt"] is not None and result.figures["vip"] is not None


def test_cut_the_third_node(cv):
    status.wait_converged(cv, 600, log=say)
    rest = [n for n in cv.names if n not in FAULTED]
    target = rest[0] if rest else cv.names[0]  # each node faulted once (when the two above ran)
    result = drill.run_drill(cv, "cut", target, names=False, log=say)
    print("\n" + result.report())
    assert not result.lost, result.lost
    assert result.figures["converged"] is not None
    assert result.figures["heal"] is not None and result.figures["galera_synced"] is not None
    if "homeassistant" in result.ran:
        assert result.figures["ha"] is not None and result.figures["ha"] < CUT_HA_LIMIT


def test_drill_refuses_a_real_cluster_fault_without_the_lab(cv):
    real = cv.model_copy(update={"lab": False})
    with pytest.raises(drill.DrillError, match="needs the lab"):
        drill.run_drill(real, "kill")
    started = time.monotonic()
    with pytest.raises(drill.DrillError, match="not confirmed"):
        drill.run_drill(real, "docker", confirm=lambda q: False, log=say)
    assert time.monotonic() - started < 60
    assert status.gather(cv).problems() == []  # nothing was touched
