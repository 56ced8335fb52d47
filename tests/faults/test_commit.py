"""Switchover is a commit: the guest runs in exactly one place, whatever fails when.

Each test forces one failure at one exact point of the end of a migration
(COMPLETE → PREPARED → COMMIT → RESUMED) and checks who runs the guest: the
source guest (a real incrementer process), or the destination's (its resume
callback ran).  Never both; after the commit point without an answer, the
documented OUTCOME_UNKNOWN state with the source guest paused.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any

import pytest

from clients.guest import SyntheticGuest, check_incrementer
from engine import DestinationMigration, MigrationConfig, SourceMigration
from engine import channel as channel_module
from engine import destination as destination_module
from engine.channel import ControlOp
from engine.errors import (
    CancelledError,
    ConfigError,
    GuestControlError,
    MigrationError,
    OutcomeUnknownError,
)
from engine.shm import GuestRAM
from engine.sync import MigrationState, ProgressWatch
from engine.wire import message as wire
from tests.harness import SECRET, MiB, address, after_sending, guest_ram, same_memory

CONFIG = MigrationConfig(channels=2, packet_pages=64, stall_timeout_s=5.0)


class DestinationGuest:
    """The destination VMM's guest: it runs once resume_guest is called."""

    def __init__(self) -> None:
        self.running = False

    def resume(self) -> None:
        self.running = True


class Run:
    """A source (with a running incrementer guest) and a destination that creates its RAM."""

    def __init__(self, src: GuestRAM, guest: SyntheticGuest, config: MigrationConfig = CONFIG,
                 **destination: Any) -> None:
        self.dest_guest = DestinationGuest()
        self.destination = DestinationMigration(address("tcp"), secret=SECRET, config=config,
                                                resume_guest=self.dest_guest.resume, **destination)
        self.source = SourceMigration(src, self.destination.address, secret=SECRET, config=config,
                                      pause_guest=guest.pause, resume_guest=guest.resume)
        self.guest = guest
        self.src = src

    def run(self) -> tuple[Any, Any]:
        """Both outcomes: a result or the error, source first."""
        self.destination.start()
        outcomes: list[Any] = []
        try:
            outcomes.append(self.source.run())
        except MigrationError as exc:
            outcomes.append(exc)
        try:
            outcomes.append(self.destination.wait(15))
        except MigrationError as exc:
            outcomes.append(exc)
        return outcomes[0], outcomes[1]

    def assert_source_runs_alone(self) -> None:
        assert not self.dest_guest.running and not self.destination.committed
        assert self.destination.ram is None  # the RAM it created is gone
        assert not self.guest.paused
        self.guest.pause()  # it answers: it ran; frozen, its memory must be intact
        assert check_incrementer(self.src) == ""

    def assert_destination_runs_alone(self) -> None:
        assert self.dest_guest.running and self.destination.committed
        assert self.guest.paused
        ram = self.destination.ram
        assert ram is not None
        try:
            assert same_memory(self.src, ram)  # the source guest never ran again
        finally:
            ram.close()
            ram.unlink()


@pytest.fixture
def src():
    with guest_ram(8 * MiB) as ram:
        yield ram


@pytest.fixture
def guest(src):
    with SyntheticGuest(src, "incrementer", dirty_rate=0) as g:
        yield g


def test_a_normal_migration_passes_through_the_commit(src, guest) -> None:
    run = Run(src, guest)
    source, destination = run.run()
    assert source.status == "completed" and destination.status == "completed"
    assert source.extra["destination_running"] is True and destination.extra["running"] is True
    assert run.source.state is MigrationState.COMPLETED and run.source.committed
    assert run.source.cancel() is False  # after the commit there is nothing to cancel
    run.assert_destination_runs_alone()


