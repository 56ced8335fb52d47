"""The failure latch, signals and the state tables (engine/sync.py)."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import resource
import select
import signal as signals
import socket
import threading
import time
import types
from collections.abc import Iterator

import pytest

import engine.poll
from engine.errors import (
    CancelledError,
    ConfigError,
    LocalProtocolError,
    MigrationError,
    TransportBrokenError,
)
from engine.payload import SwitchoverSaves
from engine.poll import MAX_POLL_MS, poll_events
from engine.pool import WorkerPool
from engine.sync import (
    CHANNEL_TRANSITIONS,
    MIGRATION_TRANSITIONS,
    ChannelEvent,
    ChannelState,
    FailureLatch,
    MigrationEvent,
    MigrationState,
    ProgressWatch,
    Signal,
    StateMachine,
    SyncBarrier,
    wait_any,
    wait_readable,
    wait_writable,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

S, E = MigrationState, MigrationEvent


@pytest.fixture
def latch() -> Iterator[FailureLatch]:
    made = FailureLatch()
    yield made
    made.close()


@pytest.fixture
def signal() -> Iterator[Signal]:
    made = Signal()
    yield made
    made.close()


def _readable(obj: object, timeout: float = 0.0) -> bool:
    ready, _, _ = select.select([obj], [], [], timeout)
    return bool(ready)


def _later(delay: float, action: object) -> threading.Thread:
    """Run `action` in a thread after `delay` seconds; join the returned thread."""

    def run() -> None:
        time.sleep(delay)
        action()  # type: ignore[operator]

    thread = threading.Thread(target=run)
    thread.start()
    return thread


# ---------------------------------------------------------------------------
# FailureLatch


def test_latch_starts_unfailed(latch: FailureLatch) -> None:
    assert not latch.failed
    assert latch.error is None
    latch.raise_if_failed()  # no error: returns
    assert not _readable(latch)
    assert latch.wait(0) is False


def test_first_error_wins(latch: FailureLatch) -> None:
    first, second = ConfigError("first"), ConfigError("second")
    assert latch.fail(first) is True
    assert latch.fail(second) is False
    assert latch.cancel() is False
    assert latch.failed
    assert latch.error is first
    with pytest.raises(ConfigError) as info:
        latch.raise_if_failed()
    assert info.value is first


def test_fileno_readable_exactly_when_failed(latch: FailureLatch) -> None:
    assert not _readable(latch.fileno())
    latch.fail(MigrationError("x"))
    assert _readable(latch.fileno())
    assert _readable(latch)
    latch.fail(MigrationError("y"))
    assert _readable(latch)  # stays readable; nobody drains it
    assert latch.wait(0) is True


def test_wait_wakes_when_another_thread_fails(latch: FailureLatch) -> None:
    thread = _later(0.05, lambda: latch.fail(MigrationError("late")))
    try:
        assert latch.wait(30) is True  # True: woken by the failure (a timeout answers False)
    finally:
        thread.join()


def test_on_fail_callbacks_run_once_after_the_error_is_recorded(latch: FailureLatch) -> None:
    seen: list[tuple[str, BaseException | None, bool]] = []
    latch.on_fail(lambda: seen.append(("a", latch.error, _readable(latch))))
    latch.on_fail(lambda: seen.append(("b", latch.error, _readable(latch))))
    error = MigrationError("boom")
    latch.fail(error)
    latch.fail(MigrationError("again"))
    latch.cancel()
    assert seen == [("a", error, True), ("b", error, True)]


def test_a_kick_registered_after_the_failure_runs_at_once(latch: FailureLatch) -> None:
    error = MigrationError("boom")
    latch.fail(error)
    seen: list[BaseException | None] = []
    latch.on_fail(lambda: seen.append(latch.error))
    assert seen == [error]  # now, not never: a wait it was to wake must not block
    latch.fail(MigrationError("again"))
    assert seen == [error]  # and once


def test_a_kick_registered_while_failing_runs_exactly_once() -> None:
    def register(latch: FailureLatch, calls: list[int], i: int) -> None:
        latch.on_fail(lambda: calls.append(i))

    for _ in range(100):
        latch = FailureLatch()
        calls: list[int] = []
        threads = [threading.Thread(target=register, args=(latch, calls, i)) for i in range(8)]
        for thread in threads[:4]:
            thread.start()
        latch.fail(MigrationError("x"))
        for thread in threads[4:]:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(calls) == list(range(8))  # none lost, none run twice
        latch.close()


def test_switchover_saves_made_after_the_failure_do_not_wait_out_their_savers(
        latch: FailureLatch) -> None:
    """SwitchoverSaves is built during the switchover, maybe after the return path
    failed the latch: its wait() relies on the late on_fail kick to end."""
    release = threading.Event()

    class BusySaver:
        kind = 200

        def save(self, send: object) -> None:
            release.wait(30)  # in the VMM's own code, not calling send()

    latch.fail(TransportBrokenError("the destination went away"))
    with WorkerPool("thread", 1) as pool:
        saves = SwitchoverSaves([BusySaver()], core=None, first_client=0, pool=pool, latch=latch)
        started = time.monotonic()
        try:
            with pytest.raises(TransportBrokenError):
                saves.wait()
            assert time.monotonic() - started < 5
        finally:
            release.set()


def test_raise_if_failed_keeps_a_migration_error_as_is(latch: FailureLatch) -> None:
    error = CancelledError("stop")
    latch.fail(error)
    with pytest.raises(CancelledError) as info:
        latch.raise_if_failed()
    assert info.value is error


def test_raise_if_failed_wraps_other_errors(latch: FailureLatch) -> None:
    cause = ValueError("bad value")
    latch.fail(cause)
    with pytest.raises(MigrationError) as info:
        latch.raise_if_failed()
    assert type(info.value) is MigrationError
    assert info.value.__cause__ is cause
    assert "ValueError" in str(info.value) and "bad value" in str(info.value)
    assert latch.error is cause


def test_cancel_records_cancelled_error(latch: FailureLatch) -> None:
    assert latch.cancel("operator said so") is True
    assert isinstance(latch.error, CancelledError)
    assert "operator said so" in str(latch.error)
    with pytest.raises(CancelledError):
        latch.raise_if_failed()


def test_close_is_idempotent_and_fail_after_close_does_not_raise() -> None:
    latch = FailureLatch()
    kicked: list[bool] = []
    latch.on_fail(lambda: kicked.append(True))
    latch.close()
    latch.close()
    error = MigrationError("after close")
    assert latch.fail(error) is True
    assert latch.error is error
    assert kicked == [True]
    with pytest.raises(MigrationError):
        latch.raise_if_failed()


def test_close_releases_both_fds() -> None:
    before = set(os.listdir("/proc/self/fd"))
    latch = FailureLatch()
    assert len(set(os.listdir("/proc/self/fd")) - before) == 2
    latch.close()
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_signal_dropped_without_close_releases_its_pipe() -> None:
    before = set(os.listdir("/proc/self/fd"))
    signal = Signal()
    assert len(set(os.listdir("/proc/self/fd")) - before) == 2
    del signal  # nobody closed it (a half-built operation): its finaliser does
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_closed_signal_is_not_closed_again_when_dropped() -> None:
    signal = Signal()
    signal.close()
    reused = os.pipe()  # likely the very numbers the signal had
    try:
        del signal
        os.fstat(reused[0])
        os.fstat(reused[1])  # still open: nothing closed them by their old owner's numbers
    finally:
        os.close(reused[0])
        os.close(reused[1])


# ---------------------------------------------------------------------------
# Signal and wait_any


def test_signal_is_set_once(signal: Signal, latch: FailureLatch) -> None:
    assert not signal.is_set()
    assert signal.value is None
    assert not _readable(signal)
    signal.set("first")
    signal.set("second")  # ignored
    assert signal.is_set()
    assert signal.value == "first"
    assert _readable(signal)
    assert signal.wait(latch, timeout=0) == "first"
    assert signal.wait(latch) == "first"


def test_a_cleared_signal_is_unreadable_until_set_again(signal: Signal, latch: FailureLatch) -> None:
    signal.set("first")
    signal.clear()
    assert not signal.is_set() and signal.value is None and not _readable(signal)
    signal.clear()  # clearing an unset signal changes nothing
    assert not _readable(signal)
    signal.set("again")
    assert _readable(signal) and signal.wait(latch, timeout=0) == "again"


def test_signal_set_without_value(signal: Signal, latch: FailureLatch) -> None:
    signal.set()
    assert signal.is_set()
    assert signal.wait(latch, timeout=0) is None


def test_signal_wait_wakes_when_set_from_another_thread(signal: Signal, latch: FailureLatch) -> None:
    thread = _later(0.05, lambda: signal.set(42))
    try:
        assert signal.wait(latch, timeout=5) == 42
    finally:
        thread.join()


def test_signal_wait_raises_the_latch_error(signal: Signal, latch: FailureLatch) -> None:
    error = ConfigError("already failed")
    latch.fail(error)
    with pytest.raises(ConfigError) as info:
        signal.wait(latch, timeout=5)
    assert info.value is error


def test_signal_wait_is_woken_by_a_failing_latch(signal: Signal, latch: FailureLatch) -> None:
    thread = _later(0.05, latch.cancel)
    try:
        with pytest.raises(CancelledError):  # a timeout would raise TimeoutError
            signal.wait(latch, timeout=30)
    finally:
        thread.join()


def test_signal_wait_times_out(signal: Signal, latch: FailureLatch) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        signal.wait(latch, timeout=0.05)
    # A lower bound only (not ending early is the feature; load can only lengthen it).
    assert time.monotonic() - started >= 0.04
    assert not signal.is_set()


def test_wait_any_returns_ready_fds(latch: FailureLatch) -> None:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        assert wait_any([r1, r2], 0, latch) == []
        os.write(w2, b"x")
        assert wait_any([r1, r2], 5, latch) == [r2]
        os.write(w1, b"x")
        assert sorted(wait_any([r1, r2], 5, latch)) == sorted([r1, r2])
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def test_wait_any_with_objects(signal: Signal, latch: FailureLatch) -> None:
    signal.set(1)
    assert wait_any([signal], 0, latch) == [signal]


def test_wait_any_raises_when_latch_failed_before(latch: FailureLatch) -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"x")  # even with an fd ready, the failure wins
        error = MigrationError("failed")
        latch.fail(error)
        with pytest.raises(MigrationError) as info:
            wait_any([r], 5, latch)
        assert info.value is error
    finally:
        os.close(r)
        os.close(w)


def test_wait_any_is_woken_by_a_failure_during_the_wait(latch: FailureLatch) -> None:
    r, w = os.pipe()
    thread = _later(0.05, lambda: latch.fail(RuntimeError("worker died")))
    try:
        with pytest.raises(MigrationError) as info:
            wait_any([r], 5, latch)
        assert isinstance(info.value.__cause__, RuntimeError)
    finally:
        thread.join()
        os.close(r)
        os.close(w)


# ---------------------------------------------------------------------------
# wait_readable / wait_writable


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


def test_wait_readable_answers_the_callers_objects_in_their_order(pipe: tuple[int, int]) -> None:
    r, w = pipe
    a, b = socket.socketpair()
    with a, b:
        assert wait_readable([r, a], 0) == []
        b.send(b"x")
        os.write(w, b"x")
        assert wait_readable([a, r], 5) == [a, r]  # the socket object itself, not its fd
        assert wait_readable((x for x in [r]), 5) == [r]  # any iterable


def test_wait_readable_times_out(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    start = time.monotonic()
    assert wait_readable([r], 0.1) == []
    # A lower bound only (not ending early is the feature; load can only lengthen it).
    assert time.monotonic() - start >= 0.1
    assert wait_readable([r], -1) == []  # negative: a poll, not an error


def test_wait_readable_without_timeout_waits_until_ready(pipe: tuple[int, int]) -> None:
    r, w = pipe
    thread = _later(0.05, lambda: os.write(w, b"x"))
    try:
        assert wait_readable([r], None) == [r]
    finally:
        thread.join()


def test_eof_hangup_and_a_descriptor_not_open_are_ready(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.close(w)
    assert wait_readable([r], 5) == [r]  # EOF: the read answers b""
    a, b = socket.socketpair()
    with a:
        b.close()
        assert wait_readable([a], 5) == [a]
    os.close(r)
    assert wait_readable([r], 5) == [r]  # POLLNVAL: the caller's read raises EBADF


def test_closed_objects_and_negative_fds_raise_a_migration_error() -> None:
    sock = socket.socket()
    sock.close()  # fileno() is -1 now
    with open(os.devnull, "rb") as file:
        pass  # fileno() raises ValueError now
    signal = Signal()
    signal.close()
    for obj in (sock, file, signal, -1):
        with pytest.raises(LocalProtocolError, match="cannot wait on"):
            wait_readable([obj], 0)
    with pytest.raises(LocalProtocolError):
        wait_writable([sock], 0)


def test_a_wait_longer_than_poll_can_take_goes_round_again(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int | None] = []

    class Poller:
        def poll(self, ms: int | None) -> list[tuple[int, int]]:
            asked.append(ms)
            return [(7, select.POLLIN)] if len(asked) == 2 else []

    clock = iter([0.0, 0.0, 2**31 / 1000, 2**31 / 1000])  # 1e7 s is ~4.7 times past the clamp
    monkeypatch.setattr(engine.poll, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    assert poll_events(Poller(), 1e7) == [(7, select.POLLIN)]  # type: ignore[arg-type]
    assert asked == [MAX_POLL_MS, MAX_POLL_MS]  # clamped to a C int, then again


def test_wait_readable_of_any_length(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.write(w, b"x")
    assert wait_readable([r], 1e7) == [r]


def test_wait_retries_an_interrupted_poll_with_the_remaining_time(
    pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    r, _ = pipe
    timeouts: list[int | None] = []
    real_poll = select.poll

    class InterruptedOnce:
        def __init__(self) -> None:
            self.poller = real_poll()

        def register(self, fd: int, mask: int) -> None:
            self.poller.register(fd, mask)

        def poll(self, ms: int | None) -> list[tuple[int, int]]:
            timeouts.append(ms)
            if len(timeouts) == 1:
                time.sleep(0.1)
                raise InterruptedError
            return self.poller.poll(ms)

    monkeypatch.setattr(select, "poll", InterruptedOnce)
    assert wait_readable([r], 0.3) == []
    assert len(timeouts) == 2 and timeouts[0] == 300
    assert timeouts[1] is not None and 150 <= timeouts[1] <= 201


def test_a_signal_during_the_wait_does_not_end_it_early(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    caught = []
    previous = signals.signal(signals.SIGUSR1, lambda *_: caught.append(True))
    thread = _later(0.05, lambda: os.kill(os.getpid(), signals.SIGUSR1))
    try:
        start = time.monotonic()
        assert wait_readable([r], 0.3) == []
        assert time.monotonic() - start >= 0.3
    finally:
        thread.join()
        signals.signal(signals.SIGUSR1, previous)
    assert caught


@contextlib.contextmanager
def _fd_numbered_at_least(fd: int, lowest: int) -> Iterator[int]:
    """A duplicate of `fd` numbered `lowest` or more (RLIMIT_NOFILE raised meanwhile)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= lowest:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} allows no fd numbered {lowest}")
    if soft != resource.RLIM_INFINITY and soft <= lowest:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)
        try:
            yield high
        finally:
            os.close(high)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_descriptors_above_1023_work(pipe: tuple[int, int], latch: FailureLatch) -> None:
    r, w = pipe
    a, b = socket.socketpair()
    with a, b, _fd_numbered_at_least(r, 2000) as high_r, _fd_numbered_at_least(a.fileno(), 2000) as high_a:
        assert high_r >= 2000 and high_a >= 2000
        with pytest.raises(ValueError):
            select.select([high_r], [], [], 0)  # the bug this helper exists for
        assert wait_readable([high_r, high_a], 0) == []
        assert wait_any([high_r], 0, latch) == []
        os.write(w, b"x")
        assert wait_readable([high_r, high_a], 5) == [high_r]
        assert wait_writable([high_a], 5) == [high_a]
        latch.fail(ConfigError("stop"))
        with pytest.raises(ConfigError):
            wait_any([high_r], 5, latch)


