"""The index client against a scripted replica on loopback: first reply wins, duplicates
and late replies to an earlier request are ignored, silence is an error (seed 002)."""

from __future__ import annotations

import socket
import threading

import msgpack
import pytest

from mirrorfuse.core.group import SILENCE
from mirrorfuse.index.client import PATIENCE, BlockingIndexClient, backoff, tries_for
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.errors import MirrorfsError
from mirrorfuse.wire.frames import VERSION


def reply(sock: socket.socket, to, m: dict, text: str, replica: int) -> None:
    body = {"t": "reply", "v": VERSION, "client": m["client"], "req": m["req"], "replica": replica}
    sock.sendto(msgpack.packb({**body, "reply": {"ok": text == "two", "error": text}}), to)


def scripted_replica(sock: socket.socket) -> None:
    """Answers request 1 twice (a duplicate), holds a second answer to request 1
    back until request 2 arrives (a late reply), then answers request 2."""
    data, who = sock.recvfrom(65536)
    first = msgpack.unpackb(data)
    reply(sock, who, first, "one", 1)
    reply(sock, who, first, "one again", 2)
    data, who = sock.recvfrom(65536)
    second = msgpack.unpackb(data)
    reply(sock, who, first, "late one", 3)  # arrives while the client waits for request 2
    sock.sendto(b"\xc1 not msgpack", who)
    reply(sock, who, second, "two", 1)


def test_first_reply_shown_duplicates_and_late_replies_ignored():
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    t = threading.Thread(target=scripted_replica, args=(srv,), daemon=True)
    t.start()
    c = BlockingIndexClient("235.1.1.1", 1, replicas=[Address(*srv.getsockname())])
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
    c = BlockingIndexClient("235.1.1.1", 1, replicas=[Address(*silent.getsockname())])
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
            m = msgpack.unpackb(data)  # version 1 replies carried no "v"
            body = {"t": "reply", "client": m["client"], "req": m["req"], "reply": {"ok": True}}
            old.sendto(msgpack.packb(body), who)

    t = threading.Thread(target=answer_as_version_1, daemon=True)
    t.start()
    c = BlockingIndexClient("235.1.1.1", 1, replicas=[Address(*old.getsockname())])
    try:
        with pytest.raises(MirrorfsError) as err:
            c.request("advertise", {}, timeout=0.2, tries=2)
        assert "no index replica answered" in str(err.value)
        assert f"protocol version 1 (this side speaks {VERSION})" in str(err.value)
    finally:
        t.join(5)
        c.close()
        old.close()


def test_each_client_object_is_an_incarnation_of_its_own():
    a = BlockingIndexClient("235.1.1.1", 1, client_id="peer-x")
    b = BlockingIndexClient("235.1.1.1", 1, client_id="peer-x")  # the peer, restarted
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
            data, who = srv.recvfrom(65536)
            m = msgpack.unpackb(data)
            seen.append(m["req"])
            if len(seen) == 8:  # the eighth copy: a new master has ordered it
                reply(srv, who, m, "two", 2)
                return

    t = threading.Thread(target=failover, daemon=True)
    t.start()
    c = BlockingIndexClient("235.1.1.1", 1, replicas=[Address(*srv.getsockname())])
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
