"""The snapshot format codec (docs/snapshot-format.md): layout, bytes, and refusals."""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from dataclasses import replace

import numpy as np
import pytest
import xxhash

from engine.errors import SnapshotFormatError
from engine.wire import snapshot_format as fmt

MiB = 1 << 20
SNAP_ID = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")


def test_layout_gives_each_block_a_header_a_bitmap_checksums_and_an_aligned_page_area() -> None:
    layout = fmt.plan_layout([("pc.ram", 64 * MiB), ("vga", 8 * MiB + 4096), ("big", 512 * MiB)])
    ram, vga, big = layout.blocks
    # Block 0 right after the superblock: header, then its bitmap (one bit per
    # page, whole 64-bit words), then its checksums (8 bytes per page, then 8 per
    # 1 MiB chunk), then its pages on the next 1 MiB boundary.
    assert ram.header_offset == 4096 and ram.bitmap_offset == 4096 + 512
    assert ram.bitmap_length(4096) == 16384 // 8
    assert ram.n_chunks(4096) == 64
    assert ram.sums_offset(4096) == 4096 + 512 + 2048 and ram.sums_length(4096) == (16384 + 64) * 8
    assert ram.pages_offset == MiB
    # Block 1's header at the end of block 0's pages; its pages on the next 1 MiB.
    assert vga.header_offset == ram.end == 65 * MiB and vga.bitmap_offset == 65 * MiB + 512
    assert vga.bitmap_length(4096) == 8 * ((2049 + 63) // 64)
    # 8 MiB + 1 page: 9 chunks, the last of one page.
    assert vga.n_chunks(4096) == 9
    assert vga.sums_offset(4096) == 65 * MiB + 512 + 264 and vga.sums_length(4096) == (2049 + 9) * 8
    assert vga.pages_offset == 66 * MiB
    # 512 MiB: 1 MiB (and 4 KiB) of checksums pushes the page area one more MiB out.
    assert big.header_offset == vga.end == 66 * MiB + 8 * MiB + 4096
    assert big.sums_length(4096) == MiB + 4096 and big.pages_offset == 76 * MiB
    # The device area on the 4 KiB after the last page area.
    assert layout.device_area == big.end == 76 * MiB + 512 * MiB


@pytest.mark.parametrize("blocks, match", [
    ([], "1..1024"),
    ([("a", 4096), ("a", 4096)], "two blocks are named 'a'"),
    ([("a", 4097)], "not a positive number of pages"),
    ([("", 4096)], "must be 1..255"),
    ([("x" * 256, 4096)], "must be 1..255"),
])
def test_layout_refuses_bad_blocks(blocks: list, match: str) -> None:
    with pytest.raises(SnapshotFormatError, match=match):
        fmt.plan_layout(blocks)


def test_bitmap_bits_are_little_endian_words() -> None:
    present = np.zeros(130, dtype=np.uint8)
    present[[0, 1, 63, 64, 129]] = 1
    data = fmt.encode_bitmap(present)
    assert len(data) == 24  # 3 words
    words = struct.unpack("<3Q", data)
    assert words == ((1 << 0) | (1 << 1) | (1 << 63), 1 << 0, 1 << 1)
    assert fmt.decode_bitmap(data, 130, expected_present=5).tolist() == [0, 1, 63, 64, 129]


def test_bitmap_refusals() -> None:
    data = bytearray(fmt.encode_bitmap(np.ones(100, dtype=np.uint8)))
    with pytest.raises(SnapshotFormatError, match="past the block's 100 pages"):
        fmt.decode_bitmap(bytes(data[:12]) + b"\xff" + bytes(data[13:]), 100)
    with pytest.raises(SnapshotFormatError, match="bitmap of 8 bytes for 100 pages"):
        fmt.decode_bitmap(bytes(data[:8]), 100)
    with pytest.raises(SnapshotFormatError, match="100 pages present, its block header says 99"):
        fmt.decode_bitmap(bytes(data), 100, expected_present=99)


BITMAP_DIGEST = hashlib.sha256(b"bitmap").digest()
SUMS_DIGEST = hashlib.sha256(b"sums").digest()


def _snapshot(devices: tuple[fmt.DeviceEntry, ...] = ()) -> tuple[fmt.Superblock, bytes, fmt.Metadata]:
    """A consistent superblock + metadata for a file of 2 blocks and `devices`."""
    layout = fmt.plan_layout([("pc.ram", 4 * MiB), ("rom", 64 * 1024)])
    blocks = tuple(replace(b, present_pages=3, bitmap_digest=BITMAP_DIGEST, sums_digest=SUMS_DIGEST)
                   for b in layout.blocks)
    md = fmt.Metadata(blocks, devices, {"live": True}, b"vmm-config")
    meta = fmt.encode_metadata(md)
    meta_offset = layout.device_area + sum(d.size for d in devices)
    sb = fmt.Superblock(fmt.SnapshotFlags.LIVE, 4096, 2, len(devices), meta_offset, len(meta),
                        meta_offset + len(meta), 1_700_000_000_000_000_000, SNAP_ID,
                        hashlib.sha256(meta).digest())
    return sb, meta, md


def test_superblock_round_trip_and_bytes() -> None:
    sb, _, _ = _snapshot()
    data = fmt.encode_superblock(sb)
    assert len(data) == fmt.SUPERBLOCK_SIZE and data[fmt.SUPERBLOCK_USED:] == bytes(4096 - 144)
    assert data[:8] == b"MFDSNAP\x00" and data[8:12] == b"\x03\x00\x00\x00"   # version 3, LE
    assert data[64:80] == SNAP_ID.bytes
    assert data[112:144] == hashlib.sha256(data[:112]).digest()
    assert fmt.decode_superblock(data, sb.file_size) == sb


def test_metadata_round_trip_with_devices() -> None:
    layout = fmt.plan_layout([("pc.ram", 4 * MiB), ("rom", 64 * 1024)])
    start = layout.device_area
    devices = (fmt.DeviceEntry("gpu", 0, ((start, 1000), (start + 1000, 20)), bytes(range(32)),
                               (5, 2**64 - 1)),
               fmt.DeviceEntry("nic", 3, ((start + 1020, 0),), bytes(32), (fmt.chunk_sum(b""),)))
    sb, meta, md = _snapshot(devices)
    decoded = fmt.decode_metadata(meta, sb, md.blocks)
    assert decoded == md
    assert decoded.devices[0].size == 1020 and decoded.vmm_config == b"vmm-config"


def _refuse(data: bytes, file_size: int, match: str) -> None:
    with pytest.raises(SnapshotFormatError, match=match):
        fmt.decode_superblock(data, file_size)


def _resign(data: bytes) -> bytes:
    """Recompute the header digest after a field was changed (a writer's bug)."""
    body = data[:112]
    return body + hashlib.sha256(body).digest() + data[144:]


def test_superblock_refusals() -> None:
    sb, _, _ = _snapshot()
    good = fmt.encode_superblock(sb)
    _refuse(good[:100], 100, "too short to be a snapshot")
    _refuse(bytes(4096), sb.file_size, "no snapshot header")
    _refuse(b"NOTASNAP" + good[8:], sb.file_size, "not a multifd snapshot")
    for older in (1, 2):  # 2: page checksums but no chunk checksums
        _refuse(_resign(good[:8] + struct.pack("<I", older) + good[12:]), sb.file_size,
                rf"snapshot format version {older} is not supported by this multifd \(3\); re-save it")
    _refuse(_resign(good[:8] + struct.pack("<I", 4) + good[12:]), sb.file_size,
            r"version 4 is not supported by this multifd \(3\)$")
    _refuse(good[:20] + b"\x00" + good[21:], sb.file_size, "header is damaged")
    _refuse(_resign(good[:12] + struct.pack("<I", 6) + good[16:]), sb.file_size, "unknown snapshot flags")
    _refuse(_resign(good[:28] + struct.pack("<I", 7) + good[32:]), sb.file_size, "reserved field is 0x7")
    _refuse(_resign(good[:16] + struct.pack("<I", 8192) + good[20:]), sb.file_size, "page size 8192")
    _refuse(good, sb.file_size - 1, "truncated")
    _refuse(good, sb.file_size + 1, "longer than it was written")
    past = _resign(good[:32] + struct.pack("<Q", sb.file_size) + good[40:])
    _refuse(past, sb.file_size, "metadata at .* lies outside the file")


def test_metadata_refusals() -> None:
    sb, meta, md = _snapshot()

    def refuse(metadata: fmt.Metadata | bytes, match: str, **sb_changes: object) -> None:
        raw = metadata if isinstance(metadata, bytes) else fmt.encode_metadata(metadata)
        blocks = md.blocks if isinstance(metadata, bytes) else metadata.blocks
        header = replace(sb, meta_length=len(raw), meta_digest=hashlib.sha256(raw).digest(),
                         file_size=sb.meta_offset + len(raw))
        header = replace(header, **sb_changes)  # type: ignore[arg-type]
        with pytest.raises(SnapshotFormatError, match=match):
            fmt.decode_metadata(raw, header, blocks)

    ram, rom = md.blocks
    with pytest.raises(SnapshotFormatError, match="metadata is damaged"):
        fmt.decode_metadata(meta[:-1] + b"X", sb, md.blocks)
    refuse(replace(md, blocks=(ram,)), "1 block headers for 2 blocks")
    refuse(replace(md, blocks=(ram, replace(rom, name="pc.ram"))), "two blocks are named")
    refuse(meta[:-3], "ends early")
    refuse(meta + b"??", "unexpected bytes after the metadata")
    # Info that is not strict JSON (it would not print as JSON), or nested past what
    # Python parses (a RecursionError escaped the exception tree).
    info = json.dumps(md.info, sort_keys=True).encode()
    at = meta.index(info)
    for blob in (b'{"a": NaN}', b'{"a": -Infinity}', b'{"a":' * 5000 + b"1" + b"}" * 5000):
        crafted = meta[:at - 4] + struct.pack("<I", len(blob)) + blob + meta[at + len(info):]
        refuse(crafted, "info is not JSON")
    with pytest.raises(SnapshotFormatError, match="info is not JSON"):  # the writer refuses it too
        fmt.encode_metadata(replace(md, info={"a": float("nan")}))
    refuse(replace(md, blocks=(replace(ram, bitmap_offset=sb.file_size), rom)),
           "bitmap of block 'pc.ram' .* points outside")
    refuse(replace(md, blocks=(ram, replace(rom, pages_offset=ram.pages_offset + 4096))),
           "the pages of block 'rom' overlaps the pages of block 'pc.ram'")
    refuse(replace(md, blocks=(replace(ram, pages_offset=ram.pages_offset + 512), rom)),
           "not page-aligned")
    refuse(replace(md, blocks=(replace(ram, present_pages=10**6), rom)), "pages present of 1024")
    refuse(replace(md, blocks=(replace(ram, pages_offset=0), rom)), "overlaps the header")
    refuse(replace(md, blocks=(ram, replace(rom, pages_offset=4096))),
           "the pages of block 'rom' overlaps the header of block 'pc.ram'")
    area = sb.meta_offset - 100
    chunk = fmt.DeviceEntry("gpu", 0, ((area, 100),), bytes(32), (7,))
    refuse(replace(md, devices=(chunk, chunk)), "share an", n_devices=2)
    refuse(replace(md, devices=(replace(chunk, chunks=((sb.meta_offset + 10**6, 100),)),)),
           "chunk of device 'gpu'/0 .* points outside", n_devices=1)
    refuse(replace(md, devices=(replace(chunk, chunks=(), chunk_sums=()),)), "has no chunks", n_devices=1)
    with pytest.raises(SnapshotFormatError, match="2 checksums for 1 chunks"):
        fmt.encode_metadata(replace(md, devices=(replace(chunk, chunk_sums=(1, 2)),)))
    refuse(replace(md, devices=(replace(chunk, chunks=((0, 2 * MiB),)),)), "a chunk over", n_devices=1)
    bad_info = fmt.encode_metadata(md).replace(b'{"live": true}', b'["live", 1111]')
    refuse(bad_info, "not a JSON object")


def test_block_header_bytes_and_round_trip() -> None:
    sb, _, md = _snapshot()
    rom = md.blocks[1]
    data = fmt.encode_block_header(1, rom)
    assert len(data) == fmt.BLOCK_HEADER_SIZE and data[408:] == bytes(512 - 408)
    assert data[:8] == b"MFDBLOCK" and data[8:12] == b"\x01\x00\x00\x00"   # index 1, LE
    assert data[12] == 3 and data[13:16] == b"rom" and data[16:268] == bytes(252)
    assert struct.unpack_from("<IQQQQQ", data, 268) == (0, rom.size, rom.bitmap_offset,
                                                        rom.bitmap_offset + 8, rom.pages_offset, 3)
    assert data[312:344] == BITMAP_DIGEST and data[344:376] == SUMS_DIGEST
    assert data[376:408] == hashlib.sha256(data[:376]).digest()
    assert fmt.decode_block_header(data, rom.header_offset, 1, sb) == rom


def test_block_header_refusals() -> None:
    sb, _, md = _snapshot()
    ram = md.blocks[0]
    at = ram.header_offset

    def refuse(data: bytes, match: str, index: int = 0, file_size: int = sb.file_size) -> None:
        with pytest.raises(SnapshotFormatError, match=match):
            fmt.decode_block_header(data, at, index, replace(sb, file_size=file_size))

    def signed(block: fmt.BlockEntry, index: int = 0) -> bytes:
        return fmt.encode_block_header(index, block)

    good = signed(ram)
    refuse(good[:100], "header at 4096 lies outside the file")
    refuse(bytes(512), "no block header at 4096")
    refuse(good[:300] + b"\xff" + good[301:], "its header is damaged")
    refuse(good, "says it is block 0, not 1", index=1)
    body = bytearray(good[:376])
    body[268] = 1  # the reserved field, re-signed
    refuse(bytes(body) + hashlib.sha256(body).digest() + good[408:], "reserved field is 0x1")
    body = bytearray(good[:376])
    body[288] += 8  # sums_offset, re-signed
    refuse(bytes(body) + hashlib.sha256(body).digest() + good[408:], "checksums at .* not right after")
    refuse(signed(replace(ram, size=4097)), "not a positive number of pages")
    refuse(signed(replace(ram, bitmap_offset=at + 1024)), "not right after its header")
    refuse(signed(replace(ram, pages_offset=at + 4096 + 512)), "not page-aligned")
    refuse(signed(replace(ram, pages_offset=at + 4096)), "overlap its page checksums")
    refuse(signed(replace(ram, present_pages=1025)), "1025 pages present of 1024")
    refuse(signed(replace(ram, size=1 << 40, pages_offset=3 << 30)),
           "the bitmap of block 'pc.ram' .* points outside")
    refuse(signed(replace(ram, size=1 << 30, pages_offset=4 * MiB)), "the page checksums of block "
           "'pc.ram' .* points outside", file_size=2 * MiB + 4096)
    refuse(good, "the pages of block 'pc.ram' .* points outside", file_size=2 * MiB)
    for digest in ("bitmap_digest", "sums_digest"):
        with pytest.raises(SnapshotFormatError, match="no bitmap or checksum digest"):
            fmt.encode_block_header(0, replace(ram, **{digest: b""}))


def test_bitmap_is_checked_against_its_header() -> None:
    bitmap = fmt.encode_bitmap(np.array([1, 0, 1] + [0] * 61, dtype=np.uint8))
    block = fmt.BlockEntry("pc.ram", 64 * 4096, 4608, MiB, 2, hashlib.sha256(bitmap).digest())
    assert fmt.check_bitmap(block, bitmap, 4096).tolist() == [0, 2]
    with pytest.raises(SnapshotFormatError, match="bitmap of block 'pc.ram' is damaged"):
        fmt.check_bitmap(block, b"\x01" + bitmap[1:], 4096)


def test_page_checksums_are_xxh3_64_per_page_little_endian() -> None:
    pages = bytes(range(256)) * 16 + bytes(4096) + b"\xff" * 4096
    sums = fmt.page_sums(pages)
    assert sums.dtype == np.uint64 and sums.size == 3
    assert sums.tolist() == [xxhash.xxh3_64_intdigest(pages[at:at + 4096]) for at in (0, 4096, 8192)]
    # Each page's checksum is an 8-byte little-endian word at 8 * page; the chunk
    # words follow the page words.
    raw = fmt.encode_sums(sums, np.array([fmt.chunk_sum(pages)], dtype=np.uint64))
    assert raw[8:16] == xxhash.xxh3_64_intdigest(bytes(4096)).to_bytes(8, "little")
    assert raw[24:32] == xxhash.xxh3_64_intdigest(pages).to_bytes(8, "little") and len(raw) == 32
    damaged = bytearray(pages)
    damaged[4096 + 17] ^= 0x01
    damaged[8192:8192 + 100] = bytes(100)
    assert fmt.damaged_pages(damaged, sums).tolist() == [1, 2]
    assert fmt.damaged_pages(memoryview(pages), sums).tolist() == []


def test_checksum_array_is_checked_against_its_header() -> None:
    sums = np.array([7, 0, 9] + [0] * 61, dtype=np.uint64)
    raw = fmt.encode_sums(sums, np.array([2**64 - 5], dtype=np.uint64))
    block = fmt.BlockEntry("pc.ram", 64 * 4096, 4608, MiB, 2, BITMAP_DIGEST, hashlib.sha256(raw).digest())
    present = np.array([0, 2])
    pages, chunks = fmt.check_sums(block, raw, present, 4096)
    assert pages.tolist() == sums.tolist() and chunks.tolist() == [2**64 - 5]
    with pytest.raises(SnapshotFormatError, match="page checksums of block 'pc.ram' are damaged"):
        fmt.check_sums(block, b"\x08" + raw[1:], present, 4096)
    with pytest.raises(SnapshotFormatError, match="page checksums of block 'pc.ram' are damaged"):
        fmt.check_sums(block, raw[:-8], present, 4096)
    with pytest.raises(SnapshotFormatError, match="marks absent has a checksum"):
        fmt.check_sums(block, raw, np.array([0]), 4096)
