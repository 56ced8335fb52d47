"""Shared memory (engine/shm.py): segments, guest RAM blocks and dirty maps.

Every test creates real POSIX shared memory and removes it again; the
``no_leaks`` fixture fails a test that leaves a segment, an fd (a live mapping
holds one), a thread or a child process behind.  Views of a block (its dirty
map, page views, arrays) are dropped before the RAM is closed, as the module's
contract asks.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import time
from multiprocessing import resource_tracker

import numpy as np
import pytest

from engine.errors import ConfigError, LocalProtocolError
from engine.shm import PAGE_SIZE, BlockHandle, GuestRAM, RamHandle, Segment
from tests.leaks import shm_segments

pytestmark = pytest.mark.usefixtures("no_leaks")


@pytest.fixture
def ram() -> GuestRAM:
    """An owned RAM of two blocks: ``main`` (64 pages) and ``vga`` (4 pages)."""
    guest = GuestRAM.create({"main": 64 * PAGE_SIZE, "vga": 4 * PAGE_SIZE})
    yield guest
    guest.close()
    guest.unlink()


# ---------------------------------------------------------------------------
# DirtyMap


def test_dirty_map_starts_clean(ram: GuestRAM) -> None:
    block = ram.block("main")
    assert len(block.dirty) == 64
    assert block.dirty.count() == 0
    assert ram.dirty_pages() == 0
    taken = block.dirty.take()
    assert taken.size == 0
    assert np.issubdtype(taken.dtype, np.integer)


def test_mark_and_mark_pages_set_exactly_those_pages(ram: GuestRAM) -> None:
    block = ram.block("main")
    block.dirty.mark(5)
    block.dirty.mark(10, 3)
    block.dirty.mark_pages(np.array([63, 0, 11], dtype=np.int64))
    assert block.dirty.count() == 6
    assert ram.block("vga").dirty.count() == 0
    assert ram.dirty_pages() == 6
    expected = np.zeros(64, dtype=np.uint8)
    expected[[0, 5, 10, 11, 12, 63]] = 1
    np.testing.assert_array_equal(block.dirty.snapshot(), expected)


def test_take_returns_marked_pages_sorted_and_clears_them(ram: GuestRAM) -> None:
    block = ram.block("main")
    block.dirty.mark_pages(np.array([40, 3, 17, 63, 0], dtype=np.int64))
    block.dirty.mark(20, 2)
    taken = block.dirty.take()
    assert taken.tolist() == [0, 3, 17, 20, 21, 40, 63]
    assert block.dirty.count() == 0
    assert not block.dirty.snapshot().any()
    assert block.dirty.take().size == 0


def test_mark_after_take_is_seen_by_next_take(ram: GuestRAM) -> None:
    """The no-lost-update rule: a page written after take() goes in the next round."""
    block = ram.block("main")
    block.dirty.mark(7)
    assert block.dirty.take().tolist() == [7]
    block.dirty.mark(7)  # the same page written again after its entry was cleared
    block.dirty.mark(9)
    assert block.dirty.count() == 2
    assert block.dirty.take().tolist() == [7, 9]
    assert block.dirty.take().tolist() == []


def _mark_each_page_once(handle: RamHandle, block_name: str) -> None:
    """Child process (spawn): the guest contract, every page of a block marked once."""
    ram = GuestRAM.attach(handle)
    block = ram.block(block_name)
    for page in np.random.default_rng(7).permutation(block.n_pages).tolist():
        block.dirty.mark(page)
    ram.close()


def test_take_while_another_process_marks_takes_every_page_exactly_once() -> None:
    """The guest (another process) marks while the migration takes, as in every precopy round.

    Each page is marked once, so over all takes each page must come back exactly once:
    a lost mark is a page never sent, a repeated one a mark take() failed to clear.
    """
    n_pages = 65536  # 256 MiB of sparse shared memory; only the dirty map is touched
    ram = GuestRAM.create({"big": n_pages * PAGE_SIZE})
    errors: list[str] = []
    taken: list[np.ndarray] = []
    child = multiprocessing.get_context("spawn").Process(
        target=_mark_each_page_once, args=(ram.handle, "big")
    )
    try:
        child.start()
        try:
            while child.is_alive():
                taken.append(ram.blocks[0].dirty.take())
        except RuntimeError as exc:  # keep only the message: its traceback holds a map view
            errors.append(str(exc))
        child.join(30)
        exitcode = child.exitcode
        taken.append(ram.blocks[0].dirty.take())
    finally:
        if child.exitcode is None:
            child.kill()
            child.join()
        child.close()
        ram.close()
        ram.unlink()
    assert exitcode == 0
    assert not errors, f"take() raised while the guest was writing: {errors[0]}"
    all_taken = np.sort(np.concatenate(taken))
    np.testing.assert_array_equal(all_taken, np.arange(n_pages))


def test_clear_all(ram: GuestRAM) -> None:
    block = ram.block("main")
    block.dirty.mark(0, 64)
    assert block.dirty.count() == 64
    block.dirty.clear_all()
    assert block.dirty.count() == 0
    assert block.dirty.take().size == 0


def test_snapshot_is_a_copy(ram: GuestRAM) -> None:
    block = ram.block("main")
    block.dirty.mark(1)
    snap = block.dirty.snapshot()
    snap[2] = 1          # changing the copy does not mark the page
    block.dirty.mark(3)  # and marking later does not change the copy
    assert snap.tolist()[:4] == [0, 1, 1, 0]
    assert block.dirty.take().tolist() == [1, 3]
    assert snap[1] == 1


def test_dirty_maps_are_per_block(ram: GuestRAM) -> None:
    ram.block("vga").dirty.mark(3)
    assert ram.block("main").dirty.take().size == 0
    assert ram.block("vga").dirty.take().tolist() == [3]


def test_dirty_map_does_not_overlap_pages(ram: GuestRAM) -> None:
    """The map lives after the pages: filling every page leaves the map clean."""
    block = ram.block("main")
    array = block.array()
    array[:] = 0xFF
    del array
    assert block.dirty.count() == 0
    block.dirty.mark(0, block.n_pages)
    assert bytes(block.page_view(block.n_pages - 1)) == b"\xff" * PAGE_SIZE


# ---------------------------------------------------------------------------
# GuestRAM: creation and properties


def test_create_from_dict_layout_and_properties() -> None:
    before = shm_segments()
    ram = GuestRAM.create({"main": 8 * PAGE_SIZE, "rom": PAGE_SIZE})
    try:
        assert ram.owner
        assert ram.layout == (("main", 8 * PAGE_SIZE), ("rom", PAGE_SIZE))
        assert ram.size == 9 * PAGE_SIZE
        assert ram.n_pages == 9
        assert [b.index for b in ram.blocks] == [0, 1]
        assert [b.n_pages for b in ram.blocks] == [8, 1]
        handle = ram.handle
        assert isinstance(handle, RamHandle)
        assert handle.page_size == PAGE_SIZE
        assert handle.blocks == (
            BlockHandle("main", 8 * PAGE_SIZE, ram.blocks[0].segment.name),
            BlockHandle("rom", PAGE_SIZE, ram.blocks[1].segment.name),
        )
        assert shm_segments() - before == {b.segment.name for b in ram.blocks}
        assert len(ram.blocks[0].pages) == 8 * PAGE_SIZE
        assert bytes(ram.block("main").page_view(0, 8)) == bytes(8 * PAGE_SIZE)  # zero-filled
        assert ram.block("rom") is ram.blocks[1]
    finally:
        ram.close()
        ram.unlink()
    assert shm_segments() == before


def test_create_from_pairs_keeps_order() -> None:
    ram = GuestRAM.create([("z", 2 * PAGE_SIZE), ("a", PAGE_SIZE), ("m", 3 * PAGE_SIZE)])
    try:
        assert ram.layout == (("z", 2 * PAGE_SIZE), ("a", PAGE_SIZE), ("m", 3 * PAGE_SIZE))
        assert ram.n_pages == 6
        assert [h.name for h in ram.handle.blocks] == ["z", "a", "m"]
    finally:
        ram.close()
        ram.unlink()


def test_block_name_of_255_bytes_is_allowed() -> None:
    ram = GuestRAM.create([("n" * 255, PAGE_SIZE)])
    try:
        assert ram.block("n" * 255).size == PAGE_SIZE
    finally:
        ram.close()
        ram.unlink()


@pytest.mark.parametrize(
    "blocks",
    [
        pytest.param({}, id="no-blocks"),
        pytest.param([], id="no-pairs"),
        pytest.param({"main": 0}, id="size-zero"),
        pytest.param({"main": -PAGE_SIZE}, id="size-negative"),
        pytest.param({"main": PAGE_SIZE + 1}, id="size-not-page-multiple"),
        pytest.param({"main": PAGE_SIZE - 1}, id="size-under-a-page"),
        pytest.param({"": PAGE_SIZE}, id="name-empty"),
        pytest.param({"n" * 256: PAGE_SIZE}, id="name-256-bytes"),
        pytest.param({"é" * 128: PAGE_SIZE}, id="name-256-utf8-bytes"),
        pytest.param([("main", PAGE_SIZE), ("main", PAGE_SIZE)], id="duplicate-names"),
        # A bad block after good ones: the good ones already have segments.
        pytest.param([("a", PAGE_SIZE), ("b", 2 * PAGE_SIZE), ("c", 100)], id="bad-last-block"),
        pytest.param([("a", PAGE_SIZE), ("", PAGE_SIZE)], id="bad-last-name"),
    ],
)
def test_invalid_ram_raises_config_error_and_leaves_no_segment(blocks: object) -> None:
    before = shm_segments()
    with pytest.raises(ConfigError):
        GuestRAM.create(blocks)  # type: ignore[arg-type]
    assert shm_segments() == before


def test_unknown_block_raises_config_error(ram: GuestRAM) -> None:
    with pytest.raises(ConfigError, match="nope"):
        ram.block("nope")


def test_prealloc_creates_zeroed_writable_ram() -> None:
    ram = GuestRAM.create({"main": 16 * PAGE_SIZE}, prealloc=True)
    try:
        block = ram.block("main")
        array = block.array()
        assert array.shape == (16, PAGE_SIZE)
        assert not array.any()
        array[15, -1] = 0x5A
        del array
        assert block.dirty.count() == 0
        assert bytes(block.page_view(15))[-1] == 0x5A
    finally:
        ram.close()
        ram.unlink()


def test_context_manager_closes_and_unlinks_owner() -> None:
    before = shm_segments()
    with GuestRAM.create({"main": PAGE_SIZE}) as ram:
        assert len(shm_segments() - before) == 1
    assert shm_segments() == before
    ram.close()   # still idempotent afterwards
    ram.unlink()


def test_page_view_and_array_address_the_same_bytes(ram: GuestRAM) -> None:
    block = ram.block("main")
    view = block.page_view(3, 2)
    assert len(view) == 2 * PAGE_SIZE
    view[PAGE_SIZE:PAGE_SIZE + 4] = b"abcd"
    view.release()
    array = block.array()
    assert bytes(array[4, :4]) == b"abcd"
    assert not array[3].any()
    del array


# ---------------------------------------------------------------------------
# GuestRAM: attach, ownership, close / unlink


def test_attach_in_same_process_shares_pages_and_dirty_maps(ram: GuestRAM) -> None:
    other = GuestRAM.attach(ram.handle)
    try:
        assert not other.owner
        assert other.layout == ram.layout
        assert other.handle == ram.handle
        # owner → attached
        ram.block("main").page_view(2)[:8] = b"owner-->"
        ram.block("main").dirty.mark(2)
        assert bytes(other.block("main").page_view(2)[:8]) == b"owner-->"
        assert other.block("main").dirty.take().tolist() == [2]
        assert ram.block("main").dirty.count() == 0
        # attached → owner
        other.block("vga").page_view(3)[-8:] = b"<--other"
        other.block("vga").dirty.mark(3)
        assert bytes(ram.block("vga").page_view(3)[-8:]) == b"<--other"
        assert ram.block("vga").dirty.take().tolist() == [3]
    finally:
        other.close()


def test_attach_with_populate(ram: GuestRAM) -> None:
    ram.block("main").page_view(63)[:3] = b"end"
    other = GuestRAM.attach(ram.handle, populate=True)
    try:
        assert bytes(other.block("main").page_view(63)[:3]) == b"end"
    finally:
        other.close()


def _rss_kib(block) -> int:
    """This process's resident kB in `block`'s mapping (page tables built), from smaps."""
    anchor = ctypes.c_char.from_buffer(block.segment.buf)
    address = ctypes.addressof(anchor)
    del anchor
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and len(line.split()) >= 5:
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "Rss:":
                return int(line.split()[1])
    raise AssertionError("mapping not found")


def test_populate_on_first_use_maps_only_the_chunks_touched() -> None:
    """populate="read": a view maps the 2 MiB pieces it lies in, once, and no more;
    the block's last piece is cut at its end.  (A read fault also maps up to 64 KiB
    of cached neighbours, the kernel's fault-around: the slack allowed.)"""

    def mapped(kib: int) -> bool:
        return kib <= _rss_kib(block) <= kib + 64

    size = 5 << 20  # 2 MiB pieces: [0, 2), [2, 4), [4, 5) MiB
    with GuestRAM.create({"big": size}, prealloc=True) as owner:
        other = GuestRAM.attach(owner.handle, populate="read")
        try:
            block = other.block("big")
            assert _rss_kib(block) == 0
            block.page_view(600, 64)  # pages 600.. are in piece 1
            assert mapped(2048)
            block.page_view(601, 100)
            assert mapped(2048)  # already mapped: nothing more
            block.prepare_pages(1200, 80)  # piece 2 (1 MiB, the block's end)
            assert mapped(3072)
            block.prepare_pages(0, 63)  # a short run: its pages fault in as used
            assert mapped(3072)
            block.prepare_pages(0, 64)
            assert mapped(5120)
        finally:
            other.close()


