"""Migration statistics: live figures while it runs, a summary when it ends.

Channel processes count into shared memory (engine/slots.py ``Counter``); the
main process adds what it wrote on the main channel and the round bookkeeping.
:class:`StatsTracker` turns those into a :class:`MigrationStats` snapshot at any
moment (thread-safe: it only reads).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.slots import Counter, SlotTable
from engine.sync import MigrationState

_WINDOW_S = 0.5  # throughput is measured over the last half second


@dataclass(frozen=True)
class MigrationStats:
    """A live snapshot.  Bytes are bytes; rates are per second."""

    state: MigrationState        # a str: "active", "switchover", ...
    round: int
    elapsed_s: float
    ram_bytes: int
    bytes_on_wire: int           # main channel + every multifd channel, headers included
    pages_sent: int              # pages whose bytes travelled
    zero_pages: int              # pages sent as zero runs, without payload
    guest_bytes_sent: int        # guest memory covered by the packets sent so far
    throughput_bytes_per_s: float
    dirty_rate_bytes_per_s: float
    remaining_bytes: int         # dirty bytes (and iterative devices' pending state) for the next round
    expected_downtime_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MigrationResult:
    """The summary of a finished migration (both sides fill what they know)."""

    status: MigrationState       # a str: "completed" (a result is only made for a success)
    role: str
    migration_id: str
    ram_bytes: int
    channels: int
    total_time_s: float
    setup_time_ms: float
    downtime_ms: float
    rounds: int                  # source: precopy rounds + the final one; destination: epochs synced
    pages_sent: int              # pages whose bytes travelled
    zero_pages: int              # pages sent as zero runs, without payload
    bytes_on_wire: int           # main channel + every channel, headers included
    throughput_bytes_per_s: float  # bytes on the wire per second of transfer
    verified: bool | None
    verify_time_ms: float = 0.0
    expected_downtime_ms: float = 0.0
    dirty_rate_bytes_per_s: float = 0.0
    rtt_ms: float = 0.0
    transfer_time_s: float = 0.0          # setup done → every page on its way (destination: in place)
    guest_bytes: int = 0                  # guest memory the packets covered (zero pages included)
    guest_throughput_bytes_per_s: float = 0.0
    compression: str = "none"
    payload_bytes: int = 0                # non-zero pages after compression
    compression_ratio: float = 1.0        # non-zero page bytes / payload bytes
    channel_memory_kib: list[dict[str, int]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        data.update(extra)
        return data


class StatsTracker:
    """Collects what the source knows and answers :class:`MigrationStats`."""

    def __init__(self, ram_bytes: int, page_size: int, started: bool = True) -> None:
        self.ram_bytes = ram_bytes
        self.page_size = page_size
        self.slots: SlotTable | None = None
        # When the operation started (its request; elapsed_s counts from it): now, for
        # a tracker made at set-up; a source's, made with the operation (`started`
        # False), is given its start when it runs.
        self.started: float | None = time.perf_counter() if started else None
        self.round = 0
        self.main_bytes = 0
        self.remaining_pages = 0      # dirty after the last round (see left_pages)
        self._round_queue: tuple[int, int] | None = None  # in a round: (its pages, guest pages sent before)
        self.device_pending_bytes = 0  # iterative devices' state not sent yet
        self.device_load_s = 0.0       # ... and the slowest one's loading time left
        self.commit_s = 0.0            # the commit's round trips after the pause (a peer's RTT)
        self.dirty_rate = 0.0
        self.bandwidth = 0.0
        self._samples: deque[tuple[float, int]] = deque()
        self._frozen: dict[str, int] | None = None
        self._ended: float | None = None  # when the operation ended (stop): its clock stops there
        self._lock = threading.Lock()

    def totals(self) -> dict[str, int]:
        """Counters over all channels, plus the main channel's bytes."""
        if self._frozen is not None:
            return dict(self._frozen)
        counts = {c.name.lower(): 0 for c in Counter}
        if self.slots is not None:
            for counter, value in zip(Counter, self.slots.totals().tolist()):
                counts[counter.name.lower()] = int(value)
        counts["wire_bytes"] += self.main_bytes
        return counts

    def traffic(self, transfer_s: float) -> dict[str, Any]:
        """The MigrationResult fields about what moved, over `transfer_s` seconds."""
        totals = self.totals()
        transfer_s = max(transfer_s, 1e-9)
        normal_bytes = totals["normal_pages"] * self.page_size
        return {
            "pages_sent": totals["normal_pages"],
            "zero_pages": totals["zero_pages"],
            "bytes_on_wire": totals["wire_bytes"],
            "throughput_bytes_per_s": totals["wire_bytes"] / transfer_s,
            "transfer_time_s": transfer_s,
            "guest_bytes": totals["guest_bytes"],
            "guest_throughput_bytes_per_s": totals["guest_bytes"] / transfer_s,
            "payload_bytes": totals["payload_bytes"],
            "compression_ratio": normal_bytes / totals["payload_bytes"] if totals["payload_bytes"] else 1.0,
        }

    def round_started(self, pages: int) -> None:
        """A precopy round sends `pages`: until :meth:`round_done`, what is left is
        what of them has not gone yet."""
        self._round_queue = (pages, self.totals()["guest_bytes"] // self.page_size)

    def round_done(self, dirty_pages: int) -> None:
        """The round ended: `dirty_pages` were written during it, left for the next."""
        self._round_queue = None
        self.remaining_pages = dirty_pages

    def left_pages(self, totals: dict[str, int] | None = None) -> int:
        """Pages left to send: of the round in flight, or dirty after the last one
        (`totals`: :meth:`totals` if the caller has them already)."""
        if self._round_queue is None:
            return self.remaining_pages
        pages, before = self._round_queue
        sent = (totals or self.totals())["guest_bytes"] // self.page_size
        return max(0, pages - (sent - before))

    def freeze(self) -> None:
        """Keep the final counters (call before the slot table goes away)."""
        self._frozen = self.totals()

    def stop(self) -> None:
        """The operation is over: its clock stops (elapsed, throughput) here."""
        if self._ended is None:
            self._ended = time.perf_counter()

    def expected_downtime_s(self, left_pages: int | None = None) -> float:
        """Dirty RAM and devices' pending state at the measured bandwidth, plus the
        devices' loading time left (as the destination measured it) and the
        commit's round trips (:attr:`commit_s`)."""
        if self.bandwidth <= 0:
            return self.device_load_s + self.commit_s
        left = self.left_pages() if left_pages is None else left_pages
        moving = left * self.page_size + self.device_pending_bytes
        return moving / self.bandwidth + self.device_load_s + self.commit_s

    def snapshot(self, state: MigrationState) -> MigrationStats:
        """The figures now, for an operation in `state`."""
        now = self._ended if self._ended is not None else time.perf_counter()
        totals = self.totals()
        wire = totals["wire_bytes"]
        with self._lock:
            if self._ended is None or not self._samples:  # over: the window stays as it ended
                self._samples.append((now, wire))
            while len(self._samples) > 2 and now - self._samples[0][0] > _WINDOW_S:
                self._samples.popleft()
            first_t, first_bytes = self._samples[0]
        throughput = (wire - first_bytes) / (now - first_t) if now > first_t else 0.0
        left = self.left_pages(totals)
        return MigrationStats(
            state=state,
            round=self.round,
            elapsed_s=now - self.started if self.started is not None else 0.0,
            ram_bytes=self.ram_bytes,
            bytes_on_wire=wire,
            pages_sent=totals["normal_pages"],
            zero_pages=totals["zero_pages"],
            guest_bytes_sent=totals["guest_bytes"],
            throughput_bytes_per_s=throughput,
            dirty_rate_bytes_per_s=self.dirty_rate,
            remaining_bytes=left * self.page_size + self.device_pending_bytes,
            expected_downtime_ms=self.expected_downtime_s(left) * 1000,
        )


def device_extra(reports: list[Any]) -> dict[str, Any]:
    """The result's per-device section (DeviceReport objects), if there are devices."""
    if not reports:
        return {}
    devices = [asdict(report) for report in reports]
    verified = [d["verified"] for d in devices]
    return {"devices": devices,
            "devices_verified": None if None in verified else all(verified)}
