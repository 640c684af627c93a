"""Facts -> decisions for swarm, stack and Galera bootstrap, fed with recorded CLI output.

The outputs below were recorded on the lab (dockerd 20.10.24, CLI 28.2.2) and trimmed.
"""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import nullcontext
from pathlib import Path

import pytest
import yaml

from tasks import galera, render, secrets, stack, stack_facts, swarm, swarm_facts
from tasks.config import LAB_CLUSTER_FILE, Cluster, Node, load_cluster
from tasks.failures import Result
from tasks.galera import BOOTSTRAP, STEADY, GaleraFacts, Member, decide
from tasks.ops import Op
from tasks.swarm import leave_plan, plan
from tasks.swarm_facts import SwarmFacts, parse_swarm_info


@pytest.fixture(scope="module")
def c() -> Cluster:
    return load_cluster(LAB_CLUSTER_FILE)


ADDRS = {"pi1": "10.77.0.11", "pi2": "10.77.0.12", "pi3": "10.77.0.13"}

# ---------------------------------------------------------------------------------------------
# swarm


INACTIVE = ('{"NodeID":"","NodeAddr":"","LocalNodeState":"inactive","ControlAvailable":false,'
            '"Error":"","RemoteManagers":null}')


def manager_info(node_id: str, addr: str, cluster: str, managers: list[str],
                 heartbeat: int = 1_000_000_000) -> str:
    return json.dumps({
        "NodeID": node_id, "NodeAddr": addr, "LocalNodeState": "active",
        "ControlAvailable": True, "Error": "",
        "RemoteManagers": [{"NodeID": f"id-{m}", "Addr": f"{m}:2377"} for m in managers],
        "Nodes": len(managers), "Managers": len(managers),
        "Cluster": {"ID": cluster, "Spec": {"Name": "default",
                                            "Dispatcher": {"HeartbeatPeriod": heartbeat}}},
    })


def worker_info(node_id: str, addr: str, managers: list[str]) -> str:
    return json.dumps({
        "NodeID": node_id, "NodeAddr": addr, "LocalNodeState": "active",
        "ControlAvailable": False, "Error": "",
        "RemoteManagers": [{"NodeID": "x", "Addr": f"{m}:2377"} for m in managers]})


ALL = list(ADDRS.values())


def test_parse_manager_info():
    f = parse_swarm_info(manager_info("abc", "10.77.0.11", "clu", ALL, 5_000_000_000))
    assert f.active and f.manager
    assert f.cluster_id == "clu"
    assert f.managers == tuple(sorted(ALL))
    assert f.heartbeat_ns == 5_000_000_000


def test_parse_inactive_info():
    f = parse_swarm_info(INACTIVE)
    assert f.state == "inactive" and not f.manager and f.managers == () and f.heartbeat_ns is None


def whats(ops: list[Op]) -> list[tuple[str | None, str]]:
    """(node, what) of each op: the plan as the user reads it."""
    return [(op.node, op.what) for op in ops]


def converged() -> dict[str, SwarmFacts]:
    """Every node a manager of swarm "clu", the heartbeat of the lab's cluster file (2 s)."""
    return {n: parse_swarm_info(manager_info(f"id-{n}", a, "clu", ALL, 2_000_000_000))
            for n, a in ADDRS.items()}


WAIT = ("pi1", "wait until pi1, pi2, pi3 are Ready managers")


def test_plan_fresh_inits_first_joins_the_others_then_heartbeat_and_wait(c):
    facts = {n: parse_swarm_info(INACTIVE) for n in ADDRS}
    ops = plan(c, facts, ADDRS)
    assert whats(ops) == [("pi1", "init (advertise 10.77.0.11)"),
                          ("pi2", "join as manager via pi1"),
                          ("pi3", "join as manager via pi1"),
                          ("pi1", "set the dispatcher heartbeat to 2 s"), WAIT]
    assert ops[0].cmd == ("docker swarm init --advertise-addr 10.77.0.11 "
                          "--listen-addr 0.0.0.0:2377")
    assert ops[1].call is not None and ops[1].cmd is None  # the token is read when applied
    assert ops[3].cmd == "docker swarm update --dispatcher-heartbeat 2s"
    assert ops[4].wait == swarm.MEMBERSHIP_TIMEOUT


def test_plan_converged_is_empty(c):
    assert plan(c, converged(), ADDRS) == []


def test_plan_a_node_that_left_joins_again_and_nothing_else(c):
    facts = converged() | {"pi3": parse_swarm_info(INACTIVE)}
    assert whats(plan(c, facts, ADDRS)) == [("pi3", "join as manager via pi1"), WAIT]


def test_plan_half_joined_joins_the_rest_via_a_member(c):
    two = ["10.77.0.12", "10.77.0.13"]
    facts = {"pi1": parse_swarm_info(INACTIVE),
             "pi2": parse_swarm_info(manager_info("b", "10.77.0.12", "clu", two, 2_000_000_000)),
             "pi3": parse_swarm_info(manager_info("c", "10.77.0.13", "clu", two, 2_000_000_000))}
    assert whats(plan(c, facts, ADDRS)) == [
        ("pi1", "join as manager via pi2"),
        ("pi2", "wait until pi1, pi2, pi3 are Ready managers")]


def four(c):
    return c.model_copy(update={"nodes": [*c.nodes, Node(name="pi4", address="10.77.0.14")]})


