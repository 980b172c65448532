"""The index group attacked by user nobody, who does not hold the group's key: forged
orders, heartbeats and snapshots, and the group's own datagrams sent again, change nothing
and are counted; a malformed snapshot from a key holder is refused and never saved; a
damaged --data file gives one clear line and the replica rejoins. In a private network
namespace, with real multicast."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from netns import run_scenario

SCENARIO = Path(__file__).with_name("netns_attack_scenario.py")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root (replicas attacked as nobody) and setpriv",
)


@pytest.fixture(scope="module")
def outcome():
    return run_scenario(SCENARIO)


def same_state(a: dict, b: dict) -> bool:
    return {r: (s["seq"], s["digest"]) for r, s in a.items()} == {
        r: (s["seq"], s["digest"]) for r, s in b.items()
    }


def delta(after: dict, before: dict, field: str) -> dict[str, int]:
    return {r: after[r][field] - before[r][field] for r in after}


def test_the_first_replica_made_the_key_mode_0600_and_said_how_to_share_it(outcome):
    assert outcome["key_mode"] == "0o600"
    made = {
        r: err.count("made a new key for the index group") for r, err in outcome["stderr"].items()
    }
    assert made == {"1": 1, "2": 0, "3": 0}
    assert "copy this file to the same place" in outcome["stderr"]["1"]


def test_the_replicas_listen_on_the_group_address_only(outcome):
    assert outcome["udp_binds"] == ["235.1.1.6"] * 3


def test_forged_orders_heartbeats_and_snapshots_change_nothing_and_are_counted(outcome):
    before, after = outcome["before"], outcome["after_forge"]
    assert len(before) == 3 and same_state(before, after)
    sent = outcome["forge"]["sent"]  # sent to the group, and to 127.0.0.1 (never arrives)
    assert delta(after, before, "unsealed") == {r: sent for r in after}
    assert delta(after, before, "dropped") == {r: sent for r in after}
    assert delta(after, before, "bad_snapshots") == {r: 0 for r in after}  # never decoded
    assert {s["master"] for s in after.values()} == {1}  # no forged heartbeat took it over
    assert "evil" not in outcome["peers_after_forge"]
    assert "passwords.txt" not in outcome["files_after_forge"]
    assert len(outcome["files_after_forge"]) == 420


def test_every_datagram_of_the_group_sent_again_changes_nothing_and_is_counted(outcome):
    before, after, replay = outcome["before_replay"], outcome["after_replay"], outcome["replay"]
    assert replay["kinds"].get("Req", 0) >= 3 and replay["kinds"].get("Order", 0) >= 3
    assert replay["kinds"].get("Hb", 0) >= 3
    assert same_state(before, after)
    assert "gone" not in outcome["files_after_replay"]  # the replayed advertise did not return
    assert delta(after, before, "replayed") == {r: replay["replayed"] for r in after}
    assert delta(after, before, "unsealed") == {r: 0 for r in after}


def test_a_snapshot_offered_by_token_is_read_only_with_the_key(outcome):
    by_tcp, host, port = outcome["offer"]
    assert by_tcp and host == "127.0.0.1" and port > 0
    attack = outcome["blob_attack"]
    assert attack["read"] is None and attack["error"].startswith("KeyRefused"), attack
    assert "refused the connection" in attack["plain_error"], attack
    assert outcome["blob_with_key"] == outcome["after_replay"]["1"]["seq"]


def test_a_malformed_snapshot_with_the_key_is_refused_and_never_saved(outcome):
    before, after = outcome["after_replay"], outcome["after_bad_snap"]
    assert same_state(before, after) and all(s["ready"] for s in after.values())
    assert delta(after, before, "bad_snapshots") == {"1": 0, "2": 0, "3": 2}
    assert outcome["saved_3"] == after["3"]["seq"]  # its --data holds the group's state
    assert "refused a snapshot" in outcome["stderr"]["3"]


def test_a_replica_restarted_after_the_attacks_comes_up_from_its_data(outcome):
    assert "state from" in outcome["restart_3"]
    assert "unusable" not in outcome["stderr_3"] and "Traceback" not in outcome["stderr_3"]
    assert outcome["agreed_after_restart"]


def test_a_damaged_data_file_gives_one_clear_line_and_the_replica_rejoins(outcome):
    assert "state from" not in outcome["restart_2"]  # it started empty
    lines = [line for line in outcome["stderr"]["2"].splitlines() if "unusable" in line]
    assert len(lines) == 1
    assert "replica 2: the saved state" in lines[0] and "replica-2.snapshot" in lines[0]
    assert "starting empty, catching up from the group" in lines[0]
    assert "Traceback" not in outcome["stderr"]["2"]
    assert outcome["bad_kept"] and outcome["agreed_after_damage"]
    final = outcome["final"]
    assert final["2"]["tcp_snapshots"] >= 1  # it caught up by a snapshot read with the key
    assert sorted(final) == ["1", "2", "3"] and len({s["digest"] for s in final.values()}) == 1


def test_status_shows_what_was_dropped_and_another_key_gets_no_answer(outcome):
    lines = [line for line in outcome["cli_status"].splitlines() if line.startswith("replica ")]
    assert len(lines) == 3, outcome["cli_status"]
    assert all("without the group's key" in line and "replayed" in line for line in lines)
    one = next(line for line in lines if line.startswith("replica 1:"))
    unsealed = outcome["final"]["1"]["unsealed"]
    assert f"dropped datagrams {outcome['final']['1']['dropped']} ({unsealed} without" in one
    code, text = outcome["cli_wrong_key"]
    assert "no replica answered" in text
