"""Synchronisation: the failure latch and the state tables.

:class:`FailureLatch` is the "first error wins" flag of a migration.  It is
selectable, so every wait in the engine puts it next to the sockets it waits on
and wakes the moment anything fails or the migration is cancelled: nothing hangs
on a semaphore.

The state machines are tables (h2 style): ``{(state, event): next_state}``.
Anything not in a table is a :class:`LocalProtocolError` — a bug, never
silently tolerated.

The engine waits on its descriptors together with the latch through
:func:`wait_readable` / :func:`wait_writable` (poll, not select: select fails for
descriptors above 1023, and a VMM may hold thousands); a blocking read of one
socket is woken by an :meth:`FailureLatch.on_fail` kick instead.  The worker pool,
which knows nothing of the latch, polls its own descriptors.  Every ``poll()``
call, the pool's too, takes its timeout through :func:`engine.poll.poll_events`,
so no timeout, however long, overflows poll()'s milliseconds.

Destination barrier, per channel (docs/architecture.md, "The multifd core")::

    RUNNING ──SYNC packet read──▶ AT_BARRIER ──main saw all N──▶ RUNNING (epoch+1)
       └──────END packet read──▶ ENDED
"""

from __future__ import annotations

import os
import select
import threading
import weakref
from collections.abc import Callable, Iterable
from enum import Enum, StrEnum, auto
from typing import Any, Protocol, TypeVar

from engine.errors import CancelledError, LocalProtocolError, MigrationError
from engine.poll import poll_events


class Signal:
    """A selectable event carrying a value: set once, read many; :meth:`clear` re-arms it."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        # Raw descriptors, which the garbage collector would never close: one dropped
        # without close() (a half-built operation nobody can reach) closes them then.
        self._release = weakref.finalize(self, _close_pipe, self._read_fd, self._write_fd)
        self._release.atexit = False
        os.set_blocking(self._write_fd, False)
        self._value: object = None
        self._set = False
        self._lock = threading.Lock()

    def set(self, value: object = None) -> bool:
        """Set it to `value` unless it is set already.  True if this call set it."""
        with self._lock:
            if self._set:
                return False
            self._value, self._set = value, True
            if self._write_fd >= 0:  # closed: nobody can select on it any more
                os.write(self._write_fd, b"!")
        return True

    def is_set(self) -> bool:
        return self._set

    def clear(self) -> None:
        """Unset it (its byte drained), so that it can be set again: a wake-up that
        repeats.  A set() after this one is seen by the next wait."""
        with self._lock:
            if self._set and self._read_fd >= 0:
                os.read(self._read_fd, 1)
            self._value, self._set = None, False

    @property
    def value(self) -> object:
        return self._value

    def fileno(self) -> int:
        return self._read_fd

    def wait(self, latch: FailureLatch, timeout: float | None = None) -> object:
        """Wait for the value; raises the latch's error, or TimeoutError."""
        if not self._set and not wait_any([self], timeout, latch):
            raise TimeoutError
        return self._value

    def close(self) -> None:
        with self._lock:
            self._read_fd = self._write_fd = -1
            self._release()  # closes them the first time only


def _close_pipe(read_fd: int, write_fd: int) -> None:
    os.close(read_fd)
    os.close(write_fd)


class FailureLatch:
    """Records the first failure; its fd becomes readable once anything failed."""

    def __init__(self) -> None:
        self._signal = Signal()
        self._on_fail: list[Callable[[], None]] = []
        # Orders a registration against the failing call's snapshot of the kicks, so
        # that every kick runs exactly once, whichever comes first.
        self._kicks_lock = threading.Lock()

    def on_fail(self, kick: Callable[[], None]) -> None:
        """Call `kick` (quick, non-blocking) once the latch fails — now, in this
        thread, if it already has: it wakes waits that cannot select on the latch,
        such as a blocking socket read."""
        with self._kicks_lock:
            if not self._signal.is_set():
                self._on_fail.append(kick)
                return
        kick()

    def fail(self, error: BaseException) -> bool:
        """Record `error` unless an error is already recorded.  True if it was first."""
        if not self._signal.set(error):
            return False
        with self._kicks_lock:  # a kick registered from now on runs in on_fail
            kicks = list(self._on_fail)
        for kick in kicks:
            kick()
        return True

    def cancel(self, reason: str = "migration cancelled") -> bool:
        return self.fail(CancelledError(reason))

    @property
    def error(self) -> BaseException | None:
        error = self._signal.value
        assert error is None or isinstance(error, BaseException)
        return error

    @property
    def failed(self) -> bool:
        return self._signal.is_set()

    def raise_if_failed(self) -> None:
        """Raise the first error (a MigrationError) if anything failed."""
        error = self.error
        if error is None:
            return
        if isinstance(error, MigrationError):
            raise error
        raise MigrationError(f"{type(error).__name__}: {error}") from error

    def fileno(self) -> int:
        return self._signal.fileno()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until failed (True) or `timeout` passes (False)."""
        return bool(wait_readable([self], timeout))

    def close(self) -> None:
        self._signal.close()


def wait_any(fds: list, timeout: float | None, latch: FailureLatch) -> list:
    """:func:`wait_readable` on `fds` plus the latch; raises the latch's error if it is set."""
    latch.raise_if_failed()
    ready = wait_readable([*fds, latch], timeout)
    latch.raise_if_failed()
    return ready


