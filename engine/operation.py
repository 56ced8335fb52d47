"""The operation base: what a migration's two sides and a snapshot's save and
restore share, with or without a peer.

::

    Operation               latch, state machine, run/start/wait/cancel, the channel
    │                       processes on a pool, device jobs, slots, stats, the result,
    │                       and a teardown built while setting up
    ├── Migration           + a peer: a shared secret, the main channel (MainChannel),
    │   │                     ABORT on failure, the commit point (engine/migration.py)
    │   ├── SourceMigration       (+ SavingOperation: rounds, devices, pause/resume)
    │   └── DestinationMigration
    ├── SavingOperation     + a guest running here: precopy rounds, device saves,
    │   │                     pause and resume (engine/saving.py)
    │   └── SnapshotSave
    └── SnapshotRestore

Each operation builds its teardown while it sets up::

    failure/cancel ─▶ FailureLatch (first error wins; wakes every wait)
    set-up         ─▶ each step that creates something pushes the step that
                      releases it on an ExitStack (main channel, slot table,
                      channel processes, device jobs, ...)
    teardown       ─▶ the stack unwinds in reverse: device jobs stop before the
                      slots they write are freed, channels stop (after an ABORT
                      to a peer) before their sockets close, and so on

An operation runs in the caller's thread (:meth:`Operation.run`) or in the
background (:meth:`Operation.start`, then :meth:`Operation.wait`);
:meth:`Operation.cancel` is safe from any thread, at any time before a
migration's commit point (docs/architecture.md, "Switchover is a commit").
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
from dataclasses import replace
from typing import Any

from engine.channel import (
    ChannelReport,
    ChannelSpec,
    ControlOp,
    channel_fork_server,
    channel_pool,
    control_pair,
    preload_channel,
    read_control,
    run_contained,
)
from engine.config import LocalConfig, check_argument
from engine.device import DeviceLoading, DeviceReport, MigratableDevice
from engine.errors import (
    CancelledError,
    ConfigError,
    LocalProtocolError,
    MigrationError,
    OutcomeUnknownError,
    PoolError,
    TransportClosedError,
    WaitTimeout,
)
from engine.multifd import ChannelLink, channel_error, root_cause, shutdown_links
from engine.payload import payload_entry
from engine.pool import WorkerPool
from engine.shm import GuestRAM
from engine.slots import Counter, SlotTable
from engine.stats import MigrationResult, MigrationStats, StatsTracker, device_extra
from engine.sync import FailureLatch, MigrationEvent, MigrationState, StateMachine, wait_any
from engine.transport import Connection
from engine.wire import packet

log = logging.getLogger("multifd.migration")


class Operation:
    """Lifecycle and teardown common to every operation.  Subclasses implement :meth:`_run`.

    `pool`: a process :class:`~engine.pool.WorkerPool` the VMM keeps warm across
    operations, so channels start in milliseconds instead of spawning processes.
    It needs ``config.channels`` free workers (else ConfigError).  The operation
    runs its channels there and leaves the pool as it found it, failed or not;
    only a channel process that dies (or one that ignores a stop for
    ``cancel_grace_s``) breaks the pool, and the next operation given a broken
    pool raises ConfigError: shut it down and make a new one.  Without `pool`,
    each operation starts and stops its own channel processes; so does one whose
    `pool` has too few free workers when `own_pool_if_short` is set (a listener
    whose pool is sized for the usual source, say).
    """

    role = "operation"
    noun = "migration"  # what a user calls it: "migration cancelled"

    def __init__(self, config: LocalConfig, *, pool: WorkerPool | None = None,
                 own_pool_if_short: bool = False) -> None:
        usable = pool is None or (isinstance(pool, WorkerPool) and pool.backend == "process"
                                  and not pool.closed)
        check_argument("pool", pool, usable, "a running WorkerPool of the process backend (channels "
                       "are processes), or None")
        self.config = config.validate()
        # The payload handlers are found through entry points (a scan of the installed
        # packages, ~50 ms), and OpenSSL sets AES-GCM up on first use (~5 ms): now,
        # once per process, not while a peer waits in set-up.
        preload_channel()
        if (pool is None or own_pool_if_short) and self.config.start_method == "forkserver":
            # The fork server imports the channel modules (~0.3 s) while the operation
            # is set up and its peer connects, not after its first page is on the wire.
            channel_fork_server().start()
        self.migration_id = uuid.uuid4()
        self.latch = FailureLatch()
        self._machine = StateMachine()
        # The VMM's own process pool, kept warm across operations, or None: then
        # each operation starts (and stops) its channel processes itself.
        self._shared_pool = pool
        self._own_pool_if_short = own_pool_if_short
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
        # Teardown, built during set-up: each step that creates something pushes
        # the step that releases it; teardown unwinds the stack in reverse.
        self._exits = contextlib.ExitStack()
        # A migration's commit point (engine/migration.py): a cancel and the commit
        # take this lock, so a cancel either lands before the commit (and stops it)
        # or is refused after it.  An operation without a peer never commits.
        self._commit_lock = threading.Lock()
        self._committed = False
        # A snapshot's point of no return (published, or the restored guest about to
        # start): after it, as after a commit, a cancel is refused.
        self._past_return = False
        # An operation runs once: run(), start() or a cancel() before either claims it.
        self._claim_lock = threading.Lock()
        self._claimed_by: str | None = None
        self._over = threading.Event()  # ended: torn down, result or error settled (done())
        self._thread: threading.Thread | None = None  # the one running it (run()'s caller, start()'s)
        # Channels that failed after their last word (END sent or read): their
        # work is done, so they do not fail the operation; a migration reports them.
        self.late_channel_failures: list[str] = []
        # Set-up milestones (perf_counter), in order: the result reports the steps.
        self._setup_marks: list[tuple[str, float]] = []

    # -- public API --------------------------------------------------------

    @property
    def state(self) -> MigrationState:
        return self._machine.state

    def run(self) -> MigrationResult:
        """Run to completion in this thread.  Raises a MigrationError on failure or
        cancel, and ConfigError if the operation was already started: it runs once."""
        self._claim("run")
        return self._run_once()

    def _claim(self, how: str) -> None:
        with self._claim_lock:
            claimed, self._claimed_by = self._claimed_by, self._claimed_by or how
        if claimed == "cancel":
            self.latch.raise_if_failed()  # the CancelledError run() raises after a cancel
        if claimed is not None:
            raise ConfigError(f"this {self.role} was already started (with {claimed}()): an operation "
                              f"runs once; create a new one")

    def _run_once(self) -> MigrationResult:
        self._thread = threading.current_thread()
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
            self._end()

    def _end(self) -> None:
        """Everything is torn down and the outcome settled: the operation is over."""
        self.latch.close()
        if self.tracker is not None:
            self.tracker.stop()
        self._over.set()

    def _abandon(self) -> None:
        """For a subclass's constructor that fails after this one ran: the object is
        never returned, so nobody can close() it; release what it holds now (the
        latch's pipe, whatever set-up already deferred)."""
        self._teardown()
        self._end()

    def _fail(self) -> BaseException:
        """Recover, tear down, settle the state; return the error to report."""
        first = self.latch.error
        assert first is not None
        error = self._on_failure(first)  # the source resumes its guest before anything slow
        self._teardown()
        error = self._reported_error(first, error)
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
        """Run in the background; use :meth:`wait` for the result.  ConfigError if
        the operation was already started: it runs once."""
        self._claim("start")
        self._runner = WorkerPool("thread", 1, name=f"mfd-{self.role}")
        self._run_future = self._runner.submit(self._run_once)

    def wait(self, timeout: float | None = None) -> MigrationResult:
        """Wait for an operation started with :meth:`start`.  Raises its error, or
        :class:`~engine.errors.WaitTimeout` (a MigrationError and a TimeoutError)
        if it is still running after `timeout` seconds."""
        if self._run_future is None or self._runner is None:
            if self._claimed_by == "cancel":
                self.latch.raise_if_failed()  # cancelled before it started: that is its outcome
            if self._claimed_by == "run":
                raise ConfigError(f"this {self.role} runs in the thread that called run(): wait() is "
                                  f"for one started with start()")
            raise ConfigError(f"start() the {self.role} first")
        try:
            return self._run_future.result(timeout)
        except TimeoutError:  # concurrent.futures' is the builtin since 3.11
            raise WaitTimeout(f"the {self.role} is still running ({self.state}) after {timeout} s") from None
        finally:
            if self._run_future.done():
                self._runner.shutdown()

    def done(self) -> bool:
        """True once the operation is over, torn down, however it was run (or
        cancelled before it started): its result or error is there to take."""
        return self._over.is_set()

    def cancel(self, reason: str | None = None) -> bool:
        """Cancel at any phase before the commit point; run() then raises CancelledError.

        Returns False, and changes nothing, once the migration committed (the
        destination owns the VM: there is nothing left to cancel), once a snapshot
        is past its point of no return (published; the restored guest starting),
        or once the operation finished.  A cancel before run() or start() tears
        down at once what the operation holds (a destination's listening socket).
        """
        with self._commit_lock:
            if self._committed or self._past_return or self.state.finished:
                log.info("%s: cancel refused, the %s has %s", self.role, self.noun,
                         "finished" if self.state.finished else
                         "committed" if self._committed else "passed its point of no return")
                return False
            if not self.latch.cancel(reason or f"{self.noun} cancelled"):
                return False
        with self._claim_lock:
            unstarted, self._claimed_by = self._claimed_by is None, self._claimed_by or "cancel"
        if unstarted:  # nothing runs that would tear it down
            self._machine.fire(MigrationEvent.CANCEL)
            self._teardown()
            self._machine.fire(MigrationEvent.TORN_DOWN)
            self._end()
        return True

    def _pass_point_of_no_return(self) -> None:
        """A snapshot's step after which it completes whatever happens (the file is
        published; the restored guest is started): a cancel or failure that came
        first is raised here; one after it is refused (:meth:`cancel` says False)."""
        with self._commit_lock:
            self.latch.raise_if_failed()
            self._past_return = True

    @property
    def committed(self) -> bool:
        """True once a migration's commit point passed: the destination owns the VM
        (an operation without a peer never commits).  A source whose COMMIT the
        destination answered with ABORT (it was cancelled or failed before reading
        it: it never runs the guest) is not committed: False again, guest resumed."""
        return self._committed

    def stats(self) -> MigrationStats:
        """Where the operation is (its :attr:`state`) and its figures so far: all
        zero until set-up has made its counters (a destination still listening)."""
        if self.tracker is None:
            ram_bytes = self.ram.size if self.ram is not None else 0
            return MigrationStats(
                state=self.state, round=0, elapsed_s=0.0, ram_bytes=ram_bytes, bytes_on_wire=0,
                pages_sent=0, zero_pages=0, guest_bytes_sent=0, throughput_bytes_per_s=0.0,
                dirty_rate_bytes_per_s=0.0, remaining_bytes=0, expected_downtime_ms=0.0)
        return self.tracker.snapshot(self.state)

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

    def _reported_error(self, first: BaseException, error: BaseException) -> BaseException:
        """After teardown: the error to report, given the `first` one and what
        :meth:`_on_failure` made of it (a migration may prefer its peer's reason)."""
        return error

    @property
    def _peer_reason(self) -> MigrationError | None:
        """The peer's own error (its ABORT), if the operation has a peer and it sent one."""
        return None

    def _start_channels(
        self, target: Callable[..., Any], conns: Sequence[Connection | None], spec: ChannelSpec
    ) -> None:
        """Run one channel process per connection (None: a file channel, no socket)
        on the process pool: the VMM's shared one, or one of our own; returns once
        every channel is serving (READY)."""
        cfg = self.config
        shared = self._shared_pool
        # Counting a shared pool's free workers and taking them is one step: two
        # operations starting at once must not both count the same ones.
        with _SHARED_POOL_LOCK if shared is not None else contextlib.nullcontext():
            if shared is not None and self._own_pool_if_short and _free_workers(shared) < len(conns):
                shared = None  # too few free warm workers: this operation starts its own
            if shared is not None:
                self._submit_channels(self._check_shared_pool(shared, len(conns)), target, conns, spec)
        if shared is None:  # (its processes start outside the lock)
            pool = channel_pool(len(conns), f"mfd-{self.role}", cfg.start_method, cfg.cancel_grace_s)
            self._submit_channels(pool, target, conns, spec)
        self._wait_channels_ready(cfg.handshake_timeout_s * 3)

    def _submit_channels(self, pool: WorkerPool, target: Callable[..., Any],
                         conns: Sequence[Connection | None], spec: ChannelSpec) -> None:
        """`pool` becomes the operation's (stopped at teardown); one channel job per
        connection on it, each with its link."""
        self._pool = pool
        self._defer("stop the channels", self._stop_channels)
        for channel_id, conn in enumerate(conns):
            main_end, channel_end = control_pair()
            data = () if conn is None else (conn.sock,)
            job: tuple[Callable[..., Any], ...] = (target,)
            if self._pool is self._shared_pool:
                job = (run_contained, target)  # our failure must not break the VMM's pool
            try:
                future = self._pool.submit(
                    *job, replace(spec, channel_id=channel_id), channel_end, *data,
                    token=self._pool.token,
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
            # A channel that dies after its last word must not break the pool: that
            # would cancel siblings still at work, and fail a complete migration.
            self._pool.spare(future, functools.partial(self._spared, link))
            self._links.append(link)
            future.add_done_callback(functools.partial(self._channel_done, link))

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
        if pool.broken is not None:
            raise ConfigError(f"the pool was broken by an earlier failure ({pool.broken}); "
                              f"shut it down and create a new one")
        free = _free_workers(pool)
        if free < channels:
            raise ConfigError(f"the pool has {free} free workers of {pool.max_workers}; "
                              f"{channels} channels need one each")
        return pool

    def _release_shared_pool(self, pool: WorkerPool, failed: bool) -> None:
        """Our channel jobs end (they were told to stop, or finished); one that
        does not within cancel_grace breaks the pool, which stops it."""
        _, stuck = futures_wait([link.future for link in self._links], self.config.cancel_grace_s)
        if stuck:
            pool.cancel(PoolError(f"{len(stuck)} channel(s) of a {'failed ' if failed else ''}"
                                  f"{self.role} did not stop within {self.config.cancel_grace_s} s"))

    def _pool_broken_by(self) -> BaseException | None:
        return self._pool.broken if self._pool is not None else None

    def _channel_done(self, link: ChannelLink, future: Future) -> None:
        """A channel job ended.  Its failure fails the migration, unless the channel
        had already said its last word (END): then its work is done, and the
        failure is only reported (the pool spared it: its siblings go on)."""
        error = channel_error(future)
        if error is None or self.latch.failed:
            return  # a failed migration's channels end how teardown makes them end
        if self._said_last_word(link):
            log.warning("%s: channel %d failed after its last packet: %s", self.role, link.channel_id, error)
            self.late_channel_failures.append(f"channel {link.channel_id}: {error}")
            return
        self.latch.fail(root_cause(error, self._pool_broken_by()))

    def _spared(self, link: ChannelLink) -> bool:
        """Whether the channel's failure may leave the pool unbroken (the pool asks,
        on its thread): its work is done, in a migration that has not failed (a
        failed one's teardown stops every channel, and may free the slot table)."""
        return not self.latch.failed and self._said_last_word(link)

    def _said_last_word(self, link: ChannelLink) -> bool:
        """Whether the channel's work is done: main read its last word, or the
        channel counted it (in the slot table, before it says it)."""
        slots = self._slots
        return link.finished or (slots is not None
                                 and bool(slots.counters[link.channel_id, Counter.LAST_WORD]))

    def _wait_channels_ready(self, timeout: float) -> None:
        """Wait until every channel process attached its memory and is serving.
        Raises PoolError if they do not within `timeout` seconds."""
        waiting = {link.ctrl.fileno(): link for link in self._links}
        deadline = time.monotonic() + timeout
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PoolError(  # they are pool workers that did not start
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

    def _mark(self, step: str) -> None:
        """Set-up step `step` ends now (the result's ``setup_steps_ms``)."""
        self._setup_marks.append((step, time.perf_counter()))

    def _setup_figures(self, t_start: float, reports: list[ChannelReport]) -> dict[str, Any]:
        """The result's set-up breakdown: each marked step's ms, the channels' own
        mapping of guest RAM (slowest channel), each channel's start-up steps (ms
        from the request), the request's perf_counter reading (to lay two
        processes' figures on one timeline), and request → first packet on the
        wire or file (the earliest channel; clocks are CLOCK_MONOTONIC, shared)."""
        steps, before = {}, t_start
        for step, at in self._setup_marks:
            steps[step] = round((at - before) * 1000, 3)
            before = at
        figures: dict[str, Any] = {"setup_steps_ms": steps, "setup_started_at": t_start}
        if reports:
            figures["channel_attach_ms"] = round(max(r.attach_ms for r in reports), 3)
            figures["channel_steps_ms"] = [
                {step: round((at - t_start) * 1000, 3) for step, at in r.marks} for r in reports]
        firsts = [r.first_packet_at for r in reports if r.first_packet_at is not None]
        if firsts:
            figures["first_packet_ms"] = round((min(firsts) - t_start) * 1000, 3)
        return figures

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
        reports = self._channel_reports()
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
            channel_memory_kib=[report.memory for report in reports],
            extra={**device_extra(self.device_reports), **self._setup_figures(t_start, reports),
                   **(extra or {}), **self._result_extra()},
            **fields,
        )

    def _traffic(self, transfer_s: float) -> dict[str, Any]:
        """The result's fields about what moved in `transfer_s` seconds."""
        assert self.tracker is not None
        return self.tracker.traffic(transfer_s)

    def _result_extra(self) -> dict[str, Any]:
        """What every result of this kind of operation adds to ``extra``, last."""
        return {}

    def _late_failures(self) -> dict[str, list[str]]:
        """The result's report of channels that failed after their last word.  Read
        from the jobs themselves too: a death the pool noticed a moment ago may not
        have reached its callback yet (call after :meth:`_channel_reports`)."""
        failures = list(self.late_channel_failures)
        for link in self._links:
            error = channel_error(link.future) if link.future.done() else None
            text = f"channel {link.channel_id}: {error}"
            if error is not None and text not in failures:
                failures.append(text)
        return {"late_channel_failures": failures} if failures else {}

    def _channel_reports(self) -> list[ChannelReport]:
        """The reports of the channels that ended normally (waits 2 s at most)."""
        # A channel posts its last message just before it returns; one that died
        # after it (a late failure, already reported) has no report to give.
        futures = [link.future for link in self._links]
        done, _ = futures_wait(futures, timeout=2.0)
        return [future.result() for future in futures
                if future in done and future.exception() is None
                and isinstance(future.result(), ChannelReport)]

    def _teardown(self) -> None:
        """Release everything this operation created, in reverse order of set-up.
        Idempotent, never raises (each step runs even if an earlier one failed)."""
        self._exits.close()

    def _defer(self, what: str, action: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """Push a teardown step (`what` names it in a log line if it fails)."""
        self._exits.callback(self._step, what, action, *args, **kwargs)

    @property
    def _aborting(self) -> bool:
        """Tearing down a migration that failed before its commit point (a snapshot:
        before its point of no return)."""
        return self.latch.failed and not self._committed and not self._past_return

    def _lease_dirty_marks(self) -> None:
        """Hold the RAM's dirty marks until teardown: nothing else of this process
        takes (or rewrites) them meanwhile (GuestRAM.lease_dirty)."""
        assert self.ram is not None
        self._defer("release the RAM's dirty marks", self.ram.lease_dirty(f"{self.role} {self.migration_id}"))

    def _own_slots(self, slots: SlotTable) -> SlotTable:
        """The slot table: freed at teardown, after the channels and device jobs
        that write it have stopped (they are set up later, so torn down first)."""
        self._slots = slots
        self._defer("unlink the slot table", self._free_slots)
        if self.tracker is not None:
            self.tracker.slots = slots
            self._defer("keep final counters", self.tracker.freeze)
        return slots

    def _hashing_ns(self) -> list[int]:
        """Each channel's time hashing pieces for tracked verification so far (ns):
        a mark to measure a stretch of the migration against."""
        return [] if self._slots is None else self._slots.counters[:, Counter.HASH_NS].tolist()

    def _hashing_since(self, mark: list[int]) -> float:
        """Seconds the busiest channel spent hashing pieces since `mark`."""
        return busiest_since(mark, self._hashing_ns())

    def _free_slots(self) -> None:
        if self.tracker is not None:
            self.tracker.slots = None
        if self._slots is not None:
            slots, self._slots = self._slots, None
            slots.close()
            slots.unlink()

    def _stop_channels(self) -> None:
        """Teardown of the channel processes: stop every channel, release or shut
        down the pool, close the links."""
        if self._aborting:
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


# Held while an operation counts a shared pool's free workers and submits its channels.
_SHARED_POOL_LOCK = threading.Lock()


def _free_workers(pool: WorkerPool) -> int:
    """Workers of `pool` neither busy nor claimed by a queued job."""
    stats = pool.statistics()
    return stats.max_workers - stats.busy - stats.pending


def busiest_since(mark: Sequence[int], now: Sequence[int]) -> float:
    """Seconds (from per-channel ns counters) the busiest channel spent between
    `mark` and `now`: channels work at once, so the busiest one's time is what a
    wait on all of them took, not the sum."""
    return max((b - a for a, b in zip(mark, now)), default=0) / 1e9


def check_ram(ram: object, optional: bool = False) -> None:
    """ConfigError unless `ram` is a GuestRAM (or None, where `optional`)."""
    check_argument("ram", ram, isinstance(ram, GuestRAM) or (optional and ram is None),
                   "a GuestRAM" + (" or None" if optional else ""))