def test_four_nodes_three_managers_and_a_worker(c):
    """An even count of four or more: the last node listed joins as a worker (an odd raft);
    one that is a manager is demoted; the wait checks the roles by address."""
    c4 = four(c)
    addrs = {**ADDRS, "pi4": "10.77.0.14"}
    assert c4.manager_names == ["pi1", "pi2", "pi3"] and c.manager_names == c.names
    ops = plan(c4, converged() | {"pi4": parse_swarm_info(INACTIVE)}, addrs)
    assert whats(ops) == [("pi4", "join as worker via pi1"),
                          ("pi1", "wait until pi1, pi2, pi3 are Ready managers and pi4 a Ready "
                                  "worker")]
    assert "ready/worker@10.77.0.14" in ops[1].cmd and "ready/reachable@10.77.0.13:2377" \
        in ops[1].cmd
    four_managers = ALL + ["10.77.0.14"]
    facts = {n: parse_swarm_info(manager_info(f"id-{n}", a, "clu", four_managers,
                                              2_000_000_000)) for n, a in addrs.items()}
    ops = plan(c4, facts, addrs)
    assert whats(ops)[0] == ("pi1", "demote pi4 to a worker (4 nodes: 3 managers keep the raft "
                                    "odd)")
    assert ops[0].cmd == "docker node demote id-pi4"
    worker = facts | {"pi4": parse_swarm_info(worker_info("id-pi4", "10.77.0.14", ALL))}
    assert plan(c4, worker, addrs) == []  # not promoted
    five = c4.model_copy(update={"nodes": [*c4.nodes, Node(name="pi5", address="10.77.0.15")]})
    ops = plan(five, worker | {"pi5": parse_swarm_info(INACTIVE)},
               {**addrs, "pi5": "10.77.0.15"})
    assert whats(ops)[:2] == [("pi5", "join as manager via pi1"),
                              ("pi1", "promote pi4 (a worker) to manager")]


def test_plan_promotes_a_worker_of_this_swarm(c):
    facts = converged() | {"pi2": parse_swarm_info(worker_info("b", "10.77.0.12", ALL))}
    ops = plan(c, facts, ADDRS)
    assert whats(ops) == [("pi1", "promote pi2 (a worker) to manager"), WAIT]
    assert ops[0].cmd == "docker node promote b"


def test_plan_worker_and_fresh_node_with_the_old_heartbeat(c):
    facts = {"pi1": parse_swarm_info(manager_info("a", "10.77.0.11", "clu", ["10.77.0.11"],
                                                  5_000_000_000)),
             "pi2": parse_swarm_info(worker_info("b", "10.77.0.12", ["10.77.0.11"])),
             "pi3": parse_swarm_info(INACTIVE)}
    assert whats(plan(c, facts, ADDRS)) == [
        ("pi3", "join as manager via pi1"), ("pi1", "promote pi2 (a worker) to manager"),
        ("pi1", "set the dispatcher heartbeat 5 s -> 2 s"), WAIT]


def test_plan_heartbeat_different_updates_only_it(c):
    facts = {n: parse_swarm_info(manager_info(f"id-{n}", a, "clu", ALL, 5_000_000_000))
             for n, a in ADDRS.items()}
    ops = plan(c, facts, ADDRS)
    assert whats(ops) == [("pi1", "set the dispatcher heartbeat 5 s -> 2 s")]
    assert ops[0].cmd == "docker swarm update --dispatcher-heartbeat 2s"


def refusal(c: Cluster, facts: dict[str, SwarmFacts]) -> list[tuple[str, str]]:
    """(node, what to do) of each node plan refuses; it must refuse before any op."""
    with pytest.raises(swarm.RemoteError) as e:
        plan(c, facts, ADDRS)
    assert all("nothing was changed" in f.detail for f in e.value.failures)
    return [(f.node, f.hint) for f in e.value.failures]


def test_plan_node_in_a_foreign_swarm_is_a_problem_with_instructions(c):
    facts = {"pi1": parse_swarm_info(INACTIVE), "pi2": parse_swarm_info(INACTIVE),
             "pi3": parse_swarm_info(manager_info("c", "10.77.0.13", "other",
                                                  ["10.77.0.13", "192.168.1.50"]))}
    [(name, msg)] = refusal(c, facts)
    assert name == "pi3"
    assert "another swarm" in msg and "192.168.1.50" in msg
    assert "docker swarm leave --force" in msg


def test_plan_two_swarms_of_our_nodes_is_a_problem(c):
    facts = {"pi1": parse_swarm_info(INACTIVE),
             "pi2": parse_swarm_info(manager_info("b", "10.77.0.12", "one", ["10.77.0.12"])),
             "pi3": parse_swarm_info(manager_info("c", "10.77.0.13", "two", ["10.77.0.13"]))}
    [(name, msg)] = refusal(c, facts)
    assert name == "pi3" and "different swarm" in msg


@pytest.mark.parametrize("state", ["pending", "error", "locked"])
def test_plan_stuck_node_is_a_problem(c, state):
    facts = {n: parse_swarm_info(INACTIVE) for n in ADDRS}
    facts["pi2"] = SwarmFacts(state=state, error="boom")
    [(name, msg)] = refusal(c, facts)
    assert name == "pi2" and "docker swarm leave --force" in msg


