"""MAC records: integrity for every byte after the hellos when TLS is off (no I/O).

A connection whose hello carries the ``MAC`` flag (docs/wire-format.md §1.1)
carries, after the hellos and in each direction, a stream of records::

    record    length u32 (1 … MAX_RECORD) | data (length bytes) | tag (16)
    tag       AES-256-GMAC(direction key, nonce, sequence u64 ‖ length u32 ‖ data):
              the tag of AES-256-GCM with that nonce, no plaintext, and
              sequence ‖ length ‖ data as the associated data
    nonce     0 u32 ‖ sequence u64 (12 bytes)
    key       HMAC-SHA256(session key, "multifd record " ‖ connection u16 ‖ direction u8)
              connection: MAIN_CONNECTION for the main channel, else the channel id;
              direction: 1 source → destination, 2 destination → source

``sequence`` counts the records of one direction of one connection from 0, so a
record dropped, repeated, reordered or moved to another connection fails its
tag like a flipped bit does.  What the records carry is the same byte stream as
without them: packets and messages may straddle records.  A record is at most
1 MiB, the size of one send (engine/scatter.py SEND_STEP).

GMAC needs a nonce that never repeats under one key, or a forger can learn to
make tags.  The sequence is that nonce: each key belongs to one direction of one
connection of one migration (the session key mixes both hellos' fresh nonces),
and the sequence counts up from 0 along that direction, so no two records under
one key share it (a connection would need 2**64 records to wrap; one migration
sends far fewer).  AES-256-GMAC is the standard GCM tag (NIST SP 800-38D) and
runs on the CPU's AES and carry-less multiply instructions, several times the
speed of HMAC-SHA256.

The I/O driver (engine/link.py) tags a sender's record in one call over a copy
(:meth:`RecordKey.tag`: ``sequence ‖ length`` in front of the data), and feeds a
receiver's tag the record's data as it lands in its destination (guest RAM
included: the destination guest has not run before the commit, and a bad tag
fails the migration before PREPARED) through :meth:`RecordKey.start`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Callable
from typing import Final

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.errors import IntegrityError, LocalProtocolError

MAX_RECORD: Final = 1 << 20
TAG_SIZE: Final = 16
MAIN_CONNECTION: Final = 0xFFFF

# record header, 4 bytes:  0 length u32
_LENGTH = struct.Struct(">I")
HEADER_SIZE: Final = _LENGTH.size
# what the tag covers before the data:  0 sequence u64 | 8 length u32
_TAGGED = struct.Struct(">QI")
PREFIX_SIZE: Final = _TAGGED.size
# the GCM nonce:  0 zero u32 | 4 sequence u64
_NONCE = struct.Struct(">4xQ")
# A receiver's record at most this long is gathered and tagged in one call:
# starting a streaming GCM context costs more than copying this much.
_GATHER = 32 << 10


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


def encode_prefix(sequence: int, length: int) -> bytes:
    """What the tag covers before a record's data: ``sequence ‖ length``."""
    return _TAGGED.pack(sequence, length)


class RunningTag:
    """The tag of one record, fed its data in pieces, in order (:meth:`update`),
    then read once (:meth:`digest`, or :func:`check_tag`)."""

    __slots__ = ("_aead", "_nonce", "_gathered", "_context", "update")
    update: Callable[[bytes | bytearray | memoryview], object]

    def __init__(self, key: RecordKey, sequence: int, length: int) -> None:
        self._nonce = _NONCE.pack(sequence)
        prefix = _TAGGED.pack(sequence, length)
        if length <= _GATHER:  # small (a packet's headers): one call at the end
            self._aead: AESGCM | None = key.aead
            self._gathered = bytearray(prefix)
            self._context = None
            self.update = self._gathered.extend
        else:
            self._aead = None
            context = Cipher(key.algorithm, modes.GCM(self._nonce)).encryptor()
            context.authenticate_additional_data(prefix)
            self._context = context
            self.update = context.authenticate_additional_data

    def digest(self) -> bytes:
        if self._aead is not None:
            return self._aead.encrypt(self._nonce, b"", self._gathered)
        assert self._context is not None
        self._context.finalize()
        return bytes(self._context.tag)


class RecordKey:
    """One direction's key (from :func:`record_key`), its AES key schedule set up
    once for all its records."""

    __slots__ = ("aead", "algorithm")

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise LocalProtocolError(f"a record key is 32 bytes, not {len(key)}")
        self.aead = AESGCM(key)
        self.algorithm = algorithms.AES(key)

    def tag(self, sequence: int, tagged: bytes | bytearray | memoryview) -> bytes:
        """The tag of record `sequence`, given what it covers in one buffer:
        :func:`encode_prefix` followed by the record's data."""
        return self.aead.encrypt(_NONCE.pack(sequence), b"", tagged)


def start_tag(key: RecordKey, sequence: int, length: int) -> RunningTag:
    """The running tag of record `sequence` of `length` bytes: update it with the
    record's data, in order, then :func:`check_tag` or ``digest()``."""
    return RunningTag(key, sequence, length)


def check_tag(tag: RunningTag, received: bytes | bytearray | memoryview, what: str) -> None:
    """Raises IntegrityError unless `received` is the tag's digest."""
    if not hmac.compare_digest(tag.digest(), bytes(received)):
        raise IntegrityError(f"{what}: a record failed its MAC (bytes changed, dropped or "
                             f"reordered in flight)")
