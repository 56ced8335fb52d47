"""Pages ↔ page runs, as numpy arrays: the one conversion between them.

A set of pages of a block is a sorted array of unique page indices; the same set
as *runs* is two arrays of equal length, the first page of each run and its page
count.  Runs may also carry a value each (such as "all zero"), in which case a run
is a longest stretch of consecutive pages with the same value::

    pages  [3 4 5 9 10]            ──pages_to_runs──▶  firsts [3 9]  counts [3 2]
    values [1 1 0 0 0]             ──split_runs────▶   firsts [3 5 9] counts [2 1 2]
                                                       values [1 0 0]
    firsts [3 9] counts [3 2]      ──runs_to_pages──▶  [3 4 5 9 10]

The wire form of runs (RAM_PAGES' run table) is :mod:`engine.wire.runs`.

Fixed-size *regions* of a block (:func:`cut_runs`, :class:`RegionMap`): runs cut
at region boundaries, and a word per region in a shared map, hashed from guest
RAM: tracked verification's pieces and a snapshot's chunks are both regions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.shm import PAGE_SIZE

if TYPE_CHECKING:
    from engine.shm import RamBlock

_EMPTY = np.empty(0, dtype=np.int64)


def runs_to_pages(firsts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Every page of the runs (``firsts``, ``counts``: counts ≥ 1), in run order, as int64."""
    counts = np.asarray(counts, dtype=np.int64)
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(int(counts.sum()), dtype=np.int64) - offsets + np.repeat(
        np.asarray(firsts, dtype=np.int64), counts)


def split_runs(pages: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of sorted, unique ``pages`` that are consecutive and share their value in
    ``values`` (one per page): (first pages, counts, each run's value)."""
    if pages.size == 0:
        return _EMPTY, _EMPTY, values[:0]
    breaks = np.flatnonzero((np.diff(pages) != 1) | (values[1:] != values[:-1])) + 1
    bounds = np.concatenate(([0], breaks, [pages.size]))
    starts = bounds[:-1]
    return pages[starts], np.diff(bounds), values[starts]


def pages_to_runs(pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split sorted, unique page indices into runs: (first pages, run lengths)."""
    if pages.size == 0:
        return _EMPTY, _EMPTY
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    bounds = np.concatenate(([0], breaks, [pages.size]))
    return pages[bounds[:-1]], np.diff(bounds)


def cut_runs(firsts: np.ndarray, counts: np.ndarray,
             region_pages: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs cut at every multiple of `region_pages` (a region boundary), so each
    piece lies in one region: (first pages, counts, index of the run each came from)."""
    firsts = np.asarray(firsts, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    if firsts.size == 0:
        return _EMPTY, _EMPTY, _EMPTY
    first_regions = firsts // region_pages
    n_cut = (firsts + counts - 1) // region_pages - first_regions + 1
    source = np.repeat(np.arange(firsts.size, dtype=np.int64), n_cut)
    regions = runs_to_pages(first_regions, n_cut)
    starts = np.maximum(regions * region_pages, firsts[source])
    ends = np.minimum((regions + 1) * region_pages, (firsts + counts)[source])
    return starts, ends - starts, source


class RegionMap:
    """A word per fixed-size *region* of every block (``region_pages`` pages, a
    block's last region possibly shorter), blocks in order, in one shared buffer:
    tracked verification's digest map (a piece: XXH3-128, engine/verify.py) and a
    snapshot's chunk checksum map (a chunk: xxh3-64, engine/wire/snapshot_format.py)
    are both this.  ``buf`` holds ``parts`` such arrays back to back (a snapshot
    restore keeps the chunks' present-page counts after their checksums); this map
    is array ``part``.  ``hash_fn`` turns a region's pages into its word;
    ``on_time(ns)``, when given, is told how long each :meth:`store` took."""

    def __init__(self, blocks: Sequence[RamBlock], region_pages: int, buf: memoryview | None,
                 dtype: str, hash_fn: Callable[[memoryview], Any], part: int = 0,
                 on_time: Callable[[int], None] | None = None) -> None:
        self.blocks = blocks
        self.on_time = on_time
        self.region_pages = region_pages
        self.bases = np.cumsum([0] + [n_regions(b.n_pages, region_pages) for b in blocks]).tolist()
        self.total = self.bases[-1]
        self.hash_fn = hash_fn
        self.words = (np.frombuffer(buf, dtype=dtype, count=self.total,
                                    offset=part * self.total * np.dtype(dtype).itemsize)
                      if buf is not None else np.zeros(self.total, dtype=dtype))

    def of_block(self, block: RamBlock) -> np.ndarray:
        """The block's words (a view: writable where the map is)."""
        return self.words[self.bases[block.index]:self.bases[block.index + 1]]

    def span(self, block: RamBlock, region: int) -> tuple[int, int]:
        """(first page, page count) of the block's `region`-th region."""
        first = region * self.region_pages
        return first, min(self.region_pages, block.n_pages - first)

    def view(self, block: RamBlock, region: int) -> memoryview:
        """The region's pages of guest RAM."""
        return block.page_view(*self.span(block, region))

    def regions_touched(self, firsts: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """The regions that runs of pages touch, ascending."""
        return np.unique(cut_runs(firsts, counts, self.region_pages)[0] // self.region_pages)

    def regions_of_runs(self, firsts: np.ndarray,
                        counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The regions that runs of pages touch, ascending, and how many of their
        pages the runs hold (each page at most once in the runs)."""
        starts, pages, _ = cut_runs(firsts, counts, self.region_pages)
        regions, inverse = np.unique(starts // self.region_pages, return_inverse=True)
        return regions, np.bincount(inverse, weights=pages, minlength=regions.size).astype(np.int64)

    def store(self, block: RamBlock, regions: Sequence[int]) -> None:
        """Hash each of the block's `regions` from guest RAM as it is now, into its word."""
        if self.on_time is None:
            self._store(block, regions)
            return
        start = time.perf_counter_ns()
        self._store(block, regions)
        self.on_time(time.perf_counter_ns() - start)

    def _store(self, block: RamBlock, regions: Sequence[int]) -> None:
        words, hash_fn = self.of_block(block), self.hash_fn
        if isinstance(regions, range) and regions.step == 1 and len(regions) > 1:
            # Consecutive regions: one view, sliced (a block's last region may be shorter).
            first = regions.start * self.region_pages
            whole = block.page_view(first, min(regions.stop * self.region_pages, block.n_pages) - first)
            size = self.region_pages * PAGE_SIZE
            words[regions.start:regions.stop] = [hash_fn(whole[at:at + size])
                                                 for at in range(0, whole.nbytes, size)]
            return
        for region in regions:
            words[region] = hash_fn(self.view(block, region))


def n_regions(n_pages: int, region_pages: int) -> int:
    """Regions of `region_pages` pages in `n_pages` (the last one may be shorter)."""
    return -(-n_pages // region_pages)
