"""Memory verification and dumps: prove the destination equals the source.

Both sides hash guest RAM in fixed pieces (XXH3-128 of each ``chunk`` bytes of
each block, blocks in order): a check against transfer bugs, not an attacker, so
a fast non-cryptographic hash (~10 GB/s a core, SHA-256 ~1.5 GB/s) keeps it cheap
enough to leave on, although the guest stays paused while both sides hash.  The
pieces are hashed in parallel on a thread pool (xxhash releases the GIL on large
buffers), and a mismatch names the block and byte range that differ, not just
"different".
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import xxhash

from engine.pool import WorkerPool
from engine.shm import GuestRAM

DIGEST_CHUNK = 64 << 20
_HASH_STEP = 4 << 20


def _hash(view: memoryview) -> bytes:
    digest = xxhash.xxh3_128()
    for start in range(0, len(view), _HASH_STEP):
        digest.update(view[start:start + _HASH_STEP])
    view.release()
    return digest.digest()


def _pieces(ram: GuestRAM, chunk: int) -> list[tuple[int, int, int]]:
    """(block index, start, end) of every hashed piece, in order."""
    return [
        (block.index, start, min(start + chunk, block.size))
        for block in ram.blocks
        for start in range(0, block.size, chunk)
    ]


def ram_digests(ram: GuestRAM, chunk: int = DIGEST_CHUNK) -> list[bytes]:
    """XXH3-128 of every `chunk`-sized piece of every block, in block order."""
    pieces = _pieces(ram, chunk)
    workers = min(len(pieces), os.cpu_count() or 1)
    with WorkerPool("thread", max(1, workers), name="mfd-hash") as pool:
        futures = [
            pool.submit(_hash, ram.blocks[index].pages[start:end]) for index, start, end in pieces
        ]
        return [future.result() for future in futures]


def compare_digests(
    ram: GuestRAM, chunk: int, ours: Sequence[bytes], theirs: Sequence[bytes]
) -> str:
    """'' if equal, else a sentence naming where the memories differ."""
    pieces = _pieces(ram, chunk)
    if len(theirs) != len(pieces):
        return f"expected {len(pieces)} digests, got {len(theirs)}"
    differing = [p for p, a, b in zip(pieces, ours, theirs) if a != b]
    if not differing:
        return ""
    shown = ", ".join(
        f"{ram.blocks[index].name}[{start:#x}:{end:#x}]" for index, start, end in differing[:4]
    )
    more = f" and {len(differing) - 4} more" if len(differing) > 4 else ""
    return f"memory differs in {len(differing)} of {len(pieces)} pieces: {shown}{more}"


def dump_ram(ram: GuestRAM, path: str) -> int:
    """Write every block, in order, to a raw file at `path` (its directory is
    created if needed).  Returns bytes written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    written = 0
    with open(path, "wb") as out:
        for block in ram.blocks:
            out.write(block.pages)
            written += block.size
    return written
