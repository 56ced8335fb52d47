"""Auto-converge: when precopy rounds stop shrinking, how hard to throttle the guest.

::

    round k   collect (DirtySource.take) ─► peeks at guest-running times s, 2s, 4s, ...
              (DirtyRateMeter.poll, between packets; nothing is cleared)
    its end   pending peek ─► R = the fastest growth between peeks in the linear part
                              (≤ half the pending count), per second the guest ran
                              (÷ the running share); the highest R of all rounds
    policy "rate" (default), with B the bandwidth and D the pending pages:
              trigger   the round left > trigger % of what it sent dirty again, or
                        R·(1 − p) > trigger % of B (the next round cannot shrink enough)
              throttle  rounds shrink by q = min((0.8·B·L / D)^(1/N), trigger %) each,
                        reaching the downtime limit L in N = throttle_rounds rounds:
                        p = ⌈100·(1 − q·B / R)⌉, never below the throttle now, a step more
                        when rounds did not shrink though throttled (R was low), ≤ max
    policy "step" (QEMU's auto-converge; also the fallback while no rate is known):
              trigger   the round left > trigger % of what it sent dirty again
              throttle  initial, then + step, ≤ max

Why measure instead of stepping: a guest whose rounds are all dirty again
(every page of its working set written before the round ends) shows the same
count whatever its rate, so a round's count says nothing about how far to
throttle.  Right after a collect the count still grows with the guest's true
rate; the meter reads it there (a peek: KVM's GET_DIRTY_LOG in manual-protect
mode, a DirtyMap's count), per second the guest *ran* (the throttle holds it
out ``p`` % of the time).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from engine.config import MigrationConfig
from engine.dirty import DirtySource, drop_marks
from engine.shm import PAGE_SIZE, RamBlock

__all__ = ["AutoConverge", "DirtyRateMeter", "choose_throttle"]

log = logging.getLogger("multifd.converge")

#: Aim this far under the downtime limit, so a rate measured a little low still converges.
_HEADROOM = 0.8
#: A throttled guest runs in slices (a KVM vCPU: 10 ms, then held for the rest of
#: its period, QEMU's rule), so a short window sees one whole slice or none: its
#: peek windows are at least this long in running time on average (three slices:
#: off by a third at most), and a round too short for one leaves the rate as it was.
THROTTLED_RUN_S = 0.03


class DirtyRateMeter:
    """A dirty source that also measures the guest's dirty rate (engine/dirty.py's
    interface, passed through to `source`).

    Each :meth:`take` starts a round's clock; :meth:`poll` (called often, from the
    thread that takes) peeks at the count after ``first_peek_s``, 2×, 4×, ...
    of guest running time (``THROTTLED_RUN_S`` at least while the guest is
    throttled); :meth:`end_round` turns the peeks into a rate.
    """

    def __init__(self, source: DirtySource, blocks: Sequence[RamBlock], first_peek_s: float,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self._source = source
        self._blocks = list(blocks)
        self._first_peek_s = first_peek_s
        self._clock = clock
        self.share = 1.0                    # the guest's share of running time (1 − throttle)
        self.active = True                  # False: polls peek nothing (the guest is paused)
        self._collected: float | None = None
        self._next_s = 0.0
        self.samples: list[tuple[float, int]] = []  # (seconds since the collect, pages dirty)

    # -- the dirty-source interface ----------------------------------------

    def take(self, block: RamBlock) -> np.ndarray:
        pages = self._source.take(block)
        self._start_window()
        return pages

    def drop(self, block: RamBlock) -> None:
        """A take whose pages nobody reads (round 1): the source's own ``drop``
        if it has one; the window starts as with a take."""
        drop_marks(self._source, block)
        self._start_window()

    def _start_window(self) -> None:
        self._collected = self._clock()     # the last block's take starts the window
        self._next_s = self._min_running_s() / self.share
        self.samples = []

    def count(self, block: RamBlock) -> int:
        return self._source.count(block)

    def _min_running_s(self) -> float:
        return self._first_peek_s if self.share >= 1 else max(self._first_peek_s, THROTTLED_RUN_S)

    # -- measuring -----------------------------------------------------------

    def poll(self) -> None:
        """Peek at the count if the next peek is due (cheap when it is not)."""
        if not self.active or self._collected is None:
            return
        elapsed = self._clock() - self._collected
        if elapsed < self._next_s:
            return
        pages = sum(self._source.count(block) for block in self._blocks)
        self.samples.append((self._clock() - self._collected, pages))
        self._next_s = 2 * elapsed

    def end_round(self, pending: int) -> float | None:
        """The guest's dirty rate in pages per second of running time, from this
        round's peeks and `pending` (the count at the round's end); None without
        a collect, or when the round was shorter than one peek window.

        The count after a collect is ``min(R·t, working set)`` for a guest that
        sweeps its memory, so only peeks at most half the final count are in the
        linear part.  Of the windows between them (each at least one peek window
        long) the fastest counts: a guest competing with the channels for the
        cores runs only part of the time, but a throttled one runs its slices
        with a core to itself, at that fastest rate.  When even the first window
        is past the linear part (a working set written within it), its rate is
        a lower bound.
        """
        if self._collected is None:
            return None
        shortest = self._min_running_s() / self.share * 0.999  # a peek on time counts
        points = [(0.0, 0)]
        for t, n in [*self.samples, (self._clock() - self._collected, pending)]:
            if t - points[-1][0] >= shortest:
                points.append((t, n))
        if len(points) == 1:
            return None
        windows = [(n1 - n0) / (t1 - t0)
                   for (t0, n0), (t1, n1) in zip(points, points[1:]) if n1 <= pending / 2]
        rate = max(windows) if windows else points[1][1] / points[1][0]
        log.debug("peeks (s, pages) at share %.2f: %s; %.0f pages/s", self.share,
                  [(round(t, 3), n) for t, n in points[1:]], rate)
        return rate / self.share


def choose_throttle(config: MigrationConfig, *, rate: float, bandwidth: float, pending: int,
                    current: int) -> int:
    """The throttle (percent) that makes precopy rounds shrink to the downtime limit
    in ``config.throttle_rounds`` rounds, for a guest dirtying `rate` pages per second
    of running time over `bandwidth` pages/s with `pending` pages to send next:
    at least `current`, at most ``config.throttle_max_pct`` (0 when no throttle is
    needed).  Pure: see the module's diagram for the formula."""
    if rate <= 0 or bandwidth <= 0 or pending <= 0:
        return current
    fits = _HEADROOM * bandwidth * config.downtime_limit_ms / 1000 / pending
    shrink = min(fits ** (1 / config.throttle_rounds), config.throttle_trigger_pct / 100)
    wanted = math.ceil(100 * (1 - shrink * bandwidth / rate) - 1e-9)
    return min(max(wanted, current, 0), config.throttle_max_pct)


