"""The main channel of a networked migration, after the hellos: one reader, one writer.

Every main-channel read of both sides goes through :class:`MainChannel`: the
setup's request/answer exchanges (:meth:`MainChannel.read`), the source's
return-path reader and the destination's receive loop (:meth:`MainChannel.next`,
or :meth:`MainChannel.poll` after :meth:`MainChannel.receive` where a caller
multiplexes the main channel with its multifd channels), and the last words of
a failed migration (:meth:`MainChannel.await_close`).  So the rules hold in one
place::

    ABORT from the peer   → its error is raised (and kept: :attr:`peer_reason`)
    the peer closes       → an ABORT already buffered is its reason; else
                            TransportClosedError("... closed the main channel")
    nothing before a deadline → TransportBrokenError
    a failure or cancel   → the failure latch wakes every wait

The bytes are decoded by the sans-IO :class:`engine.wire.message.MessageDecoder`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

from engine.errors import (
    CancelledError,
    MigrationError,
    RemoteProtocolError,
    TransportBrokenError,
    TransportClosedError,
    remote_error,
)
from engine.sync import FailureLatch, wait_any, wait_readable
from engine.transport import Connection
from engine.wire import message as wire
from engine.wire import packet

log = logging.getLogger("multifd.migration")

M = TypeVar("M")


class MainChannel:
    """One side's main channel: `peer` names the other side in errors; `closed`
    is the error text for a peer that closes it; `sent(n)` counts bytes written."""

    def __init__(self, latch: FailureLatch, peer: str, closed: Callable[[], str],
                 sent: Callable[[int], None] = lambda n: None) -> None:
        self.latch = latch
        self.peer = peer
        self._closed = closed
        self._sent = sent
        self.conn: Connection | None = None
        self.decoder = wire.MessageDecoder()
        self.peer_reason: MigrationError | None = None  # the peer's ABORT, if one came
        self._abort_sent = False
        # Local mode (destination): descriptors that may come with the bytes
        # (SCM_RIGHTS), at most _max_fds in all, kept until taken.
        self._max_fds = 0
        self._fds: list[int] = []

    def attach(self, conn: Connection) -> Connection:
        self.conn = conn
        return conn

    # -- reading -----------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes read off the connection by someone else (after a handshake)."""
        self.decoder.receive_data(data)

    def poll(self) -> wire.Message | None:
        """The next message already received, or None.  An ABORT raises the peer's error."""
        message = self.decoder.next_message()
        if message is packet.NEED_DATA:
            return None
        if isinstance(message, wire.Abort):
            raise self.peer_error(message)
        return message

    def accept_fds(self, max_fds: int) -> None:
        """From now on keep the descriptors the peer sends with its bytes, at most
        `max_fds` in all (more is a RemoteProtocolError).  Without this call any
        descriptor sent is dropped by the kernel, unseen."""
        self._max_fds = max_fds

    def take_fds(self) -> list[int]:
        """The descriptors received so far (the caller closes them)."""
        fds, self._fds = self._fds, []
        return fds

    def receive(self) -> None:
        """The connection is readable: take what came.  At its end, an ABORT among
        what is buffered is the peer's reason; else the peer closed on us."""
        assert self.conn is not None
        if self._max_fds:
            data, fds = self.conn.recv_some_with_fds(self._max_fds)
            self._fds += fds
            if len(self._fds) > self._max_fds:
                self._close_fds()
                raise RemoteProtocolError(f"the {self.peer} sent more descriptors than the "
                                          f"{self._max_fds} it announced")
        else:
            data = self.conn.recv_some()
        if data:
            self.decoder.receive_data(data)
            return
        self.decoder.receive_data(b"")
        try:
            while self.poll() is not None:
                pass
        except RemoteProtocolError:
            pass  # the end inside a message: either way, it closed
        raise TransportClosedError(self._closed())  # the codec only says it ended

    def wait_readable(self, deadline: float | None, late: Callable[[], MigrationError] | None = None) -> None:
        """Wait until the connection is readable, or raise: at `deadline` (monotonic;
        None: no deadline) `late()`, or a TransportBrokenError without it; the latch's
        error on failure."""
        assert self.conn is not None
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not wait_any([self.conn], remaining, self.latch):
            if late is not None:
                raise late()
            raise TransportBrokenError(f"the {self.peer} did not answer on the main channel in time")

    def receive_if_ready(self) -> None:
        """Take in what came, if anything did, without waiting: a side busy with
        something else keeps the peer's bytes (and its ABORT or its end) moving."""
        assert self.conn is not None
        if self.conn.pending() or wait_readable([self.conn], 0):
            self.receive()

    def read_raw(self, deadline: float | None, max_bytes: int = 65536) -> bytes:
        """At most `max_bytes` off the connection (b"" at its end), for a handshake
        before any message."""
        assert self.conn is not None
        if not self.conn.pending():
            self.wait_readable(deadline)
        return self.conn.recv_some(max_bytes)

    def next(self, deadline: float | None = None,
             late: Callable[[], MigrationError] | None = None) -> wire.Message:
        """The peer's next message, waiting until `deadline` (monotonic) at most
        (then raising `late()`, if given: :meth:`wait_readable`)."""
        while (message := self.poll()) is None:
            if not self.conn or not self.conn.pending():
                self.wait_readable(deadline, late)
            self.receive()
        return message

    def read(self, expected: type[M], deadline: float | None = None,
             late: Callable[[], MigrationError] | None = None) -> M:
        """The peer's next message, which must be an `expected`."""
        message = self.next(deadline, late)
        if not isinstance(message, expected):
            raise RemoteProtocolError(
                f"expected {expected.__name__} from the {self.peer}, got {type(message).__name__}"
            )
        return message

    def peer_error(self, abort: wire.Abort) -> MigrationError:
        """The error the peer's ABORT stands for (and remember it as the peer's reason)."""
        if abort.code == wire.AbortCode.CANCELLED:
            error: MigrationError = CancelledError(f"{self.peer} cancelled: {abort.message}")
        else:
            error = remote_error(abort.error, f"{self.peer} failed: {abort.message}")
        self.peer_reason = self.peer_reason or error
        return error

    def await_close(self, timeout: float = 0.5) -> None:
        """After our ABORT: wait until the peer closes the main channel or aborts too.

        Bounded: a dead peer costs at most `timeout`.  Never raises.
        """
        if self.peer_reason is not None or self.conn is None:
            return  # the peer aborted first: it is tearing down already
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.poll() is not None:
                    continue  # anything but an ABORT: the peer is still talking
                if not wait_readable([self.conn], max(0.0, deadline - time.monotonic())):
                    return
                self.receive()
        except MigrationError:
            return  # its ABORT (kept as the peer's reason), its close, or garbage: it is done

    # -- writing -----------------------------------------------------------

    def send(self, record: wire.Message) -> None:
        assert self.conn is not None
        data = wire.encode_message(record)
        self.conn.send_all(data)
        self._sent(len(data))

    def send_abort(self, error: BaseException | None) -> None:
        """Tell the peer why we stop (once): the error's class and message.  A courtesy
        with a 1 s bound: the peer may be gone already, and then it learns from the
        closed connection instead."""
        if self._abort_sent or self.conn is None or error is self.peer_reason:
            return  # sent already, nobody to tell, or the peer's own ABORT: no echo
        self._abort_sent = True
        code = wire.AbortCode.CANCELLED if isinstance(error, CancelledError) else wire.AbortCode.FAILED
        name = type(error).__name__ if isinstance(error, MigrationError) else "MigrationError"
        try:
            self.conn.settimeout(1.0)
            self.conn.send_all(wire.encode_message(wire.Abort(code, str(error)[:1000], name)))
        except MigrationError as exc:
            log.info("could not send ABORT to the %s: %s", self.peer, exc)

    def _close_fds(self) -> None:
        for fd in self.take_fds():
            os.close(fd)

    def close(self) -> None:
        self._close_fds()  # descriptors nobody took
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
