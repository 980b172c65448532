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
