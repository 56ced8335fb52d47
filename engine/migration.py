"""Migration orchestration shared by both sides: configuration, lifecycle, teardown.

:class:`SourceMigration` (engine/source.py) and :class:`DestinationMigration`
(engine/destination.py) derive from :class:`Migration`, which owns what both
have: the failure latch, the state machine, the commit point, and a teardown
built while setting up::

    failure/cancel ─▶ FailureLatch (first error wins; wakes every wait)
    set-up         ─▶ each step that creates something pushes the step that
                      releases it on an ExitStack (main channel, slot table,
                      channel processes, device jobs, ...)
    teardown       ─▶ the stack unwinds in reverse: device jobs stop before the
                      slots they write are freed, channels stop (after an ABORT
                      to the peer) before their sockets close, and so on

A migration runs in the caller's thread (:meth:`Migration.run`) or in the
background (:meth:`Migration.start`, then :meth:`Migration.wait`);
:meth:`Migration.cancel` is safe from any thread, at any time before the
commit point (docs/architecture.md, "Switchover is a commit").
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from engine import codecs
from engine.channel import ChannelReport, ChannelSpec, ControlOp, control_pair, read_control, run_contained
from engine.device import DeviceLoading, DeviceReport, MigratableDevice
from engine.errors import (
    CancelledError,
    ConfigError,
    LocalProtocolError,
    MigrationError,
    OutcomeUnknownError,
    PoolError,
    TransportClosedError,
    TransportError,
)
from engine.main_channel import MainChannel
from engine.multifd import ChannelLink, channel_error, root_cause, shutdown_links
from engine.payload import payload_entry
from engine.pool import WorkerPool
from engine.shm import GuestRAM
from engine.slots import Counter, SlotTable
from engine.stats import MigrationResult, MigrationStats, StatsTracker, device_extra
from engine.sync import FailureLatch, MigrationEvent, MigrationState, StateMachine, wait_any
from engine.transport import Connection
from engine.wire import message as wire
from engine.wire import packet

log = logging.getLogger("multifd.migration")

M = TypeVar("M")


@dataclass(frozen=True)
class MigrationConfig:
    """What the source proposes; the destination checks it fits (CONFIG / CONFIG_ACK)."""

    channels: int = 2
    packet_pages: int = 4096                # 16 MiB per packet: see docs/architecture.md
    downtime_limit_ms: float = 300.0
    max_rounds: int = 30
    on_max_rounds: Literal["switchover", "fail"] = "switchover"
    verify: bool = False                    # hash both memories at switchover and compare
    compression: str = "none"               # none, lz4, zstd, zlib (engine/codecs.py)
    compression_level: int | None = None    # None: the codec's default
    zero_page_detection: bool = True
    max_bandwidth: float | None = None      # bytes/s over all channels together; None: no cap
    connect_timeout_s: float = 10.0
    handshake_timeout_s: float = 10.0
    stall_timeout_s: float = 60.0           # no channel progress for this long fails the migration
    start_method: str = "spawn"             # how channel processes start
    cancel_grace_s: float = 1.0             # then channel processes that do not stop are killed
    # Auto-converge (QEMU's): when a precopy round leaves more than
    # throttle_trigger_pct of its pages dirty again for the next one, the source
    # asks its VMM to throttle the guest (SourceMigration's throttle_guest):
    # first throttle_initial_pct, then throttle_step_pct more each such round, at
    # most throttle_max_pct; back to 0 once the guest is paused.
    auto_converge: bool = False
    throttle_trigger_pct: int = 50          # QEMU's throttle-trigger-threshold
    throttle_initial_pct: int = 20
    throttle_step_pct: int = 10
    throttle_max_pct: int = 99

    def validate(self) -> MigrationConfig:
        """Return self, or raise ConfigError naming the bad field."""
        if not 1 <= self.channels <= packet.MAX_CHANNELS:
            raise ConfigError(f"channels must be 1..{packet.MAX_CHANNELS}, got {self.channels}")
        if not 1 <= self.packet_pages <= packet.MAX_PACKET_PAGES:
            raise ConfigError(f"packet_pages must be 1..{packet.MAX_PACKET_PAGES}")
        if not self.downtime_limit_ms >= 0:  # also refuses NaN
            raise ConfigError("downtime_limit_ms must be a non-negative number")
        for name in ("connect_timeout_s", "handshake_timeout_s", "stall_timeout_s", "cancel_grace_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be a positive number of seconds")
        if self.max_rounds < 1:
            raise ConfigError("max_rounds must be at least 1")
        if self.on_max_rounds not in ("switchover", "fail"):
            raise ConfigError("on_max_rounds must be 'switchover' or 'fail'")
        codecs.make_codec(self.compression, self.compression_level)  # raises ConfigError
        if self.max_bandwidth is not None and not self.max_bandwidth > 0:
            raise ConfigError("max_bandwidth must be a positive number of bytes/s, or None")
        for name in ("throttle_trigger_pct", "throttle_initial_pct", "throttle_step_pct",
                     "throttle_max_pct"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 99:
                raise ConfigError(f"{name} must be a whole percentage in 1..99, got {value!r}")
        if self.throttle_initial_pct > self.throttle_max_pct:
            raise ConfigError(f"throttle_initial_pct ({self.throttle_initial_pct}) is above "
                              f"throttle_max_pct ({self.throttle_max_pct})")
        if self.start_method not in ("spawn", "forkserver", "fork"):
            raise ConfigError(f"start_method must be spawn, forkserver or fork, not {self.start_method!r}")
        return self

    def with_(self, **changes: Any) -> MigrationConfig:
        return replace(self, **changes).validate()


class Migration:
    """Lifecycle and teardown common to both sides.  Subclasses implement :meth:`_run`.

    `pool`: a process :class:`~engine.pool.WorkerPool` the VMM keeps warm across
    operations, so channels start in milliseconds instead of spawning processes.
    It needs ``config.channels`` free workers (else ConfigError).  The operation
    runs its channels there and leaves the pool as it found it, failed or not;
    only a channel process that dies (or one that ignores a stop for
    ``cancel_grace_s``) breaks the pool, and the next operation given a broken
    pool raises ConfigError: shut it down and make a new one.  Without `pool`,
    each operation starts and stops its own channel processes.
    """

    role = "migration"
    networked = True  # has a peer to authenticate (snapshots have none)

    def __init__(self, config: MigrationConfig, secret: bytes = b"",
                 pool: WorkerPool | None = None) -> None:
        if self.networked and not secret:
            raise ConfigError("a shared secret is required (both sides must be given the same one)")
        self.config = config.validate()
        self.secret = bytes(secret)
        self.migration_id = uuid.uuid4()
        self.latch = FailureLatch()
        self._machine = StateMachine()
        # The VMM's own process pool, kept warm across migrations, or None: then
        # each migration starts (and stops) its channel processes itself.
        self._shared_pool = pool
        self._pool: WorkerPool | None = None
        self._device_pool: WorkerPool | None = None  # threads for device save/load jobs
        self._runner: WorkerPool | None = None
        self._run_future: Future | None = None
        self._links: list[ChannelLink] = []
        self._slots: SlotTable | None = None
        self.tracker: StatsTracker | None = None
        self.result: MigrationResult | None = None
        self.ram: GuestRAM | None = None
        self.device_reports: list[DeviceReport] = []
        # Connections a thread may be blocked reading (handshakes, the main
        # channel): a failure or cancel shuts their read side to wake it.
        self._in_flight: set[Connection] = set()
        self._in_flight_lock = threading.Lock()
        self.latch.on_fail(self._kick)
        # The main channel (connected in set-up): the one reader of what the peer says.
        self._main = MainChannel(self.latch, self.peer, self._main_closed, self._count_main)
        # Teardown, built during set-up: each step that creates something pushes
        # the step that releases it; teardown unwinds the stack in reverse.
        self._exits = contextlib.ExitStack()
        # The commit point: a cancel and the commit take this lock, so a cancel
        # either lands before the commit (and stops it) or is refused after it.
        self._commit_lock = threading.Lock()
        self._committed = False
        # Channels that failed after their last word (END sent or read): their
        # work is done, so they do not fail the migration; reported in the result.
        self.late_channel_failures: list[str] = []

    # -- public API --------------------------------------------------------

    @property
    def state(self) -> MigrationState:
        return self._machine.state

    def run(self) -> MigrationResult:
        """Run to completion in this thread.  Raises a MigrationError on failure or cancel."""
        try:
            self.result = self._run()
        except BaseException as exc:
            self.latch.fail(exc)
            error = self._fail()
            if error is exc:
                raise
            if error.__cause__ is None:  # keep a cause the error already names
                error.__cause__ = exc
            raise error from error.__cause__
        else:
            self._teardown()
            return self.result
        finally:
            self.latch.close()

    def _fail(self) -> BaseException:
        """Recover, tear down, settle the state; return the error to report."""
        first = self.latch.error
        assert first is not None
        error = self._on_failure(first)  # the source resumes its guest before anything slow
        self._teardown()
        # A transport failure seen first is often the echo of the peer's ABORT:
        # report the peer's reason when it arrived while tearing down.
        if error is first and isinstance(first, TransportError) and self._peer_reason:
            error = self._peer_reason
        if isinstance(error, OutcomeUnknownError):
            self._machine.fire(MigrationEvent.LOSE_TRACK)
        elif self._machine.state is MigrationState.COMMITTED:
            self._machine.fire(MigrationEvent.FAIL)
        else:
            cancelled = isinstance(error, CancelledError)
            self._machine.fire(MigrationEvent.CANCEL if cancelled else MigrationEvent.FAIL)
            if self._machine.state is MigrationState.CANCELLING:
                self._machine.fire(MigrationEvent.TORN_DOWN)
        return error

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

    def cancel(self, reason: str = "migration cancelled") -> bool:
        """Cancel at any phase before the commit point; run() then raises CancelledError.

        Returns False, and changes nothing, once the migration committed (the
        destination owns the VM: there is nothing left to cancel) or already failed.
        """
        with self._commit_lock:
            if self._committed:
                log.info("%s: cancel refused, the migration has committed", self.role)
                return False
            return self.latch.cancel(reason)

    @property
    def committed(self) -> bool:
        """True once the commit point passed: the destination owns the VM."""
        return self._committed

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

    def stats(self) -> MigrationStats | None:
        return self.tracker.snapshot() if self.tracker is not None else None

    def channel_pids(self) -> tuple[int, ...]:
        """PIDs of this operation's channel processes, once they are serving
        (empty before then and after teardown)."""
        if self._pool is None:
            return ()
        return tuple(link.pid for link in self._links if link.pid)

    # -- for subclasses ----------------------------------------------------

    def _run(self) -> MigrationResult:
        raise NotImplementedError

    def _on_failure(self, error: BaseException) -> BaseException:
        """Side-specific recovery (the source resumes its guest); returns the error
        to report, which may say more than `error` (where the guest is)."""
        return error

    def _start_channels(
        self, target: Callable[..., Any], conns: Sequence[Connection | None], spec: ChannelSpec
    ) -> None:
        """Run one channel process per connection (None: a file channel, no socket)
        on the process pool: the VMM's shared one, or one of our own; returns once
        every channel is serving (READY)."""
        cfg = self.config
        if self._shared_pool is not None:
            self._pool = self._check_shared_pool(self._shared_pool, len(conns))
        else:
            self._pool = WorkerPool(
                "process", len(conns), name=f"mfd-{self.role}",
                start_method=cfg.start_method, cancel_grace=cfg.cancel_grace_s,
            )
        self._defer("stop the channels", self._stop_channels)
        for channel_id, conn in enumerate(conns):
            main_end, channel_end = control_pair()
            data = () if conn is None else (conn.sock,)
            job: tuple[Callable[..., Any], ...] = (target,)
            if self._pool is self._shared_pool:
                job = (run_contained, target)  # our failure must not break the VMM's pool
            try:
                future = self._pool.submit(
                    *job, replace(spec, channel_id=channel_id), channel_end, *data
                )
            except BaseException:
                main_end.close()
                for unused in conns[channel_id:]:
                    if unused is not None:
                        unused.close()
                raise
            finally:
                channel_end.close()
            link = ChannelLink(channel_id, main_end, conn, future, root_cause=self._pool_broken_by)
            self._links.append(link)
            future.add_done_callback(functools.partial(self._channel_done, link))
        self._wait_channels_ready(cfg.handshake_timeout_s * 3)

    def _open_device_pool(self, devices: Sequence[MigratableDevice], workers: int) -> WorkerPool:
        """The thread pool for the save or load jobs of `devices` (objects of this
        process), `workers` threads; stopped by teardown before the slots go."""
        pool = self._device_pool = WorkerPool("thread", workers, name=f"mfd-{self.role}-devices")
        self._defer("stop the device jobs", self._stop_device_jobs, pool, devices)
        return pool

    def _device_loader(self, devices: Sequence[MigratableDevice], device_load: str,
                       slots: SlotTable | None, *extra: Any) -> DeviceLoading:
        """The device-state client's loader for `devices`, on a device pool of one
        worker per device ("parallel") or one in all ("serial")."""
        make_loader = payload_entry(packet.PacketKind.DEVICE_STATE).sink
        assert make_loader is not None
        pool = self._open_device_pool(devices, len(devices) if device_load == "parallel" else 1)
        loader: DeviceLoading = make_loader(devices, slots, pool, self.latch, *extra)
        return loader

    @staticmethod
    def _check_shared_pool(pool: WorkerPool, channels: int) -> WorkerPool:
        if pool.backend != "process":
            raise ConfigError("channels are processes: the pool must have the process backend")
        stats = pool.statistics()
        if pool.broken is not None:
            raise ConfigError(f"the pool was broken by an earlier failure ({pool.broken}); "
                              f"shut it down and create a new one")
        if stats.max_workers - stats.busy - stats.pending < channels:
            raise ConfigError(f"the pool has {stats.max_workers - stats.busy - stats.pending} free "
                              f"workers of {stats.max_workers}; {channels} channels need one each")
        return pool

    def _release_shared_pool(self, pool: WorkerPool, failed: bool) -> None:
        """Our channel jobs end (they were told to stop, or finished); one that
        does not within cancel_grace breaks the pool, which stops it."""
        _, stuck = futures_wait([link.future for link in self._links], self.config.cancel_grace_s)
        if stuck:
            pool.cancel(PoolError(f"{len(stuck)} channel(s) of a {'failed ' if failed else ''}"
                                  f"{self.role} did not stop within {self.config.cancel_grace_s} s"))

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

    def _pool_broken_by(self) -> BaseException | None:
        return self._pool.broken if self._pool is not None else None

    def _channel_done(self, link: ChannelLink, future: Future) -> None:
        """A channel job ended.  Its failure fails the migration, unless the channel
        had already said its last word (END): then its work is done, and the
        failure is only reported (the pool still knows the worker died)."""
        error = channel_error(future)
        if error is None or self.latch.failed:
            return  # a failed migration's channels end how teardown makes them end
        slots = self._slots
        done = link.finished or (slots is not None and slots.counters[link.channel_id, Counter.LAST_WORD])
        if done:
            log.warning("%s: channel %d failed after its last packet: %s", self.role, link.channel_id, error)
            self.late_channel_failures.append(f"channel {link.channel_id}: {error}")
            return
        self.latch.fail(root_cause(error, self._pool_broken_by()))

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
                try:
                    message = read_control(link.ctrl)
                except TransportClosedError:
                    message = None
                if message is None:
                    raise link.exit_error()
                if message.op is not ControlOp.READY:
                    raise LocalProtocolError(f"channel {link.channel_id} sent {message.op.name} first")
                link.pid = message.a

    def _set_state(self, state: MigrationState) -> None:
        """What :meth:`stats` reports as the state from now on."""
        if self.tracker is not None:
            self.tracker.state = state

    def _result(self, t_start: float, t_setup: float, t_moved: float, t_end: float, *,
                downtime_ms: float, rounds: int, extra: dict[str, Any] | None = None,
                **fields: Any) -> MigrationResult:
        """The operation's :class:`MigrationResult`, built here and only here.

        Times are perf_counter readings: started, set up, everything moved (the
        transfer's end), done.  What every operation reports (identity, times,
        traffic, channel memory, devices) comes from the operation itself; the
        operation passes what only it knows in `fields` (``verified``,
        ``rtt_ms``, ...) and its own part of ``extra``.
        """
        assert self.tracker is not None and self.ram is not None
        fields.setdefault("verified", None)
        fields.setdefault("migration_id", str(self.migration_id))
        return MigrationResult(
            status=MigrationState.COMPLETED,
            role=self.role,
            ram_bytes=self.ram.size,
            channels=len(self._links),
            total_time_s=t_end - t_start,
            setup_time_ms=(t_setup - t_start) * 1000,
            downtime_ms=downtime_ms,
            rounds=rounds,
            **self._traffic(t_moved - t_setup),
            channel_memory_kib=self._channel_memory(),
            extra={**device_extra(self.device_reports), **(extra or {}), **self._result_extra()},
            **fields,
        )

    def _traffic(self, transfer_s: float) -> dict[str, Any]:
        """The result's fields about what moved in `transfer_s` seconds."""
        assert self.tracker is not None
        return self.tracker.traffic(transfer_s)

    def _result_extra(self) -> dict[str, Any]:
        """What every result of this kind of operation adds to ``extra``, last."""
        return self._late_failures()

    def _late_failures(self) -> dict[str, list[str]]:
        """The result's report of channels that failed after their last word.  Read
        from the jobs themselves too: a death the pool noticed a moment ago may not
        have reached its callback yet (call after :meth:`_channel_memory`)."""
        failures = list(self.late_channel_failures)
        for link in self._links:
            error = channel_error(link.future) if link.future.done() else None
            text = f"channel {link.channel_id}: {error}"
            if error is not None and text not in failures:
                failures.append(text)
        return {"late_channel_failures": failures} if failures else {}

    def _channel_memory(self) -> list[dict[str, int]]:
        """Memory figures (kB) each channel process reported when it ended."""
        # A channel posts its last message just before it returns; one that died
        # after it (a late failure, already reported) has no figures to give.
        futures = [link.future for link in self._links]
        done, _ = futures_wait(futures, timeout=2.0)
        return [future.result().memory for future in futures
                if future in done and future.exception() is None
                and isinstance(future.result(), ChannelReport)]

    peer = "peer"

    @property
    def _conn(self) -> Connection | None:
        return self._main.conn

    @property
    def _main_decoder(self) -> wire.MessageDecoder:
        return self._main.decoder

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

    def _teardown(self) -> None:
        """Release everything this operation created, in reverse order of set-up.
        Idempotent, never raises (each step runs even if an earlier one failed)."""
        self._exits.close()

    def _defer(self, what: str, action: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """Push a teardown step (`what` names it in a log line if it fails)."""
        self._exits.callback(self._step, what, action, *args, **kwargs)

    @property
    def _aborting(self) -> bool:
        """Tearing down a migration that failed before its commit point."""
        return self.latch.failed and not self._committed

    def _own_conn(self, conn: Connection) -> Connection:
        """The main channel: closed at teardown, after an ABORT if the migration failed."""
        self._main.attach(conn)
        self._defer("close the main channel", self._close_main)
        return conn

    def _close_main(self) -> None:
        if self._conn is None:
            return
        if self._aborting:
            self._send_abort()
        self._main.close()

    def _own_slots(self, slots: SlotTable) -> SlotTable:
        """The slot table: freed at teardown, after the channels and device jobs
        that write it have stopped (they are set up later, so torn down first)."""
        self._slots = slots
        self._defer("unlink the slot table", self._free_slots)
        if self.tracker is not None:
            self.tracker.slots = slots
            self._defer("keep final counters", self.tracker.freeze)
        return slots

    def _free_slots(self) -> None:
        if self.tracker is not None:
            self.tracker.slots = None
        if self._slots is not None:
            slots, self._slots = self._slots, None
            slots.close()
            slots.unlink()

    def _stop_channels(self) -> None:
        """Teardown of the channel processes: tell the peer why (ABORT) and hear it
        out, stop every channel, release or shut down the pool, close the links."""
        aborting = self._aborting
        if aborting and self._peer_reason is not None:
            # The peer aborted: nothing more to say, and closing tells it at once
            # that we heard (it waits for that before it stops its channels).
            self._step("close the main channel", self._close_main)
        elif aborting and self._conn is not None:
            self._step("send ABORT", self._send_abort)
            self._step("hear the peer out", self._await_peer_close)
        if aborting:
            self._step("tell the channels to quit", shutdown_links, self._links)
        pool, self._pool = self._pool, None
        if pool is not None and pool is self._shared_pool:
            self._step("release the shared pool", self._release_shared_pool, pool, self.latch.failed)
        elif pool is not None:
            self._step("shut the channel pool down", pool.shutdown, wait=True, cancel=self.latch.failed)
        links, self._links = self._links, []
        for link in links:
            self._step("close a channel link", link.close)

    def _stop_device_jobs(self, pool: WorkerPool, devices: Sequence[MigratableDevice]) -> None:
        """Teardown of the device jobs: a failed operation asks each device to stop
        (its optional ``cancel()``), then waits ``cancel_grace_s`` at most; a job
        still inside the device's code then is abandoned, never joined."""
        self._device_pool = None
        if self._aborting:  # after the commit the devices are the destination VMM's
            for device in devices:
                cancel = getattr(device, "cancel", None)
                if callable(cancel):
                    self._step(f"cancel device {device.idstr!r}", cancel)
            pool.cancel(self.latch.error)
        deadline = time.monotonic() + self.config.cancel_grace_s
        while pool.statistics().busy and time.monotonic() < deadline:
            time.sleep(0.005)
        stuck = pool.statistics().busy
        if stuck:
            log.warning("%s: %d device job(s) did not stop within %.1f s; abandoned",
                        self.role, stuck, self.config.cancel_grace_s)
        pool.shutdown(wait=not stuck)

    @staticmethod
    def _step(what: str, action: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        try:
            action(*args, **kwargs)
        except Exception as exc:  # teardown goes on; the first error is already recorded
            log.warning("teardown: could not %s: %s", what, exc)
            log.debug("teardown step %r failed", what, exc_info=True)

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
