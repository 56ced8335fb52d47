"""Broken device-state streams: each a clear error, a clean teardown, the guest running."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator

import pytest

from clients.devices import DemoDevice
from clients.guest import SyntheticGuest, check_incrementer
from engine import DestinationMigration, MigrationConfig, SourceMigration
from engine.errors import ConfigError, DeviceStateError, MigrationError, WaitTimeout
from engine.wire import message as wire
from tests.harness import SECRET, MiB, address, guest_ram, wait_until
from tests.protocol import ChannelWriter, HandMadeSource, destination_failure

FAST = MigrationConfig(channels=2, packet_pages=64, handshake_timeout_s=2.0)
NIC = ("nic", 0)


def _hand_made(run: object, max_device_buffer: int = 64 * MiB, nic: DemoDevice | None = None) -> str:
    """Drive a destination that has the device NIC (`nic`, or a fresh one) with
    `run(channels, source)`; return the error it fails with."""
    if nic is None:
        nic = DemoDevice(*NIC, state_size=0, with_state=False)
    with guest_ram(4 * MiB, fill="zero") as dst:
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst, config=FAST,
                                           devices=[nic], max_device_buffer=max_device_buffer)
        destination.start()
        source = HandMadeSource(destination, list(dst.layout), channels=2, devices=(NIC,))
        return destination_failure(destination, source, run)  # type: ignore[arg-type]


def _finish(channels: list[ChannelWriter], source: HandMadeSource, done: wire.DeviceDone) -> None:
    source.send(wire.Switchover())
    source.send(wire.DevicesDone((done,)))
    for channel in channels:
        channel.end()
    source.send(wire.Complete(0, False))


def test_chunk_of_an_unknown_device() -> None:
    error = _hand_made(lambda ch, src: ch[0].device_chunk("ghost", 0, 0, b"boo"))
    assert "unknown device 'ghost'/0" in error


def test_duplicate_index() -> None:
    def run(ch: list[ChannelWriter], src: HandMadeSource) -> None:
        ch[0].device_chunk(*NIC, 0, b"first")
        ch[1].device_chunk(*NIC, 0, b"again")
    assert "chunk 0 arrived twice" in _hand_made(run)


def test_index_that_was_loaded_already() -> None:
    """Chunk 0 again after the device loaded it: refused, not parked and dropped.

    (test_duplicate_index's second copy may come while the first still waits in
    the buffer; here the first has certainly been loaded: chunk 1, loaded after
    it by the same drain, is in the device's state before the copy is sent.)
    """
    nic = DemoDevice(*NIC, state_size=0, with_state=False)

    def run(ch: list[ChannelWriter], src: HandMadeSource) -> None:
        ch[0].device_chunk(*NIC, 0, b"first")
        ch[0].device_chunk(*NIC, 1, b"second")
        wait_until(lambda: bytes(nic.state) == b"firstsecond", "chunks 0 and 1 to be loaded")
        ch[1].device_chunk(*NIC, 0, b"first")
    assert "chunk 0 arrived twice" in _hand_made(run, nic=nic)


def test_index_still_waiting_in_the_buffer() -> None:
    """Chunk 1 twice before chunk 0: the second copy is refused, not written over the first.

    (test_duplicate_index's first copy of chunk 0 is usually taken out of the
    buffer for loading before its second copy comes; chunk 1 cannot be loaded
    without chunk 0, so here both copies meet in the buffer, whichever comes first.)
    """
    def run(ch: list[ChannelWriter], src: HandMadeSource) -> None:
        ch[0].device_chunk(*NIC, 1, b"second")
        ch[1].device_chunk(*NIC, 1, b"again")
    assert "chunk 1 arrived twice" in _hand_made(run)


class HeldLoad(DemoDevice):
    """Its load_state waits to be released: the chunk it loads stays being loaded."""

    def __init__(self) -> None:
        super().__init__(*NIC, state_size=0, with_state=False)
        self.loading = threading.Event()
        self.release = threading.Event()

    def load_state(self, chunk: bytes) -> None:
        self.loading.set()
        self.release.wait(20)  # the test releases it; this is the way out if it does not
        super().load_state(chunk)


def test_index_being_loaded() -> None:
    """Chunk 0 again while the device is still loading it (out of the buffer, not
    yet loaded): refused, not parked in the buffer where nothing loads it."""
    nic = HeldLoad()
    with guest_ram(4 * MiB, fill="zero") as dst:
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst, config=FAST,
                                           devices=[nic])
        destination.start()
        source = HandMadeSource(destination, list(dst.layout), channels=2, devices=(NIC,))

        def run(ch: list[ChannelWriter], src: HandMadeSource) -> None:
            try:
                ch[0].device_chunk(*NIC, 0, b"first")
                assert nic.loading.wait(10), "chunk 0 was never loaded"
                ch[1].device_chunk(*NIC, 0, b"first")
                wait_until(lambda: destination.latch.failed, "the second copy to be refused", timeout=10)
            finally:
                nic.release.set()
        error = destination_failure(destination, source, run)
    assert "chunk 0 arrived twice" in error
    assert bytes(nic.state) == b"first"  # the held load finished; no second copy was loaded


class HungLoad(HeldLoad):
    """Its load hangs until cancel() (or the test) releases it."""

    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.release.set()


@pytest.mark.parametrize("who_waits_less", ["source", "destination"])
def test_a_device_load_that_hangs_at_switchover_ends_both_sides(who_waits_less: str) -> None:
    """The destination waits for its devices' loads after COMPLETE, on the thread that
    reads the source: it still hears the source give up (its ABORT and close), or
    gives up itself once the source would have (stall_timeout_s); either way the
    device is cancelled and nothing waits for ever."""
    short, long = FAST.with_(stall_timeout_s=2.0), FAST.with_(stall_timeout_s=60.0)
    source_config, destination_config = (short, long) if who_waits_less == "source" else (long, short)
    nic = HungLoad()
    with guest_ram(4 * MiB) as src, guest_ram(4 * MiB, fill="zero") as dst:
        destination = DestinationMigration(address("tcp"), secret=SECRET, ram=dst, devices=[nic],
                                           config=destination_config.for_destination())
        destination.start()
        try:
            with pytest.raises(MigrationError):
                SourceMigration(src, destination.address, secret=SECRET, config=source_config,
                                devices=[DemoDevice(*NIC, state_size=4096)]).run()
            with pytest.raises(MigrationError) as ended:
                destination.wait(15)  # the hung load holds for 20 s: only giving up ends it sooner
            assert not isinstance(ended.value, WaitTimeout), ended.value
        finally:
            nic.release.set()
            destination.cancel("test over")  # (a destination that failed the test must not run on)
    assert nic.cancelled


def test_chunk_after_the_end_marker() -> None:
    def run(ch: list[ChannelWriter], src: HandMadeSource) -> None:
        # A config part the device accepts: it may load before chunk 2 arrives.
        ch[0].device_chunk(*NIC, 0, b"state")
        ch[0].device_chunk(*NIC, 1, b'{"size": 5, "sha256": ""}', end=True)
        ch[1].device_chunk(*NIC, 2, b"late")
    assert "chunk 2 after its END chunk 1" in _hand_made(run)


def test_missing_index_at_the_end() -> None:
    def run(ch: list[ChannelWriter], src: HandMadeSource) -> None:
        stream = [b"zero", b"two", b"{}"]
        ch[0].device_chunk(*NIC, 0, stream[0])
        ch[1].device_chunk(*NIC, 2, stream[1])
        ch[0].device_chunk(*NIC, 3, stream[2], end=True)   # chunk 1 never comes
        _finish(ch, src, wire.DeviceDone(4, 9, hashlib.sha256(b"".join(stream)).digest()))
    assert "chunk 1 never arrived (1 of 4 loaded)" in _hand_made(run)


def test_chunks_buffered_ahead_are_bounded() -> None:
    """A source that never sends chunk 0 cannot make the destination hoard memory."""
    def run(ch: list[ChannelWriter], src: HandMadeSource) -> None:
        for index in range(1, 9):
            ch[index % 2].device_chunk(*NIC, index, bytes(256 << 10))
    error = _hand_made(run, max_device_buffer=1 * MiB)
    assert "buffered waiting for chunk 0 (limit 1048576)" in error


def test_loaded_state_that_hashes_differently() -> None:
    def run(ch: list[ChannelWriter], src: HandMadeSource) -> None:
        ch[0].device_chunk(*NIC, 0, b"{\"size\": 0, \"sha256\": \"\", \"idstr\": \"nic\"}", end=True)
        _finish(ch, src, wire.DeviceDone(1, 40, bytes(32)))
    assert "loaded state differs from the saved one" in _hand_made(run)


class Failing(DemoDevice):
    def __init__(self, *args: object, fail_on: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.fail_on = fail_on

    def save_state(self) -> Iterator[bytes]:
        for n, chunk in enumerate(super().save_state()):
            if self.fail_on == "save" and n == 3:
                raise OSError("firmware timed out")
            if self.fail_on in ("none", "one") and n == 3:
                # once taken for the end: the rest was lost (1 was the end too, by a name clash)
                yield None if self.fail_on == "none" else 1  # type: ignore[misc]
            yield chunk

    def load_state(self, chunk: bytes) -> None:
        if self.fail_on == "load" and len(self.state) >= 512 << 10:
            raise OSError("firmware rejected the state")
        super().load_state(chunk)


@pytest.mark.parametrize("where", ["save", "load", "none", "one"])
def test_save_or_load_that_raises_leaves_the_guest_running(where: str) -> None:
    with guest_ram(8 * MiB) as src, guest_ram(8 * MiB, fill="zero") as dst:
        destination = DestinationMigration(
            address("tcp"), secret=SECRET, ram=dst, config=FAST,
            devices=[Failing("gpu", 0, 2 * MiB, with_state=False, fail_on=where)])
        destination.start()
        with SyntheticGuest(src, "incrementer", dirty_rate=8 * MiB) as guest:
            source = SourceMigration(src, destination.address, secret=SECRET, config=FAST,
                                     pause_guest=guest.pause, resume_guest=guest.resume,
                                     devices=[Failing("gpu", 0, 2 * MiB, fail_on=where)])
            with pytest.raises(MigrationError) as failure:
                source.run()
            with pytest.raises(MigrationError) as remote:
                destination.wait(10)
            assert not guest.paused  # it was paused at switchover, and resumed
            guest.pause()
            assert check_incrementer(src) == ""
        if where == "save":
            assert isinstance(failure.value, DeviceStateError)
            assert "device 'gpu'/0 failed to save: firmware timed out" in str(failure.value)
        elif where in ("none", "one"):
            assert isinstance(failure.value, DeviceStateError)
            kind = "NoneType" if where == "none" else "int"
            assert f"device 'gpu'/0 failed to save: save_state() yielded {kind}, not bytes" \
                in str(failure.value)  # (then memoryview's own words)
        else:
            assert isinstance(remote.value, DeviceStateError)
            assert "device 'gpu'/0 failed to load chunk 2: firmware rejected" in str(remote.value)
            assert "destination failed: device 'gpu'/0 failed to load" in str(failure.value)


@pytest.mark.parametrize(("source_devices", "destination_devices", "match"), [
    ([("nic", 0), ("gpu", 0)], [("nic", 0)], "device 'gpu'/0 is on the source only"),
    ([("nic", 0)], [("nic", 0), ("nic", 1)], "device 'nic'/1 is on the destination only"),
])
def test_device_on_one_side_only_is_refused_before_any_page(
        source_devices: list, destination_devices: list, match: str) -> None:
    with guest_ram(4 * MiB, fill="text") as src, guest_ram(4 * MiB, fill="zero") as dst:
        destination = DestinationMigration(
            address("tcp"), secret=SECRET, ram=dst,
            devices=[DemoDevice(i, n, 0, with_state=False) for i, n in destination_devices])
        destination.start()
        with pytest.raises(ConfigError, match=match):
            SourceMigration(src, destination.address, secret=SECRET,
                            devices=[DemoDevice(i, n, 1024) for i, n in source_devices]).run()
        with pytest.raises(ConfigError):
            destination.wait(10)
        assert bytes(dst.blocks[0].pages) == bytes(4 * MiB)
