"""Status, drill and VIP: the pure parts, fed with output recorded on the lab (dockerd 20.10.24,
GlusterFS 10.3, keepalived 2.2.7), trimmed."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks import drill, facts, facts_cluster, failover, markers, status, vip
from tasks.config import LAB_CLUSTER_FILE, VIP, Cluster, load_cluster
from tasks.remote import key_values
from tasks.stack_facts import Container


@pytest.fixture(scope="module")
def c() -> Cluster:
    return load_cluster(LAB_CLUSTER_FILE)


@pytest.fixture(scope="module")
def cv(c) -> Cluster:
    """The lab cluster with a VIP."""
    return c.model_copy(update={"vip": VIP(address="10.77.0.100")})


IPS = {"pi1": "10.77.0.11", "pi2": "10.77.0.12", "pi3": "10.77.0.13"}

# ---------------------------------------------------------------------------------------------
# recorded output

def recorded(name: str) -> str:
    """An output recorded from the lab (tests/unit/data/<fact>/<case>)."""
    return (Path(__file__).parent / "data" / name).read_text()


NODE_INSPECT = recorded("swarm/node-inspect.txt")


def _brick_node(host: str, status_: int = 1) -> str:
    return (f"<node><hostname>{host}</hostname><path>/srv/gluster/haswarm</path>"
            f"<peerid>x</peerid><status>{status_}</status><port>53527</port></node>")


VOLUME_STATUS_TWO_UP = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<cliOutput><opRet>0</opRet>'
    "<opErrno>0</opErrno><opErrstr/><volStatus><volumes><volume><volName>haswarm</volName>"
    "<nodeCount>4</nodeCount>" + _brick_node("10.77.0.11") + _brick_node("10.77.0.12")
    + "<node><hostname>Self-heal Daemon</hostname><path>localhost</path><status>1</status>"
    "</node><node><hostname>Self-heal Daemon</hostname><path>10.77.0.12</path><status>1</status>"
    "</node><tasks/></volume></volumes></volStatus></cliOutput>")

HEAL_SUMMARY = recorded("gluster/heal-summary.xml")

HEAL_CLEAN = HEAL_SUMMARY.replace("<totalNumberOfEntries>4<", "<totalNumberOfEntries>0<").replace(
    "Transport endpoint is not connected", "Connected").replace(
    "<totalNumberOfEntries>-<", "<totalNumberOfEntries>0<").replace(
    "<numberOfEntriesInSplitBrain>-<", "<numberOfEntriesInSplitBrain>0<")
VOLUME_STATUS_ALL_UP = VOLUME_STATUS_TWO_UP.replace(
    _brick_node("10.77.0.12"), _brick_node("10.77.0.12") + _brick_node("10.77.0.13"))

SERVICES = recorded("swarm/service-ls.txt")

GALERA = recorded("galera/status-db-and-failed-exec.txt")

SWARM_INFO = '{"state":"active","control":true,"error":""}'


# ---------------------------------------------------------------------------------------------
# status: parsing


def test_parse_node_inspect_and_describe():
    nodes = facts_cluster.parse_node_inspect("warning: something\n" + NODE_INSPECT)
    assert [n.host for n in nodes] == ["pi1", "pi2", "pi3"]
    assert nodes[0].describe() == "Leader Ready Active"
    assert nodes[1].describe() == "Reachable Ready Active"
    assert nodes[2].describe() == "Unreachable Down Active"
    assert nodes[2].id == "cs99sfr9mz3u"


def test_parse_volume_status_skips_daemons_and_misses_down_bricks():
    got = facts_cluster.parse_volume_status(VOLUME_STATUS_TWO_UP)
    assert got == {"10.77.0.11:/srv/gluster/haswarm": True,
                   "10.77.0.12:/srv/gluster/haswarm": True}
    failed = VOLUME_STATUS_TWO_UP.replace("<opRet>0</opRet>", "<opRet>-1</opRet>")
    assert facts_cluster.parse_volume_status(failed) is None
    assert facts_cluster.parse_volume_status("Connection failed. Please check if gluster daemon "
                                      "is operational.") is None


def test_parse_heal_summary_pending_and_unknown():
    got = facts_cluster.parse_heal_summary(HEAL_SUMMARY)
    assert got["10.77.0.11:/srv/gluster/haswarm"] == ("Connected", 4, 0)
    assert got["10.77.0.13:/srv/gluster/haswarm"][:2] == ("Transport endpoint is not connected",
                                                          None)
    plain = HEAL_SUMMARY.replace("totalNumberOfEntries", "numberOfEntries")  # `heal info`
    assert facts_cluster.parse_heal_summary(plain)["10.77.0.11:/srv/gluster/haswarm"][1] == 4


def test_bricks_from_maps_every_node(c):
    bricks = facts_cluster.bricks_from(c, VOLUME_STATUS_TWO_UP, HEAL_SUMMARY)
    assert [(b.address, b.online, b.heal_pending) for b in bricks] == [
        ("10.77.0.11", True, 4), ("10.77.0.12", True, 0), ("10.77.0.13", False, None)]
    unknown = facts_cluster.bricks_from(c, None, None)
    assert all(b.online is None and b.heal_pending is None for b in unknown)


@pytest.mark.parametrize("text,want", [
    ("fuse.glusterfs\nalive\n", "ok"),
    ("fuse.glusterfs\ndead\n", "dead"),
    ("dead\n", "not mounted"),
    ("ext4\nalive\n", "wrong type (ext4)"),
])
def test_parse_mount(text, want):
    assert facts_cluster.parse_mount(text) == want


@pytest.mark.parametrize("text,want", [("4\n", 4), ("ls: error\n0\n", 0), ("", None),
                                       (" \n", None), ("x\n", None)])
def test_parse_index(text, want):
    assert facts_cluster.parse_index(text) == want


def test_parse_services_and_galera_and_swarm():
    assert facts_cluster.parse_services(SERVICES, "haswarm") == {
        "db": "3/3", "db-seed": "0/0", "homeassistant": "1/1", "mosquitto": "1/1"}
    views = facts.parse_galera(GALERA, {"89af6f078e62": "db", "94bc6c3dbb79": "db-seed"})
    assert views[0].synced and views[0].seqno == 12 and views[0].cluster_size == 3
    assert views[0].state() == "Synced/Primary size 3"
    assert len(views) == 2 and not views[1].synced  # the failed exec: a member with no state
    assert views[1].state() == "starting"
    assert facts_cluster.parse_updates("haswarm_homeassistant\tupdating\nhaswarm_db\tcompleted\n"
                                "haswarm_mosquitto\t\n", "haswarm") == {"homeassistant": "updating"}
    assert facts_cluster.parse_swarm(SWARM_INFO) == ("active", True)
    assert facts_cluster.parse_swarm("Cannot connect to the Docker daemon") == ("unknown", False)


def test_sections_round_trip(c):
    script = facts.probe_script({"a": "echo 1", "b": "echo 2; echo 3"})
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True).stdout
    assert facts.parse_sections(out) == {"a": "1\n", "b": "2\n3\n"}
    probes = facts_cluster.node_probes(c, c.nodes[0])
    assert set(probes) == {"swarm", "containers", "galera", "mount", "index", "mdns"}
    assert subprocess.run(["sh", "-n", "-c", facts.probe_script(probes)]).returncode == 0
    assert subprocess.run(["sh", "-n", "-c",
                           facts.probe_script(facts_cluster.cluster_probes(c))]).returncode == 0


# ---------------------------------------------------------------------------------------------
# status: the model


def healthy(c: Cluster, **changes) -> status.ClusterStatus:
    """A recorded healthy status: HA on pi1, Mosquitto on pi2, everything Synced."""
    swarm = {n.host: n for n in facts_cluster.parse_node_inspect(
        NODE_INSPECT.replace('"down"', '"ready"').replace('"unreachable"', '"reachable"'))}
    bricks = facts_cluster.bricks_from(c, VOLUME_STATUS_ALL_UP, HEAL_CLEAN)
    nodes = []
    for i, n in enumerate(c.nodes):
        cts = [Container(n.name, f"db{i}", "db", "t", "running", "healthy")]
        if n.name == "pi1":
            cts.append(Container(n.name, "ha", "homeassistant", "t", "running", "healthy"))
        if n.name == "pi2":
            cts.append(Container(n.name, "mq", "mosquitto", "t", "running", "healthy"))
        nodes.append(status.NodeStatus(
            n.name, n.address, reachable=True, swarm_state="active", manager=True,
            swarm=swarm[n.name], containers=cts,
            galera=[facts.GaleraMember(f"db{i}", "db", "running", "Primary", "Synced", 3, 40)],
            mount="ok", brick=bricks[i], http=302 if n.name == "pi1" else None,
            mqtt=0 if n.name == "pi2" else None))
    st = status.ClusterStatus(cluster=c, nodes=nodes, observer="pi1", gluster_known=True,
                              services={"db": "3/3", "homeassistant": "1/1"})
    for k, v in changes.items():
        setattr(st, k, v)
    return st


def test_healthy_status_has_no_problem_and_a_table(c):
    st = healthy(c)
    assert st.problems() == []
    text = status.table(st)
    assert "problems: none" in text
    assert "Home Assistant: runs on pi1; answers HTTP 302 at 10.77.0.11:8123" in text
    assert "Mosquitto: runs on pi2; answers at 10.77.0.12:1883" in text
    assert text.splitlines()[0].split()[:4] == ["NODE", "ADDRESS", "SSH", "SWARM"]


def test_standby_containers_are_shown_and_two_answering_is_a_problem(c):
    assert c.ha_standby  # the lab publishes on the host: a waiting HA on every node
    st = healthy(c, services={"db": "3/3", "homeassistant": "3/3"})
    for n in st.nodes[1:]:
        n.containers.append(Container(n.name, f"ha-{n.name}", "homeassistant", "t", "running",
                                      "healthy"))
    assert st.ha_nodes() == ["pi1"] and st.ha_standbys() == ["pi2", "pi3"]
    assert st.problems() == []
    assert "Home Assistant: runs on pi1 (standby on pi2, pi3); answers HTTP 302" in \
        status.table(st)
    st.nodes[2].http = 200  # a second HA answers: never
    assert st.ha_nodes() == ["pi1", "pi3"]
    assert "homeassistant: runs on 2 nodes (pi1, pi3), want 1" in st.problems()


def test_mosquitto_standbys_are_shown_and_two_brokers_are_a_problem(c):
    assert c.mqtt_standby  # host mode: a waiting Mosquitto on every node
    st = healthy(c)
    for n in (st.nodes[0], st.nodes[2]):
        n.containers.append(Container(n.name, f"mq-{n.name}", "mosquitto", "t", "running",
                                      "healthy"))
    assert st.mqtt_nodes() == ["pi2"] and st.mqtt_standbys() == ["pi1", "pi3"]
    assert st.runs("pi1") == {"db", "homeassistant"} and st.runs("pi2") == {"db", "mosquitto"}
    assert st.problems() == []
    assert "Mosquitto: runs on pi2 (standby on pi1, pi3); answers at 10.77.0.12:1883" in \
        status.table(st)
    st.nodes[2].mqtt = 0  # a second broker answers: never
    assert "mosquitto: runs on 2 nodes (pi2, pi3), want 1" in st.problems()
    st.nodes[1].mqtt = st.nodes[2].mqtt = None  # no broker at all
    assert "mosquitto: runs on 0 nodes (none), want 1" in st.problems()


def test_node_down_is_shown_with_what_others_say(c):
    st = healthy(c)
    down = st.node("pi3")
    down.reachable, down.error = False, "no answer from 10.77.0.13 port 22 within 5 s"
    down.containers, down.galera, down.mount = [], [], ""
    down.swarm = facts_cluster.parse_node_inspect(NODE_INSPECT)[2]
    for n, b in zip(st.nodes, facts_cluster.bricks_from(c, VOLUME_STATUS_TWO_UP, HEAL_SUMMARY),
                    strict=True):
        n.brick = b
    for n in st.nodes[:2]:
        n.galera = [facts.GaleraMember("x", "db", "running", "Primary", "Synced", 2, 41)]
    problems = st.problems()
    assert "pi3 does not answer over SSH (no answer from 10.77.0.13 port 22 within 5 s)" \
        in problems
    assert "pi3: swarm node down" in problems
    assert "pi3: brick 10.77.0.13:/srv/gluster/haswarm offline" in problems
    assert "pi1: brick has 4 entries to heal" in problems
    assert any(p.startswith("pi1: Galera Synced/Primary size 2") for p in problems)
    row = next(line for line in status.table(st).splitlines() if line.startswith("pi3"))
    assert "DOWN" in row and "Unreachable Down Active" in row


def test_updates_and_replicas_are_problems(c):
    st = healthy(c, updating={"homeassistant": "updating"},
                 services={"db": "3/3", "homeassistant": "2/1"})
    assert st.problems() == ["homeassistant: service update updating",
                             "homeassistant: 2/1 tasks running"]


def test_vip_problems(cv):
    st = healthy(cv)
    for n in st.nodes:
        n.keepalived = True
        n.vip = n.name == "pi2"
    st.vip_mqtt = 0
    assert st.problems() == []
    st.node("pi1").vip = True
    st.node("pi3").keepalived = False
    st.vip_mqtt = None
    problems = st.problems()
    assert "VIP 10.77.0.100 held by 2 nodes (pi1, pi2), want 1" in problems
    assert "pi3: keepalived is not running (the VIP cannot move here)" in problems
    assert "VIP 10.77.0.100: no MQTT answer on port 1883" in problems


def _fake_broker(reply: bytes) -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            data = conn.recv(1024)
            assert data[0] == 0x10 and b"MQTT" in data
            conn.sendall(reply)
            time.sleep(0.1)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_mqtt_connack_reads_the_return_code():
    srv, port = _fake_broker(bytes([0x20, 2, 0, 5]))
    with srv:
        assert status.mqtt_connack("127.0.0.1", port, user="u", password="p") == 5
    srv, port = _fake_broker(b"HTTP/1.0 400\r\n")
    with srv:
        assert status.mqtt_connack("127.0.0.1", port) is None
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    assert status.mqtt_connack("127.0.0.1", port, timeout=0.5) is None


# ---------------------------------------------------------------------------------------------
# drill


def test_faults_and_target(c):
    from lab.faults import LabFaults

    real = drill.DockerFaults(c.model_copy(update={"lab": False}))
    lab = LabFaults(c, lab=object())  # type: ignore[arg-type]  # kinds only, nothing runs
    drill.check_fault(lab, "kill")
    drill.check_fault(real, "docker")
    with pytest.raises(drill.DrillError, match="needs the lab"):
        drill.check_fault(real, "cut")
    with pytest.raises(drill.DrillError, match="unknown fault"):
        drill.check_fault(lab, "reboot")
    st = healthy(c)
    assert drill.choose_target(st, None) == "pi1"
    assert drill.choose_target(st, "pi3") == "pi3"
    with pytest.raises(KeyError):
        drill.choose_target(st, "pi9")
    st.node("pi1").containers = st.node("pi1").containers[:1]
    with pytest.raises(drill.DrillError, match="runs on no node"):
        drill.choose_target(st, None)


def test_sql_texts():
    ins = markers.insert_sql("tok-1", "pi1", "kill", "before")
    assert "CREATE TABLE IF NOT EXISTS haswarm.haswarm_drill" in ins
    assert "ENGINE=InnoDB" in ins and "PRIMARY KEY" in ins  # Galera replicates InnoDB with a PK
    assert "VALUES ('tok-1', 'pi1', 'kill', 'before')" in ins
    assert "CREATE" not in markers.insert_sql("tok-2", "pi1", "kill", "during", create=False)
    assert markers._q("it's") == "'it''s'"
    sel = markers.select_sql(["a", "b"])
    assert "wsrep_sync_wait" in sel and "IN ('a', 'b')" in sel
    assert markers.missing_rows(["a", "b", "c"], "a\nc\n") == ["b"]


def test_measure_records_seconds_and_timeouts():
    t0 = time.monotonic()
    calls = {"n": 0}

    def later() -> str | None:
        calls["n"] += 1
        return "pi2" if calls["n"] >= 3 else None

    def broken() -> None:
        raise OSError("refused")

    figures, where = failover.measure(
        [failover.Probe("soon", later, 0.05), failover.Probe("never", broken, 0.05),
         failover.Probe("now", lambda: True, 0.05)], t0, timeout=0.5, log=lambda m: None)
    assert 0.08 <= figures["soon"] < 0.5 and where["soon"] == "pi2"
    assert figures["never"] is None
    assert figures["now"] < 0.05 and "now" not in where


def test_report_mentions_every_figure_and_loss():
    r = drill.DrillResult(fault="kill", node="pi1", ran=["db", "homeassistant"],
                          figures={"ha": 9.8, "mqtt": None, "restored": 2.0, "heal": 3.0,
                                   "galera_synced": 8.0, "converged": 12.0},
                          where={"ha": "pi2"}, rows_committed=7)
    text = r.report()
    assert "drill: kill pi1 (it ran: db, homeassistant)" in text
    assert "9.8 s  (pi2)" in text and "never (timeout)" in text
    assert "nothing lost: 7 Galera rows" in text
    assert r.ok
    r.lost = ["pi2: 1 of 7 committed rows missing"]
    assert not r.ok and "LOST: pi2" in r.report()


# ---------------------------------------------------------------------------------------------
# vip


def test_vip_config_validation(c):
    assert c.vip.address is None
    assert VIP(address="10.77.0.100").interface == "eth0"
    for bad in ("10.77.0", "fe80::1", "127.0.0.1", "224.0.0.18"):
        with pytest.raises(ValidationError):
            VIP(address=bad)
    with pytest.raises(ValidationError):
        VIP(address="10.77.0.100", interface="eth0; rm -rf /")
    with pytest.raises(ValidationError):
        VIP(address="10.77.0.100", router_id=0)
    with pytest.raises(vip.VIPError, match="pi2's own address"):
        vip.validate(c.model_copy(update={"vip": VIP(address="10.77.0.12")}), IPS)


def test_keepalived_conf_per_node(cv):
    confs = {n.name: vip.render_conf(cv, n, IPS) for n in cv.nodes}
    assert confs["pi1"].splitlines()[0] == vip.MARKER
    assert "priority 100" in confs["pi1"] and "priority 99" in confs["pi2"]
    assert "unicast_src_ip 10.77.0.12" in confs["pi2"]
    peers = confs["pi2"].split("unicast_peer {")[1].split("}")[0].split()
    assert peers == ["10.77.0.11", "10.77.0.13"]
    assert "10.77.0.100/32 dev eth0" in confs["pi3"]
    assert "advert_int 1" in confs["pi1"] and "weight 50" in confs["pi1"]
    multicast = cv.model_copy(update={"vip": VIP(address="10.77.0.100", unicast=False)})
    assert "unicast" not in vip.render_conf(multicast, cv.nodes[0], IPS)
    # the node running Mosquitto always wins over the others: base + weight > any base
    assert vip.BASE_PRIORITY - len(cv.nodes) + vip.WEIGHT > vip.BASE_PRIORITY


@pytest.mark.skipif(shutil.which("keepalived") is None, reason="keepalived not installed")
def test_keepalived_accepts_the_config(cv, tmp_path):
    conf = tmp_path / "keepalived.conf"
    conf.write_text(vip.render_conf(cv, cv.nodes[0], IPS))
    r = subprocess.run(["keepalived", "-t", "-f", str(conf)], capture_output=True, text=True)
    # exit 5 only for the check script, which is not on this computer
    problems = [line for line in r.stderr.splitlines()
                if line.strip() and "haswarm-mqtt-check" not in line
                and "track script" not in line]
    assert r.returncode in (0, 5) and not problems, r.stderr


def test_check_scripts(cv):
    host = vip.check_script(cv, cv.nodes[0], IPS)
    assert "ss -Hltn 'sport = :1883'" in host and "/dev/tcp/10.77.0.11/1883" in host
    ingress = cv.model_copy(update={"swarm": cv.swarm.model_copy(
        update={"publish_mode": "ingress"})})
    text = vip.check_script(ingress, cv.nodes[0], IPS)
    assert "label=com.docker.swarm.service.name=haswarm_mosquitto" in text
    assert "ss -H" not in text
    for script in (host, text):
        assert script.startswith("#!/bin/bash\n")
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    # the CONNECT packet: remaining length matches the bytes that follow
    raw = vip._CONNECT.encode().decode("unicode_escape").encode("latin-1")
    assert raw[0] == 0x10 and raw[1] == len(raw) - 2


def test_host_check_against_a_listener_and_nothing(cv, tmp_path):
    """The host-mode check on this computer: a broker process with a listener on the port
    passes; a listener alone (Docker's, for a waiting standby container) fails, nothing fails.
    The process name is swapped for one that only this test runs (the lab's brokers are
    processes of this computer too)."""
    if shutil.which("ss") is None or shutil.which("pgrep") is None:
        pytest.skip("ss or pgrep not installed")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    c2 = cv.model_copy(update={"mqtt": cv.mqtt.model_copy(update={"port": port})})
    text = vip.check_script(c2, cv.nodes[0], {**IPS, "pi1": "127.0.0.1"})
    assert "pgrep -x mosquitto" in text
    script = tmp_path / "check"
    script.write_text(text.replace("pgrep -x mosquitto", "pgrep -x hsw-test-mq"))
    assert subprocess.run(["bash", str(script)]).returncode != 0  # a listener, no broker
    broker = tmp_path / "hsw-test-mq"
    broker.symlink_to(shutil.which("sleep"))
    proc = subprocess.Popen([str(broker), "30"])
    try:
        assert subprocess.run(["bash", str(script)]).returncode == 0
        srv.close()
        assert subprocess.run(["bash", str(script)], stderr=subprocess.DEVNULL).returncode != 0
    finally:
        proc.kill()
        proc.wait()


def test_shell_commands_parse():
    for cmd in (vip.start_command(True), vip.start_command(False), vip.STOP,
                vip.facts_command("eth0"), vip.drop_address("10.77.0.100")):
        assert subprocess.run(["sh", "-n", "-c", cmd]).returncode == 0, cmd
    cron = vip.cron_text()
    assert "@reboot root" in cron and "%" not in cron  # cron turns % into a newline
    assert key_values("installed=yes\nconf=haswarm\n") == {"installed": "yes",
                                                                  "conf": "haswarm"}
    ok = vip.VIPFacts(installed=True, systemd=False, running=False, conf="none", interface=True)
    assert vip.plan_problems(ok, "eth0") == []
    bad = vip.VIPFacts(installed=False, systemd=False, running=False, conf="other",
                       interface=False)
    problems = vip.plan_problems(bad, "eth9")
    assert len(problems) == 3 and "apt-get install keepalived" in problems[0]


def _port_lost(text: str, host: str) -> str:
    """The volume status with `host`'s brick running (pid 4242) but without a port."""
    return text.replace(_brick_node(host), _brick_node(host).replace(
        "<port>53527</port>", "<port>N/A</port><pid>4242</pid>"))


def test_a_brick_running_without_a_port_serves_no_one(c):
    text = _port_lost(VOLUME_STATUS_ALL_UP, "10.77.0.13")
    procs = facts_cluster.parse_brick_processes(text)
    assert procs["10.77.0.13:/srv/gluster/haswarm"] == facts_cluster.BrickProcess(
        running=True, port=None, pid=4242)
    assert procs["10.77.0.11:/srv/gluster/haswarm"].serving
    assert facts_cluster.parse_volume_status(text)["10.77.0.13:/srv/gluster/haswarm"] is False
    pi3 = facts_cluster.bricks_from(c, text, None)[2]
    assert (pi3.online, pi3.port_lost) == (False, True)
    st = status.ClusterStatus(cluster=c, nodes=[status.NodeStatus(n.name, n.address)
                                                for n in c.nodes], gluster_known=True)
    st.nodes[2].brick = pi3
    assert any("pi3: brick 10.77.0.13:/srv/gluster/haswarm runs but glusterd has no port" in p
               for p in st.problems())


class BrickRemote:
    """`gluster volume status --xml` answered from a queue (the last answer repeats); every
    other command is logged as (node, command)."""
    reading = staticmethod(nullcontext)  # every read is live here

    def __init__(self, answers: list[str]):
        self.answers, self.log = list(answers), []

    def run(self, node, step, cmd, **kw):
        from tasks.remote import Result

        name = node if isinstance(node, str) else node.name
        if "volume status" in cmd:
            text = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            return Result(text, "", 0)
        self.log.append((name, cmd))
        return Result("", "", 0)


def test_restart_bricks_dry_run_says_it_and_a_run_does_it(c, capsys):
    from tasks import gluster

    lost = _port_lost(VOLUME_STATUS_ALL_UP, "10.77.0.13")
    r = BrickRemote([lost])
    assert gluster.restart_bricks(c, r, c.nodes[0], "gluster:volume", dryrun=True,
                                  settle=0) == []
    assert r.log == []  # a dry run changes nothing
    out = capsys.readouterr().out
    assert "pi3: gluster:volume: would stop the brick process 4242" in out
    assert "would start the volume's missing brick processes" in out
    r = BrickRemote([lost, lost, VOLUME_STATUS_ALL_UP])
    assert gluster.restart_bricks(c, r, c.nodes[0], "gluster:volume", settle=0) == [
        "10.77.0.13:/srv/gluster/haswarm"]
    assert [n for n, _ in r.log] == ["pi3", "pi1"]
    assert "kill 4242" in r.log[0][1] and "volume start haswarm force" in r.log[1][1]
    r = BrickRemote([VOLUME_STATUS_ALL_UP])  # all serve: one read, nothing done
    assert gluster.restart_bricks(c, r, c.nodes[0], "gluster:volume", settle=0) == []
    assert r.log == [] and r.answers == [VOLUME_STATUS_ALL_UP]
