"""Property tests of the snapshot format codec.

Any layout, block header and metadata round-trip exactly; and a superblock,
block header or metadata with any bytes changed decodes to exactly what was
written or is refused with SnapshotFormatError — never another exception, never
a region outside the file.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import replace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import SnapshotFormatError
from engine.wire import snapshot_format as fmt

names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)
block_lists = st.lists(st.tuples(names, st.integers(1, 300).map(lambda pages: pages * 4096)),
                       min_size=1, max_size=5, unique_by=lambda block: block[0])


@st.composite
def snapshots(draw: st.DrawFn) -> tuple[fmt.Superblock, tuple[fmt.BlockEntry, ...], bytes]:
    """A consistent superblock, blocks and metadata, as a save writes them."""
    layout = fmt.plan_layout(draw(block_lists))
    blocks = tuple(replace(b, present_pages=draw(st.integers(0, b.n_pages(4096))),
                           bitmap_digest=draw(st.binary(min_size=32, max_size=32)),
                           sums_digest=draw(st.binary(min_size=32, max_size=32)))
                   for b in layout.blocks)
    at = layout.device_area
    devices = []
    for index in range(draw(st.integers(0, 3))):
        lengths = draw(st.lists(st.integers(0, 5000), min_size=1, max_size=4))
        chunks = []
        for length in lengths:
            chunks.append((at, length))
            at += length
        devices.append(fmt.DeviceEntry(f"dev{index}", draw(st.integers(0, 2**32 - 1)), tuple(chunks),
                                       draw(st.binary(min_size=32, max_size=32)),
                                       tuple(draw(st.integers(0, 2**64 - 1)) for _ in chunks)))
    info = draw(st.dictionaries(st.text(max_size=5), st.integers() | st.booleans(), max_size=3))
    metadata = fmt.encode_metadata(fmt.Metadata(blocks, tuple(devices), info,
                                                draw(st.binary(max_size=64))))
    superblock = fmt.Superblock(
        draw(st.sampled_from([fmt.SnapshotFlags(0), fmt.SnapshotFlags.LIVE])), 4096, len(blocks),
        len(devices), at, len(metadata), at + len(metadata), draw(st.integers(0, 2**63)),
        uuid.UUID(int=draw(st.integers(0, 2**128 - 1))), hashlib.sha256(metadata).digest(),
    )
    return superblock, blocks, metadata


Snapshot = tuple[fmt.Superblock, tuple[fmt.BlockEntry, ...], bytes]


@settings(max_examples=150, deadline=None)
@given(snapshots())
def test_round_trip(snapshot: Snapshot) -> None:
    superblock, blocks, metadata = snapshot
    assert fmt.decode_superblock(fmt.encode_superblock(superblock), superblock.file_size) == superblock
    for index, block in enumerate(blocks):
        header = fmt.encode_block_header(index, block)
        assert fmt.decode_block_header(header, block.header_offset, index, superblock) == block
    decoded = fmt.decode_metadata(metadata, superblock, blocks)
    assert decoded.blocks == blocks and fmt.encode_metadata(decoded) == metadata


def _check_inside(md: fmt.Metadata, sb: fmt.Superblock) -> None:
    """What a decoder answers keeps every region inside the file."""
    for block in md.blocks:
        assert block.pages_offset + block.size <= sb.file_size
        assert block.bitmap_offset + block.bitmap_length(sb.page_size) <= sb.file_size
        assert block.sums_offset(sb.page_size) + block.sums_length(sb.page_size) <= sb.file_size
    for device in md.devices:
        assert all(offset + length <= sb.file_size for offset, length in device.chunks)


@settings(max_examples=300, deadline=None)
@given(snapshots(), st.data())
def test_corrupt_superblock_is_refused_or_harmless(snapshot: Snapshot, data: st.DataObject) -> None:
    superblock, _, _ = snapshot
    raw = bytearray(fmt.encode_superblock(superblock))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, fmt.SUPERBLOCK_USED - 1))] = data.draw(st.integers(0, 255))
    try:
        decoded = fmt.decode_superblock(bytes(raw), superblock.file_size)
    except SnapshotFormatError:
        return
    assert decoded == superblock  # only a change that changed nothing gets through


@settings(max_examples=300, deadline=None)
@given(snapshots(), st.data())
def test_corrupt_block_header_is_refused_or_harmless(snapshot: Snapshot, data: st.DataObject) -> None:
    superblock, blocks, _ = snapshot
    index = data.draw(st.integers(0, len(blocks) - 1))
    block = blocks[index]
    raw = bytearray(fmt.encode_block_header(index, block))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, 407))] = data.draw(st.integers(0, 255))
    try:
        decoded = fmt.decode_block_header(bytes(raw), block.header_offset, index, superblock)
    except SnapshotFormatError:
        return
    assert decoded == block


@settings(max_examples=300, deadline=None)
@given(snapshots(), st.data())
def test_any_block_header_signed_as_valid_is_checked(snapshot: Snapshot, data: st.DataObject) -> None:
    """A header whose digest matches but whose fields are wrong (a buggy writer)
    still keeps its bitmap and pages inside the file, or is refused."""
    superblock, blocks, _ = snapshot
    index = data.draw(st.integers(0, len(blocks) - 1))
    block = blocks[index]
    body = bytearray(fmt.encode_block_header(index, block)[:376])
    for _ in range(data.draw(st.integers(1, 4))):
        body[data.draw(st.integers(0, 375))] = data.draw(st.integers(0, 255))
    raw = bytes(body) + hashlib.sha256(body).digest() + bytes(512 - 408)
    try:
        decoded = fmt.decode_block_header(raw, block.header_offset, index, superblock)
    except SnapshotFormatError:
        return
    assert decoded.bitmap_offset == block.header_offset + fmt.BLOCK_HEADER_SIZE
    assert decoded.pages_offset + decoded.size <= superblock.file_size
    assert decoded.bitmap_offset + decoded.bitmap_length(4096) == decoded.sums_offset(4096)
    assert decoded.sums_offset(4096) + decoded.sums_length(4096) <= decoded.pages_offset
    assert decoded.sums_offset(4096) + decoded.sums_length(4096) <= superblock.file_size


@settings(max_examples=300, deadline=None)
@given(snapshots(), st.data())
def test_any_metadata_signed_as_valid_is_checked(snapshot: Snapshot, data: st.DataObject) -> None:
    """Even metadata whose digest matches (a buggy or hostile writer) is checked
    field by field: it decodes into regions inside the file, or is refused."""
    superblock, blocks, metadata = snapshot
    raw = bytearray(metadata)
    if raw:
        for _ in range(data.draw(st.integers(1, 6))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw += data.draw(st.binary(max_size=3))
    signed = replace(superblock, meta_length=len(raw), meta_digest=hashlib.sha256(raw).digest(),
                     file_size=superblock.meta_offset + len(raw))
    try:
        decoded = fmt.decode_metadata(bytes(raw), signed, blocks)
    except SnapshotFormatError:
        return
    _check_inside(decoded, signed)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 700), st.data())
def test_bitmap_round_trip(n_pages: int, data: st.DataObject) -> None:
    present = np.array(data.draw(st.lists(st.booleans(), min_size=n_pages, max_size=n_pages)),
                       dtype=np.uint8)
    encoded = fmt.encode_bitmap(present)
    assert len(encoded) == fmt.bitmap_length(n_pages)
    pages = fmt.decode_bitmap(encoded, n_pages, int(present.sum()))
    assert pages.tolist() == np.flatnonzero(present).tolist()
