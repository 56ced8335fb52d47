"""The RAM client keeps a piece's pages of one round in one packet (tracked verification).

Tracked verification (engine/verify.py) lets the channel that moves a packet hash
every piece the packet touches; that is right only if no other packet of the same
round carries pages of the same piece.  A recording core stands in for the
multifd sender: it keeps each packet's runs as the channel would read them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import xxhash

from clients.ram import RamClient
from engine.pages import RegionMap
from engine.shm import GuestRAM
from engine.slots import SlotTable

MiB = 1 << 20


class RecordingCore:
    """What RamClient uses of MultifdSender: its slot, send(), the channel count."""

    channels = 2

    def __init__(self, slots: SlotTable) -> None:
        self.slots = slots
        self.packets: list[tuple[int, np.ndarray]] = []  # (block index, runs)

    def client_slot(self, client_id: int) -> object:
        return self.slots[client_id]

    def send(self, client_id: int, payload_bytes: int) -> None:
        slot = self.slots[client_id]
        assert slot.n_items > 0, "an empty packet was sent"
        self.packets.append((slot.a0, slot.used_items().astype(np.int64).copy()))
        slot.n_items = 0


def _pages(runs: np.ndarray) -> np.ndarray:
    return np.concatenate([np.arange(first, first + count) for first, count in runs])


@pytest.mark.parametrize("piece,packet_pages", [(64, 4096), (64, 100), (16, 16), (8, 37), (1, 5)])
def test_one_round_never_splits_a_piece(piece: int, packet_pages: int) -> None:
    rng = np.random.default_rng(piece * 1000 + packet_pages)
    with GuestRAM.create([("a", 4 * MiB), ("b", 2 * MiB)]) as ram:
        slots = SlotTable.create(n_slots=1, max_items=max(packet_pages, piece), payload_capacity=0,
                                 n_channels=1)
        try:
            core = RecordingCore(slots)
            client = RamClient(ram, core, 0, packet_pages, piece_pages=piece)  # type: ignore[arg-type]
            rounds: list[list[tuple[int, np.ndarray]]] = []
            client.queue_all()
            client.flush()
            rounds.append(core.packets)
            for density in (0.5, 0.05, 0.002):  # later rounds: ever fewer, scattered pages
                core.packets = []
                for block in ram.blocks:
                    pages = np.flatnonzero(rng.random(block.n_pages) < density)
                    block.dirty.mark_pages(pages)
                client.queue_dirty()
                client.flush()
                rounds.append(core.packets)
        finally:
            slots.close()
            slots.unlink()
        for number, packets in enumerate(rounds, 1):
            seen: dict[tuple[int, int], int] = {}
            for at, (block_index, runs) in enumerate(packets):
                pages = _pages(runs)
                assert pages.size <= max(packet_pages, piece), f"round {number}: packet too big"
                for index in np.unique(pages // piece).tolist():
                    assert seen.setdefault((block_index, index), at) == at, (
                        f"round {number}: piece {index} of block {block_index} in packets "
                        f"{seen[(block_index, index)]} and {at}")
        everything = {(b, int(p)) for b, runs in rounds[0] for p in _pages(runs)}
        assert len(everything) == ram.n_pages  # round 1: every page, once


@pytest.mark.parametrize("dtype,hash_fn", [("S16", xxhash.xxh3_128_digest),
                                           ("<u8", xxhash.xxh3_64_intdigest)])
def test_a_range_of_regions_hashes_as_region_by_region(dtype: str,
                                                       hash_fn: Callable[[memoryview], Any]) -> None:
    """RegionMap.store of consecutive regions (one view, sliced) gives each region
    the word it gets alone, the block's shorter last region included."""
    with GuestRAM.create({"a": 200 * 4096, "b": 64 * 4096}) as ram:
        rng = np.random.default_rng(3)
        for block in ram.blocks:
            block.array()[:] = rng.integers(0, 256, size=(block.n_pages, 4096), dtype=np.uint8)
        one_by_one = RegionMap(ram.blocks, 64, None, dtype, hash_fn)
        ranged = RegionMap(ram.blocks, 64, None, dtype, hash_fn)
        block = ram.blocks[0]  # 200 pages: regions of 64, 64, 64 and 8
        one_by_one.store(block, [1, 2, 3])
        ranged.store(block, range(1, 4))
        assert np.array_equal(one_by_one.words, ranged.words)
        assert ranged.of_block(block)[3] == hash_fn(block.page_view(192, 8))
        assert ranged.of_block(block)[0] == np.zeros(1, dtype=dtype)[0]  # untouched


def test_a_map_with_on_time_reports_each_stores_hashing_time() -> None:
    """Tracked verification's digest map tells its channel how long it hashed (the
    downtime's share reported as verification), each store once; a map without
    on_time reports nothing."""
    spent: list[int] = []
    with GuestRAM.create({"a": 128 * 4096}) as ram:
        block = ram.blocks[0]
        timed = RegionMap(ram.blocks, 64, None, "S16", xxhash.xxh3_128_digest, on_time=spent.append)
        timed.store(block, range(0, 2))
        timed.store(block, [1])
        assert len(spent) == 2 and all(ns > 0 for ns in spent)
        RegionMap(ram.blocks, 64, None, "S16", xxhash.xxh3_128_digest).store(block, [0])
        assert len(spent) == 2


def test_hashing_since_is_the_busiest_channels_share() -> None:
    """The channels hash at once: what a wait on them took is the busiest one's time
    since the mark, not the sum."""
    from engine.operation import busiest_since

    assert busiest_since([5_000_000, 0, 1_000_000], [6_000_000, 3_000_000, 3_000_000]) == 0.003
    assert busiest_since([], []) == 0.0


def test_tracked_pieces_are_the_smallest_whose_map_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """16 pages where the digest map fits one DIGESTS, doubled until it does (at
    most 64), never more than a packet (rounded down to a power of two)."""
    from engine import verify

    with GuestRAM.create({"a": 8 << 20}) as ram:  # 2048 pages
        assert verify.tracked_piece_pages(256, ram) == 16
        assert verify.tracked_piece_pages(12, ram) == 8 and verify.tracked_piece_pages(1, ram) == 1
        monkeypatch.setattr(verify, "MAX_DIGESTS_BYTES", 50 * 16)  # 50 digests: 2048 / 32 = 64 too many
        assert verify.tracked_piece_pages(256, ram) == 64
        monkeypatch.setattr(verify, "MAX_DIGESTS_BYTES", 10 * 16)  # none fits: the largest (not tracked)
        assert verify.tracked_piece_pages(256, ram) == 64 and not verify.tracked_fits(ram, 64)
