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
"""

from __future__ import annotations

import numpy as np

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
