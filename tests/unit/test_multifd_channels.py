"""The multifd core with its real channel loops, in one process, in milliseconds.

MultifdSender → send channel loops → data socketpairs → receive channel loops →
MultifdReceiver, all on threads of the test process: the channel code is the
production entry points (``run_send_channel`` / ``run_recv_channel``), the RAM
and slot tables are real shared memory, the sockets are real socketpairs.  Only
the orchestration (handshake, rounds, dirty tracking) is the test's: it fills
RAM_PAGES slots as the RAM client does and syncs epochs as the source does.

Every test ends comparing the destination's RAM with the source's, byte for byte.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import numpy as np
import pytest

from clients.guest import fill_ram
from engine.channel import (
    ChannelSpec,
    ControlOp,
    FileTarget,
    _FileChannel,
    _SendChannel,
    control_pair,
    read_control,
    run_recv_channel,
    run_send_channel,
)
from engine.errors import LocalProtocolError, SnapshotError
from engine.multifd import ChannelLink, MultifdReceiver, MultifdSender, shutdown_links
from engine.pool import CancelToken
from engine.shm import PAGE_SIZE, GuestRAM
from engine.slots import Counter, SlotTable
from engine.sync import FailureLatch
from engine.wire import packet

pytestmark = pytest.mark.usefixtures("no_leaks")

HANG_S = 20.0
PACKET_PAGES = 16
N_PAGES = 256  # 1 MiB per side


def _start(target: Callable[..., object], *args: object,
           **kwargs: object) -> tuple[Future, threading.Thread]:
    """Run a channel loop on a thread; its outcome lands in a future, as from a pool."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(target(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)

    thread = threading.Thread(target=run, name="test-channel")
    thread.start()
    return future, thread


class Pipeline:
    """N send channels wired to N receive channels; a sender and a receiver drive them."""

    def __init__(self, src: GuestRAM, dst: GuestRAM, n: int, zero_pages: bool,
                 held: int | None = None) -> None:
        self.src, self.dst, self.n = src, dst, n
        self.release_held = threading.Event()  # channel `held`'s bytes wait for this
        self.latch_s, self.latch_d = FailureLatch(), FailureLatch()
        self.token = CancelToken()  # as a pool hands its jobs; never set here
        self.table_s = SlotTable.create(n + 1, max_items=PACKET_PAGES, payload_capacity=0, n_channels=n)
        self.table_d = SlotTable.create(1, max_items=1, payload_capacity=0, n_channels=n)
        self.threads: list[threading.Thread] = []
        self.socks: list[socket.socket] = []
        links_s, links_d = [], []
        for i in range(n):
            main_s, chan_s = control_pair()
            main_d, chan_d = control_pair()
            data_s, data_d = socket.socketpair()
            self.socks += [main_s, main_d]
            if i == held:  # a relay in between that forwards nothing until released
                relay_in, relay_out = socket.socketpair()
                self.socks += [relay_in, relay_out]
                relay = threading.Thread(target=self._relay, args=(data_d, relay_out),
                                         name="test-relay")
                relay.start()
                self.threads.append(relay)
                data_d = relay_in
            spec_s = ChannelSpec(i, src.handle, self.table_s.handle, PACKET_PAGES,
                                 zero_page_detection=zero_pages)
            spec_d = ChannelSpec(i, dst.handle, self.table_d.handle, PACKET_PAGES,
                                 zero_page_detection=zero_pages, limits=packet.PacketLimits(
                                     PAGE_SIZE, PACKET_PAGES, tuple(b.n_pages for b in dst.blocks)))
            future_s, thread_s = _start(run_send_channel, spec_s, chan_s, data_s, token=self.token)
            future_d, thread_d = _start(run_recv_channel, spec_d, chan_d, data_d, token=self.token)
            self.threads += [thread_s, thread_d]
            links_s.append(ChannelLink(i, main_s, None, future_s))
            links_d.append(ChannelLink(i, main_d, None, future_d))
        for link in links_s + links_d:  # each channel says READY once its memory is attached
            message = read_control(link.ctrl)
            assert message is not None and message.op is ControlOp.READY
        self.links_s, self.links_d = links_s, links_d
        self.markers: list[int] = []
        self.sender = MultifdSender(links_s, self.table_s, 1, self.latch_s, self.markers.append,
                                    stall_timeout=HANG_S)
        self.receiver = MultifdReceiver(links_d, self.latch_d, stall_timeout=HANG_S)
        self.epoch = 0

    def _relay(self, src: socket.socket, dst: socket.socket) -> None:
        self.release_held.wait()
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            src.close()
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def send_pages(self, pages: list[int]) -> None:
        """Queue these pages of block 0 as the RAM client does: runs, PACKET_PAGES a slot."""
        for at in range(0, len(pages), PACKET_PAGES):
            chunk = np.asarray(pages[at:at + PACKET_PAGES], dtype=np.int64)
            breaks = np.flatnonzero(np.diff(chunk) != 1) + 1
            firsts = np.split(chunk, breaks)
            slot = self.sender.client_slot(0)
            slot.kind, slot.a0, slot.n_items = packet.PacketKind.RAM_PAGES, 0, len(firsts)
            for item, run in enumerate(firsts):
                slot.items[item] = (int(run[0]), run.size)
            del slot
            self.sender.send(0, chunk.size * PAGE_SIZE)

    def sync(self) -> None:
        """End the epoch on both sides (the destination waits at its barrier meanwhile)."""
        epoch = self.sender.epoch
        barrier = threading.Thread(target=self.receiver.sync, args=(epoch,), name="test-barrier")
        barrier.start()
        assert self.sender.sync() == epoch
        barrier.join(HANG_S)
        assert not barrier.is_alive()
        self.epoch = epoch

    def finish(self) -> None:
        self.sender.finish()
        ended = threading.Thread(target=self.receiver.wait_all_ended, name="test-ended")
        ended.start()
        self.sender.wait_finished()
        ended.join(HANG_S)
        assert not ended.is_alive()
        for link in self.links_s + self.links_d:
            assert link.future.result(HANG_S).failure is None

    def close(self) -> None:
        self.release_held.set()
        shutdown_links(self.links_s + self.links_d)
        for thread in self.threads:
            thread.join(HANG_S)
        for sock in self.socks:
            sock.close()
        for latch in (self.latch_s, self.latch_d):
            latch.close()
        self.token.close()
        for table in (self.table_s, self.table_d):
            table.close()
            table.unlink()


