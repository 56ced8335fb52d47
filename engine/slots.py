"""Send slots in shared memory: the N + M buffers of the multifd core.

A slot describes one payload to send: each of the N channels owns one
slot, each of the M clients owns one slot it is filling.  ``send()`` swaps a
client's filled slot with an idle channel's empty one, so nothing is allocated
per packet and only a slot *index* crosses the process boundary; the slot
itself lives here, in one shared segment::

    ┌ table header (64 B) ┐┌ slot 0 ──────────────────────────────┐┌ slot 1 ...
    │ magic, counts, sizes ││ header 64 B │ items 8 B × max_items │ payload │
    └──────────────────────┘└──────────────────────────────────────┘
    ... then the channel counters: n_channels × N_COUNTERS × u64

The core treats a slot as opaque: ``kind`` says which client's payload handler
turns it into buffers, ``epoch`` is the core's, and ``a0..a3``, the items (pairs
of u32) and the payload bytes mean whatever that client says (the RAM client:
block index and page runs; the device-state client: device, chunk index, bytes).
Ownership is exclusive and moves with control messages, so no locks are needed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from engine.errors import ConfigError
from engine.shm import Segment

KIND_EMPTY = 0
_MAGIC = 0x4D464453  # "MFDS"
_TABLE_HEADER = 64
_SLOT_HEADER = 64
_ALIGN = 64

# The slot header, little-endian u32 fields at these byte offsets (the rest of
# its 64 bytes is reserved).  Read and written with struct on the shared buffer:
# a numpy 0-d record behind a property costs ~4x as much per field.
_FIELDS = ("kind", "epoch", "n_items", "payload_length", "a0", "a1", "a2", "a3")
_U32 = struct.Struct("<I")
_U32_PAIR = struct.Struct("<II")  # n_items, payload_length: side by side
assert len(_FIELDS) * _U32.size <= _SLOT_HEADER


class Counter(IntEnum):
    """Per-channel statistics, written by the channel process, read by anyone."""

    WIRE_BYTES = 0       # bytes written to / read from the socket, headers included
    PACKETS = 1
    NORMAL_PAGES = 2     # pages whose bytes travelled
    ZERO_PAGES = 3       # pages sent as zero runs (no payload)
    GUEST_BYTES = 4      # guest bytes represented by the packets (normal + zero pages)
    PAYLOAD_BYTES = 5    # payload bytes after the prepare step (compressed size)
    SYNCS = 6
    DEVICE_BYTES = 7
    LAST_WORD = 8        # 1 once the channel's work is done: END written (source) or read
                         # (destination), set just before it tells main so, so that a
                         # death after it is known to be after its last word
    HASH_NS = 9          # tracked verification: nanoseconds spent hashing pieces


N_COUNTERS = len(Counter)


def _align(value: int) -> int:
    return -(-value // _ALIGN) * _ALIGN


@dataclass(frozen=True, slots=True)
class SlotTableHandle:
    """What a channel process needs to attach the table."""

    segment: str
    n_slots: int
    max_items: int
    payload_capacity: int
    n_channels: int


def _u32_field(name: str) -> Any:
    """A property reading / writing the slot header's u32 `name` in shared memory."""
    offset = _FIELDS.index(name) * _U32.size
    unpack_from, pack_into = _U32.unpack_from, _U32.pack_into

    def get(slot: SendSlot) -> int:
        return unpack_from(slot._buf, slot._at + offset)[0]

    def set_(slot: SendSlot, value: int) -> None:
        pack_into(slot._buf, slot._at + offset, value)

    return property(get, set_, doc=f"slot header field {name} (u32)")