def test_populating_runs_maps_their_pieces_not_the_span_between() -> None:
    """A slot's runs map the pieces holding them, not the span between; a short run
    (a late round's scattered pages) maps nothing ahead: its pages fault in."""
    with GuestRAM.create({"big": 9 << 20}, prealloc=True) as owner:  # pieces 0..4, the last 1 MiB
        other = GuestRAM.attach(owner.handle, populate="read")
        try:
            block = other.block("big")

            def mapped(kib: int) -> bool:
                return kib <= _rss_kib(block) <= kib + 256  # the kernel's fault-around
            block.prepare_pages_of_runs(np.array([10, 5, 1900]), np.array([64, 1, 64]))
            assert mapped(4096)  # pieces 0 and 3, not 1 and 2
            block.prepare_pages_of_runs(np.array([1100, 2300]), np.array([1, 4]))
            assert mapped(4096)  # short runs: nothing ahead
            block.prepare_pages_of_runs(np.array([2240]), np.array([64]))
            assert mapped(5120)  # the block's last 64 pages: its piece is 1 MiB
            block.prepare_pages_of_runs(np.array([500]), np.array([600]))
            assert mapped(9216)  # a run over pieces 0..2 maps 1 and 2 too
        finally:
            other.close()


def test_only_the_owner_may_unlink(ram: GuestRAM) -> None:
    other = GuestRAM.attach(ram.handle)
    try:
        with pytest.raises(LocalProtocolError):
            other.unlink()
        with pytest.raises(LocalProtocolError):
            other.blocks[0].segment.unlink()
    finally:
        other.close()
    # The failed unlink removed nothing: the segments are still attachable.
    again = GuestRAM.attach(ram.handle)
    again.close()