class ProgressWatch:
    """A counter another process moves (bytes received by channel processes), looked
    at between waits: the peer is stalled once it has not moved for `limit` seconds.

    No wait lasts longer than `tick`, so a move is seen at most `tick` after it
    happened and a stall is told between `limit` and `limit + tick` after the last
    move (a wait of `limit`, then a fresh `limit` from the look that saw the move,
    would make that up to twice `limit`).  Times are the caller's monotonic clock.
    """

    def __init__(self, limit: float, now: float, tick: float = 1.0) -> None:
        self.limit = limit
        self.tick = tick
        self._value: int | None = None
        self._moved_at = now

    def wait_s(self, now: float) -> float:
        """How long the next wait may last."""
        return max(0.0, min(self.tick, self._moved_at + self.limit - now))

    def look(self, value: int, now: float, moved: bool = False) -> bool:
        """After a wait: the counter's `value` (`moved`: something else counts as
        progress, such as a message read).  True when the peer is stalled."""
        if moved or value != self._value:
            self._value, self._moved_at = value, now
        return now - self._moved_at >= self.limit


# ---------------------------------------------------------------------------
# Waiting on descriptors (poll(): any descriptor number, any timeout).


class Pollable(Protocol):
    def fileno(self) -> int: ...


# Unbounded: callers mix sockets, tokens and ints, whose join mypy only sees as object.
_P = TypeVar("_P")

_READABLE = select.POLLIN | select.POLLPRI
_WRITABLE = select.POLLOUT
# Reported as ready whatever was asked for, as select() does: the caller's next
# read or write then sees the EOF or the error instead of waiting forever.
_TROUBLE = select.POLLHUP | select.POLLERR | select.POLLNVAL


def wait_readable(objs: Iterable[_P], timeout: float | None) -> list[_P]:
    """Wait until any of `objs` (ints or objects with ``fileno()``) is readable.

    Returns those of `objs` that are ready, in their order; ``[]`` once
    `timeout` seconds passed (None: wait forever; negative: do not wait).
    Ready means data, EOF, an error (POLLHUP, POLLERR) or a descriptor that is
    not open (POLLNVAL): the caller's read reports which.  Any descriptor
    number works, above 1023 too.  Raises LocalProtocolError for a closed
    object or a negative descriptor: nothing can ever become ready there.
    """
    readable, _ = _wait_ready(list(objs), [], timeout)
    return readable


def wait_writable(objs: Iterable[_P], timeout: float | None, abort: Pollable | None = None) -> list[_P]:
    """Like :func:`wait_readable`, for writing (a connect in progress completes).

    Returns early, with those of `objs` that are writable (maybe none), once
    `abort` becomes readable.  Errors as for :func:`wait_readable`.
    """
    _, writable = _wait_ready([abort] if abort is not None else [], list(objs), timeout)
    return writable


def _wait_ready(
    reading: list[Any], writing: list[Any], timeout: float | None
) -> tuple[list[Any], list[Any]]:
    read_fds = [_descriptor(obj) for obj in reading]
    write_fds = [_descriptor(obj) for obj in writing]
    wanted: dict[int, int] = {}
    for fd in read_fds:
        wanted[fd] = wanted.get(fd, 0) | _READABLE
    for fd in write_fds:
        wanted[fd] = wanted.get(fd, 0) | _WRITABLE
    poller = select.poll()
    for fd, mask in wanted.items():
        poller.register(fd, mask)
    events = dict(poll_events(poller, timeout))
    return (
        [obj for obj, fd in zip(reading, read_fds) if events.get(fd, 0) & (_READABLE | _TROUBLE)],
        [obj for obj, fd in zip(writing, write_fds) if events.get(fd, 0) & (_WRITABLE | _TROUBLE)],
    )


