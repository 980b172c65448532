"""One index replica's datagram side without sockets: what it answers while it catches
up, orders it numbered itself before a restart, and what its --data saves hold."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import msgspec

from mirrorfuse.core.group import IndexState, Order, Request
from mirrorfuse.wire import datagrams as dg
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.auth import new_key
from mirrorfuse.wire.datagrams import FilesPage, Opener, ReplicaStatus, Sealer, pack, unpack
from servers.index import IndexReplica, Saver, order_to_wire

CLIENT = ("127.0.0.1", 5000)
KEY = new_key()


class Capture:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))

    def replies(self) -> list[dg.Answer]:
        out = [unpack(Opener(KEY).open(d, time.time())) for d, a in self.sent if a == CLIENT]
        self.sent.clear()
        return [m for m in out if isinstance(m, dg.Answer)]


async def no_blob(where: Address, token: str, key: bytes) -> bytes:
    raise AssertionError("no snapshot is read by TCP here")


def replica(rid: int = 1) -> tuple[IndexReplica, Capture]:
    rep = IndexReplica(rid, [Address("235.1.1.1", 1)], no_blob, Address("127.0.0.1", 1), KEY)
    cap = Capture()
    rep.connection_made(cap)  # type: ignore[arg-type]
    return rep, cap


def orders(n: int) -> list[Order]:
    s = IndexState()
    reqs = [Request("c", 1, "register", {"peer": "p", "addr": "h:1"})]
    reqs += [
        Request("c", i, "advertise", {"peer": "p", "name": f"f{i}", "size": 1, "checksum": 1})
        for i in range(2, n + 1)
    ]
    out = []
    for r in reqs:
        o = Order(s.seq + 1, 1, r, 0.0)  # numbered by replica 1, before its restart
        s.apply(o)
        out.append(o)
    return out


def test_a_catching_up_replica_answers_only_status_and_takes_its_own_old_orders():
    rep, cap = replica(1)
    now = time.time()
    rep.handle(dg.Hb(replica=2, seq=20, ready=True, master=2), ("127.0.0.1", 7))
    rep.handle(dg.Query(client="x", req=1, q="files"), CLIENT)
    rep.handle(dg.Query(client="x", req=2, q="held", peer="p"), CLIENT)
    assert cap.replies() == []  # files and held: silence (a caught-up replica answers)
    rep.handle(dg.Query(client="x", req=3, q="status"), CLIENT)
    (status,) = cap.replies()
    st = msgspec.msgpack.decode(status.reply, type=ReplicaStatus)
    assert not st.ready and st.seq == 0
    for o in orders(20):  # sent again by replica 2 in answer to its ask
        rep.handle(order_to_wire(o), ("127.0.0.1", 7))
    assert rep.replica.state.seq == 20
    rep.replica.grace_until = now  # its start-up grace is over
    rep.route(rep.replica.tick(time.time()))
    rep.handle(dg.Query(client="x", req=4, q="files"), CLIENT)
    (files,) = cap.replies()
    assert len(msgspec.msgpack.decode(files.reply, type=FilesPage).files) == 19


def test_a_save_records_the_sequence_it_wrote_not_the_one_after(tmp_path: Path):
    rep, _ = replica(1)
    path = tmp_path / "replica-1.snapshot"
    history = orders(3)
    rep.replica.state.apply(history[0])
    writing, go_on = threading.Event(), threading.Event()

    def slow_write(p: Path, blob: bytes) -> None:
        writing.set()
        go_on.wait(10)
        p.write_bytes(blob)

    async def run() -> None:
        saver = Saver(path, 0, slow_write)
        save = asyncio.ensure_future(saver.save(rep.replica))
        await asyncio.get_running_loop().run_in_executor(None, writing.wait, 10)
        rep.replica.state.apply(history[1])  # the state moves on during the write
        go_on.set()
        await save
        assert saver.saved == 1
        saver.write = lambda p, blob: p.write_bytes(blob)
        await saver.save(rep.replica)  # so the next round saves again
        assert saver.saved == 2

    asyncio.run(run())
    assert IndexState.from_snapshot(path.read_bytes()).seq == 2


def test_replies_waiting_for_clients_are_bounded(monkeypatch):
    import servers.index as index

    monkeypatch.setattr(index, "MAX_WAITING", 5)
    rep, _ = replica(1)
    sealer = Sealer(KEY, b"client-1")
    for i in range(20):
        req = dg.Req(client=f"c{i}", req=1, op="heartbeat", args={"peer": "p"})
        rep.datagram_received(sealer.seal(pack(req), time.time()), ("127.0.0.1", 9000 + i))
    assert len(rep.clients) == 5
