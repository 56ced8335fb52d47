"""Synchronisation: the failure latch and the state tables.

:class:`FailureLatch` is the "first error wins" flag of a migration.  It is
selectable, so every wait in the engine puts it next to the sockets it waits on
and wakes the moment anything fails or the migration is cancelled: nothing hangs
on a semaphore.

The state machines are tables (h2 style): ``{(state, event): next_state}``.
Anything not in a table is a :class:`LocalProtocolError` — a bug, never
silently tolerated.

Destination barrier, per channel (DESIGN.md "Sync")::

    RUNNING ──SYNC packet read──▶ AT_BARRIER ──main saw all N──▶ RUNNING (epoch+1)
       └──────END packet read──▶ ENDED
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable
from enum import Enum, auto

from engine.errors import CancelledError, LocalProtocolError, MigrationError


class Signal:
    """A one-shot, selectable event carrying a value (set once, read many)."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
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
            if self._read_fd < 0:
                return
            os.close(self._read_fd)
            os.close(self._write_fd)
            self._read_fd = self._write_fd = -1


class FailureLatch:
    """Records the first failure; its fd becomes readable once anything failed."""

    def __init__(self) -> None:
        self._signal = Signal()
        self._on_fail: list[Callable[[], None]] = []

    def on_fail(self, kick: Callable[[], None]) -> None:
        """Call `kick` (quick, non-blocking) once the latch fails: it wakes waits
        that cannot select on the latch, such as a blocking socket read."""
        self._on_fail.append(kick)

    def fail(self, error: BaseException) -> bool:
        """Record `error` unless an error is already recorded.  True if it was first."""
        if not self._signal.set(error):
            return False
        for kick in self._on_fail:
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
        ready, _, _ = select.select([self], [], [], timeout)
        return bool(ready)

    def close(self) -> None:
        self._signal.close()


def wait_any(fds: list, timeout: float | None, latch: FailureLatch) -> list:
    """select() on `fds` plus the latch; raises the latch's error if it is set."""
    latch.raise_if_failed()
    ready, _, _ = select.select(list(fds) + [latch], [], [], timeout)
    latch.raise_if_failed()
    return ready


# ---------------------------------------------------------------------------
# Migration states, one table for both sides.


class MigrationState(Enum):
    NONE = auto()
    LISTENING = auto()     # destination: waiting for the source to connect
    SETUP = auto()         # connecting, handshakes, channel processes starting
    ACTIVE = auto()        # precopy rounds, guest running on the source
    SWITCHOVER = auto()    # source paused: final round, device state, completion
    COMPLETED = auto()
    CANCELLING = auto()
    CANCELLED = auto()
    FAILED = auto()

    @property
    def finished(self) -> bool:
        return self in (MigrationState.COMPLETED, MigrationState.CANCELLED, MigrationState.FAILED)


class MigrationEvent(Enum):
    LISTEN = auto()
    START = auto()
    SETUP_DONE = auto()
    SWITCHOVER = auto()
    COMPLETE = auto()
    CANCEL = auto()
    FAIL = auto()
    TORN_DOWN = auto()


_S, _E = MigrationState, MigrationEvent
MIGRATION_TRANSITIONS: dict[tuple[MigrationState, MigrationEvent], MigrationState] = {
    (_S.NONE, _E.LISTEN): _S.LISTENING,
    (_S.NONE, _E.START): _S.SETUP,
    (_S.LISTENING, _E.START): _S.SETUP,
    (_S.SETUP, _E.SETUP_DONE): _S.ACTIVE,
    (_S.ACTIVE, _E.SWITCHOVER): _S.SWITCHOVER,
    (_S.SWITCHOVER, _E.COMPLETE): _S.COMPLETED,
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
        self._changed = threading.Condition(self._lock)

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
            self._changed.notify_all()
            return self._state

    def wait_finished(self, timeout: float | None = None) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._state.finished, timeout)


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
