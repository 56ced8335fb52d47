"""Devices whose state migrates: the contract a VMM implements.

A device's state is an ordered stream of opaque chunks plus a small *config*
part that loads last (think of a NIC VF or a vGPU: bulk state first, then the
configuration that makes it live).  Saving and loading may be slow — they may
talk to firmware — so the engine runs them on worker-pool threads, one job per
device, all devices at once: the devices' share of the downtime is the slowest
device, not the sum.  A device never starts a thread of its own.

Register the same devices, by ``(idstr, instance_id)``, on both sides; a device
present on one side only is refused before any page moves.

A device may also have a ``cancel()`` method (optional, not part of the
protocol below so that existing devices keep working): when an operation fails
or is cancelled while the device's save or load may be running, teardown calls
it from another thread, and it should make ``save_state``/``load_state`` return
or raise soon.  Teardown waits ``cancel_grace_s`` at most for the device's jobs;
a job still inside the device after that is abandoned, never joined, and its
late chunks are dropped.

A device with gigabytes of state may also be *iterative* (:class:`IterativeDevice`,
optional): while the guest runs, each precopy round asks it for some of its live
state (:meth:`~IterativeDevice.save_live`) and how much it still has pending
(:meth:`~IterativeDevice.live_pending`, which counts toward convergence like
dirty RAM); at switchover ``save_state`` hands out only what remains.  The
destination sees one ordered stream either way and loads live chunks as they
arrive.  Both sides must have the device iterative (CONFIG says so; a mismatch
is refused before any page moves)::

    precopy round k   save_live(max_bytes) ─▶ chunks i..j (LIVE)  ─▶ load_state … (destination, now)
    switchover        save_state()         ─▶ chunks j+1..n       ─▶ load_state …
                      save_config()        ─▶ END chunk           ─▶ load_config
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeGuard, TypeVar, runtime_checkable

from engine.errors import (
    ConfigError,
    DeviceStateError,
    MigrationError,
    RemoteProtocolError,
    TransportBrokenError,
)
from engine.wire.packet import devices_problem

if TYPE_CHECKING:
    from engine.slots import SendSlot
    from engine.sync import FailureLatch
    from engine.wire.message import DeviceDone, DeviceLoaded, DevicesLoaded


@runtime_checkable
class MigratableDevice(Protocol):
    """What the engine needs from a device (both sides)."""

    idstr: str          # e.g. "0000:00:05.0/vfio"; 1..255 UTF-8 bytes
    instance_id: int    # distinguishes devices of one idstr

    def save_state(self) -> Iterable[bytes]:
        """Source, guest paused: the state as ordered chunks (may be slow).

        Chunks longer than 1 MiB are split on the way; the destination gets the
        same bytes in the same order, not necessarily the same boundaries.
        """
        ...

    def save_config(self) -> bytes:
        """Source, after the last chunk: the config part (may be empty)."""
        ...

    def load_state(self, chunk: bytes) -> None:
        """Destination: the next chunk, in order (may be slow)."""
        ...

    def load_config(self, config: bytes) -> None:
        """Destination: the config part, after every chunk was loaded."""
        ...


@runtime_checkable
class IterativeDevice(MigratableDevice, Protocol):
    """A device that hands out its state during precopy, round after round
    (QEMU's VFIO precopy).  All four members are needed (it is recognised by
    them).  ``live_pending`` is called from the operation's thread, ``save_live``
    from a pool job, never both at once.  A device that is done hands out
    nothing more, reports (0, 0), and its ``save_state`` yields nothing."""

    #: True: the source does not pause the guest before the destination has
    #: loaded this device's initial state (QEMU's ``switchover-ack``).
    switchover_ack: bool

    def live_begin(self) -> None:
        """Source, as a save starts (a migration's setup, a snapshot's): from here
        every byte is initial state again, whatever an earlier one handed out."""
        ...

    def live_pending(self) -> tuple[int, int]:
        """Source, guest running: (bytes of the initial state not handed out yet,
        bytes handed out that changed since).  Cheap: called every round."""
        ...

    def save_live(self, max_bytes: int) -> Iterable[bytes]:
        """Source, guest running, once per precopy round: ordered chunks of live
        state, about `max_bytes` at most (the initial state first).  What it
        hands out here, ``save_state`` need not hand out again unless it changed."""
        ...


def is_iterative(device: MigratableDevice) -> TypeGuard[IterativeDevice]:
    return isinstance(device, IterativeDevice)


def wants_switchover_ack(device: MigratableDevice) -> bool:
    return is_iterative(device) and bool(getattr(device, "switchover_ack", False))


@dataclass(frozen=True)
class DeviceReport:
    """What happened to one device in a migration (each side fills its part)."""

    idstr: str
    instance_id: int
    bytes: int
    chunks: int
    save_ms: float | None = None  # source: time spent in save_live/save_state/save_config
    load_ms: float | None = None  # destination: time spent in load_state/load_config
    # (None: the other side's figure, unknown here)
    verified: bool | None = None  # destination: loaded stream hashes as the saved one
    reordered: int = 0            # destination: chunks that overtook an earlier one
    live_bytes: int = 0           # bytes handed out (source) or loaded (destination) in precopy


def device_key(device: MigratableDevice) -> tuple[str, int]:
    return (device.idstr, device.instance_id)


T = TypeVar("T")


def call_device(device: MigratableDevice, what: str, call: Callable[..., T], *args: object) -> T:
    """`call(*args)`, a call into `device` (its method `what`); any error it raises but a
    MigrationError becomes a DeviceStateError naming the device."""
    try:
        return call(*args)
    except MigrationError:
        raise
    except Exception as exc:
        raise DeviceStateError(f"device {device.idstr!r}/{device.instance_id}: {what}() raised "
                               f"{type(exc).__name__}: {exc}") from exc


def _pending(device: IterativeDevice) -> tuple[int, int]:
    """The device's live_pending(), which must be two byte counts."""
    pending = device.live_pending()
    if not (isinstance(pending, tuple) and len(pending) == 2
            and all(type(n) is int and n >= 0 for n in pending)):
        raise TypeError(f"it must return two byte counts (int >= 0), not {pending!r}")
    return pending


