"""Sizes as people read them: one spelling everywhere a message or summary gives one."""

from __future__ import annotations


def size_text(n: float) -> str:
    """``"2.0 GiB"``, ``"512.0 KiB"``; under 1 KiB ``"100 bytes"`` (binary units)."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} bytes"


def sizes_text(a: int, b: int) -> tuple[str, str]:
    """Both sizes as text, in bytes where one decimal would show them equal (a need
    beside the room it does not fit in)."""
    texts = size_text(a), size_text(b)
    return texts if texts[0] != texts[1] else (f"{a} bytes", f"{b} bytes")
