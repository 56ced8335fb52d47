"""The RAM client: guest pages as multifd payloads.

Source, main process (:class:`RamClient`)::

    round 1 : take (and drop) every block's dirty pages, then queue every page (bulk),
              its first packets small and growing (1 MiB, 2 MiB, ... packet_pages), so
              the first pages are on the wire before a whole 16 MiB is prepared
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
from engine.dirty import BlockDirtyMaps, DirtySource, drop_marks
from engine.multifd import MultifdSender
from engine.pages import pages_to_runs
from engine.payload import register_payload
from engine.shm import PAGE_SIZE, GuestRAM, RamBlock
from engine.slots import SendSlot
from engine.wire import packet

# Below this many pages a packet is not worth splitting further.
_MIN_SPLIT = 64
# Round 1's first packet (1 MiB); each next one is twice as big, up to packet_pages.
# A channel's first packet also maps its pages and reads them all for the zero
# scan before the first byte leaves (~2-3 ms for 16 MiB here): the ramp puts the
# first pages on the wire sooner and gives every channel work sooner, for a few
# packets more per migration.
FIRST_PACKET_PAGES = 256


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
        piece_pages: int = 1,
    ) -> None:
        self.ram = ram
        self.dirty: DirtySource = dirty_source if dirty_source is not None else BlockDirtyMaps()
        self.core = core
        self.client_id = client_id
        # (A piece fits CONFIG's packet size; a packet cut smaller for a cap may grow to it.)
        packet_pages = max(packet_pages, piece_pages)
        self.packet_pages = packet_pages
        self._on_packet = on_packet
        self._slot_pages = 0          # pages in the slot being filled
        # Tracked verification (engine/verify.py): the pages of one piece that go in
        # one round go in one packet, so one channel hashes the piece after them.
        # A power of two ≤ packet_pages; 1: no constraint.
        self.piece_pages = piece_pages
        self._packet_limit = packet_pages  # pages per packet in this round
        self._ramp = False            # round 1: the packet limit doubles per packet

    # -- rounds ------------------------------------------------------------

    def queue_all(self) -> int:
        """First round: take (and drop) every block's dirty pages, then queue every page.

        Clearing first and reading after is the get-and-clear rule applied to
        the whole map: a write during this round marks its page for the next.
        A source with a ``drop`` (the default maps, and the dirty-rate meter
        around them) drops: the pages a take would list are dropped anyway, and
        listing them costs ~1.5 ms per GiB of dirty guest before the first packet.
        A VMM's source without one is taken (its take may do more than clear).
        """
        for block in self.ram.blocks:
            drop_marks(self.dirty, block)
        self._ramp = True
        self._packet_limit = min(self.packet_pages, FIRST_PACKET_PAGES)
        try:
            for block in self.ram.blocks:
                self.queue_range(block, 0, block.n_pages)
        finally:
            self._ramp, self._packet_limit = False, self.packet_pages
        return self.ram.n_pages

    def queue_dirty(self) -> int:
        """Later rounds: take each block's dirty pages and queue them.  Returns the count.

        A round of few pages (the last one above all: it is downtime) is cut
        into packets small enough to reach every channel, instead of riding one
        channel while the others idle.
        """
        taken = [(block, self.dirty.take(block)) for block in self.ram.blocks]
        total = sum(int(pages.size) for _, pages in taken)
        self._packet_limit = min(self.packet_pages, max(_MIN_SPLIT, self.piece_pages,
                                                        -(-total // self.core.channels)))
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
        piece = self.piece_pages
        while first_page < end:
            slot = self._slot_for(block)
            take = min(self._packet_limit - self._slot_pages, end - first_page)
            cut = first_page + take
            if cut < end and cut % piece:  # not inside a piece: back to its start
                take = cut - cut % piece - first_page
                if take <= 0:  # the piece does not fit what is left of this slot
                    self._send()
                    continue
            self._append_run(slot, first_page, take)
            first_page += take

    def queue_pages(self, block: RamBlock, pages: np.ndarray) -> None:
        """Queue sorted, unique page indices of `block`."""
        done = 0
        piece = self.piece_pages
        while done < pages.size:
            slot = self._slot_for(block)
            take = min(self._packet_limit - self._slot_pages, pages.size - done)
            if piece > 1 and done + take < pages.size:
                # Not inside a piece: back to the first of this slot's pages in it.
                start = int(pages[done + take]) - int(pages[done + take]) % piece
                take = int(np.searchsorted(pages[done:done + take], start))
                if take == 0:  # the piece does not fit what is left of this slot
                    self._send()
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
        if self._ramp:
            self._packet_limit = min(self.packet_pages, self._packet_limit * 2)
        if self._on_packet is not None:
            self._on_packet()


register_payload(
    packet.PacketKind.RAM_PAGES, sender=RamPagesSender, receiver=RamPagesReceiver, client=RamClient,
    file_writer=RamPagesFileWriter, file_reader=RamPagesFileReader,
)