def test_close_and_unlink_are_idempotent() -> None:
    before = shm_segments()
    ram = GuestRAM.create({"main": 2 * PAGE_SIZE})
    other = GuestRAM.attach(ram.handle)
    other.close()
    other.close()
    ram.close()
    ram.close()
    ram.unlink()
    ram.unlink()
    assert shm_segments() == before


def test_attached_ram_survives_owner_unlink_until_closed() -> None:
    ram = GuestRAM.create({"main": PAGE_SIZE})
    other = GuestRAM.attach(ram.handle)
    ram.block("main").page_view(0)[:2] = b"hi"
    ram.close()
    ram.unlink()
    try:
        assert bytes(other.block("main").page_view(0)[:2]) == b"hi"
        with pytest.raises(ConfigError):
            GuestRAM.attach(other.handle)  # the name is gone
    finally:
        other.close()


def test_attach_missing_segment_raises_config_error(ram: GuestRAM) -> None:
    first = ram.handle.blocks[0]
    missing = BlockHandle("gone", PAGE_SIZE, "mfd-test-no-such-segment")
    # The first block attaches, then the second fails: the first is released again.
    with pytest.raises(ConfigError):
        GuestRAM.attach(RamHandle((first, missing)))


def test_attach_handle_larger_than_segment_raises_config_error(ram: GuestRAM) -> None:
    block = ram.handle.blocks[1]
    too_big = BlockHandle(block.name, block.size * 4, block.segment)
    with pytest.raises(ConfigError, match="too small"):
        GuestRAM.attach(RamHandle((ram.handle.blocks[0], too_big)))


