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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.slots import SendSlot
    from engine.sync import FailureLatch
    from engine.wire.message import DeviceDone


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
    (QEMU's VFIO precopy).  Save calls come from pool threads, one at a time."""

    #: True: the source does not pause the guest before the destination has
    #: loaded this device's initial state (QEMU's ``switchover-ack``).
    switchover_ack: bool

    def live_pending(self) -> tuple[int, int]:
        """Source, guest running: (bytes of the initial state not handed out yet,
        bytes handed out that changed since).  Cheap: called every round."""
        ...

    def save_live(self, max_bytes: int) -> Iterable[bytes]:
        """Source, guest running, once per precopy round: ordered chunks of live
        state, about `max_bytes` at most (the initial state first).  What it
        hands out here, ``save_state`` need not hand out again unless it changed."""
        ...


def is_iterative(device: MigratableDevice) -> bool:
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
    save_ms: float = 0.0      # source: time spent in save_state/save_config
    load_ms: float = 0.0      # destination: time spent in load_state/load_config
    verified: bool | None = None  # destination: loaded stream hashes as the saved one
    reordered: int = 0            # destination: chunks that overtook an earlier one
    live_bytes: int = 0           # bytes handed out (source) or loaded (destination) in precopy


def device_key(device: MigratableDevice) -> tuple[str, int]:
    return (device.idstr, device.instance_id)


def loading_devices(devices: Sequence[MigratableDevice], device_load: str
                    ) -> dict[tuple[str, int], MigratableDevice]:
    """The devices a loading side was given, by key; ConfigError for a key given
    twice or a device_load other than "parallel" or "serial"."""
    keyed = {device_key(device): device for device in devices}
    if len(keyed) != len(devices):
        raise ConfigError("two devices share an (idstr, instance_id)")
    if device_load not in ("parallel", "serial"):
        raise ConfigError("device_load must be 'parallel' or 'serial'")
    return keyed


class DeviceSaving(Protocol):
    """Source side of the device-state client (clients/device_state.py)."""

    def start(self, latch: FailureLatch) -> None:
        """Start saving every device, at once; a failure fails the latch."""
        ...

    def wait(self, latch: FailureLatch) -> tuple[list[DeviceDone], list[DeviceReport]]:
        """When every device is saved: what DEVICES_DONE says, and reports."""
        ...


class DeviceLoading(Protocol):
    """Destination side of the device-state client (clients/device_state.py)."""

    def on_delivered(self, slot: SendSlot) -> None:
        """A channel delivered a chunk in `slot` (main thread): take it out before
        returning (the core then gives the slot back)."""
        ...

    def wait_loaded(self, expected: Sequence[DeviceDone]) -> list[DeviceReport]:
        """Once every chunk was delivered: wait for the loads, check them."""
        ...

    def load_saved(self, streams: Sequence[Iterable[bytes]], counts: Sequence[int]) -> None:
        """Snapshot restore: start loading streams that come in order, all devices
        at once (then :meth:`wait_loaded`)."""
        ...
