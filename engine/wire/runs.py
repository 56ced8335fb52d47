"""The page-run table of a RAM_PAGES header: the one codec of it, with no I/O.

A run table is ``n_runs`` runs of 8 bytes each, big-endian (docs/wire-format.md
§2.1)::

    first_page u32 | n_pages u16 | flags u16 (RunFlags)

Encoders and decoders work on *columns*: the first pages, the page counts and
the flags of all runs as three equally long sequences (the packet codec checks
them column-wise with builtins, the RAM payload turns them into numpy arrays in
one step each).  Whether a table is valid for a block is the packet codec's to
say (:func:`engine.wire.packet.decode_ram_pages`); this module only moves the
bytes.  Standard library only.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from functools import lru_cache
from itertools import repeat
from typing import Final, NamedTuple, TypeAlias

from engine.errors import LocalProtocolError

Buffer: TypeAlias = bytes | bytearray | memoryview

#  0 first_page u32 | 4 n_pages u16 | 6 flags u16 (RunFlags)
RUN: Final = struct.Struct(">IHH")
RUN_SIZE: Final = RUN.size

#: The three columns of a run table: first pages, page counts, flags.
Columns: TypeAlias = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


class RunFlags(enum.IntFlag):
    ZERO = 1  # the run's pages are all zero and carry no payload


_ZERO: Final = int(RunFlags.ZERO)


class PageRun(NamedTuple):
    """``n_pages`` pages of a block from ``first_page``; ``zero``: all zero, no payload."""

    first_page: int
    n_pages: int
    zero: bool


@lru_cache(maxsize=64)
def _table(n_runs: int) -> struct.Struct:
    """The layout of a whole table of ``n_runs`` runs: one unpack call for all of it."""
    return struct.Struct(">" + "IHH" * n_runs)


def encode_runs(firsts: Iterable[int], counts: Iterable[int], flags: Iterable[int]) -> bytes:
    """The run table of the columns (equally long).  Raises struct.error for a field
    out of range (the packet encoder turns it into LocalProtocolError)."""
    return b"".join(map(RUN.pack, firsts, counts, flags))


def decode_runs(data: Buffer) -> Columns:
    """The columns of a run table of one run or more (``len(data)`` a multiple of 8).

    Raises LocalProtocolError for a length that is not: the packet codec checks
    ``header_length`` before it gets here, so this is a caller's mistake.
    """
    n_runs, rest = divmod(len(data), RUN_SIZE)
    if rest or not n_runs:
        raise LocalProtocolError(f"a run table of {len(data)} bytes is not 8 × n_runs, n_runs ≥ 1")
    flat = _table(n_runs).unpack(data)
    return flat[0::3], flat[1::3], flat[2::3]


def page_runs(columns: Columns) -> tuple[PageRun, ...]:
    """The columns as PageRun records (``zero`` from the ZERO flag)."""
    firsts, counts, flags = columns
    zeros = map(bool, map(_ZERO.__and__, flags))  # int ops: IntFlag's & is ~50× slower
    # tuple.__new__ builds the PageRuns without the Python-level NamedTuple __new__.
    return tuple(map(tuple.__new__, repeat(PageRun), zip(firsts, counts, zeros)))


def run_columns(runs: Iterable[tuple[int, int, bool]]) -> Columns:
    """Records (or any ``(first_page, n_pages, zero)`` triples) back to columns."""
    firsts, counts, zeros = zip(*runs)
    return firsts, counts, tuple(map(int, map(bool, zeros)))
