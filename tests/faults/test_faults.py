"""Failures and cancellation: nothing hangs, the source guest keeps running, nothing leaks.

Every test here also runs the leak check (tests/faults/conftest.py): no child
process, thread, /dev/shm segment or fd may outlive it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time

import pytest

from clients.guest import SyntheticGuest, check_incrementer
from engine import DestinationMigration, MigrationConfig, SourceMigration
from engine.errors import CancelledError, MigrationError
from engine.sync import MigrationState
from tests.harness import SECRET, LockstepGuest, MiB, address, guest_ram, migrate, outcomes, same_memory

# Never converges (an unthrottled guest and a 0 ms limit), so it stays in precopy.
# No timeout can end it either: a failure or cancel that surfaces at all surfaced by
# its event (a channel's socket closing, the latch), not by a stall timer; the bounded
# waits below only turn a hang into a failure.
ENDLESS = MigrationConfig(channels=2, packet_pages=64, downtime_limit_ms=0, max_rounds=10_000,
                          stall_timeout_s=3600.0)


class Pair:
    """A source and a destination migration running on background threads."""

    def __init__(self, src, dst, guest: SyntheticGuest | None, config: MigrationConfig = ENDLESS,
                 transport: str = "tcp") -> None:
        self.destination = DestinationMigration(address(transport), secret=SECRET, ram=dst,
                                                config=config)
        self.source = SourceMigration(
            src, self.destination.address, secret=SECRET, config=config,
            pause_guest=guest.pause if guest else None,
            resume_guest=guest.resume if guest else None,
            # Pages are dirty whenever the source looks, whatever CPU the guest process
            # gets: the migration stays in precopy under any load.
            dirty_source=LockstepGuest(src),
        )
        self.destination.start()
        self.source.start()

    def wait_precopy(self, rounds: int = 2, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.source.stats()
            if self.source.state is MigrationState.ACTIVE and stats and stats.round >= rounds:
                return
            if self.source.done():
                self.source.wait()  # raises what went wrong
            time.sleep(0.01)
        raise AssertionError("the migration never reached precopy")

    def outcomes(self, timeout: float = 10.0) -> tuple[BaseException | None, BaseException | None]:
        source, destination = outcomes(self.source, self.destination, timeout=timeout)
        return source, destination


def _assert_guest_running_and_intact(guest: SyntheticGuest, ram) -> None:
    assert not guest.paused
    guest.pause()  # it answers, so it ran; now freeze it to check its memory
    assert check_incrementer(ram) == ""


@pytest.mark.parametrize("side", ["source", "destination"])
def test_killing_a_channel_fails_fast_and_leaves_the_guest_running(side: str) -> None:
    with guest_ram(16 * MiB) as src, guest_ram(16 * MiB, fill="zero") as dst:
        with SyntheticGuest(src, "incrementer", dirty_rate=0) as guest:
            pair = Pair(src, dst, guest)
            pair.wait_precopy()
            victim = (pair.source if side == "source" else pair.destination).channel_pids()[1]
            os.kill(victim, signal.SIGKILL)
            source_error, destination_error = pair.outcomes()
            assert "no progress" not in f"{source_error} {destination_error}"  # not the stall timer
            assert isinstance(source_error, MigrationError)
            assert isinstance(destination_error, MigrationError)
            if side == "source":
                assert "exit code -9" in str(source_error)
            else:
                assert "destination failed" in str(source_error)
                assert "-9" in str(destination_error)
            _assert_guest_running_and_intact(guest, src)
        # Everything is torn down: a new migration of the same guest succeeds.
        result, _ = migrate(src, dst, MigrationConfig(channels=2, packet_pages=64))
        assert result.status == "completed" and same_memory(src, dst)


def test_cancel_before_start() -> None:
    with guest_ram(4 * MiB) as src:
        source = SourceMigration(src, "tcp://127.0.0.1:9", secret=SECRET)
        source.cancel("changed my mind")
        with pytest.raises(CancelledError, match="changed my mind"):
            source.run()
        assert source.state is MigrationState.CANCELLED


def test_cancel_during_setup_wakes_a_blocked_handshake() -> None:
    # A peer that accepts and never answers: the source waits for its hello reply.
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        with guest_ram(4 * MiB) as src:
            source = SourceMigration(src, f"tcp://127.0.0.1:{silent.getsockname()[1]}",
                                     secret=SECRET,
                                     config=MigrationConfig(handshake_timeout_s=3600.0))
            source.start()
            peer, _ = silent.accept()
            try:
                time.sleep(0.1)
                assert source.state is MigrationState.SETUP
                source.cancel()
                with pytest.raises(CancelledError):
                    source.wait(5)  # the handshake timeout is 3600 s: only the cancel ends it
            finally:
                peer.close()
    finally:
        silent.close()


def test_cancel_a_listening_destination() -> None:
    destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET)
    destination.start()
    time.sleep(0.1)
    assert destination.state is MigrationState.LISTENING
    destination.cancel()
    with pytest.raises(CancelledError):
        destination.wait(5)
    assert destination.state is MigrationState.CANCELLED


@pytest.mark.parametrize("who", ["source", "destination"])
def test_cancel_during_precopy(who: str) -> None:
    with guest_ram(16 * MiB) as src, guest_ram(16 * MiB, fill="zero") as dst:
        with SyntheticGuest(src, "incrementer", dirty_rate=0) as guest:
            pair = Pair(src, dst, guest, transport="unix")
            pair.wait_precopy()
            (pair.source if who == "source" else pair.destination).cancel("operator said stop")
            source_error, destination_error = pair.outcomes()
            assert isinstance(source_error, CancelledError)
            assert isinstance(destination_error, CancelledError)
            assert "operator said stop" in str(source_error) + str(destination_error)
            _assert_guest_running_and_intact(guest, src)


def test_cancel_after_the_pause_resumes_the_guest() -> None:
    config = MigrationConfig(channels=2, packet_pages=64)
    with guest_ram(16 * MiB) as src, guest_ram(16 * MiB, fill="zero") as dst:
        with SyntheticGuest(src, "incrementer", dirty_rate=8 * MiB) as guest:
            holder: dict[str, SourceMigration] = {}

            def pause_then_cancel() -> None:
                guest.pause()
                holder["source"].cancel("cancelled at switchover")

            destination = DestinationMigration(address("tcp"), secret=SECRET, ram=dst, config=config)
            destination.start()
            source = SourceMigration(src, destination.address, secret=SECRET, config=config,
                                     pause_guest=pause_then_cancel, resume_guest=guest.resume)
            holder["source"] = source
            with pytest.raises(CancelledError, match="cancelled at switchover"):
                source.run()
            with pytest.raises(CancelledError):
                destination.wait(10)
            assert source.state is MigrationState.CANCELLED
            _assert_guest_running_and_intact(guest, src)  # resumed after the pause


def test_cancel_after_completion_changes_nothing() -> None:
    with guest_ram(4 * MiB) as src, guest_ram(4 * MiB, fill="zero") as dst:
        destination = DestinationMigration(address("tcp"), secret=SECRET, ram=dst)
        destination.start()
        source = SourceMigration(src, destination.address, secret=SECRET)
        result = source.run()
        destination.wait(10)
        source.cancel()
        destination.cancel()
        assert source.state is MigrationState.COMPLETED
        assert destination.state is MigrationState.COMPLETED
        assert result.status == "completed"


def test_destination_gone_before_setup_fails_cleanly() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nobody listens there now
    with guest_ram(4 * MiB) as src:
        with SyntheticGuest(src, "incrementer", dirty_rate=MiB) as guest:
            with pytest.raises(MigrationError, match="cannot connect"):
                SourceMigration(src, f"tcp://127.0.0.1:{port}", secret=SECRET,
                                pause_guest=guest.pause, resume_guest=guest.resume).run()
            _assert_guest_running_and_intact(guest, src)


def test_source_process_side_dies_mid_precopy() -> None:
    """The destination notices a source that vanished (its main channel closes)."""
    with guest_ram(16 * MiB) as src, guest_ram(16 * MiB, fill="zero") as dst:
        with SyntheticGuest(src, "incrementer", dirty_rate=0):
            pair = Pair(src, dst, None)
            pair.wait_precopy()
            # Simulate the source VMM's main channel dying: shut its socket down.
            assert pair.source._conn is not None
            pair.source._conn.shutdown()
            source_error, destination_error = pair.outcomes()
            assert isinstance(destination_error, MigrationError)
            # Which of its connections it sees close first is a race: the source, failing
            # too, closes its channels while the main channel's EOF is on its way.
            assert re.search(r"source closed (the main channel|multifd channel \d+ without END)",
                             str(destination_error)), destination_error
            assert isinstance(source_error, MigrationError)


def test_threads_of_a_finished_migration_are_gone() -> None:
    before = {t.ident for t in threading.enumerate()}
    with guest_ram(4 * MiB) as src, guest_ram(4 * MiB, fill="zero") as dst:
        migrate(src, dst, MigrationConfig(channels=1))
    assert {t.ident for t in threading.enumerate()} <= before
