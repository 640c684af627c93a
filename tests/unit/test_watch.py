"""The pure analysis of tasks/watch.py: gaps, availability, container starts, overlaps."""

from __future__ import annotations

import pytest

from tasks.watch import Census, Sample, availability, gaps, overlaps, parse_census, starts


def samples(pattern: str, step: float = 0.5) -> list[Sample]:
    """'++--+' -> samples every `step` s: + answered, - did not."""
    return [Sample(i * step, ch == "+") for i, ch in enumerate(pattern)]


def test_gaps_run_from_the_first_failure_to_the_next_answer():
    assert gaps(samples("++--+++-+"), end=4.5) == [(1.0, 2.0), (3.5, 4.0)]
    assert gaps(samples("+++"), end=1.5) == []
    assert gaps(samples("+--"), end=2.0) == [(0.5, 2.0)]  # still down at the end


def test_availability_figures():
    a = availability("ha", samples("++++----++++++-+"), end=8.0, fault=1.9)
    assert a.down == pytest.approx(2.5)
    assert a.longest == pytest.approx(2.0)
    assert len(a.gaps) == 2
    assert a.first_answer == pytest.approx(4.0 - 1.9)
    assert a.percent == pytest.approx(100 * (1 - 2.5 / 8.0))


def test_answering_through_the_fault_is_a_first_answer_of_zero():
    a = availability("ha", samples("+" * 40 + "--" + "+" * 4), end=23.0, fault=2.0)
    assert a.first_answer == 0.0  # the late gap has another cause; it still counts as down
    assert a.down == pytest.approx(1.0)


def test_never_answering_again():
    a = availability("ha", samples("++----"), end=3.0, fault=0.9)
    assert a.first_answer is None


CENSUS_OUT = """\
3f2a1b4c5d6e haswarm_homeassistant
9a8b7c6d5e4f haswarm_db
1111aaaa2222 other_service
#ha 3f2a1b4c5d6e""" + "0" * 52 + "\n"


def test_parse_census():
    containers, ha = parse_census(CENSUS_OUT, "haswarm")
    assert containers == {"homeassistant": ("3f2a1b4c5d6e",), "db": ("9a8b7c6d5e4f",)}
    assert ha == 1


def test_a_home_assistant_container_without_the_process_does_not_count():
    """A standby (or a second container swarm started) waits for the lock: it runs no HA."""
    containers, ha = parse_census("3f2a1b4c5d6e haswarm_homeassistant\n"
                                  "5555aaaa6666 haswarm_mosquitto\n#mq 5555aaaa6666ffff\n"
                                  "9999cccc0000 haswarm_db\n", "haswarm")
    assert containers == {"mosquitto": ("5555aaaa6666",), "db": ("9999cccc0000",)} and ha == 0
    two = ("3f2a1b4c5d6e haswarm_homeassistant\n7777bbbb8888 haswarm_homeassistant\n"
           "#ha 7777bbbb8888\n")
    assert parse_census(two, "haswarm") == ({"homeassistant": ("7777bbbb8888",)}, 1)
    assert parse_census("#ha\n", "haswarm") == ({}, 1)  # an HA outside any container
    forked = ("7777bbbb8888 haswarm_homeassistant\n#ha 7777bbbb8888\n#ha 7777bbbb8888\n")
    assert parse_census(forked, "haswarm") == ({"homeassistant": ("7777bbbb8888",)}, 1)


def test_a_mosquitto_container_waiting_for_the_lock_does_not_count():
    """With standby a Mosquitto container waits on every node; only the lock holder's runs
    mosquitto, and only it is the broker."""
    text = ("aaaa11112222 haswarm_mosquitto\nbbbb33334444 haswarm_mosquitto\n"
            "#mq bbbb33334444" + "0" * 52 + "\n")
    assert parse_census(text, "haswarm") == ({"mosquitto": ("bbbb33334444",)}, 0)
    assert parse_census("aaaa11112222 haswarm_mosquitto\n", "haswarm") == ({}, 0)


def look(t: float, node: str, ha: str | None = None, ha_procs: int | None = None,
         reachable: bool = True) -> Census:
    containers = {"homeassistant": (ha,)} if ha else {}
    procs = ha_procs if ha_procs is not None else (1 if ha else 0)
    return Census(t, node, reachable, containers, procs)


def test_a_move_off_a_healthy_node_and_the_overlap_it_caused():
    census = [look(0.0, "pi1"), look(0.0, "pi2"), look(0.0, "pi3", "old")]
    for i in range(1, 40):
        t = i * 0.5
        census.append(look(t, "pi1", "new" if t >= 10 else None))
        census.append(look(t, "pi3", "old" if t < 15 else None))
        census.append(look(t, "pi2", reachable=False))
    s = starts(census)
    assert [(x.service, x.kind, x.node, x.before) for x in s] == [
        ("homeassistant", "move", "pi1", ("pi3",))]
    assert s[0].t == 10.0
    o = overlaps(census, end=20.0)
    assert [(x.service, x.count, x.nodes) for x in o] == [("homeassistant", 2, ("pi1", "pi3"))]
    assert o[0].start == 10.0 and o[0].end == 14.5  # pi3's last look that saw it


