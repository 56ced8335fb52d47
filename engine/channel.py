"""Multifd channel processes: the code that runs in each channel's OS process.

A channel is a job on the process backend of the worker pool.  It receives its
connected data socket and its control socket (by SCM_RIGHTS), attaches guest
RAM and the slot table by name, and then moves page data between shared memory
and the socket with no copy in Python::

    source main ── JOB(slot) ──▶ send channel: slot → payload sender → IOVs ──▶ sendmsg
                ◀── IDLE(slot) ─   (before the sendmsg when the IOVs do not point
                                    into the slot, so hand-offs overlap sends)
                                 SYNC(e) → SYNC packet, SYNCED(e)
    dest main   ◀─ AT_SYNC(e) ── recv channel: PacketReader (PacketDecoder + socket)
                ── RELEASE(e) ─▶   header event → payload receiver → views → recvmsg_into RAM
                                   waits at SYNC until released

A *file* channel (snapshots) serves the same JOB/SYNC/FINISH requests, but its
send op is positional I/O on its own descriptor of the snapshot file::

    main ── JOB(slot) ──▶ file channel: slot → payload planner → (offset, IOVs, hooks)
         ◀── IDLE(slot) ─     → per piece: checksum, pwritev (save)
                                           or preadv, check the checksums (restore)
                              SYNC(e) → nothing to write: SYNCED(e) once earlier jobs are done

Control messages are 16 bytes on a SOCK_SEQPACKET socketpair: a slot index or an
epoch, never data.  What a payload *is* stays with its client: the channel looks
up the sender, receiver or file planner of each payload kind in engine/payload.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Self, TypeVar

from engine.errors import (
    CancelledError,
    ConfigError,
    LocalProtocolError,
    MigrationError,
    RemoteProtocolError,
    SnapshotError,
    TransportClosedError,
    TransportError,
)
from engine.link import LinkSecurity, secure, warm_up_records
from engine.payload import ChannelContext, FilePlanner, PayloadReceiver, payload_entry
from engine.pool import (
    CancelToken,
    ForkServer,
    JobFailure,
    WorkerPool,
    contained,
    fork_server,
    on_every_worker,
)
from engine.shm import GuestRAM, Populate, RamHandle, Segment
from engine.slots import Counter, SendSlot, SlotTable, SlotTableHandle
from engine.space import CHANNEL_MEMORY, check_memory
from engine.sync import wait_readable
from engine.tracker import start_resource_tracker
from engine.transport import Connection, PositionalFile, open_file
from engine.units import size_text
from engine.wire import packet
from engine.wire.snapshot_format import PAGE_SUM_SIZE, sum_words

# ---------------------------------------------------------------------------
# Control messages between a main process and its channel processes.


class ControlOp(IntEnum):
    # main → send channel
    JOB = 1        # a: slot index now owned by the channel
    SYNC = 2       # a: epoch to close with a SYNC packet
    FINISH = 3     # a: last completed epoch; send END and return
    # send channel → main
    IDLE = 4       # a: slot index, now empty, handed back with the swap
    SYNCED = 5     # a: epoch whose SYNC packet was written
    FINISHED = 6
    # recv channel → main
    AT_SYNC = 7    # a: epoch whose SYNC packet arrived; the channel now waits
    DELIVERED = 8  # kind: payload kind, a: slot index holding a delivered payload
    ENDED = 9      # a: epoch carried by END; the channel returns
    # main → recv channel
    RELEASE = 10   # a: epoch; continue reading
    RETURN = 11    # a: slot index the main process is done with
    # either way
    QUIT = 12
    READY = 13     # channel → main: memory attached, serving; a: its pid
    BYE = 14       # main → recv channel: your ENDED arrived; nothing more will come


T = TypeVar("T")

# op (1) | payload kind (1) | reserved (2) | a (4) | b (8)
_CONTROL = struct.Struct(">BBHIQ")
CONTROL_SIZE = _CONTROL.size


@dataclass(frozen=True, slots=True)
class ControlMessage:
    op: ControlOp
    a: int = 0
    b: int = 0
    kind: int = 0


def control_pair() -> tuple[socket.socket, socket.socket]:
    """A (main end, channel end) pair of connected SOCK_SEQPACKET sockets."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def post(sock: socket.socket, op: ControlOp, a: int = 0, b: int = 0, kind: int = 0) -> None:
    """Send one control message.  Raises TransportClosedError if the other end is gone."""
    try:
        sock.send(_CONTROL.pack(op, kind, 0, a, b))
    except OSError as exc:
        raise TransportClosedError(f"control socket closed ({exc.strerror})") from exc


