"""The index group with a large state, peers that die, single-file shares, and peers
carrying on without any replica (seed 001 step 2), inside a private network namespace."""

from __future__ import annotations

from pathlib import Path

import pytest
from netns import run_scenario
from netns_offline_scenario import BULK

SCENARIO = Path(__file__).with_name("netns_offline_scenario.py")
# one scenario of a minute (a thousand updates through the group, peers timing out):
# with the long tests, so the default run stays under ten minutes
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def outcome():
    return run_scenario(SCENARIO)


def test_a_late_replica_catches_up_on_a_large_index_by_tcp(outcome):
    assert outcome["caught_up"]  # equal sequence and digest on all three
    assert outcome["status_files"] == [BULK + 42] * 3  # bulk + 40 late + 2 from peers
    assert outcome["tcp_snapshots"]["3"] >= 1  # the snapshot did not fit in a datagram
    assert outcome["paged"] == BULK  # a search larger than a datagram, page by page


def test_a_killed_peer_is_removed_with_its_files_everywhere(outcome):
    assert outcome["pc_removed"] and outcome["agree_after_removal"]


def test_share_and_unshare_single_files(outcome):
    assert outcome["share"][0] == 0, outcome["share"]
    assert outcome["shared_holders"]["renamed.bin"]["holders"] == ["pa"]
    assert outcome["renamed_same"]
    rc, text = outcome["share_taken"]
    assert rc == 1 and "is taken by peer pc" in text and "Traceback" not in text
    assert outcome["unshare"][0] == 0 and outcome["unshared"]
    rc, text = outcome["unshare_dir_file"]
    assert rc == 1 and "move it out to stop sharing it" in text


def test_without_replicas_peers_search_and_fetch_from_their_cache(outcome):
    rc, text = outcome["offline_search"]
    assert rc == 0 and "from the cached index of peer pb" in text
    line = next(x for x in text.splitlines() if x.startswith("shared.bin  2097152 bytes"))
    assert sorted(line.split("held by ")[1].split(", ")) == ["pa", "pb"]
    assert outcome["offline_fetch"][0] == 0, outcome["offline_fetch"]
    assert outcome["offline_same"]


def test_without_replicas_a_peer_lists_what_its_directory_holds_now(outcome):
    assert outcome["pa_lists_new"] and outcome["pa_new_fetched"]
    assert outcome["pa_drops_removed"]


def test_without_replicas_peers_exchange_lists(outcome):
    assert outcome["pd_known_to_pb"]  # pd knew only pa; pb learnt of pd and its file
    assert "pd at 127.0.0.1:" in outcome["pb_peers"]
    assert outcome["pd_fetch_same"]


def test_peers_register_again_with_a_replica_restarted_from_its_data(outcome):
    assert "state from" in outcome["restart_line"]
    assert outcome["reregistered"]
    assert outcome["bulk_after_restart"] == BULK
    assert outcome["shared_holders_after"] == ["pa", "pb"]