def test_resumed_lost_after_the_destination_resumed(src, guest) -> None:
    """The destination runs the guest and keeps its RAM; the source cannot know: it
    stays paused in OUTCOME_UNKNOWN until settle()."""
    run = Run(src, guest)

    def resume_then_lose_the_main_channel() -> None:
        run.dest_guest.resume()
        assert run.destination._conn is not None
        run.destination._conn.sock.shutdown(socket.SHUT_RDWR)  # RESUMED cannot go out

    run.destination._resume_guest = resume_then_lose_the_main_channel
    source, destination = run.run()
    assert destination.status == "completed" and destination.extra["running"] is True
    assert isinstance(source, OutcomeUnknownError) and str(run.source.migration_id) in str(source)
    assert run.source.state is MigrationState.OUTCOME_UNKNOWN and run.guest.paused
    run.source.settle(destination_runs=True)  # the VMM asked the destination: it committed
    assert run.source.state is MigrationState.COMPLETED
    with pytest.raises(ConfigError):
        run.source.settle(destination_runs=False)  # settled once, for good
    run.assert_destination_runs_alone()


def test_an_exception_after_commit_left_the_socket_is_an_unknown_outcome(src, guest) -> None:
    """COMMIT's bytes are out, then the send raises anyway (a signal handler's
    exception, say): the source must count itself committed, never resume."""
    run = Run(src, guest)
    send = run.source._send_message

    def commit_then_raise(message: wire.Message) -> None:
        send(message)
        if isinstance(message, wire.Commit):
            raise RuntimeError("a signal handler raised during the send")

    run.source._send_message = commit_then_raise  # type: ignore[method-assign]
    source, destination = run.run()
    assert isinstance(source, OutcomeUnknownError)
    assert destination.status == "completed" and run.destination.committed
    run.source.settle(destination_runs=True)
    run.assert_destination_runs_alone()


def test_an_unknown_outcome_settled_for_the_source_resumes_it(src, guest) -> None:
    """COMMIT is in the source's socket, but the destination never reads it and the
    answer never comes: the source waits stall_timeout_s, keeps its guest paused,
    and resumes it only when the VMM settles that the destination did not commit."""
    run = Run(src, guest, config=CONFIG.with_(stall_timeout_s=1.0))
    read_message = run.destination._read_message

    def stuck_before_commit(expected: type, deadline: float | None = None) -> Any:
        if expected is wire.Commit:
            run.destination.latch.wait(30)  # hangs until its VMM cancels it
            run.destination.latch.raise_if_failed()
        return read_message(expected, deadline)

    run.destination._read_message = stuck_before_commit  # type: ignore[method-assign]
    run.destination.start()
    with pytest.raises(OutcomeUnknownError):
        run.source.run()
    assert run.guest.paused and run.source.state is MigrationState.OUTCOME_UNKNOWN
    # The source's VMM asks the destination, which may still be running: cancel()
    # answers atomically (True: it had not committed, and now never will).
    assert run.destination.cancel("the destination VMM gives up") is True
    with pytest.raises(CancelledError):
        run.destination.wait(15)
    assert not run.destination.committed
    run.source.settle(destination_runs=False)
    assert run.source.state is MigrationState.FAILED
    run.assert_source_runs_alone()


@pytest.mark.parametrize("when", [wire.Complete, wire.Digests])
def test_a_source_cancel_racing_complete_leaves_the_source_running(src, guest, when) -> None:
    run = Run(src, guest, config=CONFIG.with_(verify=True))
    after_sending(run.source, when, lambda: run.source.cancel("cancel racing COMPLETE"))
    source, destination = run.run()
    assert isinstance(source, CancelledError)
    assert isinstance(destination, CancelledError)  # the ABORT kept its class
    run.assert_source_runs_alone()


def test_a_source_cancel_after_commit_is_refused(src, guest) -> None:
    run = Run(src, guest)
    refused: list[bool] = []
    # From another thread, as a VMM would; it lands once COMMIT is in the socket.
    canceller = threading.Thread(target=lambda: refused.append(run.source.cancel("too late")))
    after_sending(run.source, wire.Commit, canceller.start)
    source, destination = run.run()
    canceller.join(10)
    assert refused == [False]
    assert source.status == "completed" and destination.status == "completed"
    run.assert_destination_runs_alone()


