"""What a source does before the destination's CHANNELS_READY (engine/source.py set-up).

A hand-made destination (real sockets, bytes from the codec) takes the source
through the handshakes and admits its channels — challenging them only once
all of them connected: a source opens its channel connections together, not
one handshake after the other — then holds CHANNELS_READY back:
pages must flow already (the source does not wait for the destination's channel
processes), and nothing may come on the main channel before it (a real
destination reads nothing there while its channels join) — the source gives up
after its handshake timeout instead, with a clear error, and tears down.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from engine import MigrationConfig, SourceMigration
from engine.errors import HandshakeError, MigrationError
from engine.link import RecordConnection
from engine.sync import wait_readable
from engine.wire import message as wire
from engine.wire import packet, record
from tests.harness import SECRET, MiB, guest_ram

HANG_S = 20.0  # a safety limit: only a hang reaches it
ACCEPT_S = 5.0  # for a connection that comes at once, or (the bug) never


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the source closed a connection in its handshake"
        data += chunk
    return data


class _HeldDestination:
    """A destination that admits every channel and never says CHANNELS_READY."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(HANG_S)
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.channels: list[socket.socket] = []
        self.main: socket.socket | None = None
        self.main_conn: RecordConnection | None = None

    def _accept(self) -> socket.socket:
        conn, _ = self.listener.accept()
        conn.settimeout(HANG_S)
        return conn

    @staticmethod
    def _challenge(conn: socket.socket) -> bytes:
        nonce = os.urandom(packet.NONCE_SIZE)
        conn.sendall(packet.encode_challenge(nonce))
        return nonce

    def handshake(self) -> None:
        self.main = self._accept()
        challenge = self._challenge(self.main)
        hello = packet.decode_hello(_recv_exact(self.main, packet.HELLO_SIZE), SECRET, challenge,
                                    (packet.HelloRole.MAIN,))
        self.main.sendall(packet.encode_hello(packet.HelloRole.MAIN_REPLY, hello.migration_id, 0,
                                              hello.channel_count, SECRET, hello.nonce, flags=hello.flags))
        key = packet.session_key(SECRET, hello.migration_id, hello.nonce, challenge)
        self.main_conn = RecordConnection(
            self.main, "source", record.record_key(key, record.MAIN_CONNECTION, record.Direction.TO_SOURCE),
            record.record_key(key, record.MAIN_CONNECTION, record.Direction.TO_DESTINATION))
        decoder = wire.MessageDecoder()
        assert isinstance(self.next_message(decoder), wire.Config)
        self.main_conn.send_all(wire.encode_message(wire.ConfigAck(0, "")))
        self.listener.settimeout(ACCEPT_S)  # a source that waits for a challenge first never connects
        for _ in range(hello.channel_count):
            self.channels.append(self._accept())
        for conn in self.channels:
            nonce = self._challenge(conn)
            packet.decode_hello(_recv_exact(conn, packet.HELLO_SIZE), key, nonce,
                                (packet.HelloRole.CHANNEL,))
        self.decoder = decoder

    def next_message(self, decoder: wire.MessageDecoder) -> wire.Message | None:
        """The source's next main-channel message; None once it closed the channel."""
        assert self.main_conn is not None
        while (message := decoder.next_message()) is packet.NEED_DATA:
            data = self.main_conn.recv_some()
            if not data:
                return None
            decoder.receive_data(data)
        return message

    def abort(self, source: SourceMigration) -> None:
        """Stop the test's migration as a destination does: ABORT on the main channel."""
        assert self.main_conn is not None
        self.main_conn.send_all(wire.encode_message(
            wire.Abort(wire.AbortCode.FAILED, "the test stops here", "MigrationError")))
        with pytest.raises(MigrationError, match="the test stops here"):
            source.wait(HANG_S)

    def close(self) -> None:
        for sock in [self.listener, *self.channels, *([self.main] if self.main else [])]:
            sock.close()


