"""Replies and snapshots larger than a datagram: pages of a listing, blobs by token over TCP
(read only by a connection that proves the group's key, from a server that proves it too)."""

from __future__ import annotations

import asyncio
import fnmatch
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrorfuse.client.connection import ServerDown, request_once
from mirrorfuse.index.blobs import fetch_blob
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.auth import ServerHandshake, new_key
from mirrorfuse.wire.datagrams import MAX_DATAGRAM, FileEntry, FilesPage, answer, pack
from mirrorfuse.wire.errors import ServerError
from mirrorfuse.wire.messages import BlobRead
from servers.blobs import BLOB_PART, BlobServer, BlobStore
from servers.index import page
from servers.net import FrameServer

KEY = new_key()

names = st.dictionaries(
    st.text("abc-.*xyz0123456789é日\U0001f3b5", min_size=1, max_size=250),
    st.builds(
        FileEntry,
        st.text(max_size=40),
        st.integers(0, 2**40),
        st.one_of(st.integers(0, 2**64 - 1), st.text(max_size=3000)),
        st.lists(st.text(max_size=40), max_size=30),
    ),
    max_size=300,
)


@settings(max_examples=80, deadline=None)
@given(names, st.sampled_from([None, "a*", "*1?", "[xy]*"]))
def test_pages_cover_everything_once_in_order_and_fit_a_datagram(items, pattern):
    keys = sorted(items)
    got: list[str] = []
    after = ""
    while True:
        part, after = page(items, keys, after, pattern)
        reply = answer("client-with-a-long-name", 2**40, 9, FilesPage(files=part, next=after))
        assert len(pack(reply)) < MAX_DATAGRAM
        got += list(part)
        if after is None:
            break
    want = [k for k in keys if pattern is None or fnmatch.fnmatchcase(k, pattern)]
    assert got == want


@pytest.mark.parametrize("char", ["é", "日", "\U0001f3b5"])
def test_pages_of_long_non_ascii_names_fit_a_datagram(char):
    """Sizes are bytes, not characters: 250 characters of this name are up to 1000 bytes."""
    items = {f"{i:04}" + char * 246: FileEntry("p", i, i, ["p"]) for i in range(400)}
    keys, after, seen = sorted(items), "", 0
    while True:
        part, after = page(items, keys, after)
        reply = answer("client", 1, 1, FilesPage(files=part, next=after))
        assert len(pack(reply)) < MAX_DATAGRAM
        seen += len(part)
        if after is None:
            break
    assert seen == len(items)


def test_a_blob_is_read_back_whole_in_parts_and_an_unknown_token_is_refused():
    blob = os.urandom(2 * BLOB_PART + 12345)

    async def go() -> tuple[bytes, str]:
        store = BlobStore()
        token = store.put(blob)
        server = await asyncio.get_running_loop().create_server(
            lambda: BlobServer(store, KEY), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        try:
            got = await fetch_blob(Address("127.0.0.1", port), token, KEY)
            with pytest.raises(ServerError) as err:
                await fetch_blob(Address("127.0.0.1", port), "nope", KEY)
            return got, err.value.code
        finally:
            server.close()

    got, code = asyncio.run(go())
    assert got == blob
    assert code == "NOT_FOUND"


class Keyless(BlobServer):
    """Says in the handshake that it holds no key (as a block server before its format)."""

    def __init__(self, store: BlobStore) -> None:
        FrameServer.__init__(self, lambda: ServerHandshake(None, None))
        self.store = store


def test_a_blob_is_read_only_with_the_key_and_only_from_a_server_that_proves_it():
    store = BlobStore()
    token = store.put(b"the whole index")

    async def go() -> dict[str, str]:
        loop = asyncio.get_running_loop()
        servers = {
            "real": await loop.create_server(lambda: BlobServer(store, KEY), "127.0.0.1", 0),
            "plain": await loop.create_server(FrameServer, "127.0.0.1", 0),  # no handshake
            "keyless": await loop.create_server(lambda: Keyless(store), "127.0.0.1", 0),
            "other": await loop.create_server(lambda: BlobServer(store, new_key()), "127.0.0.1", 0),
        }
        at = {n: Address("127.0.0.1", s.sockets[0].getsockname()[1]) for n, s in servers.items()}
        out = {}
        try:
            for name, where, key in (
                ("wrong key", at["real"], new_key()),
                ("server without a handshake", at["plain"], KEY),
                ("server without a key", at["keyless"], KEY),
                ("server with another key", at["other"], KEY),
            ):
                with pytest.raises(ServerDown) as err:
                    await fetch_blob(where, token, key)
                out[name] = f"{type(err.value).__name__}: {err.value}"
            with pytest.raises(ServerDown) as err:  # no handshake at all: refused
                await request_once(at["real"], BlobRead(token=token, offset=0), 3.0)
            out["no handshake"] = f"{type(err.value).__name__}: {err.value}"
            assert await fetch_blob(at["real"], token, KEY) == b"the whole index"
        finally:
            for s in servers.values():
                s.close()
        return out

    refused = asyncio.run(go())
    for name in ("wrong key", "server without a key", "server with another key"):
        assert refused[name].startswith("KeyRefused"), refused
    assert "did not prove the group's key" in refused["server without a key"]
    assert "the whole index" not in str(refused)
    assert "refused the connection" in refused["no handshake"], refused


def test_blobs_expire():
    store = BlobStore()
    token = store.put(b"x", now=0.0)
    assert store.part(token, 0) == (b"x", 1)
    store.put(b"y", now=1000.0)  # putting another one sweeps the old
    assert store.part(token, 0) is None
