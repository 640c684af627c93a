"""The swarm's engine setting: the election tick merged into daemon.json, and taken out again."""

from __future__ import annotations

import json

import pytest

from tasks.config import LAB_CLUSTER_FILE, load_cluster
from tasks.swarm import ELECTION_KEY, wanted, with_election_tick


def test_added_to_a_missing_or_empty_file() -> None:
    assert with_election_tick("", 3) == {ELECTION_KEY: 3}
    assert with_election_tick("{}\n", 3) == {ELECTION_KEY: 3}


def test_the_users_settings_are_kept() -> None:
    text = json.dumps({"log-driver": "journald", ELECTION_KEY: 10})
    assert with_election_tick(text, 3) == {"log-driver": "journald", ELECTION_KEY: 3}
    assert with_election_tick(text, None) == {"log-driver": "journald"}


def test_nothing_to_change() -> None:
    assert with_election_tick(json.dumps({ELECTION_KEY: 3}), 3) is None
    assert with_election_tick('{"debug": true}', None) is None


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", '"3"'])
def test_a_broken_file_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        with_election_tick(text, 3)


def test_a_changed_tick_outdates_the_swarm_step() -> None:
    c = load_cluster(LAB_CLUSTER_FILE)
    other = c.model_copy(update={"swarm": c.swarm.model_copy(update={"election_tick": 10})})
    assert wanted(c) != wanted(other)