def _descriptor(obj: object) -> int:
    """`obj`'s descriptor; LocalProtocolError if it is closed or not a valid one."""
    try:
        fd = obj if isinstance(obj, int) else obj.fileno()  # type: ignore[attr-defined]
    except (ValueError, OSError) as exc:  # a closed file object
        raise LocalProtocolError(f"cannot wait on {obj!r}: it is closed") from exc
    if not 0 <= fd <= 2**31 - 1:
        raise LocalProtocolError(f"cannot wait on {obj!r}: descriptor {fd} (closed?)")
    return fd


# ---------------------------------------------------------------------------
# Migration states, one table for both sides.


class MigrationState(StrEnum):
    """Where an operation (migration, snapshot save or restore) is: the one state
    the engine reports, in :attr:`Migration.state`, ``MigrationStats.state`` and
    ``MigrationResult.status``.  A ``str``: each member equals its lower-case
    name (``MigrationState.OUTCOME_UNKNOWN == "outcome_unknown"``), which is also
    what JSON output carries."""

    NONE = auto()
    LISTENING = auto()     # destination: waiting for the source to connect
    SETUP = auto()         # connecting, handshakes, channel processes starting
    ACTIVE = auto()        # precopy rounds, guest running on the source
    SWITCHOVER = auto()    # source paused: final round, device state, completion
    COMMITTED = auto()     # COMMIT sent (source) / received (destination): the destination owns the VM
    COMPLETED = auto()
    OUTCOME_UNKNOWN = auto()  # source: COMMIT sent, no answer; guest paused until settle()
    CANCELLING = auto()
    CANCELLED = auto()
    FAILED = auto()

    @property
    def finished(self) -> bool:
        return self in (MigrationState.COMPLETED, MigrationState.CANCELLED, MigrationState.FAILED,
                        MigrationState.OUTCOME_UNKNOWN)


class MigrationEvent(Enum):
    LISTEN = auto()
    START = auto()
    SETUP_DONE = auto()
    SWITCHOVER = auto()
    COMMIT = auto()
    COMPLETE = auto()
    CANCEL = auto()
    FAIL = auto()
    LOSE_TRACK = auto()         # source: the answer to COMMIT never came
    COMMIT_REFUSED = auto()     # source: the answer to COMMIT was ABORT (the destination never took it)
    SETTLE_DESTINATION = auto()  # the VMM says the destination runs the VM
    SETTLE_SOURCE = auto()       # the VMM says the destination never will: the source resumes
    TORN_DOWN = auto()


_S, _E = MigrationState, MigrationEvent
MIGRATION_TRANSITIONS: dict[tuple[MigrationState, MigrationEvent], MigrationState] = {
    (_S.NONE, _E.LISTEN): _S.LISTENING,
    (_S.NONE, _E.START): _S.SETUP,
    (_S.LISTENING, _E.START): _S.SETUP,
    (_S.SETUP, _E.SETUP_DONE): _S.ACTIVE,
    (_S.ACTIVE, _E.SWITCHOVER): _S.SWITCHOVER,
    (_S.SWITCHOVER, _E.COMPLETE): _S.COMPLETED,   # snapshots: no peer to commit to
    (_S.SWITCHOVER, _E.COMMIT): _S.COMMITTED,
    (_S.COMMITTED, _E.COMPLETE): _S.COMPLETED,
    (_S.COMMITTED, _E.LOSE_TRACK): _S.OUTCOME_UNKNOWN,
    (_S.COMMITTED, _E.COMMIT_REFUSED): _S.SWITCHOVER,  # as if never sent: it fails or cancels from there
    (_S.COMMITTED, _E.FAIL): _S.FAILED,            # destination: committed, but could not resume
    (_S.OUTCOME_UNKNOWN, _E.SETTLE_DESTINATION): _S.COMPLETED,
    (_S.OUTCOME_UNKNOWN, _E.SETTLE_SOURCE): _S.FAILED,
    # Cancel: from any running state; harmless once finished or already cancelling.
    (_S.NONE, _E.CANCEL): _S.CANCELLING,
    (_S.LISTENING, _E.CANCEL): _S.CANCELLING,
    (_S.SETUP, _E.CANCEL): _S.CANCELLING,
    (_S.ACTIVE, _E.CANCEL): _S.CANCELLING,
    (_S.SWITCHOVER, _E.CANCEL): _S.CANCELLING,
    (_S.CANCELLING, _E.CANCEL): _S.CANCELLING,
    (_S.CANCELLED, _E.CANCEL): _S.CANCELLED,
    (_S.FAILED, _E.CANCEL): _S.FAILED,
    (_S.COMPLETED, _E.CANCEL): _S.COMPLETED,
    (_S.COMMITTED, _E.CANCEL): _S.COMMITTED,       # too late: the destination owns the VM
    (_S.OUTCOME_UNKNOWN, _E.CANCEL): _S.OUTCOME_UNKNOWN,
    (_S.CANCELLING, _E.TORN_DOWN): _S.CANCELLED,
    # Failure: from any running state, exactly once.
    (_S.NONE, _E.FAIL): _S.FAILED,
    (_S.LISTENING, _E.FAIL): _S.FAILED,
    (_S.SETUP, _E.FAIL): _S.FAILED,
    (_S.ACTIVE, _E.FAIL): _S.FAILED,
    (_S.SWITCHOVER, _E.FAIL): _S.FAILED,
    (_S.CANCELLING, _E.FAIL): _S.CANCELLED,  # errors while cancelling are the cancel's echo
}


