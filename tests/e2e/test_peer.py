"""Peers sharing directories through the index group, inside a private network namespace."""

from __future__ import annotations

from pathlib import Path

import pytest
from netns import run_scenario

SCENARIO = Path(__file__).with_name("netns_peer_scenario.py")


@pytest.fixture(scope="module")
def outcome():
    return run_scenario(SCENARIO)


def test_same_content_gives_two_holders_and_fetch_uses_both(outcome):
    assert sorted(outcome["holders"]) == ["pa", "pb"]
    assert outcome["fetch_rc"] == 0, outcome["fetch_out"]
    assert "from 2 peer(s)" in outcome["fetch_out"] and "(verified)" in outcome["fetch_out"]
    assert outcome["same"]


def test_a_peer_serves_only_what_it_shares(outcome):
    assert outcome["escape"] == "NOT_FOUND"


def test_a_removed_file_is_revoked(outcome):
    assert outcome["revoked"]


def test_a_peer_restarted_under_its_id_registers_again(outcome):
    assert outcome["pa_back"]  # its new address, and a file it shares since
    assert outcome["pa_holds"] == ["pa", "pb"]


def test_a_stopped_peer_leaves_with_its_files(outcome):
    assert outcome["pc_listed"]
    assert outcome["pc_exit"] == [0, "mirrorfs-peer pc: left the index group"]
    assert outcome["pc_gone"]  # long before its 3 silent intervals of 60 s
