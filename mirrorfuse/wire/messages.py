"""Typed message bodies: one schema per request and per reply, checked at the edge.

Every request names its message type and the type of its reply, so a client
sends a struct and gets a struct back, and a server decodes a request into
its struct before acting on it. A body that does not fit its schema (a
missing field, a wrong type, a value out of range) is refused with a
message naming the field, never a KeyError. Unknown fields are ignored, so a
newer peer may add optional ones; anything else new needs a new protocol
version (frames.VERSION), refused at the first frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Generic, TypeVar

import msgspec

from .checksums import MAX_SUMS
from .frames import Flag, Frame, Msg, encode
from .sizes import MAX_BLOCK

R = TypeVar("R", bound="Message")

MAX_SLOT = 1 << 40  # far beyond any disk: the most a request may name
Slot = Annotated[int, msgspec.Meta(ge=0, lt=MAX_SLOT)]
Count = Annotated[int, msgspec.Meta(ge=0)]
InBlock = Annotated[int, msgspec.Meta(ge=0, le=MAX_BLOCK)]  # a byte offset or length in a block


class BadMessage(Exception):
    """A body that does not fit its schema: refused, the connection goes on."""


class Message(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Base of every body."""


class Request(Message, Generic[R]):
    TYPE: ClassVar[Msg]
    REPLY: ClassVar[type[Message]]


@dataclass(slots=True)
class Reply(Generic[R]):
    body: R
    payload: bytes | bytearray = b""


class State(StrEnum):
    """A server's state in the failure table."""

    ALIVE = "alive"
    FAILED = "failed"  # out of reach; the same directory may come back
    STALE = "stale"  # another or an older directory: never read, healed in full
    HEALING = "healing"  # taking writes while what it lacks is copied


class Availability(StrEnum):
    """A download source's state (a file server's, as its console set it)."""

    ALIVE = "alive"
    PAUSED = "paused"
    DEAD = "dead"


class Table(Message):
    """The failure table: one state per server id, versioned by a generation; per server
    also the identity of the data directory it holds, and the generation at which it
    stopped being alive (0 while it is)."""

    gen: int
    states: tuple[State, ...]
    idents: tuple[str, ...] = ()
    since: tuple[int, ...] = ()


# -- block servers ----------------------------------------------------------------------------


class Identity(Message):
    server: int
    pid: int
    formatted: bool
    ident: str = ""  # of its data directory: new at format and at a full heal
    volume: str | None = None
    count: int | None = None
    block_size: int | None = None
    gen: int = 0
    chunk: int = 0  # the checksum scheme (wire.checksums): 0 whole blocks, else chunk sums


class Hello(Request[Identity]):
    TYPE = Msg.HELLO
    REPLY = Identity
    volume: str | None = None  # refuse me if you belong to another volume


class StatReply(Identity):
    table: Table | None = None
    blocks: int = 0
    bytes: int = 0
    reads: int = 0
    writes: int = 0
    trims: int = 0
    repairs: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    capacity_slots: int = 0
    dirty: int = 0  # slots changed while its mirror was out (copied when the mirror heals)
    heal_total: int = 0  # being healed: slots to copy, copied, seconds since the start
    heal_done: int = 0
    heal_seconds: float = 0.0


class Stat(Request[StatReply]):
    TYPE = Msg.STAT
    REPLY = StatReply


class Format(Request[Identity]):
    TYPE = Msg.FORMAT
    REPLY = Identity
    volume: str
    server: Count
    count: Count
    block_size: Count
    force: bool = False
    key: bytes | None = None  # the volume's, for a server that has none (or a new volume)
    chunk: InBlock | None = None  # the checksum scheme; None: that of a new volume


class ReadReply(Message):
    gen: int
    checksum: Count | None = None
    absent: bool = False  # never written (or trimmed): reads as nothing
    # a range of a volume with chunk sums: the payload is the chunks the range touches,
    # from ``start``; ``sums`` holds every chunk's sum of the block of ``size`` bytes
    size: InBlock | None = None
    start: InBlock | None = None
    sums: Annotated[bytes, msgspec.Meta(max_length=MAX_SUMS)] | None = None


