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
import select
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from engine import codecs, packet
from engine import message as wire
from engine.channel import ChannelSpec, ControlOp, control_pair, read_control, run_contained
from engine.device import DeviceLoading, MigratableDevice
from engine.errors import (
    CancelledError,
    ConfigError,
    LocalProtocolError,
    MigrationError,
    PoolError,
    RemoteProtocolError,
    TransportBrokenError,
    TransportClosedError,
    TransportError,
)
from engine.multifd import ChannelLink, channel_error, root_cause, shutdown_links
from engine.payload import payload_entry
from engine.pool import WorkerPool
from engine.slots import SlotTable
from engine.stats import MigrationResult, MigrationStats, StatsTracker
from engine.sync import FailureLatch, MigrationEvent, MigrationState, StateMachine, wait_any
from engine.transport import Connection

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
        self._conn: Connection | None = None
        self.tracker: StatsTracker | None = None
        self.result: MigrationResult | None = None
        # Connections a thread may be blocked reading (handshakes, the main
        # channel): a failure or cancel shuts their read side to wake it.
        self._in_flight: set[Connection] = set()
        self._in_flight_lock = threading.Lock()
        self.latch.on_fail(self._kick)
        self._peer_reason: BaseException | None = None  # the peer's ABORT, if one came
        self._main_decoder = wire.MessageDecoder()  # what the peer says on the main channel

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
            raise error from exc
        else:
            self._teardown()
            return self.result
        finally:
            self.latch.close()

    def _fail(self) -> BaseException:
        """Recover, tear down, settle the state; return the error to report."""
        first = self.latch.error
        assert first is not None
        self._on_failure(first)  # the source resumes its guest before anything slow
        self._teardown()
        # A transport failure seen first is often the echo of the peer's ABORT:
        # report the peer's reason when it arrived while tearing down.
        error = self._peer_reason if isinstance(first, TransportError) and self._peer_reason else first
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

    def cancel(self, reason: str = "migration cancelled") -> None:
        """Cancel at any phase; the migration tears down and its run() raises CancelledError."""
        self.latch.cancel(reason)

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

    def _on_failure(self, error: BaseException) -> None:
        """Side-specific recovery (the source resumes its guest)."""

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
                raise
            finally:
                channel_end.close()
            link = ChannelLink(channel_id, main_end, conn, future, root_cause=self._pool_broken_by)
            self._links.append(link)
            future.add_done_callback(self._channel_done)
        self._wait_channels_ready(cfg.handshake_timeout_s * 3)

    def _open_device_pool(self, workers: int) -> WorkerPool:
        """The thread pool for this operation's device save or load jobs (devices
        are objects of this process); stopped by teardown."""
        self._device_pool = WorkerPool("thread", workers, name=f"mfd-{self.role}-devices")
        return self._device_pool

    def _device_loader(self, devices: Sequence[MigratableDevice], device_load: str,
                       slots: SlotTable | None, *extra: Any) -> DeviceLoading:
        """The device-state client's loader for `devices`, on a device pool of one
        worker per device ("parallel") or one in all ("serial")."""
        make_loader = payload_entry(packet.PacketKind.DEVICE_STATE).sink
        assert make_loader is not None
        pool = self._open_device_pool(len(devices) if device_load == "parallel" else 1)
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

    def _release_shared_pool(self, failed: bool) -> None:
        """Our channel jobs end (they were told to stop, or finished); one that
        does not within cancel_grace breaks the pool, which stops it."""
        assert self._pool is not None
        deadline = time.monotonic() + self.config.cancel_grace_s
        stuck = 0
        for link in self._links:
            try:
                link.future.exception(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                stuck += 1
            except Exception:
                pass
        if stuck:
            self._pool.cancel(PoolError(f"{stuck} channel(s) of a {'failed ' if failed else ''}"
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

    def _channel_done(self, future: Future) -> None:
        error = channel_error(future)
        if error is not None:
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

    peer = "peer"

    def _read_message(self, expected: type[M], deadline: float | None = None) -> M:
        """The peer's next main-channel message, which must be an `expected`
        (an ABORT raises the peer's error).  Waits until `deadline` (monotonic)."""
        while True:
            message = self._main_decoder.next_message()
            if message is packet.NEED_DATA:
                data = self._read_main(deadline)
                if not data:
                    raise TransportClosedError(self._main_closed())
                self._main_decoder.receive_data(data)
                continue
            if isinstance(message, wire.Abort):
                raise self._peer_error(message)
            if not isinstance(message, expected):
                raise RemoteProtocolError(
                    f"expected {expected.__name__} from the {self.peer}, got {type(message).__name__}"
                )
            return message

    def _main_closed(self) -> str:
        return f"the {self.peer} closed the main channel"

    def _peer_error(self, abort: wire.Abort) -> MigrationError:
        """The error the peer's ABORT stands for (and remember it as the peer's reason)."""
        if abort.code == wire.AbortCode.CANCELLED:
            error: MigrationError = CancelledError(f"{self.peer} cancelled: {abort.message}")
        else:
            error = MigrationError(f"{self.peer} failed: {abort.message}")
        self._peer_reason = self._peer_reason or error
        return error

    def _read_main(self, deadline: float | None) -> bytes:
        """Bytes from the main channel (b"" at EOF), waking on failure or cancel too.

        Raises TransportBrokenError if nothing comes before `deadline` (monotonic).
        """
        assert self._conn is not None
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not wait_any([self._conn], remaining, self.latch):
            raise TransportBrokenError(f"the {self.peer} did not answer on the main channel in time")
        return self._conn.recv_some()

    def _send_message(self, record: wire.Message) -> None:
        assert self._conn is not None
        data = wire.encode_message(record)
        self._conn.send_all(data)
        if self.tracker is not None:
            self.tracker.main_bytes += len(data)

    def _teardown(self) -> None:
        """Stop and release everything this migration created.  Idempotent, never raises.

        Order: ABORT to the peer → QUIT and shut down every channel socket (wakes
        a process blocked on it) → pool shutdown (joins started workers, kills
        stragglers) → close sockets → unlink the slot table.  Each step runs even
        if an earlier one failed.
        """
        failed = self.latch.failed and self._machine.state is not MigrationState.COMPLETED
        if failed and self._conn is not None:
            self._step("send ABORT", self._send_abort)
            if self._links:  # only channel sockets could tell the peer first
                self._step("hear the peer out", self._await_peer_close)
        if failed and self._links:
            self._step("stop channels", shutdown_links, self._links)
        if self._pool is self._shared_pool and self._pool is not None:
            self._step("release the shared pool", self._release_shared_pool, failed)
        elif self._pool is not None:
            self._step("shut the pool down", self._pool.shutdown, wait=True, cancel=failed)
        self._pool = None
        for link in self._links:
            self._step("close a channel link", link.close)
        self._links = []
        if self.tracker is not None:
            self._step("keep final counters", self.tracker.freeze)
            self.tracker.slots = None
        if self._slots is not None:
            self._step("close the slot table", self._slots.close)
            self._step("unlink the slot table", self._slots.unlink)
            self._slots = None
        if self._conn is not None:
            self._step("close the main channel", self._conn.close)
            self._conn = None
        if self._device_pool is not None:
            self._step("stop the device jobs", self._device_pool.shutdown, wait=True,
                       cancel=self._machine.state is not MigrationState.COMPLETED)
            self._device_pool = None

    @staticmethod
    def _step(what: str, action: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        try:
            action(*args, **kwargs)
        except Exception:  # teardown goes on; the first error is already recorded
            log.exception("teardown: could not %s", what)

    def _await_peer_close(self, timeout: float = 0.5) -> None:
        """After our ABORT: wait until the peer closes the main channel or aborts too.

        Only then are the channel sockets shut down, so the peer learns why from
        the ABORT rather than from a broken channel.  Bounded: a dead peer costs
        at most `timeout`.
        """
        if self._peer_reason is not None:
            return  # the peer aborted first: it is tearing down already
        assert self._conn is not None
        deadline = time.monotonic() + timeout
        decoder = self._main_decoder
        while True:
            try:
                message = decoder.next_message()
            except MigrationError:
                return  # closed, or garbage: either way the peer is done talking
            if message is packet.NEED_DATA:
                remaining = deadline - time.monotonic()
                ready, _, _ = select.select([self._conn], [], [], max(0.0, remaining))
                if not ready:
                    return
                decoder.receive_data(self._conn.recv_some())
            elif isinstance(message, wire.Abort):
                self._peer_error(message)
                return

    def _send_abort(self) -> None:
        error = self.latch.error
        code = wire.AbortCode.CANCELLED if isinstance(error, CancelledError) else wire.AbortCode.FAILED
        try:
            assert self._conn is not None
            self._conn.settimeout(1.0)
            self._conn.send_all(wire.encode_message(wire.Abort(code, str(error)[:1000])))
        except Exception:
            pass  # the peer may be gone already; ABORT is a courtesy
