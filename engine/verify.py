"""Memory verification and dumps: prove the destination equals the source.

Both sides hash guest RAM in fixed pieces (XXH3-128 of each ``chunk`` bytes of
each block, blocks in order): a check against transfer bugs, not an attacker, so
a fast non-cryptographic hash (~10 GB/s a core, SHA-256 ~1.5 GB/s) keeps it cheap
enough to leave on, although the guest stays paused while both sides hash.  The
pieces are hashed in parallel on a thread pool (xxhash releases the GIL on large
buffers), and a mismatch names the block and byte range that differ, not just
"different".

Tracked verification (a migration with ``verify`` on, CONFIG flag PAGE_SUMS)
takes the hashing out of the downtime.  Guest RAM is cut into *pieces* of
:func:`tracked_piece_pages` pages; each side keeps one XXH3-128 per piece in a
shared *digest map* (:class:`PieceDigests`), written by the channel processes
while the pages move::

    source channel       right before each ~1 MiB part of a RAM packet is sent: its pieces, from RAM
    destination channel  right after each part landed and its zero runs are placed: the same
    at COMPLETE (every channel ended): the maps are the DIGESTS, compared whole (a
                         mismatch is named piece by piece)

The source's RAM client puts the pages of one piece that go in one round into
one packet, and rounds are fenced by the sync barrier, so one channel at a time
hashes a piece, in round order, after every page of it that moved in that round
landed.  A page the guest writes again is dirty again, sent again, and its piece
hashed again; the final round runs with the guest paused, so each piece's last
digest is of the memory the destination runs with.  Both sides hash guest RAM,
not the wire: a page damaged on its way lands in the destination's RAM and is
hashed there.
"""

from __future__ import annotations

import contextlib
import errno
import os

import numpy as np
import xxhash

from engine.config import check_argument
from engine.errors import ConfigError, VerificationError
from engine.pages import n_regions
from engine.pool import WorkerPool
from engine.shm import PAGE_SIZE, GuestRAM, Segment
from engine.wire.message import MAX_DIGESTS_BYTES as wire_max_digests_bytes
from engine.wire.message import RAM_DIGEST_SIZE

DIGEST_CHUNK = 64 << 20
# Tracked verification: pieces of 16 to 64 pages (64-256 KiB), the smallest whose
# digest map fits one DIGESTS.  A late round's scattered page costs its whole
# piece's hash, inside the downtime (demo, 256 MiB, ~1000 pages in the last round:
# ~40 ms of downtime at 64 pages, ~20 at 16); a smaller piece costs a hash call
# more per 64 KiB in the bulk (16 pages: ~6 ms more per GiB and side).
TRACKED_PIECE_PAGES = 64
MIN_TRACKED_PIECE_PAGES = 16
# DIGESTS' digests, at most: a migration whose digest map is larger is verified
# after the pause (docs/wire-format.md §3.3).  1M digests: 256 GiB of RAM at the
# default packets, 4 GiB at packet_pages=1.  Read at the call, so a test can lower it.
MAX_DIGESTS_BYTES = wire_max_digests_bytes
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


def ram_digests(ram: GuestRAM, chunk: int = DIGEST_CHUNK) -> bytes:
    """XXH3-128 of every `chunk`-sized piece of every block, in block order, joined."""
    pieces = _pieces(ram, chunk)
    workers = min(len(pieces), os.cpu_count() or 1)
    with WorkerPool("thread", max(1, workers), name="mfd-hash") as pool:
        futures = [
            pool.submit(_hash, ram.blocks[index].pages[start:end]) for index, start, end in pieces
        ]
        return b"".join(future.result() for future in futures)


def compare_digests(ram: GuestRAM, chunk: int, ours: bytes, theirs: bytes) -> str:
    """'' if equal, else a sentence naming where the memories differ.  `ours` and
    `theirs`: the digests of every piece, joined (DIGESTS' body)."""
    if ours == theirs:
        return ""  # the usual answer: one compare, no record per piece (it is downtime)
    pieces = _pieces(ram, chunk)
    if len(theirs) != len(pieces) * RAM_DIGEST_SIZE:
        return f"expected {len(pieces)} digests, got {len(theirs) // RAM_DIGEST_SIZE}"
    size = RAM_DIGEST_SIZE
    differing = [p for i, p in enumerate(pieces)
                 if ours[i * size:(i + 1) * size] != theirs[i * size:(i + 1) * size]]
    if not differing:
        return ""
    shown = ", ".join(
        f"{ram.blocks[index].name}[{start:#x}:{end:#x}]" for index, start, end in differing[:4]
    )
    more = f" and {len(differing) - 4} more" if len(differing) > 4 else ""
    return f"memory differs in {len(differing)} of {len(pieces)} pieces: {shown}{more}"