def read_control(sock: socket.socket, wait: bool = True) -> ControlMessage | None:
    """Read one control message; None when the other end closed.

    With ``wait=False`` raise BlockingIOError if no message is waiting.
    """
    try:
        # One byte more than a message: a longer one would otherwise be cut silently.
        data = sock.recv(CONTROL_SIZE + 1, 0 if wait else socket.MSG_DONTWAIT)
    except BlockingIOError:
        raise
    except OSError as exc:
        raise TransportClosedError(f"control socket failed ({exc.strerror})") from exc
    if not data:
        return None
    if len(data) != CONTROL_SIZE:
        raise LocalProtocolError(f"control message of {len(data)} bytes")
    op, kind, _, a, b = _CONTROL.unpack(data)
    try:
        return ControlMessage(ControlOp(op), a, b, kind)
    except ValueError:
        raise LocalProtocolError(f"unknown control op {op}") from None


# ---------------------------------------------------------------------------
# What a channel is given, and what it reports.


@dataclass(frozen=True)
class FileTarget:
    """Where a file channel moves pages: a snapshot file's page areas."""

    path: str
    mode: str                          # "write" (save) or "read" (restore)
    pages_offsets: tuple[int, ...]     # per RAM block: file offset of its page 0
    present: str | None = None         # save: segment of the present map, one byte per page
    # segment of the checksums (None: off): a uint64 per page of all blocks, then a
    # uint64 per chunk (ChannelContext.page_sums, .chunk_sums); save: filled here,
    # restore: checked here
    sums: str | None = None
    direct_io: bool = False
    identity: tuple[int, int] | None = None  # the file the operation opened (it must be that one)


@dataclass(frozen=True)
class ChannelSpec:
    """Everything a channel process needs, by name: no page data, no objects."""

    channel_id: int
    ram: RamHandle
    slots: SlotTableHandle | None
    packet_pages: int
    payload_kinds: tuple[int, ...] = (packet.PacketKind.RAM_PAGES,)
    payload_modules: tuple[str, ...] = ()         # register the kinds not built in (payload.py)
    codec: str = "none"
    codec_level: int | None = None
    zero_page_detection: bool = False
    delivery_slots: int = 0                       # destination: slots per channel (Deliveries)
    devices: tuple[tuple[str, int], ...] = ()     # CONFIG's device table: (idstr, instance_id)
    file: FileTarget | None = None                # file channels: the snapshot file
    link: LinkSecurity | None = None              # what protects the data socket (engine/link.py)
    digest_map: str | None = None                 # tracked verification: the digest map's
    piece_pages: int = 0                          #   segment, pages per piece (engine/verify.py)
    limits: packet.PacketLimits | None = None     # receive channels: what they accept, from
                                                  #   CONFIG (wire.message.packet_limits)


@dataclass(frozen=True)
class ChannelReport:
    """What a channel process returns when it ends normally, or was told to stop."""

    channel_id: int
    packets: int
    memory: dict[str, int]  # kB from /proc/self/status (VmHWM, RssAnon, ...) and cpu_ms
    stopped: bool = False   # main said QUIT (or closed its end) before the channel's end
    failure: JobFailure | None = None   # run_contained: why the channel failed, and where
    attach_ms: float = 0.0              # mapping guest RAM and the slot table at start
    first_packet_at: float | None = None  # perf_counter (CLOCK_MONOTONIC, the same in every
                                          # process) when its first packet's I/O began
    # Its start-up, step by step: (step, perf_counter when it ended), in order:
    # "started" (the job runs in its process), "attached" (socket secured, memory
    # mapped), "ready" (READY posted), "first_job" (the first JOB read: source).
    marks: tuple[tuple[str, float], ...] = ()


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _memory_report(cpu_at_ready: float) -> dict[str, int]:
    """kB figures from /proc/self/status, and the CPU time (ms) used since READY."""
    wanted = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem",
              "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")
    report: dict[str, int] = {"cpu_ms": int((_cpu_s() - cpu_at_ready) * 1000)}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in wanted:
                    report[key] = int(value.split()[0])
    except OSError:
        pass
    return report


