"""Iterative devices (issue 16): device state sent during precopy, beside a dirtying guest."""

from __future__ import annotations

import pytest

from clients.devices import DemoDevice, IterativeDemoDevice, demo_devices
from clients.guest import SyntheticGuest, check_incrementer
from engine import DestinationMigration, MigrationConfig, SourceMigration
from engine.errors import CancelledError, ConfigError, MigrationError
from tests.harness import SECRET, MiB, address, guest_ram, same_memory, wait_until

STATE = 3 * MiB + 12345  # not a whole number of regions


class Counting(IterativeDemoDevice):
    """Remembers how many bytes it has loaded (destination)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.loaded = 0

    def load_state(self, chunk: bytes) -> None:
        super().load_state(chunk)
        self.loaded += len(chunk) - 8


def _migrate(src_devices: list, dst_devices: list, *, config: MigrationConfig | None = None,
             pause: object = None, window: int | None = None) -> tuple:
    config = config or MigrationConfig(channels=4, packet_pages=64, verify=True)
    with guest_ram(16 * MiB) as src, guest_ram(16 * MiB, fill="zero") as dst:
        destination = DestinationMigration(address("tcp"), secret=SECRET, ram=dst,
                                           config=config.for_destination(), devices=dst_devices)
        destination.start()
        with SyntheticGuest(src, "incrementer", dirty_rate=16 * MiB) as guest:
            def pause_guest() -> None:
                if callable(pause):
                    pause()
                guest.pause()
            source = SourceMigration(src, destination.address, secret=SECRET, config=config,
                                     pause_guest=pause_guest, resume_guest=guest.resume,
                                     devices=src_devices)
            if window is not None:
                source.live_window = window
            result = source.run()
        remote = destination.wait(10)
        assert same_memory(src, dst)
    return result, remote


def test_iterative_and_plain_devices_migrate_with_a_dirtying_guest() -> None:
    """Two iterative devices changing 4x their state a second and one plain
    device, over 4 channels, with a 1 MiB window (so the rounds wait for the
    destination's loading): every byte arrives, the iterative ones mostly live."""
    sources = demo_devices(2, STATE, iterative=True, dirty_rate=4.0) + \
        [DemoDevice("plain", 0, STATE, seed=9)]
    targets = demo_devices(2, STATE, iterative=True, with_state=False) + \
        [DemoDevice("plain", 0, STATE, with_state=False)]
    result, remote = _migrate(sources, targets, window=MiB)
    assert result.verified is True and remote.extra["devices_verified"] is True
    assert result.rounds >= 3  # 3 MiB through a 1 MiB window
    for source, target in zip(sources, targets, strict=True):
        assert target.state == source.state and target.intact()
    sent = {d["idstr"]: d for d in result.extra["devices"]}
    loaded = {d["idstr"]: d for d in remote.extra["devices"]}
    for name in ("dev0", "dev1"):
        # The whole initial state went in precopy, and the destination loaded it
        # then, as the live chunks came.
        assert sent[name]["live_bytes"] >= STATE
        assert loaded[name]["live_bytes"] == sent[name]["live_bytes"]
    assert sent["plain"]["live_bytes"] == 0 and loaded["plain"]["live_bytes"] == 0
    assert sources[0].changed > 0  # the state did change while it was being sent


def test_switchover_waits_for_the_destination_to_load_the_initial_state() -> None:
    """A device that asks for the switchover ack: the guest is not paused before the
    destination has loaded its whole initial state (here slow: 0.6 s to load)."""
    source = IterativeDemoDevice("gpu", 0, STATE, seed=3, switchover_ack=True)
    target = Counting("gpu", 0, STATE, load_latency_s=0.6, with_state=False)
    at_pause: list[int] = []
    config = MigrationConfig(channels=2, packet_pages=64, downtime_limit_ms=5000)
    _migrate([source], [target], config=config, pause=lambda: at_pause.append(target.loaded))
    assert at_pause == [STATE]
    assert target.state == source.state and target.intact()


def test_max_rounds_reached_while_only_an_ack_is_due_is_no_forced_switchover() -> None:
    """The last round ends with the downtime well in reach but the switchover ack still
    due (a slow load): the switchover that max_rounds then makes is not reported as
    one forced past the downtime limit."""
    source = IterativeDemoDevice("gpu", 0, STATE, seed=3, switchover_ack=True)
    target = Counting("gpu", 0, STATE, load_latency_s=0.6, with_state=False)
    config = MigrationConfig(channels=2, packet_pages=64, downtime_limit_ms=5000, max_rounds=1)
    result, _ = _migrate([source], [target], config=config)
    assert "switchover_forced" not in result.extra
    assert target.state == source.state and target.intact()


@pytest.mark.parametrize("iterative_on", ["source", "destination"])
def test_a_device_iterative_on_one_side_only_is_refused_at_config(iterative_on: str) -> None:
    """Either way round, before any page moves: loaded, a destination's iterative
    device took the source's plain state for live chunks at nonsense offsets."""
    source_kind, destination_kind = ((IterativeDemoDevice, DemoDevice) if iterative_on == "source"
                                     else (DemoDevice, IterativeDemoDevice))
    src_device, dst_device = source_kind("gpu", 0, MiB), destination_kind("gpu", 0, MiB, with_state=False)
    expected = ("iterative on the source but not on this destination" if iterative_on == "source"
                else "iterative on this destination but not on the source")
    with guest_ram(4 * MiB) as src, guest_ram(4 * MiB, fill="zero") as dst:
        destination = DestinationMigration(address("tcp"), secret=SECRET, ram=dst, devices=[dst_device])
        destination.start()
        source = SourceMigration(src, destination.address, secret=SECRET, devices=[src_device])
        with pytest.raises(ConfigError, match=expected):
            source.run()
        with pytest.raises(MigrationError, match=expected):
            destination.wait(10)


@pytest.mark.parametrize("side", ["source", pytest.param("destination", marks=pytest.mark.heavy)])
def test_cancel_during_the_live_phase(side: str) -> None:
    """Cancel (either side) while live chunks are loading on the destination
    (slowly): both sides end, the guest runs on intact, nothing is left behind
    (the leak check); a second migration of the same device then sends its whole
    state again (live_begin) and it arrives intact."""
    config = MigrationConfig(channels=2, cancel_grace_s=3.0)
    gpu = IterativeDemoDevice("gpu", 0, 8 * MiB, dirty_rate=0.1)
    with guest_ram(8 * MiB) as src, guest_ram(8 * MiB, fill="zero") as dst, \
            SyntheticGuest(src, "incrementer", dirty_rate=4 * MiB) as guest:
        target = Counting("gpu", 0, 8 * MiB, load_latency_s=20.0, with_state=False)
        destination = DestinationMigration(address("tcp"), secret=SECRET, ram=dst,
                                           devices=[target])
        source = SourceMigration(src, destination.address, secret=SECRET, config=config,
                                 devices=[gpu], pause_guest=guest.pause, resume_guest=guest.resume)
        destination.start()
        source.start()
        wait_until(lambda: target.loaded > 0, "a live chunk to be loaded")
        cancelled, other = (source, destination) if side == "source" else (destination, source)
        assert cancelled.cancel("the operator changed their mind")
        with pytest.raises(CancelledError):
            cancelled.wait(15)
        with pytest.raises(MigrationError):
            other.wait(15)
        assert not guest.paused
        assert 0 < target.loaded < 8 * MiB
        if side == "source":
            again = Counting("gpu", 0, 8 * MiB, with_state=False)
            destination = DestinationMigration(address("tcp"), secret=SECRET, ram=dst,
                                               devices=[again])
            destination.start()
            SourceMigration(src, destination.address, secret=SECRET, config=config, devices=[gpu],
                            pause_guest=guest.pause, resume_guest=guest.resume).run()
            destination.wait(10)
            assert again.state == gpu.state and again.intact() and again.loaded >= 8 * MiB
        guest.pause()
        assert check_incrementer(src) == ""


def test_live_rounds_shuffled_reassemble_byte_for_byte() -> None:
    """The loader alone, fed an iterative device's real stream — two live rounds
    (the second re-sends regions that changed), then the switchover's rest —
    each round's chunks shuffled as channels would deliver them: the state
    arrives byte for byte, and each LIVE_ROUND's check passes."""
    import hashlib
    import random
    import time

    from clients.device_state import DeviceLoader
    from engine.pool import WorkerPool
    from engine.sync import FailureLatch
    from engine.wire import message as wire

    source = IterativeDemoDevice("gpu", 0, STATE, seed=5, dirty_rate=50.0)
    target = IterativeDemoDevice("gpu", 0, STATE, with_state=False)
    source.live_pending()              # the device's clock starts
    rounds = [list(source.save_live(2 * MiB))]
    time.sleep(0.05)                   # ~30 regions change meanwhile
    rounds.append(list(source.save_live(8 * MiB)))
    time.sleep(0.01)
    rest = list(source.save_state()) + [source.save_config()]
    assert source.changed > 0 and len(rounds[1]) > STATE // (256 << 10) - 8  # re-sent regions
    rng = random.Random(16)
    latch = FailureLatch()
    index = 0
    with WorkerPool("thread", 1, name="live-loader-test") as pool:
        loader = DeviceLoader([target], slots=None, pool=pool, latch=latch)  # type: ignore[arg-type]
        loader.expect_live([True], lambda: None)
        for chunks in rounds:
            numbered = list(enumerate(chunks, start=index))
            rng.shuffle(numbered)
            for at, chunk in numbered:
                loader.accept_chunk(0, at, False, chunk, live=True)
            index += len(chunks)
            loader.check_live_round([index])
        numbered = list(enumerate(rest, start=index))
        rng.shuffle(numbered)
        for at, chunk in numbered:
            loader.accept_chunk(0, at, at == index + len(rest) - 1, chunk)
        stream = [chunk for chunks in (*rounds, rest) for chunk in chunks]
        reports = loader.wait_loaded([wire.DeviceDone(len(stream), sum(map(len, stream)),
                                                      hashlib.sha256(b"".join(stream)).digest())])
    latch.close()
    assert target.state == source.state and target.intact()
    assert reports[0].reordered > 0 and reports[0].live_bytes == sum(map(len, rounds[0] + rounds[1]))