def test_wait_writable_waits_for_room_and_stops_on_abort(pipe: tuple[int, int]) -> None:
    abort_r, abort_w = pipe
    a, b = socket.socketpair()
    with a, b:
        assert wait_writable([a], 0) == [a]
        a.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                a.send(b"x" * 65536)
        assert wait_writable([a], 0.05) == []
        os.write(abort_w, b"x")
        assert wait_writable([a], None, abort_r) == []  # no timeout: only the abort ends it
        b.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while b.recv(1 << 20):
                pass
        assert wait_writable([a], 5) == [a]


# ---------------------------------------------------------------------------
# MigrationState / StateMachine

# A legal path from NONE to each state, so every state is reached through the table.
_PATHS: dict[MigrationState, tuple[MigrationEvent, ...]] = {
    S.NONE: (),
    S.LISTENING: (E.LISTEN,),
    S.SETUP: (E.START,),
    S.ACTIVE: (E.START, E.SETUP_DONE),
    S.SWITCHOVER: (E.START, E.SETUP_DONE, E.SWITCHOVER),
    S.COMMITTED: (E.START, E.SETUP_DONE, E.SWITCHOVER, E.COMMIT),
    S.COMPLETED: (E.START, E.SETUP_DONE, E.SWITCHOVER, E.COMMIT, E.COMPLETE),
    S.OUTCOME_UNKNOWN: (E.START, E.SETUP_DONE, E.SWITCHOVER, E.COMMIT, E.LOSE_TRACK),
    S.CANCELLING: (E.START, E.CANCEL),
    S.CANCELLED: (E.START, E.CANCEL, E.TORN_DOWN),
    S.FAILED: (E.START, E.FAIL),
}


