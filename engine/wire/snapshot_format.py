"""The snapshot file's layout, encoded and decoded without touching a file (sans-IO).

``docs/snapshot-format.md`` is the byte-by-byte description; this module is its
only implementation.  A snapshot gives every guest page a fixed place, so N
channel processes write and read pages in parallel with positional I/O, and a
page saved again in a later round overwrites its own place::

    0              superblock (4 KiB): magic, version, where the metadata is, digests
    4096           block 0: header (512 B), then its bitmap (1 bit per page: 1 = its
                   bytes are in the file), then its checksums (8 B per page: xxh3-64
                   of the page; then 8 B per 1 MiB chunk of the block: xxh3-64 of the
                   chunk's RAM, absent pages as zeros), then at the next 1 MiB its page area
                   (page p at pages_offset + p * page_size)
    next 4 KiB     block 1: header, bitmap, checksums, page area ...
    next 4 KiB     device-state chunks, in the order they were saved
    then           metadata: device table (each chunk's place), info, VMM config

Each block header carries its own SHA-256, its bitmap's and its checksum
array's; every present page is covered by its own checksum (:func:`page_sums`),
and every 1 MiB chunk of guest RAM by one more (:func:`chunk_sum`): a save's
channels compute both, a restore checks a chunk's pages by its one word (and names
a damaged page by the page words), or page by page where a chunk is sparse.  The superblock is
written last, after everything else is durable, and names the metadata by
offset, length and SHA-256: a file whose save did not finish has no valid
superblock.  Every decoder here checks what it reads against the file's
size and the other regions, so a damaged file is refused with a clear
:class:`SnapshotFormatError` before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntFlag
from typing import Any

import numpy as np
import xxhash

from engine.errors import SnapshotFormatError
from engine.wire import packet

MAGIC = b"MFDSNAP\x00"
VERSION = 3
PAGE_SUM_SIZE = 8             # one xxh3-64 per page, and one per chunk, little-endian
CHUNK_PAGES = 256             # pages per chunk checksum: 1 MiB of 4 KiB pages
SUPERBLOCK_SIZE = 4096
BLOCK_HEADER_SIZE = 512
BLOCK_MAGIC = b"MFDBLOCK"
PAGE_AREA_ALIGN = 1 << 20     # page areas start on 1 MiB: any O_DIRECT block size divides it
DEVICE_AREA_ALIGN = 4096
MAX_BLOCKS = 1024
MAX_DEVICES = packet.MAX_DEVICES  # a migration's devices (engine/snapshot.py checks a save's)
MAX_NAME = 255
MAX_CHUNK = 1 << 20           # a device chunk, as on the wire (packet.MAX_DEVICE_CHUNK)
MAX_BLOB = 16 << 20           # info JSON and VMM configuration, each
PAGE_SIZES = (4096,)


class SnapshotFlags(IntFlag):
    LIVE = 1 << 0             # saved while the guest ran (rounds), not stopped


# magic 8 | version 4 | flags 4 | page_size 4 | n_blocks 4 | n_devices 4 | reserved 4 |
# meta_offset 8 | meta_length 8 | file_size 8 | saved_at_ns 8 | snapshot_id 16 |
# meta_sha256 32 | header_sha256 32 (of every byte before it)
_SUPER = struct.Struct("<8sIIIIII QQQQ 16s 32s")
_SUPER_DIGEST_AT = _SUPER.size
SUPERBLOCK_USED = _SUPER.size + 32
# magic 8 | index 4 | name_length 1 | name 255 | reserved 4 | size 8 | bitmap_offset 8 |
# sums_offset 8 | pages_offset 8 | present_pages 8 | bitmap_sha256 32 | sums_sha256 32 |
# header_sha256 32 (of every byte before it)
_BLOCK = struct.Struct("<8sIB255sIQQQQQ32s32s")
_BLOCK_DIGEST_AT = _BLOCK.size
_DEVICE = struct.Struct("<IIQ32s")     # instance_id, n_chunks, size, sha256
_CHUNK = struct.Struct("<QIQ")         # offset, length, xxh3-64 of the chunk
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# ---------------------------------------------------------------------------
# Records.


@dataclass(frozen=True)
class BlockEntry:
    """One RAM block's place in the file."""

    name: str
    size: int
    bitmap_offset: int
    pages_offset: int
    present_pages: int = 0    # pages whose bytes are in the file (bits set)
    bitmap_digest: bytes = b""  # SHA-256 of the bitmap, once written
    sums_digest: bytes = b""    # SHA-256 of the page checksums, once written

    @property
    def header_offset(self) -> int:
        return self.bitmap_offset - BLOCK_HEADER_SIZE

    @property
    def end(self) -> int:
        """Where the next block's header goes: the 4 KiB after this page area."""
        return _round_up(self.pages_offset + self.size, DEVICE_AREA_ALIGN)

    def n_pages(self, page_size: int) -> int:
        return self.size // page_size

    def bitmap_length(self, page_size: int) -> int:
        return bitmap_length(self.n_pages(page_size))

    def sums_offset(self, page_size: int) -> int:
        """The page checksums: right after the bitmap."""
        return self.bitmap_offset + self.bitmap_length(page_size)

    def n_chunks(self, page_size: int) -> int:
        return n_chunks(self.n_pages(page_size))

    def sums_length(self, page_size: int) -> int:
        """The checksum array: a word per page, then a word per chunk."""
        return (self.n_pages(page_size) + self.n_chunks(page_size)) * PAGE_SUM_SIZE