class AutoConverge:
    """The throttle decisions of one saving operation (engine/saving.py).

    :meth:`after_round` answers the throttle for the next round, or None to keep
    it; the caller applies it (and says so with :meth:`throttled`).
    """

    def __init__(self, config: MigrationConfig, meter: DirtyRateMeter | None) -> None:
        self.config = config
        self.meter = meter
        self.rate: float | None = None      # pages/s of running time, the fastest measured
        self.current = 0

    def measure(self, pending: int) -> None:
        """A round ended with `pending` pages dirty: update :attr:`rate` (every
        round, the last one too, so the result reports it)."""
        if self.meter is not None:
            rate = self.meter.end_round(pending)
            if rate is not None:  # the fastest seen: what a throttled slice runs at
                self.rate = max(rate, self.rate or 0.0)

    def after_round(self, taken: int, pending: int, bandwidth_bytes: float) -> int | None:
        """A round sent `taken` pages and left `pending` (after :meth:`measure`):
        the new throttle, or None to keep it."""
        cfg = self.config
        stuck = pending * 100 > taken * cfg.throttle_trigger_pct
        bandwidth = bandwidth_bytes / PAGE_SIZE
        running = 1 - self.current / 100
        if cfg.throttle_policy == "rate" and self.rate is not None:
            predicted = self.rate * running * 100 > bandwidth * cfg.throttle_trigger_pct
            if not (stuck or predicted):
                return None
            wanted = choose_throttle(cfg, rate=self.rate, bandwidth=bandwidth, pending=pending,
                                     current=self.current)
            if (stuck and self.current > 0) or wanted == 0:
                wanted = max(wanted, self._step())  # throttled, and still not shrinking
            log.info("guest dirties %.0f pages/s of running time against %.0f pages/s: "
                     "throttle %d %%", self.rate, bandwidth, wanted)
        else:
            if not stuck:
                return None
            wanted = self._step()
        return wanted if wanted != self.current else None

    def _step(self) -> int:
        cfg = self.config
        if self.current == 0:
            return cfg.throttle_initial_pct
        return min(self.current + cfg.throttle_step_pct, cfg.throttle_max_pct)

    def throttled(self, percent: int) -> None:
        """The guest now runs at `percent` throttle."""
        self.current = percent
        if self.meter is not None:
            self.meter.share = 1 - percent / 100

    def stop(self) -> None:
        """The guest is paused: no more peeks (they would be downtime)."""
        if self.meter is not None:
            self.meter.active = False