def test_plan_worker_of_a_swarm_without_managers_is_a_problem(c):
    # pi2 is still a worker of a swarm whose manager (pi1) has left it
    facts = {"pi1": parse_swarm_info(INACTIVE),
             "pi2": parse_swarm_info(worker_info("b", "10.77.0.12", ["10.77.0.11"])),
             "pi3": parse_swarm_info(INACTIVE)}
    [(name, msg)] = refusal(c, facts)
    assert name == "pi2" and "do not answer as managers" in msg


NODE_INSPECT = (Path(__file__).parent / "data" / "swarm" / "node-inspect.txt").read_text()


@pytest.mark.parametrize(("case", "edit", "want"), [
    ("as recorded: pi3 down", {}, (1, ["pi3 is not a Ready manager yet"])),
    ("all up", {'"down"': '"ready"', '"unreachable"': '"reachable"'}, (0, [])),
    ("pi2 a worker", {'"down"': '"ready"', '"unreachable"': '"reachable"',
                      '{"Reachability":"reachable","Addr":"10.77.0.12:2377"}': "null"},
     (1, ["pi2 is not a Ready manager yet"])),
])
def test_managers_ready_check_on_recorded_node_inspect(c, tmp_path, case, edit, want):
    """The wait's shell check, run by sh with a `docker` printing what `docker node inspect`
    prints for its format, made from recorded inspect output."""
    text = NODE_INSPECT
    for old, new in edit.items():
        text = text.replace(old, new)
    rows = [json.loads(line) for line in text.splitlines()]
    lines = [f"{r['state']}/" + (f"{r['manager']['Reachability']}@{r['manager']['Addr']}"
                                 if r["manager"] else "") for r in rows]
    docker = tmp_path / "docker"
    docker.write_text("#!/bin/sh\n[ \"$2\" = ls ] && echo id1 id2 id3 && exit\n"
                      f"printf '%s\\n' {' '.join(lines)}\n")
    docker.chmod(0o755)
    res = subprocess.run(["sh", "-c", swarm.managers_ready_check(c, ADDRS)],
                         capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert (res.returncode, res.stdout.splitlines()[:1]) == want, res.stdout


def test_leave_plan_keeps_quorum(c):
    ops, skipped = leave_plan(c, converged(), ADDRS)
    assert whats(ops) == [("pi2", "demote to worker (via pi1)"),
                          ("pi3", "demote to worker (via pi1)"),
                          ("pi2", "leave"), ("pi3", "leave"),
                          ("pi1", "leave (last manager: the swarm ends)")]
    assert ops[2].cmd == ops[4].cmd == swarm.LEAVE_CMD and skipped == []


def test_leave_plan_nothing_and_foreign(c):
    facts = {n: parse_swarm_info(INACTIVE) for n in ADDRS}
    assert leave_plan(c, facts, ADDRS) == ([], [])
    facts["pi3"] = parse_swarm_info(manager_info("c", "10.77.0.13", "x", ["192.168.1.9"]))
    ops, skipped = leave_plan(c, facts, ADDRS)
    assert ops == [] and skipped == ["pi3 is in another swarm (managers: 192.168.1.9): "
                                     "left as it is"]


def test_leave_plan_unreachable_node_is_not_in_facts(c):
    facts = {n: f for n, f in converged().items() if n != "pi1"}
    ops, _ = leave_plan(c, facts, ADDRS)
    assert whats(ops) == [("pi3", "demote to worker (via pi2)"), ("pi3", "leave"),
                          ("pi2", "leave (last manager: the swarm ends)")]


def test_leave_plan_workers_leave_without_demotion(c):
    facts = converged() | {"pi3": parse_swarm_info(worker_info("c", "10.77.0.13", ALL))}
    ops, _ = leave_plan(c, facts, ADDRS)
    assert whats(ops) == [("pi2", "demote to worker (via pi1)"), ("pi2", "leave"),
                          ("pi3", "leave"), ("pi1", "leave (last manager: the swarm ends)")]


class SwarmRemote:
    """A Remote for swarm's setup and teardown: `docker info` answers from `infos` (recorded
    output per node), which init, join and leave change as Docker would; every command but
    `docker info` is logged as (node, command)."""
    reading = staticmethod(nullcontext)  # every read is live here

    def __init__(self, c: Cluster, infos: dict[str, str], nodes: str = ""):
        self.cluster, self.infos, self.log = c, dict(infos), []
        self.nodes = nodes  # the swarm's node list (NODE_INSPECT_FORMAT lines), read unlogged

    def run(self, node, step, cmd, **kw):
        from tasks.facts_cluster import NODES_PROBE

        name = node if isinstance(node, str) else node.name
        if cmd == swarm_facts.INFO_CMD:
            return Result(self.infos[name], "", 0)
        if cmd == NODES_PROBE:
            return Result(self.nodes, "", 0)
        self.log.append((name, cmd))
        if cmd.startswith("docker swarm init"):
            self._manager(name)
        elif cmd == swarm.LEAVE_CMD:
            self.infos[name] = INACTIVE
        return Result("TOKEN" if "join-token" in cmd else "", "", 0)

    def run_all(self, step, cmd, nodes=None, **kw):
        return self.on_all(step, lambda n: self.run(n, step, cmd), nodes)

    def on_all(self, step, fn, nodes=None):
        return {n.name: fn(n) for n in (self.cluster.nodes if nodes is None else nodes)}

    def redact(self, *values):
        pass

    def docker(self, node):
        remote = self

        class Swarm:
            def join(self, remote_addrs, join_token, listen_addr, advertise_addr):
                remote.log.append((node.name, f"API join {remote_addrs} {join_token}"))
                remote._manager(node.name)

        return type("Client", (), {"swarm": Swarm()})()

    def _manager(self, name: str) -> None:
        self.infos[name] = manager_info(f"id-{name}", ADDRS[name], "clu", ALL, 2_000_000_000)


def test_setup_from_fresh_nodes_applies_the_plan_in_order(c, capsys):
    r = SwarmRemote(c, {n: INACTIVE for n in ADDRS})
    facts = swarm.setup(c, r)
    assert facts == {"cluster_id": "clu", "managers": ["pi1", "pi2", "pi3"]}
    assert [(n, cmd.split(" --")[0]) for n, cmd in r.log if "node inspect" not in cmd] == [
        ("pi1", "docker swarm init"),
        ("pi1", "docker swarm join-token -q manager"),  # read after init, once per join
        ("pi2", "API join ['10.77.0.11:2377'] TOKEN"),
        ("pi1", "docker swarm join-token -q manager"),
        ("pi3", "API join ['10.77.0.11:2377'] TOKEN"),
        ("pi1", "docker swarm update")]
    assert r.log[-1] == ("pi1", swarm.managers_ready_check(c, ADDRS))  # the wait
    out = capsys.readouterr().out
    assert "pi2: swarm: join as manager via pi1\n" in out
    assert out.endswith("pi1: swarm: 3 managers (pi1, pi2, pi3), dispatcher heartbeat 2 s\n")


def test_setup_converged_says_nothing_to_do(c, capsys):
    r = SwarmRemote(c, {n: manager_info(f"id-{n}", a, "clu", ALL, 2_000_000_000)
                        for n, a in ADDRS.items()})
    assert swarm.setup(c, r) == {"cluster_id": "clu", "managers": ["pi1", "pi2", "pi3"]}
    assert r.log == []
    assert capsys.readouterr().out.splitlines() == [
        "pi1: swarm: nothing to do",
        "pi1: swarm: managers already as wanted: 3 managers (pi1, pi2, pi3), dispatcher "
        "heartbeat 2 s"]


def test_setup_dry_run_only_reads(c, capsys):
    r = SwarmRemote(c, {n: INACTIVE for n in ADDRS})
    assert swarm.setup(c, r, True) == {}
    assert r.log == []
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == ["pi1: swarm: would init (advertise 10.77.0.11)",
                                    "pi2: swarm: would join as manager via pi1"]


def test_teardown_demotes_one_at_a_time_then_leaves(c, capsys):
    r = SwarmRemote(c, {n: manager_info(f"id-{n}", a, "clu", ALL) for n, a in ADDRS.items()})
    assert swarm.teardown(c, r, dryrun=True) == [] and r.log == []
    assert "pi3: swarm: would demote to worker (via pi1)" in capsys.readouterr().out
    notes = swarm.teardown(c, r)
    assert [(n, cmd.split(" --")[0]) for n, cmd in r.log] == [
        ("pi1", "docker node demote id-pi2"), ("pi1", "docker node inspect"),
        ("pi1", "docker node demote id-pi3"), ("pi1", "docker node inspect"),
        ("pi2", swarm.LEAVE_CMD.split(" --")[0]), ("pi3", swarm.LEAVE_CMD.split(" --")[0]),
        ("pi1", swarm.LEAVE_CMD.split(" --")[0])]
    assert notes == ["swarm: 3 node(s) left the swarm"]
    assert swarm.teardown(c, r) == ["swarm: no node is in this swarm: nothing to remove"]


def test_heartbeat_duration():
    assert swarm._duration(1_000_000_000) == "1s"
    assert swarm._duration(1_500_000_000) == "1500ms"


# ---------------------------------------------------------------------------------------------
# stack: parsing


SERVICE_INSPECT = "\n".join(json.dumps(d) for d in [
    {"ID": "s1", "Spec": {"Name": "haswarm_db", "Mode": {"Replicated": {"Replicas": 3}},
                          "TaskTemplate": {"ContainerSpec": {"Healthcheck": {
                              "Test": ["CMD", "/usr/local/bin/galera-healthcheck"]}}}}},
    {"ID": "s2", "Spec": {"Name": "haswarm_db-seed", "Mode": {"Replicated": {"Replicas": 0}},
                          "TaskTemplate": {"ContainerSpec": {}}}},
    {"ID": "s3", "Spec": {"Name": "haswarm_homeassistant", "Mode": {"Replicated": {"Replicas": 1}},
                          "TaskTemplate": {"ContainerSpec": {}}},
     "UpdateStatus": {"State": "rollback_completed", "Message": "rollback completed"}},
    {"ID": "s4", "Spec": {"Name": "haswarm_portainer-agent", "Mode": {"Global": {}},
                          "TaskTemplate": {"ContainerSpec": {}}}},
])

def ps_line(task_id: str, name: str, node: str, current: str, desired: str = "Running",
            error: str = "", image: str = "haswarm/mariadb-galera:10.11-2") -> str:
    """One line of `docker stack ps --no-trunc --format '{{json .}}'` as recorded."""
    return json.dumps({"CurrentState": current, "DesiredState": desired, "Error": error,
                       "ID": task_id, "Image": image, "Name": name, "Node": node, "Ports": ""},
                      separators=(",", ":"))


STACK_PS = "\n".join([
    ps_line("t-db1", "haswarm_db.1", "pi2", "Running 2 minutes ago"),
    ps_line("t-db2", "haswarm_db.2", "pi1", "Running 2 minutes ago"),
    ps_line("t-db3", "haswarm_db.3", "pi3", "Preparing 1 second ago"),
    ps_line("t-ha", "haswarm_homeassistant.1", "pi1", "Running 9 seconds ago",
            image="haswarm-lab/homeassistant:2026.2.3"),
]) + "\n"

SERVICE_PS_HISTORY = "\n".join([
    ps_line("ye8l", "tst_bad.1", "pi3", "Preparing 1 second ago", image="debian:bookworm"),
    ps_line("2sdq", "tst_bad.1", "pi3", "Failed 1 second ago", desired="Shutdown",
            error='"task: non-zero exit (1)"', image="debian:bookworm"),
])

PS = {
    "pi1": "c1\thaswarm_db\tt-db2\trunning\tUp 2 minutes (healthy)\n"
           "c2\thaswarm_homeassistant\tt-ha\trunning\tUp 9 seconds (health: starting)\n"
           "old\thaswarm_homeassistant\tt-old\trunning\tUp 3 hours (healthy)\n",
    "pi2": "c3\thaswarm_db\tt-db1\trunning\tUp 2 minutes (unhealthy)\n",
    "pi3": "",
}


def test_parse_services():
    s = stack_facts.parse_services(SERVICE_INSPECT, "haswarm")
    assert s["db"].desired == 3 and s["db"].has_healthcheck
    assert s["db-seed"].desired == 0 and not s["db-seed"].has_healthcheck
    assert s["homeassistant"].update_state == "rollback_completed"
    assert s["portainer-agent"].desired is None


def test_parse_tasks_and_history():
    t = stack_facts.parse_tasks(STACK_PS, "haswarm")
    assert [(x.service, x.slot, x.node, x.current_state) for x in t][:3] == [
        ("db", "1", "pi2", "Running"), ("db", "2", "pi1", "Running"),
        ("db", "3", "pi3", "Preparing")]
    h = stack_facts.parse_tasks(SERVICE_PS_HISTORY, "tst")
    assert h[1].error == "task: non-zero exit (1)" and h[1].since == "1 second ago"


def task_inspect(task_id: str, service_id: str, image: str, state: str = "running",
                 desired: str = "running", err: str = "") -> str:
    """One line of `docker inspect --format '{{json .}}' TASK` as recorded (trimmed): the
    stored spec lacks defaults (Runtime, DNSConfig) that the service's spec shows."""
    return json.dumps({"ID": task_id, "ServiceID": service_id, "Slot": 1, "NodeID": "n1",
                       "DesiredState": desired, "Status": {"State": state, "Err": err},
                       "Spec": {"ContainerSpec": {"Image": image, "Args": ["node"]}}})


def test_task_is_outdated_when_its_template_differs():
    services = stack_facts.parse_services(json.dumps(
        {"ID": "s1", "Spec": {"Name": "haswarm_db", "Mode": {"Replicated": {"Replicas": 2}},
                              "TaskTemplate": {"Runtime": "container", "ContainerSpec": {
                                  "Image": "galera:2", "Args": ["node"], "DNSConfig": {}}}}}),
        "haswarm")
    text = "\n".join([task_inspect("new", "s1", "galera:2"),
                      task_inspect("old", "s1", "galera:1"),
                      task_inspect("gone", "other-service", "x:1")])
    tasks = stack_facts.parse_task_inspect(text, services)
    assert [(t.id, t.service, t.up_to_date, t.current_state) for t in tasks] == [
        ("new", "db", True, "Running"), ("old", "db", False, "Running")]


def test_parse_containers_health():
    cts = stack_facts.parse_containers("pi1", PS["pi1"], "haswarm")
    assert [(x.service, x.health, x.ready) for x in cts] == [
        ("db", "healthy", True), ("homeassistant", "starting", False),
        ("homeassistant", "healthy", True)]
    assert stack_facts.parse_containers("pi3", "garbage\n", "haswarm") == []
    plain = stack_facts.parse_containers("pi1", "c9\thaswarm_mosquitto\tt9\trunning\tUp 1 second\n",
                                   "haswarm")
    assert plain[0].health == "" and plain[0].ready


def state() -> stack_facts.StackState:
    return stack_facts.StackState(
        services=stack_facts.parse_services(SERVICE_INSPECT, "haswarm"),
        tasks=stack_facts.parse_tasks(STACK_PS, "haswarm"),
        containers=[ct for n, out in PS.items()
                    for ct in stack_facts.parse_containers(n, out, "haswarm")])


def test_state_counts_only_current_tasks():
    s = state()
    # the old homeassistant container (task not desired any more) does not count
    assert [ct.id for ct in s.current("homeassistant")] == ["c2"]
    assert s.ready("homeassistant") == []
    assert [ct.node for ct in s.ready("db")] == ["pi1"]
    summary = s.summary(3)
    assert "db 1/3 [pi1] (unhealthy)" in summary
    assert "homeassistant 0/1 (starting, rollback completed)" in summary
    assert "portainer-agent 0/3" in summary


def test_state_problems_name_service_and_numbers():
    probs = state().problems({"db": 3, "db-seed": 0, "homeassistant": 1, "mosquitto": 1}, 3)
    assert "db: 1 of 3 running and healthy" in probs
    assert "homeassistant: update rollback_completed: rollback completed" in probs
    assert "mosquitto: no such service" in probs
    assert not any(p.startswith("db-seed") for p in probs)


def test_expected_replicas_from_rendered_stack(tmp_path):
    doc = {"services": {"db": {"deploy": {"replicas": 3}}, "mosquitto": {},
                        "agent": {"deploy": {"mode": "global"}},
                        "db-seed": {"deploy": {"replicas": 0}}}}
    assert stack_facts.expected_replicas(yaml.safe_dump(doc), 3) == {
        "db": 3, "mosquitto": 1, "agent": 3, "db-seed": 0}


def test_referenced_objects_and_marker(c):
    text = yaml.safe_dump({"services": {}, "configs": {"a": {"external": True, "name": "x_a_1"}},
                           "secrets": {"b": {"external": True, "name": "x_b_2"}}})
    refs = stack_facts.referenced_objects(c, text)
    assert {"x_a_1", "x_b_2", stack_facts.marker_name(c, text)} == refs
    assert stack_facts.marker_name(c, text).startswith(f"{c.name}_deployed-stack_")
    assert stack_facts.marker_name(c, text) != stack_facts.marker_name(c, text + "#")


# ---------------------------------------------------------------------------------------------
# Galera: status parsing and the bootstrap decision

def recorded(name: str) -> str:
    """An output recorded from the lab (tests/unit/data/<fact>/<case>)."""
    return (Path(__file__).parent / "data" / name).read_text()


STATUS = recorded("galera/status-synced.txt")


def test_parse_galera_status_sections():
    text = f"== c1\n{STATUS}== c2\n" + STATUS.replace("Synced", "Joining:_receiving_State_Transfer")
    ms = galera.parse_status_sections("pi1", text, {"c1": "db", "c2": "db-seed"})
    assert [(m.service, m.synced, m.cluster_size) for m in ms] == [
        ("db", True, 4), ("db-seed", False, 4)]
    assert ms[1].local_state == "Joining: receiving State Transfer"
    # a container that did not answer (exec failed) is a member with no state
    ms = galera.parse_status_sections("pi1", "== c3\n", {"c3": "db"})
    assert ms[0].cluster_status == "none" and not ms[0].synced


def test_galera_status_falls_back_to_docker_exec(tmp_path: Path) -> None:
    """The status listener is read through nsenter; a container whose listener does not
    answer (still starting; or no pid: `docker inspect` fails here) is asked by `docker exec`,
    and one that answers neither way is a member with no state."""
    from tasks.facts import galera_command

    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\ncase $1 in inspect) exit 1 ;; exec) [ \"$2\" = c1 ] || exit 1; "
                    f"cat {tmp_path}/status ;; esac\n")
    fake.chmod(0o755)
    (tmp_path / "status").write_text(STATUS)
    out = subprocess.run(["sh", "-c", galera_command(["c1", "c2"])], capture_output=True,
                         text=True, env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
                         timeout=30).stdout
    ms = galera.parse_status_sections("pi1", out, {"c1": "db", "c2": "db"})
    assert [(m.container, m.synced) for m in ms] == [("c1", True), ("c2", False)]


