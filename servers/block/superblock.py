"""A data directory's superblock: the volume and server it belongs to, its format and
checksum scheme. Written at format; read, checked and upgraded in place at every start."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import msgspec

from mirrorfuse.wire.checksums import WHOLE, valid_chunk
from mirrorfuse.wire.errors import MirrorfsError

from ..files import atomic_write

# 2: typed journal records and checkpoints; 1 (before) is read and upgraded; 3: the
# same with chunk sums (a server that knows only 2 refuses it rather than misread it)
FORMAT_NAME = "mirrorfs-2"
CHUNKED_NAME = "mirrorfs-3"
READABLE = ("mirrorfs-1", FORMAT_NAME, CHUNKED_NAME)
log = logging.getLogger("mirrorfs-server")


class StoreError(MirrorfsError):
    """A store that cannot be used as asked; the message is shown to the user."""


class Superblock(msgspec.Struct):
    """What a data directory belongs to: written at format, checked at every start."""

    format: str
    volume: str
    server: int
    count: int
    block_size: int
    ident: str = ""  # this directory's own identity (new at every format)
    chunk: int = WHOLE  # the checksum scheme (wire.checksums), fixed at format


def format_name(chunk: int) -> str:
    return CHUNKED_NAME if chunk else FORMAT_NAME


def new_ident() -> str:
    return uuid.uuid4().hex


def read_superblock(path: Path) -> Superblock | None:
    """The superblock of data directory ``path`` (None: it has none), upgraded in place
    when an older version wrote it; StoreError when it is not one this server reads."""
    sb_path = path / "superblock.json"
    if not sb_path.exists():
        return None
    try:
        raw = msgspec.json.decode(sb_path.read_bytes())
    except (OSError, msgspec.DecodeError) as exc:
        raise StoreError(f"superblock {sb_path} is unreadable: {exc}") from None
    found = raw.get("format") if isinstance(raw, dict) else None
    if not isinstance(found, str) or not found.startswith("mirrorfs-"):
        raise StoreError(f"{path} is not a mirrorfs data directory")
    if found not in READABLE:
        raise StoreError(
            f"{path} holds data of another mirrorfs version ({found}; this server "
            f"reads {', '.join(READABLE)}): give it an empty directory and rebuild it"
        )
    try:
        sb = msgspec.convert(raw, Superblock)
    except msgspec.ValidationError as exc:
        raise StoreError(f"superblock {sb_path} is damaged: {exc}") from None
    if (found == CHUNKED_NAME) != bool(sb.chunk) or not valid_chunk(sb.chunk, sb.block_size):
        raise StoreError(f"superblock {sb_path} is damaged: chunk {sb.chunk} in {found}")
    if sb.format != format_name(sb.chunk) or not sb.ident:  # the client reads old metadata
        sb.format = format_name(sb.chunk)
        sb.ident = sb.ident or new_ident()
        atomic_write(sb_path, msgspec.json.encode(sb))
        log.info("data directory %s upgraded from %s to %s", path, found, sb.format)
    return sb
