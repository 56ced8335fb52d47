"""Shared memory: guest RAM blocks, their dirty maps, and raw segments.

This is the only module that creates, attaches or unlinks POSIX shared memory.
Everything else gets memoryviews and numpy views from here, and passes only
*names* (a :class:`RamHandle`, a segment name) between processes.

One segment per RAM block::

    offset 0                                   size            size + n_pages
    ├──────────── guest pages (4 KiB each) ─────┼── dirty map ──┤ (page aligned)
                                                  one byte per page: 1 = dirty

Ownership: exactly one process *creates* a segment and is its owner; only the
owner unlinks it.  Other processes *attach* by name.  Python 3.11's
``SharedMemory`` registers every attach with the resource tracker, which then
unlinks the segment when the attaching process exits; so attaching here goes
straight to ``shm_open`` + ``mmap`` and never registers.  The owner does
register, so the tracker cleans up if the owner itself dies (the tracker and the
count of registrations: engine/tracker.py).

Ownership can move (same-host migration, docs/architecture.md "Local
mode")::

    source:      create (owner, registered) ── disown(spare=True) at the commit: never
                 unlinks, unregistered (its exit removes nothing but the spare name it
                 keeps until the answer, to take the RAM back by: adopt(renamed=True))
    destination: from_fds (mapped from the descriptors the source sent, not
                 registered, never unlinks) ── adopt() at the commit: owner, registered

Registration is counted per process, so one process that both disowns and
adopts a segment (a test, or a VMM migrating to itself) leaves it registered
exactly once whatever the order, and the tracker is never told to forget a
name it was not given.

Space is reserved when a segment is created, never on first touch: /dev/shm
(tmpfs) allocates a page when it is first written, and a write that finds the
filesystem full is a SIGBUS that kills the process without a word.  So
:meth:`Segment.create` checks the free space of /dev/shm and the memory cgroup's
limit (less CGROUP_HEADROOM for the processes to come), then reserves the whole
segment with ``posix_fallocate``, which fails with ENOSPC instead; either way a
ConfigError names the size needed and the space free, and no segment is left
behind.  The check of that room is engine/space.py.

Dirty tracking (docs/architecture.md, "Shared memory"): the guest writes a page first, then sets its byte.
:meth:`DirtyMap.take` snapshots the map, clears exactly the entries it saw set,
and only then may the caller read those pages.  A write that lands after the
clear marks the page again, so it goes in the next round: nothing is lost.
Bytes, not bits, so concurrent writers never read-modify-write each other.
"""

from __future__ import annotations

import _posixshmem  # the primitive multiprocessing.shared_memory is built on
import contextlib
import errno
import logging
import mmap
import os
import secrets
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from engine.errors import ConfigError, LocalProtocolError
from engine.space import CGROUP_HEADROOM, SHM_DIR, check_space, no_space
from engine.tracker import register, unregister
from engine.units import size_text

log = logging.getLogger("multifd.shm")

PAGE_SIZE = 4096
# Every segment this project creates is named so.  MULTIFD_SEGMENT_TAG, when set
# (inherited by child processes), is added: a test run sets it to tell its own
# segments from those of any other run on the machine.
SEGMENT_PREFIX = "mfd-" + os.environ.get("MULTIFD_SEGMENT_TAG", "")
# madvise(2) since Linux 5.14; Python 3.11's mmap does not name them.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
#: How much of a block a channel maps at once when it first touches it (populate
#: "read"): large enough that one call replaces many faults, small enough
#: that a channel maps little beyond what it moves.
POPULATE_CHUNK = 2 << 20
_CHUNK_PAGES = POPULATE_CHUNK // PAGE_SIZE
#: Runs shorter than this fault their pages in as they are used: mapping a whole
#: piece for a few scattered pages (a late round's) would map ~512 for each.
POPULATE_MIN_PAGES = 64
#: False (faults as pages are used), True (everything at attach, MAP_POPULATE),
#: "read" (piece by piece on first use: RamBlock.prepare_pages; a shared tmpfs
#: page maps writable on a read fault, so writers use it too).
Populate = bool | Literal["read"]

# RAM whose dirty marks an operation of this process takes (a source's or a live
# save's rounds), by its first segment's name: what holds them (GuestRAM.lease_dirty).
_dirty_leases: dict[str, str] = {}
_dirty_leases_lock = threading.Lock()


