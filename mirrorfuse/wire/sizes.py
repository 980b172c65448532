"""Sizes as users write them (128K, 1M) and as they read them (1.0 MiB)."""

from __future__ import annotations

from mirrorfuse.wire.errors import UsageError

MIN_BLOCK = 4 << 10
MAX_BLOCK = 4 << 20


def parse_size(text: str) -> int:
    """'128K', '1M', '4096' -> bytes (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        return int(num) * units[unit]
    except ValueError:
        raise UsageError(f"{text!r} is not a size (examples: 4096, 128K, 1M)") from None


def check_block_size(size: int) -> int:
    if not MIN_BLOCK <= size <= MAX_BLOCK or size & (size - 1):
        raise UsageError(
            f"block size {size} must be a power of two from 4K to 4M (4096 to 4194304 bytes)"
        )
    return size


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
