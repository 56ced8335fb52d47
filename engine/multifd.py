"""The multifd core in the main process: schedule payloads on channels, sync them.

Payload-agnostic: it moves *slots* (engine/slots.py) between clients and channel
processes and knows nothing of pages, dirty maps or devices.

Source (:class:`MultifdSender`), N channels and M clients, N + M slots::

    client j fills its slot ─ send(j) ─▶ wait for an idle channel c
                                        swap: c gets the filled slot,
                                              j gets c's empty one
                                        JOB(slot) ─▶ channel c
    sync()  : SYNC(e) to every channel; wait SYNCED(e) from all; marker(e)
              (an epoch in which nothing was sent is not synced)
    finish(): FINISH to every channel: each sends END after its last packet.
              END is the final barrier, so the last round needs no sync.

Flush is the client's business (send its partly filled slot); sync is the
core's: the two are separate calls.

Destination (:class:`MultifdReceiver`): channels report AT_SYNC(e) and wait;
on the main channel's SYNC_MARKER(e) the receiver waits until every channel is
at the barrier, then releases them all into epoch e + 1.

Every wait selects on the control sockets *and* the failure latch, so a failed
or cancelled migration wakes it at once.  A channel whose control socket closes
has exited: its job's future holds the real cause, which becomes the
migration's error.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError as FuturesCancelledError
from concurrent.futures import Future

from engine.channel import ChannelReport, ControlMessage, ControlOp, post, read_control
from engine.errors import (
    BrokenPoolError,
    CancelledError,
    LocalProtocolError,
    RemoteProtocolError,
    TransportBrokenError,
    TransportClosedError,
)
from engine.slots import Counter, SendSlot, SlotTable
from engine.sync import FailureLatch, SyncBarrier, wait_readable
from engine.transport import Connection

log = logging.getLogger("multifd.core")

# How long to wait for a dead channel's future to carry its real error.
_EXIT_CAUSE_WAIT = 2.0


class ChannelLink:
    """The main process's handle on one channel process."""

    def __init__(
        self,
        channel_id: int,
        ctrl: socket.socket,
        conn: Connection | None,
        future: Future,
        root_cause: Callable[[], BaseException | None] = lambda: None,
    ) -> None:
        self.channel_id = channel_id
        self.ctrl = ctrl
        self.conn = conn          # kept so teardown can shut it down under a blocked process
                                  # (None: a file channel)
        self.future = future
        self.pid = 0              # the channel process's, once it said READY
        self.finished = False     # it said its last word (FINISHED / ENDED): its work is done
        self._root_cause = root_cause  # what broke the pool, if it broke

    def post(self, op: ControlOp, a: int = 0) -> None:
        """Send a control message; if the channel died, raise what killed it."""
        try:
            post(self.ctrl, op, a)
        except TransportClosedError as exc:
            raise self.exit_error() from exc

    def post_if_running(self, op: ControlOp, a: int = 0) -> None:
        """Send a message that is moot once the channel said its last word (BYE, or
        RETURN of a delivery slot, after its END); a channel that failed before
        that still raises its error."""
        try:
            post(self.ctrl, op, a)
        except TransportClosedError as exc:
            if self.finished:
                return  # its work is done; how it ended is the pool's to report
            error = self.exit_error()
            if not (self.future.done() and channel_error(self.future) is None):
                raise error from exc

    def exit_error(self) -> BaseException:
        """Why the channel process ended, once its control socket closed.

        The socket may close (or reset) before the pool has reported the job's
        outcome, so wait a moment for the real cause: a crash's exit code, or
        the exception the job raised.
        """
        try:
            error = channel_error(self.future, timeout=_EXIT_CAUSE_WAIT)
        except TimeoutError:  # concurrent.futures' is the builtin since 3.11
            error = TransportBrokenError(f"multifd channel {self.channel_id} stopped answering and "
                                         f"its process did not end within {_EXIT_CAUSE_WAIT:.0f} s")
        except FuturesCancelledError:
            error = CancelledError(f"multifd channel {self.channel_id} was cancelled")
        if error is None:
            error = TransportClosedError(f"multifd channel {self.channel_id} exited unexpectedly")
        return root_cause(error, self._root_cause())


    def shutdown(self) -> None:
        """Wake the channel process if it is blocked on its data socket."""
        if self.conn is not None:
            self.conn.shutdown()

    def close(self) -> None:
        self.ctrl.close()
        if self.conn is not None:
            self.conn.close()