class Read(Request[ReadReply]):
    """A block; with a range (either field; offset 0, length to the end by default), on a
    volume with chunk sums, only the chunks it touches and the block's sums."""

    TYPE = Msg.READ
    REPLY = ReadReply
    slot: Slot
    offset: InBlock | None = None
    length: InBlock | None = None


class Applied(Message):
    applied: bool  # False: a rebuild copy that lost against a newer write
    gen: int


class Write(Request[Applied]):
    TYPE = Msg.WRITE
    REPLY = Applied
    slot: Slot
    checksum: Count
    gen: int  # the writer's failure table: older than the server's is STALE
    epoch: int | None = None  # the mount's lease: older than the server's is FENCED


class Trim(Request[Applied]):
    TYPE = Msg.TRIM
    REPLY = Applied
    slot: Slot
    gen: int
    epoch: int | None = None


class ListReply(Message):
    slots: list[int]
    next: int | None
    gen: int


class ListSlots(Request[ListReply]):
    TYPE = Msg.LIST
    REPLY = ListReply
    start: Count
    limit: Annotated[int, msgspec.Meta(ge=1)]
    dirty: bool = False  # only those changed while the mirror was out


class GetTable(Request[Table]):
    TYPE = Msg.GET_TABLE
    REPLY = Table


class SetTableReply(Message):
    accepted: bool
    table: Table  # the server's table after the request: a refusal says why


class SetTable(Request[SetTableReply]):
    TYPE = Msg.SET_TABLE
    REPLY = SetTableReply
    table: Table
    epoch: int | None = None


class GenReply(Message):
    gen: int


class Sync(Request[GenReply]):
    TYPE = Msg.SYNC
    REPLY = GenReply


class HealBegin(Request[GenReply]):
    """This server is about to be healed: copies lose against newer writes, its metadata
    comes anew; ``total`` slots will be copied (for the progress it shows)."""

    TYPE = Msg.HEAL_BEGIN
    REPLY = GenReply
    healer: str  # who copies: a second healer is refused while the first one is at work
    total: Count = 0


class Holder(Message):
    """Who holds the mount lease: shown to a user whose mount is refused."""

    id: str = ""
    host: str = ""
    pid: int = 0
    mountpoint: str = ""


class MetaInfoReply(Message):
    epoch: int
    holder: Holder
    checkpoint_seq: int
    last_seq: int
    holder_active: bool = False
    gen: int = 0


class MetaInfo(Request[MetaInfoReply]):
    TYPE = Msg.META_INFO
    REPLY = MetaInfoReply


class Lease(Request[MetaInfoReply]):
    TYPE = Msg.LEASE
    REPLY = MetaInfoReply
    epoch: int
    holder: Holder
    force: bool = False


class AppendReply(Message):
    applied: bool
    last: int
    gen: int


class JournalAppend(Request[AppendReply]):
    TYPE = Msg.JOURNAL_APPEND
    REPLY = AppendReply
    first: Annotated[int, msgspec.Meta(ge=1)]
    count: Annotated[int, msgspec.Meta(ge=1)]
    epoch: int
    gen: int


class JournalReadReply(Message):
    next: int | None  # where to continue; None: that was the end
    last: int
    checkpoint_seq: int


class JournalRead(Request[JournalReadReply]):
    TYPE = Msg.JOURNAL_READ
    REPLY = JournalReadReply
    start: Count
    max_bytes: Annotated[int, msgspec.Meta(ge=1)]


class CheckpointPutReply(Message):
    done: bool
    last: int


class CheckpointPut(Request[CheckpointPutReply]):
    TYPE = Msg.CHECKPOINT_PUT
    REPLY = CheckpointPutReply
    seq: Count
    offset: Count
    total: Count
    final: bool = False
    epoch: int | None = None
    gen: int | None = None


class CheckpointGetReply(Message):
    seq: int  # 0: there is no checkpoint
    total: int
    crc: int


class CheckpointGet(Request[CheckpointGetReply]):
    TYPE = Msg.CHECKPOINT_GET
    REPLY = CheckpointGetReply
    offset: Count
    length: Annotated[int, msgspec.Meta(ge=1)]