def m(node: str, service: str = "db", synced: bool = True, size: int = 3,
      phase: str = "running") -> Member:
    return Member(node=node, service=service, container=f"{service}-{node}", phase=phase,
                  cluster_status="Primary" if synced else "none",
                  local_state="Synced" if synced else "none", cluster_size=size if synced else 0)


def test_decide_fresh_bootstraps():
    d = decide(GaleraFacts(seed_desired=None, db_desired=None), 3)
    assert d.kind == "bootstrap" and d.steps == BOOTSTRAP


def test_decide_fresh_with_empty_waiting_db_nodes_still_bootstraps():
    f = GaleraFacts(seed_desired=0, db_desired=3,
                    members=[m("pi1", synced=False, phase="waiting")])
    assert decide(f, 3).kind == "bootstrap"


def test_decide_converged_does_nothing_but_steady():
    f = GaleraFacts(seed_desired=0, db_desired=3, members=[m("pi1"), m("pi2"), m("pi3")])
    d = decide(f, 3)
    assert d.kind == "running" and d.steps == STEADY
    assert "no bootstrap" in d.reason and "cluster size 3" in d.reason
    assert "deploy-bootstrap" not in d.steps


def test_decide_one_synced_db_never_starts_a_seed():
    f = GaleraFacts(seed_desired=0, db_desired=3,
                    members=[m("pi1"), m("pi2", synced=False, phase="joining")])
    d = decide(f, 3)
    assert d.kind == "running" and "deploy-bootstrap" not in d.steps


