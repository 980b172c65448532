"""What a peer shares and serves: its control socket, who may use it, and files that are
swapped for symbolic links or other files after they were shared."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from test_peer_daemon import Group, nobody

from mirrorfuse.client.connection import ServerDown, request_once
from mirrorfuse.tools.peerctl import ask_control
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.auth import ServerHandshake, new_key
from mirrorfuse.wire.messages import FileRead, Outcome, PeerShare, PeerUnshare
from servers.net import Refused
from servers.peer import Peer, PeerOptions, PeerServer
from servers.sharing import (
    Caller,
    ControlServer,
    NotShareable,
    bind_control,
    loopback_caller,
    may_control,
    open_file,
)


def make_peer(tmp_path: Path) -> tuple[Peer, Group]:
    share = tmp_path / "share"
    share.mkdir()
    group = Group(up=True)
    return Peer(PeerOptions("pa", share, 0.5, []), group, nobody), group


def read(peer: Peer, name: str) -> bytes:
    srv = PeerServer(peer)
    _, data = srv.serve_file(FileRead(name=name, offset=0, length=5), b"", 0)
    return bytes(data)


def close_all(peer: Peer) -> None:
    for srv in peer.files.values():
        srv.close()


def test_open_file_takes_regular_files_only_never_through_a_link(tmp_path: Path):
    (tmp_path / "f").write_bytes(b"data")
    (tmp_path / "link").symlink_to(tmp_path / "f")
    os.mkfifo(tmp_path / "fifo")  # would block an open without O_NONBLOCK
    fd, st = open_file(tmp_path / "f")
    os.close(fd)
    assert st.st_size == 4
    with pytest.raises(NotShareable, match="symbolic link"):
        open_file(tmp_path / "link")
    for odd in ("fifo", "."):
        with pytest.raises(NotShareable, match="not a regular file"):
            open_file(tmp_path / odd)
    with pytest.raises(NotShareable, match="replaced"):
        open_file(tmp_path / "f", (st.st_dev, st.st_ino + 1))


def test_the_owner_and_root_may_control_nobody_else():
    assert may_control(Caller(os.geteuid())) and may_control(Caller(0))
    assert not may_control(Caller(os.geteuid() + 12345))


def test_control_socket_is_private_and_a_stale_one_is_replaced(tmp_path: Path):
    path = tmp_path / "peers" / "pa.sock"
    sock = bind_control(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    with pytest.raises(Exception, match="already listens"):
        bind_control(path)
    sock.close()  # a peer killed: its socket file stays, nobody listens
    bind_control(path).close()


def test_control_socket_answers_its_own_user(tmp_path: Path):
    asked: list[tuple[Any, Caller]] = []

    async def act(req: Any, caller: Caller) -> Outcome:
        asked.append((req, caller))
        return Outcome(ok=True)

    async def go() -> tuple[Outcome, Outcome]:
        path = tmp_path / "pa.sock"
        server = await asyncio.get_running_loop().create_unix_server(
            lambda: ControlServer(act), sock=bind_control(path)
        )
        try:
            first = await ask_control(path, PeerShare(path="/x", name="x"), 5)
            second = await ask_control(path, PeerUnshare(name="x"), 5)
            return first, second
        finally:
            server.close()

    assert asyncio.run(go()) == (Outcome(ok=True), Outcome(ok=True))
    assert [c for _, c in asked] == [Caller(os.geteuid(), os.getpid())] * 2


def test_loopback_caller_is_the_owner_of_the_connecting_socket():
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    conn, remote = server.accept()
    try:
        caller = loopback_caller(conn.getsockname(), remote)
        assert caller is not None and caller.uid == os.geteuid()
        assert loopback_caller(conn.getsockname(), ("127.0.0.1", 1)) is None  # no such socket
        assert loopback_caller(conn.getsockname(), ("192.0.2.1", remote[1])) is None
    finally:
        for s in (conn, client, server):
            s.close()


def test_a_shared_file_swapped_for_a_link_is_revoked_not_followed(tmp_path: Path):
    peer, group = make_peer(tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(b"SECRET")
    mine = tmp_path / "mine.txt"
    mine.write_bytes(b"mine!")

    async def go() -> None:
        assert (await peer.share_file(mine, "mine.txt", Caller(0))).ok
        await peer.round()
        assert read(peer, "mine.txt") == b"mine!"
        mine.unlink()
        mine.symlink_to(secret)  # after sharing: must never serve the secret
        assert read(peer, "mine.txt") == b"mine!"  # the file it opened, until the next round
        await peer.round()

    asyncio.run(go())
    with pytest.raises(Refused, match="does not share"):
        read(peer, "mine.txt")
    assert ("revoke", {"peer": "pa", "name": "mine.txt"}) in group.requests
    assert "mine.txt" not in peer.extra
    sizes = [a["size"] for op, a in group.requests if op == "advertise"]
    assert set(sizes) == {5}  # the secret (6 bytes) was never advertised
    close_all(peer)


def test_a_shared_file_replaced_by_another_is_revoked(tmp_path: Path):
    peer, group = make_peer(tmp_path)
    mine = tmp_path / "mine.txt"
    mine.write_bytes(b"one")

    async def go() -> None:
        assert (await peer.share_file(mine, "mine.txt", Caller(0))).ok
        other = tmp_path / "other"
        other.write_bytes(b"two!!")
        other.replace(mine)  # a new inode under the shared path
        await peer.round()

    asyncio.run(go())
    assert "mine.txt" not in peer.files
    assert [op for op, a in group.requests if a.get("name") == "mine.txt"] == [
        "advertise",
        "revoke",
    ]
    close_all(peer)


def test_share_refuses_links_and_what_is_not_a_regular_file(tmp_path: Path):
    peer, group = make_peer(tmp_path)
    (tmp_path / "link").symlink_to("/etc/passwd")

    async def go() -> list[Outcome]:
        return [
            await peer.share_file(tmp_path / "link", "passwd"),
            await peer.share_file(tmp_path, "dir"),
            await peer.share_file(Path("relative"), "rel"),
            await peer.share_file(tmp_path / "missing", "missing"),
        ]

    outcomes = asyncio.run(go())
    assert [o.ok for o in outcomes] == [False] * 4
    assert "symbolic link" in (outcomes[0].error or "")
    assert "not a regular file" in (outcomes[1].error or "")
    assert not peer.files and not peer.extra
    assert not [op for op, _ in group.requests if op == "advertise"]


def test_links_in_the_shared_directory_are_not_served(tmp_path: Path):
    peer, group = make_peer(tmp_path)
    (tmp_path / "secret").write_bytes(b"SECRET")
    (peer.share / "plain.txt").write_bytes(b"plain")
    (peer.share / "escape.txt").symlink_to(tmp_path / "secret")

    async def go() -> None:
        await peer.round()
        # swapped for a link between the scan and the open: the open refuses it
        (peer.share / "late.txt").write_bytes(b"late")
        size_mtime = peer.scan()["late.txt"]
        (peer.share / "late.txt").unlink()
        (peer.share / "late.txt").symlink_to(tmp_path / "secret")
        assert not (await peer.advertise("late.txt", *size_mtime)).ok

    asyncio.run(go())
    assert sorted(peer.files) == ["plain.txt"]
    advertised = [a["name"] for op, a in group.requests if op == "advertise"]
    assert advertised == ["plain.txt"]
    close_all(peer)


def test_over_tcp_share_needs_the_group_key_and_this_machine_s_owner(tmp_path: Path):
    peer, _ = make_peer(tmp_path)
    key = new_key()
    mine = tmp_path / "mine.txt"
    mine.write_bytes(b"mine!")
    share = PeerShare(path=str(mine), name="mine.txt")

    async def go() -> Outcome:
        server = await asyncio.get_running_loop().create_server(
            lambda: PeerServer(peer, lambda: ServerHandshake(key, None)), "127.0.0.1", 0
        )
        addr = Address("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            with pytest.raises(ServerDown):  # no key: not one frame is read
                await request_once(addr, share, 5)
            with pytest.raises(ServerDown):
                await request_once(addr, share, 5, keys=lambda _: new_key())
            return (await request_once(addr, share, 5, keys=lambda _: key)).body
        finally:
            server.close()

    assert asyncio.run(go()) == Outcome(ok=True)  # this process: root or the peer's user
    assert read(peer, "mine.txt") == b"mine!"
    close_all(peer)
