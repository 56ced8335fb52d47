"""The device-state client: device streams as multifd payloads.

Source, at switchover (guest paused)::

    DeviceSaver: one save job per device on a thread pool, all at once
        device.save_state() chunks ── ≤ 1 MiB pieces ──▶ the job's own client slot
        ──▶ core.send() (the same slot swap as RAM) ──▶ any idle channel
        save_config() ──▶ the END chunk; then (chunks, bytes, SHA-256) per device

Channels: DeviceStateSender writes [header, slot payload]; DeviceStateReceiver
checks the device is in CONFIG and names a delivery slot for the main process,
which the channel's packet reader fills with the chunk straight from the socket.

Destination, main process::

    DeviceLoader: chunks arrive in any order → per device, by index → when the
        next index is there, a *drain* job for that device (at most one in flight
        per device) loads every consecutive chunk it finds, the END chunk last

Iterative devices (engine/device.py IterativeDevice), while the guest runs::

    each precopy round: DeviceSaver.start_live(allowances) … wait_live(): a job per iterative
        device with room in its window, save_live(allowance) chunks (flag LIVE),
        numbered on from the last round's; the round's SYNC follows them
    at switchover: save_state() goes on numbering after the live chunks
    destination: live chunks load as they come (the same drain jobs); each
        LIVE_ROUND (chunks so far per device) is checked against what arrived
        before the round's sync, and answered with DEVICES_LOADED once loaded

Snapshots: the same saver hands chunks to the snapshot file instead (``emit``),
and :meth:`DeviceLoader.load_saved` loads streams that come in order from it,
one pool job per device, with the same checks.

No thread per device waits for chunks, so a bounded pool cannot deadlock; with
one worker per device the devices load in parallel (``device_load="parallel"``),
with one worker in all they load one after another (``"serial"``, to compare).
Every malformed stream is a DeviceStateError: unknown device, duplicate index,
chunk after the END chunk, too much buffered ahead, missing chunk at the end,
a save or load that raises, a stream that hashes differently.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from engine.device import DeviceReport, IterativeDevice, MigratableDevice, is_iterative
from engine.errors import DeviceStateError, LocalProtocolError, MigrationError, RemoteProtocolError
from engine.multifd import MultifdSender
from engine.payload import ChannelContext, Part, register_payload
from engine.pool import WorkerPool
from engine.slots import Counter, SendSlot, SlotTable
from engine.sync import FailureLatch
from engine.wire import message as wire
from engine.wire import packet

CHUNK = packet.MAX_DEVICE_CHUNK
_EXHAUSTED = object()  # what next() gives for a save_state() iterator that ran out
_WATCH_S = 0.1  # wait_loaded(): how often a bounded or watched wait looks up


# ---------------------------------------------------------------------------
# Source, main process.


# Where a save job puts chunk `index` of device `device` (CONFIG order).
ChunkSink = Callable[[int, int, "bytes | memoryview", bool], None]


class DeviceSaver:
    """Saves every device in parallel on `pool`.

    Each job hands its chunks to the multifd core through its own client slot
    (client ``first_client + device``), or, given ``emit``, to that instead (a
    snapshot file).  ``emit`` is called from the jobs' threads at once.
    """

    def __init__(self, devices: Sequence[MigratableDevice], core: MultifdSender | None,
                 first_client: int, pool: WorkerPool, emit: ChunkSink | None = None) -> None:
        self.devices = list(devices)
        self.core = core
        self.first_client = first_client
        self.pool = pool
        self._emit = emit if emit is not None else self._send
        self._futures: list[Future] = []
        self._latch: FailureLatch | None = None
        self._finished = threading.Condition()
        # Each device's stream so far: the live rounds' chunks come first, and
        # the switchover's save goes on from there (one index space, one digest).
        count = len(self.devices)
        self.chunks = [0] * count           # chunks handed to the core so far
        self.sizes = [0] * count            # ... their bytes
        self.live_bytes = [0] * count       # ... of which in live rounds
        self._digests = [hashlib.sha256() for _ in range(count)]
        self._busy = [0.0] * count          # seconds inside the device's save calls
        self._live_jobs: dict[int, Future] = {}

    def start_live(self, latch: FailureLatch, allowances: Sequence[int]) -> None:
        """One precopy round of the iterative devices: a job per device whose
        allowance (bytes) is positive calls its save_live(allowance), all at once
        (beside the RAM round).  A failed job fails the latch."""
        self._attach(latch)
        self._live_jobs = {}
        for index, (device, allowance) in enumerate(zip(self.devices, allowances, strict=True)):
            if allowance > 0 and is_iterative(device):
                future = self.pool.submit(self._save_live, index, device, allowance)
                future.add_done_callback(lambda f: self._job_done(f, latch))
                self._live_jobs[index] = future

    def wait_live(self, latch: FailureLatch) -> list[int]:
        """Once the round's live jobs are done: the bytes each device handed out."""
        jobs, self._live_jobs = self._live_jobs, {}
        with self._finished:
            while not all(future.done() for future in jobs.values()):
                latch.raise_if_failed()
                self._finished.wait()
        latch.raise_if_failed()
        sent = [0] * len(self.devices)
        for index, future in jobs.items():
            sent[index] = future.result()
        return sent

    def _attach(self, latch: FailureLatch) -> None:
        if self._latch is None:
            self._latch = latch
            latch.on_fail(self._wake)  # a failure wakes the waits

    def _save_live(self, index: int, device: IterativeDevice, allowance: int) -> int:
        """Pool job: one round of a device's live state.  Returns its bytes."""
        sent = 0
        try:
            started = time.perf_counter()
            for chunk in device.save_live(allowance):
                self._busy[index] += time.perf_counter() - started
                for piece in _pieces(chunk, "save_live"):
                    self._send(index, self.chunks[index], piece, False, live=True)
                    self._count(index, piece)
                    sent += len(piece)
                started = time.perf_counter()
            self._busy[index] += time.perf_counter() - started
        except MigrationError:
            raise
        except Exception as exc:
            raise DeviceStateError(f"device {device.idstr!r}/{device.instance_id} failed to save "
                                   f"live state: {exc}") from exc
        self.live_bytes[index] += sent
        return sent

    def _count(self, index: int, piece: bytes | memoryview) -> None:
        self._digests[index].update(piece)
        self.sizes[index] += len(piece)
        self.chunks[index] += 1

    def start(self, latch: FailureLatch) -> None:
        """Submit one save job per device; a failed job fails the migration at once."""
        self._attach(latch)
        for index, device in enumerate(self.devices):
            future = self.pool.submit(self._save, index, device)
            future.add_done_callback(lambda f: self._job_done(f, latch))
            self._futures.append(future)

    def wait(self, latch: FailureLatch) -> tuple[list[wire.DeviceDone], list[DeviceReport]]:
        """Wait for every save job; per device, what DEVICES_DONE says and a report."""
        with self._finished:
            while not all(future.done() for future in self._futures):
                latch.raise_if_failed()
                self._finished.wait()
        latch.raise_if_failed()
        results = [future.result() for future in self._futures]
        return [done for done, _ in results], [report for _, report in results]

    def _job_done(self, future: Future, latch: FailureLatch) -> None:
        if future.exception() is not None:
            latch.fail(future.exception())  # type: ignore[arg-type]
        self._wake()

    def _wake(self) -> None:
        with self._finished:
            self._finished.notify_all()

    def _save(self, index: int, device: MigratableDevice) -> tuple[wire.DeviceDone, DeviceReport]:
        digest = self._digests[index]
        busy = 0.0
        try:
            started = time.perf_counter()
            state = iter(device.save_state())
            while True:
                chunk = next(state, _EXHAUSTED)  # (a chunk of None is no end: it fails)
                busy += time.perf_counter() - started
                if chunk is _EXHAUSTED:
                    break
                for piece in _pieces(chunk, "save_state"):
                    self._emit(index, self.chunks[index], piece, False)
                    self._count(index, piece)
                started = time.perf_counter()
            assert self._latch is not None
            self._latch.raise_if_failed()  # a cancelled save asks the device for nothing more
            started = time.perf_counter()
            config = bytes(device.save_config())
            busy += time.perf_counter() - started
        except MigrationError:
            raise
        except Exception as exc:
            raise DeviceStateError(f"device {device.idstr!r}/{device.instance_id} failed to save: "
                                   f"{exc}") from exc
        if len(config) > CHUNK:
            raise DeviceStateError(f"device {device.idstr!r}: config part over {CHUNK} bytes")
        self._emit(index, self.chunks[index], config, True)
        self._count(index, config)
        size, chunks = self.sizes[index], self.chunks[index]
        report = DeviceReport(device.idstr, device.instance_id, size, chunks,
                              save_ms=(busy + self._busy[index]) * 1000,
                              live_bytes=self.live_bytes[index])
        return wire.DeviceDone(chunks, size, digest.digest()), report

    def _send(self, device: int, index: int, data: bytes | memoryview, end: bool,
              live: bool = False) -> None:
        assert self.core is not None
        # A job whose migration failed stops here, before it touches a slot that
        # teardown is about to free (a job stuck in a device is abandoned).
        assert self._latch is not None
        self._latch.raise_if_failed()
        client = self.first_client + device
        slot = self.core.client_slot(client)
        slot.kind = packet.PacketKind.DEVICE_STATE
        slot.a0, slot.a1, slot.a2 = device, index, int(end) | (_LIVE if live else 0)
        slot.payload[:len(data)] = data
        slot.payload_length = len(data)
        self.core.send(client, len(data))


