"""A hand-made source for protocol tests: real sockets, bytes built with the codec.

It drives a real DestinationMigration through the handshake and can then send
any packet on its channels, valid or not, to see what the destination does.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import uuid
from collections.abc import Callable

from engine import DestinationMigration
from engine.errors import MigrationError, TransportClosedError
from engine.link import RecordConnection
from engine.sync import SyncBarrier
from engine.wire import message as wire
from engine.wire import packet, record
from tests.harness import SECRET

_HELLO = struct.Struct(">IHBB16sHHI16s")


def raw_hello(role: int = 2, migration: uuid.UUID | None = None, channel_id: int = 0,
              count: int = 2, secret: bytes = SECRET, magic: int = packet.HELLO_MAGIC,
              version: int = packet.VERSION, answers: bytes = bytes(16),
              flags: int = packet.HelloFlags.MAC) -> bytes:
    """A hello built by hand, so fields the encoder refuses can be sent anyway;
    authenticated with `secret` over the challenge nonce it `answers`."""
    body = _HELLO.pack(magic, version, role, flags, (migration or uuid.uuid4()).bytes,
                       channel_id, count, 0, os.urandom(16))
    return body + hmac.new(secret, body + answers, hashlib.sha256).digest()


def read_challenge(sock: socket.socket) -> bytes:
    """The nonce of the challenge a destination sends first on every connection."""
    data = b""
    while len(data) < packet.CHALLENGE_SIZE:
        chunk = sock.recv(packet.CHALLENGE_SIZE - len(data))
        assert chunk, "the destination closed the connection before its challenge"
        data += chunk
    return packet.decode_challenge(data)


def port_of(destination: DestinationMigration) -> tuple[str, int]:
    host, port = destination.address.removeprefix("tcp://").rsplit(":", 1)
    return host, int(port)


class MacSocket:
    """A hand-made connection after its hello: what is sent goes in MAC records (as
    a real source's bytes do); ``recv`` stays raw (a destination never writes on a
    channel: it only closes)."""

    def __init__(self, sock: socket.socket, session_key: bytes, connection: int) -> None:
        self.sock = sock
        self.conn = RecordConnection(
            sock, "destination",
            record.record_key(session_key, connection, record.Direction.TO_DESTINATION),
            record.record_key(session_key, connection, record.Direction.TO_SOURCE))

    def sendall(self, data: bytes) -> None:
        self.conn.send_all(data)

    def recv(self, n: int) -> bytes:
        return self.sock.recv(n)

    def close(self) -> None:
        self.sock.close()


class HandMadeSource:
    """Drives a real destination through the main-channel handshake with the codec
    (MAC records after the hellos, as every real source without TLS)."""

    def __init__(self, destination: DestinationMigration, ram_layout: list[tuple[str, int]],
                 channels: int = 2, codec: str = "none", packet_pages: int = 64,
                 devices: tuple[tuple[str, int] | wire.DeviceSpec, ...] = ()) -> None:
        self.addr = port_of(destination)
        self.migration = uuid.uuid4()
        self.channels = channels
        self.main = socket.create_connection(self.addr, timeout=5)
        challenge = read_challenge(self.main)
        nonce = os.urandom(16)
        self.main_hello = packet.encode_hello(packet.HelloRole.MAIN, self.migration, 0, channels,
                                              SECRET, challenge, nonce, packet.HelloFlags.MAC)
        self.main.sendall(self.main_hello)
        reply = self._recv(packet.HELLO_SIZE)
        packet.decode_hello(reply, SECRET, nonce, (packet.HelloRole.MAIN_REPLY,))
        self.key = packet.session_key(SECRET, self.migration, nonce, challenge)
        self.main_conn = MacSocket(self.main, self.key, record.MAIN_CONNECTION).conn
        self.main_conn.send_all(wire.encode_message(wire.Config(
            4096, packet_pages, channels, True, codec, 0,
            tuple(wire.BlockSpec(n, s) for n, s in ram_layout),
            tuple(d if isinstance(d, wire.DeviceSpec) else wire.DeviceSpec(*d) for d in devices))))
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
            data = self.main_conn.recv_some()
            if not data:  # the codec says protocol errors only; the end is ours to say
                raise TransportClosedError("the destination closed the main channel")
            self.decoder.receive_data(data)
        return message

    def channel(self, hello: bytes | Callable[[bytes], bytes], channel_id: int = 0) -> MacSocket:
        """A channel connection: read the destination's challenge, send `hello`
        (or what `hello(challenge nonce)` builds); then MAC records of `channel_id`."""
        s = socket.create_connection(self.addr, timeout=5)
        self.sockets.append(s)
        challenge = read_challenge(s)
        s.sendall(hello(challenge) if callable(hello) else hello)
        return MacSocket(s, self.key, channel_id)

    def channel_hello(self, channel_id: int, migration: uuid.UUID | None = None,
                      count: int | None = None, role: int = 2,
                      key: bytes | None = None) -> Callable[[bytes], bytes]:
        """A channel hello of this session answering the challenge it is given."""
        return lambda challenge: raw_hello(role, migration or self.migration, channel_id,
                                           self.channels if count is None else count,
                                           secret=self.key if key is None else key, answers=challenge)

    def close(self) -> None:
        for s in [self.main, *self.sockets]:
            s.close()



    def join_all(self) -> list[socket.socket]:
        """Open every channel with a valid hello; wait for CHANNELS_READY."""
        channels = [self.channel(self.channel_hello(i), i) for i in range(self.channels)]
        assert self.next_message() == wire.ChannelsReady()
        return channels

    def send(self, message: wire.Message) -> None:
        self.main_conn.send_all(wire.encode_message(message))


class ChannelWriter:
    """Packets on one hand-made channel, with their sequence numbers kept."""

    def __init__(self, sock: MacSocket) -> None:
        self.sock = sock
        self.sequence = 0

    def device_chunk(self, idstr: str, instance: int, index: int, data: bytes, end: bool = False,
                     live: bool = False) -> None:
        self.sock.sendall(packet.encode_device_state(self.sequence, idstr, instance, index, end,
                                                     len(data), live=live) + data)
        self.sequence += 1

    def sync(self, epoch: int) -> None:
        self.sock.sendall(packet.encode_sync(self.sequence, epoch))
        self.sequence += 1

    def end(self, epoch: int = 0) -> None:
        self.sock.sendall(packet.encode_end(self.sequence, epoch))
        self.sequence += 1


def barrier(destination: DestinationMigration) -> SyncBarrier:
    """The destination's bookkeeping of its channels' barrier states (read-only here)."""
    receiver = destination._receiver
    assert receiver is not None
    return receiver.barrier


def final_answer(source: HandMadeSource) -> wire.Message:
    """The destination's answer to COMPLETE, as a real source gets it (engine/source.py):
    a PREPARED is committed first.  Adjust here when the end of the protocol changes."""
    answer = source.next_message()
    if isinstance(answer, wire.Prepared):
        source.send(wire.Commit())
        answer = source.next_message()
    return answer


def destination_failure(destination: DestinationMigration, source: HandMadeSource,
                        run: Callable[[list[ChannelWriter], HandMadeSource], object]) -> str:
    """Join `source`'s channels, drive them with `run(channels, source)`, and return
    the error the destination fails with (the source is closed either way)."""
    import pytest

    try:
        channels = [ChannelWriter(s) for s in source.join_all()]
        run(channels, source)
        with pytest.raises(MigrationError) as failure:
            destination.wait(10)
    finally:
        source.close()
    return str(failure.value)
