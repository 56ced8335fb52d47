"""The destination channel's receive path: PacketReader (engine/channel.py) driving
the sans-IO PacketDecoder over a real socket, payloads read straight into views.

The decoder's rules are fuzzed in tests/property/test_packet_fuzz.py; here: the
driver reads headers exactly, fills a receiver's views from the socket, and
says what the transport did (EOF, short reads: TransportClosedError) apart
from what the peer did wrong (RemoteProtocolError), which the decoder says.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence

import pytest

from engine.channel import PacketReader
from engine.errors import LocalProtocolError, RemoteProtocolError, TransportClosedError
from engine.transport import Connection
from engine.wire import packet

PAGE = packet.PAGE_SIZE
LIMITS = packet.PacketLimits(PAGE, packet_pages=16, block_pages=(32,), codec=1)


class IntoBuffers:
    """A payload receiver of the kind channels run: it yields where each payload
    goes (here: fresh buffers, cut in pieces of `cut` bytes, `extra` bytes more
    than the payload) and keeps what landed there."""

    def __init__(self, cut: int = 1000, extra: int = 0) -> None:
        self.cut, self.extra = cut, extra
        self.got: list[tuple[packet.Packet, bytearray]] = []

    def receive(self, record: packet.Packet) -> Iterator[Sequence[memoryview]]:
        assert isinstance(record, (packet.RamPagesHeader, packet.DeviceChunkHeader))
        length = record.payload_length
        buffer = bytearray(length + self.extra)
        view = memoryview(buffer)
        yield [view[at:at + self.cut] for at in range(0, len(buffer), self.cut)]
        self.got.append((record, buffer))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, Connection]]:
    writer, reader = socket.socketpair()
    conn = Connection(reader, "test peer")
    try:
        yield writer, conn
    finally:
        writer.close()
        conn.close()


def _stream() -> tuple[bytes, bytes, bytes]:
    pages = bytes(range(256)) * (3 * PAGE // 256)
    chunk = b"device state"
    data = (packet.encode_ram_pages(0, 0, 0, 1, [(2, 1, False), (3, 4, True), (9, 2, False)], 3 * PAGE)
            + pages
            + packet.encode_sync(1, 1)
            + packet.encode_device_state(2, "dev", 7, 0, True, len(chunk)) + chunk
            + packet.encode_end(3, 1))
    return data, pages, chunk


def _read_all(reader: PacketReader, receiver: IntoBuffers) -> list[packet.Packet]:
    records = []
    while True:
        event = reader.next_event()
        records.append(event.packet)
        if isinstance(event.packet, packet.EndPacket):
            return records
        if event.payload_length:
            reader.read_payload(receiver, event.packet)


def test_payloads_land_in_the_receivers_views(pair: tuple[socket.socket, Connection]) -> None:
    writer, conn = pair
    data, pages, chunk = _stream()
    writer.sendall(data)
    receiver = IntoBuffers()
    reader = PacketReader(conn, LIMITS, "channel 0")
    records = _read_all(reader, receiver)
    assert [type(r) for r in records] == [packet.RamPagesHeader, packet.SyncPacket,
                                          packet.DeviceChunkHeader, packet.EndPacket]
    assert [bytes(buffer) for _, buffer in receiver.got] == [pages, chunk]
    assert (reader.decoder.sequence, reader.decoder.epoch, reader.decoder.ended) == (4, 2, True)
    writer.sendall(b"x")  # nothing may follow END
    with pytest.raises(RemoteProtocolError, match="after END"):
        reader.next_event()


@pytest.mark.parametrize(("cut_at", "message"), [
    (0, "source closed channel 0 without END"),      # between packets
    (5, "closed the connection mid-packet"),         # inside the common header
    (16, "source closed channel 0 inside a packet"),  # before the kind header
    (20, "closed the connection mid-packet"),        # inside the kind header
])
def test_eof_in_the_headers_is_a_transport_error(pair: tuple[socket.socket, Connection],
                                                 cut_at: int, message: str) -> None:
    writer, conn = pair
    data, _, _ = _stream()
    writer.sendall(data[:cut_at])
    writer.shutdown(socket.SHUT_WR)
    with pytest.raises(TransportClosedError, match=message):
        PacketReader(conn, LIMITS, "channel 0").next_event()


def test_eof_inside_a_payload_is_a_transport_error(pair: tuple[socket.socket, Connection]) -> None:
    writer, conn = pair
    data, _, _ = _stream()
    writer.sendall(data[:16 + 12 + 24 + PAGE])  # headers and one page of three
    writer.shutdown(socket.SHUT_WR)
    reader = PacketReader(conn, LIMITS, "channel 0")
    event = reader.next_event()
    with pytest.raises(TransportClosedError):
        reader.read_payload(IntoBuffers(), event.packet)


def test_a_bad_header_is_a_protocol_error(pair: tuple[socket.socket, Connection]) -> None:
    writer, conn = pair
    writer.sendall(b"XFDP" + bytes(12))
    with pytest.raises(RemoteProtocolError, match="wrong packet magic"):
        PacketReader(conn, LIMITS, "channel 0").next_event()


def test_views_past_the_payload_are_refused_before_a_byte_is_read(
        pair: tuple[socket.socket, Connection]) -> None:
    writer, conn = pair
    data, _, _ = _stream()
    writer.sendall(data)
    reader = PacketReader(conn, LIMITS, "channel 0")
    event = reader.next_event()
    with pytest.raises(RemoteProtocolError, match="overrun payload_length 12288"):
        reader.read_payload(IntoBuffers(extra=1), event.packet)
    assert len(conn.recv_exact(3 * PAGE)) == 3 * PAGE  # the payload is still unread
    with pytest.raises(RemoteProtocolError, match="already failed"):
        reader.next_event()


def test_a_consumer_that_stops_short_is_refused(pair: tuple[socket.socket, Connection]) -> None:
    writer, conn = pair
    data, _, _ = _stream()
    writer.sendall(data)
    reader = PacketReader(conn, LIMITS, "channel 0")
    event = reader.next_event()
    with pytest.raises(RemoteProtocolError, match="ends after 12287 bytes"):
        reader.read_payload(IntoBuffers(extra=-1), event.packet)


def test_a_packet_without_payload_takes_no_views(pair: tuple[socket.socket, Connection]) -> None:
    """All-zero pages: payload_length 0, and a receiver that yields its (no) views."""
    writer, conn = pair
    writer.sendall(packet.encode_ram_pages(0, 0, 0, 1, [(0, 8, True)], 0) + packet.encode_end(1, 0))
    reader = PacketReader(conn, LIMITS, "channel 0")
    event = reader.next_event()
    assert event.payload_length == 0
    receiver = IntoBuffers()
    reader.read_payload(receiver, event.packet)
    assert [bytes(buffer) for _, buffer in receiver.got] == [b""]
    assert isinstance(reader.next_event().packet, packet.EndPacket)


def test_the_next_header_waits_for_the_payload(pair: tuple[socket.socket, Connection]) -> None:
    writer, conn = pair
    data, _, _ = _stream()
    writer.sendall(data)
    reader = PacketReader(conn, LIMITS, "channel 0")
    reader.next_event()
    with pytest.raises(LocalProtocolError, match="payload_done"):
        reader.next_event()