def test_decide_half_bootstrapped_seed_only():
    f = GaleraFacts(seed_desired=1, db_desired=0, members=[m("pi2", "db-seed", size=1)])
    d = decide(f, 3)
    assert d.kind == "resume" and d.steps[0] == "wait-seed"
    assert "deploy-bootstrap" not in d.steps and "remove-seed" in d.steps


def test_decide_half_bootstrapped_seed_and_synced_db():
    f = GaleraFacts(seed_desired=1, db_desired=3,
                    members=[m("pi2", "db-seed", size=4), m("pi1", size=4)])
    d = decide(f, 3)
    assert d.kind == "resume" and d.steps[0] == "scale-db"


def test_decide_seed_removed_but_ha_not_deployed():
    # the seed is gone, db Synced: only the steady deploy is left
    f = GaleraFacts(seed_desired=0, db_desired=3, members=[m("pi1"), m("pi2"), m("pi3")])
    assert decide(f, 3).steps == STEADY


def test_decide_data_on_volumes_recovers_without_seed():
    f = GaleraFacts(seed_desired=None, db_desired=None, data_nodes=["pi1", "pi2", "pi3"])
    d = decide(f, 3)
    assert d.kind == "recover" and d.steps == STEADY and "no seed" in d.reason


def test_decide_recovering_db_nodes_are_left_to_recover():
    f = GaleraFacts(seed_desired=0, db_desired=3, data_nodes=["pi1", "pi2", "pi3"],
                    members=[m(n, synced=False, phase="waiting") for n in ("pi1", "pi2", "pi3")])
    assert decide(f, 3).kind == "recover"


