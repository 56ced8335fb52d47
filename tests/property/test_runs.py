"""Property tests of page runs: the one run-table codec (engine/wire/runs.py), the
one pages ↔ runs conversion (engine/pages.py), and zero-page detection that
splits runs by content (clients/ram_payload.py), each against a plain reference.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.ram_payload import _one_run_parts, _piece_parts, _runs_parts, gather_scratch, zero_runs
from engine.errors import LocalProtocolError
from engine.pages import cut_runs, pages_to_runs, runs_to_pages, split_runs
from engine.wire import runs as wire_runs

FAST = settings(max_examples=200, deadline=None)

columns = st.integers(1, 60).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 0xFFFF_FFFF), min_size=n, max_size=n),
    st.lists(st.integers(0, 0xFFFF), min_size=n, max_size=n),
    st.lists(st.integers(0, 0xFFFF), min_size=n, max_size=n),
))
page_sets = st.sets(st.integers(0, 5000), max_size=400).map(
    lambda pages: np.array(sorted(pages), dtype=np.int64))


# ── the wire codec ────────────────────────────────────────────────────────────


@FAST
@given(columns)
def test_run_table_round_trip(cols: tuple[list[int], list[int], list[int]]) -> None:
    table = wire_runs.encode_runs(*cols)
    assert table == b"".join(struct.pack(">IHH", *run) for run in zip(*cols))  # the layout
    assert wire_runs.decode_runs(table) == tuple(map(tuple, cols))
    assert wire_runs.decode_runs(memoryview(table)) == tuple(map(tuple, cols))


@FAST
@given(st.binary(max_size=100))
def test_run_table_of_any_length_decodes_or_is_refused(data: bytes) -> None:
    if len(data) % 8 or not data:
        with pytest.raises(LocalProtocolError):
            wire_runs.decode_runs(data)
    else:
        decoded = wire_runs.decode_runs(data)
        assert list(zip(*decoded)) == list(struct.iter_unpack(">IHH", data))


@FAST
@given(columns)
def test_records_and_columns_agree(cols: tuple[list[int], list[int], list[int]]) -> None:
    firsts, counts, flags = cols
    flags = [flag & wire_runs.RunFlags.ZERO for flag in flags]
    records = wire_runs.page_runs((tuple(firsts), tuple(counts), tuple(flags)))
    assert records == tuple(wire_runs.PageRun(f, c, bool(z)) for f, c, z in zip(firsts, counts, flags))
    assert wire_runs.run_columns(records) == (tuple(firsts), tuple(counts), tuple(flags))


# ── pages ↔ runs ──────────────────────────────────────────────────────────────


@FAST
@given(page_sets, st.sampled_from([1, 3, 64, 256]))
def test_runs_cut_at_region_boundaries_keep_every_page(pages: np.ndarray, region: int) -> None:
    """cut_runs (RegionMap's regions, a file channel's pieces): the same pages, in
    order, each piece inside one region, each naming the run it came from."""
    firsts, counts = pages_to_runs(pages)
    starts, lengths, source = cut_runs(firsts, counts, region)
    assert np.array_equal(runs_to_pages(starts, lengths), pages)
    assert np.array_equal(starts // region, (starts + lengths - 1) // region)
    assert np.all((starts >= firsts[source]) & (starts + lengths <= (firsts + counts)[source]))


@FAST
@given(page_sets, st.integers(1, 6), st.sampled_from([1, 4, 64]), st.sampled_from([1, 100, 256]))
def test_piece_parts_hold_every_page_and_each_piece_once(pages: np.ndarray, seed: int, piece: int,
                                                         group: int) -> None:
    """Tracked verification's parts: every page once, in order, zero flags kept; a
    part ends at a piece boundary (each piece in one part, so it is hashed once,
    after all its pages), once it holds `group` pages."""
    zero = np.random.default_rng(seed).random(pages.size) < 0.5
    firsts, counts, zeros = split_runs(pages, zero)
    parts = _piece_parts(firsts, counts, zeros, piece, group)
    if not pages.size:
        assert parts == []
        return
    assert np.array_equal(np.concatenate([runs_to_pages(f, c) for (f, c, _), _ in parts]), pages)
    assert np.array_equal(np.concatenate([np.repeat(z, c) for (_, c, z), _ in parts]), zero)
    pieces = [p for _, ps in parts for p in ps]
    assert pieces == sorted(set(pieces)) == sorted(set((pages // piece).tolist()))
    assert all(int(c.sum()) >= group for (_, c, _), _ in parts[:-1])


@FAST
@given(st.integers(0, 5000), st.integers(1, 3000), st.booleans(), st.sampled_from([1, 4, 64]),
       st.sampled_from([1, 100, 256]))
def test_one_run_parts_are_the_general_parts(first: int, count: int, zero: bool, piece: int,
                                             group: int) -> None:
    """A packet of one run (RAM without zero pages) takes the arithmetic path: the
    same parts, pages and pieces as the array path over the same run."""
    one = _one_run_parts(first, count, zero, piece, group)
    general = _runs_parts(np.array([first]), np.array([count]), np.array([zero]), piece, group)
    assert len(one) == len(general)
    for ((f1, c1, z1), p1), ((f2, c2, z2), p2) in zip(one, general):
        assert np.array_equal(runs_to_pages(f1, c1), runs_to_pages(f2, c2))
        assert set(z1.tolist()) == set(z2.tolist()) == {zero}
        assert list(p1) == list(p2)


@FAST
@given(page_sets)
def test_pages_to_runs_and_back(pages: np.ndarray) -> None:
    firsts, counts = pages_to_runs(pages)
    assert (counts >= 1).all()
    # maximal runs: each ends at least one page before the next starts
    assert (firsts[1:] > firsts[:-1] + counts[:-1]).all()
    assert runs_to_pages(firsts, counts).tolist() == pages.tolist()


@FAST
@given(page_sets, st.data())
def test_split_runs_keeps_pages_and_values(pages: np.ndarray, data: st.DataObject) -> None:
    values = np.array(data.draw(st.lists(st.booleans(), min_size=pages.size, max_size=pages.size)),
                      dtype=bool)
    firsts, counts, run_values = split_runs(pages, values)
    assert runs_to_pages(firsts, counts).tolist() == pages.tolist()
    assert np.repeat(run_values, counts).tolist() == values.tolist()
    # a run ends only where pages stop being consecutive or the value changes
    ends = firsts[:-1] + counts[:-1]
    assert ((firsts[1:] != ends) | (run_values[1:] != run_values[:-1])).all()


@FAST
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(1, 20)), max_size=50))
def test_runs_to_pages_matches_a_reference(gaps_and_counts: list[tuple[int, int]]) -> None:
    firsts, counts, at = [], [], 0
    for gap, count in gaps_and_counts:
        firsts.append(at + gap)
        counts.append(count)
        at += gap + count
    expected = [page for first, count in zip(firsts, counts) for page in range(first, first + count)]
    assert runs_to_pages(np.array(firsts, dtype=np.uint32),
                         np.array(counts, dtype=np.uint32)).tolist() == expected


# ── zero-page detection ───────────────────────────────────────────────────────


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 700), st.integers(0, 2**32 - 1), st.floats(0.0, 1.0), st.floats(0.05, 1.0))
def test_zero_runs_match_a_page_by_page_reference(n_pages: int, seed: int, zero_share: float,
                                                  density: float) -> None:
    """Few runs (tested in place) and many (gathered 1 MiB at a time: more than
    256 pages crosses a gather chunk), against the content of each page; pages
    whose first and last words are zero but not the rest among them."""
    rng = np.random.default_rng(seed)
    words = np.repeat(rng.integers(1, 2**63, size=(n_pages, 1), dtype=np.uint64), 512, axis=1)
    words[rng.random(n_pages) < zero_share] = 0
    words[rng.integers(0, n_pages, size=n_pages // 7 + 1), rng.integers(0, 512)] = 0  # partly zero rows
    ends_zero = rng.integers(0, n_pages, size=int(rng.integers(0, n_pages // 5 + 2)))  # data between the ends
    words[ends_zero, 0] = words[ends_zero, -1] = 0
    pages = np.flatnonzero(rng.random(n_pages) < density)
    if pages.size == 0:
        pages = np.array([0])
    firsts, counts = pages_to_runs(pages)
    items = np.stack([firsts, counts], axis=1).astype(np.uint32)
    got = zero_runs(words, items)
    expected: list[tuple[int, int, bool]] = []
    for page in pages.tolist():
        zero = not words[page].any()
        last = expected[-1] if expected else None
        if last is not None and last[0] + last[1] == page and last[2] == zero:
            expected[-1] = (last[0], last[1] + 1, zero)
        else:
            expected.append((page, 1, zero))
    assert got == expected


def test_gather_scratch_is_one_mib() -> None:
    assert gather_scratch().nbytes == 1 << 20
