"""A payload kind defined outside the engine (tests/notes_kind.py: a codec, two
roles, one registration) migrates end to end between a real source and
destination: over the same channels as RAM and devices, with the guest paused."""

from __future__ import annotations

import os

import pytest

from clients.devices import demo_devices
from clients.guest import SyntheticGuest
from engine import DestinationMigration, MigrationConfig, SourceMigration
from engine.errors import MigrationError, RemoteProtocolError
from engine.payload import SlotFields, payload_entry
from engine.wire import packet
from tests.harness import SECRET, MiB, address, guest_ram, same_memory
from tests.notes_kind import MAX_PIECE, NOTES_KIND, NotesCodec, NotesCollector, NotesSaver

CONFIG = MigrationConfig(channels=3, packet_pages=256, verify=True)


def _notes() -> list[bytes]:
    # Empty, one piece, and many pieces (spread over every channel, in any order).
    return [b"", b"boot log", os.urandom(10 * MAX_PIECE + 123), os.urandom(MAX_PIECE)]


@pytest.mark.parametrize("with_devices", [False, True])
def test_a_registered_kind_migrates_beside_ram_and_devices(with_devices: bool) -> None:
    notes = _notes()
    collector = NotesCollector(len(notes))
    sources = demo_devices(2 if with_devices else 0, MiB + 17)
    targets = demo_devices(2 if with_devices else 0, MiB + 17, with_state=False)
    with guest_ram(8 * MiB) as src, guest_ram(8 * MiB, fill="zero") as dst:
        destination = DestinationMigration(address("tcp"), secret=SECRET, ram=dst, config=CONFIG,
                                           devices=targets, payloads=[collector])
        destination.start()
        with SyntheticGuest(src, "incrementer", dirty_rate=8 * MiB) as guest:
            result = SourceMigration(src, destination.address, secret=SECRET, config=CONFIG,
                                     pause_guest=guest.pause, resume_guest=guest.resume,
                                     devices=sources, payloads=[NotesSaver(notes)]).run()
        remote = destination.wait(10)
        assert same_memory(src, dst)
    assert result.verified is True and remote.status == "completed"
    assert collector.notes == notes
    assert all(t.state == s.state and t.intact() for s, t in zip(sources, targets, strict=True))


def test_a_destination_without_the_kind_refuses_its_packets() -> None:
    """The source sends NOTES, the destination was given no consumer for them: the
    kind is not enabled in its channels, and the migration fails before the commit."""
    with guest_ram(4 * MiB) as src, guest_ram(4 * MiB, fill="zero") as dst:
        destination = DestinationMigration(address("tcp"), secret=SECRET, ram=dst, config=CONFIG)
        destination.start()
        source = SourceMigration(src, destination.address, secret=SECRET, config=CONFIG,
                                 payloads=[NotesSaver([b"x" * 100])])
        with pytest.raises(MigrationError):
            source.run()
        with pytest.raises(RemoteProtocolError, match=f"packet kind {NOTES_KIND}"):
            destination.wait(10)
        assert not destination.committed


def test_the_kind_is_registered_with_its_codec() -> None:
    entry = payload_entry(NOTES_KIND)
    assert isinstance(entry.codec, NotesCodec) and entry.module == "tests.notes_kind"


def test_the_packet_decoder_checks_a_registered_kind_by_its_rule() -> None:
    codec = NotesCodec()
    raw = codec.encode(7, SlotFields(3, 2, 1, 100))
    header = packet.decode_packet_header(raw[:packet.PACKET_HEADER_SIZE])
    assert header.kind == NOTES_KIND and header.payload_length == 100
    assert codec.decode(header, raw[packet.PACKET_HEADER_SIZE:], 7) == SlotFields(3, 2, 1, 100)
    too_big = codec.encode(7, SlotFields(3, 2, 1, MAX_PIECE + 1))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        packet.decode_packet_header(too_big[:packet.PACKET_HEADER_SIZE])
    bad_flags = bytearray(raw[:packet.PACKET_HEADER_SIZE])
    bad_flags[5] = 2
    with pytest.raises(RemoteProtocolError, match="unknown NOTES flags"):
        packet.decode_packet_header(bytes(bad_flags))
    with pytest.raises(RemoteProtocolError, match="sequence"):
        codec.decode(header, raw[packet.PACKET_HEADER_SIZE:], 8)
