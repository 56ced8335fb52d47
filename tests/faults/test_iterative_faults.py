"""Broken iterative-device streams (issue 16): each a clear error and a clean
teardown (the leak check), driven by a hand-made source."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from clients.devices import DemoDevice, IterativeDemoDevice
from clients.guest import SyntheticGuest, check_incrementer
from engine import DestinationMigration, MigrationConfig, SourceMigration
from engine.errors import DeviceStateError, MigrationError
from engine.wire import message as wire
from tests.harness import SECRET, MiB, guest_ram, wait_until
from tests.protocol import ChannelWriter, HandMadeSource, destination_failure

FAST = MigrationConfig(channels=2, packet_pages=64, handshake_timeout_s=2.0).for_destination()
GPU = ("gpu", 0)


def region(offset: int = 0) -> bytes:
    """A chunk IterativeDemoDevice loads: the region's offset, then its bytes."""
    return struct.pack(">Q", offset) + b"\x5a" * 64


def _hand_made(run: object, *, iterative: bool = True, device: DemoDevice | None = None) -> str:
    """Drive a destination that has the device GPU (iterative or not, as CONFIG
    says) with `run(channels, source)`; return the error it fails with."""
    if device is None:
        device = IterativeDemoDevice(*GPU, state_size=MiB, with_state=False) if iterative else \
            DemoDevice(*GPU, state_size=0, with_state=False)
    with guest_ram(4 * MiB, fill="zero") as dst:
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst, config=FAST,
                                           devices=[device])
        destination.start()
        source = HandMadeSource(destination, list(dst.layout), channels=2,
                                devices=(wire.DeviceSpec(*GPU, iterative=iterative),))
        return destination_failure(destination, source, run)  # type: ignore[arg-type]


def test_a_live_chunk_for_a_device_that_is_not_iterative() -> None:
    error = _hand_made(lambda ch, src: ch[0].device_chunk(*GPU, 0, b"state", live=True),
                       iterative=False)
    assert "live-phase chunk 0, but the device is not iterative here" in error


def test_a_live_chunk_after_a_switchover_chunk() -> None:
    def run(ch: list[ChannelWriter], src: HandMadeSource) -> None:
        ch[0].device_chunk(*GPU, 2, region())            # a switchover chunk (chunk 1 is late)
        ch[0].device_chunk(*GPU, 3, region(), live=True)  # a live chunk after it, same channel
    assert "live-phase chunk 3 out of order, after switchover chunk 2" in _hand_made(run)


@pytest.mark.heavy  # the mirror of a case the default suite runs
def test_a_switchover_chunk_before_a_live_chunk() -> None:
    def run(ch: list[ChannelWriter], src: HandMadeSource) -> None:
        ch[0].device_chunk(*GPU, 5, region(), live=True)
        ch[0].device_chunk(*GPU, 3, region())
    assert "switchover chunk 3 out of order, before live-phase chunk 5" in _hand_made(run)


@pytest.mark.heavy  # the END check predates live chunks (test_device_faults)
def test_a_live_chunk_after_the_end_chunk() -> None:
    def run(ch: list[ChannelWriter], src: HandMadeSource) -> None:
        ch[0].device_chunk(*GPU, 1, b'{"size": 0}', end=True)
        ch[0].device_chunk(*GPU, 2, region(), live=True)
    assert "chunk 2 after its END chunk 1" in _hand_made(run)


def test_live_round_counting_a_chunk_that_never_came() -> None:
    """Chunks 0 and 2 came before the round's SYNC on every channel; LIVE_ROUND
    says 3 were sent: chunk 1 is lost, not late."""
    device = IterativeDemoDevice(*GPU, state_size=MiB, with_state=False)

    def run(ch: list[ChannelWriter], src: HandMadeSource) -> None:
        ch[0].device_chunk(*GPU, 0, region(0), live=True)
        ch[1].device_chunk(*GPU, 2, region(2 * (256 << 10)), live=True)
        for channel in ch:
            channel.sync(1)
        src.send(wire.SyncMarker(1))
        src.send(wire.LiveRound((3,)))
    error = _hand_made(run, device=device)
    assert "live-phase chunk 1 did not arrive before its round's sync" in error
    assert device.state[:64] == b"\x5a" * 64  # chunk 0 was loaded as it came


def test_live_round_answered_once_loaded_then_after_switchover_refused() -> None:
    """The destination answers LIVE_ROUND with DEVICES_LOADED (the ack, as asked)
    once the chunks it counts are loaded; a LIVE_ROUND after SWITCHOVER is refused."""
    def run(ch: list[ChannelWriter], src: HandMadeSource) -> None:
        ch[0].device_chunk(*GPU, 1, region(256 << 10), live=True)
        ch[1].device_chunk(*GPU, 0, region(0), live=True)
        for channel in ch:
            channel.sync(1)
        src.send(wire.SyncMarker(1))
        src.send(wire.LiveRound((2,), ack_wanted=True))
        answers = []
        while not answers or not answers[-1].switchover_ack:
            answer = src.next_message()
            assert isinstance(answer, wire.DevicesLoaded)
            answers.append(answer)
        assert answers[-1].devices[0].chunks == 2 and answers[-1].devices[0].size == 2 * (8 + 64)
        src.send(wire.Switchover())
        src.send(wire.LiveRound((2,)))
    assert "LIVE_ROUND after SWITCHOVER" in _hand_made(run)