# A device slot's a2: bit 0 END, bit 1 LIVE (the packet's DeviceFlags).
_END, _LIVE = int(packet.DeviceFlags.END), int(packet.DeviceFlags.LIVE)


def _pieces(chunk: object, source: str) -> list[memoryview]:
    """`chunk`, a device's `source`() gave it, in pieces of at most CHUNK bytes."""
    try:
        view = memoryview(chunk).cast("B")  # type: ignore[arg-type]  # any buffer; else the TypeError
    except TypeError as exc:
        raise TypeError(f"{source}() yielded {type(chunk).__name__}, not bytes ({exc})") from None
    return [view[at:at + CHUNK] for at in range(0, len(view), CHUNK)]


# ---------------------------------------------------------------------------
# Channel processes.


class DeviceStateSender:
    """Slot → DEVICE_STATE header + the chunk, which lives in the slot itself."""

    holds_slot = True  # the chunk is in the slot: keep it until it is sent

    def __init__(self, ctx: ChannelContext) -> None:
        self.ctx = ctx
        self.devices = ctx.spec.devices

    def prepare(self, slot: SendSlot, sequence: int, epoch: int) -> Sequence[Part]:
        idstr, instance = self.devices[slot.a0]
        length = slot.payload_length
        header = packet.encode_device_state(sequence, idstr, instance, slot.a1, bool(slot.a2 & _END),
                                            length, live=bool(slot.a2 & _LIVE))
        self.ctx.count(Counter.DEVICE_BYTES, length)
        return [([header, slot.payload[:length]], None)]


