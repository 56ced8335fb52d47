"""Hellos that must never join a migration: refused, logged, and harmless."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid

import pytest

from engine import DestinationMigration, GuestRAM, MigrationConfig, SourceMigration
from engine.errors import ConfigError, HandshakeError, MigrationError
from engine.sync import MigrationState
from engine.wire import message as wire
from engine.wire import packet
from tests.harness import SECRET, MiB, guest_ram, same_memory
from tests.protocol import HandMadeSource, port_of, raw_hello, read_challenge

FAST = MigrationConfig(channels=2, packet_pages=64, handshake_timeout_s=1.0)
def _send_and_wait_closed(addr: tuple[str, int], data: bytes) -> bytes:
    """Send `data` on a fresh connection, after the destination's challenge; return
    what comes back before the close."""
    with socket.create_connection(addr, timeout=5) as s:
        read_challenge(s)
        if data:
            s.sendall(data)
        received = b""
        try:
            while chunk := s.recv(4096):
                received += chunk
        except ConnectionResetError:  # closed with our surplus unread: refused all the same
            pass
        return received


def test_strangers_are_refused_and_the_migration_still_works() -> None:
    with guest_ram(4 * MiB) as src, guest_ram(4 * MiB, fill="zero") as dst:
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst, config=FAST)
        destination.start()
        try:
            _strangers_then_migrate(destination, src, dst)
        except BaseException:
            destination.cancel()
            raise


def _strangers_then_migrate(destination: DestinationMigration, src: GuestRAM, dst: GuestRAM) -> None:
    addr = port_of(destination)
    strangers = {
        "garbage": b"GET / HTTP/1.1\r\n" * 5 + b"\r\n" * 20,
        "wrong magic": raw_hello(role=1, magic=0x12345678),
        "wrong version": raw_hello(role=1, version=packet.VERSION + 1),
        "wrong secret": raw_hello(role=1, secret=b"not the secret"),
        "short then closed": raw_hello(role=1)[:40],
        "channel before main": raw_hello(role=2),
        # A valid main hello, recorded: it answers another connection's challenge.
        "recorded main hello": packet.encode_hello(packet.HelloRole.MAIN, uuid.uuid4(), 0, 2, SECRET,
                                                   os.urandom(16)),
    }
    for name, data in strangers.items():
        assert _send_and_wait_closed(addr, data) == b"", f"{name}: got an answer"
    # A silent stranger is dropped after the handshake timeout.
    silent = socket.create_connection(addr)
    try:
        read_challenge(silent)
        time.sleep(FAST.handshake_timeout_s + 0.3)
        assert silent.recv(1) == b""
    finally:
        silent.close()
    assert destination.state is MigrationState.LISTENING  # nobody joined
    result = SourceMigration(src, destination.address, secret=SECRET, config=FAST).run()
    destination.wait(10)
    assert result.status == "completed" and same_memory(src, dst)
    refused = "\n".join(destination.refused)
    assert len(destination.refused) == len(strangers) + 1
    for needle in ("magic", "version", "authenticat", "sent no hello within", "CHANNEL hello where MAIN"):
        assert needle in refused, f"no refusal mentions {needle!r}: {refused}"


def test_a_source_with_the_wrong_secret_fails_cleanly() -> None:
    with guest_ram(4 * MiB) as src:
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, config=FAST,
                                           accept_timeout_s=3)
        destination.start()
        with pytest.raises(HandshakeError, match="refused the connection"):
            SourceMigration(src, destination.address, secret=b"wrong", config=FAST).run()
        destination.cancel()
        with pytest.raises(MigrationError):
            destination.wait(10)
        assert "authenticat" in destination.refused[0]


def test_channel_hellos_that_must_not_join(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="multifd.destination")
    with guest_ram(4 * MiB, fill="zero") as dst:
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst, config=FAST)
        destination.start()
        source = HandMadeSource(destination, list(dst.layout))
        try:
            m = source.migration
            bad = {
                "other migration": source.channel_hello(0, migration=uuid.uuid4()),
                "another session's key": source.channel_hello(0, key=os.urandom(32)),
                "id out of range": source.channel_hello(2, count=2),
                "wrong count": source.channel_hello(1, count=3),
                "second main": source.channel_hello(0, role=1),
            }
            refused_sockets = [source.channel(hello) for hello in bad.values()]
            sent: list[bytes] = []
            source.channel(lambda challenge: sent.append(source.channel_hello(0)(challenge)) or sent[0])
            replayed = source.channel(sent[0])  # the same bytes, on a new connection
            duplicate = source.channel(source.channel_hello(0))
            for s in [*refused_sockets, replayed, duplicate]:
                assert s.recv(1) == b""  # closed on us: refused
            assert m == source.migration
            source.channel(source.channel_hello(1))
            assert source.next_message() == wire.ChannelsReady()  # exactly 2 joined
            assert len(destination.channel_pids()) == 2
        finally:
            source.close()  # the source "dies": the destination must fail cleanly
        with pytest.raises(MigrationError):
            destination.wait(10)
    assert len([r for r in caplog.records if "refused a connection" in r.getMessage()]) >= 5
    refused = "\n".join(destination.refused)
    for needle in ("migration id", "channel id 2", "channel count 3", "MAIN hello where CHANNEL",
                   "recorded hello", "duplicate channel id 0"):
        assert needle in refused, f"no refusal mentions {needle!r}: {refused}"


@pytest.mark.parametrize(("code", "error", "reported"), [
    (wire.AbortCode.CANCELLED, "CancelledError", HandshakeError),
    (wire.AbortCode.FAILED, "IntegrityError", HandshakeError),
    (wire.AbortCode.FAILED, "ConfigError", ConfigError),  # the refusal a destination sends there
])
def test_an_unauthenticated_abort_can_only_refuse(code: int, error: str, reported: type) -> None:
    """An ABORT in place of the destination's reply comes before anything is
    authenticated: anyone on the path could forge it.  It fails the migration (a
    stranger can always stop one), but never as a cancel or an integrity failure,
    and says it is unauthenticated."""
    with socket.create_server(("127.0.0.1", 0)) as fake, guest_ram(1 * MiB) as ram:
        source = SourceMigration(ram, f"tcp://127.0.0.1:{fake.getsockname()[1]}", secret=SECRET,
                                 config=FAST)
        source.start()
        conn, _ = fake.accept()
        with conn:  # as a refusing destination does: the ABORT, then the close
            conn.sendall(packet.encode_challenge(os.urandom(packet.NONCE_SIZE)))
            conn.recv(packet.HELLO_SIZE, socket.MSG_WAITALL)
            conn.sendall(wire.encode_message(wire.Abort(code, "cancelled by the operator", error)))
        with pytest.raises(MigrationError) as failed:
            source.wait(10)
    assert type(failed.value) is reported, failed.value
    assert "unauthenticated" in str(failed.value)
    assert source.state is MigrationState.FAILED
