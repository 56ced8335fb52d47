"""Demo devices: stand-ins for devices with large state and slow firmware.

A :class:`DemoDevice` holds ``state_size`` bytes of opaque state.  Saving takes
``save_latency_s`` and loading ``load_latency_s`` in all — the time of the whole
device, spread over its chunks the way a device's firmware would spend it —
so the benchmark and the demo can show the devices' share of the downtime.
It implements :class:`engine.device.MigratableDevice`.

An :class:`IterativeDemoDevice` is one whose state keeps changing
while the guest runs — ``dirty_rate`` of it per second, in 256 KiB regions —
and that hands it out during precopy (:class:`engine.device.IterativeDevice`)::

    stream chunk = offset u64 (big-endian) | the region's bytes at that offset
    save_live(n)   regions never handed out (in order), then those changed since, ≤ ~n bytes
    save_state()   what is left: regions not handed out, and changed ones
    destination    writes each region at its offset (its state is allocated up front)
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from collections.abc import Iterator

import numpy as np
import xxhash

from engine.errors import ConfigError

CHUNK = 256 << 10


class DemoDevice:
    """Opaque state, slow save and load.  The source's has state; the destination's fills up."""

    def __init__(self, idstr: str, instance_id: int = 0, state_size: int = 4 << 20,
                 save_latency_s: float = 0.0, load_latency_s: float = 0.0,
                 with_state: bool = True, seed: int = 0) -> None:
        if state_size < 0 or not 0 <= save_latency_s < math.inf or not 0 <= load_latency_s < math.inf:
            raise ConfigError("device state size and latencies must be finite and not negative")
        self.idstr = idstr
        self.instance_id = instance_id
        self.state_size = state_size
        self.save_latency_s = save_latency_s
        self.load_latency_s = load_latency_s
        self.state = bytearray()
        if with_state:
            words = np.random.SFC64(seed).random_raw(-(-state_size // 8))
            self.state = bytearray(words.view(np.uint8)[:state_size].tobytes())
        self.config: dict[str, object] | None = None

    def save_state(self) -> Iterator[bytes]:
        for at in range(0, len(self.state), CHUNK):
            chunk = bytes(memoryview(self.state)[at:at + CHUNK])  # one copy, not two
            self._spend(self.save_latency_s, len(chunk))
            yield chunk

    def save_config(self) -> bytes:
        if not self.state_size:
            time.sleep(self.save_latency_s)  # no state: the whole latency is the config's
        digest = hashlib.sha256(self.state).hexdigest()
        return json.dumps({"idstr": self.idstr, "size": len(self.state), "sha256": digest}).encode()

    def load_state(self, chunk: bytes) -> None:
        self._spend(self.load_latency_s, len(chunk))
        self.state += chunk

    def load_config(self, config: bytes) -> None:
        if not self.state_size:
            time.sleep(self.load_latency_s)
        self.config = json.loads(config)
        if self.config["size"] != len(self.state):
            raise ValueError(f"config says {self.config['size']} bytes of state, loaded {len(self.state)}")

    def intact(self) -> bool:
        """The loaded state matches the digest its config part carried."""
        return self.config is not None and \
            self.config["sha256"] == hashlib.sha256(self.state).hexdigest()

    def _spend(self, total_s: float, chunk_bytes: int) -> None:
        """The device's whole latency, in proportion to this chunk."""
        if total_s and self.state_size:
            time.sleep(total_s * chunk_bytes / self.state_size)

    def __repr__(self) -> str:
        return f"<DemoDevice {self.idstr}/{self.instance_id} {len(self.state)} bytes>"


_OFFSET = struct.Struct(">Q")


