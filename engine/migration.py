"""Migration orchestration shared by both sides: configuration, lifecycle, teardown.

:class:`SourceMigration` (engine/source.py) and :class:`DestinationMigration`
(engine/destination.py) derive from :class:`Migration`, which owns the things
both have and both must tear down in the same careful order::

    failure/cancel ─▶ FailureLatch (first error wins; wakes every wait)
    teardown       ─▶ ABORT to the peer (best effort) → QUIT + shutdown every
                      channel socket → pool shutdown (joins only started
                      workers; terminates stragglers) → close sockets →
                      unlink what this migration created

A migration runs in the caller's thread (:meth:`Migration.run`) or in the
background (:meth:`Migration.start`, then :meth:`Migration.wait`);
:meth:`Migration.cancel` is safe from any thread, at any time.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Literal

from engine import message as wire
from engine import packet
from engine.channel import ChannelSpec, ControlOp, control_pair, read_control
from engine.errors import CancelledError, ConfigError, MigrationError, TransportClosedError
from engine.multifd import ChannelLink, shutdown_links
from engine.pool import WorkerPool
from engine.slots import SlotTable
from engine.stats import MigrationResult, MigrationStats, StatsTracker
from engine.sync import FailureLatch, MigrationEvent, MigrationState, StateMachine, wait_any
from engine.transport import Connection

log = logging.getLogger("multifd.migration")


@dataclass(frozen=True)
class MigrationConfig:
    """What the source proposes; the destination checks it fits (CONFIG / CONFIG_ACK)."""

    channels: int = 2
    packet_pages: int = 2048                # 8 MiB per packet: see docs/architecture.md
    downtime_limit_ms: float = 300.0
    max_rounds: int = 30
    on_max_rounds: Literal["switchover", "fail"] = "switchover"
    verify: bool = False                    # hash both memories at switchover and compare
    compression: str = "none"
    compression_level: int = 0
    zero_page_detection: bool = False
    connect_timeout_s: float = 10.0
    handshake_timeout_s: float = 10.0
    stall_timeout_s: float = 60.0           # no channel progress for this long fails the migration
    start_method: str = "spawn"             # how channel processes start
    cancel_grace_s: float = 1.0             # then channel processes that do not stop are killed

    def validate(self) -> MigrationConfig:
        """Return self, or raise ConfigError naming the bad field."""
        if not 1 <= self.channels <= packet.MAX_CHANNELS:
            raise ConfigError(f"channels must be 1..{packet.MAX_CHANNELS}, got {self.channels}")
        if not 1 <= self.packet_pages <= packet.MAX_PACKET_PAGES:
            raise ConfigError(f"packet_pages must be 1..{packet.MAX_PACKET_PAGES}")
        if self.downtime_limit_ms < 0:
            raise ConfigError("downtime_limit_ms must not be negative")
        if self.max_rounds < 1:
            raise ConfigError("max_rounds must be at least 1")
        if self.on_max_rounds not in ("switchover", "fail"):
            raise ConfigError("on_max_rounds must be 'switchover' or 'fail'")
        if self.start_method not in ("spawn", "forkserver", "fork"):
            raise ConfigError(f"unknown start method {self.start_method!r}")
        return self

    def with_(self, **changes: Any) -> MigrationConfig:
        return replace(self, **changes).validate()


class Migration:
    """Lifecycle and teardown common to both sides.  Subclasses implement :meth:`_run`."""

    role = "migration"

    def __init__(self, config: MigrationConfig, secret: bytes) -> None:
        if not secret:
            raise ConfigError("a shared secret is required (both sides must be given the same one)")
        self.config = config.validate()
        self.secret = bytes(secret)
        self.migration_id = uuid.uuid4()
        self.latch = FailureLatch()
        self._machine = StateMachine()
        self._pool: WorkerPool | None = None
        self._runner: WorkerPool | None = None
        self._run_future: Future | None = None
        self._links: list[ChannelLink] = []
        self._slots: SlotTable | None = None
        self._conn: Connection | None = None
        self.tracker: StatsTracker | None = None
        self.result: MigrationResult | None = None

    # -- public API --------------------------------------------------------

    @property
    def state(self) -> MigrationState:
        return self._machine.state

    def run(self) -> MigrationResult:
        """Run to completion in this thread.  Raises a MigrationError on failure or cancel."""
        try:
            self.result = self._run()
            return self.result
        except BaseException as exc:
            error = self._first_error(exc)
            self._machine.fire(
                MigrationEvent.CANCEL if isinstance(error, CancelledError) else MigrationEvent.FAIL
            )
            self._on_failure(error)
            if error is exc:
                raise
            raise error from exc
        finally:
            self._teardown()
            if self._machine.state is MigrationState.CANCELLING:
                self._machine.fire(MigrationEvent.TORN_DOWN)
            self.latch.close()

    def start(self) -> None:
        """Run in the background; use :meth:`wait` for the result."""
        if self._runner is not None:
            raise ConfigError("this migration was already started")
        self._runner = WorkerPool("thread", 1, name=f"mfd-{self.role}")
        self._run_future = self._runner.submit(self.run)

    def wait(self, timeout: float | None = None) -> MigrationResult:
        """Wait for a started migration.  Raises its error, or TimeoutError."""
        if self._run_future is None or self._runner is None:
            raise ConfigError("start() the migration first")
        try:
            return self._run_future.result(timeout)
        finally:
            if self._run_future.done():
                self._runner.shutdown()

    def done(self) -> bool:
        return self._run_future is not None and self._run_future.done()

    def cancel(self, reason: str = "migration cancelled") -> None:
        """Cancel at any phase; the migration tears down and its run() raises CancelledError."""
        self.latch.cancel(reason)

    def stats(self) -> MigrationStats | None:
        return self.tracker.snapshot() if self.tracker is not None else None

    def channel_pids(self) -> tuple[int, ...]:
        """PIDs of the channel processes (empty before setup or after teardown)."""
        return self._pool.statistics().worker_pids if self._pool is not None else ()

    # -- for subclasses ----------------------------------------------------

    def _run(self) -> MigrationResult:
        raise NotImplementedError

    def _on_failure(self, error: BaseException) -> None:
        """Side-specific recovery (the source resumes its guest)."""

    def _first_error(self, exc: BaseException) -> BaseException:
        # The latch holds the first failure (a channel, the peer, a cancel);
        # an exception raised while reacting to it is only its echo.
        self.latch.fail(exc)
        return self.latch.error or exc

    def _start_channels(
        self, target: Callable[..., Any], conns: list[Connection], spec: ChannelSpec
    ) -> None:
        """Run one channel process per connection on the process pool."""
        cfg = self.config
        self._pool = WorkerPool(
            "process", len(conns), name=f"mfd-{self.role}",
            start_method=cfg.start_method, cancel_grace=cfg.cancel_grace_s,
        )
        for channel_id, conn in enumerate(conns):
            main_end, channel_end = control_pair()
            try:
                future = self._pool.submit(
                    target, replace(spec, channel_id=channel_id), channel_end, conn.sock
                )
            except BaseException:
                main_end.close()
                raise
            finally:
                channel_end.close()
            link = ChannelLink(channel_id, main_end, conn, future)
            self._links.append(link)
            future.add_done_callback(self._channel_done)

    def _channel_done(self, future: Future) -> None:
        error = future.exception()
        if error is not None:
            self.latch.fail(error)

    def _wait_channels_ready(self, timeout: float) -> None:
        """Wait until every channel process attached its memory and is serving."""
        waiting = {link.ctrl.fileno(): link for link in self._links}
        deadline = time.monotonic() + timeout
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MigrationError(
                    f"{len(waiting)} channel process(es) did not start within {timeout:.0f} s"
                )
            for fd in wait_any(list(waiting), remaining, self.latch):
                link = waiting.pop(fd)
                message = read_control(link.ctrl)
                if message is None or message.op is not ControlOp.READY:
                    raise TransportClosedError(f"channel {link.channel_id} failed to start")

    def _channel_memory(self) -> list[dict[str, int]]:
        """Memory figures (kB) each channel process reported when it ended."""
        reports = []
        for link in self._links:
            # A channel posts its last message just before it returns.
            try:
                reports.append(link.future.result(timeout=2.0).memory)
            except Exception:
                pass
        return reports

    def _send_message(self, record: wire.Message) -> None:
        assert self._conn is not None
        data = wire.encode_message(record)
        self._conn.send_all(data)
        if self.tracker is not None:
            self.tracker.main_bytes += len(data)

    def _teardown(self) -> None:
        """Stop and release everything this migration created.  Idempotent, never raises."""
        failed = self.latch.failed and self._machine.state is not MigrationState.COMPLETED
        if failed and self._conn is not None:
            self._send_abort()
        if self._links:
            if failed:
                shutdown_links(self._links)
        if self._pool is not None:
            try:
                self._pool.shutdown(wait=True, cancel=failed)
            except Exception:  # teardown must go on; the first error is already recorded
                log.exception("pool shutdown failed")
        for link in self._links:
            link.close()
        self._links = []
        if self.tracker is not None:
            self.tracker.freeze()
            self.tracker.slots = None
        if self._slots is not None:
            self._slots.close()
            self._slots.unlink()
            self._slots = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _send_abort(self) -> None:
        error = self.latch.error
        code = wire.AbortCode.CANCELLED if isinstance(error, CancelledError) else wire.AbortCode.FAILED
        try:
            assert self._conn is not None
            self._conn.settimeout(1.0)
            self._conn.send_all(wire.encode_message(wire.Abort(code, str(error)[:1000])))
        except Exception:
            pass  # the peer may be gone already; ABORT is a courtesy