def channel_error(future: Future, timeout: float | None = None) -> BaseException | None:
    """The failure of a finished channel job: what it raised, or the error a
    contained channel (``channel.run_contained``) returned in its report."""
    error = future.exception(timeout=timeout)
    if error is not None:
        return error
    report = future.result()
    if isinstance(report, ChannelReport) and report.failure is not None:
        return report.failure.rebuilt()
    return None


def root_cause(error: BaseException, pool_broken_by: BaseException | None) -> BaseException:
    """A channel cancelled because a sibling failed reports the sibling's failure."""
    if isinstance(error, (CancelledError, BrokenPoolError)) and pool_broken_by is not None:
        return pool_broken_by
    return error


class _ChannelPump:
    """Reads control messages from channels; shared by sender and receiver."""

    def __init__(self, links: list[ChannelLink], latch: FailureLatch, stall_timeout: float | None):
        self.links = links
        self.latch = latch
        self.stall_timeout = stall_timeout
        self._by_fd = {link.ctrl.fileno(): link for link in links}
        # Another descriptor every wait also watches (the destination's main
        # channel), with what to do when it is readable; that counts as progress.
        self.watch: tuple[int, Callable[[], None]] | None = None
        self._watched = False

    def fds(self) -> list[int]:
        """Control sockets still worth waiting on (channels that have not ended)."""
        return list(self._by_fd)

    def retire(self, link: ChannelLink) -> None:
        """The channel said its last word; its control socket will close normally."""
        link.finished = True
        self._by_fd.pop(link.ctrl.fileno(), None)

    def pump(self, timeout: float | None) -> list[tuple[ChannelLink, ControlMessage]]:
        """Wait up to `timeout` for messages; return all that are ready.

        Raises the migration's first error if the latch is (or becomes) set, and
        records a channel that exited as the first error.
        """
        self.latch.raise_if_failed()
        fds = list(self._by_fd) + [self.latch.fileno()]
        if self.watch is not None:
            fds.append(self.watch[0])
        ready = wait_readable(fds, timeout)
        self.latch.raise_if_failed()
        self._watched = self.watch is not None and self.watch[0] in ready
        if self._watched:
            assert self.watch is not None
            self.watch[1]()
        messages = []
        for fd in ready:
            link = self._by_fd.get(fd)
            if link is None:  # retired while handling an earlier message of this batch
                continue
            try:
                message = read_control(link.ctrl)
            except TransportClosedError:  # reset: the process died under it
                message = None
            if message is None:
                self._channel_exited(link)
            else:
                messages.append((link, message))
        return messages

    def pump_until(self, done: Callable[[], bool], handle: Callable[[ChannelLink, ControlMessage], None],
                   what: str) -> None:
        """Handle messages until `done()`; fail if nothing arrives for stall_timeout."""
        while not done():
            messages = self.pump(self.stall_timeout)
            if not messages and not self._watched:
                self.latch.fail(TransportBrokenError(
                    f"no progress on any multifd channel for {self.stall_timeout:.0f} s "
                    f"while waiting for {what}"
                ))
                self.latch.raise_if_failed()
            for link, message in messages:
                handle(link, message)

    def _channel_exited(self, link: ChannelLink) -> None:
        """A channel's control socket closed: record its job's real error, first."""
        self.latch.fail(link.exit_error())
        self.latch.raise_if_failed()


# Under a cap, unused time banks at most this much: after an idle stretch the
# sender may run ahead of the cap by this many seconds' worth, not by all of it.
_CAP_CREDIT_S = 0.1


class RateLimiter:
    """Keeps all channels together under `bytes_per_s`, from the first byte.

    Before a packet is handed out, the sender waits until the cap has paid for
    everything sent so far: the bytes the channels wrote (counted as they write:
    zero pages and compression count at their real size) plus the guest bytes of
    the packets handed out and not yet written, this one included (charged in
    full until written, so the cap holds from the first packet, which used to go
    uncapped).  Waiting is on the failure latch, so a cancel still wakes it.
    """

    def __init__(self, bytes_per_s: float, written: Callable[[], int], latch: FailureLatch) -> None:
        self.bytes_per_s = bytes_per_s
        self._written = written
        self._latch = latch
        self._start: tuple[float, int] | None = None

    def wait(self, unwritten: int) -> None:
        """Wait until the bytes written since the first call plus `unwritten` fit the cap."""
        now = time.monotonic()
        if self._start is None:
            self._start = (now, self._written())
        t0, base = self._start
        written = self._written()
        due = t0 + (written - base + unwritten) / self.bytes_per_s
        if now - due > _CAP_CREDIT_S:  # idle a while: no burst to catch up on it
            # Restart the clock with the credit; this packet is still charged.
            self._start = (now - _CAP_CREDIT_S, written)
            due = now - _CAP_CREDIT_S + unwritten / self.bytes_per_s
        if due > now and self._latch.wait(due - now):
            self._latch.raise_if_failed()


