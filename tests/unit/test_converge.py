"""Auto-converge's throttle choice (engine/converge.py) from a measured dirty rate.

The meter runs on a real DirtyMap (shared memory) through the default dirty
source; only its clock is the test's, so each peek happens at a known time
after the collect.  The throttle choice is checked by what it must achieve:
rounds that shrink to the downtime limit in ``throttle_rounds`` rounds, and
not with one percent less.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine.config import MigrationConfig
from engine.converge import AutoConverge, DirtyRateMeter, choose_throttle
from engine.dirty import BlockDirtyMaps
from engine.errors import ConfigError
from engine.shm import PAGE_SIZE, GuestRAM, RamBlock

pytestmark = pytest.mark.usefixtures("no_leaks")

PAGES = 1024
CAP = 125e6 / PAGE_SIZE            # 1 Gbit/s in pages/s
RATE = 300_000.0                   # the KVM loop's write-fault rate, pages/s
CONFIG = MigrationConfig(auto_converge=True, downtime_limit_ms=300.0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def block() -> Iterator[RamBlock]:
    with GuestRAM.create({"pc.ram": PAGES * PAGE_SIZE}) as ram:
        yield ram.blocks[0]
        ram.unlink()


def _meter(block: RamBlock, clock: Clock, first_peek_s: float = 0.005) -> DirtyRateMeter:
    return DirtyRateMeter(BlockDirtyMaps(), [block], first_peek_s, clock=clock)


def _sweep(block: RamBlock, clock: Clock, meter: DirtyRateMeter, rate: float, until: float,
           step: float = 0.001, slow_after: float | None = None) -> None:
    """A guest sweeping its pages from the first at `rate` pages/s of running time
    (running ``meter.share`` of the time; a quarter of that after `slow_after` s,
    as when it shares its core), polled every `step` s until `until`."""
    start, done, last = clock.now, 0.0, clock.now
    while clock.now - start < until:
        clock.now += step
        slowed = slow_after is not None and clock.now - start > slow_after
        done += (clock.now - last) * rate * meter.share * (0.25 if slowed else 1.0)
        last = clock.now
        written = min(PAGES, int(done))
        if written:
            block.dirty.mark(0, written)
        meter.poll()


def _rounds_to_limit(config: MigrationConfig, percent: int, rate: float, bandwidth: float,
                     pending: int) -> int:
    """Rounds a guest throttled to `percent` needs before one fits the downtime
    limit, rounds growing back to at most `pending` (its working set)."""
    limit = bandwidth * config.downtime_limit_ms / 1000
    pages, rounds = float(pending), 0
    while pages > limit and rounds < 100:
        pages = min(pending, rate * (1 - percent / 100) * pages / bandwidth)
        rounds += 1
    return rounds


# ------------------------------------------------------------------ the meter

def test_the_rate_comes_from_the_peeks_before_the_working_set_fills(block: RamBlock) -> None:
    clock = Clock()
    meter = _meter(block, clock)
    meter.take(block)                                   # the collect: the window starts
    _sweep(block, clock, meter, rate=20_000, until=0.2)  # all 1024 pages dirty after ~51 ms
    assert [t for t, _ in meter.samples] == pytest.approx([0.005, 0.010, 0.020, 0.040, 0.080, 0.160])
    assert meter.samples[-1][1] == PAGES                # the count saturated ...
    rate = meter.end_round(PAGES)
    assert rate == pytest.approx(20_000, rel=0.05)      # ... but the rate is the true one
    assert PAGES / 0.2 < rate / 3                       # where the round's count says 5 k/s
    assert block.dirty.take().size == PAGES             # the peeks cleared nothing


def test_a_guest_sharing_its_core_is_measured_at_its_unimpeded_rate(block: RamBlock) -> None:
    clock = Clock()
    meter = _meter(block, clock)
    meter.take(block)
    _sweep(block, clock, meter, rate=20_000, until=0.3, slow_after=0.01)
    assert meter.end_round(PAGES) == pytest.approx(20_000, rel=0.05)   # not the 5 k/s after 10 ms


def test_a_throttled_guest_is_measured_per_second_it_ran(block: RamBlock) -> None:
    clock = Clock()
    meter = _meter(block, clock)
    meter.share = 0.25                                  # throttled to 75 %
    meter.take(block)
    _sweep(block, clock, meter, rate=1_000, until=1.0)
    assert meter.samples[0][0] == pytest.approx(0.12)   # THROTTLED_RUN_S of running time
    assert meter.end_round(250) == pytest.approx(1_000, rel=0.05)
    meter.take(block)                                   # a round too short to tell
    _sweep(block, clock, meter, rate=1_000, until=0.1)
    assert meter.samples == [] and meter.end_round(25) is None


def test_a_working_set_filled_before_the_first_peek_gives_a_lower_bound(block: RamBlock) -> None:
    clock = Clock()
    meter = _meter(block, clock)
    meter.take(block)
    _sweep(block, clock, meter, rate=1e6, until=0.05)   # all dirty after ~1 ms
    rate = meter.end_round(PAGES)
    assert rate is not None and PAGES / 0.005 * 0.9 < rate < 1e6
    meter.take(block)
    _sweep(block, clock, meter, rate=0, until=0.05)
    assert meter.end_round(0) == 0.0                    # nothing written: rate 0


def test_no_peek_while_inactive_or_before_a_collect(block: RamBlock) -> None:
    clock = Clock()
    meter = _meter(block, clock)
    block.dirty.mark(0, 10)
    clock.now += 1
    meter.poll()
    assert meter.samples == [] and meter.end_round(10) is None
    assert meter.take(block).size == 10
    meter.active = False
    _sweep(block, clock, meter, rate=20_000, until=0.1)
    assert meter.samples == []


# ------------------------------------------------------------ the throttle

@pytest.mark.parametrize("rounds", [1, 2, 3])
@pytest.mark.parametrize(("rate", "bandwidth", "pending", "limit_ms"), [
    (RATE, CAP, 65_536, 300.0),         # the KVM loop over 256 MiB under 1 Gbit/s
    (RATE, 400_000.0, 65_536, 10.0),    # ... uncapped over 2 channels, a 10 ms limit
    (262_144.0, CAP, 4_096, 20.0),      # the synthetic guest's 1 GiB/s over 16 MiB
])
def test_the_throttle_reaches_the_limit_in_the_configured_rounds(
        rounds: int, rate: float, bandwidth: float, pending: int, limit_ms: float) -> None:
    config = CONFIG.with_(throttle_rounds=rounds, downtime_limit_ms=limit_ms)
    percent = choose_throttle(config, rate=rate, bandwidth=bandwidth, pending=pending, current=0)
    assert 0 < percent <= config.throttle_max_pct
    assert _rounds_to_limit(config, percent, rate, bandwidth, pending) <= rounds
    # and no harder than it takes: 5 % less misses the rounds, or shrinks them by
    # less than the trigger asks
    less = percent - 5
    assert (_rounds_to_limit(config, less, rate, bandwidth, pending) > rounds
            or rate * (1 - less / 100) > bandwidth * config.throttle_trigger_pct / 100)


def test_the_throttle_is_clamped() -> None:
    assert choose_throttle(CONFIG.with_(throttle_max_pct=90), rate=RATE, bandwidth=CAP, pending=65_536,
                           current=0) == 90
    assert choose_throttle(CONFIG, rate=1000, bandwidth=CAP, pending=65_536, current=40) == 40
    assert choose_throttle(CONFIG, rate=1000, bandwidth=CAP, pending=65_536, current=0) == 0
    assert choose_throttle(CONFIG, rate=0, bandwidth=CAP, pending=65_536, current=30) == 30


# ------------------------------------------------- the decision after a round

def test_a_sampled_rate_throttles_before_rounds_stop_shrinking(block: RamBlock) -> None:
    """Round 1 of a capped migration sent every page and left a quarter dirty (no
    trigger by count), but the peeks show a rate the cap cannot follow."""
    clock = Clock()
    meter = _meter(block, clock)
    converge = AutoConverge(CONFIG, meter)
    meter.take(block)
    _sweep(block, clock, meter, rate=RATE / 20, until=0.3)
    bandwidth = CAP / 20                                # 1024 pages in 0.67 s: never all sent
    converge.measure(PAGES)
    percent = converge.after_round(4 * PAGES, PAGES, bandwidth * PAGE_SIZE)
    assert percent is not None and converge.rate == pytest.approx(RATE / 20, rel=0.05)
    assert _rounds_to_limit(CONFIG, percent, RATE / 20, bandwidth, PAGES) <= CONFIG.throttle_rounds
    converge.throttled(percent)
    assert meter.share == pytest.approx(1 - percent / 100)
    step = AutoConverge(CONFIG.with_(throttle_policy="step"), None)
    assert step.after_round(4 * PAGES, PAGES, bandwidth * PAGE_SIZE) is None  # QEMU's: not yet


def test_without_a_rate_or_when_rounds_still_grow_it_steps(block: RamBlock) -> None:
    converge = AutoConverge(CONFIG, None)               # no meter: QEMU's steps
    assert converge.after_round(100, 100, CAP * PAGE_SIZE) == 20
    converge.throttled(20)
    assert converge.after_round(100, 100, CAP * PAGE_SIZE) == 30
    assert converge.after_round(100, 10, CAP * PAGE_SIZE) is None   # shrinking: keep it
    clock = Clock()
    meter = _meter(block, clock)
    low = AutoConverge(CONFIG, meter)
    low.throttled(50)
    meter.take(block)
    _sweep(block, clock, meter, rate=100, until=0.3)    # a rate that says "no throttle needed"
    low.measure(PAGES)
    assert low.after_round(PAGES, PAGES, CAP * PAGE_SIZE) == 60   # ... but the round did not shrink
    converge.throttled(99)
    assert converge.after_round(100, 100, CAP * PAGE_SIZE) is None  # at the maximum


def test_bad_rate_settings_are_config_errors() -> None:
    for bad in ({"throttle_policy": "fast"}, {"throttle_rounds": 0}, {"throttle_rounds": 2.5},
                {"dirty_sample_ms": 0}, {"dirty_sample_ms": float("nan")}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            MigrationConfig(**bad).validate()  # type: ignore[arg-type]


def test_the_rate_kept_is_the_fastest_of_the_rounds(block: RamBlock) -> None:
    clock = Clock()
    meter = _meter(block, clock)
    converge = AutoConverge(CONFIG, meter)
    for rate in (20_000, 5_000):                        # round 2: it shared its core throughout
        meter.take(block)
        _sweep(block, clock, meter, rate=rate, until=0.3)
        converge.measure(PAGES)
    assert converge.rate == pytest.approx(20_000, rel=0.05)