def _attach_write_mark(handle: RamHandle, block_name: str, page: int, data: bytes) -> None:
    """Child process (spawn): attach, write a page, mark it dirty, close, exit.

    The child first forgets the resource tracker it shares with its parent, so
    it behaves like an independent process: had attach registered the segment,
    a private tracker would start now and unlink the segment when this process
    exits, which is the Python 3.11 pitfall the module avoids.
    """
    tracker = resource_tracker._resource_tracker
    if tracker._fd is not None:
        os.close(tracker._fd)
    tracker._fd = None
    tracker._pid = None
    ram = GuestRAM.attach(handle)
    block = ram.block(block_name)
    block.page_view(page)[: len(data)] = data
    block.dirty.mark(page)
    ram.close()
    if tracker._pid is not None:
        raise SystemExit(3)  # attach registered the segment with a resource tracker


def test_child_process_attaches_writes_marks_and_does_not_unlink(ram: GuestRAM) -> None:
    before = shm_segments()
    assert _run_child(_attach_write_mark, ram.handle, "main", 41, b"from the child") == 0
    assert shm_segments() == before  # the child's exit removed nothing
    block = ram.block("main")
    assert bytes(block.page_view(41)[:14]) == b"from the child"
    assert block.dirty.take().tolist() == [41]
    # And another process can still attach by name.
    again = GuestRAM.attach(ram.handle)
    assert bytes(again.block("main").page_view(41)[:14]) == b"from the child"
    again.close()