# ---------------------------------------------------------------------------
# What a channel process imports, ahead of its first job.


def preload_payloads() -> None:
    """Import the handlers of the built-in payload kinds (found through entry points,
    which costs a scan of the installed packages): in a fork server, once for every
    channel forked from it, instead of in each channel's first job."""
    for kind in (packet.PacketKind.RAM_PAGES, packet.PacketKind.DEVICE_STATE):
        with contextlib.suppress(LocalProtocolError):  # not installed: its job will say
            payload_entry(kind)


def preload_channel() -> None:
    """What a channel process (or an operation's main process) does once, ahead of
    its first migration: import the payload handlers, numpy's lazy imports, and
    ready the MAC records (engine/link.py warm_up_records: OpenSSL's AES-GCM, a
    staging buffer; in a fork server only the first reaches the forked channels,
    which drop inherited buffers)."""
    preload_payloads()
    # numpy imports numpy.ma at the first np.unique (9 ms quiet, 35 ms on the busy
    # 2-vCPU VM): a channel's first packet of scattered pages paid it, which is
    # usually the final round's, inside the downtime.
    import numpy.ma  # noqa: F401
    warm_up_records()


#: The pool's `preload` for channel processes (engine/pool/_forkserver.py).
CHANNEL_PRELOAD = (f"{__name__}:preload_channel",)


def channel_pool(workers: int, name: str, start_method: str = "forkserver",
                 cancel_grace: float = 1.0) -> WorkerPool:
    """A process pool whose workers are channel processes: forked from this process's
    channel fork server by default, each importing the channel modules first.
    ConfigError if a memory cgroup has no room for them (space.CHANNEL_MEMORY each):
    past its limit the kernel would kill one, or this process, without a word."""
    check_memory(workers * CHANNEL_MEMORY,
                 f"{workers} channel process(es) ({size_text(CHANNEL_MEMORY)} each)")
    start_resource_tracker()  # before the pool's processes would start it in our group
    return WorkerPool("process", workers, name=name, start_method=start_method,
                      cancel_grace=cancel_grace, preload=CHANNEL_PRELOAD)


def channel_fork_server() -> ForkServer:
    """This process's fork server for channel processes (the one operations with
    ``start_method="forkserver"`` fork their channels from).  An operation made
    without a shared pool starts it; ``start()`` it earlier (a VMM at start-up, a
    command as it begins) and its start is off every migration's clock; ``stop()``
    it, or :func:`engine.pool.stop_fork_servers`, at exit."""
    start_resource_tracker()  # before the server would start it in our process group
    return fork_server(CHANNEL_PRELOAD)


# ---------------------------------------------------------------------------
# Guest RAM a warm pool keeps mapped.

# This process's kept RAM (keep_ram_mapped): a channel given one of these handles
# uses the mapping as it is, page tables built, instead of attaching the RAM again.
# Only jobs touch it, and a process worker runs one job at a time: no lock.
_kept_ram: dict[RamHandle, GuestRAM] = {}


def _keep(handle: RamHandle) -> None:
    if handle not in _kept_ram:
        _kept_ram[handle] = GuestRAM.attach(handle, populate=True)


def _forget(handle: RamHandle) -> None:
    ram = _kept_ram.pop(handle, None)
    if ram is not None:
        ram.close()


@contextlib.contextmanager
def keep_ram_mapped(pool: WorkerPool, ram: GuestRAM, timeout: float | None = None) -> Iterator[None]:
    """Every worker of `pool` maps `ram` now, page tables and all, and keeps it mapped
    until the block ends: the channels of every operation on `pool` for this RAM then
    start with it in hand, instead of mapping it and building its page tables again as
    they first move pages (~0.3 µs a page: ~80 ms per GiB and side, of the 265 ms a cold loopback
    source channel spends per GiB here, bench/README.md).

    For a VMM's warm pool and its VM's preallocated RAM, e.g. from VM start to VM end.
    Each worker holds page tables for all of the RAM (~2 MiB per GiB with 4 KiB pages),
    and mapping it allocates any page of the RAM not allocated yet.  Enter and leave
    it with the pool idle (each worker runs one job for it); `timeout` (default: 60 s
    and 1 s per GiB) bounds each.  End the block before freeing the RAM: a worker's
    mapping keeps its memory in use until then (or until the pool shuts down).  Raises
    ConfigError for a thread pool, PoolError as :func:`engine.pool.on_every_worker`.
    """
    if pool.backend != "process":
        raise ConfigError("keep_ram_mapped: channels are processes, the pool must have the "
                          "process backend")
    if timeout is None:
        timeout = 60.0 + ram.size / 2**30

    def unmap() -> None:
        # A broken or shut-down pool's workers go, and their mappings with them.
        if pool.broken is None and not pool.closed:
            on_every_worker(pool, _forget, ram.handle, timeout=timeout, what="unmapping guest RAM")

    try:  # workers that mapped it before a failure unmap it too
        on_every_worker(pool, _keep, ram.handle, timeout=timeout, what="mapping guest RAM")
        yield
    except BaseException:
        with contextlib.suppress(MigrationError):  # the error in flight says more
            unmap()
        raise
    unmap()