def _machine_in(state: MigrationState) -> StateMachine:
    machine = StateMachine()
    for event in _PATHS[state]:
        machine.fire(event)
    assert machine.state is state
    return machine


def test_paths_cover_every_state() -> None:
    assert set(_PATHS) == set(MigrationState)


def test_source_happy_path() -> None:
    machine = StateMachine()
    assert machine.state is S.NONE
    assert machine.fire(E.START) is S.SETUP
    assert machine.fire(E.SETUP_DONE) is S.ACTIVE
    assert machine.fire(E.SWITCHOVER) is S.SWITCHOVER
    assert not machine.state.finished
    assert machine.fire(E.COMPLETE) is S.COMPLETED
    assert machine.state is S.COMPLETED
    assert machine.state.finished


def test_destination_happy_path() -> None:
    machine = StateMachine()
    assert machine.fire(E.LISTEN) is S.LISTENING
    assert machine.fire(E.START) is S.SETUP
    assert machine.fire(E.SETUP_DONE) is S.ACTIVE
    assert machine.fire(E.SWITCHOVER) is S.SWITCHOVER
    assert machine.fire(E.COMMIT) is S.COMMITTED
    assert not machine.state.finished
    assert machine.fire(E.COMPLETE) is S.COMPLETED


def test_after_the_commit_cancel_changes_nothing_and_failure_is_not_a_rollback() -> None:
    machine = _machine_in(S.COMMITTED)
    assert machine.fire(E.CANCEL) is S.COMMITTED
    assert machine.fire(E.LOSE_TRACK) is S.OUTCOME_UNKNOWN
    assert machine.state.finished  # run() has returned; settle() moves it on
    assert machine.fire(E.CANCEL) is S.OUTCOME_UNKNOWN
    assert _machine_in(S.OUTCOME_UNKNOWN).fire(E.SETTLE_DESTINATION) is S.COMPLETED
    assert _machine_in(S.OUTCOME_UNKNOWN).fire(E.SETTLE_SOURCE) is S.FAILED
    for event in (E.FAIL, E.COMPLETE, E.START):
        with pytest.raises(LocalProtocolError):
            _machine_in(S.OUTCOME_UNKNOWN).fire(event)