def test_decide_unknown_node_refuses_to_seed():
    f = GaleraFacts(seed_desired=None, db_desired=None, unknown_nodes=["pi3"])
    d = decide(f, 3)
    assert d.kind == "refuse" and d.steps == () and "pi3" in d.reason


# ---------------------------------------------------------------------------------------------
# doit task shape


@pytest.fixture
def rendered(tmp_path) -> Cluster:
    """The lab cluster with its build and secrets directories under tmp_path, rendered."""
    data = yaml.safe_load(LAB_CLUSTER_FILE.read_text())
    data["build_dir"] = str(tmp_path / "build")
    data["secrets_dir"] = str(tmp_path / "secrets")
    path = tmp_path / "cluster.yml"
    path.write_text(yaml.safe_dump(data))
    cl = load_cluster(path)
    secrets.ensure(cl)
    for out in render.outputs(cl):
        render.write(render.build_dir(cl) / out.target, render.render(cl, out), out.mode)
    return cl


def test_tasks_order_and_always_asking_the_nodes(rendered):
    from tasks import galera

    c = rendered
    sw = swarm.swarm_task(c, after=["gluster"])
    objs = stack.objects_task(c)
    st = galera.stack_task(c)
    assert sw["task_dep"] == ["gluster"] and sw["basename"] == "swarm"
    assert "swarm" in objs["task_dep"]
    assert {"stack-objects", "swarm"} <= set(st["task_dep"])
    for t in (sw, objs, st):  # no stamp decides: the nodes are asked on every setup
        assert t["uptodate"] == [False] and "targets" not in t
    assert any(p.endswith("stack.yml") for p in st["file_dep"])
    for t in (sw, objs, st):
        assert "\n" not in t["doc"] and callable(t["clean"][0])


