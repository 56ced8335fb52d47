"""Demo devices: stand-ins for devices with large state and slow firmware.

A :class:`DemoDevice` holds ``state_size`` bytes of opaque state.  Saving takes
``save_latency_s`` and loading ``load_latency_s`` in all — the time of the whole
device, spread over its chunks the way a device's firmware would spend it —
so the benchmark and the demo can show the devices' share of the downtime.
It implements :class:`engine.device.MigratableDevice`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator

import numpy as np

from engine.errors import ConfigError

CHUNK = 256 << 10


class DemoDevice:
    """Opaque state, slow save and load.  The source's has state; the destination's fills up."""

    def __init__(self, idstr: str, instance_id: int = 0, state_size: int = 4 << 20,
                 save_latency_s: float = 0.0, load_latency_s: float = 0.0,
                 with_state: bool = True, seed: int = 0) -> None:
        if state_size < 0 or save_latency_s < 0 or load_latency_s < 0:
            raise ConfigError("device state size and latencies must not be negative")
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


def demo_devices(count: int, state_size: int, save_latency_s: float = 0.0,
                 load_latency_s: float = 0.0, with_state: bool = True) -> list[DemoDevice]:
    """`count` demo devices named dev0, dev1, …, each with different state."""
    return [DemoDevice(f"dev{i}", 0, state_size, save_latency_s, load_latency_s, with_state, seed=i)
            for i in range(count)]