def test_table_moves_match_fire() -> None:
    for (state, event), target in MIGRATION_TRANSITIONS.items():
        machine = _machine_in(state)
        assert machine.fire(event) is target, (state, event)


_MISSING = [
    (state, event)
    for state, event in itertools.product(MigrationState, MigrationEvent)
    if (state, event) not in MIGRATION_TRANSITIONS
]


@pytest.mark.parametrize(("state", "event"), _MISSING, ids=[f"{s.name}-{e.name}" for s, e in _MISSING])
def test_every_move_not_in_the_table_is_refused(state: MigrationState, event: MigrationEvent) -> None:
    machine = _machine_in(state)
    with pytest.raises(LocalProtocolError, match=f"{event.name}.*{state.name}"):
        machine.fire(event)
    assert machine.state is state  # a refused event changes nothing


def test_refused_moves_include_the_obvious_mistakes() -> None:
    missing = set(_MISSING)
    assert (S.COMPLETED, E.FAIL) in missing       # failure only once, and never after completion
    assert (S.FAILED, E.FAIL) in missing
    assert (S.ACTIVE, E.COMPLETE) in missing      # no completion without switchover
    assert (S.NONE, E.SETUP_DONE) in missing
    assert (S.SETUP, E.LISTEN) in missing
    assert (S.ACTIVE, E.COMMIT) in missing        # a commit only after switchover
    assert (S.COMMITTED, E.TORN_DOWN) in missing  # a committed migration is never rolled back
    assert (S.SWITCHOVER, E.LOSE_TRACK) in missing  # nothing to lose track of before COMMIT
    assert all(not state.finished or event is not E.START for state, event in MIGRATION_TRANSITIONS)