@pytest.mark.heavy  # the mirror of a case the default suite runs
def test_live_round_without_an_iterative_device() -> None:
    def run(ch: list[ChannelWriter], src: HandMadeSource) -> None:
        for channel in ch:
            channel.sync(1)
        src.send(wire.SyncMarker(1))
        src.send(wire.LiveRound((0,)))
    assert "LIVE_ROUND without an iterative device" in _hand_made(run, iterative=False)


@pytest.mark.heavy  # test_cancel_during_the_live_phase's leak check catches it too
def test_a_device_that_loaded_live_state_is_stopped_by_the_failure() -> None:
    """Many live chunks buffered, each slow to load: a failure (here a chunk of an
    unknown device) stops the loading at once, not after every buffered chunk."""
    # ~0.5 s to load each 64-byte chunk
    device = IterativeDemoDevice(*GPU, state_size=MiB, load_latency_s=8000.0, with_state=False)

    def run(ch: list[ChannelWriter], src: HandMadeSource) -> None:
        for index in range(4):
            ch[index % 2].device_chunk(*GPU, index, region(index * (256 << 10)), live=True)
        wait_until(lambda: device.state[:1] == b"\x5a", "the first chunk to be loaded", timeout=10)
        ch[0].device_chunk("ghost", 0, 0, b"boo")
    assert "unknown device 'ghost'/0" in _hand_made(run, device=device)
    assert device.state[2 * (256 << 10)] == device.state[3 * (256 << 10)] == 0  # never loaded


class Broken(IterativeDemoDevice):
    """Its firmware fails in the live phase."""

    def save_live(self, max_bytes: int) -> Iterator[bytes]:
        yield from list(super().save_live(256 << 10))
        raise OSError("firmware timeout")


def test_a_live_save_that_raises_fails_the_migration_and_the_guest_runs() -> None:
    """A live job's failure reaches the operation: a clear DeviceStateError on the
    source (and, through ABORT, the destination); the guest was never paused."""
    with guest_ram(4 * MiB) as src, guest_ram(4 * MiB, fill="zero") as dst, \
            SyntheticGuest(src, "incrementer", dirty_rate=4 * MiB) as guest:
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst, config=FAST,
                                           devices=[IterativeDemoDevice(*GPU, MiB, with_state=False)])
        destination.start()
        source = SourceMigration(src, destination.address, secret=SECRET,
                                 config=MigrationConfig(channels=2, handshake_timeout_s=2.0),
                                 devices=[Broken(*GPU, MiB)], pause_guest=guest.pause,
                                 resume_guest=guest.resume)
        with pytest.raises(DeviceStateError, match="'gpu'/0 failed to save live state: firmware timeout"):
            source.run()
        with pytest.raises(DeviceStateError, match="firmware timeout"):
            destination.wait(10)
        assert not guest.paused
        guest.pause()
        assert check_incrementer(src) == ""


class BrokenBookkeeping(IterativeDemoDevice):
    """Its live_begin() or live_pending() raises (the VMM's own bug, not an I/O error)."""

    def __init__(self, *args: object, fails: str, **kwargs: object) -> None:
        self.fails = ""  # the constructor begins a live phase of its own
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.fails = fails

    def live_begin(self) -> None:
        if self.fails == "live_begin":
            raise RuntimeError("dirty log not armed")
        super().live_begin()

    def live_pending(self) -> tuple[int, int]:
        if self.fails == "live_pending":
            raise ValueError("negative count")
        if self.fails == "live_pending_answer":
            return None  # type: ignore[return-value]
        return super().live_pending()


@pytest.mark.parametrize("fails", ["live_begin", "live_pending", "live_pending_answer"])
def test_an_iterative_devices_bookkeeping_that_raises_is_a_device_state_error(fails: str) -> None:
    """Every error is a MigrationError: a device's exception from the calls the
    source's own thread makes is one too, naming the device and the call."""
    with guest_ram(4 * MiB) as src, guest_ram(4 * MiB, fill="zero") as dst:
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst, config=FAST,
                                           devices=[IterativeDemoDevice(*GPU, MiB, with_state=False)])
        destination.start()
        source = SourceMigration(src, destination.address, secret=SECRET,
                                 config=MigrationConfig(channels=2, handshake_timeout_s=2.0),
                                 devices=[BrokenBookkeeping(*GPU, MiB, fails=fails)])
        call = fails.removesuffix("_answer")
        with pytest.raises(DeviceStateError, match=f"device 'gpu'/0: {call}\\(\\) raised"):
            source.run()
        destination.cancel("test over")  # live_begin fails before the source connects
        with pytest.raises(MigrationError):
            destination.wait(10)