@dataclass(frozen=True)
class DeviceEntry:
    """One device's saved stream: its chunks in order (the last is the config part)."""

    idstr: str
    instance_id: int
    chunks: tuple[tuple[int, int], ...]   # (file offset, length)
    digest: bytes                          # SHA-256 of the whole stream
    chunk_sums: tuple[int, ...] = ()       # per chunk: its checksum (chunk_sum)

    @property
    def size(self) -> int:
        return sum(length for _, length in self.chunks)


@dataclass(frozen=True)
class Superblock:
    flags: SnapshotFlags
    page_size: int
    n_blocks: int
    n_devices: int
    meta_offset: int
    meta_length: int
    file_size: int
    saved_at_ns: int
    snapshot_id: uuid.UUID
    meta_digest: bytes
    version: int = VERSION


@dataclass(frozen=True)
class Metadata:
    blocks: tuple[BlockEntry, ...]
    devices: tuple[DeviceEntry, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)   # what saved it, how (JSON)
    vmm_config: bytes = b""                                # the VMM's own, opaque


@dataclass(frozen=True)
class Layout:
    """Where a new snapshot puts each block's header, bitmap and pages, and its device data."""

    page_size: int
    blocks: tuple[BlockEntry, ...]
    device_area: int          # the 4 KiB boundary after the last page area


# ---------------------------------------------------------------------------
# Layout and bitmaps.


def bitmap_length(n_pages: int) -> int:
    """Bytes of a block's bitmap: whole little-endian 64-bit words."""
    return _round_up(n_pages, 64) // 8