def test_cancel_after_completed_stays_completed() -> None:
    machine = _machine_in(S.COMPLETED)
    assert machine.fire(E.CANCEL) is S.COMPLETED
    assert machine.fire(E.CANCEL) is S.COMPLETED


def test_cancel_is_harmless_once_finished_or_cancelling() -> None:
    assert _machine_in(S.FAILED).fire(E.CANCEL) is S.FAILED
    assert _machine_in(S.CANCELLED).fire(E.CANCEL) is S.CANCELLED
    machine = _machine_in(S.ACTIVE)
    assert machine.fire(E.CANCEL) is S.CANCELLING
    assert machine.fire(E.CANCEL) is S.CANCELLING
    assert not machine.state.finished
    assert machine.fire(E.TORN_DOWN) is S.CANCELLED
    assert machine.state.finished


def test_fail_while_cancelling_ends_cancelled() -> None:
    machine = _machine_in(S.SWITCHOVER)
    machine.fire(E.CANCEL)
    assert machine.fire(E.FAIL) is S.CANCELLED
    with pytest.raises(LocalProtocolError):
        machine.fire(E.TORN_DOWN)


@pytest.mark.parametrize("state", [S.NONE, S.LISTENING, S.SETUP, S.ACTIVE, S.SWITCHOVER])
def test_fail_from_every_running_state(state: MigrationState) -> None:
    assert _machine_in(state).fire(E.FAIL) is S.FAILED


