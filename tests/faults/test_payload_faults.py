"""Compressed payloads that must never reach guest memory: refused, cleanly.

A hand-made source (tests/protocol.py) sends crafted packets to a real
destination; the destination must fail with a clear error, write nothing it
should not, and leave nothing behind (leak check).
"""

from __future__ import annotations

import os

import lz4.block
import pytest
import zstandard

from engine import DestinationMigration, MigrationConfig, SourceMigration, codecs
from engine.errors import CompressionError, ConfigError, MigrationError, RemoteProtocolError
from engine.wire import frames, packet
from tests.harness import SECRET, MiB, guest_ram
from tests.protocol import HandMadeSource

FAST = MigrationConfig(handshake_timeout_s=2.0)
PAGE = 4096


def _frames(*parts: tuple[bytes, bool]) -> bytes:
    return b"".join(frames.encode_frame_header(len(data), raw) + data for data, raw in parts)


def _attempt(codec: str, n_pages: int, payload: bytes,
             wire_codec: int | None = None) -> tuple[MigrationError, bytes]:
    """Send one RAM_PAGES packet of `n_pages` pages at page 0; the destination's error
    and its memory's first pages afterwards."""
    with guest_ram(4 * MiB, fill="zero") as dst:
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst, config=FAST,
                                           ram_is_zeroed=True)
        destination.start()
        source = HandMadeSource(destination, list(dst.layout), channels=1, codec=codec)
        try:
            (channel,) = source.join_all()
            wire_id = codecs.codec_entry(codec).wire_id if wire_codec is None else wire_codec
            header = packet.encode_ram_pages(0, 0, wire_id, 1, [(0, n_pages, False)], len(payload))
            channel.sendall(header + payload)
            with pytest.raises(MigrationError) as failure:
                destination.wait(10)
        finally:
            source.close()
        return failure.value, bytes(dst.blocks[0].pages[: n_pages * PAGE])


@pytest.mark.parametrize("codec", ["lz4", "zstd", "zlib"])
def test_corrupted_frame(codec: str) -> None:
    failure, memory = _attempt(codec, 4, _frames((os.urandom(900), False)))
    error = str(failure)
    assert f"{codec}:" in error and ("corrupt" in error or "declares" in error)
    assert type(failure) is CompressionError  # what the codec library said of the bytes
    assert memory == bytes(len(memory))  # nothing was written


@pytest.mark.parametrize(("codec", "packed"), [
    ("lz4", lz4.block.compress(b"x" * 8 * PAGE, store_size=False)),
    ("zstd", zstandard.ZstdCompressor(write_content_size=True).compress(b"x" * 8 * PAGE)),
    ("zlib", __import__("zlib").compress(b"x" * 8 * PAGE)),
], ids=["lz4", "zstd", "zlib"])
def test_frame_that_decompresses_too_large(codec: str, packed: bytes) -> None:
    # Eight pages of data in a frame for four pages: it must not fit anywhere.
    failure, memory = _attempt(codec, 4, _frames((packed, False)))
    assert f"{codec}:" in str(failure) and type(failure) is CompressionError
    assert memory == bytes(len(memory))


def test_raw_frame_of_the_wrong_size() -> None:
    failure, _ = _attempt("lz4", 4, _frames((b"y" * 3 * PAGE, True)))
    assert "RAW frame of 12288 bytes for 16384 bytes of pages" in str(failure)
    assert type(failure) is RemoteProtocolError  # the peer's frame header, not the codec


def test_compressed_frame_not_shorter_than_its_pages() -> None:
    failure, memory = _attempt("lz4", 1, frames.FRAME_HEADER.pack(PAGE) + b"q" * PAGE)
    assert "compressed frame of 4096 bytes for 4096 bytes of pages" in str(failure)
    assert type(failure) is RemoteProtocolError
    assert memory == bytes(PAGE)


def test_frames_overrunning_the_payload_length() -> None:
    frame = lz4.block.compress(b"z" * 4 * PAGE, store_size=False)
    payload = _frames((frame, False))
    with guest_ram(4 * MiB, fill="zero") as dst:
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst, config=FAST)
        destination.start()
        source = HandMadeSource(destination, list(dst.layout), channels=1, codec="lz4")
        try:
            (channel,) = source.join_all()
            # payload_length 8 bytes short of the frame it announces
            header = packet.encode_ram_pages(0, 0, 1, 1, [(0, 4, False)], len(payload) - 8)
            channel.sendall(header + payload)
            with pytest.raises(MigrationError, match="overrun payload_length"):
                destination.wait(10)
        finally:
            source.close()


def test_codec_other_than_negotiated() -> None:
    packed = zstandard.ZstdCompressor(write_content_size=True).compress(b"a" * 4 * PAGE)
    failure, _ = _attempt("lz4", 4, _frames((packed, False)), wire_codec=2)
    assert "codec 2 was not negotiated" in str(failure)


def test_destination_that_does_not_accept_the_codec_refuses_before_any_page() -> None:
    with guest_ram(4 * MiB, fill="text") as src, guest_ram(4 * MiB, fill="zero") as dst:
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst,
                                           accept_codecs=("none", "lz4"))
        destination.start()
        with pytest.raises(ConfigError, match="compression 'zstd' is not accepted here"):
            SourceMigration(src, destination.address, secret=SECRET,
                            config=MigrationConfig(compression="zstd")).run()
        with pytest.raises(ConfigError):
            destination.wait(10)
        assert bytes(dst.blocks[0].pages) == bytes(4 * MiB)  # no page moved
        assert destination.channel_pids() == ()              # no channel was started


def test_unknown_codec_is_refused_by_the_source_itself() -> None:
    with pytest.raises(ConfigError, match="unknown compression 'brotli'"):
        MigrationConfig(compression="brotli").validate()