class RegionDemoDevice(DemoDevice):
    """A demo device whose state changes at `dirty_rate` (a fraction of it per
    second, while it is asked: the device runs no thread), sent as regions at
    their offsets, all at switchover (the iterative one's switchover-only twin).
    Load time stays proportional to bytes: `load_latency_s` per `state_size`
    bytes loaded.  Its config part carries a digest of the regions' digests,
    each taken as the region is handed out, so saving it costs no pass over
    the whole state in the downtime."""

    def __init__(self, idstr: str, instance_id: int = 0, state_size: int = 4 << 20,
                 save_latency_s: float = 0.0, load_latency_s: float = 0.0,
                 with_state: bool = True, seed: int = 0, dirty_rate: float = 0.0) -> None:
        super().__init__(idstr, instance_id, state_size, save_latency_s, load_latency_s,
                         with_state, seed)
        if not 0 <= dirty_rate <= 1000:
            raise ConfigError("a device's dirty rate is a fraction of its state per second, 0..1000")
        if not with_state:
            self.state = bytearray(state_size)  # regions land at their offsets
        self.dirty_rate = dirty_rate
        self._rng = np.random.Generator(np.random.PCG64(seed + 1000))
        self.changed = 0                      # regions changed in all
        self.live_begin()

    def live_begin(self) -> None:
        """A new save starts: every region is initial state again, and the state
        changes again (after a failed or an earlier migration)."""
        self._digests: dict[int, bytes] = {}  # region → its digest when last handed out
        self._unsent = list(range(-(-self.state_size // CHUNK)))  # never handed out (pop() order)
        self._unsent.reverse()
        self._dirty: set[int] = set()         # handed out, changed since
        self._clock: float | None = None
        self._owed = 0.0                      # regions due to change, not changed yet
        self._frozen = False                  # save_state() ran: the guest is paused

    # -- the state changing --------------------------------------------------

    def _advance(self) -> None:
        """Change the regions that `dirty_rate` says changed since the last call."""
        now = time.perf_counter()
        if self._clock is None or not self.dirty_rate or not self.state_size or self._frozen:
            self._clock = now
            return
        self._owed += (now - self._clock) * self.dirty_rate * self.state_size / CHUNK
        self._clock = now
        regions = -(-self.state_size // CHUNK)
        unsent = set(self._unsent)
        while self._owed >= 1:
            self._owed -= 1
            region = int(self._rng.integers(regions))
            at = region * CHUNK + int(self._rng.integers(min(CHUNK, self.state_size - region * CHUNK)))
            self.state[at] = (self.state[at] + 1) & 0xFF
            self.changed += 1
            if region not in unsent:
                self._dirty.add(region)

    def save_state(self) -> Iterator[bytes]:
        """What is left, with the guest paused: from here on nothing changes."""
        self._advance()
        self._frozen = True
        regions = sorted(set(self._unsent) | self._dirty)
        self._unsent, self._dirty = [], set()
        for region in regions:
            yield self._region(region)

    def _region(self, region: int) -> bytes:
        at = region * CHUNK
        data = memoryview(self.state)[at:at + CHUNK]
        self._spend(self.save_latency_s, len(data))
        self._digests[region] = xxhash.xxh3_128_digest(data)
        return _OFFSET.pack(at) + data.tobytes()

    def save_config(self) -> bytes:
        return json.dumps({"idstr": self.idstr, "size": len(self.state),
                           "regions_sha256": self._state_digest(self._digests)}).encode()

    def intact(self) -> bool:
        """The loaded state matches the digest its config part carried."""
        if self.config is None:
            return False
        regions = -(-len(self.state) // CHUNK)
        ours = {region: xxhash.xxh3_128_digest(memoryview(self.state)[region * CHUNK:(region + 1) * CHUNK])
                for region in range(regions)}
        return self.config["regions_sha256"] == self._state_digest(ours)

    def _state_digest(self, digests: dict[int, bytes]) -> str:
        regions = -(-self.state_size // CHUNK)
        if sorted(digests) != list(range(regions)):
            raise ValueError("a region of the state was never handed out")
        return hashlib.sha256(b"".join(digests[region] for region in range(regions))).hexdigest()

    def _region_size(self, region: int) -> int:
        return min(CHUNK, self.state_size - region * CHUNK)

    # -- destination ---------------------------------------------------------

    def load_state(self, chunk: bytes) -> None:
        (at,) = _OFFSET.unpack_from(chunk)
        data = memoryview(chunk)[_OFFSET.size:]
        if at % CHUNK or at + len(data) > len(self.state):
            raise ValueError(f"region at {at} (+{len(data)}) is not inside the device's "
                             f"{len(self.state)} bytes")
        self._spend(self.load_latency_s, len(data))
        self.state[at:at + len(data)] = data

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.idstr}/{self.instance_id} {len(self.state)} bytes>"


class IterativeDemoDevice(RegionDemoDevice):
    """A :class:`RegionDemoDevice` that sends its state during precopy
    (:class:`engine.device.IterativeDevice`): the regions never handed out
    first, then those that changed since; with `switchover_ack` the source
    waits for the destination to load the initial state before it pauses."""

    def __init__(self, idstr: str, instance_id: int = 0, state_size: int = 4 << 20,
                 save_latency_s: float = 0.0, load_latency_s: float = 0.0,
                 with_state: bool = True, seed: int = 0, dirty_rate: float = 0.0,
                 switchover_ack: bool = True) -> None:
        super().__init__(idstr, instance_id, state_size, save_latency_s, load_latency_s,
                         with_state, seed, dirty_rate)
        self.switchover_ack = switchover_ack

    def live_pending(self) -> tuple[int, int]:
        self._advance()
        return (sum(map(self._region_size, self._unsent)),
                sum(map(self._region_size, self._dirty)))

    def save_live(self, max_bytes: int) -> Iterator[bytes]:
        self._advance()
        handed = 0
        while handed < max_bytes and (self._unsent or self._dirty):
            region = self._unsent.pop() if self._unsent else min(self._dirty)
            self._dirty.discard(region)
            chunk = self._region(region)
            handed += len(chunk) - _OFFSET.size
            yield chunk


def demo_devices(count: int, state_size: int, save_latency_s: float = 0.0,
                 load_latency_s: float = 0.0, with_state: bool = True,
                 iterative: bool = False, dirty_rate: float = 0.0,
                 regions: bool = False) -> list[DemoDevice]:
    """`count` demo devices named dev0, dev1, …, each with different state;
    `iterative`: :class:`IterativeDemoDevice` s whose state changes at `dirty_rate`;
    `regions`: their switchover-only twins (:class:`RegionDemoDevice`)."""
    if iterative or regions:
        kind = IterativeDemoDevice if iterative else RegionDemoDevice
        return [kind(f"dev{i}", 0, state_size, save_latency_s, load_latency_s, with_state, seed=i,
                     dirty_rate=dirty_rate)
                for i in range(count)]
    return [DemoDevice(f"dev{i}", 0, state_size, save_latency_s, load_latency_s, with_state, seed=i)
            for i in range(count)]
