"""The frames of a compressed RAM_PAGES payload (engine/wire/frames.py): golden
headers, what a peer's header may say, the payload bound."""

from __future__ import annotations

import pytest

from engine.errors import LocalProtocolError, RemoteProtocolError
from engine.wire import frames
from engine.wire.packet import PAGE_SIZE


def test_frame_headers() -> None:
    assert frames.encode_frame_header(100, raw=False) == b"\x00\x00\x00\x64"
    assert frames.encode_frame_header(4096, raw=True) == b"\x80\x00\x10\x00"
    assert frames.decode_frame_header(b"\x00\x00\x00\x64", 4096) == (100, False)
    assert frames.decode_frame_header(memoryview(b"\x80\x00\x10\x00"), 4096) == (4096, True)
    assert frames.FRAME_BYTES == frames.FRAME_PAGES * PAGE_SIZE == 1 << 20


@pytest.mark.parametrize(("header", "error"), [
    (b"\x80\x00\x00\x64", "RAW frame of 100 bytes for 4096"),
    (b"\x00\x00\x10\x00", "compressed frame of 4096 bytes for 4096"),  # not shorter
    (b"\x00\x00\x20\x00", "compressed frame of 8192 bytes for 4096"),
    (b"\x00\x00\x00\x00", "compressed frame of 0 bytes"),
    (b"\xff\xff\xff\xff", "RAW frame of 2147483647 bytes"),
])
def test_a_peers_bad_frame_header_is_a_protocol_error(header: bytes, error: str) -> None:
    """The header is the peer's word for how many bytes follow: a bad one is the
    peer's protocol error (CompressionError is for what the codec says of the bytes)."""
    with pytest.raises(RemoteProtocolError, match=error):
        frames.decode_frame_header(header, 4096)


@pytest.mark.parametrize(("length", "raw_size"), [(3, 0), (5, 4096), (4, frames.FRAME_BYTES + 1)])
def test_decoding_something_that_is_not_a_frame_header_is_the_callers_mistake(length: int,
                                                                              raw_size: int) -> None:
    with pytest.raises(LocalProtocolError):
        frames.decode_frame_header(bytes(length), raw_size)


@pytest.mark.parametrize("length", [0, -1, frames.FRAME_BYTES + 1, frames.RAW_FLAG])
def test_encoding_a_length_no_frame_has_is_refused(length: int) -> None:
    with pytest.raises(LocalProtocolError):
        frames.encode_frame_header(length, raw=False)


def test_payload_bound() -> None:
    frame = frames.FRAME_PAGES * PAGE_SIZE
    assert frames.payload_bound(frame) == frame + 4
    assert frames.payload_bound(frame + 1) == frame + 1 + 8
    assert frames.payload_bound(16 << 20) == (16 << 20) + 4 * 16
    assert frames.payload_bound(PAGE_SIZE) == PAGE_SIZE + 4
