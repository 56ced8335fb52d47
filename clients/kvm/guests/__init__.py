"""The project's guest programs (source ``NAME.S``, bytes ``NAME.bin``) and their oracle.

Both programs write :data:`BOOT_CHAR` to COM1 once, then loop forever
incrementing the first byte of every 4 KiB page in ``[start, end)``, lowest
page first, writing :data:`PROGRESS_CHAR` after each pass:

* ``boot``   — a 512-byte PC boot sector: real mode at 0x7c00 → protected mode
  (emulated instruction by instruction on a software KVM backend);
* ``user64`` — the same loop as 64-bit CPL3 code, entered directly by the VMM
  (native speed there).

``start`` and ``end`` are u32 guest-physical addresses at :data:`RANGE_OFFSET`
of the image (:func:`with_range` patches them).  :func:`check_invariant` is the
loop's oracle, the one QEMU's migration tests use.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from engine.errors import ConfigError
from engine.shm import PAGE_SIZE, GuestRAM

__all__ = ["BOOT_CHAR", "PROGRAMS", "PROGRESS_CHAR", "RANGE_OFFSET", "check_invariant",
           "first_bytes", "image", "range_of", "with_range"]

PROGRAMS = ("boot", "user64")
BOOT_CHAR = "A"
PROGRESS_CHAR = "B"
RANGE_OFFSET = 0x1F0
_RANGE = struct.Struct("<II")
_HERE = Path(__file__).parent


def image(name: str) -> bytes:
    """The committed bytes of program `name` (512 of them).  ConfigError for another name."""
    if name not in PROGRAMS:
        raise ConfigError(f"unknown guest program {name!r}; choose one of {', '.join(PROGRAMS)}")
    return (_HERE / f"{name}.bin").read_bytes()


def with_range(data: bytes, start: int, end: int) -> bytes:
    """`data` (one of our images) with its loop range set to ``[start, end)``.
    ConfigError unless both are page-aligned, start <= end < 4 GiB."""
    if start % PAGE_SIZE or end % PAGE_SIZE or not 0 <= start <= end < 1 << 32:
        raise ConfigError(f"loop range [{start:#x}, {end:#x}) must be page-aligned, "
                          "ordered and below 4 GiB")
    patched = bytearray(data)
    _RANGE.pack_into(patched, RANGE_OFFSET, start, end)
    return bytes(patched)


def range_of(data: bytes) -> tuple[int, int]:
    """The ``(start, end)`` patched into one of our images."""
    start, end = _RANGE.unpack_from(data, RANGE_OFFSET)
    return start, end


def first_bytes(ram: GuestRAM, start: int, end: int) -> np.ndarray:
    """A copy of the first byte of every page in guest-physical ``[start, end)``,
    the RAM's blocks laid out contiguously from address 0.  ConfigError when the
    range is not page-aligned or leaves the RAM."""
    if start % PAGE_SIZE or end % PAGE_SIZE or not 0 <= start <= end <= ram.size:
        raise ConfigError(f"range [{start:#x}, {end:#x}) is not page-aligned inside the RAM")
    parts, base = [], 0
    for block in ram.blocks:
        lo, hi = max(start, base), min(end, base + block.size)
        if lo < hi:
            parts.append(np.frombuffer(block.pages, dtype=np.uint8)[lo - base:hi - base:PAGE_SIZE]
                         .copy())
        base += block.size
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint8)


def check_invariant(ram: GuestRAM, start: int, end: int) -> str:
    """'' if the loop's invariant holds on ``[start, end)``, else what is wrong.

    Walking the pages upwards, each first byte equals the one before it except
    at most one place where it is exactly one less (mod 256): where the pass in
    progress got to.  A stale, lost or foreign page breaks this.  Read it with
    the guest paused (a running guest moves the point while we copy).
    """
    firsts = first_bytes(ram, start, end)
    steps = (firsts[:-1].astype(np.int16) - firsts[1:].astype(np.int16)) % 256
    bad = np.flatnonzero((steps != 0) & (steps != 1))
    drops = np.flatnonzero(steps == 1)
    if bad.size:
        page = int(bad[0]) + 1
        return (f"page at {start + page * PAGE_SIZE:#x} has first byte {int(firsts[page])} after "
                f"{int(firsts[page - 1])}: a stale or lost page ({bad.size} such places)")
    if drops.size > 1:
        where = [hex(start + (int(i) + 1) * PAGE_SIZE) for i in drops[:4]]
        return f"{drops.size} places where a pass stopped (at {where}...), expected at most 1"
    return ""
