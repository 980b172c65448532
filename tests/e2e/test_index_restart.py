"""Every index replica killed with -9 and restarted under its old id, with and without its
--data directory, while a client keeps updating: inside a private network namespace."""

from __future__ import annotations

from pathlib import Path

import pytest
from netns import run_scenario
from netns_restart_scenario import RESTARTS

SCENARIO = Path(__file__).with_name("netns_restart_scenario.py")

# 35 s of kills and restarts: in the long suite (the group's logic is checked by the
# simulated runs of tests/unit/test_group_sim.py in the default one)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def outcome():
    return run_scenario(SCENARIO)


def test_every_restarted_replica_caught_up_and_the_group_went_on(outcome):
    assert [r[:3] for r in outcome["restarts"]] == [[rid, keep, True] for rid, keep in RESTARTS]
    assert outcome["agreed"], outcome["status"]  # the same sequence and digest on all three
    assert sorted(s["replica"] for s in outcome["status"]) == [1, 2, 3]
    assert {s["master"] for s in outcome["status"]} == {1}  # the lowest id leads again
    assert outcome["answers"]


def test_no_update_was_reported_failed_and_every_acknowledged_one_is_there(outcome):
    assert outcome["failed"] == []  # not even "no index replica answered" in a failover
    assert outcome["acked"] > 200 and outcome["missing"] == []


def test_no_replica_answered_from_a_half_filled_index(outcome):
    assert outcome["half_answers"] == []


def test_catching_up_does_not_flood_the_group(outcome):
    kinds, seq = outcome["kinds"], outcome["seq"]
    # each restart without --data replays the history once, in batches; nothing more
    assert kinds.get("Order", 0) < 6 * seq, kinds
    assert kinds.get("Ask", 0) < seq, kinds
