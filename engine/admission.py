"""Admission: who may join a migration, read concurrently so nobody can stall it.

A destination's listener is open to anyone who can reach the port.  Every
connection it accepts gets a fresh challenge at once (engine/wire/packet.py), then has
``hello_timeout`` seconds to answer with a hello; all of them are read at the
same time, in one poll loop, so a silent, slow or garbage client costs a real
one a few microseconds of work, never a wait::

    listener readable ─▶ accept, send the challenge, add to `pending`
    pending readable  ─▶ read what came; 80 bytes: check the hello
                         (the role and key of the current phase) ─▶ join, or refuse
    deadline passed   ─▶ refuse ("sent no hello within ...")
    too many pending  ─▶ the oldest unauthenticated one (of the same peer address
                         first) is refused: a flood evicts its own connections

Refused connections are closed and reported to ``on_refuse``; none ever joins.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.errors import HandshakeError, MigrationError, TransportBrokenError
from engine.sync import FailureLatch, wait_any
from engine.transport import Connection, Listener
from engine.wire import packet

MAX_PENDING = 256      # unauthenticated connections held at once, in all
MAX_PER_PEER = 64      # ... and from one peer address


@dataclass(eq=False)
class _Pending:
    conn: Connection
    challenge: bytes
    deadline: float
    peer: str
    received: bytearray = field(default_factory=bytearray)

    def fileno(self) -> int:
        return self.conn.fileno()


class Admission:
    """Accepts and challenges connections on `listener`, and hands out the ones
    whose hello authenticates (:meth:`next_hello`).  Not thread-safe: one caller."""

    def __init__(self, listener: Listener, hello_timeout: float, latch: FailureLatch,
                 on_refuse: Callable[[Connection, str], None]) -> None:
        self._listener = listener
        self._hello_timeout = hello_timeout
        self._latch = latch
        self._on_refuse = on_refuse
        self._pending: list[_Pending] = []  # oldest first

    def next_hello(self, key: bytes, role: packet.HelloRole, deadline: float | None, what: str,
                   watch: tuple[Connection, Callable[[], None]] | None = None,
                   ) -> tuple[Connection, packet.ChannelHello, bytes]:
        """The next connection whose hello is a `role` hello authenticated with `key`
        over its challenge: (connection, hello, challenge nonce).  Every other
        connection meanwhile is refused.  Raises HandshakeError once `deadline`
        (monotonic; None: never) passes, and the latch's error on cancel.

        `watch`: a connection to keep an eye on meanwhile (the main channel, whose
        peer may give up while its channels are awaited) and what to call when it
        is readable; that call raises to stop waiting."""
        while True:
            now = time.monotonic()
            self._expire(now)
            if deadline is not None and now >= deadline:
                raise HandshakeError(f"timed out waiting for {what}")
            waits = [p.deadline for p in self._pending] + ([deadline] if deadline is not None else [])
            timeout = max(0.0, min(waits) - now) if waits else None
            watched = [watch[0]] if watch is not None else []
            for ready in wait_any([self._listener, *self._pending, *watched], timeout, self._latch):
                if watch is not None and ready is watch[0]:
                    watch[1]()
                    continue
                if ready is self._listener:
                    self._accept()
                    continue
                assert isinstance(ready, _Pending)
                if ready not in self._pending:
                    continue  # dropped (closed) while this batch was handled
                joined = self._read(ready, key, role)
                if joined is not None:
                    return joined

    def close(self) -> None:
        """Close every connection still waiting to be admitted."""
        pending, self._pending = self._pending, []
        for entry in pending:
            entry.conn.close()

    # -- the steps ---------------------------------------------------------

    def _accept(self) -> None:
        try:
            conn = self._listener.accept(0.0)
        except TransportBrokenError:
            return  # gone before we took it (or a spurious wake-up)
        peer = conn.peer.rsplit(":", 1)[0]
        challenge = os.urandom(packet.NONCE_SIZE)
        try:
            conn.settimeout(1.0)  # 24 bytes into an empty socket buffer: never blocks long
            conn.send_all(packet.encode_challenge(challenge))
        except MigrationError as exc:
            self._refuse(conn, f"could not send the challenge: {exc}")
            return
        self._make_room(peer)
        self._pending.append(_Pending(conn, challenge, time.monotonic() + self._hello_timeout, peer))

    def _make_room(self, peer: str) -> None:
        same_peer = [p for p in self._pending if p.peer == peer]
        if len(same_peer) >= MAX_PER_PEER:
            self._drop(same_peer[0], f"more than {MAX_PER_PEER} connections from {peer} "
                                     f"without a hello; the oldest is closed")
        elif len(self._pending) >= MAX_PENDING:
            self._drop(self._pending[0], f"more than {MAX_PENDING} connections without a hello; "
                                         f"the oldest is closed")

    def _read(self, entry: _Pending, key: bytes, role: packet.HelloRole
              ) -> tuple[Connection, packet.ChannelHello, bytes] | None:
        try:
            data = entry.conn.recv_some(packet.HELLO_SIZE - len(entry.received))
        except MigrationError as exc:
            self._drop(entry, str(exc))
            return None
        if not data:
            self._drop(entry, f"closed after {len(entry.received)} bytes of its hello")
            return None
        entry.received += data
        if len(entry.received) < packet.HELLO_SIZE:
            return None
        self._pending.remove(entry)
        try:
            hello = packet.decode_hello(bytes(entry.received), key, entry.challenge, (role,))
        except HandshakeError as exc:
            self._refuse(entry.conn, str(exc))
            return None
        entry.conn.settimeout(None)
        return entry.conn, hello, entry.challenge

    def _expire(self, now: float) -> None:
        for entry in [p for p in self._pending if p.deadline <= now]:
            self._drop(entry, f"sent no hello within {self._hello_timeout:.1f} s")

    def _drop(self, entry: _Pending, why: str) -> None:
        if entry in self._pending:
            self._pending.remove(entry)
            self._refuse(entry.conn, why)

    def _refuse(self, conn: Connection, why: str) -> None:
        conn.close()
        self._on_refuse(conn, why)
