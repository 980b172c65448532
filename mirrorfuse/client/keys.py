"""Where a client finds the key of a volume: one file per volume in a key directory.

``mirrorfs-cli format`` writes the new volume's key there (and every server
keeps a copy in its data directory); any command on any machine that holds
that file can then use the volume. ``--key-file`` names one file instead.
The directory is ``$MIRRORFS_KEYS``, else ``$XDG_CONFIG_HOME/mirrorfs/keys``,
else ``~/.config/mirrorfs/keys``.
"""

from __future__ import annotations

import functools
import os
import re
import ssl
from collections.abc import Callable
from pathlib import Path

from mirrorfuse.wire.addresses import ClusterSpec
from mirrorfuse.wire.auth import KEY_NAME, KeyFileError, new_key
from servers.files import read_key, write_key

from .connection import Connection

VOLUME_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def keys_dir() -> Path:
    if os.environ.get("MIRRORFS_KEYS"):
        return Path(os.environ["MIRRORFS_KEYS"])
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "mirrorfs" / "keys"


class Keyring:
    """The keys this client can prove: ``key_file`` for any volume, else the directory's."""

    def __init__(self, key_file: str | Path | None = None) -> None:
        self.key_file = Path(key_file) if key_file else None
        self._cache: dict[str | None, bytes] = {}

    def path_for(self, volume: str) -> Path:
        if self.key_file is not None:
            return self.key_file
        if not VOLUME_ID.fullmatch(volume):  # it came from the network: no paths in it
            raise KeyFileError(f"{volume!r} is not a volume id")
        return keys_dir() / f"{volume}.key"

    def __call__(self, volume: str | None) -> bytes:
        if self.key_file is None and volume is None:
            raise KeyFileError("the server names no volume, so no key can be chosen for it")
        if volume in self._cache:
            return self._cache[volume]
        path = self.path_for(volume or "")
        if self.key_file is None and not path.exists():
            raise KeyFileError(
                f"has volume {volume}, and there is no key for it here: copy {KEY_NAME} from "
                f"a server's data directory to {path}, or name one with --key-file"
            )
        key = read_key(path)
        self._cache[volume] = key
        return key

    def create(self, volume: str) -> bytes:
        """The key of a new volume: the --key-file's if it exists, else a new one, saved."""
        path = self.path_for(volume)
        if self.key_file is not None and path.exists():
            key = read_key(path)
        else:
            key = new_key()
            write_key(path, key)
        self._cache[volume] = key
        return key


@functools.cache
def client_tls() -> ssl.SSLContext:
    """TLS for privacy only: who the server is, the key handshake proves (bound to the
    certificate it showed), so no certificate authority is needed. One for the process:
    every connection shares it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def open_server(
    spec: ClusterSpec,
    server: int,
    timeout: float,
    on_gen: Callable[[int, int], None] | None = None,
    keys: Keyring | None = None,
) -> Connection:
    """A connection to one server of ``spec``, the key proven both ways."""
    return await Connection.open(
        server,
        spec.addresses[server],
        timeout,
        on_gen,
        keys=keys or Keyring(spec.key_file),
        tls=client_tls() if spec.tls else None,
    )
