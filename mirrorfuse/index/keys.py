"""The index group's key: where every replica, peer and ``mirrorfs-cli index`` finds it.

A group has one key: 32 random bytes, one line of hex in a file of mode 0600
(``wire.auth``). Every datagram of the group is sealed with it, and the
replicas' TCP port for snapshots asks for it. The default file is
``index.key`` in the key directory, where the volumes' keys are too:
``$MIRRORFS_KEYS``, else ``$XDG_CONFIG_HOME/mirrorfs/keys``, else
``~/.config/mirrorfs/keys``. ``--key-file`` names another file.
``mirrorfs-index`` creates the file when it is missing; everything else
only reads it.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from mirrorfuse.wire.auth import KeyFileError, new_key, parse_key
from servers.files import atomic_write

KEY_FILE = "index.key"

log = logging.getLogger("mirrorfs-index")


def default_key_path() -> Path:
    if os.environ.get("MIRRORFS_KEYS"):
        return Path(os.environ["MIRRORFS_KEYS"]) / KEY_FILE
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "mirrorfs" / "keys" / KEY_FILE


def group_key(path: Path | str | None = None) -> bytes:
    """The group's key from ``path`` (None: the default file); KeyFileError says what to do."""
    where = Path(path) if path else default_key_path()
    try:
        with open(where, "rb") as f:
            text = f.read(4096)
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
    except FileNotFoundError:
        raise KeyFileError(
            f"no index group key in {where}: copy the key file of the machine where the "
            "first mirrorfs-index started (it said where) to this path, mode 0600, "
            "or name it with --key-file"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read the key file {where}: {exc.strerror}") from None
    key = parse_key(text, f"key file {where}")
    if mode & 0o077:
        log.warning("the key file %s can be read by others (mode %04o): chmod 600 it", where, mode)
    return key


def create_group_key(path: Path | str | None = None) -> tuple[Path, bytes, bool]:
    """The group's key, made and saved first if the file does not exist yet.

    Returns the file, the key, and whether it was made now. Two replicas that
    start at once both end up with the one key that was saved first.
    """
    where = Path(path) if path else default_key_path()
    if where.exists():
        return where, group_key(where), False
    tmp = where.with_name(f".{where.name}.{os.getpid()}.new")
    try:
        where.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(tmp, new_key().hex().encode() + b"\n", mode=0o600)  # durable
        try:
            os.link(tmp, where)  # never over a key another process saved meanwhile
            made = True
        except FileExistsError:
            made = False
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(where.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise KeyFileError(f"cannot create the key file {where}: {exc.strerror}") from None
    return where, group_key(where), made