class DeviceStateReceiver:
    """A checked DEVICE_STATE header → a known device → its chunk into a delivery slot."""

    def __init__(self, ctx: ChannelContext) -> None:
        self.ctx = ctx
        self.devices = {key: index for index, key in enumerate(ctx.spec.devices)}

    def receive(self, record: packet.Packet) -> Iterator[Sequence[memoryview]]:
        assert isinstance(record, packet.DeviceChunkHeader)
        device = self.devices.get((record.idstr, record.instance_id))
        if device is None:
            raise RemoteProtocolError(
                f"chunk {record.index} of unknown device {record.idstr!r}/{record.instance_id}"
            )
        deliveries = self.ctx.deliveries
        assert deliveries is not None
        slot = deliveries.take()
        yield [slot.payload[:record.payload_length]]
        slot.kind = packet.PacketKind.DEVICE_STATE
        slot.a0, slot.a1, slot.a2 = device, record.index, int(record.end) | (_LIVE if record.live else 0)
        slot.payload_length = record.payload_length
        self.ctx.count(Counter.DEVICE_BYTES, record.payload_length)
        deliveries.deliver(packet.PacketKind.DEVICE_STATE, slot)


# ---------------------------------------------------------------------------
# Destination, main process.


@dataclass
class _Stream:
    """One device's incoming stream."""

    device: MigratableDevice
    pending: dict[int, bytes] = field(default_factory=dict)
    buffered: int = 0
    next: int = 0               # the index load_state wants next
    end: int | None = None      # the END chunk's index, once seen
    loaded: int = 0
    reordered: int = 0          # chunks that arrived before an earlier one
    draining: bool = False
    done: bool = False
    busy: float = 0.0           # seconds inside load_state / load_config
    size: int = 0               # bytes loaded
    iterative: bool = False     # CONFIG says it sends live chunks
    last_live: int = -1         # the highest live-phase chunk index seen
    first_switchover: int | None = None  # the lowest chunk index seen sent at switchover
    live_target: int = 0        # chunks the last LIVE_ROUND counted
    live_bytes: int = 0         # bytes of live-phase chunks received
    taken: int = 0              # chunks below this index left `pending` for loading
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    lock: threading.Lock = field(default_factory=threading.Lock)
    idle: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.idle = threading.Condition(self.lock)

    @property
    def name(self) -> str:
        return f"{self.device.idstr!r}/{self.device.instance_id}"

    def loaded_one(self, data: bytes, busy: float, last: bool) -> None:
        """Chunk `next` (`data`) was loaded, taking `busy` seconds; `last`: the config."""
        with self.lock:
            self.busy += busy
            self.size += len(data)
            self.digest.update(data)
            self.loaded += 1
            self.next += 1
            self.done = last


