"""cancel() does not wait on device firmware.

A device whose save_state or load_state blocks for seconds must not hold a
cancelled migration: teardown calls the device's optional ``cancel()`` and waits
``cancel_grace_s`` at most; a device without the hook is abandoned (never
joined) after that, and its job never writes into freed memory.

No test here reads the clock: the devices block until the test lets them go
(BLOCK_S, far beyond any wait here, is only a safety net for the device's
thread), so a migration that waited for its device could not end at all, and
the `wait(15)` that bounds each test turns that into a failure.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from clients.guest import SyntheticGuest, check_incrementer
from engine import DestinationMigration, MigrationConfig, SourceMigration
from engine.errors import CancelledError, MigrationError
from tests.harness import SECRET, MiB, address, guest_ram

CONFIG = MigrationConfig(channels=2, packet_pages=64, cancel_grace_s=1.0)
BLOCK_S = 120.0


class SlowFirmware:
    """A device whose save or load blocks until cancelled or :meth:`release` d."""

    def __init__(self, block_in: str, hook: bool = True, block_s: float = BLOCK_S,
                 quietly: bool = False) -> None:
        self.idstr, self.instance_id = "vgpu", 0
        self.block_in, self.block_s = block_in, block_s
        self.quietly = quietly  # a cancelled call returns (its stream just ends) instead of raising
        self.configs = 0  # save_config() calls
        self.entered = threading.Event()   # the slow call has started
        self.left = threading.Event()      # ... and has returned
        self._stop = threading.Event()
        self.cancelled = False
        if hook:
            self.cancel = self._cancel  # the optional hook of MigratableDevice

    def _cancel(self) -> None:
        self.cancelled = True
        self._stop.set()

    def release(self) -> None:
        """Let a blocked call go (the test is over with it)."""
        self._stop.set()

    def _block(self, what: str) -> None:
        if self.block_in == what:
            self.entered.set()
            try:
                if self._stop.wait(self.block_s) and not self.quietly:
                    raise MigrationError(f"{what} interrupted by cancel()")
            finally:
                self.left.set()

    def save_state(self) -> Iterator[bytes]:
        self._block("save")
        if not (self.quietly and self._stop.is_set()):
            yield b"state" * 100

    def save_config(self) -> bytes:
        self.configs += 1
        return b"config"

    def load_state(self, chunk: bytes) -> None:
        self._block("load")

    def load_config(self, config: bytes) -> None:
        pass


def _cancel_when_entered(device: SlowFirmware, side) -> threading.Thread:
    """Cancel `side` once the device is inside its slow call."""
    def watch() -> None:
        if device.entered.wait(30):
            side.cancel("the VMM gives up")

    thread = threading.Thread(target=watch, name="test-canceller", daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("block_in", ["save", "load", "save-ends-quietly"])
def test_cancel_returns_while_a_device_blocks(block_in: str) -> None:
    """(A device whose cancelled save_state() just ends is asked for nothing more.)"""
    quietly = block_in == "save-ends-quietly"
    block_in = block_in.removesuffix("-ends-quietly")
    with guest_ram(8 * MiB) as src, guest_ram(8 * MiB, fill="zero") as dst, \
            SyntheticGuest(src, "incrementer", dirty_rate=0) as guest:
        source_device = SlowFirmware("save" if block_in == "save" else "none", quietly=quietly)
        dest_device = SlowFirmware("load" if block_in == "load" else "none")
        destination = DestinationMigration(address("tcp"), secret=SECRET, ram=dst, config=CONFIG,
                                           devices=[dest_device])
        source = SourceMigration(src, destination.address, secret=SECRET, config=CONFIG,
                                 devices=[source_device], pause_guest=guest.pause,
                                 resume_guest=guest.resume)
        cancelled_side = source if block_in == "save" else destination
        blocking = source_device if block_in == "save" else dest_device
        canceller = _cancel_when_entered(blocking, cancelled_side)
        destination.start()
        source.start()
        errors = []
        for side in (cancelled_side, destination if cancelled_side is source else source):
            with pytest.raises(MigrationError) as caught:
                side.wait(15)  # the device blocks until cancel(): only its hook ends this
            errors.append(caught.value)
        canceller.join(15)
        assert isinstance(errors[0], CancelledError)
        assert blocking.cancelled  # teardown asked the device to stop
        if block_in == "save":
            assert source_device.configs == 0
        assert not guest.paused
        guest.pause()
        assert check_incrementer(src) == ""


def test_a_device_without_the_hook_is_abandoned_not_joined() -> None:
    """No cancel(): the job stays in the device's code; teardown gives it
    cancel_grace_s, then leaves it behind (it ends on its own later)."""
    with guest_ram(8 * MiB) as src, guest_ram(8 * MiB, fill="zero") as dst, \
            SyntheticGuest(src, "incrementer", dirty_rate=0) as guest:
        device = SlowFirmware("save", hook=False)  # blocks until the test releases it
        destination = DestinationMigration(address("tcp"), secret=SECRET, ram=dst, config=CONFIG,
                                           devices=[SlowFirmware("none")])
        source = SourceMigration(src, destination.address, secret=SECRET, config=CONFIG,
                                 devices=[device], pause_guest=guest.pause, resume_guest=guest.resume)
        canceller = _cancel_when_entered(device, source)
        destination.start()
        source.start()
        try:
            # The device is still inside save_state: a teardown that joined it would
            # never end, so ending at all means it was abandoned after cancel_grace_s.
            with pytest.raises(CancelledError):
                source.wait(15)
            assert device.entered.is_set() and not device.left.is_set()  # still inside
            with pytest.raises(MigrationError):
                destination.wait(15)
        finally:
            device.release()  # the abandoned job ends on its own now
            canceller.join(15)
        assert not guest.paused
