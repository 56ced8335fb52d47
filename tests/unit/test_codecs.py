"""Codecs: round trips, bounded decompression, the registry (frame headers: test_frames.py)."""

from __future__ import annotations

import os
import zlib

import lz4.block
import numpy as np
import pytest
import zstandard

from clients.ram_payload import _cut, zero_runs
from engine import codecs
from engine.errors import CompressionError, ConfigError

TEXT = (b"the quick brown fox jumps over the lazy dog " * 30000)[: 1 << 20]
CODECS = ["lz4", "zstd", "zlib"]


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("data", [TEXT, bytes(4096), os.urandom(8192)], ids=["text", "zero", "random"])
def test_round_trip(name: str, data: bytes) -> None:
    codec = codecs.make_codec(name)
    packed = codec.compress(memoryview(data))
    assert codec.decompress(packed, len(data)) == data


@pytest.mark.parametrize("name", CODECS)
def test_text_compresses(name: str) -> None:
    assert len(codecs.make_codec(name).compress(memoryview(TEXT))) < len(TEXT) // 4


@pytest.mark.parametrize("name", CODECS)
def test_garbage_is_a_compression_error(name: str) -> None:
    with pytest.raises(CompressionError):
        codecs.make_codec(name).decompress(os.urandom(1000), 4096)


@pytest.mark.parametrize("name", CODECS)
def test_a_frame_that_decodes_to_more_is_refused(name: str) -> None:
    codec = codecs.make_codec(name)
    packed = codec.compress(memoryview(TEXT))  # 1 MiB of pages...
    with pytest.raises(CompressionError):
        codec.decompress(packed, 4096)          # ...claimed to be one page


@pytest.mark.parametrize("name", CODECS)
def test_a_frame_that_decodes_to_less_is_refused(name: str) -> None:
    codec = codecs.make_codec(name)
    with pytest.raises(CompressionError):
        codec.decompress(codec.compress(memoryview(TEXT[:4096])), 8192)


def test_zstd_declared_size_is_checked_before_anything_is_allocated() -> None:
    # A frame declaring more content than its pages hold: python-zstandard would
    # allocate whatever is declared, whatever max_output_size says.
    bigger = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(1 << 20))
    with pytest.raises(CompressionError, match="declares 1048576 bytes, expected 4096"):
        codecs.make_codec("zstd").decompress(bigger, 4096)


def test_zlib_trailing_bytes_are_refused() -> None:
    with pytest.raises(CompressionError, match="longer"):
        codecs.make_codec("zlib").decompress(zlib.compress(TEXT[:4096]) + b"x", 4096)


def test_lz4_levels() -> None:
    fast = codecs.make_codec("lz4", 0).compress(memoryview(TEXT))
    high = codecs.make_codec("lz4", 9).compress(memoryview(TEXT))
    assert lz4.block.decompress(high, uncompressed_size=len(TEXT)) == TEXT
    assert len(high) <= len(fast)


@pytest.mark.parametrize(("name", "level"), [("lz4", 17), ("zstd", 20), ("zlib", 0), ("zlib", 10)])
def test_levels_are_checked(name: str, level: int) -> None:
    with pytest.raises(ConfigError, match="level"):
        codecs.make_codec(name, level)


def test_registry() -> None:
    assert codecs.available() == ("lz4", "none", "zlib", "zstd")
    assert [codecs.codec_entry(n).wire_id for n in ("none", "lz4", "zstd", "zlib")] == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="unknown compression 'brotli'"):
        codecs.make_codec("brotli")


def test_zero_runs_split_by_content() -> None:
    words = np.zeros((32, 512), dtype=np.uint64)
    words[[3, 4, 10, 20]] = 7
    items = np.array([[0, 8], [10, 2], [19, 3]], dtype=np.uint32)
    assert zero_runs(words, items) == [
        (0, 3, True), (3, 2, False), (5, 3, True), (10, 1, False), (11, 1, True),
        (19, 1, True), (20, 1, False), (21, 1, True),
    ]


def test_zero_runs_many_scattered_runs_match_a_reference() -> None:
    rng = np.random.default_rng(3)
    words = np.zeros((4096, 512), dtype=np.uint64)
    words[rng.random(4096) < 0.5, 7] = 1
    pages = np.sort(rng.choice(4096, 600, replace=False))
    items = np.stack([pages, np.ones_like(pages)], axis=1).astype(np.uint32)
    runs = zero_runs(words, items)
    expanded = [(p, zero) for first, count, zero in runs for p in range(first, first + count)]
    assert expanded == [(int(p), not words[p].any()) for p in pages]


def test_cut_into_frames() -> None:
    data = memoryview(bytearray(range(256)) * 40)
    views = [data[0:3000], data[3000:3001], data[3001:10240]]
    frames = _cut(views, 4096)
    assert [sum(v.nbytes for v in f) for f in frames] == [4096, 4096, 2048]
    assert b"".join(bytes(v) for f in frames for v in f) == bytes(data)
