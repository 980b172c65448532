"""The index client against a scripted replica on loopback: first reply wins, duplicates
and late replies to an earlier request are ignored, silence is an error (seed 002); every
datagram is sealed with the group's key, and one without it is never read."""

from __future__ import annotations

import secrets
import socket
import threading
import time

import msgpack
import pytest

from mirrorfuse.core.group import SILENCE
from mirrorfuse.index.client import (
    PATIENCE,
    BlockingIndexClient,
    backoff,
    local_address,
    tries_for,
)
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.auth import new_key
from mirrorfuse.wire.datagrams import Opener, Sealer
from mirrorfuse.wire.errors import MirrorfsError
from mirrorfuse.wire.frames import VERSION

KEY = new_key()
SEALER = Sealer(KEY, secrets.token_bytes(8))  # the scripted replica's


def receive(sock: socket.socket) -> tuple[dict, tuple[str, int]]:
    data, who = sock.recvfrom(65536)
    return msgpack.unpackb(Opener(KEY).open(data, time.time())), who


def reply(sock: socket.socket, to, m: dict, text: str, replica: int) -> None:
    body = {"t": "reply", "v": VERSION, "client": m["client"], "req": m["req"], "replica": replica}
    data = msgpack.packb({**body, "reply": {"ok": text == "two", "error": text}})
    sock.sendto(SEALER.seal(data, time.time()), to)


def client(sock: socket.socket, key: bytes = KEY, **kw) -> BlockingIndexClient:
    return BlockingIndexClient("235.1.1.1", 1, [Address(*sock.getsockname())], key=key, **kw)


def scripted_replica(sock: socket.socket) -> None:
    """Answers request 1 twice (a duplicate), holds a second answer to request 1
    back until request 2 arrives (a late reply), then answers request 2."""
    first, who = receive(sock)
    reply(sock, who, first, "one", 1)
    reply(sock, who, first, "one again", 2)
    second, who = receive(sock)
    reply(sock, who, first, "late one", 3)  # arrives while the client waits for request 2
    sock.sendto(SEALER.seal(b"\xc1 not msgpack", time.time()), who)
    reply(sock, who, second, "two", 1)


def test_first_reply_shown_duplicates_and_late_replies_ignored():
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    t = threading.Thread(target=scripted_replica, args=(srv,), daemon=True)
    t.start()
    c = client(srv)
    try:
        assert c.request("advertise", {}).error == "one"
        assert c.request("advertise", {}).error == "two"
        assert c.ignored == 2  # the duplicate of 1 and the late reply to 1
    finally:
        t.join(5)
        c.close()
        srv.close()


def test_no_replica_answering_is_a_clear_error():
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    c = client(silent)
    try:
        with pytest.raises(MirrorfsError, match="no index replica answered"):
            c.request("advertise", {}, timeout=0.2, tries=2)
    finally:
        c.close()
        silent.close()


def test_a_replica_of_another_version_is_named_when_none_answers():
    old = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    old.bind(("127.0.0.1", 0))

    def answer_as_version_1() -> None:
        for _ in range(2):
            data, who = old.recvfrom(65536)
            # version 1 knew no seals: it read what it could, and answered unsealed
            body = {"t": "reply", "client": "x", "req": 1, "reply": {"ok": True}}
            old.sendto(msgpack.packb(body), who)

    t = threading.Thread(target=answer_as_version_1, daemon=True)
    t.start()
    c = client(old)
    try:
        with pytest.raises(MirrorfsError) as err:
            c.request("advertise", {}, timeout=0.2, tries=2)
        assert "no index replica answered" in str(err.value)
        assert "2 datagram(s) without the group's valid seal" in str(err.value)
        assert "another version, or with another key" in str(err.value)
    finally:
        t.join(5)
        c.close()
        old.close()


def test_replies_sealed_with_another_key_or_sent_again_are_never_taken():
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    forger = Sealer(new_key(), secrets.token_bytes(8))

    def answer() -> None:
        m, who = receive(srv)
        body = {"t": "reply", "v": VERSION, "client": m["client"], "req": m["req"]}
        forged = msgpack.packb({**body, "reply": {"ok": False, "error": "forged"}})
        srv.sendto(forger.seal(forged, time.time()), who)  # another key
        stale = SEALER.seal(forged, time.time() - 3600)  # the right key, an hour old
        srv.sendto(stale, who)
        m, who = receive(srv)  # the client tried again
        reply(srv, who, m, "two", 1)
        srv.sendto(stale, who)

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    c = client(srv)
    c.aio.timeout = 0.3
    try:
        assert c.request("advertise", {}).error == "two"
        assert c.aio.unsealed >= 2 and c.ignored == 0
    finally:
        t.join(5)
        c.close()
        srv.close()


def test_the_client_sends_from_loopback_when_the_group_is_on_this_machine():
    assert local_address([Address("235.1.1.1", 5000)], multicast=True) == "127.0.0.1"
    assert local_address([Address("127.0.0.1", 5000)], multicast=False) == "127.0.0.1"
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    c = client(srv)
    try:
        c.send(b"x")
        _, who = srv.recvfrom(100)
        assert who[0] == "127.0.0.1"
        assert c.aio._transport.get_extra_info("sockname")[0] == "127.0.0.1"
    finally:
        c.close()
        srv.close()


def test_each_client_object_is_an_incarnation_of_its_own():
    a = BlockingIndexClient("235.1.1.1", 1, client_id="peer-x", key=KEY)
    b = BlockingIndexClient("235.1.1.1", 1, client_id="peer-x", key=KEY)  # the peer, restarted
    try:
        assert a.client.startswith("peer-x-") and b.client.startswith("peer-x-")
        assert a.client != b.client
    finally:
        a.close()
        b.close()


def test_an_update_is_tried_long_enough_to_outlast_a_failover():
    """The group is silent for a while (its master died, another takes over), then the
    retry, carrying the same request id, gets the reply."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    seen: list[int] = []

    def failover() -> None:
        while True:
            m, who = receive(srv)
            seen.append(m["req"])
            if len(seen) == 8:  # the eighth copy: a new master has ordered it
                reply(srv, who, m, "two", 2)
                return

    t = threading.Thread(target=failover, daemon=True)
    t.start()
    c = client(srv)
    c.aio.timeout = 0.1  # short waits between tries keep the test short
    try:
        assert c.request("advertise", {}).ok
        assert len(set(seen)) == 1  # one request id throughout
    finally:
        t.join(5)
        c.close()
        srv.close()


def test_the_patience_of_an_update_covers_a_change_of_master():
    # a master's silence, a heartbeat for the successor to be named, one to catch up
    assert PATIENCE >= SILENCE + 2 * 1.0 + 2.0
    for limit in (0.1, 1.0, 2.0):
        assert sum(backoff(i, limit) for i in range(tries_for(PATIENCE, limit))) >= PATIENCE
