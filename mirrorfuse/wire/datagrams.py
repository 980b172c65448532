"""The index group's datagrams: one schema per kind, told apart by ``t``.

Clients send requests (``req``, an update the group orders) and queries
(``query``, answered by any replica from its copy); replicas send ``order``,
``hb`` (heartbeat), ``ask`` (fill my gap) and ``snap`` (a snapshot, inline or
offered by token for a TCP read) to each other, and ``reply`` to clients. A
datagram that does not decode into one of these is dropped and counted.

On the wire every datagram is sealed with the group's key (``Sealer``): a
fixed header (magic, the sender's incarnation, its counter, its clock), the
message, and an HMAC-SHA256 of both. ``Opener`` checks the HMAC before
anything is decoded, then that the datagram is fresh: stamped within
MAX_SKEW of this clock and not seen before from its sender (a sliding window
of counters, as IPsec keeps), so a captured datagram sent again is dropped.
"""

from __future__ import annotations

import math
import struct
from typing import Annotated, Any, TypeVar

import msgspec

from .addresses import Address
from .auth import MAC_BYTES, seal, unseal
from .frames import VERSION

MAX_DATAGRAM = 60_000
T = TypeVar("T")


class Datagram(msgspec.Struct, tag_field="t", kw_only=True):
    v: int = VERSION  # the protocol version: another one is refused by name, not misread


class _Kind(msgspec.Struct):
    """What every datagram says first, read before the rest."""

    t: str = ""
    v: int = 1  # datagrams of version 1 carried none


MAX_CLIENT = 200  # the longest client id: the group keeps one entry per client


class Req(Datagram, tag="req"):
    client: Annotated[str, msgspec.Meta(max_length=MAX_CLIENT)]
    req: int
    op: str
    args: dict[str, Any]


class Query(Datagram, tag="query"):
    client: str
    req: int
    q: str
    after: str = ""  # the cursor of a paged listing
    pattern: str = "*"
    peer: str = ""


class Order(Datagram, tag="order"):
    seq: int
    master: int
    time: float  # the master's clock, so every replica expires peers alike
    client: str
    req: int
    op: str
    args: dict[str, Any]


class Hb(Datagram, tag="hb"):
    replica: int
    seq: int
    ready: bool = True  # caught up and past its start-up grace (older replicas: always)
    master: int | None = None  # whom it takes for the master (older replicas: not said)
    chain: int = 0  # the hash chain of the orders applied up to seq (0: not said)


class Ask(Datagram, tag="ask"):
    replica: int
    first: int  # "send me the orders from here"
    to: int = -1  # the one replica asked (-1: the lowest live one other than the asker)


class Snap(Datagram, tag="snap"):
    """A snapshot for one replica: inline, or where to read it over TCP."""

    to: int
    seq: Annotated[int, msgspec.Meta(ge=0)]
    blob: bytes | None = None
    host: Annotated[str, msgspec.Meta(max_length=255)] = ""
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    token: Annotated[str, msgspec.Meta(max_length=64)] = ""


class Answer(Datagram, tag="reply"):
    client: str
    req: int
    reply: msgspec.Raw  # decoded by the client against what it asked
    replica: int = -1


AnyDatagram = Req | Query | Order | Hb | Ask | Snap | Answer


# -- what the group holds ----------------------------------------------------------------------


class PeerEntry(msgspec.Struct, omit_defaults=True):
    addr: str
    seen: float  # the master's clock at the last heartbeat
    interval: float | None = None  # its own heartbeat interval, if it gave one


class FileEntry(msgspec.Struct):
    owner: str
    size: int
    checksum: int | str
    holders: list[str]


# -- update arguments (checked alike on every replica) ----------------------------------------


class RegisterArgs(msgspec.Struct):
    peer: str
    addr: str
    interval: Annotated[float, msgspec.Meta(gt=0)] | None = None


class HeartbeatArgs(msgspec.Struct):
    peer: str


class AdvertiseArgs(msgspec.Struct):
    peer: str
    name: str
    size: Annotated[int, msgspec.Meta(ge=0)]
    checksum: int | str


class RevokeArgs(msgspec.Struct):
    peer: str
    name: str


class ExpireArgs(msgspec.Struct):
    interval: float


class LeaveArgs(msgspec.Struct):
    """A peer that stops: it and its files go at once."""

    peer: str


UPDATES: dict[str, type[msgspec.Struct]] = {
    "register": RegisterArgs,
    "heartbeat": HeartbeatArgs,
    "advertise": AdvertiseArgs,
    "revoke": RevokeArgs,
    "expire": ExpireArgs,
    "leave": LeaveArgs,
}


# -- replies -------------------------------------------------------------------------------------


class Result(msgspec.Struct, kw_only=True):
    """Every reply says whether it worked, and if not, why."""

    ok: bool = True
    error: str | None = None


class UpdateResult(Result):
    holder: bool = False  # a second holder of the same content
    dropped: list[str] = []  # expire: the peers dropped


class PeersPage(Result):
    peers: dict[str, str] = {}
    next: str | None = None
    seq: int = 0


class FilesPage(Result):
    files: dict[str, FileEntry] = {}
    next: str | None = None
    seq: int = 0


class SnapshotOffer(Result):
    seq: int = 0
    blob: bytes | None = None  # inline when small
    host: str = ""
    port: int = 0
    token: str = ""


class ReplicaStatus(Result):
    replica: int = -1
    seq: int = 0
    master: int | None = None
    digest: str = ""
    dropped: int = 0  # datagrams dropped, for whatever reason; of them:
    unsealed: int = 0  # without a valid seal of the group's key
    replayed: int = 0  # sealed, but seen before or stamped too far from the replica's clock
    bad_snapshots: int = 0  # snapshots refused: they did not decode or check out
    tcp_snapshots: int = 0
    peers: int = 0
    files: int = 0
    ready: bool = True  # False: still catching up (it answers no other query meanwhile)