def test_rendered_stacks_parse(rendered):
    base = render.build_dir(rendered)
    steady = stack_facts.expected_replicas((base / "stack.yml").read_text(), 3)
    boot = stack_facts.expected_replicas((base / "stack.bootstrap.yml").read_text(), 3)
    ha = 3 if rendered.ha_standby else 1  # a waiting HA on every node in host mode
    assert (steady["db"], steady["db-seed"], steady["homeassistant"]) == (3, 0, ha)
    assert (boot["db"], boot["db-seed"], boot["homeassistant"]) == (0, 1, 0)
    refs = stack_facts.referenced_objects(rendered, (base / "stack.yml").read_text())
    objects = render.docker_objects(rendered)
    assert {name for objs in objects.values() for name, _ in objs.values()} < refs



# ---------------------------------------------------------------------------------------------
# stack-objects: facts (the names that exist) -> plan_objects -> apply_ops


def wanted(c: Cluster) -> dict[str, list[str]]:
    """The names the stack references, by kind ('config', 'secret'), each kind by key."""
    return {kind[:-1]: [name for _, (name, _) in sorted(objs.items())]
            for kind, objs in render.docker_objects(c).items()}


def test_plan_objects_from_scratch_creates_every_object_configs_first(rendered):
    w = wanted(rendered)
    ops = stack.plan_objects(rendered, {"config": set(), "secret": set()}, "pi2")
    assert whats(ops) == [("pi2", f"create {kind} {name}")
                          for kind in ("config", "secret") for name in w[kind]]
    assert all(op.call is not None and op.cmd is None and op.put is None for op in ops)


def test_plan_objects_converged_is_empty(rendered):
    w = wanted(rendered)
    existing = {kind: {*names, f"{rendered.name}_old_0123456789"} for kind, names in w.items()}
    assert stack.plan_objects(rendered, existing, "pi1") == []


def test_plan_objects_creates_only_the_missing_ones(rendered):
    w = wanted(rendered)
    existing = {"config": set(w["config"][1:]), "secret": set(w["secret"])}
    assert whats(stack.plan_objects(rendered, existing, "pi1")) == [
        ("pi1", f"create config {w['config'][0]}")]
    # a kind the facts do not mention has none
    assert len(stack.plan_objects(rendered, {"config": set(w["config"])}, "pi1")) == len(
        w["secret"])