def _inode(status: os.stat_result) -> tuple[int, int]:
    return (status.st_dev, status.st_ino)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class Segment:
    """One POSIX shared-memory segment mapped into this process.

    Create with :meth:`create` (this process becomes the owner) or :meth:`attach`.
    ``buf`` is a writable memoryview of the whole segment.  :meth:`close` unmaps;
    :meth:`unlink` (owner only) removes the name.  Views taken from ``buf`` must be
    released before :meth:`close`, or the mapping stays until they are collected.
    """

    def __init__(self, name: str, size: int, mapping: mmap.mmap, owner: bool,
                 inode: tuple[int, int] | None = None, fd: int = -1) -> None:
        self.name = name
        self.size = size
        self.owner = owner
        self._mmap: mmap.mmap | None = mapping
        self.buf: memoryview = memoryview(mapping)
        self._unlinked = False
        # (st_dev, st_ino) of a segment mapped from a descriptor: unlink removes
        # the name only while it still names this very file.
        self.inode = inode
        # Kept open by a segment this process created or was handed: what it
        # passes on to another process in a same-host migration (fileno()).
        self._fd = fd
        # A second name of this process's while another owns the first (disown(spare=True)).
        self._spare: str | None = None

    @classmethod
    def create(cls, size: int, *, name: str | None = None, prealloc: bool = False,
               what: str = "a shared-memory segment", keep_fd: bool = False, headroom: int = 0) -> Segment:
        """Create a zero-filled segment of `size` bytes; this process owns it.

        Every page is reserved now (``posix_fallocate``): a full /dev/shm fails
        here, never as a SIGBUS on some later write.  `prealloc` also touches
        each page (tmpfs zeroes a reserved page on first touch), so the
        migration's first write into the segment does not pay for the fault.
        Raises ConfigError when the segment cannot be created: name taken, or
        not enough shared memory for `what` (the message says how much is
        needed and free); nothing is left behind.  `keep_fd`: keep the descriptor
        open for :meth:`fileno` (guest RAM, which local mode hands over).
        `headroom`: memory a memory cgroup must have beyond `size` (check_space).
        """
        if size <= 0:
            raise ConfigError(f"segment size must be positive, got {size}")
        check_space(_round_up(size, PAGE_SIZE), what, headroom)
        name = name or f"{SEGMENT_PREFIX}{secrets.token_hex(8)}"
        path = "/" + name
        try:
            fd = _posixshmem.shm_open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        except OSError as exc:
            raise ConfigError(f"cannot create shared memory {name!r}: {exc}") from exc
        # Registered before any page is charged: a process the kernel kills while it
        # reserves them (the memory cgroup's OOM killer) leaves its tracker to unlink it.
        register(path)
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
            mapping = mmap.mmap(fd, size)
            if prealloc:
                np.frombuffer(mapping, dtype=np.uint8)[::PAGE_SIZE] = 0
        except BaseException as exc:
            os.close(fd)
            _posixshmem.shm_unlink(path)
            unregister(path)
            if not isinstance(exc, OSError):
                raise
            need = size_text(_round_up(size, PAGE_SIZE))
            if exc.errno == errno.ENOSPC:  # another process took the space since the check
                raise no_space(what, _round_up(size, PAGE_SIZE)) from exc
            if exc.errno == errno.ENOMEM:  # the memory cgroup could not charge the pages
                raise ConfigError(f"not enough memory for {what}: need {need}: {exc.strerror}") from exc
            raise ConfigError(f"cannot size shared memory {name!r} to {size} bytes: {exc}") from exc
        if not keep_fd:
            os.close(fd)
            fd = -1
        return cls(name, size, mapping, owner=True, fd=fd)

    @classmethod
    def attach(cls, name: str, populate: bool = False) -> Segment:
        """Map an existing segment by name, without registering it for cleanup.

        `populate` builds this process's page tables for the whole segment now
        (MAP_POPULATE), in one pass, instead of one page fault per page later.
        Raises ConfigError if no such segment exists.
        """
        try:
            fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        except OSError as exc:
            raise ConfigError(f"cannot attach shared memory {name!r}: {exc}") from exc
        try:
            status = os.fstat(fd)
            size = status.st_size
            if not stat.S_ISREG(status.st_mode) or size == 0:
                raise ConfigError(f"shared memory {name!r} is empty")
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
            mapping = mmap.mmap(fd, size, flags=flags)
        finally:
            os.close(fd)
        return cls(name, size, mapping, owner=False)

    @classmethod
    def from_fd(cls, fd: int, name: str, min_size: int) -> Segment:
        """Map the shared-memory file open on `fd` (a descriptor another process
        sent), known to that process as `name`; not registered, not owned.

        The descriptor is the segment, whatever the name now points at: nothing
        can race on the name.  Raises ConfigError unless `fd` is a regular file of
        the shared-memory filesystem (this host's, this namespace's) of at least
        `min_size` bytes.  The caller still closes `fd` (the mapping keeps its
        own reference).
        """
        try:
            status = os.fstat(fd)
            shm_dev = os.stat(SHM_DIR).st_dev
        except OSError as exc:
            raise ConfigError(f"cannot inspect the descriptor of shared memory {name!r}: {exc}") from exc
        if not stat.S_ISREG(status.st_mode) or status.st_dev != shm_dev:
            raise ConfigError(f"the descriptor sent for {name!r} is not a shared-memory segment "
                              f"of this host's {SHM_DIR}")
        if status.st_size < min_size:
            raise ConfigError(f"shared memory {name!r} has {status.st_size} bytes, {min_size} expected")
        try:
            mapping = mmap.mmap(fd, status.st_size, flags=mmap.MAP_SHARED)
        except OSError as exc:
            raise ConfigError(f"cannot map shared memory {name!r}: {exc}") from exc
        return cls(name, status.st_size, mapping, owner=False, inode=_inode(status),
                   fd=os.dup(fd))

    def fileno(self) -> int:
        """The open descriptor of a segment this process created or was handed
        (LocalProtocolError for one attached by name, or closed)."""
        if self._fd < 0:
            raise LocalProtocolError(f"shared memory {self.name!r} has no descriptor open here")
        return self._fd

    def adopt(self, renamed: bool = False) -> None:
        """Become the owner: unlink is ours to do, and the resource tracker
        removes the segment should this process die first.  Idempotent.

        Taking back a segment given up with a spare name: `renamed` makes the
        spare its name from now on, and removes the first if it still names this
        file (the other process may have owned it: its resource tracker removes
        that name when it dies); else the spare goes."""
        if self.owner:
            return
        self.owner = True
        self._unlinked = False
        spare, self._spare = self._spare, None
        if spare is None:
            register("/" + self.name)
            return
        if renamed:
            first, self.name = self.name, spare  # the spare is registered already
            if self._names_this_file(first):
                with contextlib.suppress(FileNotFoundError):  # the other tracker may be at it too
                    os.unlink(os.path.join(SHM_DIR, first))
            return
        register("/" + self.name)
        self._drop(spare)

    def disown(self, spare: bool = False) -> None:
        """Stop being the owner (another process owns it now): never unlink, and
        take the segment off this process's resource tracker, so exiting removes
        nothing.  Idempotent.

        `spare`: first give it a second name, this process's (registered, so our
        exit removes it), for :meth:`adopt` to take it back by should the other
        owner die with the first; :meth:`drop_spare` once that owner runs it."""
        if not self.owner:
            return
        if spare and self._spare is None:
            name = self.name + "-spare"
            try:
                os.link(os.path.join(SHM_DIR, self.name), os.path.join(SHM_DIR, name))
            except OSError as exc:
                log.warning("shared memory %s: no spare name (%s): taken back, it keeps its "
                            "first name, which its new owner's exit may remove", self.name, exc)
            else:
                register("/" + name)
                self._spare = name
        self.owner = False
        unregister("/" + self.name)

    def drop_spare(self) -> None:
        """The other owner keeps the segment: its spare name goes.  Idempotent."""
        spare, self._spare = self._spare, None
        if spare is not None:
            self._drop(spare)

    @staticmethod
    def _drop(name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, name))
        unregister("/" + name)

    def populate(self, start: int, length: int) -> bool:
        """Build this process's page tables for [start, start + length) now, in one
        call (MADV_POPULATE_READ, Linux 5.14), instead of one fault per page later
        (a read populate: writing would allocate the holes of a sparse segment).
        Answers False where the kernel cannot (the pages then fault in as used)."""
        if self._mmap is None:
            return False
        try:
            self._mmap.madvise(_MADV_POPULATE_READ, start, length)
        except OSError:
            return False
        return True

    def close(self) -> None:
        """Unmap now, or when the last view still in use is released.  Idempotent.

        Never raises: a failing job's traceback may still hold a page view, and
        closing must not mask that job's error.  Dropping our references lets
        the mapping go with the last view.
        """
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        if self._mmap is None:
            return
        mapping, self._mmap = self._mmap, None
        try:
            self.buf.release()
            mapping.close()
        except BufferError:
            pass

    def unlink(self) -> None:
        """Remove the segment's name (owner only).  Idempotent."""
        if not self.owner:
            raise LocalProtocolError(f"only the owner may unlink shared memory {self.name!r}")
        if self._unlinked:
            return
        self._unlinked = True
        path = "/" + self.name
        try:
            if self.inode is None or self._names_this_file():
                _posixshmem.shm_unlink(path)
        except FileNotFoundError:
            pass
        unregister(path)

    def _names_this_file(self, name: str | None = None) -> bool:
        """Whether `name` (this segment's own by default) names this very file."""
        try:
            status = os.stat(os.path.join(SHM_DIR, self.name if name is None else name))
        except FileNotFoundError:
            return False
        inode = self.inode if self.inode is not None or self._fd < 0 else _inode(os.fstat(self._fd))
        return _inode(status) == inode

    def __repr__(self) -> str:
        role = "owner" if self.owner else "attached"
        return f"<Segment {self.name} {self.size} bytes {role}>"