def checked_devices(devices: Iterable[MigratableDevice]) -> list[MigratableDevice]:
    """`devices` as a list, each a :class:`MigratableDevice` with a str idstr and an
    int instance_id; else ConfigError naming the first that is not."""
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Iterable):
        raise ConfigError(f"devices must be a sequence of devices, not {devices!r}")
    listed = list(devices)
    for device in listed:
        if not isinstance(device, MigratableDevice):
            raise ConfigError(f"{device!r} is not a device: a device has idstr, instance_id, "
                              f"save_state, save_config, load_state and load_config")
        if not isinstance(device.idstr, str) or type(device.instance_id) is not int:
            raise ConfigError(f"device {device!r}: idstr must be a str and instance_id an int, got "
                              f"{device.idstr!r} and {device.instance_id!r}")
    # What the wire can name (CONFIG, each chunk's header, a snapshot's metadata):
    # refused here, before anything starts, not when the first chunk is framed.
    problem = devices_problem([(device.idstr, device.instance_id) for device in listed], min_idstr=1)
    if problem is not None:
        raise ConfigError(problem)
    return listed


def loading_devices(devices: Sequence[MigratableDevice], device_load: str
                    ) -> dict[tuple[str, int], MigratableDevice]:
    """The devices a loading side was given, by key; ConfigError for a device that
    is not one, a key given twice or a device_load other than "parallel" or "serial"."""
    devices = checked_devices(devices)
    keyed = {device_key(device): device for device in devices}
    if len(keyed) != len(devices):
        raise ConfigError("two devices share an (idstr, instance_id)")
    if device_load not in ("parallel", "serial"):
        raise ConfigError("device_load must be 'parallel' or 'serial'")
    return keyed