@contextlib.contextmanager
def pipeline(n: int = 2, zero_pages: bool = True, dst_fill: str = "zero",
             held: int | None = None) -> Iterator[Pipeline]:
    with GuestRAM.create({"pc.ram": N_PAGES * PAGE_SIZE}) as src, \
            GuestRAM.create({"pc.ram": N_PAGES * PAGE_SIZE}) as dst:
        fill_ram(src, "random", seed=3)
        if dst_fill != "zero":
            fill_ram(dst, dst_fill, seed=4)
            dst.blocks[0].dirty.mark(0, N_PAGES)  # used RAM: every page may hold data
        made = Pipeline(src, dst, n, zero_pages, held)
        try:
            yield made
        finally:
            made.close()


def _same(a: GuestRAM, b: GuestRAM) -> bool:
    return bytes(a.blocks[0].pages) == bytes(b.blocks[0].pages)


@pytest.mark.parametrize("n", [1, 3])
def test_every_page_arrives_exactly_over_n_channels(n: int) -> None:
    with pipeline(n) as p:
        p.send_pages(list(range(N_PAGES)))
        p.sync()
        p.finish()
        assert p.markers == [1]
        assert _same(p.src, p.dst)


def test_pages_rewritten_between_epochs_arrive_in_their_last_version() -> None:
    """Epoch 1 sends every page; the guest rewrites some (scattered runs) and zeroes
    others; epoch 2 sends those again.  The destination (used RAM: garbage
    everywhere) must end equal to the source, zero pages included."""
    with pipeline(2, dst_fill="random") as p:
        p.send_pages(list(range(N_PAGES)))
        p.sync()
        pages = p.src.blocks[0].array()
        rewritten = list(range(3, N_PAGES, 7))
        pages[rewritten, :8] = 0xEE
        zeroed = list(range(5, N_PAGES, 11))
        pages[zeroed] = 0
        del pages
        p.send_pages(sorted(set(rewritten) | set(zeroed)))
        p.sync()
        p.finish()
        assert p.markers == [1, 2]
        assert _same(p.src, p.dst)