def tracked_piece_pages(packet_pages: int, ram: GuestRAM) -> int:
    """Pages per piece of tracked verification for a migration of `ram` in
    `packet_pages`-page packets (CONFIG's): a power of two, the smallest from
    MIN_TRACKED_PIECE_PAGES whose digest map fits one DIGESTS, at most
    TRACKED_PIECE_PAGES and at most a packet.  Both sides derive it from CONFIG
    (its blocks and packet_pages)."""
    largest = 1 << (min(TRACKED_PIECE_PAGES, packet_pages).bit_length() - 1)
    pages = min(MIN_TRACKED_PIECE_PAGES, largest)
    while pages < largest and not tracked_fits(ram, pages):
        pages *= 2
    return pages


def n_pieces(ram: GuestRAM, piece_pages: int) -> int:
    """Pieces of `piece_pages` pages of all blocks (a block's last one may be shorter)."""
    return sum(n_regions(block.n_pages, piece_pages) for block in ram.blocks)


def tracked_fits(ram: GuestRAM, piece_pages: int) -> bool:
    """Whether a digest map of `ram` in pieces of `piece_pages` fits one DIGESTS
    (MAX_DIGESTS_BYTES): else the migration verifies after the pause."""
    return n_pieces(ram, piece_pages) * RAM_DIGEST_SIZE <= MAX_DIGESTS_BYTES


class PieceDigests:
    """The digest map of tracked verification: an XXH3-128 per piece of every block,
    blocks in order, in a segment this process owns; channel processes attach it by
    ``name`` and write it (a ``RegionMap`` of engine/pages.py, in clients/ram_payload.py)."""

    def __init__(self, ram: GuestRAM, piece_pages: int) -> None:
        self.piece_pages = piece_pages
        self.n_pieces = n_pieces(ram, piece_pages)
        self._segment: Segment | None = Segment.create(
            self.n_pieces * RAM_DIGEST_SIZE, what="the digest map of verification")
        self.name = self._segment.name

    @property
    def chunk(self) -> int:
        """Bytes per piece: DIGESTS' ``digest_chunk``."""
        return self.piece_pages * PAGE_SIZE

    def digests(self) -> bytes:
        """Every piece's digest, in order, joined (DIGESTS' body).  Call once every
        channel has ended.  The map starts as zeros and no XXH3-128 of real data is
        all zero: an entry still zero is a piece no channel hashed, which would pass
        on both sides unchecked, so it raises VerificationError."""
        assert self._segment is not None
        data = bytes(self._segment.buf[:self.n_pieces * RAM_DIGEST_SIZE])
        halves = np.frombuffer(data, dtype=np.uint64).reshape(self.n_pieces, 2)
        unhashed = np.flatnonzero((halves[:, 0] == 0) & (halves[:, 1] == 0))
        if unhashed.size:
            more = f" and {unhashed.size - 1} more" if unhashed.size > 1 else ""
            raise VerificationError(f"piece {int(unhashed[0])}{more} of the digest map never "
                                    f"hashed: tracked verification missed its pages")
        return data

    def close(self) -> None:
        """Unmap and unlink (after the channels that write it have stopped); idempotent."""
        segment, self._segment = self._segment, None
        if segment is not None:
            segment.close()
            segment.unlink()


def verification_extra(verified: bool, tracked: bool) -> dict[str, str]:
    """A result's word on how the memories were compared, if they were (both sides
    say it alike): "tracked", pieces hashed as they moved and only the digests
    compared in the downtime; "after pause", both memories hashed whole in it."""
    return {"verification": "tracked" if tracked else "after pause"} if verified else {}


def check_dump_dir(path: str | None) -> None:
    """Create the dump directory `path` now (None: no dumps): a bad one is a
    ConfigError before the operation, not a failure at its switchover."""
    if path is None:
        return
    check_argument("dump_dir", path, isinstance(path, (str, os.PathLike)), "a directory path or None")
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "Permission denied")
    except OSError as exc:
        raise ConfigError(f"dump directory {path!r}: {exc.strerror or exc}") from None


def dump_ram(ram: GuestRAM, path: str) -> int:
    """Write every block, in order, to a raw file at `path` (its directory is
    created if needed).  Returns bytes written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    written = 0
    # Guest memory: readable by its owner only, as the RAM and a snapshot are; a new
    # file (an old one's open readers, or a symlink planted there, get nothing).
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as out:
        for block in ram.blocks:
            out.write(block.pages)
            written += block.size
    return written