class DeviceLoader:
    """Puts each device's chunks back in order and loads them on `pool`."""

    def __init__(self, devices: Sequence[MigratableDevice], slots: SlotTable, pool: WorkerPool,
                 latch: FailureLatch, max_buffered: int = 64 << 20) -> None:
        self.streams = [_Stream(device) for device in devices]
        self.slots = slots
        self.pool = pool
        self.latch = latch
        self.max_buffered = max_buffered
        self._on_progress: Callable[[], None] | None = None
        latch.on_fail(self._wake_all)  # a failure wakes wait_loaded()

    def expect_live(self, iterative: Sequence[bool], on_progress: Callable[[], None]) -> None:
        """Which devices CONFIG says are iterative (they may send live chunks);
        `on_progress` is called (from pool threads) after each chunk loaded."""
        for stream, flag in zip(self.streams, iterative, strict=True):
            stream.iterative = flag
        self._on_progress = on_progress

    def check_live_round(self, chunks: Sequence[int]) -> None:
        """A LIVE_ROUND, after its round's sync: every device's live chunks below
        its count must have arrived (they were sent before the SYNC every channel
        passed).  Raises DeviceStateError / RemoteProtocolError."""
        if len(chunks) != len(self.streams):
            raise RemoteProtocolError(f"LIVE_ROUND lists {len(chunks)} devices, CONFIG {len(self.streams)}")
        for stream, count in zip(self.streams, chunks):
            with stream.lock:
                if count and not stream.iterative:
                    raise DeviceStateError(f"device {stream.name}: LIVE_ROUND counts {count} live "
                                           f"chunks, but the device is not iterative")
                if count < stream.live_target:
                    raise RemoteProtocolError(f"device {stream.name}: LIVE_ROUND counts {count} "
                                              f"chunks, fewer than before ({stream.live_target})")
                missing = next((k for k in range(stream.taken, count) if k not in stream.pending), None)
                if missing is not None:
                    raise DeviceStateError(f"device {stream.name}: live-phase chunk {missing} did not "
                                           f"arrive before its round's sync")
                stream.live_target = count

    def live_caught_up(self) -> bool:
        """Every device has loaded the chunks the last LIVE_ROUND counted."""
        return all(stream.loaded >= stream.live_target for stream in self.streams)

    def live_loaded(self) -> tuple[wire.DeviceLoaded, ...]:
        """What DEVICES_LOADED says: per device, chunks and bytes loaded, load time."""
        loaded = []
        for stream in self.streams:
            with stream.lock:
                loaded.append(wire.DeviceLoaded(stream.loaded, stream.size, int(stream.busy * 1e6)))
        return tuple(loaded)

    def _wake_all(self) -> None:
        for stream in self.streams:
            with stream.lock:
                stream.idle.notify_all()

    def on_delivered(self, slot: SendSlot) -> None:
        """A channel delivered a chunk in `slot` (main thread): copy it out and file
        it (the core gives the slot back to its channel once this returns)."""
        data = bytes(slot.payload[:slot.payload_length])
        self.accept_chunk(slot.a0, slot.a1, bool(slot.a2 & _END), data, bool(slot.a2 & _LIVE))

    def accept_chunk(self, device: int, index: int, end: bool, data: bytes, live: bool = False) -> None:
        """File chunk `index` of device `device` (CONFIG order), in whatever order
        chunks come; start loading when the next one is there.  `live`: sent
        during precopy.  Raises DeviceStateError."""
        stream = self.streams[device]
        with stream.lock:
            if index < max(stream.next, stream.taken) or index in stream.pending:
                raise DeviceStateError(f"device {stream.name}: chunk {index} arrived twice")
            if stream.end is not None and index > stream.end:
                raise DeviceStateError(f"device {stream.name}: chunk {index} after its END chunk "
                                       f"{stream.end}")
            _check_phase(stream, index, live)
            if end:
                if stream.end is not None:
                    raise DeviceStateError(f"device {stream.name}: a second END chunk ({index})")
                beyond = [k for k in stream.pending if k > index]
                if beyond:
                    raise DeviceStateError(f"device {stream.name}: chunk {min(beyond)} after its "
                                           f"END chunk {index}")
                stream.end = index
            stream.pending[index] = data
            stream.buffered += len(data)
            if live:
                stream.live_bytes += len(data)
            if index > stream.next + len(stream.pending) - 1:
                stream.reordered += 1  # a later chunk overtook an earlier one
            if stream.buffered > self.max_buffered:
                raise DeviceStateError(
                    f"device {stream.name}: {stream.buffered} bytes buffered waiting for chunk "
                    f"{stream.next} (limit {self.max_buffered})"
                )
            if stream.next in stream.pending and not stream.draining:
                stream.draining = True
                self.pool.submit(self._drain, stream).add_done_callback(self._drain_done)

    def _drain(self, stream: _Stream) -> None:
        """Pool job: load every consecutive chunk there is, then stop (others may follow)."""
        while True:
            with stream.lock:
                # A failed or cancelled migration loads nothing more (a live phase
                # may have buffered many chunks: teardown must not wait for them).
                if stream.next not in stream.pending or self.latch.failed:
                    stream.draining = False
                    stream.idle.notify_all()
                    return
                index = stream.next
                data = stream.pending.pop(index)
                stream.taken = index + 1
                stream.buffered -= len(data)
                last = index == stream.end
            try:
                busy = _load_chunk(stream, index, data, last)
                stream.loaded_one(data, busy, last)
            except DeviceStateError as error:
                # Fail first, then wake wait_loaded(): woken before, it would
                # blame a missing chunk instead of this load.
                self.latch.fail(error)
                with stream.lock:
                    stream.draining = False
                    stream.idle.notify_all()
                raise
            if self._on_progress is not None:
                self._on_progress()

    def _drain_done(self, future: Future) -> None:
        error = future.exception()
        if error is not None:
            self.latch.fail(error)

    def load_saved(self, streams: Sequence[Iterable[bytes]], counts: Sequence[int]) -> None:
        """Start loading streams that come in order (a snapshot's): one pool job
        per device, all at once; stream i has counts[i] chunks, the last its
        config part.  Returns at once: :meth:`wait_loaded` waits and checks."""
        if len(streams) != len(self.streams) or len(counts) != len(self.streams):
            raise LocalProtocolError("one stream and one chunk count per device")
        for stream, chunks, count in zip(self.streams, streams, counts):
            with stream.lock:
                stream.draining = True
            self.pool.submit(self._load_all, stream, chunks, count).add_done_callback(self._drain_done)

    def _load_all(self, stream: _Stream, chunks: Iterable[bytes], count: int) -> None:
        """Pool job: load every chunk of `stream` in order, the last as its config."""
        try:
            for index, data in enumerate(chunks):
                self.latch.raise_if_failed()
                last = index == count - 1
                stream.loaded_one(data, _load_chunk(stream, index, data, last), last)
        except BaseException as error:
            self.latch.fail(error)  # before waking wait_loaded(), which would blame the stream
            raise
        finally:
            with stream.lock:
                stream.draining = False
                stream.idle.notify_all()

    def wait_loaded(self, expected: Sequence[wire.DeviceDone], until: float | None = None,
                    watch: Callable[[], None] | None = None) -> list[DeviceReport]:
        """After every chunk was delivered: wait for the loads, check them against
        DEVICES_DONE.  Raises DeviceStateError for a missing chunk or another digest,
        or for a load still running at `until` (monotonic); `watch()` runs between
        waits of at most _WATCH_S (the destination: whether its source gave up)."""
        if len(expected) != len(self.streams):
            raise RemoteProtocolError(f"DEVICES_DONE lists {len(expected)} devices, "
                                      f"CONFIG {len(self.streams)}")
        reports = []
        for stream, done in zip(self.streams, expected):
            while True:
                with stream.lock:
                    if not stream.draining or self.latch.failed:
                        break
                    stream.idle.wait(_WATCH_S if watch is not None or until is not None else None)
                if until is not None and time.monotonic() >= until:
                    raise DeviceStateError(f"device {stream.name} is still loading its state: the "
                                           f"source stops waiting for this side then too")
                if watch is not None:
                    watch()
            self.latch.raise_if_failed()
            with stream.lock:
                if not stream.done or stream.loaded != done.chunks:
                    missing = "its END chunk" if stream.end is None else f"chunk {stream.next}"
                    raise DeviceStateError(f"device {stream.name}: {missing} never arrived "
                                           f"({stream.loaded} of {done.chunks} loaded)")
                verified = stream.digest.digest() == done.digest
                if not verified:
                    raise DeviceStateError(f"device {stream.name}: the loaded state differs from "
                                           f"the saved one")
                reports.append(DeviceReport(stream.device.idstr, stream.device.instance_id,
                                            done.size, done.chunks, load_ms=stream.busy * 1000,
                                            verified=verified, reordered=stream.reordered,
                                            live_bytes=stream.live_bytes))
        return reports


