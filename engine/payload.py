"""Payload kinds: the plug-in point between the multifd core and its clients.

A payload kind plays typed *roles*; each role runs in one place::

    role                 where                          built-in
    PayloadSender        source channel process         RAM pages, device chunks
    PayloadReceiver      destination channel process    RAM pages, device chunks
    FilePlanner          snapshot file channel          RAM pages
    PrecopyClient        source main: dirty rounds      RAM (clients/ram.py)
    SwitchoverSaver      source main: once, paused      devices (DeviceSaver), any
                                                        registered slot kind
    DeliveryConsumer     destination main: delivered    devices (DeviceLoader), any
                         payloads                       registered slot kind

and has a per-kind *codec*: its kind header, encoded by the sender and checked
and decoded by the receiver.  A kind whose packets carry one slot's payload (a
chunk and three numbers) needs only a :class:`SlotCodec` and
:func:`register_slot_kind`: the generic :class:`SlotSender` and
:class:`DeliveryReceiver` run it in the channels, and the orchestrators run
whatever :class:`SwitchoverSaver` objects a source is given and whatever
:class:`DeliveryConsumer` objects a destination is given (``payloads=``).  A
new kind is a new module plus a registration: the core, the codec of the
built-in kinds and the orchestrators do not change (tests/notes_kind.py is one,
migrated end to end by tests/integration/test_payload_kind.py).

The core moves slots and never looks inside them.  A *client* (RAM pages,
device state, ...) registers, per packet kind:

* a **sender** factory — runs in each source channel process and turns a filled
  slot into ``[header, buffers...]`` (the *prepare* op);
* a **receiver** factory — runs in each destination channel process and says
  where a checked packet's payload goes (views), then places it; it does no I/O;
* optionally a **client** factory — runs in the source main process and fills
  slots (for RAM: the dirty rounds);
* optionally **file writer / reader** factories — run in the channel processes
  of a snapshot save / restore and turn a slot into positioned buffers
  (:class:`FileIO`: file offset, views, and what to do just before the write or
  just after the read) that the file channel writes or reads.

Clients register on import.  A kind not registered yet is looked up among the
installed packages' ``multifd.payloads`` entry points, by the kind's name
(``ram_pages``, ``device_state``: pyproject.toml declares the built-in clients)
or number, so the engine names no client.  A new payload
kind is a new client module, not a change to the core.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from engine.errors import LocalProtocolError
from engine.shm import GuestRAM, RamBlock
from engine.slots import Counter, SendSlot, SlotTable
from engine.transport import Buffer
from engine.wire import packet

if TYPE_CHECKING:
    from engine.channel import ChannelSpec, Deliveries
    from engine.sync import FailureLatch


class ChannelContext:
    """Per-process state shared by the payload handlers of one channel."""

    def __init__(self, spec: ChannelSpec, ram: GuestRAM, slots: SlotTable | None) -> None:
        import_payload_modules(spec.payload_modules)  # kinds registered outside the engine
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
        # Snapshot channels: one uint64 per 1 MiB chunk of guest RAM, all blocks'
        # chunks in order (snapshot_format.CHUNK_PAGES), its checksum; restore: then
        # one uint64 per chunk, its present pages.  Save: filled; restore: checked.
        self.chunk_sums: memoryview | None = None
        # Migrations with tracked verification: an XXH3-128 per piece of spec.piece_pages
        # pages of all blocks (engine/verify.py); the channel that moves a piece hashes it.
        self.piece_digests: memoryview | None = None

    def count(self, counter: Counter, value: int) -> None:
        self.counters[counter] += value


# A part of a packet: its buffers, and what to do right before they are sent (or None).
Part = tuple[Sequence[Buffer], Callable[[], None] | None]


class PayloadSender(Protocol):
    """Source side of a payload kind: turns a filled slot into the buffers to send.

    ``holds_slot`` says whether the buffers from :meth:`prepare` point into the
    slot itself.  If not (RAM pages: the slot only describes pages, the buffers
    are views of guest RAM), the channel hands the slot back before it sends, so
    the next hand-off overlaps this send.
    """

    holds_slot: bool

    def prepare(self, slot: SendSlot, sequence: int, epoch: int) -> Sequence[Part]:
        """The packet as parts, header bytes first, then payload buffers (views of
        shared memory); the channel sends them in order, calling a part's
        ``before()`` (if not None) right before it (RAM pages: tracked verification
        hashes the part's pieces then, in cache for the copy).  Most kinds send one
        part: ``[(buffers, None)]``."""
        ...


class PayloadReceiver(Protocol):
    """Destination side of a payload kind: places the payload of a checked packet.

    It does no I/O: the channel's packet reader decoded and checked the packet's
    headers (``record``: its kind's record, such as a RamPagesHeader) and reads
    the payload for it.  :meth:`receive` is a generator: each value it yields is
    the next views of guest memory (or of a slot) that the payload's next bytes
    go into, in payload order; the reader fills them completely, straight from
    the socket, before the generator resumes (so it may look at what it got,
    such as a compressed frame's header, before it says where the rest goes).
    The views of one packet must add up to its ``payload_length``.
    """

    def receive(self, record: packet.Packet) -> Iterator[Sequence[memoryview]]:
        """Yield where the payload of ``record`` goes, piece by piece; finish placing it."""
        ...


class FileIO(NamedTuple):
    """One positional write or read of a file channel: `buffers` at `offset`, contiguous
    in the file.  `before` runs just before the write (save: checksum the pages in
    the buffers, and the chunks whose last piece this is), `after` just after the
    read (restore: check the pages, or the chunk they end); either may raise.  A
    piece with no buffers is only its hooks."""

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
    module: str | None = None             # registers the kind on import (None: built in)
    codec: SlotCodec | None = None        # a slot kind's codec


_PAYLOADS: dict[int, PayloadEntry] = {}
ENTRY_POINTS = "multifd.payloads"


def _entry_point_name(kind: int) -> str:
    """How pyproject.toml names the client of `kind`: the built-in kinds by name."""
    try:
        return packet.PacketKind(kind).name.lower()
    except ValueError:
        return str(kind)


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
    """The handlers of `kind`, importing the client module an installed package
    declares for it on first use."""
    if kind not in _PAYLOADS:
        for entry in importlib.metadata.entry_points(group=ENTRY_POINTS, name=_entry_point_name(kind)):
            entry.load()
    try:
        return _PAYLOADS[kind]
    except KeyError:
        raise LocalProtocolError(f"no payload handler registered for kind {kind}") from None


# ---------------------------------------------------------------------------
# Slot kinds: a payload kind that is a codec plus a registration.


class SlotFields(NamedTuple):
    """What a slot kind's packet carries besides its payload: three numbers a
    kind gives its own meaning (the device kind: device, chunk index, END)."""

    a0: int
    a1: int
    a2: int
    payload_length: int


class SlotCodec(Protocol):
    """The per-kind codec of a slot kind (sans-IO: bytes in, fields out).

    ``rule`` is what the common packet header decoder checks before the kind
    header is read (flag bits, kind header and payload bounds).
    """

    kind: int
    rule: packet.KindRule

    def encode(self, sequence: int, fields: SlotFields) -> bytes:
        """The whole packet header: common header and kind header."""
        ...

    def decode(self, header: packet.PacketHeader, body: bytes, sequence: int) -> SlotFields:
        """Check and decode the kind header; RemoteProtocolError if it is wrong."""
        ...


class SwitchoverSaver(Protocol):
    """Source, main process: a payload saved once, with the guest paused, beside
    the last RAM round (device state is one; see :class:`~engine.device.DeviceSaving`).

    ``save(send)`` runs on a pool thread; it calls ``send(fields, data)`` for each
    piece, in order (``len(data) == fields.payload_length``, at most the kind's
    ``rule.max_payload``); the pieces travel over any channel, in any order.
    """

    kind: int

    def save(self, send: Callable[[SlotFields, bytes], None]) -> None:
        ...


class DeliveryConsumer(Protocol):
    """Destination, main process: the payloads of its kind, as the channels
    deliver them (any order), then :meth:`finish` once every channel ended."""

    kind: int

    def on_delivered(self, slot: SendSlot) -> None:
        """Take the payload out of `slot` (main thread; the slot goes back after)."""
        ...

    def finish(self) -> None:
        """Everything sent was delivered: check it is whole (raise if not)."""
        ...


class SlotSender:
    """A slot kind's sender: the codec's header, then the payload in the slot."""

    holds_slot = True  # the payload is in the slot: keep it until it is sent

    def __init__(self, codec: SlotCodec, ctx: ChannelContext) -> None:
        self.codec = codec
        self.ctx = ctx

    def prepare(self, slot: SendSlot, sequence: int, epoch: int) -> Sequence[Part]:
        length = slot.payload_length
        header = self.codec.encode(sequence, SlotFields(slot.a0, slot.a1, slot.a2, length))
        return [([header, slot.payload[:length]], None)]


class DeliveryReceiver:
    """A slot kind's receiver: the codec checks the kind header, the payload is
    received straight into a delivery slot for the destination's main process."""

    def __init__(self, codec: SlotCodec, ctx: ChannelContext) -> None:
        self.codec = codec
        self.ctx = ctx

    def receive(self, record: packet.Packet) -> Iterator[Sequence[memoryview]]:
        assert isinstance(record, packet.KindPacket)
        fields = self.codec.decode(record.header, record.body, record.sequence)
        deliveries = self.ctx.deliveries
        if deliveries is None:
            raise LocalProtocolError(f"payload kind {self.codec.kind} needs delivery slots")
        slot = deliveries.take()
        if fields.payload_length > len(slot.payload):
            raise LocalProtocolError(f"a delivery slot holds {len(slot.payload)} bytes, payload kind "
                                     f"{self.codec.kind} sent {fields.payload_length}")
        yield [slot.payload[:fields.payload_length]]
        slot.kind = self.codec.kind
        slot.a0, slot.a1, slot.a2 = fields.a0, fields.a1, fields.a2
        slot.payload_length = fields.payload_length
        deliveries.deliver(self.codec.kind, slot)


def register_slot_kind(codec: SlotCodec, module: str) -> None:
    """Register a slot kind: its codec's rule with the packet decoder, and the
    generic sender and receiver.  `module` is the module that calls this (on
    import): channel processes import it by name to have the kind too."""
    packet.register_kind(codec.kind, codec.rule)
    _PAYLOADS[int(codec.kind)] = PayloadEntry(
        sender=lambda ctx: SlotSender(codec, ctx),
        receiver=lambda ctx: DeliveryReceiver(codec, ctx),
        module=module, codec=codec,
    )


def payload_modules(kinds: Sequence[int]) -> tuple[str, ...]:
    """The modules channel processes import to have `kinds` (registered ones)."""
    return tuple(sorted({module for kind in kinds if (module := payload_entry(kind).module)}))


def import_payload_modules(modules: Sequence[str]) -> None:
    """In a channel process: import the modules that register its kinds."""
    for module in modules:
        importlib.import_module(module)


def slot_capacity(kinds: Sequence[int]) -> int:
    """The payload bytes a slot needs for every registered slot kind of `kinds`."""
    return max((entry.codec.rule.max_payload for kind in kinds
                if (entry := payload_entry(kind)).codec is not None), default=0)


class SwitchoverSaves:
    """Runs a source's switchover savers, each as one pool job on its own client
    slot of the multifd core (client ``first_client + i``), all at once."""

    def __init__(self, savers: Sequence[SwitchoverSaver], core: Any, first_client: int,
                 pool: Any, latch: FailureLatch) -> None:
        self._core = core
        self._latch = latch
        self._done = threading.Event()
        self._futures: list[Future] = []
        latch.on_fail(self._done.set)
        for index, saver in enumerate(savers):
            send = functools.partial(self._send, first_client + index, saver.kind)
            future = pool.submit(saver.save, send)
            future.add_done_callback(self._job_done)
            self._futures.append(future)
        if not self._futures:
            self._done.set()

    def _send(self, client: int, kind: int, fields: SlotFields, data: bytes) -> None:
        self._latch.raise_if_failed()  # a failed migration's job stops before its slot is freed
        slot = self._core.client_slot(client)
        if len(data) != fields.payload_length or len(data) > len(slot.payload):
            raise LocalProtocolError(f"payload kind {kind}: {len(data)} bytes for a piece of "
                                     f"{fields.payload_length}, slots hold {len(slot.payload)}")
        slot.kind = kind
        slot.a0, slot.a1, slot.a2 = fields.a0, fields.a1, fields.a2
        slot.payload[:len(data)] = data
        slot.payload_length = len(data)
        self._core.send(client, len(data))

    def _job_done(self, future: Future) -> None:
        error = future.exception()
        if error is not None:
            self._latch.fail(error)
        if all(f.done() for f in self._futures):
            self._done.set()

    def wait(self) -> None:
        """Until every saver returned, or the migration failed: then its error is
        raised at once, while savers may still run (their jobs see the cancel)."""
        self._done.wait()
        self._latch.raise_if_failed()
