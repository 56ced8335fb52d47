"""The RAM client's packets (clients/ram.py), seen from a channel's side.

The client queues into a real :class:`~engine.multifd.MultifdSender` over a real
slot table; the one channel is the test, answering each JOB with IDLE after it
read the slot's page runs, so it sees every packet the client made, in order.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import Future

import numpy as np
import pytest

from clients.ram import FIRST_PACKET_PAGES, RamClient
from engine.channel import ControlOp, control_pair, post, read_control
from engine.converge import DirtyRateMeter
from engine.dirty import BlockDirtyMaps, DirtySource
from engine.multifd import ChannelLink, MultifdSender
from engine.shm import GuestRAM, RamBlock
from engine.slots import SlotTable
from engine.sync import FailureLatch, wait_readable

pytestmark = pytest.mark.usefixtures("no_leaks")

HANG_S = 20.0  # a safety limit: only a hang reaches it
PACKET_PAGES = 2048


def _packets(ram: GuestRAM, rounds: list[str], dirty_source: DirtySource | None = None) -> list[list[int]]:
    """Run the client's `rounds` ("all": round 1, "dirty": a later round) on one
    channel; answer the pages of each packet, per round."""
    main, channel = control_pair()
    latch = FailureLatch()
    table = SlotTable.create(2, max_items=8, payload_capacity=0, n_channels=1)
    sizes: list[list[int]] = []
    stop = threading.Event()

    def serve() -> None:  # the channel: JOB(slot) -> read its runs -> IDLE(slot); SYNC -> SYNCED
        while not stop.is_set():
            if not wait_readable([channel], 0.05):
                continue
            message = read_control(channel)
            if message is None:
                return
            if message.op is ControlOp.JOB:
                sizes[-1].append(int(table[message.a].used_items()[:, 1].sum()))
                table[message.a].clear()
                post(channel, ControlOp.IDLE, message.a)
            elif message.op is ControlOp.SYNC:
                post(channel, ControlOp.SYNCED, message.a)

    server = threading.Thread(target=serve, name="test-ram-channel")
    server.start()
    try:
        core = MultifdSender([ChannelLink(0, main, None, Future())], table, 1, latch, lambda e: None,
                             stall_timeout=HANG_S)
        client = RamClient(ram, core, 0, PACKET_PAGES, dirty_source=dirty_source)
        for kind in rounds:
            sizes.append([])
            if kind == "all":
                client.queue_all()
            else:
                ram.blocks[0].dirty.mark(0, ram.blocks[0].n_pages)
                client.queue_dirty()
            client.flush()
            core.sync()  # every packet of the round went through the channel
    finally:
        stop.set()
        server.join(HANG_S)
        main.close()
        channel.close()
        latch.close()
        table.close()
        table.unlink()
    return sizes


def test_round_one_starts_with_small_packets_doubling_to_the_packet_size() -> None:
    n_pages = 4 * PACKET_PAGES
    with GuestRAM.create({"pc.ram": n_pages * 4096}) as ram:
        first, later = _packets(ram, ["all", "dirty"])
    ramp = [FIRST_PACKET_PAGES << k for k in range((PACKET_PAGES // FIRST_PACKET_PAGES).bit_length() - 1)]
    assert ramp and ramp[0] < PACKET_PAGES  # the test says something: there is a ramp
    assert first[:len(ramp)] == ramp
    assert set(first[len(ramp):-1]) == {PACKET_PAGES}  # then full packets (the last: the rest)
    assert sum(first) == n_pages
    # A later round of every page is cut as before: full packets (one channel), no ramp.
    assert later == [PACKET_PAGES] * 4


class _VmmSource:
    """A VMM's dirty source (no ``drop``; here over the block maps), counting its takes."""

    def __init__(self) -> None:
        self.takes = 0

    def take(self, block: RamBlock) -> np.ndarray:
        self.takes += 1
        return block.dirty.take()

    def count(self, block: RamBlock) -> int:
        return block.dirty.count()


class _CountedMaps(BlockDirtyMaps):
    """The default maps, counting their takes and drops."""

    def __init__(self) -> None:
        self.takes = self.drops = 0

    def take(self, block: RamBlock) -> np.ndarray:
        self.takes += 1
        return super().take(block)

    def drop(self, block: RamBlock) -> None:
        self.drops += 1
        super().drop(block)


@pytest.mark.parametrize("source", ["default", "vmm", "metered default", "metered vmm"])
def test_round_one_clears_every_mark_before_reading_and_a_vmm_source_is_taken(source: str) -> None:
    """Round 1 sends every page: the marks made before it are cleared before any
    page is read.  The default maps are dropped (no list of pages), also behind
    auto-converge's dirty-rate meter; a VMM's source is taken, since its take may
    do more than clear (say reset a hypervisor's log).  The meter's window starts."""
    inner: _VmmSource | _CountedMaps = _VmmSource() if source.endswith("vmm") else _CountedMaps()
    with GuestRAM.create({"pc.ram": 2 * PACKET_PAGES * 4096, "vga.ram": PACKET_PAGES * 4096}) as ram:
        ticks = itertools.count(0.0, 1.0)  # each reading a second later: a window is long enough
        meter = (DirtyRateMeter(inner, ram.blocks, first_peek_s=0.5, clock=lambda: next(ticks))
                 if "metered" in source else None)
        for block in ram.blocks:
            block.dirty.mark(0, block.n_pages)
        _packets(ram, ["all"], dirty_source=meter if meter is not None else inner)
        assert all(block.dirty.count() == 0 for block in ram.blocks)
    if isinstance(inner, _VmmSource):
        assert inner.takes == 2  # once per block
    else:
        assert (inner.takes, inner.drops) == (0, 2)
    if meter is not None:
        assert meter.end_round(0) is not None  # the drop started the rate's window