class LiveDevices:
    """Source: the iterative devices' precopy, as the source's rounds see it.

    Per device: bytes handed out in live rounds, what the destination last said
    it loaded (DEVICES_LOADED, read on the return path's thread), what the device
    still has pending; and the switchover ack.  A device may have at most
    `window` bytes handed out and not yet loaded (the destination buffers what
    it has not loaded; its default limit is twice this)::

        allowance = window - (handed out - loaded)    (0 if nothing is pending)
        device's downtime = (pending + handed out - loaded) × load seconds per byte
    """

    def __init__(self, devices: Sequence[MigratableDevice], window: int, latch: FailureLatch) -> None:
        self.iterative = [is_iterative(device) for device in devices]
        self.asks_ack = [wants_switchover_ack(device) for device in devices]
        self.devices = list(devices)
        self.window = window
        self.latch = latch
        count = len(self.devices)
        self.sent = [0] * count
        self.initial = [0] * count          # initial-state bytes not handed out yet
        self.pending = [0] * count          # ... plus bytes that changed since handed out
        self.loaded: tuple[DeviceLoaded, ...] = ()
        self.ack_asked = False
        self.acked = False
        self._changed = threading.Condition()
        latch.on_fail(self._wake)

    @property
    def wants_ack(self) -> bool:
        return any(self.asks_ack)

    def poll_pending(self) -> int:
        """Ask every iterative device what it has pending; the bytes in all."""
        for index, device in enumerate(self.devices):
            if is_iterative(device):
                initial, dirty = call_device(device, "live_pending", _pending, device)
                self.initial[index], self.pending[index] = initial, initial + dirty
        return sum(self.pending)

    def allowances(self) -> list[int]:
        """Bytes each device may hand out this round (as of the last :meth:`poll_pending`)."""
        with self._changed:
            loaded = [entry.size for entry in self.loaded] or [0] * len(self.devices)
        return [max(0, self.window - (sent - done)) if pending else 0
                for sent, done, pending in zip(self.sent, loaded, self.pending)]

    def handed_out(self, sent: Sequence[int]) -> None:
        self.sent = [before + more for before, more in zip(self.sent, sent)]

    def blocked(self) -> bool:
        """A device has state pending (as last polled) but its window is full: wait for loading."""
        return any(pending and allowance <= 0 for pending, allowance
                   in zip(self.pending, self.allowances()))

    def ask_ack_now(self) -> bool:
        """True once (the round to send LIVE_ROUND ACK_WANTED in): every device that
        asks for the switchover ack has handed out its initial state."""
        if self.ack_asked or not self.wants_ack:
            return False
        if any(ask and initial for ask, initial in zip(self.asks_ack, self.initial)):
            return False
        self.ack_asked = True
        return True

    def remaining(self) -> tuple[int, float]:
        """Bytes still to move at switchover (pending, none of it sent yet), and the
        seconds the slowest device would take to load what it has not loaded
        (pending and in flight), at its load rate measured on the destination."""
        with self._changed:
            loaded = list(self.loaded)
        load_s = 0.0
        for index, entry in enumerate(loaded):
            if not self.iterative[index] or not entry.size:
                continue
            left = self.pending[index] + self.sent[index] - entry.size
            load_s = max(load_s, left * entry.load_us / 1e6 / entry.size)
        return sum(self.pending), load_s

    def on_loaded(self, message: DevicesLoaded) -> None:
        """DEVICES_LOADED from the destination (return path thread)."""
        if len(message.devices) != len(self.devices):
            raise RemoteProtocolError(f"DEVICES_LOADED lists {len(message.devices)} devices, "
                                      f"CONFIG {len(self.devices)}")
        with self._changed:
            if message.switchover_ack and not self.ack_asked:
                raise RemoteProtocolError("a SWITCHOVER_ACK nobody asked for")
            self.loaded = message.devices
            self.acked = self.acked or message.switchover_ack
            self._changed.notify_all()

    def wait_loaded(self, chunks: Sequence[int], timeout: float) -> None:
        """Wait until the destination loaded `chunks` per device.  Raises the latch's
        error, or TransportBrokenError after `timeout` seconds."""
        self._wait(lambda: bool(self.loaded) and all(
            entry.chunks >= count for entry, count in zip(self.loaded, chunks)),
            timeout, "no DEVICES_LOADED for the last live round")

    def wait_ack(self, timeout: float, deadline: float | None = None) -> bool:
        """Wait `timeout` seconds at most for the switchover ack: True once it came.
        TransportBrokenError once `deadline` (monotonic) has passed without it."""
        if self._wait(lambda: self.acked, timeout):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            raise TransportBrokenError("the destination sent no SWITCHOVER_ACK in time: a "
                                       "device's initial state did not load")
        return False

    def _wait(self, done: Callable[[], bool], timeout: float, what: str | None = None) -> bool:
        """Until `done()`: True.  After `timeout` seconds without it: False, or, with
        `what` (the message awaited), TransportBrokenError ("the destination sent no
        `what` within ...").  The latch's error as soon as the migration fails."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done():
                self.latch.raise_if_failed()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if what is None:
                        return False
                    raise TransportBrokenError(f"the destination sent {what} within {timeout:.0f} s")
                self._changed.wait(remaining)
        self.latch.raise_if_failed()
        return True

    def _wake(self) -> None:
        with self._changed:
            self._changed.notify_all()


class DeviceSaving(Protocol):
    """Source side of the device-state client (clients/device_state.py)."""

    def start(self, latch: FailureLatch) -> None:
        """Start saving every device, at once; a failure fails the latch."""
        ...

    def wait(self, latch: FailureLatch) -> tuple[list[DeviceDone], list[DeviceReport]]:
        """When every device is saved: what DEVICES_DONE says, and reports."""
        ...

    chunks: list[int]  # per device: chunks handed out so far (live rounds included)

    def start_live(self, latch: FailureLatch, allowances: Sequence[int]) -> None:
        """Guest running: one round of every iterative device with a positive
        allowance (bytes), at once, beside the RAM round."""
        ...

    def wait_live(self, latch: FailureLatch) -> list[int]:
        """When the round's live jobs are done: the bytes each device handed out."""
        ...