def test_a_zero_page_clears_what_used_ram_held() -> None:
    with pipeline(2, dst_fill="random") as p:
        pages = p.src.blocks[0].array()
        pages[::2] = 0
        del pages
        p.send_pages(list(range(N_PAGES)))
        p.finish()  # END is the last barrier: no sync needed for a single epoch
        sent = p.table_s.totals()
        assert int(sent[Counter.ZERO_PAGES]) == N_PAGES // 2  # they went as ZERO runs
        assert int(sent[Counter.NORMAL_PAGES]) == N_PAGES // 2
        assert _same(p.src, p.dst)


def test_the_barrier_keeps_a_late_stale_copy_from_landing_last() -> None:
    """Page P goes in epoch 1 on channel 0, whose bytes are held back, and again in
    epoch 2 on channel 1.  Channel 1 must stop at SYNC(1) until channel 0 reached it
    too; without the barrier its new copy lands first and the stale one overwrites it.

    While channel 0 is held the test watches P for a moment: with the barrier P cannot
    change whatever the timing (the window only makes a missing barrier show)."""
    P = 9
    with pipeline(2, held=0) as p:
        def write_p(value: int) -> None:
            p.src.blocks[0].page_view(P)[:] = bytes([value]) * PAGE_SIZE

        def landed() -> set[int]:
            return set(bytes(p.dst.blocks[0].page_view(P)))

        write_p(0xAA)
        p.send_pages([P])                     # epoch 1, channel 0 (held)
        barrier = threading.Thread(target=p.receiver.sync, args=(1,), name="test-barrier")
        barrier.start()
        assert p.sender.sync() == 1           # SYNC(1) written on both; the marker
        write_p(0xBB)
        p.send_pages([P])                     # epoch 2: round-robin puts it on channel 1
        pause = threading.Event()
        for _ in range(50):                   # up to ~0.5 s for a broken barrier to show
            if landed() != {0} or pause.wait(0.01):
                break
        early = landed()
        p.release_held.set()                  # channel 0's stale copy and SYNC(1) arrive
        barrier.join(HANG_S)
        assert not barrier.is_alive()
        assert early == {0}, "channel 1 read epoch 2 before every channel reached SYNC(1)"
        p.finish()
        assert landed() == {0xBB}
        memory = bytes(p.dst.blocks[0].pages)  # and nothing else was written
        assert memory[:P * PAGE_SIZE] == bytes(P * PAGE_SIZE)
        assert memory[(P + 1) * PAGE_SIZE:] == bytes(len(memory) - (P + 1) * PAGE_SIZE)


# ---------------------------------------------------------------------------
# A channel that cannot start


@pytest.mark.parametrize("kind", ["send", "file"])
def test_a_channel_whose_own_set_up_fails_closes_what_the_base_opened(kind: str, tmp_path) -> None:
    """The worker may serve other jobs after this one: a subclass's failure (an
    unregistered payload kind, a snapshot file that is not there) closes the
    control and data sockets, the RAM mapping and the slot table the base opened,
    now, not at garbage collection."""
    ram = GuestRAM.create([("pc.ram", 1 << 20)])
    table = SlotTable.create(n_slots=2, max_items=16, payload_capacity=0, n_channels=1)
    main_end, chan_end = control_pair()
    ours, theirs = socket.socketpair()
    token = CancelToken()
    try:
        if kind == "send":
            spec = ChannelSpec(0, ram.handle, table.handle, PACKET_PAGES, payload_kinds=(99,))
            with pytest.raises(LocalProtocolError, match="no payload handler registered for kind 99"):
                _SendChannel(spec, chan_end, ours, token)
            assert ours.fileno() == -1
        else:
            target = FileTarget(str(tmp_path / "missing.snap"), "read", (0,))
            spec = ChannelSpec(0, ram.handle, table.handle, PACKET_PAGES, file=target)
            with pytest.raises(SnapshotError):
                _FileChannel(spec, chan_end, token)
        assert chan_end.fileno() == -1  # while the error (and its frames) is still held
    finally:
        for sock in (main_end, chan_end, ours, theirs):
            sock.close()
        token.close()
        table.close()
        table.unlink()
        ram.close()
        ram.unlink()