class DirtyMap:
    """One byte per page: 1 = written since the migration last took it.

    Writers (the guest) store the page, then call :meth:`mark`.  The migration
    calls :meth:`take`, which is the get-and-clear rule of engine/dirty.py.
    """

    def __init__(self, view: np.ndarray) -> None:
        self._map = view

    def __len__(self) -> int:
        return int(self._map.shape[0])

    def mark(self, first_page: int, n_pages: int = 1) -> None:
        """Mark a contiguous range dirty (call after writing the pages)."""
        self._map[first_page:first_page + n_pages] = 1

    def mark_pages(self, pages: np.ndarray) -> None:
        """Mark the given page indices dirty (call after writing them)."""
        self._map[pages] = 1

    def take_pages(self, pages: np.ndarray) -> np.ndarray:
        """Of the given page indices, those marked: return them and clear their marks."""
        marked = pages[self._map[pages].astype(bool)]
        self._map[marked] = 0
        return marked

    def count(self) -> int:
        """How many pages are dirty now (a peek: nothing is cleared)."""
        return int(np.count_nonzero(self._map))

    def take(self) -> np.ndarray:
        """Snapshot the dirty pages, clear exactly those entries, return them sorted.

        Read the returned pages only after this call returns: a page written
        after its entry was cleared is marked again and taken next time.
        """
        # Scan a copy: the guest keeps marking while we look, and numpy's nonzero
        # counts and then fills in two passes over its input, failing if the
        # count changes in between.  Clearing only what the copy saw keeps the
        # no-lost-update rule: a mark after the copy survives for next time.
        pages = np.flatnonzero(self._map.copy())
        self._map[pages] = 0
        return pages

    def clear_all(self) -> None:
        """Clear every entry (used when a round sends every page anyway)."""
        self._map[:] = 0

    def snapshot(self) -> np.ndarray:
        """A copy of the map (for tests and diagnostics)."""
        return self._map.copy()


