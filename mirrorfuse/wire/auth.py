"""Keys and the handshake that proves them, before a daemon reads any request.

A key is 32 random bytes, kept as one line of hex in a file of mode 0600
(``servers.files`` reads and writes it).
A connection to a block server opens with a mutual challenge-response, in
fixed-size messages so that nothing is buffered before the key is proven:

    client -> server   HELLO  = "MFA1" | client nonce (32)
    server -> client   REPLY  = "MFA1" | keyed (1) | volume (36) | server nonce (32)
                                | HMAC(key, "server" | both nonces | binding)
    client -> server   PROOF  = HMAC(key, "client" | both nonces | binding)

Each side checks the other's HMAC with ``hmac.compare_digest``; fresh nonces
on both sides make every proof good for one connection only. ``binding`` is
the SHA-256 of the server's TLS certificate when the connection is TLS, so a
man in the middle that ends TLS itself cannot relay the proofs. A server
that holds no key yet (never formatted, started without one) says so
(``keyed`` 0); it then serves only what a format needs.

The same keys sign datagrams (``seal``/``unseal``), for the index group.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable

from .errors import MirrorfsError

KEY_BYTES = 32
NONCE_BYTES = 32
MAC_BYTES = 32
MAGIC = b"MFA1"
VOLUME_BYTES = 36  # a volume id as text (a UUID), zero-padded; all zeros: none
HELLO_SIZE = len(MAGIC) + NONCE_BYTES
REPLY_SIZE = len(MAGIC) + 1 + VOLUME_BYTES + NONCE_BYTES + MAC_BYTES
PROOF_SIZE = MAC_BYTES
KEY_NAME = "volume.key"  # in a block server's data directory


class AuthError(MirrorfsError):
    """The other side did not prove the key, or spoke something else entirely."""


class KeyFileError(MirrorfsError):
    """A key file is missing, unreadable or not a key."""


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def parse_key(text: bytes, where: str) -> bytes:
    try:
        key = bytes.fromhex(text.decode("ascii").strip())
    except ValueError:
        raise KeyFileError(f"{where} is not a mirrorfs key (one line of hex)") from None
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"{where} holds {len(key)} bytes of key, not {KEY_BYTES}")
    return key


def fingerprint(cert_der: bytes) -> bytes:
    return hashlib.sha256(cert_der).digest()


def _mac(key: bytes, role: bytes, first: bytes, second: bytes, binding: bytes) -> bytes:
    return hmac.new(key, b"mirrorfs " + role + first + second + binding, hashlib.sha256).digest()


def _volume_field(volume: str | None) -> bytes:
    raw = (volume or "").encode("ascii", "replace")[:VOLUME_BYTES]
    return raw.ljust(VOLUME_BYTES, b"\0")


class ServerHandshake:
    """The server's side: fed the bytes that arrive, says what to send back.

    ``receive`` returns the bytes to send; ``done`` is set once the client
    proved the key (or, for a server without a key, sent its proof-sized
    reply). Bytes past the handshake are kept in ``rest`` for the frame
    decoder. A wrong proof raises AuthError: send one error frame and close.
    """

    def __init__(
        self, key: bytes | None, volume: str | None, binding: bytes = b"", nonce: bytes = b""
    ) -> None:
        self.key = key
        self.volume = volume
        self.binding = binding
        self.nonce = nonce or secrets.token_bytes(NONCE_BYTES)
        self._buf = bytearray()
        self._client_nonce = b""
        self.done = False
        self.rest = b""

    @property
    def wanted(self) -> int:
        """How many more bytes the handshake needs (read no more than this)."""
        if self.done:
            return 0
        need = HELLO_SIZE if not self._client_nonce else PROOF_SIZE
        return need - len(self._buf)

    def receive(self, data: bytes) -> bytes:
        self._buf += data
        out = b""
        if not self._client_nonce and self._buf[: len(MAGIC)] != MAGIC[: len(self._buf)]:
            # said at once: an old client's first frame may be shorter than a hello
            raise AuthError("not a mirrorfs client of this version (no key handshake)")
        if not self._client_nonce and len(self._buf) >= HELLO_SIZE:
            hello = bytes(self._buf[:HELLO_SIZE])
            del self._buf[:HELLO_SIZE]
            self._client_nonce = hello[len(MAGIC) :]
            mac = (
                _mac(self.key, b"server", self._client_nonce, self.nonce, self.binding)
                if self.key is not None
                else bytes(MAC_BYTES)
            )
            keyed = b"\1" if self.key is not None else b"\0"
            out = MAGIC + keyed + _volume_field(self.volume) + self.nonce + mac
        if self._client_nonce and len(self._buf) >= PROOF_SIZE:
            proof = bytes(self._buf[:PROOF_SIZE])
            self.rest = bytes(self._buf[PROOF_SIZE:])
            self._buf.clear()
            if self.key is not None:
                want = _mac(self.key, b"client", self.nonce, self._client_nonce, self.binding)
                if not hmac.compare_digest(proof, want):
                    raise AuthError("the connection did not prove the volume key")
            self.done = True
        return out

    @property
    def authenticated(self) -> bool:
        return self.done and self.key is not None


# Given the volume a server names (None: it has none yet), the key to prove.
KeyLookup = Callable[[str | None], bytes | None]


class ClientHandshake:
    """The client's side: ``hello()`` first, then ``receive`` until ``done``.

    ``keyed`` and ``volume`` say what the server declared; a server without a
    key is accepted (it can only be formatted) and the caller decides what
    it may ask of it.
    """

    def __init__(self, keys: KeyLookup, binding: bytes = b"", nonce: bytes = b"") -> None:
        self.keys = keys
        self.binding = binding
        self.nonce = nonce or secrets.token_bytes(NONCE_BYTES)
        self._buf = bytearray()
        self.done = False
        self.keyed = False
        self.volume: str | None = None
        self.rest = b""

    def hello(self) -> bytes:
        return MAGIC + self.nonce

    def receive(self, data: bytes) -> bytes:
        self._buf += data
        if self.done or len(self._buf) < REPLY_SIZE:
            return b""
        reply = bytes(self._buf[:REPLY_SIZE])
        self.rest = bytes(self._buf[REPLY_SIZE:])
        self._buf.clear()
        if reply[: len(MAGIC)] != MAGIC:
            raise AuthError("does not speak this version's key handshake (an older server?)")
        pos = len(MAGIC)
        self.keyed = reply[pos] == 1
        raw_volume = reply[pos + 1 : pos + 1 + VOLUME_BYTES].rstrip(b"\0")
        self.volume = raw_volume.decode("ascii", "replace") or None
        pos += 1 + VOLUME_BYTES
        server_nonce = reply[pos : pos + NONCE_BYTES]
        mac = reply[pos + NONCE_BYTES :]
        self.done = True
        if not self.keyed:
            return bytes(PROOF_SIZE)
        key = self.keys(self.volume)
        if key is None:
            raise AuthError(f"has volume {self.volume or '?'}, and there is no key for it here")
        if not hmac.compare_digest(
            mac, _mac(key, b"server", self.nonce, server_nonce, self.binding)
        ):
            raise AuthError(f"did not prove the key of volume {self.volume or '?'} (wrong key?)")
        return _mac(key, b"client", server_nonce, self.nonce, self.binding)


def seal(key: bytes, data: bytes) -> bytes:
    """A datagram with its HMAC appended."""
    return data + hmac.new(key, data, hashlib.sha256).digest()


def unseal(key: bytes, datagram: bytes) -> bytes | None:
    """The datagram's content if its HMAC is right, None otherwise."""
    if len(datagram) < MAC_BYTES:
        return None
    data, mac = datagram[:-MAC_BYTES], datagram[-MAC_BYTES:]
    want = hmac.new(key, data, hashlib.sha256).digest()
    return data if hmac.compare_digest(mac, want) else None
