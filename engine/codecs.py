"""Compression codecs for RAM pages: small reusable objects chosen by name.

Every channel process builds its own codec object once and reuses it for
every packet (python-zstandard style).  Compression state never spans packets:
a compressed RAM_PAGES payload is a sequence of self-contained *frames* of at
most 1 MiB of non-zero pages each, and a codec compresses or decompresses one
frame's pages.  The frames' layout and their headers are the wire's
(:mod:`engine.wire.frames`, docs/wire-format.md §2.1).

Decompression is always bounded by the frame's raw size: a frame that produces
more (or less) is a :class:`CompressionError`, never a large allocation.

Ids on the wire: none 0, lz4 1, zstd 2, zlib 3.  Add a codec with
:func:`register_codec`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

from engine.errors import CompressionError, ConfigError


class Codec:
    """One algorithm at one level.  Subclasses implement `compress` / `_decompress`."""

    name = ""
    wire_id = -1
    levels: tuple[int, int] = (0, 0)
    default_level = 0

    def __init__(self, level: int | None = None) -> None:
        self.level = self.default_level if level is None else level
        low, high = self.levels
        if not low <= self.level <= high:
            raise ConfigError(f"{self.name} level must be {low}..{high}, got {self.level}")

    def compress(self, data: memoryview) -> bytes:
        """Compress one frame's pages.  May return more bytes than it got (the
        caller then sends the frame RAW)."""
        raise NotImplementedError

    def decompress(self, data: bytes | memoryview, raw_size: int) -> bytes:
        """Exactly `raw_size` bytes, or CompressionError.  Never allocates more."""
        try:
            out = self._decompress(data, raw_size)
        except CompressionError:
            raise
        except Exception as exc:  # each library has its own error types
            raise CompressionError(f"{self.name}: corrupt frame ({exc})") from exc
        if len(out) != raw_size:
            raise CompressionError(
                f"{self.name}: frame decompressed to {len(out)} bytes, expected {raw_size}"
            )
        return out

    def _decompress(self, data: bytes | memoryview, raw_size: int) -> bytes:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.name} codec, level {self.level}>"


class NoCompression(Codec):
    """``none``: pages travel as they are; there are no frames."""

    name = "none"
    wire_id = 0

    def compress(self, data: memoryview) -> bytes:
        return bytes(data)

    def _decompress(self, data: bytes | memoryview, raw_size: int) -> bytes:
        return bytes(data)


class Lz4Codec(Codec):
    """LZ4 block format; the level is lz4's acceleration-free compression level."""

    name = "lz4"
    wire_id = 1
    levels = (0, 16)   # 0 = fast mode; 1..16 = high compression
    default_level = 0

    def __init__(self, level: int | None = None) -> None:
        super().__init__(level)
        import lz4.block

        self._block = lz4.block

    def compress(self, data: memoryview) -> bytes:
        if self.level == 0:
            return bytes(self._block.compress(data, store_size=False))
        return bytes(self._block.compress(data, mode="high_compression",
                                          compression=self.level, store_size=False))

    def _decompress(self, data: bytes | memoryview, raw_size: int) -> bytes:
        # The safe decoder writes into a buffer of exactly raw_size: it cannot overflow.
        return bytes(self._block.decompress(data, uncompressed_size=raw_size))


class ZstdCodec(Codec):
    """Zstandard; one compressor and one decompressor per channel, reused."""

    name = "zstd"
    wire_id = 2
    levels = (-7, 19)
    default_level = 1

    def __init__(self, level: int | None = None) -> None:
        super().__init__(level)
        import zstandard

        self._zstd = zstandard
        self._compressor = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
        self._decompressor = zstandard.ZstdDecompressor()

    def compress(self, data: memoryview) -> bytes:
        return self._compressor.compress(data)

    def _decompress(self, data: bytes | memoryview, raw_size: int) -> bytes:
        # python-zstandard trusts a frame's declared content size over
        # max_output_size: check the declaration before anything is allocated.
        declared = self._zstd.frame_content_size(data)
        if declared != raw_size:
            raise CompressionError(f"zstd: frame declares {declared} bytes, expected {raw_size}")
        return self._decompressor.decompress(data, max_output_size=raw_size)


class ZlibCodec(Codec):
    name = "zlib"
    wire_id = 3
    levels = (1, 9)
    default_level = 1

    def compress(self, data: memoryview) -> bytes:
        return zlib.compress(data, self.level)

    def _decompress(self, data: bytes | memoryview, raw_size: int) -> bytes:
        stream = zlib.decompressobj()
        out = stream.decompress(data, raw_size)  # at most raw_size bytes come out
        if not stream.eof or stream.unconsumed_tail or stream.unused_data:
            raise CompressionError("zlib: frame is longer than its pages, or truncated")
        return out


@dataclass(frozen=True)
class CodecEntry:
    name: str
    wire_id: int
    factory: Callable[[int | None], Codec]


_REGISTRY: dict[str, CodecEntry] = {}


def register_codec(cls: type[Codec]) -> None:
    """Make a codec available by its name (both sides must have it)."""
    _REGISTRY[cls.name] = CodecEntry(cls.name, cls.wire_id, cls)


for _codec in (NoCompression, Lz4Codec, ZstdCodec, ZlibCodec):
    register_codec(_codec)


def available() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def codec_entry(name: str) -> CodecEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown compression {name!r}; available: {', '.join(available())}") from None


def make_codec(name: str, level: int | None = None) -> Codec:
    """A fresh codec object (one per channel).  Raises ConfigError."""
    return codec_entry(name).factory(level)
