"""The snapshot format codec (docs/snapshot-format.md): layout, bytes, and refusals."""

from __future__ import annotations

import hashlib
import struct
import uuid
from dataclasses import replace

import numpy as np
import pytest

from engine import snapshot_format as fmt
from engine.errors import SnapshotFormatError

MiB = 1 << 20
SNAP_ID = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")


def test_layout_aligns_page_areas_and_packs_bitmaps() -> None:
    layout = fmt.plan_layout([("pc.ram", 64 * MiB), ("vga", 8 * MiB + 4096)])
    ram, vga = layout.blocks
    # Bitmaps right after the superblock, one bit per page, whole 64-bit words.
    assert ram.bitmap_offset == 4096 and ram.bitmap_length(4096) == 16384 // 8
    assert vga.bitmap_offset == 4096 + 2048 and vga.bitmap_length(4096) == 8 * ((2049 + 63) // 64)
    # Page areas on 1 MiB, in block order; the device area after the last one.
    assert ram.pages_offset == MiB
    assert vga.pages_offset == MiB + 64 * MiB
    assert layout.device_area == vga.pages_offset + 8 * MiB + 4096
    assert layout.device_area % 4096 == 0


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
    with pytest.raises(SnapshotFormatError, match="100 pages present, the block table says 99"):
        fmt.decode_bitmap(bytes(data), 100, expected_present=99)


def _snapshot(devices: tuple[fmt.DeviceEntry, ...] = ()) -> tuple[fmt.Superblock, bytes, fmt.Metadata]:
    """A consistent superblock + metadata for a file of 2 blocks and `devices`."""
    layout = fmt.plan_layout([("pc.ram", 4 * MiB), ("rom", 64 * 1024)])
    blocks = tuple(replace(b, present_pages=3) for b in layout.blocks)
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
    assert data[:8] == b"MFDSNAP\x00" and data[8:12] == b"\x01\x00\x00\x00"   # version 1, LE
    assert data[64:80] == SNAP_ID.bytes
    assert data[112:144] == hashlib.sha256(data[:112]).digest()
    assert fmt.decode_superblock(data, sb.file_size) == sb


def test_metadata_round_trip_with_devices() -> None:
    layout = fmt.plan_layout([("pc.ram", 4 * MiB), ("rom", 64 * 1024)])
    start = layout.device_area
    devices = (fmt.DeviceEntry("gpu", 0, ((start, 1000), (start + 1000, 20)), bytes(range(32))),
               fmt.DeviceEntry("nic", 3, ((start + 1020, 0),), bytes(32)))
    sb, meta, md = _snapshot(devices)
    decoded = fmt.decode_metadata(meta, sb)
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
    _refuse(_resign(good[:8] + struct.pack("<I", 2) + good[12:]), sb.file_size, "version 2 is not supported")
    _refuse(good[:20] + b"\x00" + good[21:], sb.file_size, "header is damaged")
    _refuse(_resign(good[:12] + struct.pack("<I", 6) + good[16:]), sb.file_size, "unknown snapshot flags")
    _refuse(_resign(good[:16] + struct.pack("<I", 8192) + good[20:]), sb.file_size, "page size 8192")
    _refuse(good, sb.file_size - 1, "truncated")
    _refuse(good, sb.file_size + 1, "longer than it was written")
    past = _resign(good[:32] + struct.pack("<Q", sb.file_size) + good[40:])
    _refuse(past, sb.file_size, "metadata at .* lies outside the file")


def test_metadata_refusals() -> None:
    sb, meta, md = _snapshot()

    def refuse(metadata: fmt.Metadata | bytes, match: str, **sb_changes: object) -> None:
        raw = metadata if isinstance(metadata, bytes) else fmt.encode_metadata(metadata)
        header = replace(sb, meta_length=len(raw), meta_digest=hashlib.sha256(raw).digest(),
                         file_size=sb.meta_offset + len(raw))
        header = replace(header, **sb_changes)  # type: ignore[arg-type]
        with pytest.raises(SnapshotFormatError, match=match):
            fmt.decode_metadata(raw, header)

    ram, rom = md.blocks
    with pytest.raises(SnapshotFormatError, match="metadata is damaged"):
        fmt.decode_metadata(meta[:-1] + b"X", sb)
    refuse(meta[:-3], "ends early")
    refuse(meta + b"??", "unexpected bytes after the metadata")
    refuse(replace(md, blocks=(replace(ram, bitmap_offset=sb.file_size), rom)),
           "bitmap of block 'pc.ram' .* points outside")
    refuse(replace(md, blocks=(ram, replace(rom, pages_offset=ram.pages_offset + 4096))),
           "the pages of block 'rom' overlaps the pages of block 'pc.ram'")
    refuse(replace(md, blocks=(replace(ram, pages_offset=ram.pages_offset + 512), rom)),
           "not page-aligned")
    refuse(replace(md, blocks=(replace(ram, present_pages=10**6), rom)), "pages present of 1024")
    refuse(replace(md, blocks=(replace(ram, pages_offset=0), rom)), "overlaps the header")
    area = sb.meta_offset - 100
    chunk = fmt.DeviceEntry("gpu", 0, ((area, 100),), bytes(32))
    refuse(replace(md, devices=(chunk, chunk)), "share an", n_devices=2)
    refuse(replace(md, devices=(replace(chunk, chunks=((sb.meta_offset + 10**6, 100),)),)),
           "chunk of device 'gpu'/0 .* points outside", n_devices=1)
    refuse(replace(md, devices=(replace(chunk, chunks=()),)), "has no chunks", n_devices=1)
    refuse(replace(md, devices=(replace(chunk, chunks=((0, 2 * MiB),)),)), "a chunk over", n_devices=1)
    bad_info = fmt.encode_metadata(md).replace(b'{"live": true}', b'["live", 1111]')
    refuse(bad_info, "not a JSON object")
