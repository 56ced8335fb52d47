"""Hellos that must never join a migration: refused, logged, and harmless."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import struct
import time
import uuid

import pytest

from engine import DestinationMigration, GuestRAM, MigrationConfig, SourceMigration, packet
from engine import message as wire
from engine.errors import HandshakeError, MigrationError
from engine.sync import MigrationState
from tests.harness import SECRET, MiB, guest_ram, same_memory

FAST = MigrationConfig(channels=2, packet_pages=64, handshake_timeout_s=1.0)
_HELLO = struct.Struct(">IHBB16sHHI16s")


def raw_hello(role: int = 2, migration: uuid.UUID | None = None, channel_id: int = 0,
              count: int = 2, secret: bytes = SECRET, magic: int = packet.HELLO_MAGIC,
              version: int = 1) -> bytes:
    """A hello built by hand, so fields the encoder refuses can be sent anyway."""
    body = _HELLO.pack(magic, version, role, 0, (migration or uuid.uuid4()).bytes,
                       channel_id, count, 0, os.urandom(16))
    return body + hmac.new(secret, body, hashlib.sha256).digest()


def _port(destination: DestinationMigration) -> tuple[str, int]:
    host, port = destination.address.removeprefix("tcp://").rsplit(":", 1)
    return host, int(port)


def _send_and_wait_closed(addr: tuple[str, int], data: bytes) -> bytes:
    """Send `data` on a fresh connection; return what comes back before the close."""
    with socket.create_connection(addr, timeout=5) as s:
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
    addr = _port(destination)
    strangers = {
        "garbage": b"GET / HTTP/1.1\r\n" * 5 + b"\r\n" * 20,
        "wrong magic": raw_hello(role=1, magic=0x12345678),
        "wrong version": raw_hello(role=1, version=2),
        "wrong secret": raw_hello(role=1, secret=b"not the secret"),
        "short then closed": raw_hello(role=1)[:40],
        "channel before main": raw_hello(role=2),
    }
    for name, data in strangers.items():
        assert _send_and_wait_closed(addr, data) == b"", f"{name}: got an answer"
    # A silent stranger is dropped after the handshake timeout.
    silent = socket.create_connection(addr)
    try:
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
    for needle in ("magic", "version", "authenticat", "timed out", "CHANNEL hello before"):
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


class HandMadeSource:
    """Drives a real destination through the main-channel handshake with the codec."""

    def __init__(self, destination: DestinationMigration, ram_layout: list[tuple[str, int]],
                 channels: int = 2) -> None:
        self.addr = _port(destination)
        self.migration = uuid.uuid4()
        self.channels = channels
        self.main = socket.create_connection(self.addr, timeout=5)
        nonce = os.urandom(16)
        self.main.sendall(packet.encode_hello(packet.HelloRole.MAIN, self.migration, 0, channels,
                                              SECRET, nonce=nonce))
        reply = self._recv(packet.HELLO_SIZE)
        assert packet.decode_hello(reply, SECRET, peer_nonce=nonce).role is packet.HelloRole.MAIN_REPLY
        self.main.sendall(wire.encode_message(wire.Config(
            4096, 64, channels, False, "none", 0,
            tuple(wire.BlockSpec(n, s) for n, s in ram_layout), ())))
        self.decoder = wire.MessageDecoder()
        assert self.next_message() == wire.ConfigAck(0, "")
        self.sockets: list[socket.socket] = []

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.main.recv(n - len(data))
            assert chunk, "destination closed the main channel"
            data += chunk
        return data

    def next_message(self) -> wire.Message:
        while (message := self.decoder.next_message()) is packet.NEED_DATA:
            self.decoder.receive_data(self.main.recv(4096))
        return message

    def channel(self, hello: bytes) -> socket.socket:
        s = socket.create_connection(self.addr, timeout=5)
        s.sendall(hello)
        self.sockets.append(s)
        return s

    def close(self) -> None:
        for s in [self.main, *self.sockets]:
            s.close()


def test_channel_hellos_that_must_not_join(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="multifd.destination")
    with guest_ram(4 * MiB, fill="zero") as dst:
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst, config=FAST)
        destination.start()
        source = HandMadeSource(destination, list(dst.layout))
        try:
            m = source.migration
            bad = {
                "other migration": raw_hello(migration=uuid.uuid4(), channel_id=0),
                "id out of range": raw_hello(migration=m, channel_id=2, count=2),
                "wrong count": raw_hello(migration=m, channel_id=1, count=3),
                "second main": raw_hello(role=1, migration=m, channel_id=0),
            }
            refused_sockets = [source.channel(hello) for hello in bad.values()]
            source.channel(raw_hello(migration=m, channel_id=0))
            duplicate = source.channel(raw_hello(migration=m, channel_id=0))
            for s in [*refused_sockets, duplicate]:
                assert s.recv(1) == b""  # closed on us: refused
            source.channel(raw_hello(migration=m, channel_id=1))
            assert source.next_message() == wire.ChannelsReady()  # exactly 2 joined
            assert len(destination.channel_pids()) == 2
        finally:
            source.close()  # the source "dies": the destination must fail cleanly
        with pytest.raises(MigrationError):
            destination.wait(10)
    assert len([r for r in caplog.records if "refused a connection" in r.getMessage()]) >= 5
    refused = "\n".join(destination.refused)
    for needle in ("migration id", "channel id 2", "channel count 3", "second main",
                   "duplicate channel id 0"):
        assert needle in refused, f"no refusal mentions {needle!r}: {refused}"
