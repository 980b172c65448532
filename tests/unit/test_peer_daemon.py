"""The peer daemon with a stand-in for the index group: its cached list follows its own
directory while the group is gone, and a stopped peer leaves the group."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec

from mirrorfuse.core.group import IndexState
from mirrorfuse.wire.datagrams import FileEntry, ReplicaStatus, UpdateResult
from mirrorfuse.wire.errors import MirrorfsError
from mirrorfuse.wire.messages import PeerIndex
from servers.peer import Peer, PeerOptions


class Group:
    """The index group as the peer sees it: answering, or gone."""

    def __init__(self, up: bool, stop: asyncio.Event | None = None) -> None:
        self.up = up
        self.stop = stop
        self.requests: list[tuple[str, dict[str, Any]]] = []

    def _check(self) -> None:
        if not self.up:
            raise MirrorfsError("no index replica answered (2 tries)")

    async def request(self, op: str, args: dict[str, Any]) -> UpdateResult:
        self._check()
        self.requests.append((op, args))
        if op == "heartbeat" and self.stop is not None:
            self.stop.set()  # SIGTERM arrives during the round
        return UpdateResult()

    async def query(self, q: str, **kw: Any) -> Any:
        self._check()
        return ReplicaStatus(seq=0)

    async def query_pages(self, q: str, **kw: Any) -> dict[str, Any]:
        self._check()
        return {}

    async def snapshot(self) -> IndexState:
        self._check()
        return IndexState()


async def nobody(addr: str, req: PeerIndex) -> Any:
    raise MirrorfsError("no such peer")


def listed(peer: Peer) -> dict[str, FileEntry]:
    """The files the peer answers others with (PEER_INDEX)."""
    _, payload = peer.exchange(PeerIndex(), b"", 0)
    return msgspec.msgpack.decode(payload, type=dict[str, FileEntry])


def test_without_the_group_the_cached_list_follows_the_shared_directory(tmp_path: Path):
    share = tmp_path / "share"
    share.mkdir()
    (share / "old.bin").write_bytes(b"old")
    peer = Peer(PeerOptions("pa", share, 0.5, []), Group(up=False), nobody)
    peer.cache.files = {  # the index as it was when the group went away
        "old.bin": FileEntry("pa", 3, 0, ["pa"]),
        "theirs.bin": FileEntry("pb", 5, 7, ["pb"]),
        "clash.bin": FileEntry("pb", 5, 7, ["pb"]),
    }

    async def rounds() -> None:
        await peer.round()
        (share / "new.bin").write_bytes(b"new file")
        (share / "clash.bin").write_bytes(b"other content")
        (share / "old.bin").unlink()
        await peer.round()

    asyncio.run(rounds())
    files = listed(peer)
    assert files["new.bin"].holders == ["pa"] and files["new.bin"].size == 8
    assert "old.bin" not in files and "new.bin" in peer.files and "old.bin" not in peer.files
    assert files["theirs.bin"].holders == ["pb"]
    assert files["clash.bin"].holders == ["pb"]  # other content: the group decides later
    assert "clash.bin" in peer.files  # served by name all the same
    for srv in peer.files.values():
        srv.close()


def test_a_stopped_peer_leaves_the_group(tmp_path: Path):
    (tmp_path / "a.bin").write_bytes(b"a")
    stop = asyncio.Event()
    group = Group(up=True, stop=stop)
    peer = Peer(PeerOptions("pa", tmp_path, 0.5, []), group, nobody)
    asyncio.run(asyncio.wait_for(peer.run(stop), 10))
    ops = [op for op, _ in group.requests]
    assert ops[0] == "register" and ops[-1] == "leave"
    assert group.requests[-1][1] == {"peer": "pa"}
    for srv in peer.files.values():
        srv.close()


def test_a_peer_that_never_reached_the_group_stops_at_once(tmp_path: Path):
    stop = asyncio.Event()
    stop.set()
    group = Group(up=False)
    peer = Peer(PeerOptions("pa", tmp_path, 0.5, []), group, nobody)
    asyncio.run(asyncio.wait_for(peer.run(stop), 10))
    assert group.requests == []
