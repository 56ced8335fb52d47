"""Payload kinds: the plug-in point between the multifd core and its clients.

The core moves slots and never looks inside them.  A *client* (RAM pages,
device state, ...) registers, per packet kind:

* a **sender** factory — runs in each source channel process and turns a filled
  slot into ``[header, buffers...]`` (the *prepare* op of seed 002);
* a **receiver** factory — runs in each destination channel process, validates
  a packet and places its payload;
* optionally a **client** factory — runs in the source main process and fills
  slots (for RAM: the dirty rounds);
* optionally **file writer / reader** factories — run in the channel processes
  of a snapshot save / restore and turn a slot into positioned buffers
  (:class:`FileIO`: file offset, views, and what to do just before the write or
  just after the read) that the file channel writes or reads.

Clients register on import; the built-in ones are imported here by *name* on
first use, so ``engine`` never imports ``clients`` statically.  A new payload
kind is a new client module, not a change to the core.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from engine.errors import LocalProtocolError
from engine.shm import GuestRAM, RamBlock
from engine.slots import Counter, SendSlot, SlotTable
from engine.transport import Buffer, Connection
from engine.wire import packet

if TYPE_CHECKING:
    from engine.channel import ChannelSpec, Deliveries


class ChannelContext:
    """Per-process state shared by the payload handlers of one channel."""

    def __init__(self, spec: ChannelSpec, ram: GuestRAM, slots: SlotTable | None) -> None:
        self.spec = spec
        self.ram = ram
        self.slots = slots
        self.counters: np.ndarray = (
            slots.counters[spec.channel_id] if slots is not None else np.zeros(len(Counter), "<u8")
        )
        # Destination channels: how payloads consumed in the main process get there.
        self.deliveries: Deliveries | None = None
        # Snapshot save channels: one byte per page of all blocks, 1 = its bytes
        # are in the file (engine/snapshot.py turns it into the file's bitmaps).
        self.present: memoryview | None = None
        # Snapshot channels: one uint64 per page of all blocks, its checksum
        # (snapshot_format.page_sums).  Save: the channels fill it; restore: they check against it.
        self.page_sums: memoryview | None = None

    def count(self, counter: Counter, value: int) -> None:
        self.counters[counter] += value


class PayloadSender(Protocol):
    """Source side of a payload kind: turns a filled slot into the buffers to send.

    ``holds_slot`` says whether the buffers from :meth:`prepare` point into the
    slot itself.  If not (RAM pages: the slot only describes pages, the buffers
    are views of guest RAM), the channel hands the slot back before it sends, so
    the next hand-off overlaps this send.
    """

    holds_slot: bool

    def prepare(self, slot: SendSlot, sequence: int, epoch: int) -> Sequence[Buffer]:
        """Header bytes first, then payload buffers (views of shared memory)."""
        ...


class PayloadReceiver(Protocol):
    """Destination side of a payload kind: validates a packet and places its payload."""

    def receive(
        self, header: packet.PacketHeader, body: bytes, conn: Connection, sequence: int, epoch: int
    ) -> None:
        """Decode `body` (the kind-specific header), then read the payload from `conn`."""
        ...


class FileIO(NamedTuple):
    """One positional write or read of a file channel: `buffers` at `offset`, contiguous
    in the file.  `before` runs just before the write (save: checksum the pages in
    the buffers), `after` just after the read (restore: check them); either may raise."""

    offset: int
    buffers: list[memoryview]
    before: Callable[[], None] | None = None
    after: Callable[[], None] | None = None


class FilePlanner(Protocol):
    """Snapshot side of a payload kind, in a file channel process."""

    def plan(self, slot: SendSlot) -> list[FileIO]:
        """Where the slot's bytes go in (save) or come from (restore) the file, in order."""
        ...


class PrecopyClient(Protocol):
    """A source main-process client that sends its data in dirty rounds."""

    def queue_all(self) -> int:
        """First round: queue everything; returns the pages queued."""
        ...

    def queue_dirty(self) -> int:
        """Later rounds: queue what changed since it was last queued."""
        ...

    def queue_pages(self, block: RamBlock, pages: np.ndarray) -> None:
        """Queue these sorted, unique pages of `block` (a snapshot restore's)."""
        ...

    def flush(self) -> None:
        """Send a partly filled slot (before a sync)."""
        ...

    def pending_pages(self) -> int:
        """How much is dirty now, in pages (a peek)."""
        ...


SenderFactory = Callable[[ChannelContext], PayloadSender]
ReceiverFactory = Callable[[ChannelContext], PayloadReceiver]
PlannerFactory = Callable[[ChannelContext], FilePlanner]
ClientFactory = Callable[..., Any]


@dataclass(frozen=True)
class PayloadEntry:
    sender: SenderFactory
    receiver: ReceiverFactory
    client: ClientFactory | None = None   # source main process: produces the payloads
    sink: ClientFactory | None = None     # destination main process: consumes deliveries
    file_writer: PlannerFactory | None = None  # snapshot save, in the channel processes
    file_reader: PlannerFactory | None = None  # snapshot restore, in the channel processes


_PAYLOADS: dict[int, PayloadEntry] = {}
_BUILTIN = {
    packet.PacketKind.RAM_PAGES: "clients.ram",
    packet.PacketKind.DEVICE_STATE: "clients.device_state",
}


def register_payload(
    kind: int,
    *,
    sender: SenderFactory,
    receiver: ReceiverFactory,
    client: ClientFactory | None = None,
    sink: ClientFactory | None = None,
    file_writer: PlannerFactory | None = None,
    file_reader: PlannerFactory | None = None,
) -> None:
    """Register the handlers of a payload kind (a client module calls this on import)."""
    _PAYLOADS[int(kind)] = PayloadEntry(sender, receiver, client, sink, file_writer, file_reader)


def payload_entry(kind: int) -> PayloadEntry:
    """The handlers of `kind`, importing its built-in client module on first use."""
    if kind not in _PAYLOADS and kind in _BUILTIN:
        importlib.import_module(_BUILTIN[packet.PacketKind(kind)])
    try:
        return _PAYLOADS[kind]
    except KeyError:
        raise LocalProtocolError(f"no payload handler registered for kind {kind}") from None
