"""The source's bookkeeping of iterative devices (issue 16): windows, the downtime
estimate and the switchover ack, with a real iterative demo device."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from clients.devices import DemoDevice, IterativeDemoDevice
from engine.device import LiveDevices
from engine.errors import CancelledError, RemoteProtocolError, TransportBrokenError
from engine.stats import StatsTracker
from engine.sync import FailureLatch, MigrationState
from engine.wire.message import DeviceLoaded, DevicesLoaded

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def latch() -> Iterator[FailureLatch]:
    latch = FailureLatch()
    yield latch
    latch.close()


def test_window_estimate_and_ack(latch: FailureLatch) -> None:
    gpu = IterativeDemoDevice("gpu", 0, MiB, switchover_ack=True)
    live = LiveDevices([gpu, DemoDevice("nic", 0, KiB)], window=512 * KiB, latch=latch)
    live.poll_pending()
    assert live.allowances() == [512 * KiB, 0]  # the plain device never sends live
    sent = sum(len(chunk) for chunk in gpu.save_live(512 * KiB))
    live.handed_out([sent, 0])
    assert live.allowances() == [0, 0] and live.blocked()  # window full: wait for loading
    assert not live.ask_ack_now()                          # half the initial state is still here
    # The destination loaded it all, in 0.5 s: the window opens again, and the
    # rest (512 KiB pending, nothing in flight) would load in 0.5 s too.
    live.on_loaded(DevicesLoaded((DeviceLoaded(2, sent, 500_000), DeviceLoaded(0, 0, 0))))
    live.poll_pending()
    assert live.allowances() == [512 * KiB, 0] and not live.blocked()
    pending, load_s = live.remaining()
    assert pending == 512 * KiB and load_s == pytest.approx(0.5 * 512 * KiB / sent)
    sent2 = sum(len(chunk) for chunk in gpu.save_live(512 * KiB))
    live.handed_out([sent2, 0])
    assert live.poll_pending() == 0
    assert live.remaining() == (0, pytest.approx(0.5))     # in flight, not loaded yet
    assert live.ask_ack_now() and not live.ask_ack_now()   # asked once
    assert not live.wait_ack(0.01)
    live.on_loaded(DevicesLoaded((DeviceLoaded(4, sent + sent2, 10**6), DeviceLoaded(0, 0, 0)), True))
    assert live.acked and live.wait_ack(0.01)


def test_the_estimate_counts_device_bytes_and_load_time() -> None:
    tracker = StatsTracker(64 * MiB, 4096)
    tracker.bandwidth = MiB                 # 1 MiB/s
    tracker.remaining_pages = 256           # 1 MiB of dirty RAM
    assert tracker.expected_downtime_s() == pytest.approx(1.0)
    tracker.device_pending_bytes, tracker.device_load_s = 512 * KiB, 0.25
    assert tracker.expected_downtime_s() == pytest.approx(1.75)
    assert tracker.snapshot(MigrationState.ACTIVE).remaining_bytes == MiB + 512 * KiB


def test_refusals_and_ways_out(latch: FailureLatch) -> None:
    live = LiveDevices([IterativeDemoDevice("gpu", 0, MiB)], window=MiB, latch=latch)
    with pytest.raises(RemoteProtocolError, match="nobody asked for"):
        live.on_loaded(DevicesLoaded((DeviceLoaded(0, 0, 0),), True))
    with pytest.raises(RemoteProtocolError, match="lists 2 devices"):
        live.on_loaded(DevicesLoaded((DeviceLoaded(0, 0, 0),) * 2))
    with pytest.raises(TransportBrokenError, match="no DEVICES_LOADED"):
        live.wait_loaded([1], 0.01)
    latch.cancel("stop")
    with pytest.raises(CancelledError):
        live.wait_loaded([1], 5)
