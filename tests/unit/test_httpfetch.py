"""The HTTP/1.1 Range client (transfer/httpfetch.HttpFetcher) against hand-written HTTP
servers on 127.0.0.1.

What it must do: the range's bytes, spliced into the output at their offset or in its
buffer; one keep-alive connection for many ranges, a new one after HTTP/1.0 or
``Connection: close``; redirects followed (up to a limit); and every answer that is
not exactly the range asked for (no range support, chunks, another range, a head too
large, a body cut short) is FetchFailed. abort() ends a fetch from a stalled mirror.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakes import holds_only
from http_mirror import CLOSE, KEEP, STALL, Mirror, Request, Respond, partial

from mirrorfuse.transfer.httpfetch import MAX_HEADER, MAX_REDIRECTS, HttpFetcher
from mirrorfuse.transfer.output import OutputError
from mirrorfuse.transfer.wirefetch import FetchFailed

SIZE = 1 << 20
FILL = 0x5A
TIMEOUT = 30.0  # the fetchers'
HANG = 5.0  # far more than anything here takes, far less than TIMEOUT


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


@pytest.fixture
def out(tmp_path: Path) -> Iterator[int]:
    """A SIZE-byte output file filled with FILL, open for writing."""
    path = tmp_path / "out"
    path.write_bytes(bytes([FILL]) * SIZE)
    fd = os.open(path, os.O_RDWR)
    yield fd
    os.close(fd)


def contents(fd: int) -> bytes:
    return os.pread(fd, SIZE + 1, 0)


def untouched(fd: int) -> bool:
    return contents(fd) == bytes([FILL]) * SIZE


def sha(b: bytes | memoryview) -> str:
    return hashlib.sha256(b).hexdigest()


def only(fd: int, data: bytes, start: int, length: int) -> None:
    holds_only(contents(fd), data, start, length, FILL)


# -- what it gets right -------------------------------------------------------------------


def test_a_range_spliced_at_its_offset_and_one_in_the_buffer(mirror, fetchers, out, data):
    m = mirror()
    f = fetchers(m.url)
    assert f.fetch(77_777, 400_000, out) is None
    only(out, data, 77_777, 400_000)
    got = f.fetch(3, 123_456, None)
    assert got is not None and sha(got) == sha(data[3 : 3 + 123_456])
    only(out, data, 77_777, 400_000)  # the buffered one wrote nothing
    req = m.requests[0]
    assert req.line == "GET /files/the%20file.bin HTTP/1.1"
    assert req.headers["host"] == f"127.0.0.1:{m.port}"
    assert req.headers["range"] == "bytes=77777-477776"


def test_ranges_one_after_another_share_one_kept_alive_connection(mirror, fetchers, out, data):
    m = mirror()
    f = fetchers(m.url)
    assert f.size() == SIZE
    each = SIZE // 8
    for i in range(8):
        got = f.fetch(i * each, each, out if i % 2 else None)
        if got is not None:
            os.pwrite(out, got, i * each)
    assert contents(out) == data
    assert m.accepted == 1 and len(m.requests) == 9


CLOSING = {
    "HTTP/1.0": ("HTTP/1.0", ""),
    "Connection: close": ("HTTP/1.1", "Connection: close\r\n"),
}


@pytest.mark.parametrize("how", list(CLOSING))
def test_after_a_response_that_closes_the_next_fetch_connects_again(
    mirror, fetchers, out, data, how
):
    version, extra = CLOSING[how]
    m = mirror(lambda req: (partial(data, req, version, extra), CLOSE))  # and it does close
    f = fetchers(m.url)
    for start in (0, 300_000, 600_000):
        got = f.fetch(start, 100_000, out if start else None)
        if got is not None:
            assert bytes(got) == data[start : start + 100_000]
        else:
            assert contents(out)[start : start + 100_000] == data[start : start + 100_000]
    assert m.accepted == 3 and [r.number for r in m.requests] == [1, 1, 1]


def test_an_http_1_0_mirror_that_says_keep_alive_is_kept(mirror, fetchers, data):
    m = mirror(lambda req: (partial(data, req, "HTTP/1.0", "Connection: keep-alive\r\n"), KEEP))
    f = fetchers(m.url)
    for start in (0, 1000, 2000):
        got = f.fetch(start, 1000, None)
        assert got is not None and bytes(got) == data[start : start + 1000]
    assert m.accepted == 1


def test_a_redirect_to_another_port_is_followed_and_kept(mirror, fetchers, out, data):
    target = mirror()
    loc = f"http://127.0.0.1:{target.port}/elsewhere/real.bin"
    first = mirror(lambda req: (f"HTTP/1.1 302 Found\r\nLocation: {loc}\r\n\r\n".encode(), KEEP))
    f = fetchers(first.url)
    assert f.size() == SIZE
    assert f.url == loc
    assert f.fetch(500_000, 50_000, out) is None
    only(out, data, 500_000, 50_000)
    assert len(first.requests) == 1  # the mirror is asked at its new address from then on
    assert [r.line for r in target.requests] == ["GET /elsewhere/real.bin HTTP/1.1"] * 2
    assert [(r.start, r.end) for r in target.requests] == [(0, 0), (500_000, 549_999)]
    assert target.requests[0].headers["host"] == f"127.0.0.1:{target.port}"


def test_a_relative_redirect_is_resolved_against_the_url(mirror, fetchers, data):
    def respond(req: Request) -> tuple[bytes, str]:
        if "/files/" in req.line:
            return (
                b"HTTP/1.1 301 Moved\r\nLocation: ../moved.bin\r\nContent-Length: 0\r\n\r\n",
                KEEP,
            )
        return partial(data, req), KEEP

    m = mirror(respond)
    got = fetchers(m.url).fetch(10, 10, None)
    assert got is not None and bytes(got) == data[10:20]
    assert [r.line.split()[1] for r in m.requests] == ["/files/the%20file.bin", "/moved.bin"]


def test_a_redirect_loop_fails_after_the_limit(mirror, fetchers, out):
    def loop(req: Request) -> tuple[bytes, str]:
        return f"HTTP/1.1 307 Again\r\nLocation: {m.url}\r\n\r\n".encode(), KEEP

    m = mirror(loop)
    with pytest.raises(FetchFailed, match=f"more than {MAX_REDIRECTS} redirects"):
        fetchers(m.url).fetch(0, 100, out)
    assert len(m.requests) == MAX_REDIRECTS + 1
    assert untouched(out)


def test_a_redirect_without_location_fails(mirror, fetchers):
    m = mirror(lambda req: (b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n", KEEP))
    with pytest.raises(FetchFailed, match="HTTP 302 without a Location"):
        fetchers(m.url).fetch(0, 100, None)


# -- what it refuses ----------------------------------------------------------------------


def test_a_mirror_without_ranges_fails_naming_http_200(mirror, fetchers, out, data):
    def whole(req: Request) -> tuple[bytes, str]:
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data) + data, KEEP

    m = mirror(whole)
    f = fetchers(m.url)
    with pytest.raises(FetchFailed, match=r"does not serve byte ranges \(HTTP 200\)"):
        f.fetch(1000, 1000, out)
    with pytest.raises(FetchFailed, match=r"HTTP 200"):
        f.size()
    assert untouched(out)


def test_a_chunked_range_fails(mirror, fetchers, out, data):
    def chunked(req: Request) -> tuple[bytes, str]:
        body = data[req.start : req.end + 1]
        head = (
            f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {req.start}-{req.end}/{SIZE}"
            "\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        return head.encode() + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n", KEEP

    m = mirror(chunked)
    with pytest.raises(FetchFailed, match="Transfer-Encoding: chunked"):
        fetchers(m.url).fetch(0, 1000, out)
    assert untouched(out)


WRONG_RANGE = {
    "another start": "Content-Range: bytes {s1}-{e1}/{size}",
    "a shorter range": "Content-Range: bytes {s}-{e0}/{size}",
    "none": "X-Nothing: here",
    "not bytes": "Content-Range: items {s}-{e}/{size}",
}


@pytest.mark.parametrize("what", list(WRONG_RANGE))
def test_a_wrong_content_range_fails(mirror, fetchers, out, data, what):
    def wrong(req: Request) -> tuple[bytes, str]:
        body = data[req.start : req.end + 1]
        rng = WRONG_RANGE[what].format(
            s=req.start, e=req.end, s1=req.start + 1, e1=req.end + 1, e0=req.end - 1, size=SIZE
        )
        head = f"HTTP/1.1 206 Partial Content\r\n{rng}\r\nContent-Length: {len(body)}\r\n\r\n"
        return head.encode() + body, KEEP

    m = mirror(wrong)
    with pytest.raises(FetchFailed, match="sent the range"):
        fetchers(m.url).fetch(1000, 2000, out)
    assert untouched(out)


@pytest.mark.parametrize("length", ["1999", "2001", None])
def test_a_wrong_content_length_fails(mirror, fetchers, out, data, length):
    def wrong(req: Request) -> tuple[bytes, str]:
        body = data[req.start : req.end + 1]
        cl = f"Content-Length: {length}\r\n" if length else ""
        head = f"HTTP/1.1 206 Partial\r\nContent-Range: bytes {req.start}-{req.end}/{SIZE}\r\n{cl}"
        return head.encode() + b"\r\n" + body, CLOSE

    m = mirror(wrong)
    with pytest.raises(FetchFailed, match="sent the range"):
        fetchers(m.url).fetch(1000, 2000, out)
    assert untouched(out)


def test_a_size_the_mirror_does_not_say_fails(mirror, fetchers):
    def unknown(req: Request) -> tuple[bytes, str]:
        head = "HTTP/1.1 206 P\r\nContent-Range: bytes 0-0/*\r\nContent-Length: 1\r\n\r\n"
        return head.encode() + b"x", KEEP

    m = mirror(unknown)
    with pytest.raises(FetchFailed, match="does not say the file's size"):
        fetchers(m.url).size()


PAD = "X-Pad-{}: " + "p" * 2000 + "\r\n"  # 40 of them: 80 KiB of head


@pytest.mark.parametrize("shape", ["endless", "complete"])
def test_a_response_head_over_the_limit_fails(mirror, fetchers, data, shape):
    """A head that does not end, and a complete one of 80 KiB (fewer than http.client's 100
    headers and no line over its limit: only the client's own limit refuses it)."""

    def big(req: Request) -> tuple[bytes, str]:
        if shape == "endless":
            head = "HTTP/1.1 206 Partial Content\r\n" + "".join(PAD.format(i) for i in range(99))
            return head.encode(), STALL  # and nothing more: the client must stop reading
        return partial(data, req, extra="".join(PAD.format(i) for i in range(40))), KEEP

    m = mirror(big)
    with pytest.raises(FetchFailed, match=f"a response head over {MAX_HEADER} bytes"):
        fetchers(m.url).fetch(0, 100, None)


def test_a_large_head_within_the_limit_is_read(mirror, fetchers, data):
    pad = "".join(PAD.format(i) for i in range(30))  # 60 KiB
    m = mirror(lambda req: (partial(data, req, extra=pad), KEEP))
    assert len(partial(data, m_req(0, 99), extra=pad)) - 100 < MAX_HEADER
    got = fetchers(m.url).fetch(0, 100, None)
    assert got is not None and bytes(got) == data[:100]


def m_req(start: int, end: int) -> Request:
    return Request("", {}, start, end, 1, 1)


def test_a_body_cut_short_by_a_close_fails(mirror, fetchers, out, data):
    m = mirror(lambda req: (partial(data, req)[:-1000], CLOSE))
    with pytest.raises(FetchFailed, match="closed the connection"):
        fetchers(m.url).fetch(0, 300_000, out)


def test_a_body_longer_than_the_range_fails(mirror, fetchers, data):
    m = mirror(lambda req: (partial(data, req) + b"more than the range", KEEP))
    with pytest.raises(FetchFailed, match="sent more than the range"):
        fetchers(m.url).fetch(0, 10, None)


def test_not_http_fails(mirror, fetchers):
    m = mirror(lambda req: (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", CLOSE))
    with pytest.raises(FetchFailed, match="not an HTTP/1.x response"):
        fetchers(m.url).fetch(0, 10, None)


@pytest.mark.parametrize("url", ["ftp://mirror/file", "http:///nohost", "http://h:99999/x"])
def test_a_url_it_cannot_fetch_is_fetch_failed(url):
    with pytest.raises(FetchFailed):
        HttpFetcher(url, TIMEOUT)


# -- stalls and the output file -----------------------------------------------------------


@pytest.mark.parametrize("where", ["before the head", "mid-body"])
@pytest.mark.parametrize("spliced", [True, False], ids=["spliced", "buffered"])
def test_abort_ends_a_fetch_from_a_stalled_mirror(mirror, fetchers, out, data, where, spliced):
    def stall(req: Request) -> tuple[bytes, str]:
        return (partial(data, req)[:200_000] if where == "mid-body" else b""), STALL

    m = mirror(stall)
    f = fetchers(m.url)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            f.fetch(0, 500_000, out if spliced else None)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 (looked at below)
            outcome.append(exc)

    t = threading.Thread(target=run)
    t.start()
    try:
        assert m.stalled.wait(HANG)
        f.abort()
        t.join(HANG)  # not the fetcher's TIMEOUT: abort ends it
        assert not t.is_alive(), "abort() did not end the fetch"
    finally:
        m.stopped.set()
        t.join(TIMEOUT)
    assert len(outcome) == 1 and isinstance(outcome[0], FetchFailed), outcome
    assert "no answer" not in str(outcome[0])  # it stopped, it did not time out


def test_an_output_that_cannot_be_written_is_output_error(mirror, fetchers, tmp_path, data):
    path = tmp_path / "ro"
    path.write_bytes(bytes(SIZE))
    fd = os.open(path, os.O_RDONLY)
    try:
        m = mirror()
        f = fetchers(m.url)
        with pytest.raises(OutputError) as err:
            f.fetch(0, 100_000, fd)
        assert not isinstance(err.value, FetchFailed)
        got = f.fetch(0, 100_000, None)  # the mirror is fine: asked again, it serves
        assert got is not None and bytes(got) == data[:100_000]
    finally:
        os.close(fd)


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
