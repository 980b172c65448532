"""Blocking Range requests to an HTTP mirror, one keep-alive connection per worker thread.

Why not aiohttp (used before) or pycurl: measured on the same mirrors
(bench/http_clients.py), both hand the body to Python in chunks that are
copied and joined; here the status line and headers are parsed by the
standard library (``http.client.parse_headers``) and the body goes from the
socket to the output file inside the kernel (``splice``), as the protocol's
own fetches do (``wirefetch``). https is read through a buffer (TLS cannot
splice). A redirect is followed (at most MAX_REDIRECTS), and the mirror is
asked at its new address from then on.
"""

from __future__ import annotations

import http.client
import io
import socket
import ssl
import urllib.parse
from dataclasses import dataclass

from .output import write_at
from .wirefetch import FetchFailed, Splicer, reason

MAX_HEADER = 64 << 10  # a response's status line and headers, at most
MAX_REDIRECTS = 5
MAX_INTERIM = 5  # 1xx responses (103 Early Hints) before the real one
REDIRECTS = (301, 302, 303, 307, 308)


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body_start: bytes  # body bytes that came with the headers
    old: bool = False  # HTTP/1.0: the connection closes after it unless it says keep-alive


class HttpFetcher(Splicer):
    """One connection to one mirror, used by one thread at a time."""

    def __init__(self, url: str, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout
        self._target(url)

    def _target(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchFailed(f"{url!r} is not an http:// or https:// URL")
        self.url = url
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        try:
            self.port = parts.port or (443 if self.tls else 80)
        except ValueError:
            raise FetchFailed(f"{url!r} has a bad port") from None
        # as a browser sends it: spaces, non-ASCII and control characters percent-encoded
        # (what is encoded already stays), so the request line is one line of ASCII
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.path = urllib.parse.quote(target, safe="/%!$&'()*+,;=:@~-._?[]")
        host = parts.netloc.rpartition("@")[2]
        if not host.isascii():  # an internationalised name: its ASCII form
            host = self.host.encode("idna").decode() + (f":{parts.port}" if parts.port else "")
        self.host_header = host

    # -- connection ----------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        if self.sock is not None:
            return self.sock
        try:
            sock = self.open_tcp(self.host, self.port)
            if self.tls:  # abort() shuts the socket under the handshake too
                ctx = ssl.create_default_context()
                tls = ctx.wrap_socket(
                    sock, server_hostname=self.host, do_handshake_on_connect=False
                )
                self.adopt(tls)
                tls.do_handshake()
                sock = tls
            else:
                self.bound(sock, self.timeout)
        except OSError as exc:
            self.close()
            raise FetchFailed(f"is not reachable: {reason(exc)}") from None
        return sock

    # -- requests ------------------------------------------------------------------------

    def _ask(self, start: int, end: int) -> Response:
        """Send a Range request for [start, end] and read the response's head."""
        for _ in range(MAX_REDIRECTS + 1):
            request = (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
                f"Range: bytes={start}-{end}\r\nUser-Agent: mirrorfs\r\n"
                "Accept-Encoding: identity\r\n\r\n"
            ).encode("latin-1")

            def ask(sock: socket.socket, request: bytes = request) -> Response:
                self.send_all(sock, request)
                return self._head(sock)

            resp = self.first(ask, self._connect)
            if resp.status not in REDIRECTS:
                conn = (resp.headers.get("Connection") or "").lower()
                self._closing = conn == "close" or (resp.old and conn != "keep-alive")
                return resp
            where = resp.headers.get("Location")
            self.close()  # its body (if any) is not read
            if not where:
                raise FetchFailed(f"HTTP {resp.status} without a Location")
            self._target(urllib.parse.urljoin(self.url, where))
        raise FetchFailed(f"more than {MAX_REDIRECTS} redirects")

    def _head(self, sock: socket.socket) -> Response:
        """The response's head, past any interim (1xx) ones."""
        buf = bytearray()
        for _ in range(MAX_INTERIM + 1):
            resp = self._one_head(sock, buf)
            if not 100 <= resp.status < 200:
                return resp
            buf = bytearray(resp.body_start)
        raise FetchFailed(f"more than {MAX_INTERIM} interim responses")

    def _one_head(self, sock: socket.socket, buf: bytearray) -> Response:
        while (end := buf.find(b"\r\n\r\n")) < 0 and len(buf) <= MAX_HEADER:
            buf += self.recv_some(sock, 64 << 10)
        if end < 0 or end + 4 > MAX_HEADER:  # also one that ended in the last bytes read
            raise FetchFailed(f"a response head over {MAX_HEADER} bytes")
        head, rest = bytes(buf[: end + 2]), bytes(buf[end + 4 :])
        line, _, fields = head.partition(b"\r\n")
        parts = line.split(None, 2)
        status = parts[1] if len(parts) > 1 else b""
        if not parts[0].startswith(b"HTTP/1.") or len(status) != 3 or not status.isdigit():
            raise FetchFailed(f"not an HTTP/1.x response: {line[:80]!r}")
        try:
            headers = http.client.parse_headers(io.BytesIO(fields + b"\r\n"))
        except (http.client.HTTPException, ValueError) as exc:
            raise FetchFailed(f"unreadable headers ({exc})") from None
        return Response(int(status), headers, rest, parts[0] == b"HTTP/1.0")

    def size(self) -> int:
        """The object's size, from the Content-Range of a one-byte request."""
        try:
            resp = self._ask(0, 0)
            if resp.status == 416 and resp.headers.get("Content-Range") == "bytes */0":
                self.close()  # an empty file has no byte 0 (its body, if any, is not read)
                return 0
            total = self._range(resp, 0, 1).rpartition("/")[2]
            self._body(resp, 1, None)
        except BaseException:
            self.close()
            raise
        if not (total.isascii() and total.isdigit()):
            raise FetchFailed(f"does not say the file's size (Content-Range {total!r})")
        return int(total)

    def _range(self, resp: Response, start: int, length: int) -> str:
        if resp.status != 206:
            raise FetchFailed(f"does not serve byte ranges (HTTP {resp.status})")
        if "chunked" in (resp.headers.get("Transfer-Encoding") or "").lower():
            raise FetchFailed("answered a range in chunks (Transfer-Encoding: chunked)")
        coding = (resp.headers.get("Content-Encoding") or "identity").strip().lower()
        if coding != "identity":  # asked for identity: these bytes are not the file's
            raise FetchFailed(f"sent the range encoded (Content-Encoding: {coding})")
        rng = resp.headers.get("Content-Range") or ""
        want = f"bytes {start}-{start + length - 1}/"
        if not rng.startswith(want) or resp.headers.get("Content-Length") != str(length):
            raise FetchFailed(f"sent the range {rng!r} for {want}...")
        return rng

    def _body(
        self, resp: Response, length: int, fd_at: tuple[int, int] | None
    ) -> memoryview | None:
        got = resp.body_start[:length]
        if len(resp.body_start) > length:
            raise FetchFailed("sent more than the range")
        sock = self._connect()
        if fd_at is not None:
            fd, start = fd_at
            write_at(fd, got, start)
            if self.tls:
                view = self.buffer(length - len(got))
                self.recv_into(sock, view)
                write_at(fd, view, start + len(got))
            else:
                self.splice_into(sock, fd, start + len(got), length - len(got))
            result = None
        else:
            view = self.buffer(length)
            view[: len(got)] = got
            self.recv_into(sock, view[len(got) :])
            result = view
        if self._closing:
            self.close()
            self._closing = False
        return result

    def fetch(self, start: int, length: int, fd: int | None) -> memoryview | None:
        """[start, start+length): with ``fd``, written into it at ``start`` (None returned);
        without, in this fetcher's buffer (returned, valid until its next fetch)."""
        try:
            resp = self._ask(start, start + length - 1)
            self._range(resp, start, length)
            return self._body(resp, length, None if fd is None else (fd, start))
        except BaseException:
            self.close()  # a response cut short leaves the connection unusable
            raise