class DeviceLoading(Protocol):
    """Destination side of the device-state client (clients/device_state.py)."""

    def on_delivered(self, slot: SendSlot) -> None:
        """A channel delivered a chunk in `slot` (main thread): take it out before
        returning (the core then gives the slot back)."""
        ...

    def wait_loaded(self, expected: Sequence[DeviceDone], until: float | None = None,
                    watch: Callable[[], None] | None = None) -> list[DeviceReport]:
        """Once every chunk was delivered: wait for the loads (until `until`,
        monotonic; calling `watch()` between waits), check them."""
        ...

    def expect_live(self, iterative: Sequence[bool], on_progress: Callable[[], None]) -> None:
        """CONFIG's iterative flag per device; `on_progress()` after each chunk loaded."""
        ...

    def check_live_round(self, chunks: Sequence[int]) -> None:
        """A LIVE_ROUND after its round's sync: raises for a live chunk that is missing."""
        ...

    def live_caught_up(self) -> bool:
        """Every device loaded what the last LIVE_ROUND counted."""
        ...

    def live_loaded(self) -> tuple[DeviceLoaded, ...]:
        """DEVICES_LOADED's entries: per device, chunks and bytes loaded, load time."""
        ...

    def load_saved(self, streams: Sequence[Iterable[bytes]], counts: Sequence[int]) -> None:
        """Snapshot restore: start loading streams that come in order, all devices
        at once (then :meth:`wait_loaded`)."""
        ...