class StateDump(Result):
    seq: int = 0
    peers: dict[str, PeerEntry] = {}
    files: dict[str, FileEntry] = {}
    clients: dict[str, tuple[int, UpdateResult]] = {}


_encoder = msgspec.msgpack.Encoder()
_datagrams: msgspec.msgpack.Decoder[AnyDatagram] = msgspec.msgpack.Decoder(AnyDatagram)
_kinds = msgspec.msgpack.Decoder(_Kind)


class BadDatagram(ValueError):
    """Not one of the group's datagrams (garbage, oversized, an unknown kind)."""


class VersionSkew(BadDatagram):
    """A datagram of the group, but of another protocol version."""


def pack(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def unpack(data: bytes) -> AnyDatagram:
    if len(data) > MAX_DATAGRAM:
        raise BadDatagram(f"a datagram of {len(data)} bytes (at most {MAX_DATAGRAM})")
    try:
        kind = _kinds.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise BadDatagram(str(exc)) from None
    if kind.v != VERSION:
        raise VersionSkew(
            f"a {kind.t!r} datagram of protocol version {kind.v} (this side speaks {VERSION})"
        )
    try:
        return _datagrams.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise BadDatagram(str(exc)) from None


def answer(client: str, req: int, replica: int, reply: msgspec.Struct) -> Answer:
    return Answer(client=client, req=req, replica=replica, reply=msgspec.Raw(pack(reply)))


def result_of(raw: msgspec.Raw | bytes, kind: type[T]) -> T:
    """A reply as the kind asked for; an unreadable one is a failed result."""
    try:
        return msgspec.msgpack.decode(raw, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise BadDatagram(f"an unreadable reply ({exc})") from None


def offered_at(host: str, port: int, sender: str) -> Address:
    """Where a snapshot offer says to read it (an offer from a replica listening on
    every address means the address it was sent from)."""
    return Address(sender if host in ("0.0.0.0", "") else host, port)


# -- seals: the group's key, and freshness --------------------------------------------------------

SEAL_MAGIC = b"MFG" + bytes([VERSION])
_HEAD = struct.Struct(">4s8sQd")  # magic, sender incarnation, counter, sender's clock
SEAL_OVERHEAD = _HEAD.size + MAC_BYTES
MAX_SKEW = 30.0  # seconds a datagram's stamp may differ from this clock
WINDOW = 1024  # counters of one sender remembered below its highest
MAX_SENDERS = 10_000  # senders remembered, at most (the longest silent is forgotten)


class Unsealed(BadDatagram):
    """No valid HMAC of the group's key: sent without the key, or altered on the way."""


class Replayed(BadDatagram):
    """Sealed with the key, but not fresh: seen before, or stamped too far from this clock."""


class Sealer:
    """Seals what one process sends: its incarnation, the next counter, its clock."""

    def __init__(self, key: bytes, incarnation: bytes) -> None:
        if len(incarnation) != 8:
            raise ValueError("an incarnation is 8 bytes")
        self.key = key
        self.incarnation = incarnation
        self.counter = 0

    def seal(self, data: bytes, now: float) -> bytes:
        self.counter += 1
        return seal(self.key, _HEAD.pack(SEAL_MAGIC, self.incarnation, self.counter, now) + data)


class Opener:
    """Opens sealed datagrams: the HMAC first, then freshness; only then is anything decoded."""

    def __init__(self, key: bytes, max_skew: float = MAX_SKEW) -> None:
        self.key = key
        self.max_skew = max_skew
        self.seen: dict[bytes, tuple[int, int]] = {}  # sender -> (highest counter, bitmap)

    def open(self, datagram: bytes, now: float) -> bytes:
        """The message inside; raises Unsealed or Replayed (then it must not be used)."""
        if len(datagram) > MAX_DATAGRAM + SEAL_OVERHEAD:
            raise Unsealed(f"a datagram of {len(datagram)} bytes (at most {MAX_DATAGRAM})")
        data = unseal(self.key, datagram)
        if data is None or len(data) < _HEAD.size:
            raise Unsealed("a datagram without the group key's seal")
        if not data.startswith(SEAL_MAGIC):
            raise Unsealed("a datagram sealed with the group's key by another protocol version")
        _, sender, counter, stamp = _HEAD.unpack_from(data)
        if not math.isfinite(stamp) or abs(now - stamp) > self.max_skew:
            off = now - stamp if math.isfinite(stamp) else math.inf
            raise Replayed(
                f"a datagram stamped {abs(off):.0f} s {'before' if off > 0 else 'after'} this "
                f"clock (at most {self.max_skew:g}): a replay, or clocks that differ"
            )
        self._fresh(sender, counter)
        return data[_HEAD.size :]

    def _fresh(self, sender: bytes, counter: int) -> None:
        """Accept each counter of a sender once, within WINDOW of its highest."""
        top, bits = self.seen.pop(sender, (0, 0))
        try:
            if counter > top:
                bits = ((bits << (counter - top)) | 1) & ((1 << WINDOW) - 1)
                top = counter
                return
            back = top - counter
            if back >= WINDOW or bits >> back & 1:
                raise Replayed("a datagram seen before (a replay)")
            bits |= 1 << back
        finally:
            self.seen[sender] = (top, bits)  # the most recent sender last
            if len(self.seen) > MAX_SENDERS:
                del self.seen[next(iter(self.seen))]
