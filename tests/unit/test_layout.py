"""RAID-10 placement and cluster naming: pure functions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirrorfuse.core.layout import Layout
from mirrorfuse.wire.addresses import from_base_port, parse_servers
from mirrorfuse.wire.errors import UsageError

counts = st.sampled_from([4, 6, 8, 10, 12, 14, 16])


@given(counts, st.integers(0, 10**9))
def test_block_lives_on_its_pair_at_its_slot_on_both_mirrors(n, block):
    lay = Layout(n)
    pair, slot, (a, b) = lay.place(block)
    assert pair == block % (n // 2) and slot == block // (n // 2)
    assert (a, b) == (2 * pair, 2 * pair + 1) and lay.mirror_of(a) == b and lay.mirror_of(b) == a
    assert lay.block_of(pair, slot) == block


@given(counts, st.integers(0, 10**6))
def test_a_run_of_blocks_is_striped_over_every_pair(n, start):
    lay = Layout(n)
    run = range(start, start + lay.pairs)
    assert sorted(lay.pair_of(b) for b in run) == list(range(lay.pairs))


@given(counts)
def test_no_two_blocks_share_a_slot(n):
    lay = Layout(n)
    places = {(lay.pair_of(b), lay.slot_of(b)) for b in range(1000)}
    assert len(places) == 1000


@pytest.mark.parametrize(
    "n, msg",
    [
        (3, "odd"),
        (5, "odd"),
        (2, "between 4 and 16"),
        (18, "between 4 and 16"),
        (0, "between 4 and 16"),
    ],
)
def test_bad_server_counts_are_refused(n, msg):
    with pytest.raises(UsageError, match=msg):
        from_base_port(7000, n)


def test_base_port_names_consecutive_ports():
    spec = from_base_port(1111, 4)
    assert [a.port for a in spec.addresses] == [1111, 1112, 1113, 1114]


@pytest.mark.parametrize(
    "text, msg",
    [
        ("a:7001,b:7002,c:7003", "odd"),
        ("h:70000,h:2,h:3,h:4", "outside 1024-65535"),
        ("h:x,h:2,h:3,h:4", "not a number"),
        ("nohost,h:7001,h:7002,h:7003", "not host:port"),
        ("h:7000,h:7000,h:7001,h:7002", "listed twice"),
    ],
)
def test_bad_server_lists_are_refused(text, msg):
    with pytest.raises(UsageError, match=msg):
        parse_servers(text)


def test_base_port_range_must_fit():
    with pytest.raises(UsageError, match="outside"):
        from_base_port(65534, 4)
    with pytest.raises(UsageError, match="outside"):
        from_base_port(80, 4)
