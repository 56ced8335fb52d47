"""The file transport: positional I/O on a snapshot file (mapped-ram).

Where a socket transport streams buffers, this one writes each buffer at a
fixed offset (``os.pwritev``) and reads it back from there (``os.preadv``), so
N channel processes, each with its own descriptor on the same file, move guest
pages straight between shared memory and the file in parallel, with no copy in
Python.  What goes at which offset is the snapshot format's business
(engine/snapshot_format.py); this module only moves bytes and makes them durable.

A save writes to a hidden *partial* file next to the target and publishes it
with ``rename`` once everything is on disk (fsync of the file, then of the
directory); a failed save removes it.  So the target path only ever names a
complete snapshot, and an older one there stays intact until the new one is.

``O_DIRECT`` (``direct_io=True``) bypasses the page cache where the filesystem
supports it; guest pages are page-aligned and the format puts pages at
page-aligned offsets, which is all it asks.  Where it is not supported the
open fails with a clear SnapshotError.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Sequence
from typing import Literal

from engine.errors import SnapshotError, SnapshotFormatError
from engine.transport import Buffer, advance, batch, flat_views

Mode = Literal["create", "write", "read"]

_STEP = 64 << 20  # bytes per call at most: keeps one call's pinned pages bounded


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
        """Fill every buffer from file offset `offset`.  A file that ends first is
        a truncated snapshot (SnapshotFormatError)."""
        views = flat_views(buffers)
        total = sum(v.nbytes for v in views)
        start = 0
        try:
            while start < len(views):
                done = os.preadv(self.fd, batch(views, start, _STEP), offset)
                if done == 0:
                    raise SnapshotFormatError(f"{self.path} ends at {offset}: truncated")
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
    """A fresh hidden name next to `target` for its partial file."""
    head, tail = os.path.split(os.path.abspath(target))
    return os.path.join(head, f".{tail}.partial-{os.getpid()}-{secrets.token_hex(4)}")


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
        if os.path.isdir(path):
            raise SnapshotError(f"cannot save to {path}: it is a directory")
        path = partial_path(path)
    try:
        fd = os.open(path, flags, 0o600)  # guest memory: for its owner's eyes only
    except OSError as exc:
        if direct_io and exc.errno == errno.EINVAL:
            raise SnapshotError(f"the filesystem of {target} does not support O_DIRECT "
                                f"(direct_io); save without it") from exc
        if exc.errno == errno.ENOENT and mode == "read":
            raise SnapshotError(f"no snapshot at {path}") from exc
        raise SnapshotError(f"cannot open {path}: {exc.strerror}") from exc
    return SnapshotFile(path, fd, partial_of=target if mode == "create" else None)