# ---------------------------------------------------------------------------
# Segment


def test_segment_create_attach_roundtrip() -> None:
    before = shm_segments()
    owner = Segment.create(3 * PAGE_SIZE)
    try:
        assert owner.owner
        assert owner.size == 3 * PAGE_SIZE
        assert len(owner.buf) == 3 * PAGE_SIZE
        assert shm_segments() - before == {owner.name}
        other = Segment.attach(owner.name)
        try:
            assert not other.owner
            assert other.size == owner.size
            owner.buf[100:103] = b"abc"
            assert bytes(other.buf[100:103]) == b"abc"
            with pytest.raises(LocalProtocolError):
                other.unlink()
        finally:
            other.close()
            other.close()
    finally:
        owner.close()
        owner.unlink()
        owner.unlink()
    assert shm_segments() == before


def test_segment_create_with_name_taken_raises_config_error() -> None:
    owner = Segment.create(PAGE_SIZE)
    try:
        with pytest.raises(ConfigError):
            Segment.create(PAGE_SIZE, name=owner.name)
    finally:
        owner.close()
        owner.unlink()


@pytest.mark.parametrize("size", [0, -1])
def test_segment_create_invalid_size_raises_config_error(size: int) -> None:
    before = shm_segments()
    with pytest.raises(ConfigError):
        Segment.create(size)
    assert shm_segments() == before


