"""cancel() does not wait on device firmware.

A device whose save_state or load_state blocks for seconds must not hold a
cancelled migration: teardown calls the device's optional ``cancel()`` and waits
``cancel_grace_s`` at most; a device without the hook is abandoned (never
joined) after that, and its job never writes into freed memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from clients.guest import SyntheticGuest, check_incrementer
from engine import DestinationMigration, MigrationConfig, SourceMigration
from engine.errors import CancelledError, MigrationError
from tests.harness import SECRET, MiB, address, guest_ram

CONFIG = MigrationConfig(channels=2, packet_pages=64, cancel_grace_s=1.0)
BLOCK_S = 5.0


class SlowFirmware:
    """A device whose save or load blocks for BLOCK_S seconds unless cancelled."""

    def __init__(self, block_in: str, hook: bool = True, block_s: float = BLOCK_S) -> None:
        self.idstr, self.instance_id = "vgpu", 0
        self.block_in, self.block_s = block_in, block_s
        self.entered = threading.Event()   # the slow call has started
        self._stop = threading.Event()
        self.cancelled = False
        if hook:
            self.cancel = self._cancel  # the optional hook of MigratableDevice

    def _cancel(self) -> None:
        self.cancelled = True
        self._stop.set()

    def _block(self, what: str) -> None:
        if self.block_in == what:
            self.entered.set()
            if self._stop.wait(self.block_s):
                raise MigrationError(f"{what} interrupted by cancel()")

    def save_state(self) -> Iterator[bytes]:
        self._block("save")
        yield b"state" * 100

    def save_config(self) -> bytes:
        return b"config"

    def load_state(self, chunk: bytes) -> None:
        self._block("load")

    def load_config(self, config: bytes) -> None:
        pass


def _cancel_when_entered(device: SlowFirmware, side) -> list[float]:
    """Cancel `side` once the device is inside its slow call; returns [when]."""
    when: list[float] = []

    def watch() -> None:
        if device.entered.wait(30):
            when.append(time.monotonic())
            side.cancel("the VMM gives up")

    threading.Thread(target=watch, name="test-canceller", daemon=True).start()
    return when


@pytest.mark.parametrize("block_in", ["save", "load"])
def test_cancel_returns_within_a_second_while_a_device_blocks(block_in: str) -> None:
    with guest_ram(8 * MiB) as src, guest_ram(8 * MiB, fill="zero") as dst, \
            SyntheticGuest(src, "incrementer", dirty_rate=0) as guest:
        source_device = SlowFirmware("save" if block_in == "save" else "none")
        dest_device = SlowFirmware("load" if block_in == "load" else "none")
        destination = DestinationMigration(address("tcp"), secret=SECRET, ram=dst, config=CONFIG,
                                           devices=[dest_device])
        source = SourceMigration(src, destination.address, secret=SECRET, config=CONFIG,
                                 devices=[source_device], pause_guest=guest.pause,
                                 resume_guest=guest.resume)
        cancelled_side = source if block_in == "save" else destination
        blocking = source_device if block_in == "save" else dest_device
        when = _cancel_when_entered(blocking, cancelled_side)
        destination.start()
        source.start()
        errors = []
        for side in (cancelled_side, destination if cancelled_side is source else source):
            with pytest.raises(MigrationError) as caught:
                side.wait(15)
            errors.append(caught.value)
            if side is cancelled_side:
                ended = time.monotonic()
        assert isinstance(errors[0], CancelledError)
        assert blocking.cancelled  # teardown asked the device to stop
        assert ended - when[0] < 1.0, f"the cancel took {ended - when[0]:.2f} s with a device blocking"
        assert not guest.paused
        guest.pause()
        assert check_incrementer(src) == ""


def test_a_device_without_the_hook_is_abandoned_not_joined() -> None:
    """No cancel(): the job stays in the device's code; teardown gives it
    cancel_grace_s, then leaves it behind (it ends on its own later)."""
    with guest_ram(8 * MiB) as src, guest_ram(8 * MiB, fill="zero") as dst, \
            SyntheticGuest(src, "incrementer", dirty_rate=0) as guest:
        device = SlowFirmware("save", hook=False, block_s=3.0)
        destination = DestinationMigration(address("tcp"), secret=SECRET, ram=dst, config=CONFIG,
                                           devices=[SlowFirmware("none")])
        source = SourceMigration(src, destination.address, secret=SECRET, config=CONFIG,
                                 devices=[device], pause_guest=guest.pause, resume_guest=guest.resume)
        when = _cancel_when_entered(device, source)
        destination.start()
        source.start()
        with pytest.raises(CancelledError):
            source.wait(15)
        ended = time.monotonic()
        with pytest.raises(MigrationError):
            destination.wait(15)
        # cancel_grace_s (1 s) and not the device's 3 s: the job was abandoned.
        assert ended - when[0] < 2.5, f"the cancel took {ended - when[0]:.2f} s"
        assert not guest.paused
