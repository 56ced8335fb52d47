"""The file transport: positional I/O on a snapshot file (mapped-ram).

Where a socket transport streams buffers, this one writes each buffer at a
fixed offset (``os.pwritev``) and reads it back from there (``os.preadv``), so
N channel processes, each with its own descriptor on the same file, move guest
pages straight between shared memory and the file in parallel, with no copy in
Python.  What goes at which offset is the snapshot format's business
(engine/wire/snapshot_format.py); this module only moves bytes and makes them durable.

A save writes to a hidden *partial* file next to the target and publishes it
with ``rename`` once everything is on disk (fsync of the file, then of the
directory); a failed save removes it.  So the target path only ever names a
complete snapshot, and an older one there stays intact until the new one is.

A save that dies (SIGKILL, power loss) cannot remove its partial file, so the
name says whose it is, ``.NAME.partial-PID-RANDOM``, and the save holds an
exclusive ``flock`` on it while it runs (the kernel drops it however the
process ends).  A partial file is *stale* when nobody holds its lock, unless it
is new (younger than :data:`LOCK_WINDOW_S`: a save creates the file, then locks
it) and process PID runs here; the next save to the same target removes the stale
partial files of that target first (each with a warning), and leaves those of a
save still running.  :func:`partial_files` lists them for ``multifd inspect DIR``.

``O_DIRECT`` (``direct_io=True``) bypasses the page cache where the filesystem
supports it; guest pages are page-aligned and the format puts pages at
page-aligned offsets, which is all it asks.  Where it is not supported the
open fails with a clear SnapshotError.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from engine.errors import SnapshotError
from engine.scatter import Buffer, advance, batch, flat_views
from engine.transport import register_file_transport
from engine.units import size_text

log = logging.getLogger("multifd.file")

Mode = Literal["create", "write", "read"]
# .NAME.partial-PID-RANDOM: the target's name, and the pid of the save writing it.
_PARTIAL_NAME = re.compile(r"\.(?P<target>.+)\.partial-(?P<pid>\d+)-[0-9a-f]+")

_STEP = 64 << 20  # bytes per call at most: keeps one call's pinned pages bounded

#: A new partial file whose pid runs is a save between creating and locking it
#: (microseconds); past this age only the lock says a save is alive.  A pid alone
#: cannot: after a reboot or a container's restart another process has it, often
#: the next save itself.
LOCK_WINDOW_S = 10.0
_PID_MAX = 1 << 22  # Linux's PID_MAX_LIMIT: a larger number names no process


class SnapshotFile:
    """One open descriptor on a snapshot file, for positional reads and writes.

    Positional calls share no file position, so threads and processes may use
    their own descriptors on the same file at once.
    """

    def __init__(self, path: str, fd: int, partial_of: str | None = None) -> None:
        self.path = path
        self.fd = fd
        self.partial_of = partial_of  # the target a partial file will be renamed to

    def _error(self, exc: OSError, what: str) -> SnapshotError:
        return SnapshotError(f"cannot {what} {self.path}: {exc.strerror or exc}")

    def write_at(self, offset: int, buffers: Sequence[Buffer]) -> int:
        """Write every byte of `buffers`, in order, from file offset `offset`."""
        views = flat_views(buffers)
        total = sum(v.nbytes for v in views)
        start = 0
        try:
            while start < len(views):
                done = os.pwritev(self.fd, batch(views, start, _STEP), offset)
                offset += done
                start = advance(views, start, done)
        except OSError as exc:
            raise self._error(exc, "write") from exc
        return total

    def read_into(self, offset: int, buffers: Sequence[Buffer]) -> int:
        """Fill every buffer from file offset `offset`.  A file that ends first
        is a SnapshotError (whether that makes the snapshot damaged is for the
        format's reader to say: it checks the layout against the size first)."""
        views = flat_views(buffers)
        total = sum(v.nbytes for v in views)
        first, start = offset, 0
        try:
            while start < len(views):
                done = os.preadv(self.fd, batch(views, start, _STEP), offset)
                if done == 0:  # its size now, not where this read stopped: it may have shrunk
                    raise SnapshotError(f"cannot read {self.path}: it ends at {self.size()}, "
                                        f"{total} bytes from offset {first} were asked for")
                offset += done
                start = advance(views, start, done)
        except OSError as exc:
            raise self._error(exc, "read") from exc
        return total

    def read_at(self, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.read_into(offset, [buffer])
        return bytes(buffer)

    def size(self) -> int:
        try:
            return os.fstat(self.fd).st_size
        except OSError as exc:
            raise self._error(exc, "stat") from exc

    def identity(self) -> tuple[int, int]:
        """(st_dev, st_ino): which file this is, whatever its name now."""
        try:
            status = os.fstat(self.fd)
        except OSError as exc:
            raise self._error(exc, "stat") from exc
        return status.st_dev, status.st_ino

    def sync(self) -> None:
        """Make everything written to this file so far durable (any descriptor's)."""
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise self._error(exc, "sync") from exc

    def publish(self) -> str:
        """Partial file only: sync it, give it its target's name, sync the directory.

        Returns the target path.  Until this returns the target is untouched.
        """
        if self.partial_of is None:
            raise SnapshotError(f"{self.path} is not a partial snapshot")
        self.sync()
        target = self.partial_of
        try:
            os.rename(self.path, target)
        except OSError as exc:
            raise self._error(exc, "publish") from exc
        self.path, self.partial_of = target, None
        _sync_directory(os.path.dirname(os.path.abspath(target)))
        return target

    def discard(self) -> None:
        """Partial file only: remove it (a save that failed)."""
        if self.partial_of is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise self._error(exc, "remove") from exc

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SnapshotFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sync_directory(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise SnapshotError(f"cannot open directory {path}: {exc.strerror}") from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        raise SnapshotError(f"cannot sync directory {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def partial_path(target: str) -> str:
    """A fresh hidden name next to `target` for its partial file.  SnapshotError
    where that name would be too long for the directory's filesystem."""
    head, tail = os.path.split(os.path.abspath(target))
    name = f".{tail}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        longest = os.pathconf(head, "PC_NAME_MAX")
    except OSError:
        longest = 255
    if len(os.fsencode(name)) > longest:
        # Said first, short: the one-line error cuts a long path's tail.
        raise SnapshotError(f"file name too long for a save ({len(os.fsencode(tail))} bytes; its partial "
                            f"file's name adds {len(os.fsencode(name)) - len(os.fsencode(tail))}, "
                            f"over {longest}): {target}")
    return os.path.join(head, name)


@dataclass(frozen=True)
class PartialFile:
    """A partial file found in a directory: a save in progress, or a dead one's."""

    path: str
    target: str  # the snapshot it would have been published as
    pid: int  # the process that saved into it
    size: int
    stale: bool  # its save is gone: nothing will ever publish or remove it


def _process_runs(pid: int) -> bool:
    if not 0 < pid <= _PID_MAX:
        return False  # (0 would signal our own process group)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"  # a zombie saves nothing
    except (OSError, IndexError):
        return True


def _probe(path: str, pid: int) -> tuple[int, bool] | None:
    """``(size, stale)`` of the partial file at `path`; None if it is gone.

    Stale: nobody holds its lock, unless the file is new and its pid runs (a save
    takes its lock just after creating the file, and runs meanwhile).  Where locks
    are not supported the pid alone decides.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None  # a symbolic link: only named like one
        return (os.lstat(path).st_size, False)  # not ours to judge (another user's)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            return None  # only named like one
        size = status.st_size
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return size, False  # its save holds the lock: in progress
        except OSError:
            return size, not _process_runs(pid)  # no locks on this filesystem
        new = time.time() - status.st_mtime < LOCK_WINDOW_S
        return size, not (new and _process_runs(pid))
    finally:
        os.close(fd)


def partial_files(directory: str, target: str | None = None) -> list[PartialFile]:
    """The partial files in `directory` (of the target named `target` only, if
    given), by name.  Raises SnapshotError if the directory cannot be read."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise SnapshotError(f"cannot list {directory}: {exc.strerror}") from exc
    found = []
    for name in names:
        match = _PARTIAL_NAME.fullmatch(name)
        if match is None or (target is not None and match["target"] != target):
            continue
        path = os.path.join(directory, name)
        try:
            probed = _probe(path, int(match["pid"]))
        except OSError:
            continue
        if probed is not None:
            found.append(PartialFile(path, os.path.join(directory, match["target"]), int(match["pid"]),
                                     *probed))
    return found


def remove_partial(partial: PartialFile) -> None:
    """Remove a stale partial file.  Raises SnapshotError."""
    if not partial.stale:
        raise SnapshotError(f"{partial.path} belongs to a save in progress (process {partial.pid})")
    try:
        os.unlink(partial.path)
    except FileNotFoundError:
        pass  # another save cleaned it up first
    except OSError as exc:
        raise SnapshotError(f"cannot remove {partial.path}: {exc.strerror}") from exc


def _clean_partials(target: str) -> None:
    """Before a save to `target`: remove the stale partial files a dead save left
    there; leave a running save's.  Never fails the save (it warns)."""
    head, tail = os.path.split(os.path.abspath(target))
    try:
        partials = partial_files(head, tail)
    except SnapshotError:
        return  # creating the new partial file will say what is wrong
    for partial in partials:
        if not partial.stale:
            log.warning("another save to %s is in progress (process %d); the one that finishes "
                        "last replaces the other", target, partial.pid)
            continue
        try:
            remove_partial(partial)
        except SnapshotError as exc:
            log.warning("%s", exc)
            continue
        log.warning("removed %s (%s), left by a save to %s that died (process %d)",
                    partial.path, size_text(partial.size), target, partial.pid)


def _not_a_file(mode: int) -> str:
    """What a file of st_mode `mode` is, when it is not a regular file ("" if it is)."""
    if stat.S_ISREG(mode):
        return ""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def _check_target(path: str) -> None:
    """A save replaces its target by rename: only a regular file, or nothing, may be
    there (a device node such as /dev/null would be replaced by the snapshot)."""
    try:
        kind = _not_a_file(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SnapshotError(f"cannot save to {path}: {exc.strerror}") from exc
    if kind == "a directory":
        raise SnapshotError(f"cannot save to {path}: it is a directory")
    if kind:
        raise SnapshotError(f"cannot save to {path}: it is {kind}, which a save would replace "
                            f"with a regular file")


def open_file(path: str, mode: Mode, direct_io: bool = False) -> SnapshotFile:
    """Open a snapshot file.

    ``create``: a new partial file for the target `path` (published later);
    ``write``: an existing (partial) file, write-only, as channels open it;
    ``read``: an existing snapshot, read-only.  Raises SnapshotError.
    """
    flags = {"create": os.O_RDWR | os.O_CREAT | os.O_EXCL, "write": os.O_WRONLY,
             "read": os.O_RDONLY}[mode] | os.O_CLOEXEC
    if direct_io:
        flags |= os.O_DIRECT
    target = path
    if mode == "create":
        _check_target(path)
        _clean_partials(path)
        path = partial_path(path)
    elif mode == "read":
        flags |= os.O_NONBLOCK  # a FIFO would block the open until a writer came
    try:
        fd = os.open(path, flags, 0o600)  # guest memory: for its owner's eyes only
    except OSError as exc:
        if direct_io and exc.errno == errno.EINVAL:
            raise SnapshotError(f"the filesystem of {target} does not support O_DIRECT "
                                f"(direct_io); save without it") from exc
        if exc.errno == errno.ENOENT and mode == "read":
            raise SnapshotError(f"no snapshot at {path}") from exc
        raise SnapshotError(f"cannot open {path}: {exc.strerror}") from exc
    if mode == "read":
        kind = _not_a_file(os.fstat(fd).st_mode)
        if kind:
            os.close(fd)
            raise SnapshotError(f"{path} is {kind}, not a snapshot file")
        os.set_blocking(fd, True)
    if mode == "create":
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until closed: "this save is alive"
        except OSError:
            pass  # no locks on this filesystem: the pid in the name has to do
    return SnapshotFile(path, fd, partial_of=target if mode == "create" else None)


register_file_transport(open_file)