def test_segment_attach_missing_name_raises_config_error() -> None:
    with pytest.raises(ConfigError):
        Segment.attach("mfd-test-no-such-segment")


# ---------------------------------------------------------------------------
# Ownership that moves: descriptors, adopt and disown (same-host migration)


def _private_tracker() -> None:
    """In a spawned child: forget the parent's resource tracker, so this process
    gets its own (started on first use) and behaves like an independent VMM."""
    tracker = resource_tracker._resource_tracker
    if tracker._fd is not None:
        os.close(tracker._fd)
    tracker._fd = None
    tracker._pid = None


def _run_child(target: object, *args: object) -> int | None:
    child = multiprocessing.get_context("spawn").Process(target=target, args=args)
    child.start()
    child.join(30)
    exitcode = child.exitcode
    if exitcode is None:
        child.kill()
        child.join()
    child.close()
    return exitcode


def test_ram_from_descriptors_maps_the_same_pages_and_owns_nothing(ram: GuestRAM) -> None:
    before = shm_segments()
    fds = [block.segment.fileno() for block in ram.blocks]
    other = GuestRAM.from_fds(ram.layout, [b.segment.name for b in ram.blocks], fds)
    try:
        assert not other.owner and other.layout == ram.layout
        ram.block("main").page_view(7)[:5] = b"guest"
        assert bytes(other.block("main").page_view(7)[:5]) == b"guest"
        other.block("vga").dirty.mark(2)
        assert ram.block("vga").dirty.take().tolist() == [2]
        with pytest.raises(LocalProtocolError):
            other.unlink()
    finally:
        other.close()
    assert shm_segments() == before  # closing the mapped copy removed nothing
    assert bytes(ram.block("main").page_view(7)[:5]) == b"guest"


def test_from_descriptors_refuses_what_is_not_a_big_enough_segment(ram: GuestRAM, tmp_path) -> None:
    fds = [block.segment.fileno() for block in ram.blocks]
    with pytest.raises(ConfigError, match="2 descriptors and 1 segment names for 2 RAM blocks"):
        GuestRAM.from_fds(ram.layout, ["a"], fds)
    with pytest.raises(ConfigError, match="bytes,"):  # the layout says more than the segment holds
        GuestRAM.from_fds([("main", 128 * PAGE_SIZE), ("vga", 4 * PAGE_SIZE)], ["a", "b"], fds)
    with open(tmp_path / "not-shm", "wb+") as f:  # a regular file, but not of /dev/shm
        f.truncate(1 << 20)
        with pytest.raises(ConfigError, match="not a shared-memory segment"):
            GuestRAM.from_fds([("main", PAGE_SIZE)], ["x"], [f.fileno()])