def test_finished_states() -> None:
    assert {s for s in MigrationState if s.finished} == {S.COMPLETED, S.CANCELLED, S.FAILED,
                                                         S.OUTCOME_UNKNOWN}


# ---------------------------------------------------------------------------
# SyncBarrier


def test_channel_table() -> None:
    assert CHANNEL_TRANSITIONS == {
        (ChannelState.RUNNING, ChannelEvent.REACHED_SYNC): ChannelState.AT_BARRIER,
        (ChannelState.AT_BARRIER, ChannelEvent.RELEASED): ChannelState.RUNNING,
        (ChannelState.RUNNING, ChannelEvent.ENDED): ChannelState.ENDED,
    }


def test_barrier_three_channels_over_several_epochs() -> None:
    barrier = SyncBarrier(3)
    assert barrier.states == [ChannelState.RUNNING] * 3
    assert barrier.epochs == [1, 1, 1]
    for epoch in (1, 2, 3):
        for channel in (2, 0, 1):  # any order
            assert not barrier.all_at(epoch)
            barrier.reached(channel, epoch)
            assert barrier.states[channel] is ChannelState.AT_BARRIER
        assert barrier.all_at(epoch)
        assert not barrier.all_at(epoch + 1)
        barrier.release_all(epoch)
        assert barrier.states == [ChannelState.RUNNING] * 3
        assert barrier.epochs == [epoch + 1] * 3
        assert not barrier.all_at(epoch)
    assert not barrier.all_ended
    barrier.ended(0, 3)
    barrier.ended(2, 3)
    assert barrier.states[0] is ChannelState.ENDED
    assert not barrier.all_ended
    barrier.ended(1, 3)
    assert barrier.all_ended