@dataclass(frozen=True, slots=True)
class BlockHandle:
    """What another process needs to attach one RAM block."""

    name: str
    size: int
    segment: str


@dataclass(frozen=True, slots=True)
class RamHandle:
    """What another process needs to attach a GuestRAM: names and sizes only."""

    blocks: tuple[BlockHandle, ...]
    page_size: int = PAGE_SIZE


class RamBlock:
    """One named block of guest RAM in its own shared-memory segment."""

    def __init__(self, index: int, name: str, size: int, segment: Segment,
                 populate: Populate = False) -> None:
        self.index = index
        self.name = name
        self.size = size
        self.n_pages = size // PAGE_SIZE
        self.segment = segment
        self.pages: memoryview = segment.buf[:size]
        self.dirty = DirtyMap(np.frombuffer(segment.buf, dtype=np.uint8, count=self.n_pages, offset=size))
        # "read": page tables are built POPULATE_CHUNK at a time, on first use.
        self._populated: bytearray | None = None
        if populate == "read":
            self._populated = bytearray(-(-self.n_pages // _CHUNK_PAGES))

    def page_view(self, first_page: int, n_pages: int = 1) -> memoryview:
        """A writable view of `n_pages` pages starting at `first_page` (no copy)."""
        self.prepare_pages(first_page, n_pages)
        start = first_page * PAGE_SIZE
        return self.pages[start:start + n_pages * PAGE_SIZE]

    def prepare_pages_of_runs(self, firsts: np.ndarray, counts: np.ndarray) -> None:
        """:meth:`prepare_pages` for many runs of pages at once (arrays of first pages
        and counts): only the pieces the runs lie in, whatever the span between them."""
        done = self._populated
        if done is None:
            return
        long = counts >= POPULATE_MIN_PAGES
        firsts, counts = firsts[long], counts[long]
        if not len(firsts):
            return
        n = len(done)
        starts = np.minimum(firsts // _CHUNK_PAGES, n - 1)
        ends = np.minimum((firsts + np.maximum(counts, 1) - 1) // _CHUNK_PAGES, n - 1)
        # Each run covers pieces [start, end]: count the runs over each piece.
        covered = np.cumsum(np.bincount(starts, minlength=n + 1)
                            - np.bincount(ends + 1, minlength=n + 1))[:n] > 0
        needed = np.flatnonzero(covered & (np.frombuffer(done, dtype=np.uint8) == 0))
        if not needed.size:
            return
        breaks = np.flatnonzero(np.diff(needed) != 1)
        for first, last in zip(needed[np.r_[0, breaks + 1]].tolist(), needed[np.r_[breaks, -1]].tolist()):
            self.prepare_pages(first * _CHUNK_PAGES, (last - first + 1) * _CHUNK_PAGES)
            if self._populated is None:
                return

    def prepare_pages(self, first_page: int, n_pages: int) -> None:
        """Attached with populate "read": build this process's page tables
        for the POPULATE_CHUNK pieces holding these pages that it has not used yet,
        in one call each (so a process maps what it touches, not the whole block,
        and a long run never takes a fault per page).  Fewer than
        POPULATE_MIN_PAGES pages fault in as used.  Otherwise nothing."""
        done = self._populated
        if done is None or n_pages < POPULATE_MIN_PAGES:
            return
        first = first_page // _CHUNK_PAGES
        last = min((first_page + n_pages - 1) // _CHUNK_PAGES, len(done) - 1)
        chunk = first
        while chunk <= last:
            if done[chunk]:
                chunk += 1
                continue
            end = chunk
            while end + 1 <= last and not done[end + 1]:
                end += 1
            start = chunk * POPULATE_CHUNK
            length = min((end + 1) * POPULATE_CHUNK, self.size) - start
            if length <= 0:
                break
            if not self.segment.populate(start, length):
                self._populated = None  # the kernel cannot: let pages fault in
                return
            done[chunk:end + 1] = b"\1" * (end + 1 - chunk)
            chunk = end + 1

    def array(self) -> np.ndarray:
        """The block as a (n_pages, PAGE_SIZE) uint8 numpy view (no copy).

        Delete the array before closing the RAM.
        """
        return np.frombuffer(self.pages, dtype=np.uint8).reshape(self.n_pages, PAGE_SIZE)

    def _release(self) -> None:
        self.pages.release()
        self.dirty = DirtyMap(np.empty(0, dtype=np.uint8))


def _all_or_none(blocks: Iterator[RamBlock], unlink: bool) -> list[RamBlock]:
    """Every block `blocks` makes, or none: if one fails, those made already are
    unmapped (and their segments unlinked if `unlink`: this process created them)."""
    made: list[RamBlock] = []
    try:
        made.extend(blocks)
    except BaseException:
        for block in made:
            block._release()
            block.segment.close()
            if unlink:
                block.segment.unlink()
        raise
    return made


class GuestRAM:
    """A VM's guest memory: named blocks in shared memory, each with a dirty map.

    The VMM creates it (:meth:`create`, the owner) and its vCPU processes attach
    (:meth:`attach` with :attr:`handle`).  Use as a context manager, or call
    :meth:`close` (and :meth:`unlink`, owner only) when done.
    """

    def __init__(self, blocks: list[RamBlock], owner: bool) -> None:
        self.blocks: tuple[RamBlock, ...] = tuple(blocks)
        self.owner = owner
        self._by_name = {b.name: b for b in blocks}
        self._closed = False

    @classmethod
    def create(
        cls, blocks: Mapping[str, int] | Iterable[tuple[str, int]], *, prealloc: bool = False
    ) -> GuestRAM:
        """Create zero-filled RAM blocks ``{name: size}``; sizes are multiples of 4 KiB.

        Every page is reserved before any block is created: not enough shared
        memory is a ConfigError ("not enough shared memory for guest RAM: need
        2.0 GiB, /dev/shm has 1.1 GiB free"), never a SIGBUS later.  `prealloc`
        also touches every page now (the destination should: first touch of
        fresh memory costs as much as the copy).  Raises ConfigError.
        """
        pairs = blocks.items() if isinstance(blocks, Mapping) else blocks
        try:
            items = [(name, size) for name, size in pairs]
        except (TypeError, ValueError):
            wanted = "{name: size} or (name, size) pairs"
            raise ConfigError(f"guest RAM blocks are {wanted}, not {blocks!r}"[:300]) from None
        if not items:
            raise ConfigError("guest RAM needs at least one block")
        names = [name for name, _ in items]
        if len(set(names)) != len(names):
            raise ConfigError(f"RAM block names must be unique: {names}")
        for name, size in items:
            if not isinstance(name, str) or type(size) is not int:
                raise ConfigError(f"a RAM block is a name (str) and a size (int), got {name!r}: {size!r}")
            if not name or len(name.encode()) > 255:
                raise ConfigError(f"RAM block name must be 1..255 bytes: {name!r}")
            if size <= 0 or size % PAGE_SIZE:
                raise ConfigError(
                    f"RAM block {name!r} size {size} is not a positive multiple of {PAGE_SIZE}"
                )
        # Each block's segment holds its pages and its dirty map (page aligned).
        sizes = [size + _round_up(size // PAGE_SIZE, PAGE_SIZE) for _, size in items]
        # All blocks at once (the message names the total), and room in a memory cgroup
        # for the channels and fork server that start once RAM exists.
        check_space(sum(sizes), "guest RAM", CGROUP_HEADROOM)

        def made() -> Iterator[RamBlock]:
            for index, ((name, size), segment_size) in enumerate(zip(items, sizes)):
                segment = Segment.create(segment_size, prealloc=prealloc, what="guest RAM",
                                         keep_fd=True,  # local mode hands the descriptor over
                                         headroom=CGROUP_HEADROOM)
                yield RamBlock(index, name, size, segment)

        return cls(_all_or_none(made(), unlink=True), owner=True)

    @classmethod
    def attach(cls, handle: RamHandle, populate: Populate = False) -> GuestRAM:
        """Attach RAM created by another process.  Raises ConfigError.

        `populate` builds this process's page tables ahead of the page faults they
        would otherwise cost: True for all of the RAM now (MAP_POPULATE); "read"
        for each POPULATE_CHUNK piece when this process first takes a view
        of it (:meth:`RamBlock.page_view`, :meth:`RamBlock.prepare_pages`): what
        channel processes do, each mapping the pages it moves, for reading (send,
        save) or writing (receive, restore).
        """
        if not isinstance(handle, RamHandle):
            raise ConfigError(f"attach takes a GuestRAM's handle (ram.handle), not {type(handle).__name__}")

        def blocks() -> Iterator[RamBlock]:
            for index, spec in enumerate(handle.blocks):
                segment = Segment.attach(spec.segment, populate is True)
                if segment.size < spec.size + spec.size // PAGE_SIZE:
                    segment.close()
                    raise ConfigError(f"shared memory for block {spec.name!r} is too small")
                yield RamBlock(index, spec.name, spec.size, segment, populate)

        return cls(_all_or_none(blocks(), unlink=False), owner=False)

    @classmethod
    def from_fds(cls, layout: Iterable[tuple[str, int]], segments: Iterable[str],
                 fds: Iterable[int]) -> GuestRAM:
        """Map RAM handed over by another process as open descriptors (same-host
        migration): block ``(name, size)`` i lives in the segment open on fd i,
        which the sender calls ``segments[i]``.  Neither owned nor registered
        until :meth:`adopt`.  The caller closes the descriptors.  Raises ConfigError
        (counts differ, a descriptor that is not a big enough segment).
        """
        blocks, names, descriptors = list(layout), list(segments), list(fds)
        if not len(blocks) == len(names) == len(descriptors):
            raise ConfigError(f"{len(descriptors)} descriptors and {len(names)} segment names "
                              f"for {len(blocks)} RAM blocks")
        return cls(_all_or_none(
            (RamBlock(index, name, size, Segment.from_fd(fd, segment_name, size + size // PAGE_SIZE))
             for index, ((name, size), segment_name, fd) in enumerate(zip(blocks, names, descriptors))),
            unlink=False), owner=False)

    def adopt(self, renamed: bool = False) -> None:
        """Take ownership of RAM another process created (and gave up with :meth:`disown`),
        or take back RAM this process gave up (`renamed`: under its spare names,
        :meth:`Segment.adopt`): from now on this process unlinks it.  Idempotent."""
        for block in self.blocks:
            block.segment.adopt(renamed)
        self.owner = True

    def disown(self, spare: bool = False) -> None:
        """Give up ownership (another process has adopted the RAM): :meth:`unlink`
        and the context manager's exit no longer remove it, nor does this
        process's exit.  `spare`: keep a second name per block to take it back by
        (:meth:`Segment.disown`).  Idempotent."""
        self.owner = False
        for block in self.blocks:
            block.segment.disown(spare)

    def drop_spare(self) -> None:
        """The other process keeps the RAM: the spare names go.  Idempotent."""
        for block in self.blocks:
            block.segment.drop_spare()

    def lease_dirty(self, holder: str) -> Callable[[], None]:
        """Take this RAM's dirty marks for `holder` (an operation's rounds take and
        clear them: two at once would each miss the pages the other took, and
        report success with stale pages).  Returns the release; ConfigError if
        another operation of this process holds them.  Within this process only,
        by the first segment's name: other processes are the VMM's to keep apart."""
        key = self.blocks[0].segment.name
        with _dirty_leases_lock:
            if key in _dirty_leases:
                raise ConfigError(f"this guest RAM is already being saved or migrated "
                                  f"({_dirty_leases[key]}): its dirty pages can feed one operation "
                                  f"at a time")
            _dirty_leases[key] = holder

        def release() -> None:
            with _dirty_leases_lock:
                if _dirty_leases.get(key) == holder:
                    del _dirty_leases[key]
        return release

    @property
    def handle(self) -> RamHandle:
        return RamHandle(tuple(BlockHandle(b.name, b.size, b.segment.name) for b in self.blocks))

    @property
    def layout(self) -> tuple[tuple[str, int], ...]:
        """``((name, size), ...)`` in block order."""
        return tuple((b.name, b.size) for b in self.blocks)

    @property
    def size(self) -> int:
        return sum(b.size for b in self.blocks)

    @property
    def n_pages(self) -> int:
        return sum(b.n_pages for b in self.blocks)

    def block(self, name: str) -> RamBlock:
        try:
            return self._by_name[name]
        except KeyError:
            raise ConfigError(f"no RAM block named {name!r}") from None

    def dirty_pages(self) -> int:
        """Pages dirty right now, over all blocks (a peek)."""
        return sum(b.dirty.count() for b in self.blocks)

    def close(self) -> None:
        """Unmap every block (idempotent).  Release your own views first."""
        if self._closed:
            return
        self._closed = True
        for block in self.blocks:
            block._release()
            block.segment.close()

    def unlink(self) -> None:
        """Remove every block's segment (owner only; idempotent)."""
        if not self.owner:
            raise LocalProtocolError("only the owner may unlink guest RAM (this process does not own it)")
        for block in self.blocks:
            block.segment.unlink()

    def __enter__(self) -> GuestRAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self.owner:
            self.unlink()

    def __repr__(self) -> str:
        blocks = ", ".join(f"{b.name}={b.size}" for b in self.blocks)
        return f"<GuestRAM {blocks} {'owner' if self.owner else 'attached'}>"