def test_disowned_ram_is_never_unlinked_by_its_former_owner() -> None:
    before = shm_segments()
    source = GuestRAM.create({"main": 8 * PAGE_SIZE})
    destination = GuestRAM.from_fds(source.layout, [source.blocks[0].segment.name],
                                    [source.blocks[0].segment.fileno()])
    source.disown()
    destination.adopt()
    with source:  # the context manager's exit only closes a RAM it does not own
        pass
    with pytest.raises(LocalProtocolError):
        source.unlink()
    assert shm_segments() - before == {destination.blocks[0].segment.name}
    destination.close()
    destination.unlink()
    assert shm_segments() == before


def test_adopter_unlinks_only_the_file_it_was_handed() -> None:
    before = shm_segments()
    source = GuestRAM.create({"main": 8 * PAGE_SIZE})
    segment = source.blocks[0].segment
    destination = GuestRAM.from_fds(source.layout, [segment.name], [segment.fileno()])
    source.close()
    source.unlink()
    # Someone else creates a segment under the same name: it is not ours to remove.
    impostor = Segment.create(PAGE_SIZE, name=segment.name)
    try:
        destination.adopt()
        destination.close()
        destination.unlink()
        assert impostor.name in shm_segments()
    finally:
        impostor.close()
        impostor.unlink()
    assert shm_segments() == before


def _create_disown_exit(names: multiprocessing.connection.Connection) -> None:
    _private_tracker()
    ram = GuestRAM.create({"main": 4 * PAGE_SIZE})
    ram.block("main").page_view(1)[:4] = b"kept"
    names.send(ram.handle)
    ram.disown()
    ram.close()  # exit: its tracker must not unlink what it no longer owns


def test_a_process_that_disowned_its_ram_exits_without_removing_it() -> None:
    before = shm_segments()
    parent, child = multiprocessing.Pipe()
    assert _run_child(_create_disown_exit, child) == 0
    handle = parent.recv()
    parent.close()
    child.close()
    ram = GuestRAM.attach(handle)  # still there after the creator exited
    try:
        assert bytes(ram.block("main").page_view(1)[:4]) == b"kept"
    finally:
        ram.adopt()  # ours now, to clean up
        ram.close()
        ram.unlink()
    assert shm_segments() == before


def _adopt_and_die(sock: object, order: str) -> None:
    """Take the RAM sent over `sock` and own it; exit without unlinking (a crash):
    this process's tracker must remove it.  `order` "twice" first adopts a
    second mapping of the same segments and disowns it, in the given order."""
    import socket
    _private_tracker()
    assert isinstance(sock, socket.socket)
    _, fds, _, _ = socket.recv_fds(sock, 1024, 8)
    layout = [("main", 4 * PAGE_SIZE)]
    names = sock.recv(1024).decode().split(",")
    ram = GuestRAM.from_fds(layout, names, fds)
    if order == "adopt-then-disown":
        second = GuestRAM.from_fds(layout, names, fds)
        ram.adopt()
        second.adopt()
        second.disown()
    elif order == "disown-then-adopt":
        second = GuestRAM.from_fds(layout, names, fds)
        second.adopt()
        second.disown()
        ram.adopt()
    else:
        ram.adopt()
    os._exit(0)  # no cleanup at all: the tracker is what removes it


@pytest.mark.parametrize("order", ["once", "adopt-then-disown", "disown-then-adopt"])
def test_the_adopter_s_resource_tracker_removes_the_ram_when_it_dies(order: str) -> None:
    import socket
    before = shm_segments()
    ram = GuestRAM.create({"main": 4 * PAGE_SIZE})
    name = ram.blocks[0].segment.name
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        socket.send_fds(ours, [b"x"], [ram.blocks[0].segment.fileno()])
        ours.sendall(name.encode())
        ram.disown()  # as a source does at COMMIT
        assert _run_child(_adopt_and_die, theirs, order) == 0
        deadline = time.monotonic() + 10
        while name in shm_segments() and time.monotonic() < deadline:
            time.sleep(0.05)  # the tracker notices its process ended, then unlinks
        assert name not in shm_segments()
    finally:
        ours.close()
        theirs.close()
        ram.close()
    assert shm_segments() == before
