"""The RAM client keeps a piece's pages of one round in one packet (tracked verification).

Tracked verification (engine/verify.py) lets the channel that moves a packet hash
every piece the packet touches; that is right only if no other packet of the same
round carries pages of the same piece.  A recording core stands in for the
multifd sender: it keeps each packet's runs as the channel would read them.
"""

from __future__ import annotations

import numpy as np
import pytest

from clients.ram import RamClient
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