def test_plan_objects_holds_no_secret(rendered):
    ops = stack.plan_objects(rendered, {}, "pi1")
    values = secrets.secret_values(rendered)
    assert values
    shown = " ".join(f"{op!r} {op.what}" for op in ops)
    assert not [v for v in values if v in shown]


class ObjectsRemote:
    """A Remote for `stack-objects`: pi1 is the manager; `docker config|secret ls` answer the
    names in `existing`, which creating through the (fake) Docker API adds to; every create is
    logged as (kind, name, data, labels)."""
    reading = staticmethod(nullcontext)  # every read is live here

    def __init__(self, c: Cluster, existing: dict[str, set[str]]):
        self.cluster, self.existing, self.created = c, existing, []

    def run(self, node, step, cmd, **kw):
        name = node if isinstance(node, str) else node.name
        if cmd == swarm_facts.INFO_CMD:
            return Result(manager_info("id-pi1", ADDRS["pi1"], "c1", ["pi1"]) if name == "pi1"
                          else INACTIVE, "", 0)
        kind = cmd.split()[1]
        assert cmd.startswith(f"docker {kind} ls") and name == "pi1"
        return Result("".join(f"{n}\n" for n in sorted(self.existing[kind])), "", 0)

    def redact(self, *values):
        pass

    def docker(self, node):
        remote = self

        class Collection:
            def __init__(self, kind: str):
                self.kind = kind

            def create(self, name, data, labels):
                remote.created.append((self.kind, name, data, labels))
                remote.existing[self.kind].add(name)

        assert node == "pi1"
        return type("Client", (), {"configs": Collection("config"),
                                   "secrets": Collection("secret")})()


def test_setup_objects_creates_the_missing_ones_never_showing_a_secret(rendered, capsys):
    c, w = rendered, wanted(rendered)
    r = ObjectsRemote(c, {"config": set(w["config"]), "secret": set(w["secret"][1:])})
    assert stack.setup_objects(c, r) == {"objects": sorted(n for v in w.values() for n in v)}
    key, (name, source) = sorted(render.docker_objects(c)["secrets"].items())[0]
    assert r.created == [("secret", name, source.read_bytes(),
                          {stack.HASWARM_LABEL: c.name, "io.haswarm.key": key})]
    total = sum(len(v) for v in w.values())
    out = capsys.readouterr().out
    assert out.splitlines() == [f"pi1: stack: create secret {name}",
                                f"pi1: stack-objects: 1 created, {total - 1} present"]
    assert not [v for v in secrets.secret_values(c) if v in out]


def test_setup_objects_dry_run_says_what_it_would_create_then_nothing_to_do(rendered, capsys):
    c, w = rendered, wanted(rendered)
    r = ObjectsRemote(c, {"config": set(), "secret": set(w["secret"])})
    assert stack.setup_objects(c, r, dryrun=True) == {} and r.created == []
    assert capsys.readouterr().out.splitlines() == [
        f"pi1: stack-objects: would create config {n}" for n in w["config"]]
    r.existing["config"] = set(w["config"])
    assert stack.setup_objects(c, r, dryrun=True) == {}
    assert capsys.readouterr().out == "pi1: stack-objects: nothing to do\n"
    assert stack.setup_objects(c, r) == {"objects": sorted(n for v in w.values() for n in v)}
    assert r.created == []
    total = sum(len(v) for v in w.values())
    assert capsys.readouterr().out == f"pi1: stack-objects: 0 created, {total} present\n"


def test_steady_problems_add_galera_to_the_swarm_view():
    # the recorded state: db 1 of 3 healthy; galera sees one Synced member of a cluster of 2
    ms = [m("pi1", size=2), m("pi2", synced=False, phase="joining")]
    probs = galera.steady_problems(state(), ms, {"db": 3, "homeassistant": 1}, 3)
    assert "db: 1 of 3 running and healthy" in probs
    assert probs[-2:] == ["db: 1 of 3 Synced", "galera: wsrep_cluster_size [0, 2], want 3"]
    assert galera.steady_problems(stack_facts.StackState({}, [], []), [], {}, 3) == [
        "db: 0 of 3 Synced"]


def test_deploy_sends_the_stack_file_on_stdin_never_as_a_file(c, tmp_path):
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def run(self, node, step, cmd, **kw):  # noqa: ANN001, ANN003, ANN201
            self.calls.append((node, step, cmd, kw))
            return Result("", "", 0)

        def put(self, *a, **kw):  # noqa: ANN002, ANN003, ANN201
            raise AssertionError("deploy must not write the stack file on the node")

    stack_file = tmp_path / "stack.yml"
    stack_file.write_text("services: {}\n")
    r = Recorder()
    stack.deploy(r, c, "pi1", stack_file)  # type: ignore[arg-type]
    ((node, step, cmd, kw),) = r.calls
    assert (node, step) == ("pi1", "stack: deploy")
    assert cmd == "docker stack deploy --resolve-image never --prune -c - haswarm"
    assert kw["stdin"] == "services: {}\n" and kw["timeout"] == stack.DEPLOY_TIMEOUT
    assert "/tmp" not in cmd
