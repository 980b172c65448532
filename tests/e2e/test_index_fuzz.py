"""Datagrams thrown at a live index replica (unicast, on loopback): sealed with the group's
key, with another key, stale, or not sealed at all, well-formed or garbage. The replica
never dies, counts what it dropped, and goes on answering and ordering."""

from __future__ import annotations

import os
import secrets
import socket
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netns import start, stop, wait
from test_index_unicast import free_udp_ports

from mirrorfuse.index.client import BlockingIndexClient
from mirrorfuse.index.keys import create_group_key
from mirrorfuse.wire import datagrams as dg
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.auth import new_key
from mirrorfuse.wire.datagrams import MAX_SKEW, Sealer, pack

BIN = Path(sys.executable).parent

messages = st.one_of(
    st.builds(
        dg.Req,
        client=st.text(max_size=20),
        req=st.integers(0, 2**64 - 1),
        op=st.sampled_from(["register", "advertise", "revoke", "leave", "expire", "x"]),
        args=st.dictionaries(
            st.sampled_from(["peer", "addr", "name", "size", "checksum", "interval"]),
            st.one_of(st.text(max_size=10), st.integers(-3, 2**40), st.floats(), st.none()),
            max_size=6,
        ),
    ),
    st.builds(
        dg.Order,
        seq=st.integers(0, 2**64 - 1),
        master=st.integers(-1, 3),
        time=st.floats(),
        client=st.text(max_size=10),
        req=st.integers(0, 9),
        op=st.just("register"),
        args=st.just({"peer": "z", "addr": "h:1"}),
    ),
    st.builds(
        dg.Hb,
        replica=st.integers(-1, 3),
        seq=st.integers(0, 2**64 - 1),
        ready=st.booleans(),
        master=st.one_of(st.none(), st.integers(-1, 3)),
    ),
    st.builds(dg.Ask, replica=st.integers(-1, 3), first=st.integers(0, 2**64 - 1)),
    st.builds(
        dg.Snap,
        to=st.just(1),
        seq=st.integers(0, 2**64 - 1),
        blob=st.one_of(st.none(), st.binary(max_size=50)),
        host=st.just("127.0.0.1"),
        port=st.integers(1, 65535),
        token=st.text(min_size=1, max_size=8),
    ),
    st.builds(dg.Query, client=st.text(max_size=10), req=st.integers(0, 9), q=st.text(max_size=8)),
)
payloads = st.one_of(messages.map(pack), st.binary(max_size=120))
HOW = ["none", "other", "stale", "key"]


@pytest.fixture
def replica(tmp_path):
    port = free_udp_ports(1)[0]
    key_file = tmp_path / "index.key"
    _, key, _ = create_group_key(key_file)
    cmd = [str(BIN / "mirrorfs-index"), "127.0.0.1", str(port), "--id", "1"]
    cmd += ["--replicas", f"127.0.0.1:{port}", "--key-file", str(key_file)]
    p = start(cmd, "mirrorfs-index replica")[0]
    yield p, port, key
    stop(p)


def test_a_live_replica_survives_fuzzed_datagrams_and_counts_the_dropped(replica):
    proc, port, key = replica
    c = BlockingIndexClient("127.0.0.1", port, [Address("127.0.0.1", port)], key=key)
    assert wait(lambda: c.query("status").ready, 15)
    assert c.request("register", {"peer": "p", "addr": "127.0.0.1:1", "interval": 600}).ok
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    friend, forger = Sealer(key, secrets.token_bytes(8)), Sealer(new_key(), os.urandom(8))
    sent = {how: 0 for how in HOW}

    @settings(
        max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(st.lists(st.tuples(payloads, st.sampled_from(HOW)), min_size=1, max_size=5))
    def throw(batch):
        for data, how in batch:
            if how == "other":
                data = forger.seal(data, time.time())
            elif how == "stale":
                data = friend.seal(data, time.time() - 3 * MAX_SKEW)
            elif how == "key":
                data = friend.seal(data, time.time())
            sock.sendto(data, ("127.0.0.1", port))
            sent[how] += 1
        time.sleep(0.002)  # loopback drops nothing at this pace
        assert proc.poll() is None

    try:
        throw()
        sock.close()
        # it still orders (the fuzz, sealed with the key, may have made the peer leave)
        assert c.request("register", {"peer": "p", "addr": "127.0.0.1:1", "interval": 600}).ok
        adv = {"peer": "p", "name": "after", "size": 1, "checksum": 1}
        assert c.request("advertise", adv).ok
        status = c.query("status")
        assert status.unsealed == sent["none"] + sent["other"], (status, sent)
        assert status.replayed == sent["stale"], (status, sent)
        assert status.ready and "after" in c.query_pages("files")
    finally:
        c.close()
    stop(proc)
    err = proc.stderr.read()
    assert "Traceback" not in err and " failed: " not in err, err
