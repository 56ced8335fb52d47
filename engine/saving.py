"""What every side that saves a running guest shares: live migration's source
(engine/source.py) and the snapshot save (engine/snapshot.py).

Both own the guest's RAM and devices and its pause/resume callbacks, run the
RAM client's precopy rounds through the multifd core until what is left fits
the downtime limit, save the devices at once on a thread pool, and — should
anything fail after the pause — resume the guest, so it keeps running.  They
differ in where the bytes go (sockets to a destination, or a file) and in how
the end is confirmed (the destination's RESUMED, or a durable file).

Two VMM hooks shape the rounds: a *dirty source* (engine/dirty.py) says which
pages each round sends (default: each block's DirtyMap), and ``throttle_guest``
carries auto-converge (``MigrationConfig.auto_converge``, engine/converge.py)::

    round k ends: next round's pages > trigger % of this round's  ──► not shrinking
                  (policy "rate": or the measured dirty rate says it cannot shrink)
                  → throttle_guest(p): "step" initial, then +step each such round;
                    "rate" the p that reaches the downtime limit in throttle_rounds
    pause (or failure before it): throttle_guest(0)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from engine.config import MigrationConfig, check_hooks
from engine.converge import AutoConverge, DirtyRateMeter
from engine.device import DeviceSaving, MigratableDevice, call_device, checked_devices, is_iterative
from engine.dirty import BlockDirtyMaps, DirtySource, VmmDirtySource
from engine.errors import (
    ConfigError,
    ConvergenceError,
    GuestControlError,
    LocalProtocolError,
    OutcomeUnknownError,
)
from engine.multifd import MultifdSender
from engine.operation import Operation, check_ram
from engine.payload import PrecopyClient, payload_entry
from engine.pool import WorkerPool
from engine.shm import PAGE_SIZE, GuestRAM
from engine.stats import StatsTracker
from engine.sync import MigrationEvent
from engine.verify import check_dump_dir
from engine.wire import packet

log = logging.getLogger("multifd.saving")

RAM_CLIENT = 0  # the RAM client's slot; device save job i uses client RAM_CLIENT + 1 + i
_PROGRESS_EVERY_S = 0.1


class SavingOperation(Operation):
    """An operation whose guest runs here: RAM rounds, device saves, pause and resume.

    The source of a migration is one (``SourceMigration(SavingOperation,
    Migration)``: the peer comes from :class:`~engine.migration.Migration`), a
    snapshot save another (no peer).  Keyword arguments it does not know (the
    source's ``secret``) go on to the next class of the operation.

    `pause_guest` stops the guest's vCPUs (returns once no more writes happen);
    `resume_guest` restarts them and is called if anything fails after the
    pause: a failed migration or save leaves the guest running.
    `dirty_source` (engine/dirty.py; None: each block's DirtyMap) gives each
    round's pages; `throttle_guest(percent)` slows the guest down for
    auto-converge (percent 0: full speed again).  Both are public attributes a
    VMM may also set after construction, before :meth:`run`.
    """

    ram: GuestRAM  # the guest's, given: never None here
    config: MigrationConfig

    def __init__(
        self,
        ram: GuestRAM,
        config: MigrationConfig,
        *,
        pause_guest: Callable[[], None] | None = None,
        resume_guest: Callable[[], None] | None = None,
        dump_dir: str | None = None,
        devices: Sequence[MigratableDevice] = (),
        pool: WorkerPool | None = None,
        dirty_source: DirtySource | None = None,
        throttle_guest: Callable[[int], None] | None = None,
        **more: Any,
    ) -> None:
        check_ram(ram)
        devices = checked_devices(devices)
        check_dump_dir(dump_dir)
        check_hooks(pause_guest=pause_guest, resume_guest=resume_guest, throttle_guest=throttle_guest)
        super().__init__(config, pool=pool, **more)
        self.ram = ram
        self.dirty_source = dirty_source
        self.throttle_guest = throttle_guest
        self.throttle_pct = 0            # the guest's throttle now (auto-converge)
        self.throttle_at_switchover = 0  # ... when it was paused
        self.throttle_steps: list[tuple[int, int]] = []  # (round, percent) each time it rose
        # max_rounds ran out above the downtime limit, and on_max_rounds said switch over
        self.forced_switchover = False
        self.devices = devices
        self.dump_dir = dump_dir
        self.tracker = StatsTracker(ram.size, PAGE_SIZE, started=False)  # started by the run
        self._pause_guest = pause_guest
        self._resume_guest = resume_guest
        self._paused = False
        self._core: MultifdSender | None = None
        self._saver: DeviceSaving | None = None
        self._last_progress = 0.0
        self._converge: AutoConverge | None = None

    @property
    def core(self) -> MultifdSender:
        """The multifd core (exists once setup has started the channels)."""
        if self._core is None:
            raise LocalProtocolError("the multifd core is used before setup")
        return self._core

    def _setup(self) -> None:
        raise NotImplementedError

    def _sends_pages(self) -> bool:
        """Whether guest RAM travels as pages (a same-host migration hands it over)."""
        return True

    def _until_switchover(self, live: bool = True) -> tuple[float, float, PrecopyClient | None, float]:
        """Set up, then precopy rounds until converged (none if not `live`).
        When no page is sent (the RAM is shared), the rounds carry the iterative
        devices' live state only, and run only if there is such a device.

        Returns the start and setup-done times (perf_counter), the RAM client
        for the final round (None when no page is sent), and the expected
        downtime (s) at switchover.
        """
        if live and self.config.auto_converge and self.throttle_guest is None:
            raise ConfigError("auto_converge needs a throttle_guest callback from the VMM")
        if self._sends_pages():  # (local mode hands the RAM over: it takes no marks)
            self._lease_dirty_marks()
        self._machine.fire(MigrationEvent.START)
        t_start = time.perf_counter()
        assert self.tracker is not None
        self.tracker.started = t_start  # the figures' clock: from the run, not the constructor
        for device in self.devices:
            if is_iterative(device):
                call_device(device, "live_begin", device.live_begin)  # every byte is initial state again
        self._setup()
        t_setup = time.perf_counter()
        self._machine.fire(MigrationEvent.SETUP_DONE)
        if not self._sends_pages():
            # No RAM round, no dirty map: the RAM is shared.  Iterative devices
            # still hand out their state while the guest runs.
            iterative = any(map(is_iterative, self.devices))
            expected_s = self._precopy(None) if live and iterative else 0.0
            self._machine.fire(MigrationEvent.SWITCHOVER)
            return t_start, t_setup, None, expected_s
        make_client = payload_entry(packet.PacketKind.RAM_PAGES).client
        assert make_client is not None
        dirty_source: DirtySource | None = None if self.dirty_source is None else \
            VmmDirtySource(self.dirty_source)
        on_packet: Callable[[], None] = self._progress
        if live and self.config.auto_converge:
            meter = None
            if self.config.throttle_policy == "rate":
                meter = DirtyRateMeter(dirty_source or BlockDirtyMaps(), self.ram.blocks,
                                       self.config.dirty_sample_ms / 1000)
                dirty_source, on_packet = meter, self._progress_and_poll
            self._converge = AutoConverge(self.config, meter)
        client: PrecopyClient = make_client(
            self.ram, self.core, RAM_CLIENT, self._packet_pages(), on_packet,
            dirty_source=dirty_source, piece_pages=self._piece_pages(),
        )
        expected_s = self._precopy(client) if live else 0.0
        self._machine.fire(MigrationEvent.SWITCHOVER)
        return t_start, t_setup, client, expected_s

    def _piece_pages(self) -> int:
        """Pages the RAM client keeps together in a round (tracked verification's
        pieces, engine/verify.py); 1: no constraint."""
        return 1

    def _packet_pages(self) -> int:
        """Pages per RAM packet: as configured, but under a bandwidth cap at most
        ~20 ms of the cap, since the limiter lets whole packets through."""
        cap = self.config.max_bandwidth
        if cap is None:
            return self.config.packet_pages
        return max(1, min(self.config.packet_pages, int(cap * 0.02) // PAGE_SIZE))

    def _start_device_pool(self, more_jobs: int = 0) -> None:
        """Threads for the device saves (one per device), and `more_jobs` others."""
        if self.devices or more_jobs:
            self._open_device_pool(self.devices, len(self.devices) + more_jobs)

    def _pause(self) -> float:
        """Pause the guest; returns when (perf_counter) it was paused.

        A pause_guest that raises is a GuestControlError; the failure path then
        resumes the guest (it may be half paused), so it runs on either way.
        """
        self._paused = True  # from here on, a failure resumes the guest
        if self._converge is not None:
            self._converge.stop()  # no more dirty-rate peeks: they would be downtime
        if self._pause_guest is not None:
            try:
                self._pause_guest()
            except Exception as exc:
                raise _PauseFailed(f"pause_guest raised {type(exc).__name__}: {exc}") from exc
        t_paused = time.perf_counter()
        self.throttle_at_switchover = self.throttle_pct
        self._set_throttle(0)  # whoever runs the guest next runs it at full speed
        return t_paused

    def _set_throttle(self, percent: int) -> None:
        """Ask the VMM for `percent` throttle.  GuestControlError if it raises."""
        if self.throttle_guest is None or percent == self.throttle_pct:
            return
        try:
            self.throttle_guest(percent)
        except Exception as exc:
            raise GuestControlError(f"throttle_guest({percent}) raised {type(exc).__name__}: "
                                    f"{exc}") from exc
        self.throttle_pct = percent
        if self._converge is not None:
            self._converge.throttled(percent)

    def _auto_converge(self, taken: int, pending: int) -> None:
        """A round took `taken` dirty pages to send and left `pending` for the next:
        if that is not shrinking (enough), throttle the guest (engine/converge.py)."""
        if self._converge is None:
            return
        assert self.tracker is not None
        wanted = self._converge.after_round(taken, pending, self.tracker.bandwidth)
        if wanted is None:
            return
        log.info("round %d: %d of %d pages dirty again, throttling the guest to %d %%",
                 self.tracker.round, pending, taken, wanted)
        self._set_throttle(wanted)
        self.throttle_steps.append((self.tracker.round, wanted))

    def _result_extra(self) -> dict[str, Any]:
        return {**super()._result_extra(), **self._throttle_extra(), **self._convergence_extra()}

    def _convergence_extra(self) -> dict[str, Any]:
        """A switchover forced by max_rounds: the limit it was not going to meet."""
        if not self.forced_switchover:
            return {}
        return {"switchover_forced": {"after_rounds": self.config.max_rounds,
                                      "downtime_limit_ms": self.config.downtime_limit_ms}}

    def _throttle_extra(self) -> dict[str, Any]:
        """The result's auto-converge section (``guest_dirty_pages_per_s``: the
        guest's dirty rate per second of running time, the fastest measured)."""
        if self.throttle_guest is None and not self.config.auto_converge:
            return {}
        rate = self._converge.rate if self._converge is not None else None
        return {"throttle_pct": self.throttle_at_switchover,
                "throttle_steps": [list(step) for step in self.throttle_steps],
                "throttle_policy": self.config.throttle_policy,
                "guest_dirty_pages_per_s": None if rate is None else round(rate)}

    def _precopy(self, client: PrecopyClient | None) -> float:
        """Rounds until converged.  Returns the expected downtime (s) at switchover.

        `client` None: no page is sent (the RAM is shared); each round is the
        iterative devices' live chunks only, converging on their pending bytes
        and load time."""
        assert self.tracker is not None
        cfg, tracker = self.config, self.tracker
        limit_s = cfg.downtime_limit_ms / 1000
        t_precopy = time.perf_counter()
        wire_at_start = tracker.totals()["wire_bytes"]
        taken = 0
        while True:
            tracker.round += 1
            t_round = time.perf_counter()
            self._live_start()
            if client is not None:
                # Round 1 sends every page; a later one what the last left dirty.
                tracker.round_started(tracker.ram_bytes // PAGE_SIZE if tracker.round == 1
                                      else tracker.remaining_pages)
                taken = client.queue_all() if tracker.round == 1 else client.queue_dirty()
                client.flush()
            self._live_wait()  # the devices' live chunks go before the round's SYNC
            self.core.sync()
            tracker.device_pending_bytes, tracker.device_load_s = self._live_report(
                wait_loaded=client is None)
            now = time.perf_counter()
            sent = tracker.totals()["wire_bytes"] - wire_at_start
            tracker.bandwidth = sent / max(now - t_precopy, 1e-9)
            pending = client.pending_pages() if client is not None else 0
            tracker.round_done(pending)
            tracker.dirty_rate = pending * PAGE_SIZE / max(now - t_round, 1e-9)
            expected = tracker.expected_downtime_s()
            if self._converge is not None:
                self._converge.measure(pending)
            self._progress(force=True)
            log.debug("round %d: %d pages sent, %d dirty, expected downtime %.1f ms",
                      tracker.round, taken, pending, expected * 1000)
            if expected <= limit_s:
                self._await_commit_cost()  # a peer's round trips count: known before deciding
                expected = tracker.expected_downtime_s()
            if expected <= limit_s:
                if self._live_ready():  # converged; a device may want its switchover ack first
                    return expected
            else:
                self._auto_converge(taken, pending)
            if tracker.round >= cfg.max_rounds:
                if cfg.on_max_rounds == "fail":
                    raise ConvergenceError(
                        f"not converged after {tracker.round} rounds: {pending * PAGE_SIZE} bytes "
                        f"dirty, {tracker.device_pending_bytes} of device state pending, "
                        f"expected downtime {expected * 1000:.0f} ms "
                        f"> limit {cfg.downtime_limit_ms:.0f} ms"
                        + (f", guest throttled to {self.throttle_pct} %" if cfg.auto_converge else "")
                    )
                log.info("forcing switchover after %d rounds", tracker.round)
                self.forced_switchover = expected > limit_s  # (else a device's ack was still due)
                self._live_ready(final=True)
                return expected
            self._live_pace()

    # Iterative devices in precopy: the source of a migration
    # overrides these; a snapshot saves every device at switchover.

    def _live_start(self) -> None:
        """Start this round's live device jobs (beside the RAM round)."""

    def _live_wait(self) -> None:
        """Wait for this round's live device jobs (before the round's sync)."""

    def _live_report(self, wait_loaded: bool = False) -> tuple[int, float]:
        """After the round's sync: tell the peer, and return the devices' pending
        bytes and the seconds their loading would add to the downtime.
        `wait_loaded` (no RAM round: the device state is all the round moved):
        first wait for the peer to load what the round handed out."""
        return 0, 0.0

    def _await_commit_cost(self) -> None:
        """Before the switchover decision: what the commit adds to the downtime
        (tracker.commit_s) is known.  A snapshot has no peer: nothing to wait for."""

    def _live_ready(self, final: bool = False) -> bool:
        """May the guest be paused now (the switchover ack, if a device asks)?
        `final`: the last round: wait for the ack (bounded) instead of asking."""
        return True

    def _live_pace(self) -> None:
        """Between rounds: wait for the peer's loading when a device's window is full."""

    def _start_device_saves(self, **where: Any) -> DeviceSaving | None:
        """Every device saves at once, on the device pool, beside the last RAM round.

        Chunks go to the multifd core, or where `where` says (``emit=``: a file).
        """
        if not self.devices:
            return None
        saver = self._device_saver(**where)
        saver.start(self.latch)
        return saver

    def _progress_and_poll(self) -> None:
        """After each packet: progress, and the dirty-rate meter's peek when due."""
        self._progress()
        if self._converge is not None and self._converge.meter is not None:
            self._converge.meter.poll()

    def _device_saver(self, **where: Any) -> DeviceSaving:
        """The device-state client's saver (one per operation: iterative devices'
        live rounds and the switchover's saves number one stream per device)."""
        if self._saver is None:
            make_saver = payload_entry(packet.PacketKind.DEVICE_STATE).client
            assert make_saver is not None and self._device_pool is not None
            core = self._core if "emit" not in where else None
            self._saver = make_saver(self.devices, core, RAM_CLIENT + 1, self._device_pool, **where)
        return self._saver

    def _progress(self, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self._last_progress >= _PROGRESS_EVERY_S:
            self._last_progress = now
            if self.tracker is not None:
                self.tracker.snapshot(self.state)  # keeps the throughput window fed


    def _on_failure(self, error: BaseException) -> BaseException:
        """Before the commit point, or when the destination said it did not commit
        (its ABORT): resume the guest, so it runs on.  After the commit point
        without an answer: keep it paused and report OutcomeUnknownError.
        Returns the error to report (GuestControlError if resuming raised)."""
        self._unthrottle_after(error)
        if not self._paused:
            return error
        if self._committed and error is self._peer_reason:
            # The destination's ABORT: it never took COMMIT, and never will; the
            # guest is ours again, and `committed` and the state say so (it ends
            # cancelled or failed as it would have before the commit).
            with self._commit_lock:
                self._committed = False
                self._machine.fire(MigrationEvent.COMMIT_REFUSED)
        if self._committed:
            unknown = OutcomeUnknownError(
                f"COMMIT was sent but the destination's answer never came ({error}); the guest "
                f"stays paused here: ask the destination whether migration {self.migration_id} "
                f"committed, then call settle()")
            unknown.__cause__ = error
            return unknown
        return self._resume_after(error)

    def _unthrottle_after(self, error: BaseException) -> None:
        """After a failure the guest runs on here (or waits, paused): at full speed."""
        try:
            self._set_throttle(0)
        except GuestControlError as failed:
            log.warning("after %s: %s", error, failed)

    def _resume_after(self, error: BaseException) -> BaseException:
        """Resume the paused guest after `error`; a resume that raises is reported.
        After a pause that raised, the error says where the guest is either way."""
        self._paused = False
        if self._resume_guest is None:
            if isinstance(error, _PauseFailed):
                return _where(error, "no resume_guest was given: the guest is as pause_guest left it")
            return error
        try:
            self._resume_guest()
        except Exception as exc:
            failed = GuestControlError(
                f"{error}; then resume_guest raised {type(exc).__name__}: {exc}: the guest is NOT running")
            failed.__cause__ = exc
            failed.__context__ = error
            return failed
        if isinstance(error, _PauseFailed):
            return _where(error, "resume_guest was called: the guest runs on here")
        return error


class _PauseFailed(GuestControlError):
    """pause_guest raised: the guest may be half paused (the failure path resumes it)."""


def _where(error: _PauseFailed, where: str) -> GuestControlError:
    """The GuestControlError to report for a pause that failed: it says where the guest is."""
    told = GuestControlError(f"{error}; {where}")
    told.__cause__ = error.__cause__
    return told