def _check_phase(stream: _Stream, index: int, live: bool) -> None:
    """Live-phase chunks come before every switchover chunk, for iterative
    devices only (`stream`'s lock held).  Raises DeviceStateError."""
    if live:
        if not stream.iterative:
            raise DeviceStateError(f"device {stream.name}: live-phase chunk {index}, but the device "
                                   f"is not iterative here")
        if stream.first_switchover is not None and index > stream.first_switchover:
            raise DeviceStateError(f"device {stream.name}: live-phase chunk {index} out of order, "
                                   f"after switchover chunk {stream.first_switchover}")
        stream.last_live = max(stream.last_live, index)
        return
    if index < stream.last_live:
        raise DeviceStateError(f"device {stream.name}: switchover chunk {index} out of order, "
                               f"before live-phase chunk {stream.last_live}")
    if stream.first_switchover is None or index < stream.first_switchover:
        stream.first_switchover = index


def _load_chunk(stream: _Stream, index: int, data: bytes, last: bool) -> float:
    """Hand one chunk to its device (the config part if `last`); returns the
    seconds the device took.  Raises DeviceStateError if the device raises."""
    started = time.perf_counter()
    try:
        if last:
            stream.device.load_config(data)
        else:
            stream.device.load_state(data)
    except Exception as exc:
        raise DeviceStateError(f"device {stream.name} failed to load chunk {index}: {exc}") from exc
    return time.perf_counter() - started


register_payload(packet.PacketKind.DEVICE_STATE, sender=DeviceStateSender,
                 receiver=DeviceStateReceiver, client=DeviceSaver, sink=DeviceLoader)
