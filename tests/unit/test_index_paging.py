"""Replies and snapshots larger than a datagram: pages of a listing, blobs by token over TCP."""

from __future__ import annotations

import asyncio
import fnmatch
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrorfuse.index.blobs import fetch_blob
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.datagrams import MAX_DATAGRAM, FileEntry, FilesPage, answer, pack
from mirrorfuse.wire.errors import ServerError
from servers.blobs import BLOB_PART, BlobServer, BlobStore
from servers.index import page

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
            lambda: BlobServer(store), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        try:
            got = await fetch_blob(Address("127.0.0.1", port), token)
            with pytest.raises(ServerError) as err:
                await fetch_blob(Address("127.0.0.1", port), "nope")
            return got, err.value.code
        finally:
            server.close()

    got, code = asyncio.run(go())
    assert got == blob
    assert code == "NOT_FOUND"


def test_blobs_expire():
    store = BlobStore()
    token = store.put(b"x", now=0.0)
    assert store.part(token, 0) == (b"x", 1)
    store.put(b"y", now=1000.0)  # putting another one sweeps the old
    assert store.part(token, 0) is None
