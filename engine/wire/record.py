"""MAC records: integrity for every byte after the hellos when TLS is off (no I/O).

A connection whose hello carries the ``MAC`` flag (docs/wire-format.md §1.1)
carries, after the hellos and in each direction, a stream of records::

    record    length u32 (1 … MAX_RECORD) | data (length bytes) | tag (32)
    tag       HMAC-SHA256(direction key, sequence u64 ‖ length u32 ‖ data)
    key       HMAC-SHA256(session key, "multifd record " ‖ connection u16 ‖ direction u8)
              connection: MAIN_CONNECTION for the main channel, else the channel id;
              direction: 1 source → destination, 2 destination → source

``sequence`` counts the records of one direction of one connection from 0, so a
record dropped, repeated, reordered or moved to another connection fails its
tag like a flipped bit does.  What the records carry is the same byte stream as
without them: packets and messages may straddle records.  A record is at most
1 MiB, the size of one send (engine/scatter.py SEND_STEP).

The I/O driver (engine/link.py) feeds the tag the record's data as it lands in
its destination (guest RAM included: the destination guest has not run before
the commit, and a bad tag fails the migration before PREPARED).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from typing import Final

from engine.errors import IntegrityError, LocalProtocolError

MAX_RECORD: Final = 1 << 20
TAG_SIZE: Final = 32
MAIN_CONNECTION: Final = 0xFFFF

# record header, 4 bytes:  0 length u32
_LENGTH = struct.Struct(">I")
HEADER_SIZE: Final = _LENGTH.size
# what the tag covers before the data:  0 sequence u64 | 8 length u32
_TAGGED = struct.Struct(">QI")


class Direction(enum.IntEnum):
    TO_DESTINATION = 1
    TO_SOURCE = 2


def record_key(session_key: bytes, connection: int, direction: Direction) -> bytes:
    """The key of one direction of one connection (`connection`: a channel id, or
    MAIN_CONNECTION)."""
    if not 0 <= connection <= MAIN_CONNECTION:
        raise LocalProtocolError(f"connection {connection} out of range")
    label = b"multifd record " + connection.to_bytes(2, "big") + bytes([direction])
    return hmac.new(session_key, label, hashlib.sha256).digest()


def encode_header(length: int) -> bytes:
    if not 1 <= length <= MAX_RECORD:
        raise LocalProtocolError(f"record length {length} outside 1..{MAX_RECORD}")
    return _LENGTH.pack(length)


def decode_header(data: bytes | bytearray | memoryview) -> int:
    """The data length of a record header.  Raises IntegrityError for a length
    outside 1..MAX_RECORD (a changed length is caught here or by the tag)."""
    (length,) = _LENGTH.unpack(data)
    if not 1 <= length <= MAX_RECORD:
        raise IntegrityError(f"record length {length} outside 1..{MAX_RECORD}: "
                             f"the stream was changed in flight")
    return int(length)


def start_tag(key: bytes, sequence: int, length: int) -> hmac.HMAC:
    """The running tag of record `sequence` of `length` bytes: update it with the
    record's data, in order, then :func:`check_tag` or ``digest()``."""
    return hmac.new(key, _TAGGED.pack(sequence, length), hashlib.sha256)


def check_tag(tag: hmac.HMAC, received: bytes | bytearray | memoryview, what: str) -> None:
    """Raises IntegrityError unless `received` is the tag's digest."""
    if not hmac.compare_digest(tag.digest(), bytes(received)):
        raise IntegrityError(f"{what}: a record failed its MAC (bytes changed, dropped or "
                             f"reordered in flight)")
