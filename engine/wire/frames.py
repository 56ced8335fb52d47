"""The frames of a compressed RAM_PAGES payload: the one codec of them, with no I/O.

With a codec (RAM_PAGES ``codec`` ≠ 0) a packet's non-zero pages, in order, are
cut into frames of :data:`FRAME_PAGES` pages (the last one may be shorter), and
each frame travels as a header and its bytes (docs/wire-format.md §2.1)::

    payload := frame ‖ frame ‖ …              as many as the raw size needs
    frame   := header (4) ‖ length bytes
    header  := length u32, big-endian; bit 31 = RAW
               RAW        the pages as they are:  length == the frame's raw size
               otherwise  the codec's encoding:   0 < length < the frame's raw size

A frame that does not shrink goes RAW (guest memory to the socket, and back, with
no copy).  The header is the peer's word for how many bytes follow, so
:func:`decode_frame_header` checks it against the raw size the packet's run
table gave the frame before a byte of it is read; what the codec library says
of the bytes themselves is the codec's (:mod:`engine.codecs`, CompressionError).
"""

from __future__ import annotations

import struct
from typing import Final

from engine.errors import LocalProtocolError, RemoteProtocolError
from engine.wire.packet import PAGE_SIZE, Buffer

FRAME_PAGES: Final = 256                  # pages per frame: 1 MiB
FRAME_BYTES: Final = FRAME_PAGES * PAGE_SIZE
RAW_FLAG: Final = 1 << 31
#  0 length (bits 0-30) | RAW (bit 31)
FRAME_HEADER: Final = struct.Struct(">I")


def payload_bound(raw_size: int) -> int:
    """The largest compressed RAM_PAGES payload for `raw_size` bytes of pages:
    every frame RAW, plus its header."""
    return raw_size + FRAME_HEADER.size * -(-raw_size // FRAME_BYTES)


def encode_frame_header(length: int, raw: bool) -> bytes:
    """The header of a frame of `length` bytes (RAW: the pages as they are).
    Raises LocalProtocolError for a length the header cannot carry."""
    if not 0 < length <= FRAME_BYTES:
        raise LocalProtocolError(f"a frame is 1..{FRAME_BYTES} bytes, not {length}")
    return FRAME_HEADER.pack(length | (RAW_FLAG if raw else 0))


def decode_frame_header(data: Buffer, raw_size: int) -> tuple[int, bool]:
    """(length, is RAW) of the frame whose header is `data`, a frame that must
    cover `raw_size` bytes of pages.

    Raises RemoteProtocolError unless a RAW frame is exactly `raw_size` bytes and
    a compressed one is shorter than that (and not empty); LocalProtocolError if
    `data` is not one header or `raw_size` not a frame's.
    """
    if len(data) != FRAME_HEADER.size or not 0 < raw_size <= FRAME_BYTES:
        raise LocalProtocolError(f"a frame header of {len(data)} bytes for a frame of {raw_size} bytes")
    (word,) = FRAME_HEADER.unpack(data)
    length, raw = word & ~RAW_FLAG, bool(word & RAW_FLAG)
    if raw and length != raw_size:
        raise RemoteProtocolError(f"RAW frame of {length} bytes for {raw_size} bytes of pages")
    if not raw and not 0 < length < raw_size:
        raise RemoteProtocolError(f"compressed frame of {length} bytes for {raw_size} bytes of pages")
    return length, raw