@contextlib.contextmanager
def channels_with_ram(workers: int, name: str, ram: GuestRAM, start_method: str = "forkserver",
                      cancel_grace: float = 1.0) -> Iterator[WorkerPool]:
    """A :func:`channel_pool` whose workers map `ram` now, page tables and all
    (:func:`keep_ram_mapped`), as a VMM's pool from VM start: a migration's or a save's
    channels then begin with both in hand.  Leaving the block unmaps it, then stops them."""
    with channel_pool(workers, name, start_method, cancel_grace) as pool, keep_ram_mapped(pool, ram):
        yield pool

# ---------------------------------------------------------------------------
# The three channel loops (send, receive, file).  Each runs in a pool process
# and returns a report.


def _hand_back(slot: SendSlot, ctrl: socket.socket, index: int) -> None:
    """Empty the slot and return it to the main process with IDLE."""
    slot.clear()
    post(ctrl, ControlOp.IDLE, index)


# Each entry point runs in a pool process and returns a report; it raises on a
# failure of its own.  Being told to stop is not one: a channel stopped by its
# main process (QUIT, a closed control socket, or an I/O error because main shut
# the data socket while tearing down) returns a report with ``stopped`` set, so
# a pool the VMM keeps across migrations is not broken by a migration that
# failed elsewhere.


def run_send_channel(spec: ChannelSpec, ctrl: socket.socket, data: socket.socket, *,
                     token: CancelToken) -> ChannelReport:
    """Serve JOB/SYNC/FINISH requests until FINISH (or `token`, the pool's, is set)."""
    with _SendChannel(spec, ctrl, data, token) as channel:
        return channel.serve_until_stopped()


def run_recv_channel(spec: ChannelSpec, ctrl: socket.socket, data: socket.socket, *,
                     token: CancelToken) -> ChannelReport:
    """Read packets into guest RAM until END; waits at each SYNC until released."""
    with _RecvChannel(spec, ctrl, data, token) as channel:
        return channel.serve_until_stopped()


def run_file_channel(spec: ChannelSpec, ctrl: socket.socket, *,
                     token: CancelToken) -> ChannelReport:
    """Serve JOB/SYNC/FINISH with positional I/O on the snapshot file until FINISH."""
    with _FileChannel(spec, ctrl, token) as channel:
        return channel.serve_until_stopped()


def run_contained(target: Callable[..., ChannelReport], spec: ChannelSpec,
                  ctrl: socket.socket, *data: socket.socket, token: CancelToken) -> ChannelReport:
    """Run a channel on a pool shared with other work (the VMM's warm pool).

    A job that raises breaks its pool, and with it every other job there; a
    channel's failure belongs to its own migration, so it comes back inside the
    report instead (``multifd.channel_error`` raises it on the main side). A
    channel process that dies still breaks the pool: its worker is gone.
    """
    report = contained(target, spec, ctrl, *data, token=token)
    if isinstance(report, JobFailure):
        return ChannelReport(spec.channel_id, 0, {}, failure=report)
    return report


class _Stopped(Exception):
    """Main told this channel to stop: unwind, and report instead of failing."""


