"""Micro-benchmarks of the hot paths that bound throughput (pytest-benchmark).

    make bench-micro          # = pytest bench/test_micro.py --benchmark-only

Each measures one step a channel or the main process takes per packet or per
round, on data shaped as in a migration; pytest-benchmark prints min / median /
ops and, with ``--benchmark-compare``, a regression shows as a number.  Per-MiB
cases set ``extra_info["mib"]`` so that MiB/s = mib / median.  Nothing here is a
pass/fail test of speed: the suite under tests/ never times anything.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
from collections.abc import Iterator

import numpy as np
import pytest

from clients.ram_payload import _split_zero_runs, _words, gather_scratch
from engine import GuestRAM
from engine.channel import ControlOp, post, read_control
from engine.codecs import Lz4Codec, ZlibCodec, ZstdCodec
from engine.slots import SlotTable
from engine.wire import packet, record

MIB = 1 << 20
PAGE = 4096
PACKET_PAGES = 4096  # a 16 MiB packet, the default


def _text_mib() -> memoryview:
    """1 MiB that compresses as guest memory often does (words, repeats, some noise)."""
    rng = np.random.default_rng(1)
    words = [b"page", b"kernel", b"\x00" * 16, b"migration", os.urandom(8), b"struct task"]
    parts = [words[i] for i in rng.integers(0, len(words), MIB // 4)]
    return memoryview(b"".join(parts)[:MIB])


@pytest.mark.parametrize("codec", [Lz4Codec(), ZstdCodec(), ZlibCodec()], ids=repr)
def test_compress_one_mib(benchmark, codec) -> None:
    data = _text_mib()
    benchmark.extra_info["mib"] = 1
    out = benchmark(codec.compress, data)
    assert len(out) < MIB


@pytest.mark.parametrize("codec", [Lz4Codec(), ZstdCodec(), ZlibCodec()], ids=repr)
def test_decompress_one_mib(benchmark, codec) -> None:
    data = _text_mib()
    packed = codec.compress(data)
    benchmark.extra_info["mib"] = 1
    assert benchmark(codec.decompress, packed, MIB) == data


@pytest.fixture(scope="module")
def ram() -> Iterator[GuestRAM]:
    """64 MiB: one page in three holds data, the rest is zero."""
    with GuestRAM.create([("pc.ram", 64 * MIB)]) as made:
        pages = np.frombuffer(made.blocks[0].pages, dtype=np.uint8).reshape(-1, PAGE)
        pages[::3, :8] = 1
        yield made


@pytest.mark.parametrize("shape", ["one-run", "scattered"])
def test_zero_page_scan_of_a_packet(benchmark, ram: GuestRAM, shape: str) -> None:
    """Zero detection over one 16 MiB packet: one contiguous run, or every other page
    (4096 runs of one page, gathered 1 MiB at a time)."""
    words = _words(ram.blocks[0])
    if shape == "one-run":
        items = np.array([[0, PACKET_PAGES]], dtype=np.uint32)
    else:
        items = np.array([[2 * i, 1] for i in range(PACKET_PAGES)], dtype=np.uint32)
    scratch = gather_scratch()
    benchmark.extra_info["mib"] = PACKET_PAGES * PAGE / MIB
    firsts, counts, zero = benchmark(_split_zero_runs, words, items, scratch)
    assert int(counts.sum()) == PACKET_PAGES
    # Page p holds data when p % 3 == 0; both shapes visit as many such pages
    # (one-run: p = i; scattered: p = 2i, data when i % 3 == 0).
    assert int(counts[zero].sum()) == PACKET_PAGES - -(-PACKET_PAGES // 3)


def _runs(n: int) -> list[tuple[int, int, bool]]:
    return [(2 * i, 1, i % 2 == 0) for i in range(n)]


@pytest.mark.parametrize("n_runs", [1, 4096])
def test_packet_header_encode(benchmark, n_runs: int) -> None:
    runs = _runs(n_runs)
    payload = sum(count for _, count, zero in runs if not zero) * PAGE
    benchmark(packet.encode_ram_pages, 7, 0, 0, 1, runs, payload)


@pytest.mark.parametrize("n_runs", [1, 4096])
def test_packet_header_decode(benchmark, n_runs: int) -> None:
    """The channel's decoder on one RAM_PAGES header (the payload is not read here)."""
    runs = _runs(n_runs)
    payload = sum(count for _, count, zero in runs if not zero) * PAGE
    header = packet.encode_ram_pages(0, 0, 0, 1, runs, payload)  # a channel's first packet
    limits = packet.PacketLimits(page_size=PAGE, packet_pages=PACKET_PAGES, block_pages=(1 << 20,))

    def decode() -> packet.PacketStart:
        decoder = packet.PacketDecoder(limits)
        decoder.receive_data(header)
        event = decoder.next_event()
        assert isinstance(event, packet.PacketStart)
        return event

    assert benchmark(decode).payload_length == payload