# -- file servers, peers and snapshot blobs ------------------------------------------------------


class FileInfoReply(Message):
    size: int
    checksum: int
    state: Availability = Availability.ALIVE
    name: str = ""


class FileInfo(Request[FileInfoReply]):
    TYPE = Msg.FILE_INFO
    REPLY = FileInfoReply
    name: str | None = None  # a peer serves many files: which one


class FileReadReply(Message):
    checksum: int


class FileRead(Request[FileReadReply]):
    TYPE = Msg.FILE_READ
    REPLY = FileReadReply
    offset: Count
    length: Count
    name: str | None = None


class BlobReadReply(Message):
    total: int


class BlobRead(Request[BlobReadReply]):
    TYPE = Msg.BLOB_READ
    REPLY = BlobReadReply
    token: str
    offset: Count


class SharedFile(Message):
    size: int
    checksum: int | str


class PeerIndexReply(Message):
    peer: str
    peers: dict[str, str]
    seq: int
    online: bool
    mine: dict[str, SharedFile] = {}


class PeerIndex(Request[PeerIndexReply]):
    """Peers exchanging what they know while no index replica answers."""

    TYPE = Msg.PEER_INDEX
    REPLY = PeerIndexReply
    peer: str | None = None
    addr: str | None = None
    peers: dict[str, str] = {}
    mine: dict[str, SharedFile] = {}


class Outcome(Message):
    ok: bool
    error: str | None = None


class PeerShare(Request[Outcome]):
    TYPE = Msg.PEER_SHARE
    REPLY = Outcome
    path: str
    name: str


class PeerUnshare(Request[Outcome]):
    TYPE = Msg.PEER_UNSHARE
    REPLY = Outcome
    name: str


class ErrorBody(Message):
    code: str
    msg: str = ""
    last: int | None = None  # GAP: where the server's journal ends


# -- the edge: encoding and decoding ---------------------------------------------------------------

REQUESTS: dict[int, type[Request[Any]]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Stat,
        Format,
        Read,
        Write,
        Trim,
        ListSlots,
        GetTable,
        SetTable,
        Sync,
        HealBegin,
        MetaInfo,
        Lease,
        JournalAppend,
        JournalRead,
        CheckpointPut,
        CheckpointGet,
        FileInfo,
        FileRead,
        BlobRead,
        PeerIndex,
        PeerShare,
        PeerUnshare,
    )
}

_decoders: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {}


def decode(kind: type[R], raw: bytes) -> R:
    """A body as ``kind``; BadMessage says which field is wrong."""
    dec = _decoders.get(kind)
    if dec is None:
        dec = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    try:
        result: R = dec.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadMessage(str(exc)) from None
    return result


def decode_request(frame: Frame) -> Request[Any]:
    """The request a frame carries; BadMessage for an unknown type or a bad body."""
    kind = REQUESTS.get(frame.type)
    if kind is None:
        raise BadMessage(f"unknown message type {frame.type}")
    try:
        return decode(kind, frame.body)
    except BadMessage as exc:
        raise BadMessage(f"bad {Msg(frame.type).name} request: {exc}") from None


def decode_error(raw: bytes) -> ErrorBody:
    """An error reply's body; one that does not decode still becomes an error."""
    try:
        return decode(ErrorBody, raw)
    except BadMessage as exc:
        return ErrorBody(code="ERROR", msg=f"an unreadable error reply ({exc})")


def encode_request(
    req_id: int,
    req: Request[Any],
    payload: bytes | bytearray | memoryview = b"",
    flags: int = 0,
) -> list[bytes | bytearray | memoryview]:
    return encode(req.TYPE, req_id, req, payload, flags)


def encode_reply(
    type_: int, req_id: int, body: Message, payload: bytes | bytearray | memoryview = b""
) -> list[bytes | bytearray | memoryview]:
    return encode(type_, req_id, body, payload, Flag.REPLY)


def encode_error(
    req_id: int, type_: int, code: str, message: str, last: int | None = None
) -> list[bytes | bytearray | memoryview]:
    body = ErrorBody(code=code, msg=message, last=last)
    return encode(type_, req_id, body, flags=Flag.REPLY | Flag.ERROR)