class MultifdSender:
    """Source side of the core: N channels, `n_clients` client slots.

    Thread-safe: clients on several threads may call :meth:`send`.
    """

    def __init__(
        self,
        links: list[ChannelLink],
        slots: SlotTable,
        n_clients: int,
        latch: FailureLatch,
        marker: Callable[[int], None],
        stall_timeout: float | None = 60.0,
        max_bandwidth: float | None = None,
    ) -> None:
        n = len(links)
        if len(slots) != n + n_clients:
            raise LocalProtocolError(f"need {n + n_clients} slots, table has {len(slots)}")
        self._links = links
        self._slots = slots
        self._pump = _ChannelPump(links, latch, stall_timeout)
        self._marker = marker
        self._channel_slot = list(range(n))             # channel i starts with slot i
        self._client_slot = [n + j for j in range(n_clients)]
        self._busy = [False] * n
        self._synced: set[int] = set()
        self._finished: set[int] = set()
        self._next = 0
        self._lock = threading.Lock()
        self.epoch = 1
        self._queued_in_epoch = 0
        self._unwritten = [0] * n  # guest bytes of the packet each busy channel holds
        self._limiter = None if max_bandwidth is None else RateLimiter(
            max_bandwidth, lambda: int(slots.totals()[Counter.WIRE_BYTES]), latch
        )

    @property
    def channels(self) -> int:
        return len(self._links)

    def client_slot(self, client: int) -> SendSlot:
        """The slot client `client` owns now (it changes with every send)."""
        return self._slots[self._client_slot[client]]

    def send(self, client: int, guest_bytes: int) -> None:
        """Hand the client's filled slot to an idle channel; the client gets an empty one.

        `guest_bytes`: what the packet carries, before zero-page detection and
        compression (the bandwidth cap charges it).  Blocks while every channel is
        busy (back-pressure) or the cap says wait.  Raises the migration's first
        error if anything failed meanwhile.
        """
        with self._lock:
            slot = self._slots[self._client_slot[client]]
            if slot.empty:
                raise LocalProtocolError("send() of an empty slot")
            slot.epoch = self.epoch
            if self._limiter is not None:
                for link, message in self._pump.pump(0):  # packets written meanwhile
                    self._handle(link, message)
                self._limiter.wait(sum(self._unwritten) + guest_bytes)
            channel = self._wait_idle_channel()
            self._client_slot[client], self._channel_slot[channel] = (
                self._channel_slot[channel], self._client_slot[client],
            )
            self._busy[channel] = True
            self._unwritten[channel] = guest_bytes
            self._links[channel].post(ControlOp.JOB, self._channel_slot[channel])
            self._queued_in_epoch += 1

    def sync(self) -> int:
        """End the current epoch on every channel, then write the marker.

        Returns the last synced epoch.  On return every packet of it has been
        written to its socket, and every channel is idle.  An epoch in which
        nothing was sent has nothing to order: it is not synced.
        """
        with self._lock:
            if self._queued_in_epoch == 0:
                return self.epoch - 1
            epoch = self.epoch
            self._synced.clear()
            for link in self._links:
                link.post(ControlOp.SYNC, epoch)
            self._pump.pump_until(
                lambda: len(self._synced) == len(self._links) and not any(self._busy),
                lambda link, message: self._handle(link, message, expect_epoch=epoch),
                f"sync {epoch}",
            )
            self.epoch += 1
            self._queued_in_epoch = 0
            self._marker(epoch)
            return epoch

    def finish(self) -> int:
        """Queue END on every channel, after whatever each still has to send.

        END is the last barrier: the destination resumes only once it read END
        on every channel, and each END follows that channel's last pages, so
        the final round needs no sync of its own.  Returns the last synced
        epoch (what COMPLETE carries).  Does not wait: see :meth:`wait_finished`.
        """
        with self._lock:
            for link in self._links:
                link.post(ControlOp.FINISH, self.epoch - 1)
            return self.epoch - 1

    def wait_finished(self) -> None:
        """Wait until every channel has written END."""
        with self._lock:
            self._pump.pump_until(
                lambda: len(self._finished) == len(self._links),
                self._handle,
                "channels to finish",
            )

    def _wait_idle_channel(self) -> int:
        """The next idle channel, round-robin (draining pending notifications first)."""
        for link, message in self._pump.pump(0):
            self._handle(link, message)
        self._pump.pump_until(lambda: not all(self._busy), self._handle, "an idle channel")
        n = len(self._links)
        channel = next(c % n for c in range(self._next, self._next + n) if not self._busy[c % n])
        self._next = channel + 1
        return channel

    def _handle(self, link: ChannelLink, message: ControlMessage, expect_epoch: int = 0) -> None:
        channel = link.channel_id
        if message.op is ControlOp.IDLE:
            if not self._busy[channel] or message.a != self._channel_slot[channel]:
                raise LocalProtocolError(f"channel {channel} idle with slot {message.a} unexpectedly")
            self._busy[channel] = False
            self._unwritten[channel] = 0
        elif message.op is ControlOp.SYNCED:
            if message.a != expect_epoch:
                raise LocalProtocolError(f"channel {channel} synced {message.a}, not {expect_epoch}")
            self._synced.add(channel)
        elif message.op is ControlOp.FINISHED:
            self._finished.add(channel)
            self._pump.retire(link)
        else:
            raise LocalProtocolError(f"source got {message.op.name} from channel {channel}")