def test_dirty_map_take(benchmark) -> None:
    """Take a 1 GiB guest's dirty map (262144 pages) with 1 % of its pages dirty."""
    with GuestRAM.create([("pc.ram", 1 << 30)]) as big:
        dirty = big.blocks[0].dirty
        marked = np.arange(0, dirty.__len__(), 100)

        def take() -> np.ndarray:
            dirty.mark_pages(marked)
            return dirty.take()

        assert benchmark(take).size == marked.size


def test_slot_hand_off(benchmark) -> None:
    """One slot filled and handed to a channel and back: header fields written,
    JOB posted, the channel reads it and hands a slot back (IDLE)."""
    table = SlotTable.create(2, max_items=64, payload_capacity=0, n_channels=1)
    main, channel = socket.socketpair()
    try:
        slot = table[0]

        def hand_off() -> None:
            slot.kind = packet.PacketKind.RAM_PAGES
            slot.a0 = 0  # the block
            slot.n_items = 1
            post(main, ControlOp.JOB, 0)
            read_control(channel)
            post(channel, ControlOp.IDLE, 0)
            read_control(main)

        benchmark(hand_off)
    finally:
        main.close()
        channel.close()
        table.close()
        table.unlink()


@pytest.mark.parametrize("size", [20, MIB], ids=["20B-headers", "1MiB"])
@pytest.mark.parametrize("side", ["send", "receive", "hmac-sha256"])
def test_record_tag(benchmark, side: str, size: int) -> None:
    """One MAC record's tag (engine/wire/record.py): the sender copies the data into
    its stage and tags the copy in one call; the receiver feeds the tag the data as
    it lands, 256 KiB at a time (engine/link.py).  `hmac-sha256` is the tag records
    had before AES-256-GMAC, fed the same way as a receiver's, for the ratio.  A
    20-byte record is what a packet's headers cost on their own."""
    secret = os.urandom(32)
    key = record.RecordKey(secret)
    data = memoryview(os.urandom(size))
    stage = memoryview(bytearray(record.PREFIX_SIZE + size))
    benchmark.extra_info["mib"] = size / MIB

    def send() -> bytes:
        stage[:record.PREFIX_SIZE] = record.encode_prefix(7, size)
        stage[record.PREFIX_SIZE:] = data
        return key.tag(7, stage)

    def receive() -> bytes:
        tag = record.start_tag(key, 7, size)
        for at in range(0, size, 256 << 10):
            tag.update(data[at:at + (256 << 10)])
        return tag.digest()

    def former() -> bytes:
        tag = hmac.new(secret, record.encode_prefix(7, size), hashlib.sha256)
        for at in range(0, size, 256 << 10):
            tag.update(data[at:at + (256 << 10)])
        return tag.digest()

    run = {"send": send, "receive": receive, "hmac-sha256": former}[side]
    assert len(benchmark(run)) == (32 if side == "hmac-sha256" else record.TAG_SIZE)