def test_a_destination_cancel_after_prepared_aborts_and_the_source_resumes(src, guest) -> None:
    """The destination is cancelled between PREPARED and COMMIT: it answers with
    ABORT, which means "not committed", so the source resumes even if it had
    already sent COMMIT."""
    run = Run(src, guest)
    after_sending(run.destination, wire.Prepared, lambda: run.destination.cancel("VMM said stop"))
    source, destination = run.run()
    assert isinstance(destination, CancelledError)
    assert isinstance(source, CancelledError) and "VMM said stop" in str(source)
    run.assert_source_runs_alone()


def test_a_destination_abort_after_commit_was_sent_leaves_the_source_uncommitted(src, guest) -> None:
    """COMMIT has left the source, but the destination is cancelled before it reads
    it: its ABORT says it never committed, so the source resumes, and `committed`
    (the API's "the destination owns the VM") must say False again."""
    run = Run(src, guest)

    def cancel_once_commit_left() -> None:  # the destination's thread: COMMIT stays unread
        deadline = time.monotonic() + 10
        while not run.source.committed and time.monotonic() < deadline:
            time.sleep(0.001)
        assert run.destination.cancel("VMM said stop after COMMIT left")

    after_sending(run.destination, wire.Prepared, cancel_once_commit_left)
    source, destination = run.run()
    assert isinstance(destination, CancelledError)
    assert isinstance(source, CancelledError) and "after COMMIT left" in str(source)
    assert not run.source.committed
    assert run.source.state is MigrationState.CANCELLED  # as a cancel before the commit ends
    run.assert_source_runs_alone()


def test_a_destination_cancel_racing_complete_leaves_the_source_running(src, guest) -> None:
    """The destination is cancelled the moment COMPLETE arrives, before it has
    checked END on every channel: it never says PREPARED, the source resumes."""
    run = Run(src, guest)
    complete = run.destination._complete

    def cancelled_on_arrival(*args: Any) -> Any:
        run.destination.cancel("cancel racing COMPLETE")
        return complete(*args)

    run.destination._complete = cancelled_on_arrival  # type: ignore[method-assign]
    source, destination = run.run()
    assert isinstance(destination, CancelledError)
    assert isinstance(source, CancelledError) and "cancel racing COMPLETE" in str(source)
    run.assert_source_runs_alone()


def test_a_return_path_reader_that_raises_anything_fails_the_migration(src, guest) -> None:
    """Not only MigrationError: a bug in the reader is the migration's error, at once."""
    run = Run(src, guest)
    decoder = run.source._main.decoder
    next_message = decoder.next_message

    def broken_after_complete() -> object:
        if run.source.state is MigrationState.SWITCHOVER:
            raise RuntimeError("a bug in the return path")
        return next_message()

    decoder.next_message = broken_after_complete  # type: ignore[method-assign]
    source, destination = run.run()
    assert isinstance(source, MigrationError) and "RuntimeError: a bug in the return path" in str(source)
    assert isinstance(destination, MigrationError)
    run.assert_source_runs_alone()


def test_a_destination_held_paused_commits_without_running(src, guest) -> None:
    run = Run(src, guest, autostart=False)
    source, destination = run.run()
    assert source.status == "completed" and source.extra["destination_running"] is False
    assert destination.extra["running"] is False and not run.dest_guest.running
    assert run.destination.committed
    run.dest_guest.resume()  # the VMM starts it when it chooses (QEMU's -S, then cont)
    run.assert_destination_runs_alone()


def test_a_destination_resume_that_raises_keeps_the_ram_and_says_so(src, guest) -> None:
    run = Run(src, guest)

    def broken_resume() -> None:
        raise OSError("vCPU would not start")

    run.destination._resume_guest = broken_resume
    source, destination = run.run()
    assert isinstance(destination, GuestControlError) and "NOT running" in str(destination)
    assert source.status == "completed" and source.extra["destination_running"] is False
    assert "resume_guest raised OSError: vCPU would not start" in source.extra["destination_error"]
    assert run.destination.state is MigrationState.FAILED and run.destination.committed
    run.dest_guest.resume()  # the destination VMM retries: the guest, RAM and devices are there
    run.assert_destination_runs_alone()