class _Channel:
    """What every channel loop holds: guest RAM (mapped piece by piece as it is
    first used), its sockets (none for a file channel), its counters.

    Used as a context manager: whatever happens, everything is released.
    """

    # How it maps guest RAM: piece by piece as it first moves pages there, read
    # populate for writers too (a shared tmpfs page maps writable on a read fault;
    # write populate costs 2-3x here).
    populate: Populate = "read"

    def __init__(self, spec: ChannelSpec, ctrl: socket.socket, data: socket.socket | None,
                 token: CancelToken) -> None:
        self.marks: list[tuple[str, float]] = [("started", time.perf_counter())]
        self.spec = spec
        self.ctrl = ctrl
        self.data = data
        self.token = token  # the pool's: set when the pool breaks or is cancelled
        self.sequence = 0
        self.epoch = 1
        self._cpu_at_ready = 0.0
        self.first_packet_at: float | None = None
        self.attach_ms = 0.0
        self._stack = contextlib.ExitStack()
        try:  # the worker process may serve other jobs after this one: leave nothing open
            self._stack.callback(ctrl.close)
            if data is not None:
                self._stack.callback(data.close)  # (a TLS wrap takes its descriptor over)
                # The seam for what protects the channel's bytes: MAC records, or a
                # TLS handshake here, in the process that carries them (engine/link.py).
                self.conn = secure(Connection(data), spec.link, spec.channel_id, token)
                self._stack.callback(self.conn.close)
            t_attach = time.perf_counter()
            ram = _kept_ram.get(spec.ram)  # a warm pool's (keep_ram_mapped): mapped already
            if ram is None:
                # Page tables for the pages this channel moves, 2 MiB at a time as it
                # first touches them: not all of guest RAM in every channel at start.
                ram = GuestRAM.attach(spec.ram, populate=self.populate)
                self._stack.callback(ram.close)
            slots = SlotTable.attach(spec.slots) if spec.slots is not None else None
            if slots is not None:
                self._stack.callback(slots.close)
            self.attach_ms = (time.perf_counter() - t_attach) * 1000
            self.mark("attached")
            self.ctx = ChannelContext(spec, ram, slots)
            if spec.digest_map is not None:  # each piece's hash, after it moved (engine/verify.py)
                digests = Segment.attach(spec.digest_map)
                self._stack.callback(digests.close)
                self.ctx.piece_digests = digests.buf
            self._setup()
        except BaseException:
            self._stack.close()
            raise

    def _setup(self) -> None:
        """What a kind of channel opens and builds beyond what every channel holds,
        each release pushed on ``self._stack``.  Runs inside the constructor's guard:
        if it raises, everything opened so far, here or above, is closed."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def mark(self, step: str) -> None:
        """Start-up step `step` ends now (the report's ``marks``)."""
        self.marks.append((step, time.perf_counter()))

    def ready(self) -> None:
        self.mark("ready")
        post(self.ctrl, ControlOp.READY, os.getpid())
        self._cpu_at_ready = _cpu_s()

    def report(self, packets: int, stopped: bool = False) -> ChannelReport:
        return ChannelReport(self.spec.channel_id, packets, _memory_report(self._cpu_at_ready),
                             stopped, attach_ms=self.attach_ms,
                             first_packet_at=self.first_packet_at, marks=tuple(self.marks))

    def cancelled(self, why: str) -> CancelledError:
        return CancelledError(f"channel {self.spec.channel_id} {why}")

    def serve(self) -> ChannelReport:
        raise NotImplementedError

    def serve_until_stopped(self) -> ChannelReport:
        """serve(), where being told to stop ends in a report, not an error."""
        try:
            return self.serve()
        except _Stopped:
            return self.report(self.sequence, stopped=True)
        except (TransportError, SnapshotError):
            if self._told_to_stop():  # main shut our socket under us: its teardown
                return self.report(self.sequence, stopped=True)
            raise

    def _told_to_stop(self) -> bool:
        """Has main said QUIT, or closed its end?  (Reads what is waiting; we are ending.)"""
        while True:
            try:
                message = read_control(self.ctrl, wait=False)
            except BlockingIOError:
                return False
            except MigrationError:
                return True
            if message is None or message.op is ControlOp.QUIT:
                return True


class _JobChannel(_Channel):
    """Serves the source side's requests: JOB(slot), SYNC(epoch), FINISH.

    Subclasses say what a job, a sync and the finish do on their transport.
    """

    def serve(self) -> ChannelReport:
        slots = self.ctx.slots
        assert slots is not None
        self.ready()
        while True:
            message = self._next_request()
            if message.op is ControlOp.JOB:
                if not self.sequence:
                    self.mark("first_job")
                slot = slots[message.a]
                if slot.epoch != self.epoch:
                    raise LocalProtocolError(f"slot for epoch {slot.epoch} queued in epoch {self.epoch}")
                self._job(slot, message.a)
                self.ctx.count(Counter.PACKETS, 1)
                self.sequence += 1
            elif message.op is ControlOp.SYNC:
                if message.a != self.epoch:
                    raise LocalProtocolError(f"SYNC({message.a}) asked in epoch {self.epoch}")
                self._sync(message.a)
                self.ctx.count(Counter.SYNCS, 1)
                self.epoch += 1
                post(self.ctrl, ControlOp.SYNCED, message.a)
            elif message.op is ControlOp.FINISH:
                self._finish()
                self.ctx.count(Counter.LAST_WORD, 1)  # END is on the wire: our work is done
                post(self.ctrl, ControlOp.FINISHED)
                return self.report(self.sequence)
            else:
                raise LocalProtocolError(f"{type(self).__name__} got {message.op.name}")

    def _job(self, slot: SendSlot, index: int) -> None:
        raise NotImplementedError

    @staticmethod
    def _handler(handlers: dict[int, T], slot: SendSlot) -> T:
        """The handler of the slot's payload kind, among those this channel serves."""
        try:
            return handlers[slot.kind]
        except KeyError:
            raise LocalProtocolError(f"slot of unknown payload kind {slot.kind}") from None

    def _sync(self, epoch: int) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _next_request(self) -> ControlMessage:
        try:
            # Busy: the next job is usually queued already; take it without a select.
            message = read_control(self.ctrl, wait=False)
        except BlockingIOError:
            watched: list[Any] = [self.ctrl, self.token]
            if self.data is not None:
                watched.append(self.conn)
            ready = wait_readable(watched, None)
            if self.token in ready:
                raise self.cancelled("cancelled") from None
            if self.data is not None and self.conn in ready:
                # The destination never writes on a channel: readable means closed or reset.
                raise TransportClosedError(
                    f"destination closed multifd channel {self.spec.channel_id}"
                ) from None
            message = read_control(self.ctrl)
        if message is None or message.op is ControlOp.QUIT:
            raise _Stopped
        return message


class _SendChannel(_JobChannel):
    """Jobs become packets on the data socket; SYNC and FINISH write SYNC and END."""

    def _setup(self) -> None:
        self.senders = {kind: payload_entry(kind).sender(self.ctx) for kind in self.spec.payload_kinds}

    def _job(self, slot: SendSlot, index: int) -> None:
        sender = self._handler(self.senders, slot)
        # Parts, each with work to do right before it goes (RAM pages: tracked
        # verification's hashing); most kinds send one.
        parts = sender.prepare(slot, self.sequence, self.epoch)
        if not sender.holds_slot:
            # The buffers no longer need the slot: hand it back now, so the
            # main process refills it while this packet is being sent.
            _hand_back(slot, self.ctrl, index)
        if self.first_packet_at is None:
            self.first_packet_at = time.perf_counter()
        for part, before in parts:
            if before is not None:
                before()
            if part:
                self.ctx.count(Counter.WIRE_BYTES, self.conn.send_buffers(part))
        del parts
        if sender.holds_slot:
            _hand_back(slot, self.ctrl, index)

    def _sync(self, epoch: int) -> None:
        self._send_packet(packet.encode_sync(self.sequence, epoch))

    def _finish(self) -> None:
        self._send_packet(packet.encode_end(self.sequence, self.epoch - 1))

    def _send_packet(self, encoded: bytes) -> None:
        self.conn.send_all(encoded)
        self.ctx.count(Counter.WIRE_BYTES, len(encoded))
        self.sequence += 1


class _FileChannel(_JobChannel):
    """Jobs become positional writes (save) or reads (restore) on the snapshot file.

    A job's planner turns its slot into :class:`FileIO` pieces (file offset, views
    of guest RAM, hooks); the slot goes back before the I/O, as for RAM packets.
    Each piece's ``before`` runs right before its write and ``after`` right after
    its read, while its pages are in cache: the page checksums.  Syncs and
    the finish write nothing: a file has no reader to tell, and a SYNCED
    answered after the earlier jobs' I/O returned is the ordering the
    snapshot needs (a page saved again in the next round lands after this one).
    """

    def __init__(self, spec: ChannelSpec, ctrl: socket.socket, token: CancelToken) -> None:
        super().__init__(spec, ctrl, None, token)

    def _setup(self) -> None:
        target = self.spec.file
        assert target is not None
        self.file: PositionalFile = open_file(target.path, target.mode, target.direct_io, target.identity)
        self._stack.callback(self.file.close)
        if target.present is not None:
            present = Segment.attach(target.present)
            self._stack.callback(present.close)
            self.ctx.present = present.buf
        if target.sums is not None:
            sums = Segment.attach(target.sums)
            self._stack.callback(sums.close)
            page_words, _, _ = sum_words([block.n_pages for block in self.ctx.ram.blocks])
            at = page_words.stop * PAGE_SUM_SIZE  # chunk words (and a restore's counts) follow
            self.ctx.page_sums, self.ctx.chunk_sums = sums.buf[:at], sums.buf[at:]
        writing = target.mode == "write"
        self._move = self.file.write_at if writing else self.file.read_into
        self.planners: dict[int, FilePlanner] = {}
        for kind in self.spec.payload_kinds:
            entry = payload_entry(kind)
            factory = entry.file_writer if writing else entry.file_reader
            if factory is None:
                raise LocalProtocolError(f"payload kind {kind} cannot be saved to a file")
            self.planners[kind] = factory(self.ctx)

    def _job(self, slot: SendSlot, index: int) -> None:
        plan = self._handler(self.planners, slot).plan(slot)
        _hand_back(slot, self.ctrl, index)  # the plan holds views of guest RAM, not the slot
        if self.first_packet_at is None:
            self.first_packet_at = time.perf_counter()
        moved = 0
        for piece in plan:
            if piece.before is not None:
                piece.before()
            moved += self._move(piece.offset, piece.buffers)
            if piece.after is not None:
                piece.after()
        self.ctx.count(Counter.WIRE_BYTES, moved)

    def _sync(self, epoch: int) -> None:
        pass  # a job's checks run within the job: a SYNC is read only after them

    def _finish(self) -> None:
        pass  # likewise: every page read so far is checked


class Deliveries:
    """Hands payloads from a destination channel to the main process (for clients
    whose payload is consumed there, such as device state).

    Each channel owns a few slots of the destination's slot table.  A payload is
    received straight into a free one and announced with DELIVERED(kind, slot);
    the main process copies it out and answers RETURN(slot).  With every slot
    out, the channel waits for a RETURN before it reads on: back-pressure.
    """

    def __init__(self, channel: _RecvChannel, indices: range) -> None:
        self._channel = channel
        self._free = list(indices)

    def take(self) -> SendSlot:
        """A free slot, waiting for one to come back if none is."""
        slots = self._channel.ctx.slots
        assert slots is not None
        while not self._free:
            self._channel.wait_control("a delivery slot to come back")
        return slots[self._free.pop()]

    def deliver(self, kind: int, slot: SendSlot) -> None:
        post(self._channel.ctrl, ControlOp.DELIVERED, slot.index, kind=kind)

    def returned(self, index: int) -> None:
        self._free.append(index)


class PacketReader:
    """The I/O driver of a destination channel: its socket feeding the sans-IO
    :class:`~engine.wire.packet.PacketDecoder`, so the fuzzed decoder is the one
    that runs.

    Headers are read exactly as long as the decoder wants them (16 bytes, then
    the kind header), so no payload byte is ever buffered: on a header event the
    payload's consumer names its views and they are filled with ``recvmsg_into``
    straight from the socket.  Every rule of the stream is the decoder's; the
    transport's end is this driver's: EOF and short reads are transport errors
    (TransportClosedError), never fed to the decoder.
    """

    def __init__(self, conn: Connection, limits: packet.PacketLimits, name: str) -> None:
        self.conn = conn
        self.decoder = packet.PacketDecoder(limits)
        self.name = name

    def next_event(self) -> packet.PacketStart:
        """The next packet's checked headers (the payload, if any, still unread)."""
        decoder = self.decoder
        while (event := decoder.next_event()) is packet.NEED_DATA:
            data = self.conn.recv_exact_or_eof(decoder.want)
            if data is None:
                where = "without END" if decoder.want == packet.PACKET_HEADER_SIZE else "inside a packet"
                raise TransportClosedError(f"source closed {self.name} {where}")
            decoder.receive_data(data)
        return event

    def fill(self, views: Sequence[memoryview]) -> None:
        """Read the next bytes of the current payload into ``views``, filling them."""
        rest = self.decoder.payload_into(views)
        if rest:
            self.conn.recv_into_buffers(rest)

    def read_payload(self, receiver: PayloadReceiver, record: packet.Packet) -> None:
        """Run ``receiver`` on ``record``: fill each group of views it yields, in order."""
        for views in receiver.receive(record):
            self.fill(views)
        self.decoder.payload_done()


class _RecvChannel(_Channel):
    def _setup(self) -> None:
        spec = self.spec
        per_channel = spec.delivery_slots
        first = spec.channel_id * per_channel
        self.deliveries = Deliveries(self, range(first, first + per_channel))
        self.ctx.deliveries = self.deliveries
        if spec.limits is None:
            raise LocalProtocolError("a receive channel needs the packet limits of its CONFIG")
        self.reader = PacketReader(self.conn, spec.limits, f"multifd channel {spec.channel_id}")

    def wait_control(self, what: str) -> ControlMessage:
        """Block for the next control message, handling RETURN; QUIT or a cancel raise."""
        ready = wait_readable([self.ctrl, self.token], None)
        if self.token in ready:
            raise self.cancelled(f"cancelled while waiting for {what}")
        message = read_control(self.ctrl)
        if message is None or message.op is ControlOp.QUIT:
            raise _Stopped
        if message.op is ControlOp.RETURN:
            self.deliveries.returned(message.a)
        return message

    def serve(self) -> ChannelReport:
        receivers = {kind: payload_entry(kind).receiver(self.ctx) for kind in self.spec.payload_kinds}
        self.ready()
        while True:
            event = self._next_packet()
            record = event.packet
            if isinstance(record, packet.SyncPacket):
                self.ctx.count(Counter.SYNCS, 1)
                post(self.ctrl, ControlOp.AT_SYNC, record.epoch)
                self._wait_release(record.epoch)
                self.epoch += 1
            elif isinstance(record, packet.EndPacket):
                if self.conn.peek():  # bytes of END's own record, or already in: main checks later ones
                    raise RemoteProtocolError(f"the source sent bytes after END on multifd channel "
                                              f"{self.spec.channel_id}")
                self.ctx.count(Counter.LAST_WORD, 1)  # every page is in place: our work is done
                post(self.ctrl, ControlOp.ENDED, record.epoch)
                self._wait_goodbye()
                return self.report(self.sequence + 1)
            else:
                receiver = receivers.get(event.kind)
                if receiver is None:
                    raise RemoteProtocolError(
                        f"packet kind {event.kind} is not enabled in this migration"
                    )
                self.reader.read_payload(receiver, record)
            self.sequence += 1

    def _wait_goodbye(self) -> None:
        """Read what main still sends (RETURNs) until its BYE.  Closing with a
        message unread would reset the socket, and Linux reports that reset to
        main before the ENDED still queued for it: ENDED would be lost."""
        while self.wait_control("main's goodbye").op is not ControlOp.BYE:
            pass

    def _wait_release(self, epoch: int) -> None:
        """Block at the sync barrier until main sends RELEASE(epoch)."""
        while True:
            message = self.wait_control(f"sync {epoch} to be released")
            if message.op is ControlOp.RELEASE:
                if message.a != epoch:
                    raise LocalProtocolError(f"RELEASE({message.a}) while waiting at sync {epoch}")
                return
            if message.op is not ControlOp.RETURN:
                raise LocalProtocolError(f"recv channel at sync {epoch} got {message.op.name}")

    def _next_packet(self) -> packet.PacketStart:
        """The next packet's checked headers (the payload stays unread)."""
        while True:
            # Bytes TLS already decrypted are invisible to poll: then only look.
            data_waiting = self.conn.pending() > 0
            watched: list[Any] = [self.ctrl, self.token]
            if not data_waiting:
                watched.append(self.conn)
            ready = wait_readable(watched, 0 if data_waiting else None)
            if self.token in ready:
                raise self.cancelled("cancelled")
            if self.ctrl not in ready:
                break
            # Between packets main only returns delivery slots, or says QUIT.
            message = self.wait_control("the next packet")
            if message.op is not ControlOp.RETURN:
                raise LocalProtocolError(f"recv channel got {message.op.name}")
        event = self.reader.next_event()
        self.ctx.count(Counter.WIRE_BYTES, event.header_bytes + event.payload_length)
        self.ctx.count(Counter.PACKETS, 1)
        return event
