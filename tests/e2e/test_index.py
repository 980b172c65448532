"""The index group over real multicast, inside a private network namespace made by the test."""

from __future__ import annotations

from pathlib import Path

import pytest
from netns import run_scenario

SCENARIO = Path(__file__).with_name("netns_index_scenario.py")


@pytest.fixture(scope="module")
def outcome():
    return run_scenario(SCENARIO)


def test_killing_the_master_loses_no_acknowledged_update(outcome):
    assert len(outcome["acked"]) == 60  # every request got a reply, through the failover
    assert set(outcome["acked"]) <= set(outcome["files"])


def test_all_replicas_including_a_late_joiner_agree(outcome):
    status = outcome["status"]
    assert sorted(s["replica"] for s in status) == [2, 3, 4] == outcome["alive"]
    assert len({(s["seq"], s["digest"]) for s in status}) == 1
    assert {s["master"] for s in status} == {2}  # the lowest live id took over
    states = outcome["states"]
    assert len(states) == 3 and all(st == states[0] for st in states)


def test_the_client_showed_first_replies_and_ignored_the_duplicates(outcome):
    assert outcome["ignored"] > 0


def test_concurrent_duplicate_names_have_exactly_one_winner(outcome):
    assert outcome["same_owner"] in ("a", "b")
    assert "same" in outcome["files"]


def test_malformed_datagrams_are_counted_and_dropped(outcome):
    assert all(s["dropped"] >= 1 for s in outcome["status"])


def test_the_cli_and_the_interactive_client(outcome):
    lines = outcome["cli_search"].splitlines()
    assert sorted(line.split()[0] for line in lines) == ["f1"] + [f"f1{i}" for i in range(10)]
    shell = outcome["cli_shell"]
    assert shell.count("replica ") == 3 and "master 2" in shell
    assert "unknown command 'nonsense'" in shell  # and the shell went on:
    assert "p at 127.0.0.1:1" in shell and "a at 127.0.0.1:2" in shell
