"""The networked migration: what both sides of a live migration share.

:class:`SourceMigration` (engine/source.py) and :class:`DestinationMigration`
(engine/destination.py) derive from :class:`Migration`, an
:class:`~engine.operation.Operation` with a peer: a shared secret, the main
channel (:class:`~engine.main_channel.MainChannel`), an ABORT that tells the
peer why a failed migration stops (and hears it out before the channels go),
and the commit point (docs/architecture.md, "Switchover is a commit")::

    teardown of a migration that failed before its commit point:
        the peer aborted  ─▶ close the main channel (it waits for that), then stop channels
        else              ─▶ ABORT ─▶ hear the peer out (≤ 0.5 s) ─▶ stop channels

Snapshots (engine/snapshot.py) are operations without a peer: siblings of
:class:`Migration`, not kinds of it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from engine.config import LocalConfig, MigrationConfig
from engine.errors import ConfigError, MigrationError, TransportError
from engine.link import LinkSecurity, check_peer_name, secure
from engine.main_channel import MainChannel
from engine.operation import Operation
from engine.pool import WorkerPool
from engine.sync import MigrationEvent
from engine.transport import Connection
from engine.wire import message as wire
from engine.wire import record

log = logging.getLogger("multifd.migration")

M = TypeVar("M")

__all__ = ["Migration", "MigrationConfig"]


class Migration(Operation):
    """An operation with a peer, authenticated with `secret` (both sides must be
    given the same one).  `pool`: see :class:`~engine.operation.Operation`."""

    role = "migration"
    peer = "peer"

    def __init__(self, config: LocalConfig, secret: bytes = b"",
                 pool: WorkerPool | None = None, own_pool_if_short: bool = False) -> None:
        if not isinstance(secret, (bytes, bytearray, memoryview)):
            raise ConfigError(f"the secret must be bytes, not {type(secret).__name__}"
                              + (" (encode it)" if isinstance(secret, str) else ""))
        if not secret:
            raise ConfigError("a shared secret is required (both sides must be given the same one)")
        super().__init__(config, pool=pool, own_pool_if_short=own_pool_if_short)
        self.secret = bytes(secret)
        # Connections a thread may be blocked reading (handshakes, the main
        # channel): a failure or cancel shuts their read side to wake it.
        self._in_flight: set[Connection] = set()
        self._in_flight_lock = threading.Lock()
        self.latch.on_fail(self._kick)
        # The main channel (connected in set-up): the one reader of what the peer says.
        self._main = MainChannel(self.latch, self.peer, self._main_closed, self._count_main)

    # -- the commit point --------------------------------------------------

    def _commit(self, action: Callable[[], None] | None = None) -> None:
        """Pass the commit point: mark the migration committed and run `action`
        (the source sends COMMIT), unless it failed or was cancelled first (then
        raise that).  If `action` raises a TransportError the send failed and the
        migration has not committed; any other exception leaves it committed."""
        with self._commit_lock:
            self.latch.raise_if_failed()
            # Committed before the send, not after: an exception after the bytes
            # left (a signal handler's, say) must not make us think we did not.
            self._committed = True
            try:
                if action is not None:
                    action()
            except TransportError:
                self._committed = False  # the send failed in the kernel: no whole COMMIT left
                raise
            finally:
                if self._committed:
                    self._machine.fire(MigrationEvent.COMMIT)

    # -- the peer ----------------------------------------------------------

    def _track(self, conn: Connection) -> Connection:
        """Remember `conn` so a failure or cancel can wake a read blocked on it."""
        with self._in_flight_lock:
            self._in_flight.add(conn)
        if self.latch.failed:
            conn.shutdown_read()
        return conn

    def _untrack(self, conn: Connection) -> None:
        with self._in_flight_lock:
            self._in_flight.discard(conn)

    def _kick(self) -> None:
        with self._in_flight_lock:
            blocked = list(self._in_flight)
        for conn in blocked:
            conn.shutdown_read()

    @property
    def _conn(self) -> Connection | None:
        return self._main.conn

    @property
    def _peer_reason(self) -> MigrationError | None:
        return self._main.peer_reason

    def _read_message(self, expected: type[M], deadline: float | None = None) -> M:
        """The peer's next main-channel message, which must be an `expected`
        (an ABORT raises the peer's error).  Waits until `deadline` (monotonic)."""
        return self._main.read(expected, deadline)

    def _main_closed(self) -> str:
        return f"the {self.peer} closed the main channel"

    def _send_message(self, record: wire.Message) -> None:
        self._main.send(record)

    def _count_main(self, sent: int) -> None:
        if self.tracker is not None:
            self.tracker.main_bytes += sent

    def _own_conn(self, conn: Connection) -> Connection:
        """The main channel: closed at teardown, after an ABORT if the migration failed."""
        self._main.attach(conn)
        self._defer("close the main channel", self._close_main)
        return conn

    def _secure_main(self, conn: Connection, link: LinkSecurity) -> Connection:
        """The main channel, protected as `link` says from here on (MAC records, or
        TLS after its handshake here).  If that fails there is no main channel left
        to say anything on: the connection is closed."""
        try:
            secured = self._main.attach(secure(conn, link, record.MAIN_CONNECTION, self.latch,
                                               check_peer=False))
        except BaseException:
            self._main.close()
            raise
        check_peer_name(secured, link)  # on failure, the ABORT tells the peer why (over TLS)
        return secured

    def _close_main(self) -> None:
        if self._conn is None:
            return
        if self._aborting:
            self._send_abort()
        self._main.close()

    def _stop_channels(self) -> None:
        """Teardown of the channel processes: tell the peer why (ABORT) and hear it
        out, then stop them (:meth:`Operation._stop_channels`)."""
        aborting = self._aborting
        if aborting and self._peer_reason is not None:
            # The peer aborted: nothing more to say, and closing tells it at once
            # that we heard (it waits for that before it stops its channels).
            self._step("close the main channel", self._close_main)
        elif aborting and self._conn is not None:
            self._step("send ABORT", self._send_abort)
            self._step("hear the peer out", self._await_peer_close)
        super()._stop_channels()

    def _reported_error(self, first: BaseException, error: BaseException) -> BaseException:
        # A transport failure seen first is often the echo of the peer's ABORT:
        # report the peer's reason when it arrived while tearing down.
        if error is first and isinstance(first, TransportError) and self._peer_reason:
            return self._peer_reason
        return error

    def _result_extra(self) -> dict[str, Any]:
        return self._late_failures()

    def _await_peer_close(self, timeout: float = 0.5) -> None:
        """After our ABORT: wait until the peer closes the main channel or aborts too.

        Only then are the channel sockets shut down, so the peer learns why from
        the ABORT rather than from a broken channel.  Bounded: a dead peer costs
        at most `timeout`.
        """
        self._main.await_close(timeout)

    def _send_abort(self) -> None:
        """Tell the peer why we stop (once), if it has not told us first."""
        self._main.send_abort(self.latch.error)
