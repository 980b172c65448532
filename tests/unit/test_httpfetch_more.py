"""More of the HTTP Range client against hand-written mirrors (test_httpfetch's): kept
connections a mirror closed while idle, what a request line carries, interim responses,
encoded ranges and empty files."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from test_httpfetch import CLOSE, KEEP, SIZE, TIMEOUT, Mirror, Request, Respond, partial

from mirrorfuse.transfer.httpfetch import HttpFetcher
from mirrorfuse.transfer.wirefetch import FetchFailed


@pytest.fixture(scope="module")
def data() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture
def mirror(data: bytes) -> Iterator[Callable[..., Mirror]]:
    made: list[Mirror] = []

    def make(respond: Respond | None = None) -> Mirror:
        made.append(Mirror(data, respond))
        return made[-1]

    yield make
    for m in made:
        m.close()
    for m in made:
        assert not m.errors, m.errors


@pytest.fixture
def fetchers() -> Iterator[Callable[[str], HttpFetcher]]:
    made: list[HttpFetcher] = []

    def make(url: str) -> HttpFetcher:
        made.append(HttpFetcher(url, TIMEOUT))
        return made[-1]

    yield make
    for f in made:
        f.close()


def test_a_kept_connection_the_mirror_closed_while_idle_is_replaced_once(mirror, fetchers, data):
    # keep-alive promised (HTTP/1.1, no Connection: close), then closed, as nginx does
    # with connections idle for keepalive_timeout
    m = mirror(lambda req: (partial(data, req), CLOSE))
    f = fetchers(m.url)
    for start in (0, 1000, 2000):
        got = f.fetch(start, 1000, None)
        assert got is not None and bytes(got) == data[start : start + 1000]
    assert m.accepted == 3 and len(m.requests) == 3


@pytest.mark.parametrize(
    "second, conns",
    [(b"", 2), (b"HTTP/1.1 206", 1)],  # closed unanswered: one more try; answer begun: none
    ids=["unanswered", "cut-short"],
)
def test_a_kept_connection_is_replaced_only_once_and_only_unanswered(
    mirror, fetchers, data, second, conns
):
    served: list[Request] = []

    def respond(req: Request) -> tuple[bytes, str]:
        served.append(req)
        return (partial(data, req), KEEP) if len(served) == 1 else (second, CLOSE)

    m = mirror(respond)
    f = fetchers(m.url)
    assert f.fetch(0, 1000, None) is not None
    with pytest.raises(FetchFailed, match="closed the connection"):
        f.fetch(1000, 1000, None)
    assert m.accepted == conns


def test_a_path_with_spaces_and_letters_beyond_ascii_goes_percent_encoded(mirror, fetchers, data):
    m = mirror()
    f = fetchers(f"http://127.0.0.1:{m.port}/a b/ü%41.bin?x=1 2")
    assert f.fetch(0, 10, None) is not None
    assert m.requests[0].line == "GET /a%20b/%C3%BC%41.bin?x=1%202 HTTP/1.1"


def test_interim_responses_are_skipped_and_encoded_ranges_refused(mirror, fetchers, data):
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"
    m = mirror(lambda req: (early + partial(data, req), KEEP))
    assert bytes(fetchers(m.url).fetch(0, 10, None) or b"") == data[:10]
    gz = mirror(lambda req: (partial(data, req, extra="Content-Encoding: gzip\r\n"), KEEP))
    with pytest.raises(FetchFailed, match="Content-Encoding: gzip"):
        fetchers(gz.url).fetch(0, 10, None)


def test_an_empty_file_has_size_zero(mirror, fetchers):
    m = mirror(
        lambda req: (
            b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */0\r\n"
            b"Content-Length: 0\r\n\r\n",
            KEEP,
        )
    )
    assert fetchers(m.url).size() == 0
