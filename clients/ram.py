"""The RAM client: guest pages as multifd payloads.

Source, main process (:class:`RamClient`)::

    round 1 : take (and drop) every block's dirty pages, then queue every page (bulk)
    round k : take each block's dirty pages from the dirty source (get + clear),
              then queue those pages
    dirty source: engine/dirty.py — each block's DirtyMap by default, or the
              VMM's (a KVM machine: its dirty log and its own marks)
    queueing: sorted page indices → runs of contiguous pages → the client's slot
              (one block per slot, ≤ packet_pages pages); a full slot is sent
    flush() : send the partly filled slot (before every sync)

Channel processes: clients/ram_payload.py (zero pages, compression, placement),
registered here for ``PacketKind.RAM_PAGES``.

All per-page work in the main process is vectorised (numpy); Python loops run
per packet, not per page.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from clients.ram_payload import RamPagesFileReader, RamPagesFileWriter, RamPagesReceiver, RamPagesSender
from engine.dirty import BlockDirtyMaps, DirtySource
from engine.multifd import MultifdSender
from engine.pages import pages_to_runs
from engine.payload import register_payload
from engine.shm import PAGE_SIZE, GuestRAM, RamBlock
from engine.slots import SendSlot
from engine.wire import packet

# Below this many pages a packet is not worth splitting further.
_MIN_SPLIT = 64


class RamClient:
    """Queues guest pages into the multifd core, one block per packet.

    `dirty_source` says which pages each round sends (None: each block's own
    DirtyMap); it is called from this client's thread only.
    """

    def __init__(
        self,
        ram: GuestRAM,
        core: MultifdSender,
        client_id: int,
        packet_pages: int,
        on_packet: Callable[[], None] | None = None,
        dirty_source: DirtySource | None = None,
    ) -> None:
        self.ram = ram
        self.dirty: DirtySource = dirty_source if dirty_source is not None else BlockDirtyMaps()
        self.core = core
        self.client_id = client_id
        self.packet_pages = packet_pages
        self._on_packet = on_packet
        self._slot_pages = 0          # pages in the slot being filled
        self._packet_limit = packet_pages  # pages per packet in this round

    # -- rounds ------------------------------------------------------------

    def queue_all(self) -> int:
        """First round: take (and drop) every block's dirty pages, then queue every page.

        Clearing first and reading after is the get-and-clear rule applied to
        the whole map: a write during this round marks its page for the next.
        """
        for block in self.ram.blocks:
            self.dirty.take(block)
        for block in self.ram.blocks:
            self.queue_range(block, 0, block.n_pages)
        return self.ram.n_pages

    def queue_dirty(self) -> int:
        """Later rounds: take each block's dirty pages and queue them.  Returns the count.

        A round of few pages (the last one above all: it is downtime) is cut
        into packets small enough to reach every channel, instead of riding one
        channel while the others idle.
        """
        taken = [(block, self.dirty.take(block)) for block in self.ram.blocks]
        total = sum(int(pages.size) for _, pages in taken)
        self._packet_limit = min(self.packet_pages, max(_MIN_SPLIT, -(-total // self.core.channels)))
        try:
            for block, pages in taken:
                if pages.size:
                    self.queue_pages(block, pages)
        finally:
            self._packet_limit = self.packet_pages
        return total

    def pending_pages(self) -> int:
        """Dirty pages waiting for the next round (a peek)."""
        return sum(self.dirty.count(block) for block in self.ram.blocks)

    # -- queueing ----------------------------------------------------------

    def queue_range(self, block: RamBlock, first_page: int, n_pages: int) -> None:
        """Queue the contiguous pages [first_page, first_page + n_pages) of `block`."""
        end = first_page + n_pages
        while first_page < end:
            slot = self._slot_for(block)
            take = min(self._packet_limit - self._slot_pages, end - first_page)
            self._append_run(slot, first_page, take)
            first_page += take

    def queue_pages(self, block: RamBlock, pages: np.ndarray, align: int = 0) -> None:
        """Queue sorted, unique page indices of `block`.

        `align` (pages): a slot that fills ends on a multiple of `align`, so pages
        of one aligned group go in one slot (a snapshot restore's chunks: one
        channel reads, and checks, a chunk whole); a group larger than a slot is cut.
        """
        done = 0
        while done < pages.size:
            slot = self._slot_for(block)
            take = min(self._packet_limit - self._slot_pages, pages.size - done)
            if align and done + take < pages.size:
                groups = pages[done:done + take + 1] // align
                ends = np.flatnonzero(groups[1:] != groups[:-1])  # last page of a group
                if ends.size:
                    take = int(ends[-1]) + 1
                elif self._slot_pages:
                    self._send()  # the group starts a slot of its own
                    continue
            firsts, counts = pages_to_runs(pages[done:done + take])
            n = slot.n_items
            if n and int(slot.items[n - 1, 0] + slot.items[n - 1, 1]) == int(firsts[0]):
                slot.items[n - 1, 1] += counts[0]        # continues the slot's last run
                firsts, counts = firsts[1:], counts[1:]
            m = firsts.size
            slot.items[n:n + m, 0] = firsts
            slot.items[n:n + m, 1] = counts
            slot.n_items = n + m
            self._filled(slot, take)
            done += take

    def flush(self) -> None:
        """Send the partly filled slot, if any (call before every sync)."""
        if self._slot_pages:
            self._send()

    # -- internals ---------------------------------------------------------

    def _slot_for(self, block: RamBlock) -> SendSlot:
        slot = self.core.client_slot(self.client_id)
        if self._slot_pages and slot.a0 != block.index:
            self._send()  # one block per packet
            slot = self.core.client_slot(self.client_id)
        if not self._slot_pages:
            slot.kind = packet.PacketKind.RAM_PAGES
            slot.a0 = block.index
            slot.n_items = 0
        return slot

    def _append_run(self, slot: SendSlot, first_page: int, n_pages: int) -> None:
        n = slot.n_items
        if n and int(slot.items[n - 1, 0] + slot.items[n - 1, 1]) == first_page:
            slot.items[n - 1, 1] += n_pages
        else:
            slot.items[n] = (first_page, n_pages)
            slot.n_items = n + 1
        self._filled(slot, n_pages)

    def _filled(self, slot: SendSlot, n_pages: int) -> None:
        self._slot_pages += n_pages
        if self._slot_pages >= self._packet_limit:
            self._send()

    def _send(self) -> None:
        self.core.send(self.client_id, self._slot_pages * PAGE_SIZE)
        self._slot_pages = 0
        if self._on_packet is not None:
            self._on_packet()


register_payload(
    packet.PacketKind.RAM_PAGES, sender=RamPagesSender, receiver=RamPagesReceiver, client=RamClient,
    file_writer=RamPagesFileWriter, file_reader=RamPagesFileReader,
)