def test_a_restart_on_the_same_node_and_no_overlap_when_the_old_one_is_gone():
    census = [look(0.0, "pi1", "a")]
    census += [look(0.5, "pi1"), look(1.0, "pi1", "b")]
    s = starts(census)
    assert [(x.kind, x.node) for x in s] == [("restart", "pi1")]
    assert overlaps(census, end=1.0) == []


def test_a_clean_hand_over_between_two_looks_is_no_overlap():
    # CI, docker stopped on pi2: pi2's look at 58.58 still saw HA, pi3's at 59.05 saw its new
    # one, pi2's at 59.08 no more; pi2's HA may have ended at any moment after 58.58
    census = [Census(t, "pi2", True, {"homeassistant": ("a",)}, 1, done=t + 0.1)
              for t in (57.58, 58.08, 58.58)]
    census += [Census(59.08, "pi2", True, {}, 0, done=59.2)]
    census += [Census(t, "pi3", True, {"homeassistant": ("b",)}, 0, done=t + 0.1)
               for t in (57.55, 58.05, 58.55)]
    census += [Census(t, "pi3", True, {"homeassistant": ("b",)}, 1, done=t + 0.1)
               for t in (59.05, 59.55, 60.05)]
    assert overlaps(census, end=61.0) == []


def test_an_overlap_is_known_from_the_answer_of_the_first_look_to_the_last_look():
    census = [Census(t, "pi1", True, {"homeassistant": ("a",)}, 1, done=t + 0.3)
              for t in (0.0, 0.5, 1.0, 1.5, 2.0)]
    census += [Census(t, "pi2", True, {"homeassistant": ("b",)}, 1, done=t + 0.3)
               for t in (1.2, 1.7, 2.2)]
    census += [Census(2.5, "pi1", True, {}, 0, done=2.8)]
    o = overlaps(census, end=3.0)
    assert [(x.start, x.end, x.count, x.nodes) for x in o] == [(1.5, 2.0, 2, ("pi1", "pi2"))]


def test_two_copies_on_one_node_are_an_overlap_on_their_own():
    census = [Census(0.0, "pi1", True, {"mosquitto": ("a", "b")}, 0, done=0.2)]
    assert [(x.service, x.count) for x in overlaps(census, end=1.0)] == [("mosquitto", 2)]


def test_a_waiting_container_is_not_a_running_home_assistant():
    # pi1's new container waits for the lease (no HA process) while pi3's still runs
    census = [look(t, "pi3", "old") for t in (0.0, 0.5, 1.0)]
    census += [look(t, "pi1", "new", ha_procs=0) for t in (0.0, 0.5, 1.0)]
    assert overlaps(census, end=1.0) == []


def test_drill_incidents_are_the_containers_the_fault_did_not_force():
    from tasks.drill import DrillResult
    from tasks.watch import WatchReport, stops

    def census(*looks: tuple[float, str, dict[str, tuple[str, ...]] | None]) -> list[Census]:
        return [Census(t, n, ids is not None, ids or {}, 0) for t, n, ids in looks]

    def result(looks: list[Census]) -> DrillResult:
        report = WatchReport(window=60, fault=3, probes={}, starts=starts(looks),
                             overlaps=[], committed=[], stops=stops(looks))
        return DrillResult(fault="kill", node="pi1", ran=["db", "mosquitto"], watch=report)

    # pi1 killed: its containers vanish with it; mosquitto moves to pi3, db returns on pi1
    expected = census((0, "pi1", {"db": ("d1",), "mosquitto": ("m1",)}), (0, "pi3", {}),
                      (5, "pi1", None), (6, "pi3", {"mosquitto": ("m2",)}),
                      (40, "pi1", {"db": ("d4",)}))
    assert result(expected).incidents() == []
    # a new leader declared healthy pi2 Down: its db was replaced
    wrong = census((0, "pi2", {"db": ("d2",)}), (29, "pi2", {}), (30, "pi2", {"db": ("d3",)}))
    incidents = result(wrong).incidents()
    assert len(incidents) == 1 and "db container d2 stopped at 29.0 s on pi2" in incidents[0]


def test_the_galera_probe_starts_once_the_census_has_looked() -> None:
    """Its first write goes through a db container the census found, not into a gap of the
    watch's own start (every rolling upgrade measured one such 0.5 s gap)."""
    import threading
    import time

    from tasks.config import LAB_CLUSTER_FILE, load_cluster
    from tasks.watch import CENSUS_CMD, Watch

    def run_on(node: str, cmd: str, timeout: float) -> str | None:
        if cmd == CENSUS_CMD:
            time.sleep(0.3)  # a node's first look takes a while
            return "9a8b7c6d5e4f haswarm_db\n"
        return "committed\n" if "mariadb" in cmd else None

    w = Watch(load_cluster(LAB_CLUSTER_FILE), run_on, mqtt_user="u", mqtt_password="p")
    loops = [lambda n=n.name: w._census_loop(n) for n in w.c.nodes]
    threads = [threading.Thread(target=f) for f in [*loops, lambda: w._probe_loop("galera")]]
    for t in threads:
        t.start()
    time.sleep(1.5)
    w._stop.set()
    for t in threads:
        t.join(5)
    tries = w.samples["galera"]
    assert tries and all(s.ok for s in tries), tries
    assert len(w.committed) == len(tries)
