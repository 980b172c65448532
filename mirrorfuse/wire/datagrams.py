"""The index group's datagrams: one schema per kind, told apart by ``t``.

Clients send requests (``req``, an update the group orders) and queries
(``query``, answered by any replica from its copy); replicas send ``order``,
``hb`` (heartbeat), ``ask`` (fill my gap) and ``snap`` (a snapshot, inline or
offered by token for a TCP read) to each other, and ``reply`` to clients. A
datagram that does not decode into one of these is dropped and counted.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import msgspec

from .addresses import Address
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
    seq: int
    blob: bytes | None = None
    host: str = ""
    port: int = 0
    token: str = ""


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
    dropped: int = 0
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
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadDatagram(str(exc)) from None
    if kind.v != VERSION:
        raise VersionSkew(
            f"a {kind.t!r} datagram of protocol version {kind.v} (this side speaks {VERSION})"
        )
    try:
        return _datagrams.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadDatagram(str(exc)) from None


def answer(client: str, req: int, replica: int, reply: msgspec.Struct) -> Answer:
    return Answer(client=client, req=req, replica=replica, reply=msgspec.Raw(pack(reply)))


def result_of(raw: msgspec.Raw | bytes, kind: type[T]) -> T:
    """A reply as the kind asked for; an unreadable one is a failed result."""
    try:
        return msgspec.msgpack.decode(raw, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadDatagram(f"an unreadable reply ({exc})") from None


def offered_at(host: str, port: int, sender: str) -> Address:
    """Where a snapshot offer says to read it (an offer from a replica listening on
    every address means the address it was sent from)."""
    return Address(sender if host in ("0.0.0.0", "") else host, port)
