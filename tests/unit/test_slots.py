"""Send slots in shared memory (engine/slots.py).

Tests drop every slot and view they took before closing a table: a live view
keeps the mapping (and its fd) open, which ``no_leaks`` reports.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from engine.errors import ConfigError, LocalProtocolError
from engine.slots import KIND_EMPTY, N_COUNTERS, Counter, SlotTable, SlotTableHandle
from tests.leaks import shm_segments

pytestmark = pytest.mark.usefixtures("no_leaks")

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
_HEADER_FIELDS = ("kind", "epoch", "n_items", "payload_length", "a0", "a1", "a2", "a3")


@pytest.fixture
def table() -> SlotTable:
    """5 slots (3 channels + 2 clients), 4 items and 100 payload bytes each."""
    owned = SlotTable.create(n_slots=5, max_items=4, payload_capacity=100, n_channels=3)
    yield owned
    owned.close()
    owned.unlink()


def _fill(table: SlotTable) -> None:
    """Give every slot distinct header values, items and payload bytes."""
    for slot in table:
        i = slot.index
        slot.kind = 10 + i
        slot.epoch = 20 + i
        slot.n_items = 1 + i % 4
        slot.payload_length = 30 + i
        slot.a0, slot.a1, slot.a2, slot.a3 = 40 + i, 50 + i, 60 + i, U32_MAX - i
        slot.items[:] = np.arange(8, dtype=np.uint32).reshape(4, 2) + 100 * i
        slot.payload[:] = bytes([0xA0 + i]) * len(slot.payload)


def _check(table: SlotTable) -> None:
    for slot in table:
        i = slot.index
        header = (slot.kind, slot.epoch, slot.n_items, slot.payload_length)
        assert header == (10 + i, 20 + i, 1 + i % 4, 30 + i)
        assert (slot.a0, slot.a1, slot.a2, slot.a3) == (40 + i, 50 + i, 60 + i, U32_MAX - i)
        assert slot.items.tolist() == (np.arange(8).reshape(4, 2) + 100 * i).tolist()
        assert bytes(slot.payload) == bytes([0xA0 + i]) * 100


def test_new_table_is_empty(table: SlotTable) -> None:
    assert len(table) == 5
    assert table.handle == SlotTableHandle(table.segment.name, 5, 4, 100, 3)
    for slot in table:
        assert slot.empty
        assert slot.kind == KIND_EMPTY
        assert all(getattr(slot, field) == 0 for field in _HEADER_FIELDS)
        assert slot.items.shape == (4, 2)
        assert len(slot.payload) == 100
        assert slot.used_items().shape == (0, 2)
    assert table.counters.shape == (3, N_COUNTERS)
    assert not table.counters.any()
    assert table.totals().tolist() == [0] * N_COUNTERS


def test_slots_are_independent_and_round_trip_through_attach(table: SlotTable) -> None:
    """Every slot filled to capacity: nothing overlaps, and an attached table sees it all."""
    _fill(table)
    table.counters[:] = U64_MAX  # the counters come after the last slot's payload
    _check(table)
    other = SlotTable.attach(table.handle)
    try:
        assert len(other) == 5
        _check(other)
        assert (other.counters == U64_MAX).all()
    finally:
        other.close()


def test_header_fields_hold_u32_limits(table: SlotTable) -> None:
    slot = table[2]
    for field in _HEADER_FIELDS:
        setattr(slot, field, U32_MAX)
        assert getattr(slot, field) == U32_MAX
        setattr(slot, field, 0)
    assert table[1].kind == 0 and table[3].kind == 0
    del slot


def test_writes_through_an_attached_table_reach_the_owner(table: SlotTable) -> None:
    other = SlotTable.attach(table.handle)
    try:
        slot = other[4]
        slot.kind, slot.epoch, slot.n_items, slot.payload_length = 2, 7, 2, 5
        slot.a0, slot.a3 = 99, 98
        slot.items[:2] = [[1, 3], [9, 1]]
        slot.payload[:5] = b"hello"
        del slot
        mine = table[4]
        assert not mine.empty
        assert (mine.kind, mine.epoch, mine.n_items, mine.payload_length) == (2, 7, 2, 5)
        assert (mine.a0, mine.a1, mine.a2, mine.a3) == (99, 0, 0, 98)
        assert mine.used_items().tolist() == [[1, 3], [9, 1]]
        assert bytes(mine.payload[: mine.payload_length]) == b"hello"
        del mine
    finally:
        other.close()


def test_clear_marks_empty_and_keeps_the_rest(table: SlotTable) -> None:
    _fill(table)
    slot = table[3]
    slot.clear()
    assert slot.empty
    assert (slot.kind, slot.n_items, slot.payload_length) == (KIND_EMPTY, 0, 0)
    assert slot.used_items().shape == (0, 2)
    # epoch, a0..a3, items and payload bytes are left as they were
    assert (slot.epoch, slot.a0, slot.a3) == (23, 43, U32_MAX - 3)
    assert bytes(slot.payload) == b"\xa3" * 100
    assert slot.items[3].tolist() == [306, 307]
    # and the neighbours are untouched
    assert not table[2].empty and not table[4].empty
    del slot


def test_used_items_is_a_view_of_the_first_n_items(table: SlotTable) -> None:
    slot = table[0]
    slot.items[:] = [[1, 2], [3, 4], [5, 6], [7, 8]]
    slot.n_items = 3
    used = slot.used_items()
    assert used.tolist() == [[1, 2], [3, 4], [5, 6]]
    used[0, 0] = 42  # a view, not a copy
    assert slot.items[0, 0] == 42
    slot.n_items = 4
    assert slot.used_items().shape == (4, 2)
    del used, slot


def test_counters_are_shared_and_totals_sum_channels(table: SlotTable) -> None:
    other = SlotTable.attach(table.handle)
    try:
        other.counters[0, Counter.WIRE_BYTES] = 1000
        other.counters[1, Counter.WIRE_BYTES] = 2000
        other.counters[2, Counter.WIRE_BYTES] = U64_MAX - 3000  # totals stay in u64 range
        other.counters[1, Counter.PACKETS] = 7
        other.counters[2, Counter.DEVICE_BYTES] = 5
        table.counters[0, Counter.SYNCS] += 3
        assert int(other.counters[0, Counter.SYNCS]) == 3
        totals = table.totals()
        assert int(totals[Counter.WIRE_BYTES]) == U64_MAX
        assert int(totals[Counter.PACKETS]) == 7
        assert int(totals[Counter.SYNCS]) == 3
        assert int(totals[Counter.DEVICE_BYTES]) == 5
        assert int(totals[Counter.NORMAL_PAGES]) == 0
        # totals() is a copy
        totals[Counter.PACKETS] = 0
        assert int(table.totals()[Counter.PACKETS]) == 7
        assert other.totals().tolist() == table.totals().tolist()
    finally:
        other.close()


def test_counter_enum_layout() -> None:
    assert [c.value for c in Counter] == list(range(N_COUNTERS))
    assert N_COUNTERS == 10


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"n_slots": 6}, id="n_slots"),
        pytest.param({"max_items": 5}, id="max_items"),
        pytest.param({"payload_capacity": 99}, id="payload_capacity"),
    ],
)
def test_attach_with_mismatched_handle_raises_config_error(table: SlotTable, change: dict) -> None:
    with pytest.raises(ConfigError, match="does not match"):
        SlotTable.attach(replace(table.handle, **change))


@pytest.mark.parametrize("n_channels", [2, 4])
def test_attach_with_mismatched_channel_count_raises_config_error(table: SlotTable, n_channels: int) -> None:
    handle = replace(table.handle, n_channels=n_channels)
    # Record the outcome as text: a kept exception would keep the mapping it failed in.
    try:
        other = SlotTable.attach(handle)
    except ConfigError:
        outcome = "ConfigError"
    except Exception as exc:  # the bug: whatever numpy raises
        outcome = f"raised {exc!r}"
    else:
        other.close()
        outcome = "accepted"
    assert outcome == "ConfigError"


def test_attach_missing_segment_raises_config_error() -> None:
    handle = SlotTableHandle("mfd-test-no-such-table", 1, 1, 0, 1)
    with pytest.raises(ConfigError):
        SlotTable.attach(handle)


@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param((0, 1, 0, 1), id="no-slots"),
        pytest.param((1, 0, 0, 1), id="no-items"),
        pytest.param((1, 1, -1, 1), id="negative-payload"),
        pytest.param((1, 1, 0, 0), id="no-channels"),
    ],
)
def test_invalid_sizes_raise_config_error(sizes: tuple[int, int, int, int]) -> None:
    before = shm_segments()
    with pytest.raises(ConfigError):
        SlotTable.create(*sizes)
    assert shm_segments() == before


def test_zero_payload_capacity_is_allowed() -> None:
    owned = SlotTable.create(n_slots=2, max_items=1, payload_capacity=0, n_channels=1)
    try:
        assert len(owned[1].payload) == 0
        owned[1].a0 = 5
        owned.counters[0, Counter.PACKETS] = 1
        assert owned[1].a0 == 5
        assert int(owned.totals()[Counter.PACKETS]) == 1
    finally:
        owned.close()
        owned.unlink()


def test_close_and_unlink_leave_nothing() -> None:
    before = shm_segments()
    owned = SlotTable.create(n_slots=3, max_items=2, payload_capacity=4096, n_channels=2)
    assert shm_segments() - before == {owned.segment.name}
    other = SlotTable.attach(owned.handle)
    with pytest.raises(LocalProtocolError):
        other.unlink()
    other.close()
    other.close()
    owned.close()
    owned.close()
    owned.unlink()
    owned.unlink()
    assert shm_segments() == before
    with pytest.raises(ConfigError):
        SlotTable.attach(owned.handle)
