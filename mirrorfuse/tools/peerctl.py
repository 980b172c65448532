"""share / unshare: ask a mirrorfs-peer of this machine over its control socket.

The socket (mode 0600, in the peer's state directory) is found through the
record the peer leaves there; the peer takes requests from its own user or
root only, and opens the file itself.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from mirrorfuse.wire.errors import MirrorfsError, UsageError
from mirrorfuse.wire.frames import FrameDecoder, ProtocolError
from mirrorfuse.wire.messages import (
    BadMessage,
    Outcome,
    PeerShare,
    PeerUnshare,
    decode,
    decode_error,
    encode_request,
)


def control_path(record: dict[str, Any]) -> Path:
    path = record.get("control")
    if not path:
        raise UsageError(
            f"the peer {record.get('id')} at {record.get('addr')} has no control socket "
            "(an older mirrorfs-peer?): restart it"
        )
    return Path(path)


async def ask_control(path: Path, req: PeerShare | PeerUnshare, timeout: float) -> Outcome:
    """One request over the control socket; a refusal comes back as a failed Outcome."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
    except PermissionError:
        raise UsageError(
            f"{path} is not yours: only the peer's own user (or root) may ask it to "
            "share or unshare"
        ) from None
    except (FileNotFoundError, ConnectionRefusedError):
        raise MirrorfsError(f"no mirrorfs-peer listens on {path} (stopped?)") from None
    except (OSError, TimeoutError) as exc:
        raise MirrorfsError(f"cannot reach the peer at {path}: {exc}") from None
    try:
        writer.writelines(encode_request(1, req))
        decoder = FrameDecoder()
        while (frame := decoder.next_frame()) is None:
            data = await asyncio.wait_for(reader.read(1 << 16), timeout)
            if not data:
                raise MirrorfsError(f"the peer at {path} closed the connection")
            decoder.feed(data)
        if frame.is_error:
            return Outcome(ok=False, error=decode_error(frame.body).msg)
        return decode(Outcome, frame.body)
    except TimeoutError:
        raise MirrorfsError(f"the peer at {path} did not answer within {timeout:g}s") from None
    except (ProtocolError, BadMessage) as exc:
        raise MirrorfsError(f"the peer at {path} answered something else: {exc}") from None
    except OSError as exc:
        raise MirrorfsError(f"the peer at {path}: {exc}") from None
    finally:
        writer.close()