def test_barrier_end_before_any_sync() -> None:
    barrier = SyncBarrier(2)
    barrier.ended(0, 0)
    barrier.ended(1, 0)
    assert barrier.all_ended


def test_reaching_the_wrong_epoch_is_refused() -> None:
    barrier = SyncBarrier(3)
    with pytest.raises(LocalProtocolError):
        barrier.reached(0, 2)
    with pytest.raises(LocalProtocolError):
        barrier.reached(0, 0)
    assert barrier.states[0] is ChannelState.RUNNING


def test_release_before_all_reached_is_refused() -> None:
    barrier = SyncBarrier(3)
    barrier.reached(0, 1)
    barrier.reached(1, 1)
    with pytest.raises(LocalProtocolError):
        barrier.release_all(1)
    assert barrier.epochs == [1, 1, 1]
    assert barrier.states[:2] == [ChannelState.AT_BARRIER] * 2
    barrier.reached(2, 1)
    with pytest.raises(LocalProtocolError):
        barrier.release_all(2)  # all reached, but a different epoch
    barrier.release_all(1)
    with pytest.raises(LocalProtocolError):
        barrier.release_all(1)  # a second release
    assert barrier.epochs == [2, 2, 2]


def test_second_reached_without_release_is_refused() -> None:
    barrier = SyncBarrier(3)
    barrier.reached(1, 1)
    with pytest.raises(LocalProtocolError):
        barrier.reached(1, 1)
    assert barrier.states[1] is ChannelState.AT_BARRIER


def test_end_with_the_wrong_epoch_is_refused() -> None:
    barrier = SyncBarrier(3)
    for channel in range(3):
        barrier.reached(channel, 1)
    barrier.release_all(1)
    with pytest.raises(LocalProtocolError):
        barrier.ended(0, 2)  # epoch 2 never closed
    with pytest.raises(LocalProtocolError):
        barrier.ended(0, 0)
    assert barrier.states[0] is ChannelState.RUNNING
    barrier.ended(0, 1)
    assert barrier.states[0] is ChannelState.ENDED


def test_end_while_at_the_barrier_or_after_end_is_refused() -> None:
    barrier = SyncBarrier(2)
    barrier.reached(0, 1)
    with pytest.raises(LocalProtocolError):
        barrier.ended(0, 0)
    barrier.ended(1, 0)
    with pytest.raises(LocalProtocolError):
        barrier.ended(1, 0)
    with pytest.raises(LocalProtocolError):
        barrier.reached(1, 1)
    assert not barrier.all_ended


def test_a_stall_is_told_from_the_last_move_not_from_the_look_that_saw_it() -> None:
    # The counter moves once, at 0.5 s, then never again; the loop looks after each
    # wait the watch allows.  The stall must be told `limit` after the move, within a
    # tick: not `limit` after a look that came a whole `limit` later (20 s here).
    def counter(t: float) -> int:
        return 5 if t >= 0.5 else 0

    watch = ProgressWatch(limit=10.0, now=0.0, tick=1.0)
    now = 0.0
    assert not watch.look(counter(now), now)
    while True:
        now += watch.wait_s(now)
        if watch.look(counter(now), now):
            break
    assert 10.5 <= now <= 11.5


def test_progress_of_any_kind_restarts_the_stall_clock() -> None:
    watch = ProgressWatch(limit=3.0, now=0.0, tick=1.0)
    watch.look(7, now=0.0)
    assert not watch.look(7, now=2.5, moved=True)  # a message read counts, bytes or not
    assert not watch.look(7, now=5.0)
    assert watch.wait_s(5.0) == 0.5  # the last wait ends at the deadline, not a tick past it
    assert watch.look(7, now=5.5)
    assert watch.wait_s(6.0) == 0.0