class StateMachine:
    """A thread-safe current state driven by :data:`MIGRATION_TRANSITIONS`."""

    def __init__(self) -> None:
        self._state = MigrationState.NONE
        self._lock = threading.Lock()

    @property
    def state(self) -> MigrationState:
        return self._state

    def fire(self, event: MigrationEvent) -> MigrationState:
        """Apply `event`.  Raises LocalProtocolError if the table has no such move."""
        with self._lock:
            try:
                self._state = MIGRATION_TRANSITIONS[(self._state, event)]
            except KeyError:
                raise LocalProtocolError(
                    f"migration event {event.name} is not allowed in state {self._state.name}"
                ) from None
            return self._state


# ---------------------------------------------------------------------------
# Destination sync barrier, per channel.


class ChannelState(Enum):
    RUNNING = auto()
    AT_BARRIER = auto()
    ENDED = auto()


class ChannelEvent(Enum):
    REACHED_SYNC = auto()
    RELEASED = auto()
    ENDED = auto()


CHANNEL_TRANSITIONS: dict[tuple[ChannelState, ChannelEvent], ChannelState] = {
    (ChannelState.RUNNING, ChannelEvent.REACHED_SYNC): ChannelState.AT_BARRIER,
    (ChannelState.AT_BARRIER, ChannelEvent.RELEASED): ChannelState.RUNNING,
    (ChannelState.RUNNING, ChannelEvent.ENDED): ChannelState.ENDED,
}


class SyncBarrier:
    """The destination's view of where each channel is in the epoch sequence.

    Pure bookkeeping (no I/O): the receiver feeds it what channels report and
    asks whether everyone reached the barrier for an epoch.
    """

    def __init__(self, n_channels: int) -> None:
        self.states = [ChannelState.RUNNING] * n_channels
        self.epochs = [1] * n_channels  # the epoch each channel is reading

    def _move(self, channel: int, event: ChannelEvent) -> None:
        try:
            self.states[channel] = CHANNEL_TRANSITIONS[(self.states[channel], event)]
        except KeyError:
            raise LocalProtocolError(
                f"channel {channel}: {event.name} not allowed in {self.states[channel].name}"
            ) from None

    def reached(self, channel: int, epoch: int) -> None:
        """Channel read SYNC(epoch) and now waits."""
        if epoch != self.epochs[channel]:
            raise LocalProtocolError(
                f"channel {channel} reached sync {epoch} while in epoch {self.epochs[channel]}"
            )
        self._move(channel, ChannelEvent.REACHED_SYNC)

    def all_at(self, epoch: int) -> bool:
        return all(
            state is ChannelState.AT_BARRIER and e == epoch
            for state, e in zip(self.states, self.epochs)
        )

    def release_all(self, epoch: int) -> None:
        if not self.all_at(epoch):
            raise LocalProtocolError(f"release of sync {epoch} before every channel reached it")
        for channel in range(len(self.states)):
            self._move(channel, ChannelEvent.RELEASED)
            self.epochs[channel] = epoch + 1

    def ended(self, channel: int, last_epoch: int) -> None:
        if last_epoch != self.epochs[channel] - 1:
            raise LocalProtocolError(
                f"channel {channel} ended after epoch {last_epoch}, "
                f"expected {self.epochs[channel] - 1}"
            )
        self._move(channel, ChannelEvent.ENDED)

    @property
    def all_ended(self) -> bool:
        return all(state is ChannelState.ENDED for state in self.states)
