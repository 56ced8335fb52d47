"""Configuration, statistics and page runs: MigrationConfig (engine/migration.py),
StatsTracker / MigrationResult (engine/stats.py) and pages_to_runs (engine/pages.py)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np
import pytest

from engine.errors import ConfigError
from engine.migration import MigrationConfig
from engine.pages import pages_to_runs
from engine.shm import PAGE_SIZE
from engine.slots import Counter, SlotTable
from engine.stats import MigrationResult, MigrationStats, StatsTracker
from engine.sync import MigrationState
from engine.wire.packet import MAX_CHANNELS, MAX_PACKET_PAGES

# ---------------------------------------------------------------------------
# pages_to_runs


def _reference_runs(pages: list[int]) -> tuple[list[int], list[int]]:
    firsts: list[int] = []
    lengths: list[int] = []
    for page in pages:
        if firsts and page == firsts[-1] + lengths[-1]:
            lengths[-1] += 1
        else:
            firsts.append(page)
            lengths.append(1)
    return firsts, lengths


def _runs(pages: list[int]) -> tuple[list[int], list[int]]:
    firsts, lengths = pages_to_runs(np.array(pages, dtype=np.int64))
    assert firsts.shape == lengths.shape
    return firsts.tolist(), lengths.tolist()


def test_page_runs_empty() -> None:
    firsts, lengths = pages_to_runs(np.empty(0, dtype=np.int64))
    assert firsts.size == 0 and lengths.size == 0
    assert np.issubdtype(firsts.dtype, np.integer) and np.issubdtype(lengths.dtype, np.integer)


def test_page_runs_single() -> None:
    assert _runs([0]) == ([0], [1])
    assert _runs([12345]) == ([12345], [1])


def test_page_runs_contiguous() -> None:
    assert _runs(list(range(5, 105))) == ([5], [100])


def test_page_runs_gaps() -> None:
    assert _runs([0, 1, 2, 4, 6, 7, 100]) == ([0, 4, 6, 100], [3, 1, 2, 1])
    assert _runs([1, 3, 5]) == ([1, 3, 5], [1, 1, 1])
    assert _runs([0, 2, 3]) == ([0, 2], [1, 2])


def test_page_runs_of_take_output() -> None:
    """The dtype DirtyMap.take() returns (np.flatnonzero: intp) works as is."""
    dirty = np.zeros(64, dtype=np.uint8)
    dirty[[3, 4, 5, 9, 63]] = 1
    firsts, lengths = pages_to_runs(np.flatnonzero(dirty))
    assert firsts.tolist() == [3, 9, 63]
    assert lengths.tolist() == [3, 1, 1]


@pytest.mark.parametrize("dtype", [np.int64, np.uint32, np.uint64])
def test_page_runs_unsigned_and_signed_dtypes(dtype: type) -> None:
    firsts, lengths = pages_to_runs(np.array([2, 3, 7, 8, 9], dtype=dtype))
    assert firsts.tolist() == [2, 7]
    assert lengths.tolist() == [2, 3]


@pytest.mark.parametrize("seed", range(8))
def test_page_runs_random_sets_match_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_pages = int(rng.integers(1, 50_000))
    density = float(rng.uniform(0.01, 0.99))
    pages = np.flatnonzero(rng.random(n_pages) < density)
    firsts, lengths = pages_to_runs(pages)
    assert (firsts.tolist(), lengths.tolist()) == _reference_runs(pages.tolist())
    assert int(lengths.sum()) == pages.size
    assert (lengths >= 1).all()
    # runs are maximal: the next run never starts right after the previous one ends
    assert (firsts[1:] > firsts[:-1] + lengths[:-1]).all()


# ---------------------------------------------------------------------------
# MigrationConfig


def test_default_config_validates() -> None:
    config = MigrationConfig()
    assert config.validate() is config


def test_limits_are_accepted() -> None:
    for changes in (
        {"channels": 1}, {"channels": MAX_CHANNELS}, {"packet_pages": 1},
        {"packet_pages": MAX_PACKET_PAGES}, {"downtime_limit_ms": 0.0}, {"max_rounds": 1},
        {"on_max_rounds": "fail"}, {"start_method": "fork"}, {"start_method": "forkserver"},
    ):
        MigrationConfig(**changes).validate()  # type: ignore[arg-type]


def test_protocol_limits() -> None:
    assert MAX_CHANNELS == 256
    assert MAX_PACKET_PAGES == 4096


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("channels", 0, "channels"),
        ("channels", 257, "channels"),
        ("channels", -1, "channels"),
        ("packet_pages", 0, "packet_pages"),
        ("packet_pages", 4097, "packet_pages"),
        ("downtime_limit_ms", -0.001, "downtime_limit_ms"),
        ("max_rounds", 0, "max_rounds"),
        ("max_rounds", -5, "max_rounds"),
        ("on_max_rounds", "abort", "on_max_rounds"),
        ("on_max_rounds", "", "on_max_rounds"),
        # the message says "start method": accept either spelling of the field's name
        ("start_method", "threads", "start.method"),
        ("start_method", "", "start.method"),
    ],
)
def test_invalid_field_raises_config_error_naming_it(field: str, value: object, named: str) -> None:
    config = MigrationConfig(**{field: value})
    with pytest.raises(ConfigError, match=named):
        config.validate()
    with pytest.raises(ConfigError, match=named):
        MigrationConfig().with_(**{field: value})


def test_with_returns_a_validated_copy() -> None:
    base = MigrationConfig()
    changed = base.with_(channels=8, compression="zstd", verify=True)
    assert changed is not base
    assert (changed.channels, changed.compression, changed.verify) == (8, "zstd", True)
    assert (base.channels, base.compression, base.verify) == (2, "none", False)
    assert dataclasses.replace(changed, channels=2, compression="none", verify=False) == base


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        MigrationConfig().channels = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------
# StatsTracker with a real slot table


@pytest.fixture
def table(no_leaks: None) -> Iterator[SlotTable]:
    owned = SlotTable.create(n_slots=4, max_items=2, payload_capacity=64, n_channels=2)
    yield owned
    owned.close()
    owned.unlink()


def test_totals_without_a_table_are_zero_plus_main_bytes() -> None:
    tracker = StatsTracker(ram_bytes=10 * PAGE_SIZE, page_size=PAGE_SIZE)
    totals = tracker.totals()
    assert set(totals) == {c.name.lower() for c in Counter}
    assert all(value == 0 for value in totals.values())
    tracker.main_bytes = 77
    assert tracker.totals()["wire_bytes"] == 77


def test_counters_in_the_table_show_up_in_totals_and_snapshot(table: SlotTable) -> None:
    tracker = StatsTracker(ram_bytes=100 * PAGE_SIZE, page_size=PAGE_SIZE)
    tracker.slots = table
    table.counters[0, Counter.WIRE_BYTES] = 1_000
    table.counters[1, Counter.WIRE_BYTES] = 2_000
    table.counters[0, Counter.PACKETS] = 3
    table.counters[1, Counter.NORMAL_PAGES] = 40
    table.counters[0, Counter.ZERO_PAGES] = 5
    table.counters[1, Counter.GUEST_BYTES] = 45 * PAGE_SIZE
    table.counters[0, Counter.PAYLOAD_BYTES] = 900
    table.counters[1, Counter.SYNCS] = 2
    table.counters[0, Counter.DEVICE_BYTES] = 11
    tracker.main_bytes = 500
    assert tracker.totals() == {
        "wire_bytes": 3_500,  # channels + main channel
        "packets": 3,
        "normal_pages": 40,
        "zero_pages": 5,
        "guest_bytes": 45 * PAGE_SIZE,
        "payload_bytes": 900,
        "syncs": 2,
        "device_bytes": 11,
        "last_word": 0,
        "hash_ns": 0,
    }
    tracker.round, tracker.remaining_pages = 4, 10
    snap = tracker.snapshot(MigrationState.ACTIVE)
    assert isinstance(snap, MigrationStats)
    assert (snap.state, snap.round, snap.ram_bytes) == ("active", 4, 100 * PAGE_SIZE)
    assert snap.bytes_on_wire == 3_500
    assert snap.pages_sent == 40
    assert snap.zero_pages == 5
    assert snap.guest_bytes_sent == 45 * PAGE_SIZE
    assert snap.remaining_bytes == 10 * PAGE_SIZE
    assert snap.elapsed_s >= 0
    assert snap.to_dict()["bytes_on_wire"] == 3_500
    # live: a later write into the table is seen by the next snapshot
    table.counters[1, Counter.NORMAL_PAGES] += 2
    assert tracker.snapshot(MigrationState.ACTIVE).pages_sent == 42


def test_a_stopped_tracker_keeps_its_clock_and_window(table: SlotTable) -> None:
    """Over: elapsed and throughput stay as they ended, however often a VMM polls
    (each poll added a sample that was never pruned)."""
    tracker = StatsTracker(ram_bytes=PAGE_SIZE, page_size=PAGE_SIZE)
    tracker.slots = table
    tracker.snapshot(MigrationState.ACTIVE)
    table.counters[0, Counter.WIRE_BYTES] = 10_000_000  # a rate to keep (0 would stay 0 anyway)
    tracker.stop()
    first = tracker.snapshot(MigrationState.COMPLETED)
    for _ in range(1000):
        last = tracker.snapshot(MigrationState.COMPLETED)
    assert first.throughput_bytes_per_s > 0
    assert (last.elapsed_s, last.throughput_bytes_per_s) == (first.elapsed_s, first.throughput_bytes_per_s)
    assert len(tracker._samples) <= 2


def test_throughput_follows_wire_bytes(table: SlotTable) -> None:
    tracker = StatsTracker(ram_bytes=PAGE_SIZE, page_size=PAGE_SIZE)
    tracker.slots = table
    assert tracker.snapshot(MigrationState.ACTIVE).throughput_bytes_per_s == 0.0  # one sample: no rate yet
    table.counters[0, Counter.WIRE_BYTES] = 10_000_000
    assert tracker.snapshot(MigrationState.ACTIVE).throughput_bytes_per_s > 0


def test_left_in_a_round_is_what_of_its_pages_has_not_gone(table: SlotTable) -> None:
    """During a round the stats count down its pages as channels send them (round 1
    showed "0 B left" throughout); after it, the pages it left dirty."""
    tracker = StatsTracker(ram_bytes=100 * PAGE_SIZE, page_size=PAGE_SIZE)
    tracker.slots = table
    table.counters[0, Counter.GUEST_BYTES] = 10 * PAGE_SIZE  # before the round
    tracker.round_started(100)
    assert tracker.snapshot(MigrationState.ACTIVE).remaining_bytes == 100 * PAGE_SIZE
    table.counters[1, Counter.GUEST_BYTES] = 30 * PAGE_SIZE
    assert tracker.snapshot(MigrationState.ACTIVE).remaining_bytes == 70 * PAGE_SIZE
    table.counters[1, Counter.GUEST_BYTES] = 200 * PAGE_SIZE  # more than queued (pages resent)
    assert tracker.snapshot(MigrationState.ACTIVE).remaining_bytes == 0
    tracker.round_done(7)
    assert tracker.snapshot(MigrationState.ACTIVE).remaining_bytes == 7 * PAGE_SIZE


def test_expected_downtime_is_remaining_bytes_over_bandwidth() -> None:
    tracker = StatsTracker(ram_bytes=1000 * PAGE_SIZE, page_size=PAGE_SIZE)
    tracker.remaining_pages = 250
    assert tracker.expected_downtime_s() == 0.0  # no bandwidth measured yet
    tracker.bandwidth = 100 * PAGE_SIZE  # bytes per second
    assert tracker.expected_downtime_s() == pytest.approx(2.5)
    assert tracker.snapshot(MigrationState.ACTIVE).expected_downtime_ms == pytest.approx(2500.0)
    tracker.bandwidth = -1.0
    assert tracker.expected_downtime_s() == 0.0
    tracker.bandwidth, tracker.remaining_pages = 1.0, 0
    assert tracker.expected_downtime_s() == 0.0
    tracker.commit_s = 0.06  # a peer's commit round trips: there whatever is left
    assert tracker.expected_downtime_s() == pytest.approx(0.06)
    tracker.bandwidth, tracker.remaining_pages = 100 * PAGE_SIZE, 250
    assert tracker.expected_downtime_s() == pytest.approx(2.56)


@pytest.mark.usefixtures("no_leaks")
def test_freeze_keeps_totals_after_the_table_is_gone() -> None:
    owned = SlotTable.create(n_slots=1, max_items=1, payload_capacity=0, n_channels=3)
    tracker = StatsTracker(ram_bytes=PAGE_SIZE, page_size=PAGE_SIZE)
    tracker.slots = owned
    owned.counters[2, Counter.WIRE_BYTES] = 4096
    owned.counters[1, Counter.NORMAL_PAGES] = 1
    tracker.main_bytes = 4
    tracker.freeze()
    owned.close()
    owned.unlink()
    frozen = tracker.totals()
    assert frozen["wire_bytes"] == 4100
    assert frozen["normal_pages"] == 1
    snap = tracker.snapshot(MigrationState.ACTIVE)
    assert (snap.bytes_on_wire, snap.pages_sent) == (4100, 1)
    tracker.slots = None
    assert tracker.totals() == frozen


# ---------------------------------------------------------------------------
# MigrationResult


def _result(**changes: object) -> MigrationResult:
    fields = dict(
        status="completed", role="source", migration_id="00000000-0000-0000-0000-000000000001",
        ram_bytes=8 * PAGE_SIZE, channels=2, total_time_s=1.5, setup_time_ms=10.0, downtime_ms=20.0,
        rounds=3, pages_sent=8, zero_pages=0, bytes_on_wire=40_000, throughput_bytes_per_s=1e6,
        verified=True,
    )
    fields.update(changes)
    return MigrationResult(**fields)  # type: ignore[arg-type]


def test_result_to_dict_flattens_extra() -> None:
    result = _result(extra={"codec": "lz4", "ratio": 2.5}, channel_memory_kib=[{"rss": 10}])
    data = result.to_dict()
    assert "extra" not in data
    assert data["codec"] == "lz4" and data["ratio"] == 2.5
    assert data["status"] == "completed"
    assert data["channel_memory_kib"] == [{"rss": 10}]
    expected_keys = {f.name for f in dataclasses.fields(MigrationResult)} - {"extra"} | {"codec", "ratio"}
    assert set(data) == expected_keys
    assert result.extra == {"codec": "lz4", "ratio": 2.5}  # the result itself is unchanged


def test_result_to_dict_without_extra() -> None:
    data = _result(verified=None).to_dict()
    assert "extra" not in data
    assert data["verified"] is None
    assert data["rtt_ms"] == 0.0
    assert not any(isinstance(v, float) and math.isnan(v) for v in data.values())