def test_a_source_resume_that_raises_is_reported(src, guest) -> None:
    run = Run(src, guest)
    resume = guest.resume

    def resume_fails() -> None:
        resume()  # it does run again; the VMM's callback then reports a problem
        raise OSError("could not re-arm the vCPU timers")

    run.source._resume_guest = resume_fails
    after_sending(run.source, wire.Complete, lambda: run.source.cancel("cancelled"))
    source, _ = run.run()
    assert isinstance(source, GuestControlError)
    assert "cancelled" in str(source) and "NOT running" in str(source)
    assert isinstance(source.__cause__, OSError)
    run.assert_source_runs_alone()


def test_a_pause_that_raises_leaves_the_guest_running(src, guest) -> None:
    run = Run(src, guest)

    def pause_fails() -> None:
        raise OSError("vCPU 0 did not stop")

    run.source._pause_guest = pause_fails
    source, destination = run.run()
    assert isinstance(source, GuestControlError) and "vCPU 0 did not stop" in str(source)
    # Where the source's guest is says nothing of the destination's: it arrives plain.
    assert type(destination) is MigrationError and "vCPU 0 did not stop" in str(destination)
    run.assert_source_runs_alone()


def _die_after_last_word(sock: socket.socket, op: ControlOp, a: int = 0, b: int = 0, kind: int = 0) -> None:
    """In a (forked) channel process: say the last word, then die before returning."""
    _post(sock, op, a, b, kind)
    if op in (ControlOp.FINISHED, ControlOp.ENDED):
        os.kill(os.getpid(), signal.SIGKILL)


_post = channel_module.post


def test_channels_that_die_after_their_last_packet_do_not_fail_a_complete_migration(
        src, guest, monkeypatch) -> None:
    """Every channel, on both sides, is SIGKILLed right after it said END (its work is
    on the wire / in RAM): the migration completes, and the deaths are reported."""
    monkeypatch.setattr(channel_module, "post", _die_after_last_word)
    run = Run(src, guest, config=CONFIG.with_(start_method="fork"))
    source, destination = run.run()
    assert source.status == "completed", source
    assert destination.status == "completed", destination
    assert len(source.extra["late_channel_failures"]) == CONFIG.channels
    assert len(destination.extra["late_channel_failures"]) == CONFIG.channels
    assert all("exit code -9" in failure or "SIGKILL" in failure or "-9" in failure
               for failure in source.extra["late_channel_failures"])
    run.assert_destination_runs_alone()


class RecordedWatch(ProgressWatch):
    """The destination's progress watch, its waits and its verdict recorded."""

    made: list[RecordedWatch] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waits: list[float] = []
        self.stalled = False
        RecordedWatch.made.append(self)

    def wait_s(self, now: float) -> float:
        self.waits.append(super().wait_s(now))
        return self.waits[-1]

    def look(self, value: int, now: float, moved: bool = False) -> bool:
        self.stalled = super().look(value, now, moved)
        return self.stalled


def test_a_source_that_goes_silent_after_setup_is_noticed(src, guest, monkeypatch) -> None:
    """A source that stops sending anything (no page, no message) during precopy,
    its connections still open: the destination gives up after stall_timeout_s,
    told by its progress watch (waits of a tick at most: a stall is told within a
    tick of the limit, engine.sync.ProgressWatch)."""
    config = CONFIG.with_(stall_timeout_s=1.0, downtime_limit_ms=0, max_rounds=10_000)
    RecordedWatch.made.clear()
    monkeypatch.setattr(destination_module, "ProgressWatch", RecordedWatch)
    run = Run(src, guest, config=config)
    stopped: list[int] = []

    def go_silent() -> None:
        if stopped:
            return
        stopped.extend(run.source.channel_pids())
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)  # alive, connected, silent
        run.source.latch.wait(30)  # and the source's own thread says nothing more

    after_sending(run.source, wire.SyncMarker, go_silent)
    run.destination.start()
    run.source.start()
    try:
        with pytest.raises(MigrationError, match="nothing came from the source"):
            run.destination.wait(30)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        run.source.cancel("test over")
        with pytest.raises(MigrationError):
            run.source.wait(15)
    assert run.destination.ram is None
    assert not guest.paused
    [watch] = RecordedWatch.made
    assert watch.stalled and watch.waits and max(watch.waits) <= watch.tick