class MultifdReceiver:
    """Destination side of the core: the sync barrier over N channels, and the
    payloads channels deliver to this process (in `slots`, the slot table)."""

    def __init__(self, links: list[ChannelLink], latch: FailureLatch,
                 stall_timeout: float | None = 60.0, slots: SlotTable | None = None) -> None:
        self._links = links
        self._pump = _ChannelPump(links, latch, stall_timeout)
        self.barrier = SyncBarrier(len(links))
        self._slots = slots
        self._deliveries: dict[int, Callable[[SendSlot], None]] = {}

    def on_delivery(self, kind: int, handler: Callable[[SendSlot], None]) -> None:
        """Hand each delivered payload of `kind` to `handler` (a client), as the slot
        that holds it.  The handler takes what it needs out of the slot before it
        returns: the core then clears the slot and gives it back to its channel."""
        self._deliveries[int(kind)] = handler

    def watch(self, fd: int, readable: Callable[[], None]) -> None:
        """While waiting on the channels, also call `readable()` whenever `fd` is
        readable (the main channel: a source that closes or aborts is noticed at once)."""
        self._pump.watch = (fd, readable)

    def sync(self, epoch: int) -> None:
        """Wait until every channel reached SYNC(epoch), then release them all.
        Markers come in order, one per epoch: another (a repeated one) would wait
        for a sync that never comes."""
        if epoch != self.barrier.epochs[0]:
            raise RemoteProtocolError(f"SYNC_MARKER({epoch}) while the channels are in epoch "
                                      f"{self.barrier.epochs[0]}")
        self._pump.pump_until(lambda: self.barrier.all_at(epoch), self._handle, f"sync {epoch}")
        self.barrier.release_all(epoch)
        for link in self._links:
            link.post(ControlOp.RELEASE, epoch)

    def wait_all_ended(self) -> None:
        """Wait until every channel read END (no channel will write guest RAM again)."""
        self._pump.pump_until(lambda: self.barrier.all_ended, self._handle, "END on every channel")

    def fds(self) -> list[int]:
        """Control sockets to watch next to the main channel."""
        return self._pump.fds()

    def poll(self) -> None:
        """Handle whatever channels reported so far, without blocking."""
        for link, message in self._pump.pump(0):
            self._handle(link, message)

    def _handle(self, link: ChannelLink, message: ControlMessage) -> None:
        if message.op is ControlOp.AT_SYNC:
            self.barrier.reached(link.channel_id, message.a)
        elif message.op is ControlOp.ENDED:
            self.barrier.ended(link.channel_id, message.a)
            self._pump.retire(link)
            link.post_if_running(ControlOp.BYE)  # the channel may now close its end
        elif message.op is ControlOp.DELIVERED and message.kind in self._deliveries:
            self._deliver(link, message)
        else:
            raise LocalProtocolError(f"destination got {message.op.name} from channel {link.channel_id}")


    def _deliver(self, link: ChannelLink, message: ControlMessage) -> None:
        """DELIVERED(kind, slot): the client takes the payload, then the slot goes back."""
        if self._slots is None:
            raise LocalProtocolError(f"channel {link.channel_id} delivered a payload without a slot table")
        slot = self._slots[message.a]
        self._deliveries[message.kind](slot)
        slot.clear()
        link.post_if_running(ControlOp.RETURN, message.a)


def shutdown_links(links: Iterable[ChannelLink]) -> None:
    """Tell every channel to quit and wake any that is blocked on its data socket."""
    for link in links:
        try:
            post(link.ctrl, ControlOp.QUIT)
        except TransportClosedError:
            pass  # that channel is gone already
        link.shutdown()