@contextlib.contextmanager
def _source_to(held: _HeldDestination, ram_mib: int, config: MigrationConfig) -> Iterator[SourceMigration]:
    """A source migrating `ram_mib` MiB into `held`, its handshake answered; nothing
    of it is left running afterwards, whatever the test's assertions did."""
    with guest_ram(ram_mib * MiB) as src:
        source = SourceMigration(src, held.address, secret=SECRET, config=config)
        source.start()
        try:
            held.handshake()
            yield source
        finally:
            if not source.done():
                source.cancel()
                with pytest.raises(Exception):  # noqa: B017 - any end; nothing may be left
                    source.wait(HANG_S)


def test_channels_connect_together_pages_flow_before_channels_ready_and_main_waits_for_it() -> None:
    held = _HeldDestination()
    # Round 1 (64 MiB of random pages) does not fit in the channels' socket buffers:
    # the channels block in their sends, and the handshake timeout must still end
    # the wait for CHANNELS_READY — not the stall timeout, which is past HANG_S.
    config = MigrationConfig(channels=2, handshake_timeout_s=1.0, stall_timeout_s=3 * HANG_S)
    try:
        with _source_to(held, 64, config) as source:
            # The destination's channel processes "still start": the source's pages come anyway.
            ready = wait_readable(held.channels, HANG_S)
            assert ready, "no page came before CHANNELS_READY"
            assert ready[0].recv(65536)
            # Round 1 cannot end (nothing reads the channels), and CHANNELS_READY does not
            # come: the source fails after its handshake timeout, and the main channel
            # carried nothing but its ABORT.
            with pytest.raises(HandshakeError, match="channels did not join"):
                source.wait(HANG_S)
            said = []
            while (message := held.next_message(held.decoder)) is not None:
                said.append(type(message).__name__)
            assert said == ["Abort"]
    finally:
        held.close()


def test_the_first_main_channel_message_after_channels_ready_is_a_ping() -> None:
    """Once the destination's channels joined, the source's first word there is a
    PING (answered at once, before a SYNC_MARKER's barrier could hold its PONG back:
    the result's RTT); the destination then gives up, and the source with it."""
    held = _HeldDestination()
    try:
        with _source_to(held, 1, MigrationConfig(channels=2, handshake_timeout_s=5.0)) as source:
            assert wait_readable(held.channels, HANG_S), "no page came"
            assert held.main_conn is not None
            held.main_conn.send_all(wire.encode_message(wire.ChannelsReady()))
            first = held.next_message(held.decoder)
            assert isinstance(first, wire.Ping), first
            held.abort(source)
    finally:
        held.close()


def _drain(channels: list[socket.socket], stop: threading.Event) -> None:
    """Read and drop what the source's channels send, until `stop` or they close."""
    open_ = list(channels)
    while open_ and not stop.is_set():
        for conn in wait_readable(open_, 0.1):
            try:
                data = conn.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                open_.remove(conn)


def test_pings_wait_for_a_round_boundary_not_the_pages_of_round_one() -> None:
    """A PING sent among round 1's pages would queue behind them (its PONG too):
    the RTT, and the downtime reported from it, would grow with the link's load.
    The destination's channels join at once and each PING is answered at once,
    yet until round 1's SYNC_MARKER the source says nothing but the one PING that
    goes before it."""
    held = _HeldDestination()
    stop = threading.Event()
    drainer: threading.Thread | None = None
    try:
        with _source_to(held, 64, MigrationConfig(channels=2, handshake_timeout_s=5.0)) as source:
            drainer = threading.Thread(target=_drain, args=(held.channels, stop))
            drainer.start()
            assert held.main_conn is not None
            held.main_conn.send_all(wire.encode_message(wire.ChannelsReady()))
            said = []
            while not isinstance(message := held.next_message(held.decoder), wire.SyncMarker):
                assert message is not None, f"the source closed the main channel after {said}"
                said.append(type(message).__name__)
                if isinstance(message, wire.Ping):
                    held.main_conn.send_all(wire.encode_message(wire.Pong(message.token)))
            assert said == ["Ping"]
            held.abort(source)
    finally:
        stop.set()
        if drainer is not None:
            drainer.join(HANG_S)
        held.close()