class SendSlot:
    """A view of one slot.  Whoever owns the slot index may read and write it."""

    __slots__ = ("index", "_buf", "_at", "items", "payload")

    def __init__(self, index: int, buf: memoryview, at: int, items: np.ndarray,
                 payload: memoryview) -> None:
        self.index = index
        self._buf = buf         # the table's shared buffer ...
        self._at = at           # ... and where this slot's header starts in it
        self.items = items      # (max_items, 2) uint32 view
        self.payload = payload  # writable view, payload_capacity bytes

    kind = _u32_field("kind")
    epoch = _u32_field("epoch")
    n_items = _u32_field("n_items")
    payload_length = _u32_field("payload_length")
    a0 = _u32_field("a0")
    a1 = _u32_field("a1")
    a2 = _u32_field("a2")
    a3 = _u32_field("a3")

    @property
    def empty(self) -> bool:
        return self.kind == KIND_EMPTY

    def used_items(self) -> np.ndarray:
        """The filled part of the items array, shape (n_items, 2)."""
        return self.items[: self.n_items]

    def clear(self) -> None:
        """Mark the slot empty (the payload bytes are left as they are)."""
        _U32.pack_into(self._buf, self._at, KIND_EMPTY)
        _U32_PAIR.pack_into(self._buf, self._at + 8, 0, 0)  # n_items, payload_length


def _slot_stride(max_items: int, payload_capacity: int) -> int:
    """Bytes from one slot to the next: header, items, payload, aligned."""
    return _align(_SLOT_HEADER + 8 * max_items + payload_capacity)


class SlotTable:
    """The N + M slots and the per-channel counters, in one shared segment."""

    def __init__(self, segment: Segment, handle: SlotTableHandle) -> None:
        self.segment = segment
        self.handle = handle
        slot_stride = _slot_stride(handle.max_items, handle.payload_capacity)
        buf = segment.buf
        self._slots = []
        for index in range(handle.n_slots):
            base = _TABLE_HEADER + index * slot_stride
            items = np.ndarray(
                (handle.max_items, 2), dtype="<u4", buffer=buf, offset=base + _SLOT_HEADER
            )
            payload_at = base + _SLOT_HEADER + 8 * handle.max_items
            payload = buf[payload_at:payload_at + handle.payload_capacity]
            self._slots.append(SendSlot(index, buf, base, items, payload))
        counters_at = _TABLE_HEADER + handle.n_slots * slot_stride
        self.counters = np.ndarray(
            (handle.n_channels, N_COUNTERS), dtype="<u8", buffer=buf, offset=counters_at
        )

    @staticmethod
    def _size(n_slots: int, max_items: int, payload_capacity: int, n_channels: int) -> int:
        slots = n_slots * _slot_stride(max_items, payload_capacity)
        return _TABLE_HEADER + slots + n_channels * N_COUNTERS * 8

    @classmethod
    def create(
        cls, n_slots: int, max_items: int, payload_capacity: int, n_channels: int
    ) -> SlotTable:
        """Create a table of `n_slots` empty slots; this process owns it."""
        if n_slots < 1 or max_items < 1 or payload_capacity < 0 or n_channels < 1:
            raise ConfigError("slot table sizes must be positive")
        size = cls._size(n_slots, max_items, payload_capacity, n_channels)
        segment = Segment.create(size)
        header = np.ndarray((5,), dtype="<u4", buffer=segment.buf)
        header[:] = (_MAGIC, n_slots, max_items, payload_capacity, n_channels)
        del header
        handle = SlotTableHandle(segment.name, n_slots, max_items, payload_capacity, n_channels)
        return cls(segment, handle)

    @classmethod
    def attach(cls, handle: SlotTableHandle) -> SlotTable:
        segment = Segment.attach(handle.segment)
        header = np.ndarray((5,), dtype="<u4", buffer=segment.buf)
        expected = (_MAGIC, handle.n_slots, handle.max_items, handle.payload_capacity,
                    handle.n_channels)
        ok = tuple(int(v) for v in header) == expected
        del header
        if not ok:
            segment.close()
            raise ConfigError(f"slot table {handle.segment!r} does not match its handle")
        return cls(segment, handle)

    def __getitem__(self, index: int) -> SendSlot:
        return self._slots[index]

    def __len__(self) -> int:
        return len(self._slots)

    def totals(self) -> np.ndarray:
        """Counters summed over channels (a copy), indexed by :class:`Counter`."""
        return self.counters.sum(axis=0)

    def close(self) -> None:
        """Drop every view and unmap (idempotent)."""
        if self._slots:
            for slot in self._slots:
                slot.payload.release()
            self._slots = []
            del self.counters
        self.segment.close()

    def unlink(self) -> None:
        self.segment.unlink()
