"""A payload kind that exists only for the tests: NOTES, numbered byte strings a
source VMM hands over with the guest paused (say, a console's scroll-back).

It is what a new payload kind is, and all it is: a codec (:class:`NotesCodec`,
its kind header), the two main-process roles (:class:`NotesSaver`, a
switchover saver; :class:`NotesCollector`, a delivery consumer) and one
registration.  Nothing in engine/ or clients/ knows it; channel processes import
this module by name because the registration says so.

Kind header, 8 bytes: note index u32 | pieces u16 | reserved u16; flag 1: the
note's last piece.  A note is sent in pieces of at most MAX_PIECE bytes.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

from engine.errors import RemoteProtocolError
from engine.payload import SlotFields, register_slot_kind
from engine.slots import SendSlot
from engine.wire import packet

NOTES_KIND = 0x4E  # 'N'
MAX_PIECE = 4096
LAST = 1
_HEADER = struct.Struct(">IHH")


class NotesCodec:
    kind = NOTES_KIND
    rule = packet.KindRule("NOTES", flags=LAST, min_header=_HEADER.size, max_header=_HEADER.size,
                           max_payload=MAX_PIECE)

    def encode(self, sequence: int, fields: SlotFields) -> bytes:
        # a0: the note, a1: this piece's number, a2: 1 on its last piece
        return packet.encode_header(NOTES_KIND, LAST if fields.a2 else 0,
                                    _HEADER.pack(fields.a0, fields.a1, 0), fields.payload_length, sequence)

    def decode(self, header: packet.PacketHeader, body: bytes, sequence: int) -> SlotFields:
        if header.sequence != sequence:
            raise RemoteProtocolError(f"NOTES packet sequence {header.sequence}, expected {sequence}")
        note, piece, reserved = _HEADER.unpack(body)
        if reserved:
            raise RemoteProtocolError("NOTES reserved field must be 0")
        return SlotFields(note, piece, int(bool(header.flags & LAST)), header.payload_length)


class NotesSaver:
    """Source: sends `notes` (each in pieces of MAX_PIECE bytes) at switchover."""

    kind = NOTES_KIND

    def __init__(self, notes: list[bytes]) -> None:
        self.notes = notes

    def save(self, send: Callable[[SlotFields, bytes], None]) -> None:
        for index, note in enumerate(self.notes):
            pieces = [note[at:at + MAX_PIECE] for at in range(0, len(note), MAX_PIECE)] or [b""]
            for number, piece in enumerate(pieces):
                send(SlotFields(index, number, int(number == len(pieces) - 1), len(piece)), piece)


class NotesCollector:
    """Destination: puts the pieces back together, whatever order they come in."""

    kind = NOTES_KIND

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.pieces: dict[tuple[int, int], bytes] = {}
        self.last: dict[int, int] = {}
        self.notes: list[bytes] | None = None
        self.thread: str | None = None
        self._lock = threading.Lock()

    def on_delivered(self, slot: SendSlot) -> None:
        self.thread = threading.current_thread().name
        with self._lock:
            key = (slot.a0, slot.a1)
            if key in self.pieces:
                raise RemoteProtocolError(f"note {slot.a0} piece {slot.a1} arrived twice")
            self.pieces[key] = bytes(slot.payload[:slot.payload_length])
            if slot.a2:
                self.last[slot.a0] = slot.a1

    def finish(self) -> None:
        notes = []
        for index in range(self.expected):
            if index not in self.last:
                raise RemoteProtocolError(f"note {index} never ended")
            notes.append(b"".join(self.pieces[(index, n)] for n in range(self.last[index] + 1)))
        self.notes = notes


register_slot_kind(NotesCodec(), __name__)