def n_chunks(n_pages: int) -> int:
    """Chunks of a block of `n_pages`: CHUNK_PAGES each, the last one may be shorter."""
    return -(-n_pages // CHUNK_PAGES)


def sum_words(block_pages: Sequence[int]) -> tuple[slice, slice, slice]:
    """Where a save's or restore's checksum map (words of PAGE_SUM_SIZE bytes, one
    segment shared with the channels) keeps, for blocks of `block_pages` pages,
    blocks in order within each: every page's checksum, every chunk's, then (a
    restore's only) every chunk's present pages."""
    n_pages = sum(block_pages)
    chunks_end = n_pages + sum(n_chunks(n) for n in block_pages)
    return slice(0, n_pages), slice(n_pages, chunks_end), slice(chunks_end, 2 * chunks_end - n_pages)


def plan_layout(blocks: Sequence[tuple[str, int]], page_size: int = 4096) -> Layout:
    """Offsets for a snapshot of RAM with `blocks` (name, size)."""
    _check_blocks(blocks, page_size)
    at = SUPERBLOCK_SIZE
    entries = []
    for name, size in blocks:
        bitmap_at = at + BLOCK_HEADER_SIZE
        sums_at = bitmap_at + bitmap_length(size // page_size)
        n_pages = size // page_size
        pages_at = _round_up(sums_at + (n_pages + n_chunks(n_pages)) * PAGE_SUM_SIZE, PAGE_AREA_ALIGN)
        entries.append(BlockEntry(name, size, bitmap_at, pages_at))
        at = entries[-1].end
    return Layout(page_size, tuple(entries), at)


def _check_blocks(blocks: Sequence[tuple[str, int]], page_size: int) -> None:
    if page_size not in PAGE_SIZES:
        raise SnapshotFormatError(f"page size {page_size} is not supported (only {PAGE_SIZES})")
    if not 1 <= len(blocks) <= MAX_BLOCKS:
        raise SnapshotFormatError(f"{len(blocks)} RAM blocks: a snapshot holds 1..{MAX_BLOCKS}")
    names = set()
    for name, size in blocks:
        if not name or len(name.encode()) > MAX_NAME:
            raise SnapshotFormatError(f"block name {name!r} must be 1..{MAX_NAME} UTF-8 bytes")
        if name in names:
            raise SnapshotFormatError(f"two blocks are named {name!r}")
        names.add(name)
        if size <= 0 or size % page_size:
            raise SnapshotFormatError(f"block {name!r}: size {size} is not a positive number of pages")


def encode_bitmap(present: np.ndarray) -> bytes:
    """One byte per page (non-zero: present) → the block's bitmap bytes.

    Bit p % 64 of little-endian word p // 64 is page p, which is bit p % 8 of
    byte p // 8; bits past the last page are zero.
    """
    bits = np.packbits(np.asarray(present, dtype=bool), bitorder="little").tobytes()
    return bits.ljust(bitmap_length(len(present)), b"\x00")


def decode_bitmap(data: bytes, n_pages: int, expected_present: int | None = None) -> np.ndarray:
    """The bitmap's present pages, as sorted page indices (int64).

    Raises SnapshotFormatError for a bitmap of the wrong length, with a bit set
    past the last page, or with another count of pages than the block table says.
    """
    if len(data) != bitmap_length(n_pages):
        raise SnapshotFormatError(f"bitmap of {len(data)} bytes for {n_pages} pages "
                                  f"(expected {bitmap_length(n_pages)})")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if bits[n_pages:].any():
        raise SnapshotFormatError(f"bitmap marks a page past the block's {n_pages} pages")
    pages = np.flatnonzero(bits[:n_pages]).astype(np.int64)
    if expected_present is not None and pages.size != expected_present:
        raise SnapshotFormatError(f"bitmap marks {pages.size} pages present, its block header "
                                  f"says {expected_present}")
    return pages


def check_bitmap(block: BlockEntry, data: bytes, page_size: int) -> np.ndarray:
    """The present pages of `block` from its bitmap's bytes, checked against its header."""
    if hashlib.sha256(data).digest() != block.bitmap_digest:
        raise SnapshotFormatError(f"the bitmap of block {block.name!r} is damaged (its digest "
                                  f"does not match)")
    return decode_bitmap(data, block.n_pages(page_size), block.present_pages)


# ---------------------------------------------------------------------------
# Page and chunk checksums.


def page_sums(pages: memoryview | bytes | bytearray, page_size: int = 4096) -> np.ndarray:
    """The checksum of each whole page of `pages`: xxh3-64, seed 0, as uint64.

    Hashes the bytes where they are (guest RAM, a read buffer): no copy.
    """
    data = np.frombuffer(pages, dtype=np.uint8)
    n_pages = data.size // page_size
    rows: Iterable[Any] = data[:n_pages * page_size].reshape(n_pages, page_size)
    # One call per page, iterated in C (map over the rows into fromiter): the
    # cheapest way found; a Python loop over slices costs 1.2-1.5x as much.
    return np.fromiter(map(xxhash.xxh3_64_intdigest, rows), dtype=np.uint64, count=n_pages)


def chunk_sum(data: bytes | memoryview) -> int:
    """The checksum of a device-state chunk, or of a RAM chunk (CHUNK_PAGES pages of
    guest RAM as restored, absent pages as zeros): xxh3-64, seed 0."""
    return xxhash.xxh3_64_intdigest(data)


def damaged_pages(pages: memoryview | bytes | bytearray, expected: np.ndarray,
                  page_size: int = 4096) -> np.ndarray:
    """Indices, into `pages`, of the pages whose checksum is not the `expected` one."""
    return np.flatnonzero(page_sums(pages, page_size) != expected)


def encode_sums(sums: np.ndarray, chunk_sums: np.ndarray) -> bytes:
    """A block's checksum array as its bytes: its page words (one uint64 per page),
    then its chunk words (one per chunk), little-endian."""
    return np.asarray(sums, dtype="<u8").tobytes() + np.asarray(chunk_sums, dtype="<u8").tobytes()


def check_sums(block: BlockEntry, data: bytes, present: np.ndarray,
               page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The page checksums of `block` (uint64, one per page) and its chunk checksums
    (one per chunk) from the array's bytes, checked.

    Raises SnapshotFormatError when the bytes do not match the header's digest,
    or when an absent page (`present`: the bitmap's pages) has a checksum other
    than 0 (what a save writes for a page it did not write).
    """
    if len(data) != block.sums_length(page_size) or hashlib.sha256(data).digest() != block.sums_digest:
        raise SnapshotFormatError(f"the page checksums of block {block.name!r} are damaged (their "
                                  f"digest does not match)")
    words = np.frombuffer(data, dtype="<u8").astype(np.uint64)
    n_pages = block.n_pages(page_size)
    sums, chunk_sums = words[:n_pages], words[n_pages:]
    absent = np.ones(sums.size, dtype=bool)
    absent[present] = False
    if sums[absent].any():
        raise SnapshotFormatError(f"block {block.name!r}: a page the bitmap marks absent has a checksum")
    return sums, chunk_sums


# ---------------------------------------------------------------------------
# Block headers.


def encode_block_header(index: int, block: BlockEntry, page_size: int = 4096) -> bytes:
    """Block `index`'s header, padded to BLOCK_HEADER_SIZE, its own digest included."""
    name = block.name.encode()
    if not 1 <= len(name) <= MAX_NAME:
        raise SnapshotFormatError(f"block name {block.name!r} must be 1..{MAX_NAME} UTF-8 bytes")
    if len(block.bitmap_digest) != 32 or len(block.sums_digest) != 32:
        raise SnapshotFormatError(f"block {block.name!r}: no bitmap or checksum digest to write")
    body = _BLOCK.pack(BLOCK_MAGIC, index, len(name), name, 0, block.size, block.bitmap_offset,
                       block.sums_offset(page_size), block.pages_offset, block.present_pages,
                       block.bitmap_digest, block.sums_digest)
    return (body + hashlib.sha256(body).digest()).ljust(BLOCK_HEADER_SIZE, b"\x00")


def decode_block_header(data: bytes, at: int, index: int, sb: Superblock) -> BlockEntry:
    """Check and decode block `index`'s header, read at file offset `at`.

    Checks its digest and that its bitmap follows it, its checksums follow the
    bitmap and its pages lie, page-aligned, after the checksums and inside the
    file; overlaps are :func:`check_regions`' job.
    """
    if len(data) != BLOCK_HEADER_SIZE:
        raise SnapshotFormatError(f"block {index}: header at {at} lies outside the file")
    body = bytes(data[:_BLOCK.size])
    (magic, found_index, name_length, name, reserved, size, bitmap_offset, sums_offset, pages_offset,
     present, bitmap_digest, sums_digest) = _BLOCK.unpack(body)
    if magic != BLOCK_MAGIC:
        raise SnapshotFormatError(f"block {index}: no block header at {at} (magic {magic!r})")
    if hashlib.sha256(body).digest() != bytes(data[_BLOCK_DIGEST_AT:_BLOCK_DIGEST_AT + 32]):
        raise SnapshotFormatError(f"block {index}: its header is damaged (its digest does not match)")
    if reserved:
        raise SnapshotFormatError(f"block {index}: reserved field is {reserved:#x}, not 0")
    if found_index != index:
        raise SnapshotFormatError(f"block header at {at} says it is block {found_index}, not {index}")
    try:
        text = name[:name_length].decode() if 1 <= name_length <= MAX_NAME else ""
    except UnicodeDecodeError:
        text = ""
    if not text:
        raise SnapshotFormatError(f"block {index}: its name is empty or not UTF-8")
    block = BlockEntry(text, size, bitmap_offset, pages_offset, present, bitmap_digest, sums_digest)
    what = f"block {text!r}"
    if size <= 0 or size % sb.page_size:
        raise SnapshotFormatError(f"{what}: size {size} is not a positive number of pages")
    if bitmap_offset != at + BLOCK_HEADER_SIZE:
        raise SnapshotFormatError(f"{what}: bitmap at {bitmap_offset}, not right after its header")
    if pages_offset % sb.page_size:
        raise SnapshotFormatError(f"{what}: pages at {pages_offset}, not page-aligned")
    if sums_offset != block.sums_offset(sb.page_size):
        raise SnapshotFormatError(f"{what}: page checksums at {sums_offset}, not right after its bitmap")
    if pages_offset < sums_offset + block.sums_length(sb.page_size):
        raise SnapshotFormatError(f"{what}: pages at {pages_offset} overlap its page checksums")
    if present > block.n_pages(sb.page_size):
        raise SnapshotFormatError(f"{what}: {present} pages present of {block.n_pages(sb.page_size)}")
    for start, length, region in ((bitmap_offset, block.bitmap_length(sb.page_size), "bitmap"),
                                  (sums_offset, block.sums_length(sb.page_size), "page checksums"),
                                  (pages_offset, size, "pages")):
        if start + length > sb.file_size:
            raise SnapshotFormatError(f"the {region} of {what} ({start} +{length}) points outside "
                                      f"the {sb.file_size}-byte file")
    return block


# ---------------------------------------------------------------------------
# Superblock.


def encode_superblock(sb: Superblock) -> bytes:
    """The superblock, padded to SUPERBLOCK_SIZE, its own digest included."""
    body = _SUPER.pack(
        MAGIC, sb.version, int(sb.flags), sb.page_size, sb.n_blocks, sb.n_devices, 0,
        sb.meta_offset, sb.meta_length, sb.file_size, sb.saved_at_ns, sb.snapshot_id.bytes,
        sb.meta_digest,
    )
    return (body + hashlib.sha256(body).digest()).ljust(SUPERBLOCK_SIZE, b"\x00")


def decode_superblock(data: bytes, file_size: int) -> Superblock:
    """Check and decode the superblock of a file of `file_size` bytes."""
    if file_size < SUPERBLOCK_SIZE or len(data) < SUPERBLOCK_USED:
        raise SnapshotFormatError(f"file of {file_size} bytes is too short to be a snapshot "
                                  f"(truncated, or not one)")
    body = bytes(data[:_SUPER.size])
    (magic, version, flags, page_size, n_blocks, n_devices, reserved, meta_offset, meta_length,
     size, saved_at_ns, snapshot_id, meta_digest) = _SUPER.unpack(body)
    if magic != MAGIC:
        if magic == b"\x00" * 8:
            raise SnapshotFormatError("no snapshot header: the file is empty there, as a save "
                                      "that never finished leaves it")
        raise SnapshotFormatError(f"not a multifd snapshot (magic {magic!r})")
    if version != VERSION:
        advice = "; re-save it" if version < VERSION else ""
        raise SnapshotFormatError(f"snapshot format version {version} is not supported by this "
                                  f"multifd ({VERSION}){advice}")
    if hashlib.sha256(body).digest() != bytes(data[_SUPER_DIGEST_AT:SUPERBLOCK_USED]):
        raise SnapshotFormatError("the snapshot header is damaged (its digest does not match)")
    if flags & ~int(SnapshotFlags.LIVE):
        raise SnapshotFormatError(f"unknown snapshot flags {flags:#x}")
    if reserved:  # §9: refused, so a later version may give it a meaning
        raise SnapshotFormatError(f"the snapshot header's reserved field is {reserved:#x}, not 0")
    if page_size not in PAGE_SIZES:
        raise SnapshotFormatError(f"page size {page_size} is not supported")
    if size != file_size:
        what = "truncated" if file_size < size else "longer than it was written"
        raise SnapshotFormatError(f"snapshot is {what}: {file_size} bytes, its header says {size}")
    if not 1 <= n_blocks <= MAX_BLOCKS or n_devices > MAX_DEVICES:
        raise SnapshotFormatError(f"{n_blocks} blocks and {n_devices} devices: out of range")
    if meta_offset < SUPERBLOCK_SIZE or meta_length > file_size or meta_offset > file_size - meta_length:
        raise SnapshotFormatError(f"metadata at {meta_offset} (+{meta_length}) lies outside the file")
    return Superblock(SnapshotFlags(flags), page_size, n_blocks, n_devices, meta_offset, meta_length,
                      size, saved_at_ns, uuid.UUID(bytes=snapshot_id), meta_digest, version)


# ---------------------------------------------------------------------------
# Metadata.


def _name(text: str, what: str) -> bytes:
    raw = text.encode()
    if not 1 <= len(raw) <= MAX_NAME:
        raise SnapshotFormatError(f"{what} {text!r} must be 1..{MAX_NAME} UTF-8 bytes")
    return _U8.pack(len(raw)) + raw


def encode_metadata(md: Metadata) -> bytes:
    """The metadata's bytes: devices, info, VMM config (the blocks have their own headers)."""
    out = bytearray()
    for device in md.devices:
        out += _name(device.idstr, "device idstr")
        out += _DEVICE.pack(device.instance_id, len(device.chunks), device.size, device.digest)
        if len(device.chunk_sums) != len(device.chunks):
            raise SnapshotFormatError(f"device {device.idstr!r}/{device.instance_id}: "
                                      f"{len(device.chunk_sums)} checksums for {len(device.chunks)} chunks")
        for (offset, length), chunk_sum in zip(device.chunks, device.chunk_sums):
            out += _CHUNK.pack(offset, length, chunk_sum)
    try:  # what the reader takes: strict JSON
        info = json.dumps(md.info, sort_keys=True, allow_nan=False).encode()
    except ValueError as exc:
        raise SnapshotFormatError(f"the snapshot's info is not JSON: {exc}") from None
    for blob in (info, md.vmm_config):
        if len(blob) > MAX_BLOB:
            raise SnapshotFormatError(f"info or VMM configuration over {MAX_BLOB} bytes")
        out += _U32.pack(len(blob)) + blob
    return bytes(out)


class _Reader:
    """Reads the metadata's fields in order; running short is a damaged file."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.at:
            raise SnapshotFormatError("the snapshot's metadata ends early")
        chunk = self.data[self.at:self.at + n]
        self.at += n
        return chunk

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        return layout.unpack(self.take(layout.size))

    def name(self, what: str) -> str:
        (length,) = self.unpack(_U8)
        try:
            text = self.take(length).decode()
        except UnicodeDecodeError:
            raise SnapshotFormatError(f"a {what} is not UTF-8") from None
        if not text:
            raise SnapshotFormatError(f"an empty {what}")
        return text


def decode_metadata(data: bytes, sb: Superblock, blocks: Sequence[BlockEntry]) -> Metadata:
    """Check and decode the metadata the superblock names, for the decoded `blocks`.

    Checks its digest, then that every region of the file — block headers,
    bitmaps, page areas, device chunks — lies inside the file, clear of the
    superblock, the metadata and every other region.
    """
    if len(data) != sb.meta_length or hashlib.sha256(data).digest() != sb.meta_digest:
        raise SnapshotFormatError("the snapshot's metadata is damaged (its digest does not match)")
    if len(blocks) != sb.n_blocks:
        raise SnapshotFormatError(f"{len(blocks)} block headers for {sb.n_blocks} blocks")
    _check_blocks([(b.name, b.size) for b in blocks], sb.page_size)
    reader = _Reader(data)
    devices = []
    for _ in range(sb.n_devices):
        idstr = reader.name("device idstr")
        instance_id, n_chunks, size, digest = reader.unpack(_DEVICE)
        if n_chunks < 1:
            raise SnapshotFormatError(f"device {idstr!r}/{instance_id} has no chunks (not even "
                                      f"its config part)")
        entries = [reader.unpack(_CHUNK) for _ in range(n_chunks)]
        device = DeviceEntry(idstr, instance_id, tuple((offset, length) for offset, length, _ in entries),
                             digest, tuple(chunk_sum for _, _, chunk_sum in entries))
        chunks = device.chunks
        if device.size != size:
            raise SnapshotFormatError(f"device {idstr!r}/{instance_id}: chunks total {device.size} "
                                      f"bytes, its entry says {size}")
        if any(length > MAX_CHUNK for _, length in chunks):
            raise SnapshotFormatError(f"device {idstr!r}/{instance_id}: a chunk over {MAX_CHUNK} bytes")
        devices.append(device)
    if len({(d.idstr, d.instance_id) for d in devices}) != len(devices):
        raise SnapshotFormatError("two device entries share an (idstr, instance_id)")
    blobs = []
    for _ in range(2):
        (length,) = reader.unpack(_U32)
        blobs.append(reader.take(length))
    if reader.at != len(data):
        raise SnapshotFormatError(f"{len(data) - reader.at} unexpected bytes after the metadata")
    try:  # strict JSON: no NaN or Infinity (they would not print as JSON), nesting Python can parse
        info = json.loads(blobs[0], parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise SnapshotFormatError("the snapshot's info is not JSON") from None
    if not isinstance(info, dict):
        raise SnapshotFormatError("the snapshot's info is not a JSON object")
    metadata = Metadata(tuple(blocks), tuple(devices), info, blobs[1])
    check_regions(metadata, sb)
    return metadata


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_regions(md: Metadata, sb: Superblock) -> None:
    """Every region inside the file, none overlapping another, pages page-aligned."""
    regions: list[tuple[int, int, str]] = [(0, SUPERBLOCK_SIZE, "the header"),
                                           (sb.meta_offset, sb.meta_length, "the metadata")]
    for block in md.blocks:
        n_pages = block.n_pages(sb.page_size)
        if block.present_pages > n_pages:
            raise SnapshotFormatError(f"block {block.name!r}: {block.present_pages} pages present "
                                      f"of {n_pages}")
        if block.pages_offset % sb.page_size:
            raise SnapshotFormatError(f"block {block.name!r}: pages at {block.pages_offset}, "
                                      f"not page-aligned")
        regions.append((block.header_offset, BLOCK_HEADER_SIZE, f"the header of block {block.name!r}"))
        regions.append((block.bitmap_offset, block.bitmap_length(sb.page_size),
                        f"the bitmap of block {block.name!r}"))
        regions.append((block.sums_offset(sb.page_size), block.sums_length(sb.page_size),
                        f"the page checksums of block {block.name!r}"))
        regions.append((block.pages_offset, block.size, f"the pages of block {block.name!r}"))
    for device in md.devices:
        name = f"{device.idstr!r}/{device.instance_id}"
        regions += [(offset, length, f"a chunk of device {name}") for offset, length in device.chunks]
    for start, length, what in regions:
        if start < 0 or length < 0 or start + length > sb.file_size:
            raise SnapshotFormatError(f"{what} ({start} +{length}) points outside the "
                                      f"{sb.file_size}-byte file")
    spans = sorted((start, start + length, what) for start, length, what in regions if length)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise SnapshotFormatError(f"{second} overlaps {first}")
